//! Opus round trips with the tone source: who is speaking, timing markers, FEC versus PLC, DTX.

use bedside_client_core::media::{
    AudioDecoder, AudioFrame, AudioMarkerReader, DOCTOR_TONE_HZ, FRAME_SAMPLES, FRAME_US,
    OpusConfig, OpusDecoder, OpusEncoder, PATIENT_TONE_HZ, ToneConfig, ToneSource, detect_tone,
    is_dtx_packet,
};

fn encode_tone(config: ToneConfig, frames: usize) -> Vec<Vec<u8>> {
    let mut src = ToneSource::new(config);
    let mut enc = OpusEncoder::new(OpusConfig::default()).unwrap();
    (0..frames)
        .map(|i| enc.encode(&src.next_frame(i as u64 * FRAME_US)).unwrap())
        .collect()
}

fn decode_all(packets: &[Vec<u8>]) -> Vec<i16> {
    let mut dec = OpusDecoder::new().unwrap();
    let mut pcm = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        pcm.extend_from_slice(&dec.decode_frame(p, i as u64 * FRAME_US).unwrap().samples[..]);
    }
    pcm
}

#[test]
fn participant_tone_survives_opus_32k() {
    let cands = [DOCTOR_TONE_HZ, PATIENT_TONE_HZ];
    for freq in cands {
        let packets = encode_tone(
            ToneConfig {
                freq_hz: freq,
                ..Default::default()
            },
            100,
        );
        let bytes: usize = packets.iter().map(Vec::len).sum();
        let kbps = bytes as f64 * 8.0 / 2.0 / 1000.0;
        assert!((20.0..45.0).contains(&kbps), "{kbps} kbps");
        let pcm = decode_all(&packets);
        let (mut right, mut wrong, mut none) = (0, 0, 0);
        // Frames 10..24 of each 25-frame (500 ms) period are clear of the 140 ms marker.
        for (i, frame) in pcm.chunks(FRAME_SAMPLES).enumerate().skip(5) {
            if !(10..24).contains(&(i % 25)) {
                continue;
            }
            match detect_tone(frame, &cands) {
                Some(f) if f == freq => right += 1,
                Some(_) => wrong += 1,
                None => none += 1,
            }
        }
        eprintln!("{freq} Hz at {kbps:.1} kbps: right {right} wrong {wrong} none {none}");
        assert_eq!(wrong, 0);
        assert!(right >= 50 && none <= 2, "right {right} none {none}");
    }
}

#[test]
fn audio_markers_survive_opus_with_constant_delay() {
    let packets = encode_tone(ToneConfig::default(), 200); // 4 s, markers every 500 ms
    let pcm = decode_all(&packets);
    let mut reader = AudioMarkerReader::new();
    let mut markers = Vec::new();
    for chunk in pcm.chunks(FRAME_SAMPLES) {
        markers.extend(reader.push(chunk));
    }
    let idx: Vec<u16> = markers.iter().map(|m| m.frame_index).collect();
    eprintln!("markers: {markers:?}");
    // The very first marker may be lost to the encoder's start-up; all others must be read.
    let expected: Vec<u16> = (1..8).map(|k| k * 25).collect();
    assert!(idx.ends_with(&expected), "{idx:?}");
    let delays: Vec<i64> = markers
        .iter()
        .filter(|m| m.frame_index > 0)
        .map(|m| m.sample_offset as i64 - i64::from(m.frame_index) * FRAME_SAMPLES as i64)
        .collect();
    // Codec delay: a few ms, the same for every marker to within 2 ms.
    for &d in &delays {
        assert!((0..=30 * 48).contains(&d), "delay {d} samples");
        assert!((d - delays[0]).abs() <= 96, "{delays:?}");
    }
    eprintln!(
        "codec delay measured by markers: {:.2} ms",
        delays[0] as f64 / 48.0
    );
}

/// A speech-like test signal that PLC cannot simply extrapolate: the pitch changes every
/// 10 ms and the amplitude follows a 4 Hz syllable envelope.
fn hopping_signal(frames: usize) -> Vec<AudioFrame> {
    let freqs = [220.0, 330.0, 277.0, 415.0, 185.0, 370.0, 247.0];
    let mut phase = 0.0f64;
    (0..frames)
        .map(|f| {
            let mut s = [0i16; FRAME_SAMPLES];
            for (i, v) in s.iter_mut().enumerate() {
                let n = f * FRAME_SAMPLES + i;
                let freq = freqs[(n / 480) % freqs.len()];
                phase += std::f64::consts::TAU * freq / 48_000.0;
                let env = 0.55 + 0.45 * (std::f64::consts::TAU * 4.0 * n as f64 / 48_000.0).sin();
                *v = (9000.0 * env * (phase.sin() + 0.4 * (2.0 * phase).sin())) as i16;
            }
            AudioFrame::from_slice(&s, (f as u64) * FRAME_US).unwrap()
        })
        .collect()
}

#[test]
fn fec_recovers_better_than_plc() {
    let mut enc = OpusEncoder::new(OpusConfig {
        packet_loss_pct: 20,
        ..Default::default()
    })
    .unwrap();
    let packets: Vec<Vec<u8>> = hopping_signal(200)
        .iter()
        .map(|f| enc.encode(f).unwrap())
        .collect();
    let lost: Vec<usize> = (20..195).step_by(10).collect();
    let reference = decode_all(&packets);

    let run = |use_fec: bool| -> Vec<i16> {
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = Vec::new();
        for i in 0..packets.len() {
            let mut f = [0i16; FRAME_SAMPLES];
            if lost.contains(&i) {
                if use_fec {
                    dec.decode_fec(&packets[i + 1], &mut f).unwrap();
                } else {
                    dec.conceal(&mut f).unwrap();
                }
            } else {
                dec.decode(&packets[i], &mut f).unwrap();
            }
            out.extend_from_slice(&f);
        }
        out
    };
    let with_fec = run(true);
    let with_plc = run(false);
    let err = |x: &[i16]| -> f64 {
        lost.iter()
            .flat_map(|&i| i * FRAME_SAMPLES..(i + 1) * FRAME_SAMPLES)
            .map(|n| (f64::from(x[n]) - f64::from(reference[n])).powi(2))
            .sum()
    };
    let signal: f64 = lost
        .iter()
        .flat_map(|&i| i * FRAME_SAMPLES..(i + 1) * FRAME_SAMPLES)
        .map(|n| f64::from(reference[n]).powi(2))
        .sum();
    let (e_fec, e_plc) = (err(&with_fec), err(&with_plc));
    let snr = |e: f64| 10.0 * (signal / e).log10();
    eprintln!(
        "lost-frame SNR: FEC {:.1} dB, PLC {:.1} dB",
        snr(e_fec),
        snr(e_plc)
    );
    assert!(e_fec * 2.0 < e_plc, "FEC {e_fec:.3e} PLC {e_plc:.3e}");
}

#[test]
fn dtx_sends_tiny_packets_on_silence() {
    let mut enc = OpusEncoder::new(OpusConfig::default()).unwrap();
    let mut sizes = Vec::new();
    for i in 0..100u64 {
        sizes.push(
            enc.encode(&AudioFrame::silence(i * FRAME_US))
                .unwrap()
                .len(),
        );
    }
    let tiny = sizes[20..].iter().filter(|&&n| n <= 2).count();
    eprintln!("silence packet sizes: {:?}", &sizes[..30]);
    assert!(tiny >= 70, "only {tiny} of 80 DTX packets: {sizes:?}");
    let big: usize = sizes[20..].iter().sum();
    assert!(big < 80 * 10, "{big} bytes for 1.6 s of silence");
    // A tone ends DTX at once.
    let mut src = ToneSource::new(ToneConfig::default());
    let p = enc.encode(&src.next_frame(0)).unwrap();
    let p2 = enc.encode(&src.next_frame(FRAME_US)).unwrap();
    assert!(!is_dtx_packet(&p) || !is_dtx_packet(&p2));
}

#[test]
fn corrupt_or_wrong_length_packets_are_errors() {
    let mut dec = OpusDecoder::new().unwrap();
    let mut out = [0i16; FRAME_SAMPLES];
    assert!(dec.decode(&[], &mut out).is_err());
    // TOC for a 60 ms SILK frame (config 3): too long for a 20 ms frame buffer.
    assert!(dec.decode(&[0x18, 0xAA, 0xBB], &mut out).is_err());
    let mut x: u32 = 7;
    for len in 1..300usize {
        let p: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let _ = dec.decode(&p, &mut out);
        let _ = dec.decode_fec(&p, &mut out);
    }
    // Still usable.
    let packets = encode_tone(ToneConfig::default(), 3);
    let mut fresh = OpusDecoder::new().unwrap();
    assert!(fresh.decode(&packets[0], &mut out).is_ok());
}
