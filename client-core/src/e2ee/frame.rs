//! The frame transform: SFrame (RFC 9605, the `sframe` crate, AES-128-GCM with HKDF-SHA256) on
//! each encoded frame before it is packetized, and off each depacketized frame before it is
//! decoded.
//!
//! - **Opus**: the whole packet is one SFrame frame (19 bytes more: a 3-byte header for small
//!   key ids and counters, the 16-byte tag).
//! - **H.264** (Annex-B access units): each NAL unit keeps its one-byte header in the clear, as
//!   authenticated metadata, so the packetizer still splits NAL units and aggregates SPS/PPS,
//!   and a forwarding server still reads NAL types and finds keyframes. The rest of the unit is
//!   one SFrame frame, escaped like RBSP (an emulation prevention byte `03` after any `00 00`
//!   followed by `00`..`03`, and after a final `00`), so no start code can appear inside it.
//!
//! Sans-IO: no clock, no threads. The driver and the media threads share one [`FrameCrypto`]
//! behind a mutex; the key [`Session`](super::Session) hands it keys.

use std::collections::HashMap;

use bedside_protocol::ParticipantId;
use sframe::CipherSuite;
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use sframe::key::EncryptionKey;
use sframe::ratchet::{
    Generation, RatchetBits, RatchetStepDiff, RatchetingDecryptionKey, RatchetingKeyId,
    RatchetingKeyStore,
};

use super::E2eeError;

/// AES-128-GCM with HKDF-SHA256 (RFC 9605 cipher suite 4).
pub const CIPHER_SUITE: CipherSuite = CipherSuite::AesGcm128Sha256;

/// The low bits of a key id that count ratchet steps; the rest is the key generation.
pub const RATCHET_BITS: u8 = 8;

/// How many ratchet steps a receiver catches up with at once (each step is one HKDF, and the
/// step comes from an unauthenticated header, so it is bounded): more joins than this between
/// two frames a receiver decrypts would need a fresh key.
pub const MAX_CATCH_UP: u64 = 16;

/// Which encoded media a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// An H.264 access unit, Annex-B.
    H264,
    /// One Opus packet.
    Opus,
}

/// What has been done, for tests and statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameCryptoStats {
    pub frames_encrypted: u64,
    pub frames_decrypted: u64,
    /// Frames that did not decrypt: no key for their key id yet, a key we were not given, or
    /// tampered with.
    pub decrypt_failures: u64,
}

/// The sender's key and every remote sender's keys, as the media threads use them.
pub struct FrameCrypto {
    send: Option<EncryptionKey>,
    counter: MonotonicCounter,
    receive: HashMap<ParticipantId, RatchetingKeyStore>,
    stats: FrameCryptoStats,
}

impl Default for FrameCrypto {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCrypto {
    pub fn new() -> Self {
        FrameCrypto {
            send: None,
            counter: MonotonicCounter::default(),
            receive: HashMap::new(),
            stats: FrameCryptoStats::default(),
        }
    }

    pub fn stats(&self) -> &FrameCryptoStats {
        &self.stats
    }

    /// Encrypts with this key from now on. The frame counter goes on (it never repeats, so no
    /// nonce is ever used twice under one key).
    pub fn set_send_key(&mut self, key_id: u64, material: &[u8]) -> Result<(), E2eeError> {
        self.send = Some(EncryptionKey::derive_from(CIPHER_SUITE, key_id, material)?);
        Ok(())
    }

    /// `from`'s key for `key_id`'s generation (and, by ratcheting, its later steps). The
    /// generation before it is kept for frames still on their way; older ones are dropped.
    pub fn add_receive_key(
        &mut self,
        from: &ParticipantId,
        key_id: u64,
        material: &[u8],
    ) -> Result<(), E2eeError> {
        let id = RatchetingKeyId::from_key_id(key_id, RatchetBits::new(RATCHET_BITS));
        let key = RatchetingDecryptionKey::derive_from(CIPHER_SUITE, id, material)?;
        let store = self.receive.entry(from.clone()).or_insert_with(|| {
            RatchetingKeyStore::new(
                RatchetBits::new(RATCHET_BITS),
                RatchetStepDiff::from(MAX_CATCH_UP),
            )
        });
        let generation = u64::from(id.generation());
        for old in generation.saturating_sub(8)..generation.saturating_sub(1) {
            store.remove(Generation::from(old));
        }
        store.insert(key);
        Ok(())
    }

    /// Forgets `from`'s keys (it left).
    pub fn forget(&mut self, from: &ParticipantId) {
        self.receive.remove(from);
    }

    /// Encrypts one encoded frame; fails when no send key is set yet.
    pub fn encrypt(&mut self, codec: Codec, frame: &[u8]) -> Result<Vec<u8>, E2eeError> {
        let key = self.send.as_ref().ok_or(E2eeError::NoKey)?;
        let counter = &mut self.counter;
        let out = match codec {
            Codec::Opus => {
                let media = MediaFrame::try_new(counter, frame)?;
                media.encrypt(key)?.sframe_cipher_text().to_vec()
            }
            Codec::H264 => {
                let mut out = Vec::with_capacity(frame.len() + 64);
                for nal in nal_units(frame) {
                    let Some((&header, payload)) = nal.split_first() else {
                        continue;
                    };
                    let media = MediaFrame::try_with_meta_data(&mut *counter, payload, [header])?;
                    let encrypted = media.encrypt(key)?;
                    out.extend_from_slice(&[0, 0, 0, 1, header]);
                    escape_into(encrypted.sframe_cipher_text(), &mut out);
                }
                out
            }
        };
        self.stats.frames_encrypted += 1;
        Ok(out)
    }

    /// Decrypts one frame from `from` (the key id in its SFrame header picks the key).
    pub fn decrypt(
        &mut self,
        from: &ParticipantId,
        codec: Codec,
        frame: &[u8],
    ) -> Result<Vec<u8>, E2eeError> {
        let result = self.decrypt_inner(from, codec, frame);
        match result {
            Ok(_) => self.stats.frames_decrypted += 1,
            Err(_) => self.stats.decrypt_failures += 1,
        }
        result
    }

    fn decrypt_inner(
        &mut self,
        from: &ParticipantId,
        codec: Codec,
        frame: &[u8],
    ) -> Result<Vec<u8>, E2eeError> {
        let store = self.receive.get_mut(from).ok_or(E2eeError::NoKey)?;
        match codec {
            Codec::Opus => {
                let encrypted = EncryptedFrame::try_new(frame)?;
                Ok(encrypted.decrypt(&mut *store)?.payload().to_vec())
            }
            Codec::H264 => {
                let mut out = Vec::with_capacity(frame.len());
                for nal in nal_units(frame) {
                    let Some((&header, payload)) = nal.split_first() else {
                        continue;
                    };
                    let payload = unescape(payload);
                    let encrypted = EncryptedFrame::try_with_meta_data(&payload, [header])?;
                    let media = encrypted.decrypt(&mut *store)?;
                    out.extend_from_slice(&[0, 0, 0, 1, header]);
                    out.extend_from_slice(media.payload());
                }
                if out.is_empty() {
                    return Err(E2eeError::Malformed);
                }
                Ok(out)
            }
        }
    }
}

/// The NAL units of an Annex-B stream (start codes `00 00 01` or `00 00 00 01`), without their
/// start codes and without the zero bytes that trail a unit before the next start code.
pub fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut units = Vec::new();
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i + 2 < stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            if let Some(s) = start {
                units.push(trim_zeros(&stream[s..i]));
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        units.push(trim_zeros(&stream[s..]));
    }
    units.retain(|u| !u.is_empty());
    units
}

fn trim_zeros(unit: &[u8]) -> &[u8] {
    let end = unit.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    &unit[..end]
}

/// Appends `data` with emulation prevention: `03` after each `00 00` that a byte of `00`..`03`
/// would follow, and after a final `00` (which the next start code would swallow).
pub fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    let mut zeros = 0;
    for &b in data {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    if zeros > 0 {
        out.push(3);
    }
}

/// Undoes [`escape_into`]: drops each `03` that follows `00 00`, and a final `03` after `00`.
pub fn unescape(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut zeros = 0;
    for (i, &b) in data.iter().enumerate() {
        let last = i + 1 == data.len();
        if b == 3 && (zeros >= 2 || (last && zeros > 0)) {
            zeros = 0;
            continue;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{H264Config, H264Decoder, H264Encoder, PatternConfig, TestPatternSource};

    fn peer(name: &str) -> ParticipantId {
        ParticipantId(name.into())
    }

    /// A sender and a receiver sharing the key `material` under key id 0x100.
    fn pair(material: &[u8]) -> (FrameCrypto, FrameCrypto) {
        let mut tx = FrameCrypto::new();
        tx.set_send_key(0x100, material).unwrap();
        let mut rx = FrameCrypto::new();
        rx.add_receive_key(&peer("a"), 0x100, material).unwrap();
        (tx, rx)
    }

    /// Real H.264 from the encoder: a keyframe and a few frames after it.
    fn access_units(n: usize) -> Vec<Vec<u8>> {
        let config = H264Config {
            width: 320,
            height: 180,
            bitrate_bps: 300_000,
            frame_skip: false,
            ..Default::default()
        };
        let mut encoder = H264Encoder::new(config).unwrap();
        let mut pattern = TestPatternSource::new(PatternConfig {
            width: 320,
            height: 180,
            fps: 30,
            tag: 3,
        })
        .unwrap();
        (0..n as u64)
            .map(|i| {
                let frame = pattern.next_frame(i * 33_333);
                encoder.encode(&frame).unwrap().expect("a frame").data
            })
            .collect()
    }

    fn has_start_code(data: &[u8]) -> bool {
        data.windows(3).any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 1)
    }

    #[test]
    fn escaping_round_trips_and_leaves_no_start_code() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![0, 0, 0],
            vec![0, 0, 1],
            vec![0, 0, 3],
            vec![1, 0, 0, 2, 0, 0, 0, 0, 3, 0],
            (0..=255u8).cycle().take(2000).map(|b| b % 4).collect(),
        ];
        for data in cases {
            let mut out = Vec::new();
            escape_into(&data, &mut out);
            assert!(!has_start_code(&out), "{data:?} -> {out:?}");
            assert_ne!(out.last(), Some(&0), "{data:?} -> {out:?}");
            assert_eq!(unescape(&out), data);
        }
    }

    #[test]
    fn opus_round_trips_with_19_bytes_more() {
        let (mut tx, mut rx) = pair(b"0123456789abcdef0123456789abcdef");
        let packet = vec![0x78u8; 100];
        let encrypted = tx.encrypt(Codec::Opus, &packet).unwrap();
        assert_eq!(encrypted.len(), packet.len() + 19);
        assert_ne!(&encrypted[3..103], &packet[..]);
        assert_eq!(
            rx.decrypt(&peer("a"), Codec::Opus, &encrypted).unwrap(),
            packet
        );
    }

    /// Real H.264 through the transform: the NAL headers stay, no start code appears inside a
    /// unit, the encrypted stream does not decode, and the decrypted one does.
    #[test]
    fn h264_keeps_nal_headers_and_decodes_after_decryption() {
        let (mut tx, mut rx) = pair(b"another key, 32 bytes long......");
        let mut decoder = H264Decoder::new().unwrap();
        let mut plain_decoder = H264Decoder::new().unwrap();
        let mut decoded = 0;
        for au in access_units(10) {
            let encrypted = tx.encrypt(Codec::H264, &au).unwrap();
            let (plain_nals, sealed_nals) = (nal_units(&au), nal_units(&encrypted));
            assert_eq!(plain_nals.len(), sealed_nals.len());
            for (p, s) in plain_nals.iter().zip(&sealed_nals) {
                assert_eq!(p[0], s[0], "the NAL header is kept");
                assert!(!has_start_code(&s[1..]), "no start code inside a unit");
                assert_ne!(&p[1..], &s[1..]);
            }
            // The ciphertext is no H.264 picture.
            assert!(!matches!(plain_decoder.decode(&encrypted, 0), Ok(Some(_))));
            let decrypted = rx.decrypt(&peer("a"), Codec::H264, &encrypted).unwrap();
            let mut expected = Vec::new();
            for nal in &plain_nals {
                expected.extend_from_slice(&[0, 0, 0, 1]);
                expected.extend_from_slice(nal);
            }
            assert_eq!(decrypted, expected);
            if let Ok(Some(_)) = decoder.decode(&decrypted, 0) {
                decoded += 1;
            }
        }
        assert!(decoded >= 9, "decoded {decoded} of 10");
    }

    #[test]
    fn tampering_fails() {
        let (mut tx, mut rx) = pair(b"0123456789abcdef0123456789abcdef");
        let sealed = tx.encrypt(Codec::Opus, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                rx.decrypt(&peer("a"), Codec::Opus, &bad).is_err(),
                "byte {i}"
            );
        }
        // A changed NAL header (the authenticated metadata) fails too.
        let au = &access_units(1)[0];
        let mut sealed = tx.encrypt(Codec::H264, au).unwrap();
        let at = sealed.windows(4).position(|w| w == [0, 0, 0, 1]).unwrap() + 4;
        sealed[at] ^= 0x20; // NRI bits: the unit type is unchanged
        assert!(rx.decrypt(&peer("a"), Codec::H264, &sealed).is_err());
        // Each of the 27 tampered Opus packets (8 bytes + 19) and the H.264 frame.
        assert_eq!(rx.stats().decrypt_failures, 27 + 1);
    }

    #[test]
    fn a_wrong_key_or_another_sender_fails() {
        let (mut tx, _) = pair(b"0123456789abcdef0123456789abcdef");
        let (_, mut wrong) = pair(b"fedcba9876543210fedcba9876543210");
        let sealed = tx.encrypt(Codec::Opus, b"hello, doctor").unwrap();
        assert!(wrong.decrypt(&peer("a"), Codec::Opus, &sealed).is_err());
        // Keys are per sender: the right key filed under another sender is not used.
        let mut other = FrameCrypto::new();
        other
            .add_receive_key(&peer("b"), 0x100, b"0123456789abcdef0123456789abcdef")
            .unwrap();
        assert!(other.decrypt(&peer("a"), Codec::Opus, &sealed).is_err());
        assert!(other.decrypt(&peer("b"), Codec::Opus, &sealed).is_ok());
    }
}
