//! Regression run of the signaling fuzz entry (`bedside_protocol::fuzz_signaling`, what
//! `fuzz/fuzz_targets/signaling_json.rs` calls) over every line of the wire fixtures and of
//! `tests/corpus/` (hostile shapes: deep nesting, huge numbers, escapes, wrong types), and over
//! deterministic mutations of each. A panic or a failed round trip is a bug in the protocol crate.

use std::path::Path;

fn corpus() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut seeds = Vec::new();
    for dir in ["fixtures", "corpus"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("tests/{dir}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read(&f).unwrap();
            seeds.extend(
                text.split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec),
            );
        }
    }
    assert!(seeds.len() >= 20, "{} seeds", seeds.len());
    seeds
}

#[test]
fn every_seed_decodes_or_fails_cleanly_and_round_trips() {
    for s in corpus() {
        bedside_protocol::fuzz_signaling(&s);
    }
}

#[test]
fn mutations_of_every_seed_decode_or_fail_cleanly() {
    // A linear congruential generator: deterministic, no dependency.
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % n.max(1)
    };
    const TOKENS: [&[u8]; 8] = [
        b"\"",
        b"{",
        b"}",
        b"[",
        b"null",
        b"1e999",
        b"\\u0000",
        b"\"type\":\"join\"",
    ];
    for seed in corpus() {
        for _ in 0..300 {
            let mut m = seed.clone();
            for _ in 0..1 + next(3) {
                let i = next(m.len() + 1);
                match next(4) {
                    0 if i < m.len() => m[i] = next(256) as u8,
                    1 => m.truncate(i),
                    2 => {
                        let t = TOKENS[next(TOKENS.len())];
                        m.splice(i..i, t.iter().copied());
                    }
                    _ if i < m.len() => {
                        m.remove(i);
                    }
                    _ => {}
                }
            }
            bedside_protocol::fuzz_signaling(&m);
        }
    }
}
