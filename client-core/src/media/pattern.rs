//! A deterministic, moving video test pattern that carries a machine-readable marker.
//!
//! # Marker layout
//! The top band of the picture holds 2 rows of 64 square blocks; each block is `width / 64`
//! pixels wide and tall (block edges are computed as `i * width / 64`, so the layout survives
//! proportional scaling). A block is black (luma 16) for a 0 bit and white (luma 235) for a 1,
//! with neutral chroma. The 128 slots carry, most significant bit first:
//!
//! | slots   | content                                           |
//! |---------|---------------------------------------------------|
//! | 0..32   | frame counter (u32)                               |
//! | 32..80  | capture timestamp, microseconds (48 bits)         |
//! | 80..88  | participant tag (u8)                              |
//! | 88..104 | CRC-16/CCITT-FALSE over the 11 bytes above        |
//! | 104..128| fixed sync pattern `1010...`                      |
//!
//! At 1280x720 a block is 20x20 pixels: flat, high-contrast areas that survive H.264 at
//! well under 1 Mbps. [`read_marker`] averages the inner half of each block, rejects blocks
//! whose mean is neither clearly dark nor clearly bright, and checks the CRC and sync bits,
//! so a damaged picture yields `None`, never a wrong marker.

use super::error::Result;
use super::frame::VideoFrame;
use super::source::{Capture, VideoSource};

const COLS: usize = 64;
const SLOTS: usize = 128;
const DATA_BITS: usize = 104;
const BLACK: u8 = 16;
const WHITE: u8 = 235;

/// What the test pattern carries in each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameMarker {
    /// Frame counter, incremented for every generated frame.
    pub counter: u32,
    /// Capture timestamp in microseconds since the session epoch, modulo 2^48.
    pub capture_us: u64,
    /// Participant tag (who sent the picture).
    pub tag: u8,
}

/// CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF).
pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn marker_bits(m: &FrameMarker) -> [bool; SLOTS] {
    let mut bytes = [0u8; 13];
    bytes[0..4].copy_from_slice(&m.counter.to_be_bytes());
    bytes[4..10].copy_from_slice(&(m.capture_us & 0xFFFF_FFFF_FFFF).to_be_bytes()[2..8]);
    bytes[10] = m.tag;
    let crc = crc16(&bytes[..11]);
    bytes[11..13].copy_from_slice(&crc.to_be_bytes());
    let mut bits = [false; SLOTS];
    for (i, bit) in bits.iter_mut().enumerate().take(DATA_BITS) {
        *bit = bytes[i / 8] & (0x80 >> (i % 8)) != 0;
    }
    for (i, bit) in bits.iter_mut().enumerate().skip(DATA_BITS) {
        *bit = i % 2 == 0;
    }
    bits
}

/// Pixel rectangle `(x0, x1, y0, y1)` of marker slot `k` in a frame `width` wide.
fn slot_rect(width: usize, k: usize) -> (usize, usize, usize, usize) {
    let (row, col) = (k / COLS, k % COLS);
    (
        col * width / COLS,
        (col + 1) * width / COLS,
        row * width / COLS,
        (row + 1) * width / COLS,
    )
}

fn band_height(width: usize) -> usize {
    2 * width / COLS
}

/// Draws `marker` into the top band of `frame`.
///
/// Frames narrower than 128 pixels or shorter than the band are left unmarked.
pub fn write_marker(frame: &mut VideoFrame, marker: &FrameMarker) {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if w < 128 || h < band_height(w) + 2 {
        return;
    }
    let bits = marker_bits(marker);
    let band = band_height(w);
    let (y, u, v) = frame.planes_mut();
    for (k, &bit) in bits.iter().enumerate() {
        let (x0, x1, y0, y1) = slot_rect(w, k);
        let val = if bit { WHITE } else { BLACK };
        for row in y0..y1 {
            y[row * w + x0..row * w + x1].fill(val);
        }
    }
    let cw = w / 2;
    let chroma_rows = band.div_ceil(2);
    u[..chroma_rows * cw].fill(128);
    v[..chroma_rows * cw].fill(128);
}

/// Reads the marker back from a (possibly decoded, possibly scaled) frame.
///
/// Returns `None` when the band is missing, any block is ambiguous, or the CRC or sync bits do
/// not match.
pub fn read_marker(frame: &VideoFrame) -> Option<FrameMarker> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if w < 128 || h < band_height(w) + 2 {
        return None;
    }
    let y = frame.y();
    let mut bits = [false; SLOTS];
    for (k, bit) in bits.iter_mut().enumerate() {
        let (x0, x1, y0, y1) = slot_rect(w, k);
        let (mx, my) = ((x1 - x0) / 4, (y1 - y0) / 4);
        let (xa, xb, ya, yb) = (x0 + mx, x1 - mx, y0 + my, y1 - my);
        let mut sum = 0u64;
        let mut n = 0u64;
        for row in ya..yb {
            for &p in &y[row * w + xa..row * w + xb] {
                sum += p as u64;
                n += 1;
            }
        }
        let mean = sum.checked_div(n)?;
        *bit = match mean {
            0..=85 => false,
            165..=255 => true,
            _ => return None,
        };
    }
    if bits
        .iter()
        .enumerate()
        .skip(DATA_BITS)
        .any(|(i, &b)| b != (i % 2 == 0))
    {
        return None;
    }
    let mut bytes = [0u8; 13];
    for (i, &b) in bits.iter().enumerate().take(DATA_BITS) {
        if b {
            bytes[i / 8] |= 0x80 >> (i % 8);
        }
    }
    if crc16(&bytes[..11]) != u16::from_be_bytes([bytes[11], bytes[12]]) {
        return None;
    }
    let mut ts = [0u8; 8];
    ts[2..8].copy_from_slice(&bytes[4..10]);
    Some(FrameMarker {
        counter: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        capture_us: u64::from_be_bytes(ts),
        tag: bytes[10],
    })
}

/// Configuration of a [`TestPatternSource`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatternConfig {
    /// Width in pixels (even).
    pub width: u32,
    /// Height in pixels (even).
    pub height: u32,
    /// Frames per second when polled as a [`VideoSource`].
    pub fps: u32,
    /// Participant tag written into every frame.
    pub tag: u8,
}

impl Default for PatternConfig {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 720,
            fps: 30,
            tag: 0,
        }
    }
}

/// A synthetic camera: a moving picture (a scrolling gradient, a bouncing checkered box and
/// moving colour waves, so the encoder does real motion search) with a [`FrameMarker`] in its top band.
///
/// Deterministic: the picture depends only on the frame counter, the timestamp and the tag.
#[derive(Debug, Clone)]
pub struct TestPatternSource {
    config: PatternConfig,
    counter: u32,
    next_due_us: Option<u64>,
}

impl TestPatternSource {
    /// A new source; the first frame has counter 0.
    ///
    /// # Errors
    /// [`super::MediaError::InvalidConfig`] for odd or zero dimensions or a zero frame rate.
    pub fn new(config: PatternConfig) -> Result<Self> {
        VideoFrame::filled(config.width, config.height, 0, 0)
            .map_err(|e| super::MediaError::InvalidConfig(e.to_string()))?;
        if config.fps == 0 {
            return Err(super::MediaError::InvalidConfig("fps must be > 0".into()));
        }
        Ok(Self {
            config,
            counter: 0,
            next_due_us: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PatternConfig {
        &self.config
    }

    /// Generates the next frame now, stamped with `capture_us`, and advances the counter.
    pub fn next_frame(&mut self, capture_us: u64) -> VideoFrame {
        let f = render_unchecked(&self.config, self.counter, capture_us);
        self.counter = self.counter.wrapping_add(1);
        f
    }
}

impl VideoSource for TestPatternSource {
    /// Yields a frame whenever `now_us` has reached the next frame time (at `fps`); never
    /// bursts to catch up after a long pause.
    fn poll_video(&mut self, now_us: u64) -> Capture<VideoFrame> {
        let interval = 1_000_000 / self.config.fps as u64;
        let due = *self.next_due_us.get_or_insert(now_us);
        if now_us < due {
            return Capture::Pending;
        }
        let next = due + interval;
        self.next_due_us = Some(if next <= now_us {
            now_us + interval
        } else {
            next
        });
        Capture::Frame(self.next_frame(now_us))
    }
}

/// Renders frame number `counter` of the pattern (pure function).
///
/// # Errors
/// [`super::MediaError::InvalidFrame`] for odd or zero dimensions.
pub fn render_pattern(config: &PatternConfig, counter: u32, capture_us: u64) -> Result<VideoFrame> {
    VideoFrame::filled(config.width, config.height, 0, 0)?;
    Ok(render_unchecked(config, counter, capture_us))
}

/// Renders a frame; `config`'s dimensions must already be validated.
fn render_unchecked(config: &PatternConfig, counter: u32, capture_us: u64) -> VideoFrame {
    let (w, h) = (config.width as usize, config.height as usize);
    let n = counter as usize;
    // Scrolling diagonal gradient: a triangle wave (no sharp edges), so motion search finds
    // it and the encoder spends its bits on motion rather than on noise. Pixel (x, row) is
    // `40 + tri(x + row / 2 + 4n, 320)`: every line is a window of one precomputed wave, so a
    // line is one copy (about 20x cheaper than computing each pixel, `bench-media`).
    let tri = |t: usize, period: usize| -> usize {
        let p = t % period;
        if p < period / 2 { p } else { period - p }
    };
    let luma_wave: Vec<u8> = (0..w + 320).map(|t| 40 + tri(t, 320) as u8).collect();
    let mut y = Vec::with_capacity(w * h);
    for row in 0..h {
        let start = (row / 2 + 4 * n) % 320;
        y.extend_from_slice(&luma_wave[start..start + w]);
    }
    // A bouncing box with a textured face.
    let size = (h / 6).max(2);
    let span_x = w.saturating_sub(size).max(1);
    let span_y = h.saturating_sub(size).max(1);
    let bx = (n * 7) % (2 * span_x);
    let bx = if bx >= span_x { 2 * span_x - bx } else { bx };
    let by = (n * 3) % (2 * span_y);
    let by = if by >= span_y { 2 * span_y - by } else { by };
    for row in by..(by + size).min(h) {
        for (i, p) in y[row * w + bx..row * w + (bx + size).min(w)]
            .iter_mut()
            .enumerate()
        {
            *p = if ((i / 16) + (row - by) / 16) % 2 == 0 {
                230
            } else {
                60
            };
        }
    }
    // Slowly moving colour waves in chroma: U varies along a line only (every line the same),
    // V down the picture only (every line one value).
    let (cw, ch) = (w / 2, h / 2);
    let u_line: Vec<u8> = (0..cw).map(|x| 78 + tri(x + 2 * n, 200) as u8).collect();
    let mut u = Vec::with_capacity(cw * ch);
    let mut v = Vec::with_capacity(cw * ch);
    for row in 0..ch {
        u.extend_from_slice(&u_line);
        v.resize(v.len() + cw, 78 + tri(row + n, 200) as u8);
    }
    let mut frame = VideoFrame::from_valid_planes(config.width, config.height, y, u, v, capture_us);
    write_marker(
        &mut frame,
        &FrameMarker {
            counter,
            capture_us,
            tag: config.tag,
        },
    );
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_raw_and_scaled() {
        let cfg = PatternConfig {
            tag: 0xA5,
            ..Default::default()
        };
        let mut src = TestPatternSource::new(cfg).unwrap();
        let _ = src.next_frame(0);
        let f = src.next_frame(0x1234_5678_9ABC);
        let m = read_marker(&f).unwrap();
        assert_eq!(
            m,
            FrameMarker {
                counter: 1,
                capture_us: 0x1234_5678_9ABC,
                tag: 0xA5
            }
        );
        assert_eq!(read_marker(&f.scaled(640, 360).unwrap()), Some(m));
    }

    /// The line-copy rendering is the pattern's formula, pixel for pixel, outside the box and
    /// the marker band.
    #[test]
    fn rendering_matches_the_formula() {
        let tri = |t: usize, period: usize| {
            let p = t % period;
            (if p < period / 2 { p } else { period - p }) as u8
        };
        let cfg = PatternConfig {
            width: 320,
            height: 180,
            ..Default::default()
        };
        for n in [0usize, 77, 1001] {
            let f = render_pattern(&cfg, n as u32, 5).unwrap();
            let (size, band) = (180 / 6, band_height(320));
            let (y, u, v) = (f.y(), f.u(), f.v());
            // Below the band and to the right of where the box can be at this n, or left of it.
            let bx = (n * 7) % (2 * (320 - size));
            let bx = if bx >= 320 - size {
                2 * (320 - size) - bx
            } else {
                bx
            };
            for row in band..180 {
                for x in (0..320).filter(|x| *x < bx || *x >= bx + size) {
                    assert_eq!(y[row * 320 + x], 40 + tri(x + row / 2 + 4 * n, 320));
                }
            }
            for row in band.div_ceil(2)..90 {
                for x in 0..160 {
                    assert_eq!(u[row * 160 + x], 78 + tri(x + 2 * n, 200));
                    assert_eq!(v[row * 160 + x], 78 + tri(row + n, 200));
                }
            }
        }
    }

    #[test]
    fn corrupted_marker_is_rejected() {
        let mut f = render_pattern(&PatternConfig::default(), 7, 99).unwrap();
        // Flip one data block (slot 3) from its value to the opposite.
        let (x0, x1, y0, y1) = slot_rect(1280, 3);
        let (y, _, _) = f.planes_mut();
        let old = y[y0 * 1280 + x0];
        let new = if old == WHITE { BLACK } else { WHITE };
        for row in y0..y1 {
            y[row * 1280 + x0..row * 1280 + x1].fill(new);
        }
        assert_eq!(read_marker(&f), None);
        assert_eq!(
            read_marker(&VideoFrame::filled(1280, 720, 16, 0).unwrap()),
            None
        );
        assert_eq!(
            read_marker(&VideoFrame::filled(1280, 720, 235, 0).unwrap()),
            None
        );
    }

    #[test]
    fn source_paces_by_virtual_time() {
        let mut src = TestPatternSource::new(PatternConfig {
            width: 320,
            height: 180,
            fps: 10,
            tag: 1,
        })
        .unwrap();
        let mut got = vec![];
        for t in (0..1_000_000u64).step_by(10_000) {
            if let Capture::Frame(f) = src.poll_video(t) {
                got.push(read_marker(&f).unwrap());
            }
        }
        assert_eq!(got.len(), 10);
        assert_eq!(got[3].counter, 3);
        assert_eq!(got[3].capture_us, 300_000);
    }
}
