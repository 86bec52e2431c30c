//! Media layer figures (run in release): `cargo bench -p bedside-client-core --bench media`.
//!
//! Prints the pattern's render time, 720p H.264 encode and decode frame rates, bitrate and luma
//! PSNR for each encoder effort (the real-time setting beside openh264's defaults, in one run),
//! and Opus encode/decode time per 20 ms frame.

use std::time::Instant;

use bedside_client_core::media::{
    AudioFrame, EncoderEffort, FRAME_US, H264Config, H264Decoder, H264Encoder, OpusConfig,
    OpusDecoder, OpusEncoder, PatternConfig, TestPatternSource, ToneConfig, ToneSource, VideoFrame,
    read_marker,
};

/// Luma PSNR of `decoded` against `source`, dB.
fn psnr_y(source: &VideoFrame, decoded: &VideoFrame) -> f64 {
    let sse: u64 = source
        .y()
        .iter()
        .zip(decoded.y())
        .map(|(a, b)| u64::from(a.abs_diff(*b)).pow(2))
        .sum();
    let mse = sse as f64 / source.y().len() as f64;
    if mse == 0.0 {
        99.0
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

fn main() {
    // Pre-render the pattern so its cost is not counted as encoding.
    let mut src = TestPatternSource::new(PatternConfig::default()).expect("pattern");
    let n = 300u64;
    let t = Instant::now();
    let frames: Vec<_> = (0..n).map(|i| src.next_frame(i * 33_333)).collect();
    let render = t.elapsed();
    println!(
        "pattern render 1280x720: {:.2} ms/frame",
        render.as_secs_f64() * 1000.0 / n as f64
    );

    for (bitrate, effort) in [1_500_000u32, 800_000]
        .into_iter()
        .flat_map(|b| [(b, EncoderEffort::Realtime), (b, EncoderEffort::Balanced)])
    {
        let mut enc = H264Encoder::new(H264Config {
            bitrate_bps: bitrate,
            effort,
            ..Default::default()
        })
        .expect("encoder");
        let t = Instant::now();
        let mut aus = Vec::new();
        for f in &frames {
            if let Some(au) = enc.encode(f).expect("encode") {
                aus.push(au);
            }
        }
        let enc_s = t.elapsed().as_secs_f64();
        let bytes: usize = aus.iter().map(|a| a.data.len()).sum();
        let mut dec = H264Decoder::new().expect("decoder");
        let t = Instant::now();
        let mut decoded = Vec::new();
        for au in &aus {
            if let Some(f) = dec.decode(&au.data, au.capture_us).expect("decode") {
                decoded.push(f);
            }
        }
        let dec_s = t.elapsed().as_secs_f64();
        let markers = decoded.iter().filter(|f| read_marker(f).is_some()).count();
        // Each decoded picture against the source frame of its capture time.
        let psnr: Vec<f64> = decoded
            .iter()
            .filter_map(|d| {
                let source = frames.get((d.capture_us / 33_333) as usize)?;
                (source.capture_us == d.capture_us).then(|| psnr_y(source, d))
            })
            .collect();
        println!(
            "H.264 1280x720 @ {} kbps, {effort:?}: encode {:.0} fps, decode {:.0} fps, {} of {} \
             frames encoded, {:.0} kbps actual, PSNR-Y {:.2} dB, {} of {} markers read",
            bitrate / 1000,
            n as f64 / enc_s,
            aus.len() as f64 / dec_s,
            aus.len(),
            n,
            bytes as f64 * 8.0 / (n as f64 / 30.0) / 1000.0,
            psnr.iter().sum::<f64>() / psnr.len().max(1) as f64,
            markers,
            decoded.len()
        );
    }

    let mut tone = ToneSource::new(ToneConfig::default());
    let pcm: Vec<AudioFrame> = (0..500u64).map(|i| tone.next_frame(i * FRAME_US)).collect();
    let mut no_fec = OpusEncoder::new(OpusConfig {
        fec: false,
        packet_loss_pct: 0,
        ..Default::default()
    })
    .expect("opus encoder");
    let t = Instant::now();
    for f in &pcm {
        no_fec.encode(f).expect("encode");
    }
    println!(
        "Opus encode without FEC (comparison): {:.1} us/frame",
        t.elapsed().as_secs_f64() * 1e6 / 500.0
    );
    let mut enc = OpusEncoder::new(OpusConfig::default()).expect("opus encoder");
    let t = Instant::now();
    let packets: Vec<Vec<u8>> = pcm.iter().map(|f| enc.encode(f).expect("encode")).collect();
    let enc_s = t.elapsed().as_secs_f64();
    let mut dec = OpusDecoder::new().expect("opus decoder");
    let t = Instant::now();
    for (i, p) in packets.iter().enumerate() {
        dec.decode_frame(p, i as u64 * FRAME_US).expect("decode");
    }
    let dec_s = t.elapsed().as_secs_f64();
    println!(
        "Opus 48 kHz mono 32 kbps, 10 s: encode {:.1} us/frame ({:.1} ms total), decode {:.1} us/frame ({:.1} ms total)",
        enc_s * 1e6 / 500.0,
        enc_s * 1e3,
        dec_s * 1e6 / 500.0,
        dec_s * 1e3
    );
}
