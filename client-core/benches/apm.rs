//! Cost of the microphone path's audio processing (run in release):
//! `cargo bench -p bedside-client-core --bench apm --features devices`.
//!
//! Prints the time per 10 ms frame (one render frame plus one capture frame, 48 kHz mono) with
//! everything on (AEC3, NS, AGC2) and with echo cancellation alone, on a speech-like far end
//! heard back through a delayed, attenuated echo.

use std::time::Instant;

use bedside_client_core::media::apm::{ApmConfig, AudioProcessor, EchoPath};
use bedside_client_core::media::{AudioFrame, FRAME_SAMPLES};

fn signal(len: usize) -> Vec<i16> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0;
            let t = n as f32 / 48_000.0;
            let env = 0.5 + 0.5 * (2.0 * std::f32::consts::PI * 3.0 * t).sin();
            let s = env * (0.3 * (2.0 * std::f32::consts::PI * 150.0 * t).sin() + 0.1 * noise);
            (s * 32767.0) as i16
        })
        .collect()
}

fn bench(name: &str, config: ApmConfig) {
    let seconds = 20;
    let far = signal(seconds * 48_000);
    let delay = 2880;
    let path = EchoPath::new();
    let mut apm = AudioProcessor::new(config, &path);
    let frames: Vec<(AudioFrame, AudioFrame)> = far
        .chunks_exact(FRAME_SAMPLES)
        .enumerate()
        .map(|(i, chunk)| {
            let mic: Vec<i16> = (0..FRAME_SAMPLES)
                .map(|k| {
                    let n = i * FRAME_SAMPLES + k;
                    if n >= delay { far[n - delay] / 2 } else { 0 }
                })
                .collect();
            (
                AudioFrame::from_slice(chunk, 0).expect("frame"),
                AudioFrame::from_slice(&mic, 0).expect("frame"),
            )
        })
        .collect();
    let t = Instant::now();
    let n = frames.len();
    for (played, mut mic) in frames {
        path.played(&played);
        apm.process(&mut mic).expect("processing");
    }
    let elapsed = t.elapsed();
    // Each 20 ms frame is two 10 ms steps.
    let per_10ms_us = elapsed.as_secs_f64() * 1e6 / (2 * n) as f64;
    println!(
        "apm {name}: {per_10ms_us:.1} µs per 10 ms frame (render + capture), {:.2} % of one core",
        per_10ms_us / 10_000.0 * 100.0
    );
}

fn main() {
    bench("AEC3+NS+AGC2", ApmConfig::default());
    bench(
        "AEC3 alone",
        ApmConfig {
            echo_cancellation: true,
            noise_suppression: false,
            automatic_gain: false,
        },
    );
}
