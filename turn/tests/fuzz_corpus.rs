//! Quick regression run of the fuzz entry points (the same functions `fuzz/` calls) over the
//! checked-in seed corpus in `tests/corpus/`, plus deterministic mutations of every seed and
//! random buffers. A panic here is a bug in the parser or the core.

use std::path::Path;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(v.len() >= 10, "corpus has {} seeds", v.len());
    v.sort();
    v
}

fn all(data: &[u8]) {
    bedside_turn::fuzz_parse_stun(data);
    bedside_turn::fuzz_channel_data(data);
    bedside_turn::fuzz_core(data);
}

#[test]
fn seeds_parse() {
    let mut stun = 0;
    for s in seeds() {
        all(&s);
        if bedside_turn::stun::Message::parse(&s).is_ok() {
            stun += 1;
        } else {
            assert!(
                bedside_turn::stun::ChannelData::parse(&s).is_some(),
                "seed is neither STUN nor ChannelData"
            );
        }
    }
    assert!(stun >= 8);
}

#[test]
fn mutated_seeds_do_not_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for s in seeds() {
        for _ in 0..500 {
            let mut m = s.clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(5) {
                    0 if !m.is_empty() => {
                        let i = rng.below(m.len());
                        m[i] ^= 1 << rng.below(8);
                    }
                    1 if !m.is_empty() => {
                        let i = rng.below(m.len());
                        m[i] = rng.next() as u8;
                    }
                    2 => m.truncate(rng.below(m.len() + 1)),
                    3 => {
                        let i = rng.below(m.len() + 1);
                        m.insert(i, rng.next() as u8);
                    }
                    _ if m.len() >= 4 => {
                        // Break the length fields, a favourite of parsers' bugs.
                        let i = rng.below(m.len() - 1);
                        m[i] = 0xFF;
                        m[i + 1] = rng.next() as u8;
                    }
                    _ => {}
                }
            }
            all(&m);
        }
    }
}

#[test]
fn random_buffers_do_not_panic() {
    let mut rng = Rng(42);
    for _ in 0..4000 {
        let len = rng.below(300);
        let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of them get a valid STUN or ChannelData prefix so they go deeper.
        if len >= 20 && rng.below(2) == 0 {
            m[0] &= 0x3F;
            m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
            let body = ((len - 20) & !3) as u16;
            m[2..4].copy_from_slice(&body.to_be_bytes());
        } else if len >= 4 && rng.below(2) == 0 {
            m[0] = 0x40 | (m[0] & 0x3F);
        }
        all(&m);
    }
}
