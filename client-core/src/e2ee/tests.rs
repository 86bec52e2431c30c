//! The key schedule with real SFrame and HPKE: sessions and frame transforms of several
//! participants, their `e2ee` messages delivered as a relaying server would.

use std::collections::BTreeMap;

use super::*;

struct Participant {
    session: Session,
    crypto: FrameCrypto,
    code: Option<String>,
}

/// Participants by id, and the messages in flight (from, to, message).
#[derive(Default)]
struct Net {
    parts: BTreeMap<ParticipantId, Participant>,
}

fn id(name: &str) -> ParticipantId {
    ParticipantId(name.into())
}

impl Net {
    fn add(&mut self, name: &str, seed: u8) {
        let session = Session::new([seed; 32]);
        self.parts.insert(
            id(name),
            Participant {
                session,
                crypto: FrameCrypto::new(),
                code: None,
            },
        );
        self.pump();
    }

    fn with(&mut self, name: &str, f: impl FnOnce(&mut Session)) {
        f(&mut self.parts.get_mut(&id(name)).unwrap().session);
        self.pump();
    }

    /// Carries out every output until nobody has anything more to say.
    fn pump(&mut self) {
        loop {
            let mut mail = Vec::new();
            for (me, p) in self.parts.iter_mut() {
                while let Some(out) = p.session.poll_output() {
                    match out {
                        Output::Send { to, message } => mail.push((me.clone(), to, message)),
                        Output::SendKey { key_id, material } => {
                            p.crypto.set_send_key(key_id, &material).unwrap()
                        }
                        Output::ReceiveKey {
                            from,
                            key_id,
                            material,
                        } => p.crypto.add_receive_key(&from, key_id, &material).unwrap(),
                        Output::Forget(peer) => p.crypto.forget(&peer),
                        Output::SafetyCode(code) => p.code = code,
                    }
                }
            }
            if mail.is_empty() {
                return;
            }
            for (from, to, message) in mail {
                if let Some(p) = self.parts.get_mut(&to) {
                    p.session.handle_message(&from, message);
                }
            }
        }
    }

    fn seal(&mut self, name: &str, codec: Codec, frame: &[u8]) -> Vec<u8> {
        let p = self.parts.get_mut(&id(name)).unwrap();
        p.crypto.encrypt(codec, frame).unwrap()
    }

    fn opens(&mut self, reader: &str, sender: &str, codec: Codec, sealed: &[u8]) -> bool {
        let p = self.parts.get_mut(&id(reader)).unwrap();
        p.crypto.decrypt(&id(sender), codec, sealed).is_ok()
    }

    fn code(&self, name: &str) -> Option<String> {
        self.parts[&id(name)].code.clone()
    }
}

/// Doctor, clinician, interpreter: keys ratchet when the interpreter joins (it cannot read what
/// was sent before) and rotate when it leaves (its keys no longer open new frames).
#[test]
fn three_party_keys_ratchet_on_join_and_rotate_on_leave() {
    let mut net = Net::default();
    net.add("doctor", 1);
    net.add("clinician", 2);
    // The clinician is admitted after the doctor: the doctor sees it join, it sees the doctor
    // in its `admitted` list.
    net.with("doctor", |s| s.peer_joined(&id("clinician")));
    net.with("clinician", |s| s.peer_present(&id("doctor")));
    let before = net.seal("doctor", Codec::Opus, b"before the interpreter came");
    assert!(net.opens("clinician", "doctor", Codec::Opus, &before));
    let reply = net.seal("clinician", Codec::Opus, b"reply");
    assert!(net.opens("doctor", "clinician", Codec::Opus, &reply));
    let pair_code = net.code("doctor").expect("a code once both keys are known");
    assert_eq!(net.code("clinician").as_deref(), Some(pair_code.as_str()));
    assert_eq!(pair_code.len(), 15, "{pair_code}");

    // The interpreter joins.
    net.add("interpreter", 3);
    net.with("doctor", |s| s.peer_joined(&id("interpreter")));
    net.with("clinician", |s| s.peer_joined(&id("interpreter")));
    net.with("interpreter", |s| {
        s.peer_present(&id("doctor"));
        s.peer_present(&id("clinician"));
    });
    let ratcheted = net.parts[&id("doctor")].session.send_key_id();
    assert_eq!(ratcheted, 2, "a ratchet step per join, same generation");
    let after_join = net.seal("doctor", Codec::Opus, b"after the interpreter came");
    assert!(net.opens("interpreter", "doctor", Codec::Opus, &after_join));
    // The clinician was sent nothing new: it catches up from the key id in the header.
    assert!(net.opens("clinician", "doctor", Codec::Opus, &after_join));
    // What was sent before the join stays closed to the joiner.
    assert!(!net.opens("interpreter", "doctor", Codec::Opus, &before));
    let from_interpreter = net.seal("interpreter", Codec::Opus, b"hello");
    assert!(net.opens("doctor", "interpreter", Codec::Opus, &from_interpreter));
    assert!(net.opens("clinician", "interpreter", Codec::Opus, &from_interpreter));
    let group_code = net.code("doctor").unwrap();
    assert_ne!(group_code, pair_code);
    for name in ["clinician", "interpreter"] {
        assert_eq!(
            net.code(name).as_deref(),
            Some(group_code.as_str()),
            "{name}"
        );
    }

    // The interpreter leaves (its frame transform, with every key it was given, stays to try).
    net.with("doctor", |s| s.peer_left(&id("interpreter")));
    net.with("clinician", |s| s.peer_left(&id("interpreter")));
    let rotated = net.parts[&id("doctor")].session.send_key_id();
    assert_eq!(
        rotated >> frame::RATCHET_BITS,
        1,
        "a new generation: {rotated:#x}"
    );
    for (sender, reader) in [("doctor", "clinician"), ("clinician", "doctor")] {
        let sealed = net.seal(sender, Codec::Opus, b"after the interpreter left");
        assert!(
            net.opens(reader, sender, Codec::Opus, &sealed),
            "{reader} reads {sender}"
        );
        assert!(
            !net.opens("interpreter", sender, Codec::Opus, &sealed),
            "the leaver's keys do not open {sender}'s new frames"
        );
    }
    assert_eq!(net.code("doctor"), Some(pair_code.clone()));
    assert_eq!(net.code("clinician"), Some(pair_code));
}

/// A relay that swaps a public key: a key that does not match its commitment is refused; a
/// substitute sent with its own commitment is taken, but the two sides' safety codes differ.
#[test]
fn a_swapped_public_key_shows_in_the_safety_code() {
    let mut doctor = Session::new([7; 32]);
    let mut patient = Session::new([8; 32]);
    let mallory = Session::new([9; 32]);
    let (d, p) = (id("doctor"), id("patient"));
    let drain = |s: &mut Session| std::iter::from_fn(|| s.poll_output()).collect::<Vec<_>>();
    doctor.peer_joined(&p);
    patient.peer_present(&d);
    drain(&mut doctor);
    // The patient's real commitment reaches the doctor, then Mallory's key in its place.
    let commit = |s: &Session| E2eeMessage::Commit {
        hash: BASE64.encode(Sha256::digest(BASE64.decode(s.public_key()).unwrap())),
    };
    doctor.handle_message(&p, commit(&patient));
    let forged = E2eeMessage::PublicKey {
        key: mallory.public_key(),
    };
    doctor.handle_message(&p, forged.clone());
    assert_eq!(
        doctor.safety_code(),
        None,
        "a key that breaks its commitment is refused"
    );
    // Mallory commits to its own key first: taken, and the codes tell.
    doctor.handle_message(&p, commit(&mallory));
    doctor.handle_message(&p, forged);
    patient.handle_message(&d, commit(&doctor));
    patient.handle_message(
        &d,
        E2eeMessage::PublicKey {
            key: doctor.public_key(),
        },
    );
    let (seen_by_doctor, seen_by_patient) = (doctor.safety_code(), patient.safety_code());
    assert!(seen_by_doctor.is_some() && seen_by_patient.is_some());
    assert_ne!(seen_by_doctor, seen_by_patient);
}
