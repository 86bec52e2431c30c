//! Synthetic audio with markers: a per-participant tone (who is speaking) and periodic timing
//! markers (when it was captured), both readable after Opus encode and decode.
//!
//! # Method
//! - **Who**: each participant sends a steady sine at its own frequency
//!   ([`DOCTOR_TONE_HZ`], [`PATIENT_TONE_HZ`]). [`detect_tone`] runs the Goertzel algorithm at
//!   each candidate frequency and answers the candidate holding most of the window's energy.
//! - **When**: every `marker_period_ms` (at a frame boundary) the tone is replaced for 140 ms by a
//!   marker: a 20 ms start tone at [`MARKER_START_HZ`], then 12 symbols of 10 ms in 4-FSK
//!   ([`MARKER_SYMBOL_HZ`], 2 bits per symbol) carrying 24 bits: the 16 low bits of the frame
//!   index at which the marker starts, then a CRC-8 of them. Phase is continuous, so there are no
//!   clicks. [`AudioMarkerReader`] finds the start tone with a sliding 5 ms Goertzel window,
//!   centres on its plateau (about 1 ms precision, unbiased by the window length), decodes the
//!   symbols from the middle 6 ms of each, and checks the CRC. Knowing the marker's frame index and
//!   the sample position at which it came out of the decoder, a receiver measures mouth-to-ear
//!   latency.
//!
//! All frequencies are below 3 kHz, which Opus keeps even in narrowband SILK mode at low rates.

use std::f64::consts::TAU;

use super::frame::{AudioFrame, FRAME_SAMPLES, FRAME_US, SAMPLE_RATE};
use super::source::{AudioSource, Capture};

/// The doctor's identification tone (Hz).
pub const DOCTOR_TONE_HZ: f32 = 440.0;
/// The patient's identification tone (Hz).
pub const PATIENT_TONE_HZ: f32 = 660.0;
/// Start-of-marker tone (Hz).
pub const MARKER_START_HZ: f32 = 2600.0;
/// The four marker symbol frequencies (Hz), for the 2-bit values 0 to 3.
pub const MARKER_SYMBOL_HZ: [f32; 4] = [1000.0, 1300.0, 1600.0, 1900.0];
/// Samples in the marker's start tone (20 ms).
const START_LEN: usize = 960;
/// Samples per marker symbol (10 ms).
const SYMBOL_LEN: usize = 480;
/// Symbols per marker.
const SYMBOLS: usize = 12;
/// Total marker length in samples (140 ms).
pub const MARKER_LEN: usize = START_LEN + SYMBOLS * SYMBOL_LEN;
/// Sliding window used to find the start tone (5 ms).
const SEARCH_WIN: usize = 240;

/// Configuration of a [`ToneSource`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToneConfig {
    /// The participant's tone frequency (Hz).
    pub freq_hz: f32,
    /// Peak amplitude (default 8000, about -12 dBFS).
    pub amplitude: i16,
    /// Period between timing markers in ms, rounded down to whole 20 ms frames; at least 160;
    /// 0 disables markers.
    pub marker_period_ms: u32,
}

impl Default for ToneConfig {
    fn default() -> Self {
        Self {
            freq_hz: DOCTOR_TONE_HZ,
            amplitude: 8000,
            marker_period_ms: 500,
        }
    }
}

/// A synthetic microphone producing the participant's tone with timing markers.
///
/// Frame `i` has capture time `start_us + i * 20 ms`, where `start_us` is the `now_us` of the
/// first poll (or the timestamp given to the first [`ToneSource::next_frame`]).
#[derive(Debug, Clone)]
pub struct ToneSource {
    config: ToneConfig,
    frame_index: u64,
    /// Added to `frame_index` in the markers (see [`ToneSource::with_index_base`]).
    index_base: u64,
    phase: f64,
    start_us: Option<u64>,
}

/// CRC-8 (poly 0x07, init 0).
fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn marker_symbols(frame_index: u16) -> [usize; SYMBOLS] {
    let b = frame_index.to_be_bytes();
    let word = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(crc8(&b));
    let mut out = [0usize; SYMBOLS];
    for (k, s) in out.iter_mut().enumerate() {
        *s = ((word >> (22 - 2 * k)) & 3) as usize;
    }
    out
}

impl ToneSource {
    /// A new source.
    pub fn new(config: ToneConfig) -> Self {
        Self {
            config,
            frame_index: 0,
            index_base: 0,
            phase: 0.0,
            start_us: None,
        }
    }

    /// Numbers markers from `base` instead of 0. A sender that passes its wall-clock time in
    /// frames (`unix_us / 20_000`) lets a receiver on a synchronized clock turn a marker back
    /// into a capture time, across processes.
    pub fn with_index_base(mut self, base: u64) -> Self {
        self.index_base = base;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ToneConfig {
        &self.config
    }

    fn period_frames(&self) -> u64 {
        match self.config.marker_period_ms {
            0 => 0,
            ms => u64::from(ms.max(160) / 20),
        }
    }

    /// Capture time of frame `frame_index` (the index carried by a marker, modulo 2^16), given a
    /// reference frame index near it. `None` before the first frame.
    pub fn capture_us_of(&self, frame_index: u64) -> Option<u64> {
        self.start_us.map(|s| s + frame_index * FRAME_US)
    }

    /// Index of the next frame to be produced.
    pub fn frame_index(&self) -> u64 {
        self.frame_index
    }

    /// Generates the next 20 ms frame, stamped `capture_us`.
    pub fn next_frame(&mut self, capture_us: u64) -> AudioFrame {
        if self.start_us.is_none() {
            self.start_us = Some(capture_us);
        }
        let period = self.period_frames();
        let in_period = if period == 0 {
            u64::MAX
        } else {
            self.frame_index % period
        };
        let marker_start = self.frame_index - if period == 0 { 0 } else { in_period };
        let symbols = marker_symbols(self.index_base.wrapping_add(marker_start) as u16);
        let mut frame = AudioFrame::silence(capture_us);
        let amp = f64::from(self.config.amplitude);
        for (s, out) in frame.samples.iter_mut().enumerate() {
            let pos = in_period
                .saturating_mul(FRAME_SAMPLES as u64)
                .saturating_add(s as u64);
            let freq = if pos < START_LEN as u64 {
                MARKER_START_HZ
            } else if pos < MARKER_LEN as u64 {
                MARKER_SYMBOL_HZ[symbols[(pos as usize - START_LEN) / SYMBOL_LEN]]
            } else {
                self.config.freq_hz
            };
            self.phase = (self.phase + TAU * f64::from(freq) / f64::from(SAMPLE_RATE)) % TAU;
            *out = (amp * self.phase.sin()).round() as i16;
        }
        self.frame_index += 1;
        frame
    }
}

impl AudioSource for ToneSource {
    /// Yields one frame each time `now_us` has reached the next frame's capture time (frames are
    /// never skipped: a late poll gets the overdue frames one per call).
    fn poll_audio(&mut self, now_us: u64) -> Capture<AudioFrame> {
        let start = *self.start_us.get_or_insert(now_us);
        let due = start + self.frame_index * FRAME_US;
        if now_us < due {
            return Capture::Pending;
        }
        Capture::Frame(self.next_frame(due))
    }
}

/// Goertzel power of `freq` in `x`, normalised to the fraction of the window's energy
/// (1.0 for a pure tone at `freq` spanning whole cycles; near 0 for unrelated content).
fn tone_fraction(x: &[f32], freq: f32, energy: f64) -> f64 {
    if energy <= 0.0 || x.is_empty() {
        return 0.0;
    }
    let coeff = 2.0 * (TAU * f64::from(freq) / f64::from(SAMPLE_RATE)).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in x {
        let s0 = f64::from(v) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power / (x.len() as f64 * energy)
}

fn energy(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Which of `candidates` (Hz) is the dominant tone in `samples`, if any.
///
/// Returns `None` for silence (below about -50 dBFS), or when no candidate holds at least 40%
/// of the energy and three times the runner-up's share. Use windows of 20 ms or more.
pub fn detect_tone(samples: &[i16], candidates: &[f32]) -> Option<f32> {
    let x: Vec<f32> = samples.iter().map(|&s| f32::from(s)).collect();
    let e = energy(&x);
    if x.is_empty() || e / (x.len() as f64) < 100.0 * 100.0 {
        return None;
    }
    let mut scores: Vec<(f32, f64)> = candidates
        .iter()
        .map(|&c| (c, tone_fraction(&x, c, e)))
        .collect();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (best, share) = *scores.first()?;
    let runner_up = scores.get(1).map_or(0.0, |s| s.1);
    (share >= 0.4 && share >= 3.0 * runner_up).then_some(best)
}

/// A timing marker found in received audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioMarker {
    /// Low 16 bits of the sender's frame index at which the marker started.
    pub frame_index: u16,
    /// Position of the marker's first sample in the stream given to the reader (samples since
    /// the reader's first sample).
    pub sample_offset: u64,
}

/// Streaming reader of timing markers: push decoded audio in, get markers out.
#[derive(Debug, Default, Clone)]
pub struct AudioMarkerReader {
    buf: Vec<f32>,
    /// Stream position of `buf[0]`.
    base: u64,
    /// Where to resume the coarse search, relative to `buf[0]`.
    scan: usize,
}

impl AudioMarkerReader {
    /// A reader at stream position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds samples; returns the markers completed by them.
    pub fn push(&mut self, samples: &[i16]) -> Vec<AudioMarker> {
        self.buf.extend(samples.iter().map(|&s| f32::from(s)));
        let mut found = Vec::new();
        loop {
            let Some(p) = self.coarse_find() else {
                let keep_from = self.buf.len().saturating_sub(SEARCH_WIN);
                self.consume(keep_from);
                return found;
            };
            if p + MARKER_LEN + START_LEN > self.buf.len() {
                // Wait for the whole marker; keep some context before it.
                let keep_from = p.saturating_sub(START_LEN);
                self.consume(keep_from);
                self.scan = p - keep_from;
                return found;
            }
            match self.decode_at(p) {
                Some((onset, marker_index)) => {
                    found.push(AudioMarker {
                        frame_index: marker_index,
                        sample_offset: self.base + onset as u64,
                    });
                    self.consume(onset + MARKER_LEN);
                }
                None => {
                    self.scan = p + START_LEN / 2;
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        self.base += n as u64;
        self.scan = self.scan.saturating_sub(n);
    }

    fn start_ratio(&self, pos: usize) -> f64 {
        let w = &self.buf[pos..pos + SEARCH_WIN];
        tone_fraction(w, MARKER_START_HZ, energy(w))
    }

    /// First position (1 ms steps) from `scan` where a window is mostly start tone.
    fn coarse_find(&self) -> Option<usize> {
        let mut p = self.scan;
        while p + SEARCH_WIN <= self.buf.len() {
            let w = &self.buf[p..p + SEARCH_WIN];
            let e = energy(w);
            if e / SEARCH_WIN as f64 > 100.0 * 100.0 && tone_fraction(w, MARKER_START_HZ, e) > 0.5 {
                return Some(p);
            }
            p += 48;
        }
        None
    }

    /// Refines the onset around coarse hit `p` and decodes the symbols.
    fn decode_at(&self, p: usize) -> Option<(usize, u16)> {
        let lo = p.saturating_sub(SEARCH_WIN);
        let hi = p + START_LEN;
        let ratios: Vec<(usize, f64)> = (lo..=hi)
            .step_by(12)
            .map(|q| (q, self.start_ratio(q)))
            .collect();
        let (peak_i, &(_, max)) = ratios
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.1.total_cmp(&b.1.1))?;
        let thr = 0.6 * max;
        let mut first = peak_i;
        while first > 0 && ratios[first - 1].1 >= thr {
            first -= 1;
        }
        let mut last = peak_i;
        while last + 1 < ratios.len() && ratios[last + 1].1 >= thr {
            last += 1;
        }
        let centre = (ratios[first].0 + ratios[last].0) / 2;
        let onset = centre.checked_sub((START_LEN - SEARCH_WIN) / 2)?;
        let mut word: u32 = 0;
        for k in 0..SYMBOLS {
            let s = onset + START_LEN + k * SYMBOL_LEN + SYMBOL_LEN / 5;
            let w = self.buf.get(s..s + SYMBOL_LEN * 3 / 5)?;
            let e = energy(w);
            let (sym, share) = MARKER_SYMBOL_HZ
                .iter()
                .enumerate()
                .map(|(i, &f)| (i, tone_fraction(w, f, e)))
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            if share < 0.3 {
                return None;
            }
            word = (word << 2) | sym as u32;
        }
        let idx = [(word >> 16) as u8, (word >> 8) as u8];
        (crc8(&idx) == word as u8).then_some((onset, u16::from_be_bytes(idx)))
    }
}

/// Reads the first complete timing marker in `samples`, if any (one-shot form of
/// [`AudioMarkerReader`]; `sample_offset` is relative to `samples[0]`).
pub fn read_audio_marker(samples: &[i16]) -> Option<AudioMarker> {
    AudioMarkerReader::new().push(samples).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: &mut ToneSource, frames: usize) -> Vec<i16> {
        let mut out = Vec::new();
        for i in 0..frames {
            out.extend_from_slice(&src.next_frame(i as u64 * FRAME_US).samples[..]);
        }
        out
    }

    #[test]
    fn raw_markers_exact_positions() {
        let mut src = ToneSource::new(ToneConfig::default());
        let pcm = run(&mut src, 100); // 2 s: markers at frames 0, 25, 50, 75
        let mut reader = AudioMarkerReader::new();
        let mut got = Vec::new();
        for chunk in pcm.chunks(333) {
            got.extend(reader.push(chunk));
        }
        let idx: Vec<u16> = got.iter().map(|m| m.frame_index).collect();
        assert_eq!(idx, vec![0, 25, 50, 75]);
        for m in &got {
            let expected = u64::from(m.frame_index) * FRAME_SAMPLES as u64;
            assert!(m.sample_offset.abs_diff(expected) <= 48, "{m:?}");
        }
    }

    #[test]
    fn tone_detection() {
        let mut d = ToneSource::new(ToneConfig {
            marker_period_ms: 0,
            ..Default::default()
        });
        let mut p = ToneSource::new(ToneConfig {
            freq_hz: PATIENT_TONE_HZ,
            marker_period_ms: 0,
            ..Default::default()
        });
        let c = [DOCTOR_TONE_HZ, PATIENT_TONE_HZ];
        assert_eq!(
            detect_tone(&d.next_frame(0).samples[..], &c),
            Some(DOCTOR_TONE_HZ)
        );
        assert_eq!(
            detect_tone(&p.next_frame(0).samples[..], &c),
            Some(PATIENT_TONE_HZ)
        );
        assert_eq!(detect_tone(&[0; 960], &c), None);
        let noise: Vec<i16> = (0..960u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 19) as i16)
            .collect();
        assert_eq!(detect_tone(&noise, &c), None);
    }
}
