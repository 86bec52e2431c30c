//! The audio playout buffer in virtual time: in order, reordered, lost (FEC then PLC), jitter
//! spikes growing the target delay and shrinking back, and an end-to-end run with real Opus
//! measuring mouth-to-ear latency with the tone source's markers.

use bedside_client_core::media::{
    AudioDecoder, AudioMarkerReader, AudioPlayoutBuffer, DOCTOR_TONE_HZ, FRAME_SAMPLES, FRAME_US,
    OpusConfig, OpusEncoder, PATIENT_TONE_HZ, PlayoutConfig, PlayoutKind, Result, ToneConfig,
    ToneSource, detect_tone,
};

/// A decoder whose output says what it did: every sample of a decoded frame holds the packet's
/// sequence number; FEC yields the sequence number before the packet's; concealment yields -1.
struct Fake;

fn seq_of(p: &[u8]) -> i16 {
    i16::from_be_bytes([p[0], p[1]])
}

impl AudioDecoder for Fake {
    fn decode(&mut self, packet: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        out.fill(seq_of(packet));
        Ok(())
    }
    fn decode_fec(&mut self, next: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        out.fill(seq_of(next) - 1);
        Ok(())
    }
    fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        out.fill(-1);
        Ok(())
    }
}

/// A packet: sequence number and arrival time (sent at `seq * 20 ms`).
type Arrival = (u16, u64);

/// What one pull produced.
#[derive(Debug, Clone, Copy)]
struct Pulled {
    now: u64,
    kind: PlayoutKind,
    seq: Option<u16>,
    value: i16,
    target_ms: u32,
    buffered_ms: u32,
}

/// Runs arrivals and pulls (every 20 ms from `first_pull`) in time order until `end`.
fn simulate<D: AudioDecoder>(
    buf: &mut AudioPlayoutBuffer<D>,
    mut arrivals: Vec<Arrival>,
    payload: impl Fn(u16) -> Vec<u8>,
    first_pull: u64,
    end: u64,
) -> Vec<Pulled> {
    arrivals.sort_by_key(|a| a.1);
    let mut out = Vec::new();
    let mut next = arrivals.into_iter().peekable();
    let mut now = first_pull;
    while now < end {
        while let Some(&(seq, at)) = next.peek() {
            if at > now {
                break;
            }
            buf.push(seq, u32::from(seq).wrapping_mul(960), payload(seq), at);
            next.next();
        }
        let p = buf.pull(now);
        let st = buf.stats();
        out.push(Pulled {
            now,
            kind: p.kind,
            seq: p.seq,
            value: p.frame.samples[0],
            target_ms: st.target_delay_ms,
            buffered_ms: st.buffered_ms,
        });
        now += FRAME_US;
    }
    out
}

fn fake_payload(seq: u16) -> Vec<u8> {
    (seq as i16).to_be_bytes().to_vec()
}

fn steady(n: u16, delay_us: u64) -> Vec<Arrival> {
    (0..n)
        .map(|s| (s, u64::from(s) * FRAME_US + delay_us))
        .collect()
}

/// Sequence numbers played (Normal or FEC), in order.
fn played(p: &[Pulled]) -> Vec<i16> {
    p.iter()
        .filter(|x| matches!(x.kind, PlayoutKind::Normal | PlayoutKind::Fec))
        .map(|x| x.value)
        .collect()
}

#[test]
fn in_order() {
    let mut buf = AudioPlayoutBuffer::with_decoder(Fake, PlayoutConfig::default());
    let out = simulate(
        &mut buf,
        steady(100, 30_000),
        fake_payload,
        7_000,
        2_200_000,
    );
    assert_eq!(played(&out), (0..100).collect::<Vec<i16>>());
    let st = buf.stats();
    assert_eq!((st.played, st.fec_recovered, st.late_dropped), (100, 0, 0));
    assert_eq!(st.target_delay_ms, 20);
    // Between start and end nothing was concealed.
    let first = out
        .iter()
        .position(|p| p.kind == PlayoutKind::Normal)
        .unwrap();
    let last = out
        .iter()
        .rposition(|p| p.kind == PlayoutKind::Normal)
        .unwrap();
    assert!(
        out[first..=last]
            .iter()
            .all(|p| p.kind == PlayoutKind::Normal)
    );
    // Playout starts within one target delay plus one pull of the first arrival.
    assert!(
        out[first].now <= 30_000 + 20_000 + 20_000,
        "{}",
        out[first].now
    );
}

#[test]
fn reordered_packets_play_in_order() {
    let mut arr = steady(200, 30_000);
    // Every 7th packet arrives 25 ms late, after its successor.
    for a in arr.iter_mut().filter(|a| a.0 % 7 == 3) {
        a.1 += 25_000;
    }
    let mut buf = AudioPlayoutBuffer::with_decoder(Fake, PlayoutConfig::default());
    let out = simulate(&mut buf, arr, fake_payload, 7_000, 4_300_000);
    let st = buf.stats();
    eprintln!("{st:?}");
    assert_eq!(played(&out), (0..200).collect::<Vec<i16>>());
    assert_eq!(st.late_dropped, 0);
    assert_eq!(st.fec_recovered, 0);
    assert!(st.target_delay_ms >= 40);
}

#[test]
fn lost_packets_use_fec_then_plc() {
    let lost = [30u16, 50, 51, 80, 81, 82];
    let arr: Vec<Arrival> = steady(150, 30_000)
        .into_iter()
        .filter(|a| !lost.contains(&a.0))
        .collect();
    let mut buf = AudioPlayoutBuffer::with_decoder(
        Fake,
        PlayoutConfig {
            min_delay_ms: 40,
            ..Default::default()
        },
    );
    let out = simulate(&mut buf, arr, fake_payload, 7_000, 3_300_000);
    let st = buf.stats();
    eprintln!("{st:?}");
    // Every sequence number ends up played, recovered by FEC (the last of each lost run) or
    // concealed (the others); an underrun may first conceal a frame without advancing.
    let mut outcome = std::collections::BTreeMap::new();
    for p in &out {
        if let Some(seq) = p.seq {
            outcome.insert(seq, (p.kind, p.value));
        }
    }
    for s in 0..150u16 {
        let (kind, value) = outcome[&s];
        match s {
            30 | 51 | 82 => assert_eq!((kind, value), (PlayoutKind::Fec, s as i16), "{s}"),
            50 | 80 | 81 => assert_eq!(kind, PlayoutKind::Concealed, "{s}"),
            _ => assert_eq!((kind, value), (PlayoutKind::Normal, s as i16), "{s}"),
        }
    }
    assert_eq!(
        played(&out),
        (0..150)
            .filter(|s| ![50, 80, 81].contains(s))
            .collect::<Vec<i16>>()
    );
    assert_eq!(st.fec_recovered, 3);
    assert!(st.concealed >= 3);
    assert_eq!(st.late_dropped, 0);
    assert_eq!(st.played, 144);
}

/// With RED each packet also carries the one before it: two lost in a row are both recovered
/// (the first through the FEC inside the second's copy, the second from its copy), three in a
/// row lose only the first. The copies neither count as late nor move the target delay.
#[test]
fn redundant_copies_recover_runs_of_lost_packets() {
    let lost = [30u16, 50, 51, 80, 81, 82];
    let mut buf = AudioPlayoutBuffer::with_decoder(
        Fake,
        PlayoutConfig {
            min_delay_ms: 40,
            ..Default::default()
        },
    );
    let mut outcome = std::collections::BTreeMap::new();
    let mut arrivals = steady(150, 30_000)
        .into_iter()
        .filter(|a| !lost.contains(&a.0))
        .peekable();
    let mut now = 7_000;
    while now < 3_300_000 {
        while let Some(&(seq, at)) = arrivals.peek() {
            if at > now {
                break;
            }
            buf.push(seq, u32::from(seq) * 960, fake_payload(seq), at);
            if seq > 0 {
                buf.push_redundant(seq - 1, fake_payload(seq - 1));
            }
            arrivals.next();
        }
        let p = buf.pull(now);
        if let Some(seq) = p.seq {
            outcome.insert(seq, (p.kind, p.frame.samples[0]));
        }
        now += FRAME_US;
    }
    for s in 0..150u16 {
        let (kind, value) = outcome[&s];
        match s {
            30 | 51 | 82 => assert_eq!((kind, value), (PlayoutKind::Redundant, s as i16), "{s}"),
            50 | 81 => assert_eq!((kind, value), (PlayoutKind::Fec, s as i16), "{s}"),
            80 => assert_eq!(kind, PlayoutKind::Concealed, "{s}"),
            _ => assert_eq!((kind, value), (PlayoutKind::Normal, s as i16), "{s}"),
        }
    }
    let st = buf.stats();
    assert_eq!((st.played, st.red_recovered, st.fec_recovered), (144, 3, 2));
    assert_eq!((st.late_dropped, st.duplicates), (0, 0));
    assert_eq!(st.target_delay_ms, 40);
}

#[test]
fn jitter_spike_grows_target_then_shrinks_back() {
    let mut arr = steady(500, 30_000);
    // A 150 ms stall at packet 100 (t = 2 s): 100..=107 arrive together after it.
    let stall_end = 100 * FRAME_US + 30_000 + 150_000;
    for a in arr.iter_mut().filter(|a| (100..108).contains(&a.0)) {
        a.1 = a.1.max(stall_end);
    }
    let mut buf = AudioPlayoutBuffer::with_decoder(Fake, PlayoutConfig::default());
    let out = simulate(&mut buf, arr, fake_payload, 7_000, 10_050_000);
    let st = buf.stats();
    eprintln!("{st:?}");
    let at = |t: u64| out.iter().find(|p| p.now >= t).copied().unwrap();
    let before = at(1_900_000);
    let after = at(3_000_000);
    let end = at(9_900_000);
    eprintln!("before {before:?}\nafter {after:?}\nend {end:?}");
    assert_eq!(before.target_ms, 20);
    assert!(
        after.target_ms >= 160,
        "target after spike {}",
        after.target_ms
    );
    assert!(
        after.buffered_ms >= 100,
        "buffered after spike {}",
        after.buffered_ms
    );
    assert_eq!(
        end.target_ms, 20,
        "target shrinks back once the spike leaves the window"
    );
    assert!(
        end.buffered_ms <= 60,
        "buffer drained back: {}",
        end.buffered_ms
    );
    assert!(st.accelerated >= 3);
    assert_eq!(st.late_dropped, 0, "the delayed packets still played");
    let p = played(&out);
    assert!(p.windows(2).all(|w| w[1] > w[0]), "monotonic");
    for s in 100..108 {
        assert!(p.contains(&s), "{s} played");
    }
}

/// A tiny deterministic PRNG for jitter.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

#[test]
fn random_jitter_sets_target_and_few_late() {
    let mut rng = Lcg(42);
    let arr: Vec<Arrival> = (0..500u16)
        .map(|s| (s, u64::from(s) * FRAME_US + 30_000 + rng.next() % 60_000))
        .collect();
    let mut buf = AudioPlayoutBuffer::with_decoder(Fake, PlayoutConfig::default());
    let _ = simulate(&mut buf, arr, fake_payload, 7_000, 10_200_000);
    let st = buf.stats();
    eprintln!("{st:?}");
    assert!(
        (60..=100).contains(&st.target_delay_ms),
        "{}",
        st.target_delay_ms
    );
    assert!(st.late_dropped <= 10, "late {}", st.late_dropped);
    assert!(st.played + st.fec_recovered >= 480);
}

#[test]
fn opus_end_to_end_mouth_to_ear_latency() {
    // Doctor's tone, Opus 32 kbps, 40 ms network delay + 0..30 ms jitter + 5% loss.
    let mut src = ToneSource::new(ToneConfig::default());
    let mut enc = OpusEncoder::new(OpusConfig::default()).unwrap();
    let mut rng = Lcg(7);
    let mut packets = Vec::new();
    let mut arrivals = Vec::new();
    for i in 0..300u16 {
        let capture = u64::from(i) * FRAME_US;
        let p = enc.encode(&src.next_frame(capture)).unwrap();
        packets.push(p);
        if rng.next() % 100 >= 5 {
            arrivals.push((i, capture + FRAME_US + 40_000 + rng.next() % 30_000));
        }
    }
    let mut buf = AudioPlayoutBuffer::new(PlayoutConfig::default()).unwrap();
    let first_pull = 3_000;
    let pkts = packets.clone();
    let out_pulls = {
        let mut arrivals = arrivals.clone();
        arrivals.sort_by_key(|a| a.1);
        let mut out = Vec::new();
        let mut it = arrivals.into_iter().peekable();
        let mut now = first_pull;
        while now < 6_400_000 {
            while let Some(&(seq, at)) = it.peek() {
                if at > now {
                    break;
                }
                buf.push(seq, u32::from(seq) * 960, pkts[seq as usize].clone(), at);
                it.next();
            }
            out.push(buf.pull(now));
            now += FRAME_US;
        }
        out
    };
    let st = buf.stats();
    eprintln!("{st:?}");
    let pcm: Vec<i16> = out_pulls
        .iter()
        .flat_map(|p| p.frame.samples.iter().copied())
        .collect();
    // Who: the doctor, in most frames clear of markers.
    let doctor = pcm
        .chunks(FRAME_SAMPLES)
        .filter(|f| detect_tone(f, &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ]) == Some(DOCTOR_TONE_HZ))
        .count();
    let patient = pcm
        .chunks(FRAME_SAMPLES)
        .filter(|f| detect_tone(f, &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ]) == Some(PATIENT_TONE_HZ))
        .count();
    assert!(
        doctor > 150 && patient == 0,
        "doctor {doctor} patient {patient}"
    );
    // When: mouth-to-ear latency per marker. Output sample k plays at first_pull + k / 48 ms.
    let markers = AudioMarkerReader::new().push(&pcm);
    let latencies: Vec<f64> = markers
        .iter()
        .map(|m| {
            let played_us = first_pull as f64 + m.sample_offset as f64 * 1e6 / 48_000.0;
            let captured_us = f64::from(m.frame_index) * FRAME_US as f64;
            (played_us - captured_us) / 1000.0
        })
        .collect();
    eprintln!("markers {} latencies ms {latencies:.1?}", markers.len());
    assert!(
        markers.len() >= 9,
        "most of 12 markers read despite 5% loss"
    );
    for l in &latencies {
        // Packetisation 20 + network 40..70 + buffer 20..200 + codec ~6.5 ms.
        assert!((60.0..=300.0).contains(l), "latency {l} ms");
    }
    assert!(st.fec_recovered + st.concealed > 0);
}
