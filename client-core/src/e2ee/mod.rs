//! End-to-end media encryption: SFrame (RFC 9605) frames with per-sender keys, exchanged with
//! HPKE over signaling, so that neither a forwarding server nor the signaling server can read
//! media. Sans-IO: time is never read, randomness comes from a seed the driver passes in, and
//! messages go out through [`Session::poll_output`].
//!
//! - [`frame`]: the frame transform ([`FrameCrypto`]): what the pipeline calls on each encoded
//!   frame before it is packetized and on each depacketized frame before it is decoded.
//! - [`Session`]: the key schedule. Each participant has an X25519 key pair and its own sender
//!   key (SFrame base key material, 32 random bytes; key id = generation << 8 | ratchet step).
//!   1. Peers commit first: each sends every peer `Commit` (SHA-256 of its public key) and
//!      reveals its `PublicKey` to a peer only once that peer's commitment arrived; a revealed
//!      key that does not match its commitment is refused. Whoever relays the keys must so fix
//!      a substitute key before it sees the one it would replace, which is what lets a short
//!      safety code stand for the whole set.
//!   2. Once a peer's public key is known, the sender key is sealed to it with HPKE (RFC 9180:
//!      X25519, HKDF-SHA256, AES-128-GCM, authenticated mode with the sender's own key pair, so
//!      the recipient knows which public key sealed it) and sent as `SenderKey`.
//!   3. Someone joins: every sender ratchets its key one step (HKDF, RFC 9605 section 5.1) and
//!      seals the new step to the joiner only; the others catch up from the key id in the
//!      frame header. The joiner cannot run the ratchet backwards: earlier frames stay closed.
//!   4. Someone leaves: every sender draws a new key (next generation) and seals it to those
//!      who remain. The leaver's keys open nothing sent after that.
//!   5. [`safety_code`]: 12 digits from SHA-256 of every participant's public key, sorted;
//!      the participants read it aloud to each other, and a match means nobody swapped a key.
//!
//! Known gaps: a receiver that gets frames under a new key before the sealed key itself (the
//! key goes over signaling, the frames over the media path) drops them and asks for a
//! keyframe; nothing holds the switch back until the others acknowledge the key. SFrame's
//! replay check is not used (SRTP already refuses replays on each hop; a forwarding server
//! could replay a frame it saw).

pub mod frame;

use std::collections::{BTreeMap, VecDeque};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bedside_protocol::{E2eeMessage, ParticipantId};
use hpke::aead::AesGcm128;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sframe::ratchet::{Generation, RatchetBits, RatchetingEncryptionKey, RatchetingKeyId};
use sha2::{Digest, Sha256};

pub use frame::{Codec, FrameCrypto, FrameCryptoStats};

type Kem = X25519HkdfSha256;
type PublicKey = <Kem as hpke::Kem>::PublicKey;
type PrivateKey = <Kem as hpke::Kem>::PrivateKey;

/// The HPKE `info` of a sealed sender key: binds it to this use and version.
const HPKE_INFO: &[u8] = b"bedside e2ee sender key v1";

#[derive(Debug, thiserror::Error)]
pub enum E2eeError {
    #[error("no key for this frame")]
    NoKey,
    #[error("malformed frame")]
    Malformed,
    #[error("sframe: {0}")]
    Sframe(#[from] sframe::error::SframeError),
}

/// What the session asks of its driver.
#[derive(Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `message` to `to` over signaling.
    Send {
        to: ParticipantId,
        message: E2eeMessage,
    },
    /// Encrypt what we send with this key from now on ([`FrameCrypto::set_send_key`]).
    SendKey { key_id: u64, material: Vec<u8> },
    /// `from`'s key ([`FrameCrypto::add_receive_key`]).
    ReceiveKey {
        from: ParticipantId,
        key_id: u64,
        material: Vec<u8>,
    },
    /// `peer` left: forget its keys ([`FrameCrypto::forget`]).
    Forget(ParticipantId),
    /// The safety code changed: `None` while some peer's public key is still missing.
    SafetyCode(Option<String>),
}

impl std::fmt::Debug for Output {
    /// Key material is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Send { to, message } => {
                let kind = match message {
                    E2eeMessage::Commit { .. } => "commit",
                    E2eeMessage::PublicKey { .. } => "public_key",
                    E2eeMessage::SenderKey { .. } => "sender_key",
                };
                write!(f, "Send({kind} to {to})")
            }
            Output::SendKey { key_id, .. } => write!(f, "SendKey({key_id:#x})"),
            Output::ReceiveKey { from, key_id, .. } => {
                write!(f, "ReceiveKey({from}, {key_id:#x})")
            }
            Output::Forget(p) => write!(f, "Forget({p})"),
            Output::SafetyCode(c) => write!(f, "SafetyCode({c:?})"),
        }
    }
}

/// What we know of one peer.
#[derive(Default)]
struct PeerState {
    /// The hash its `Commit` promised.
    commitment: Option<[u8; 32]>,
    /// Its public key, once revealed and matching the commitment.
    public: Option<PublicKey>,
    /// Whether we sent it our commitment (a commitment is answered with ours only once, or
    /// two peers would answer each other forever).
    committed_to: bool,
}

/// Our sender key: the ratcheting key and the material its current step was derived from
/// (what a new recipient is sent).
struct SenderKey {
    key: RatchetingEncryptionKey,
    material: Vec<u8>,
}

impl SenderKey {
    fn new(generation: u64, material: Vec<u8>) -> Self {
        let id = RatchetingKeyId::new(
            Generation::from(generation),
            RatchetBits::new(frame::RATCHET_BITS),
        );
        let key = RatchetingEncryptionKey::derive_from(frame::CIPHER_SUITE, id, &material)
            .expect("32 bytes of key material always derive");
        SenderKey { key, material }
    }

    fn key_id(&self) -> u64 {
        self.key.key_id().into()
    }

    fn generation(&self) -> u64 {
        self.key.key_id().generation().into()
    }

    /// The next ratchet step, or `None` when the step bits are used up (draw a new key then).
    fn ratchet(&self) -> Option<SenderKey> {
        let step: u64 = self.key.key_id().ratchet_step().into();
        if step + 1 >= 1 << frame::RATCHET_BITS {
            return None;
        }
        let material = self.key.key_material().as_ref().to_vec();
        let key = self.key.ratchet().ok()?;
        Some(SenderKey { key, material })
    }
}

/// One participant's key schedule (see the module doc).
pub struct Session {
    rng: StdRng,
    secret: PrivateKey,
    public: PublicKey,
    sender: SenderKey,
    peers: BTreeMap<ParticipantId, PeerState>,
    outputs: VecDeque<Output>,
    code: Option<String>,
}

impl Session {
    /// A new key pair and sender key from `seed` (32 bytes from the operating system's random
    /// source: the driver draws them; tests pass fixed ones).
    pub fn new(seed: [u8; 32]) -> Self {
        let mut rng = StdRng::from_seed(seed);
        let (secret, public) = Kem::gen_keypair(&mut rng);
        let sender = SenderKey::new(0, random_material(&mut rng));
        let mut session = Session {
            rng,
            secret,
            public,
            sender,
            peers: BTreeMap::new(),
            outputs: VecDeque::new(),
            code: None,
        };
        session.push_send_key();
        session
    }

    /// Our public key as the wire carries it.
    pub fn public_key(&self) -> String {
        BASE64.encode(self.public.to_bytes())
    }

    /// The key id we encrypt with now.
    pub fn send_key_id(&self) -> u64 {
        self.sender.key_id()
    }

    /// The current safety code, once every peer's public key is known.
    pub fn safety_code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// `peer` is in the consultation (listed when we were admitted, or back after its link
    /// dropped): (re)send it what it needs from us. Repeating it is harmless.
    pub fn peer_present(&mut self, peer: &ParticipantId) {
        let state = self.peers.entry(peer.clone()).or_default();
        let (committed, known) = (state.commitment.is_some(), state.public.is_some());
        self.send_commit(peer);
        if committed {
            self.send_public_key(peer);
        }
        if known {
            self.seal_sender_key(peer);
        }
        self.update_code();
    }

    /// `peer` joined after us: ratchet our key (so it cannot read what we sent before), then
    /// treat it as present.
    pub fn peer_joined(&mut self, peer: &ParticipantId) {
        if self.peers.contains_key(peer) {
            return self.peer_present(peer);
        }
        match self.sender.ratchet() {
            Some(next) => {
                self.sender = next;
                self.push_send_key();
            }
            None => self.rotate(),
        }
        self.peer_present(peer);
    }

    /// `peer` left for good: forget it and draw a new key for those who remain.
    pub fn peer_left(&mut self, peer: &ParticipantId) {
        if self.peers.remove(peer).is_none() {
            return;
        }
        self.outputs.push_back(Output::Forget(peer.clone()));
        self.rotate();
        self.update_code();
    }

    /// An `e2ee` message from `from`. Anything malformed or out of turn is dropped (with a
    /// log line that carries no key).
    pub fn handle_message(&mut self, from: &ParticipantId, message: E2eeMessage) {
        match message {
            E2eeMessage::Commit { hash } => {
                let Some(hash) = decode_array::<32>(&hash) else {
                    return tracing::debug!("dropped a malformed e2ee commitment");
                };
                let state = self.peers.entry(from.clone()).or_default();
                if state.commitment != Some(hash) {
                    // A new commitment: a key revealed before belongs to the old one.
                    state.commitment = Some(hash);
                    state.public = None;
                    self.update_code();
                }
                if !self.peers.get(from).is_some_and(|s| s.committed_to) {
                    self.send_commit(from);
                }
                self.send_public_key(from);
            }
            E2eeMessage::PublicKey { key } => {
                let Some(state) = self.peers.get_mut(from) else {
                    return;
                };
                let Some(bytes) = decode_array::<32>(&key) else {
                    return tracing::debug!("dropped a malformed e2ee public key");
                };
                if state.commitment != Some(Sha256::digest(bytes).into()) {
                    return tracing::warn!(
                        "refused an e2ee public key that does not match its commitment"
                    );
                }
                let Ok(public) = PublicKey::from_bytes(&bytes) else {
                    return;
                };
                if state.public.as_ref() == Some(&public) {
                    return;
                }
                state.public = Some(public);
                self.update_code();
                self.seal_sender_key(from);
            }
            E2eeMessage::SenderKey {
                key_id,
                enc,
                sealed,
            } => {
                let Some(sender) = self.peers.get(from).and_then(|s| s.public.clone()) else {
                    return tracing::debug!(
                        "dropped a sender key from a peer without a public key"
                    );
                };
                let (Some(enc), Some(sealed)) = (decode(&enc), decode(&sealed)) else {
                    return tracing::debug!("dropped a malformed sender key");
                };
                let Ok(enc) = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc) else {
                    return;
                };
                let opened = hpke::single_shot_open::<AesGcm128, HkdfSha256, Kem>(
                    &OpModeR::Auth(sender),
                    &self.secret,
                    &enc,
                    HPKE_INFO,
                    &sealed,
                    &key_id.to_be_bytes(),
                );
                match opened {
                    Ok(material) => self.outputs.push_back(Output::ReceiveKey {
                        from: from.clone(),
                        key_id,
                        material,
                    }),
                    Err(_) => tracing::warn!("a sealed sender key did not open"),
                }
            }
        }
    }

    fn send(&mut self, to: &ParticipantId, message: E2eeMessage) {
        self.outputs.push_back(Output::Send {
            to: to.clone(),
            message,
        });
    }

    fn send_commit(&mut self, to: &ParticipantId) {
        if let Some(state) = self.peers.get_mut(to) {
            state.committed_to = true;
        }
        let hash = BASE64.encode(Sha256::digest(self.public.to_bytes()));
        self.send(to, E2eeMessage::Commit { hash });
    }

    fn send_public_key(&mut self, to: &ParticipantId) {
        let key = self.public_key();
        self.send(to, E2eeMessage::PublicKey { key });
    }

    /// Seals our current sender key to `to` (whose public key we know).
    fn seal_sender_key(&mut self, to: &ParticipantId) {
        let Some(recipient) = self.peers.get(to).and_then(|s| s.public.clone()) else {
            return;
        };
        let key_id = self.sender.key_id();
        let sealed = hpke::single_shot_seal::<AesGcm128, HkdfSha256, Kem, _>(
            &OpModeS::Auth((self.secret.clone(), self.public.clone())),
            &recipient,
            HPKE_INFO,
            &self.sender.material,
            &key_id.to_be_bytes(),
            &mut self.rng,
        );
        let Ok((enc, sealed)) = sealed else {
            return tracing::warn!("sealing a sender key failed");
        };
        let message = E2eeMessage::SenderKey {
            key_id,
            enc: BASE64.encode(enc.to_bytes()),
            sealed: BASE64.encode(sealed),
        };
        self.send(to, message);
    }

    /// A new key (the next generation), sealed to every peer whose public key we know.
    fn rotate(&mut self) {
        let generation = self.sender.generation() + 1;
        self.sender = SenderKey::new(generation, random_material(&mut self.rng));
        self.push_send_key();
        let peers: Vec<_> = self.peers.keys().cloned().collect();
        for peer in peers {
            self.seal_sender_key(&peer);
        }
    }

    fn push_send_key(&mut self) {
        self.outputs.push_back(Output::SendKey {
            key_id: self.sender.key_id(),
            material: self.sender.material.clone(),
        });
    }

    fn update_code(&mut self) {
        let mut keys = vec![self.public.to_bytes().to_vec()];
        for state in self.peers.values() {
            match &state.public {
                Some(k) => keys.push(k.to_bytes().to_vec()),
                None => keys.clear(),
            }
            if keys.is_empty() {
                break;
            }
        }
        let code = (!keys.is_empty() && !self.peers.is_empty()).then(|| safety_code(keys));
        if code != self.code {
            self.code.clone_from(&code);
            self.outputs.push_back(Output::SafetyCode(code));
        }
    }
}

/// Twelve digits in groups of three (`"042 917 335 608"`) from SHA-256 of the public keys,
/// sorted: every participant who holds the same set computes the same code.
pub fn safety_code(mut public_keys: Vec<Vec<u8>>) -> String {
    public_keys.sort();
    let mut hash = Sha256::new();
    hash.update(b"bedside safety code v1");
    for key in &public_keys {
        hash.update(key);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let n = u64::from_be_bytes(first) % 1_000_000_000_000;
    let digits = format!("{n:012}");
    format!(
        "{} {} {} {}",
        &digits[0..3],
        &digits[3..6],
        &digits[6..9],
        &digits[9..12]
    )
}

fn random_material(rng: &mut StdRng) -> Vec<u8> {
    let mut material = vec![0u8; 32];
    rng.fill_bytes(&mut material);
    material
}

fn decode(text: &str) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    decode(text)?.try_into().ok()
}

#[cfg(test)]
mod tests;
