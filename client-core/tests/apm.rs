//! Echo cancellation in a simulated room (feature `devices`).
//!
//! The far end (the patient) is a speech-like signal played through the speaker path
//! ([`EchoPath::played`], exactly as the speaker's audio thread does); the "microphone" hears
//! it back through a room (a 60 ms delay, a few attenuated reflections) plus a second voice in
//! the room (the doctor) and a little noise. The processed microphone is then measured:
//! - echo return loss enhancement (ERLE) while only the far end talks, after convergence:
//!   power of the echo entering the microphone over the power leaving the processor, ≥ 20 dB;
//! - the doctor's voice survives: while both talk (double talk), the part of the output that
//!   follows the doctor's voice keeps most of its level (a least-squares gain of the doctor's
//!   signal in the output above -10 dB); talking alone after the far end stops, its power
//!   changes by less than 10 dB.
#![cfg(feature = "devices")]

use bedside_client_core::media::apm::{ApmConfig, AudioProcessor, EchoPath};
use bedside_client_core::media::{AudioFrame, FRAME_SAMPLES, SAMPLE_RATE};

const RATE: usize = SAMPLE_RATE as usize;

/// Deterministic noise in [-1, 1] (xorshift).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// A speech-like voice: a pitch with harmonics, shaped by a one-pole low-pass of noise
/// (breath), amplitude-modulated at a syllable rate so it is not stationary (noise
/// suppression must not take it for noise).
fn voice(len: usize, pitch_hz: f32, syllable_hz: f32, seed: u64) -> Vec<f32> {
    let mut noise = Noise(seed);
    let mut lp = 0f32;
    (0..len)
        .map(|n| {
            let t = n as f32 / RATE as f32;
            // Pitch wanders by ±10 % like intonation.
            let f0 = pitch_hz * (1.0 + 0.1 * (2.0 * std::f32::consts::PI * 0.7 * t).sin());
            let phase = 2.0 * std::f32::consts::PI * f0 * t;
            let harmonics: f32 = (1..=8).map(|k| (phase * k as f32).sin() / k as f32).sum();
            lp = 0.9 * lp + 0.1 * noise.next();
            let envelope = (0.5 + 0.5 * (2.0 * std::f32::consts::PI * syllable_hz * t).sin())
                .powf(1.5)
                .max(0.05);
            0.25 * envelope * (harmonics * 0.6 + lp * 2.0)
        })
        .collect()
}

fn power(x: &[f32]) -> f64 {
    x.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / x.len().max(1) as f64
}

fn db(ratio: f64) -> f64 {
    10.0 * ratio.log10()
}

fn to_frame(x: &[f32]) -> AudioFrame {
    let samples: Vec<i16> = x
        .iter()
        .map(|&s| (s.clamp(-1.0, 1.0) * 32767.0) as i16)
        .collect();
    AudioFrame::from_slice(&samples, 0).expect("a 20 ms frame")
}

fn from_frame(f: &AudioFrame) -> Vec<f32> {
    f.samples.iter().map(|&s| f32::from(s) / 32768.0).collect()
}

struct Room {
    far: Vec<f32>,
    /// The echo alone as the microphone hears it.
    echo: Vec<f32>,
    /// The doctor's voice alone as the microphone hears it.
    near: Vec<f32>,
    /// Everything the microphone hears.
    mic: Vec<f32>,
}

/// Seconds 0..8: the far end talks alone; 8..12: both talk; 12..15: the doctor alone.
fn room() -> Room {
    let len = 15 * RATE;
    let far_end = 12 * RATE;
    let mut far = voice(len, 140.0, 3.1, 1);
    far[far_end..].fill(0.0);
    let mut near = voice(len, 210.0, 2.3, 2);
    near[..8 * RATE].fill(0.0);
    // The room: 60 ms to the microphone, attenuated by 6 dB, with three weaker reflections.
    let taps = [(2880usize, 0.5f32), (3100, 0.2), (3500, -0.1), (4300, 0.05)];
    let mut echo = vec![0f32; len];
    for (n, e) in echo.iter_mut().enumerate() {
        for &(d, g) in &taps {
            if n >= d {
                *e += g * far[n - d];
            }
        }
    }
    let mut noise = Noise(3);
    let mic = (0..len)
        .map(|n| echo[n] + near[n] + 0.001 * noise.next())
        .collect();
    Room {
        far,
        echo,
        near,
        mic,
    }
}

/// Runs the room through a processor, 20 ms at a time: the speaker plays a frame, the
/// microphone captures one.
fn run(config: ApmConfig) -> Vec<f32> {
    let room = room();
    let path = EchoPath::new();
    let mut apm = AudioProcessor::new(config, &path);
    let mut out = Vec::with_capacity(room.mic.len());
    for (far, mic) in room
        .far
        .chunks_exact(FRAME_SAMPLES)
        .zip(room.mic.chunks_exact(FRAME_SAMPLES))
    {
        path.played(&to_frame(far));
        let mut frame = to_frame(mic);
        apm.process(&mut frame).expect("processing");
        out.extend(from_frame(&frame));
    }
    let stats = apm.stats();
    eprintln!("AEC3's own figures: {stats:?}");
    out
}

#[test]
fn the_echo_is_cancelled_and_the_doctor_still_heard() {
    let room = room();
    let out = run(ApmConfig::default());
    // After convergence: seconds 4..8, far end alone.
    let (a, b) = (4 * RATE, 8 * RATE);
    let erle = db(power(&room.echo[a..b]) / power(&out[a..b]));
    // Double talk, from half a second in: the doctor's voice in the output, by least squares.
    let (c, d) = (8 * RATE + RATE / 2, 12 * RATE - 1200);
    // The module delays its output by a few samples (its band-splitting filters): take the
    // best lag within 5 ms.
    // The module's output lags its input (about 15 ms here): find the lag on the first half
    // second, then take the doctor's gain at that lag over the whole stretch.
    let gain_at = |lag: usize, to: usize| {
        let dot: f64 = (c..to)
            .map(|n| f64::from(out[n + lag]) * f64::from(room.near[n]))
            .sum();
        dot / (power(&room.near[c..to]) * (to - c) as f64)
    };
    let lag = (0..1200)
        .step_by(4)
        .max_by(|&x, &y| gain_at(x, c + RATE / 2).total_cmp(&gain_at(y, c + RATE / 2)))
        .unwrap_or(0);
    let gain = gain_at(lag, d);
    let double_talk_db = 20.0 * gain.max(1e-6).log10();
    // The doctor alone, from half a second after the far end stopped (the canceller's
    // suppressor holds briefly after the last echo).
    let (e, f) = (12 * RATE + RATE / 2, 15 * RATE);
    let near_loss = db(power(&room.near[e..f]) / power(&out[e..f]));
    eprintln!(
        "ERLE after convergence: {erle:.1} dB; the doctor's voice during double talk: \
         {double_talk_db:.1} dB (output lag {lag} samples); alone afterwards: changed by {near_loss:.1} dB"
    );
    assert!(erle >= 20.0, "ERLE {erle:.1} dB, want at least 20 dB");
    assert!(
        double_talk_db > -10.0,
        "during double talk the doctor's voice came through at {double_talk_db:.1} dB"
    );
    assert!(
        near_loss.abs() < 10.0,
        "the doctor's voice changed by {near_loss:.1} dB, want less than 10 dB"
    );
}

#[test]
fn without_cancellation_the_echo_goes_through() {
    // The same room with the canceller off: the measurement above is not trivially met.
    let room = room();
    let out = run(ApmConfig {
        echo_cancellation: false,
        noise_suppression: false,
        automatic_gain: false,
    });
    let (a, b) = (4 * RATE, 8 * RATE);
    let erle = db(power(&room.echo[a..b]) / power(&out[a..b]));
    eprintln!("ERLE with the canceller off: {erle:.1} dB");
    assert!(erle < 3.0, "ERLE {erle:.1} dB with nothing cancelling");
}

#[test]
fn a_processor_with_no_speaker_passes_the_voice() {
    // No echo reference at all (no speaker open): the doctor is still heard.
    let path = EchoPath::new();
    let mut apm = AudioProcessor::new(ApmConfig::default(), &path);
    let near = voice(4 * RATE, 210.0, 2.3, 2);
    let mut out = Vec::new();
    for chunk in near.chunks_exact(FRAME_SAMPLES) {
        let mut f = to_frame(chunk);
        apm.process(&mut f).expect("processing");
        out.extend(from_frame(&f));
    }
    let loss = db(power(&near[RATE..]) / power(&out[RATE..]));
    eprintln!("voice with no echo reference changed by {loss:.1} dB");
    assert!(loss < 10.0, "lost {loss:.1} dB");
}
