//! Raw media: I420 video frames and 20 ms frames of 48 kHz mono audio.

use super::error::{MediaError, Result};

/// Audio sample rate used everywhere in the media layer (Hz).
pub const SAMPLE_RATE: u32 = 48_000;
/// Duration of one audio frame in milliseconds.
pub const FRAME_MS: u32 = 20;
/// Samples in one 20 ms mono audio frame at 48 kHz.
pub const FRAME_SAMPLES: usize = 960;
/// Duration of one audio frame in microseconds.
pub const FRAME_US: u64 = 20_000;

/// Clockwise rotation the receiver must apply to display a frame upright.
///
/// Mobile cameras deliver sensor-oriented frames; the rotation travels with the frame
/// instead of being burnt into the pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Rotation {
    /// Upright.
    #[default]
    Deg0,
    /// Rotate 90 degrees clockwise to display.
    Deg90,
    /// Rotate 180 degrees to display.
    Deg180,
    /// Rotate 270 degrees clockwise to display.
    Deg270,
}

impl Rotation {
    /// The rotation in degrees (0, 90, 180 or 270).
    pub fn degrees(self) -> u16 {
        match self {
            Rotation::Deg0 => 0,
            Rotation::Deg90 => 90,
            Rotation::Deg180 => 180,
            Rotation::Deg270 => 270,
        }
    }

    /// The rotation for a number of degrees; `None` unless it is 0, 90, 180 or 270.
    pub fn from_degrees(degrees: u16) -> Option<Self> {
        match degrees {
            0 => Some(Rotation::Deg0),
            90 => Some(Rotation::Deg90),
            180 => Some(Rotation::Deg180),
            270 => Some(Rotation::Deg270),
            _ => None,
        }
    }
}

/// One picture in I420 (planar YUV 4:2:0), tightly packed.
///
/// Invariants: width and height are even and non-zero; the Y plane holds `width * height`
/// bytes and the U and V planes `width / 2 * height / 2` bytes each, with stride equal to
/// the plane width. Strided input from a camera is copied in with [`VideoFrame::from_strided`].
#[derive(Clone, PartialEq, Eq)]
pub struct VideoFrame {
    width: u32,
    height: u32,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
    /// Capture time in microseconds since the session epoch (sender's clock).
    pub capture_us: u64,
    /// Rotation to apply when displaying.
    pub rotation: Rotation,
}

impl std::fmt::Debug for VideoFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoFrame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("capture_us", &self.capture_us)
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

fn check_dimensions(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
        return Err(MediaError::InvalidFrame(format!(
            "dimensions must be even and non-zero, got {width}x{height}"
        )));
    }
    if width > 8192 || height > 8192 {
        return Err(MediaError::InvalidFrame(format!(
            "dimensions too large: {width}x{height}"
        )));
    }
    Ok(())
}

impl VideoFrame {
    /// A frame from tightly packed planes.
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if the dimensions are odd or zero or a plane has the wrong length.
    pub fn new(
        width: u32,
        height: u32,
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
        capture_us: u64,
    ) -> Result<Self> {
        check_dimensions(width, height)?;
        let (w, h) = (width as usize, height as usize);
        let chroma = (w / 2) * (h / 2);
        if y.len() != w * h || u.len() != chroma || v.len() != chroma {
            return Err(MediaError::InvalidFrame(format!(
                "plane sizes {}/{}/{} do not match {width}x{height}",
                y.len(),
                u.len(),
                v.len()
            )));
        }
        Ok(Self {
            width,
            height,
            y,
            u,
            v,
            capture_us,
            rotation: Rotation::Deg0,
        })
    }

    /// A frame filled with one colour (limited-range luma `luma`, neutral chroma: grey).
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if the dimensions are odd or zero.
    pub fn filled(width: u32, height: u32, luma: u8, capture_us: u64) -> Result<Self> {
        check_dimensions(width, height)?;
        let (w, h) = (width as usize, height as usize);
        let chroma = (w / 2) * (h / 2);
        Self::new(
            width,
            height,
            vec![luma; w * h],
            vec![128; chroma],
            vec![128; chroma],
            capture_us,
        )
    }

    /// Copies a frame in from strided planes, as cameras and decoders deliver them.
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if a stride is narrower than its plane or a plane is too short.
    #[allow(clippy::too_many_arguments)]
    pub fn from_strided(
        width: u32,
        height: u32,
        y: &[u8],
        y_stride: usize,
        u: &[u8],
        u_stride: usize,
        v: &[u8],
        v_stride: usize,
        capture_us: u64,
    ) -> Result<Self> {
        check_dimensions(width, height)?;
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w / 2, h / 2);
        let copy = |src: &[u8], stride: usize, pw: usize, ph: usize| -> Result<Vec<u8>> {
            if stride < pw || src.len() < stride * (ph - 1) + pw {
                return Err(MediaError::InvalidFrame(format!(
                    "plane of {} bytes with stride {stride} cannot hold {pw}x{ph}",
                    src.len()
                )));
            }
            let mut out = Vec::with_capacity(pw * ph);
            for row in 0..ph {
                out.extend_from_slice(&src[row * stride..row * stride + pw]);
            }
            Ok(out)
        };
        Self::new(
            width,
            height,
            copy(y, y_stride, w, h)?,
            copy(u, u_stride, cw, ch)?,
            copy(v, v_stride, cw, ch)?,
            capture_us,
        )
    }

    /// A frame from planes whose sizes the caller has already made right for valid, even
    /// dimensions (internal fast path without a `Result`).
    pub(crate) fn from_valid_planes(
        width: u32,
        height: u32,
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
        capture_us: u64,
    ) -> Self {
        debug_assert!(check_dimensions(width, height).is_ok());
        debug_assert_eq!(y.len(), width as usize * height as usize);
        Self {
            width,
            height,
            y,
            u,
            v,
            capture_us,
            rotation: Rotation::Deg0,
        }
    }

    /// Converts packed 8-bit RGB (as webcams decode to) into I420 with BT.601 limited-range
    /// coefficients. An odd last row or column is dropped to keep the dimensions even.
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if `rgb` is shorter than `width * height * 3` or the frame
    /// would be empty.
    pub fn from_rgb(width: u32, height: u32, rgb: &[u8], capture_us: u64) -> Result<Self> {
        let (sw, w, h) = (
            width as usize,
            (width & !1) as usize,
            (height & !1) as usize,
        );
        check_dimensions(w as u32, h as u32)?;
        if rgb.len() < sw * height as usize * 3 {
            return Err(MediaError::InvalidFrame(format!(
                "RGB buffer of {} bytes is too small for {width}x{height}",
                rgb.len()
            )));
        }
        let px = |x: usize, y: usize| -> (i32, i32, i32) {
            let i = (y * sw + x) * 3;
            (
                i32::from(rgb[i]),
                i32::from(rgb[i + 1]),
                i32::from(rgb[i + 2]),
            )
        };
        let mut yp = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let (r, g, b) = px(x, y);
                yp[y * w + x] = (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8;
            }
        }
        let (cw, ch) = (w / 2, h / 2);
        let mut up = vec![0u8; cw * ch];
        let mut vp = vec![0u8; cw * ch];
        for cy in 0..ch {
            for cx in 0..cw {
                let (mut r, mut g, mut b) = (0, 0, 0);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let p = px(2 * cx + dx, 2 * cy + dy);
                    r += p.0;
                    g += p.1;
                    b += p.2;
                }
                let (r, g, b) = (r / 4, g / 4, b / 4);
                up[cy * cw + cx] = (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128) as u8;
                vp[cy * cw + cx] = (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128) as u8;
            }
        }
        Self::new(w as u32, h as u32, yp, up, vp, capture_us)
    }

    /// Converts packed 32-bit B, G, R, pad pixels (X11's and Windows' screen images) into
    /// I420, with [`VideoFrame::from_rgb`]'s coefficients, in one pass over row pairs (a
    /// shared screen is converted 10 times a second). An odd last row or column is dropped.
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if `bgrx` is shorter than `width * height * 4` or the frame
    /// would be empty.
    pub fn from_bgrx(width: u32, height: u32, bgrx: &[u8], capture_us: u64) -> Result<Self> {
        let (stride, w, h) = (
            width as usize * 4,
            (width & !1) as usize,
            (height & !1) as usize,
        );
        check_dimensions(w as u32, h as u32)?;
        if bgrx.len() < stride * height as usize {
            return Err(MediaError::InvalidFrame(format!(
                "BGRX buffer of {} bytes is too small for {width}x{height}",
                bgrx.len()
            )));
        }
        let luma = |p: &[u8]| -> u8 {
            let (b, g, r) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
            (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8
        };
        let cw = w / 2;
        let mut yp = vec![0u8; w * h];
        let mut up = vec![0u8; cw * (h / 2)];
        let mut vp = vec![0u8; cw * (h / 2)];
        for cy in 0..h / 2 {
            let top = &bgrx[2 * cy * stride..][..w * 4];
            let bottom = &bgrx[(2 * cy + 1) * stride..][..w * 4];
            let (y_top, y_bottom) = yp[2 * cy * w..(2 * cy + 2) * w].split_at_mut(w);
            let pairs = top.chunks_exact(8).zip(bottom.chunks_exact(8));
            let lumas = y_top.chunks_exact_mut(2).zip(y_bottom.chunks_exact_mut(2));
            let chroma = up[cy * cw..][..cw].iter_mut().zip(&mut vp[cy * cw..][..cw]);
            for (((t, b), (yt, yb)), (u, v)) in pairs.zip(lumas).zip(chroma) {
                yt[0] = luma(&t[..4]);
                yt[1] = luma(&t[4..]);
                yb[0] = luma(&b[..4]);
                yb[1] = luma(&b[4..]);
                let sum = |i: usize| {
                    i32::from(t[i]) + i32::from(t[i + 4]) + i32::from(b[i]) + i32::from(b[i + 4])
                };
                let (bl, g, r) = (sum(0) / 4, sum(1) / 4, sum(2) / 4);
                *u = (((-38 * r - 74 * g + 112 * bl + 128) >> 8) + 128) as u8;
                *v = (((112 * r - 94 * g - 18 * bl + 128) >> 8) + 128) as u8;
            }
        }
        Self::new(w as u32, h as u32, yp, up, vp, capture_us)
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The luma plane (stride = width).
    pub fn y(&self) -> &[u8] {
        &self.y
    }

    /// The U (Cb) plane (stride = width / 2).
    pub fn u(&self) -> &[u8] {
        &self.u
    }

    /// The V (Cr) plane (stride = width / 2).
    pub fn v(&self) -> &[u8] {
        &self.v
    }

    /// Mutable access to the three planes, for drawing in place (sizes cannot change).
    pub fn planes_mut(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        (&mut self.y, &mut self.u, &mut self.v)
    }

    /// A copy scaled to `width` x `height` with bilinear filtering (used when the encoder's
    /// resolution differs from the camera's).
    ///
    /// # Errors
    /// [`MediaError::InvalidFrame`] if the target dimensions are odd or zero.
    pub fn scaled(&self, width: u32, height: u32) -> Result<VideoFrame> {
        check_dimensions(width, height)?;
        if width == self.width && height == self.height {
            return Ok(self.clone());
        }
        let (sw, sh) = (self.width as usize, self.height as usize);
        let (dw, dh) = (width as usize, height as usize);
        let y = scale_plane(&self.y, sw, sh, dw, dh);
        let u = scale_plane(&self.u, sw / 2, sh / 2, dw / 2, dh / 2);
        let v = scale_plane(&self.v, sw / 2, sh / 2, dw / 2, dh / 2);
        let mut out = VideoFrame::new(width, height, y, u, v, self.capture_us)?;
        out.rotation = self.rotation;
        Ok(out)
    }
}

/// Bilinear scaling of one plane, 16.16 fixed point, sampling at pixel centres.
fn scale_plane(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    let mut out = vec![0u8; dw * dh];
    let step_x = ((sw as u64) << 16) / dw as u64;
    let step_y = ((sh as u64) << 16) / dh as u64;
    // Precompute horizontal taps.
    let taps: Vec<(usize, usize, u32)> = (0..dw)
        .map(|dx| {
            let fx = (dx as i64 * step_x as i64 + step_x as i64 / 2 - (1 << 15)).max(0) as u64;
            let x0 = ((fx >> 16) as usize).min(sw - 1);
            let x1 = (x0 + 1).min(sw - 1);
            (x0, x1, (fx & 0xffff) as u32)
        })
        .collect();
    for dy in 0..dh {
        let fy = (dy as i64 * step_y as i64 + step_y as i64 / 2 - (1 << 15)).max(0) as u64;
        let y0 = ((fy >> 16) as usize).min(sh - 1);
        let y1 = (y0 + 1).min(sh - 1);
        let wy = (fy & 0xffff) as u32;
        let r0 = &src[y0 * sw..y0 * sw + sw];
        let r1 = &src[y1 * sw..y1 * sw + sw];
        let row = &mut out[dy * dw..dy * dw + dw];
        for (o, &(x0, x1, wx)) in row.iter_mut().zip(&taps) {
            let top = r0[x0] as u32 * (65536 - wx) + r0[x1] as u32 * wx;
            let bot = r1[x0] as u32 * (65536 - wx) + r1[x1] as u32 * wx;
            let val = (top as u64 * (65536 - wy) as u64 + bot as u64 * wy as u64) >> 32;
            *o = val.min(255) as u8;
        }
    }
    out
}

/// One 20 ms frame of 48 kHz mono signed 16-bit audio.
#[derive(Clone, PartialEq, Eq)]
pub struct AudioFrame {
    /// Exactly [`FRAME_SAMPLES`] samples.
    pub samples: Box<[i16; FRAME_SAMPLES]>,
    /// Capture time of the first sample in microseconds since the session epoch.
    pub capture_us: u64,
}

impl std::fmt::Debug for AudioFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioFrame")
            .field("capture_us", &self.capture_us)
            .finish_non_exhaustive()
    }
}

impl AudioFrame {
    /// A silent frame.
    pub fn silence(capture_us: u64) -> Self {
        Self {
            samples: Box::new([0; FRAME_SAMPLES]),
            capture_us,
        }
    }

    /// A frame from a slice of exactly [`FRAME_SAMPLES`] samples.
    ///
    /// # Errors
    /// [`MediaError::AudioFrameLength`] for any other length.
    pub fn from_slice(samples: &[i16], capture_us: u64) -> Result<Self> {
        let arr: [i16; FRAME_SAMPLES] =
            samples
                .try_into()
                .map_err(|_| MediaError::AudioFrameLength {
                    expected: FRAME_SAMPLES,
                    got: samples.len(),
                })?;
        Ok(Self {
            samples: Box::new(arr),
            capture_us,
        })
    }

    /// The frame's loudness as RFC 6464 carries it: −dBov from 0 (a full-scale square wave)
    /// to 127 (silence), from the RMS of the samples. What the SFU compares to pick the active
    /// speaker; a full-scale sine is 3, speech at a normal level about 20 to 30.
    pub fn level_dbov(&self) -> u8 {
        let energy: f64 = self.samples.iter().map(|&s| f64::from(s).powi(2)).sum();
        let rms = (energy / FRAME_SAMPLES as f64).sqrt() / 32768.0;
        if rms <= 0.0 {
            return 127;
        }
        (-20.0 * rms.log10()).round().clamp(0.0, 127.0) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_level_is_minus_dbov_of_the_rms() {
        assert_eq!(AudioFrame::silence(0).level_dbov(), 127);
        let sine = |amplitude: f64| {
            let samples: Vec<i16> = (0..FRAME_SAMPLES)
                .map(|i| (amplitude * (i as f64 * 0.05).sin()) as i16)
                .collect();
            AudioFrame::from_slice(&samples, 0).unwrap().level_dbov()
        };
        // A sine's RMS is its amplitude over √2: −3 dB at full scale, 20 dB less per tenth.
        assert_eq!(sine(32767.0), 3);
        assert_eq!(sine(3276.7), 23);
        assert_eq!(sine(327.67), 43);
        // Quieter than RFC 6464 can say: as silent as it gets.
        assert_eq!(sine(0.4), 127);
    }

    #[test]
    fn bgrx_converts_as_rgb_does() {
        let (w, h) = (7u32, 5u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let bgrx: Vec<u8> = rgb
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0], 0xAA])
            .collect();
        let a = VideoFrame::from_rgb(w, h, &rgb, 9).unwrap();
        let b = VideoFrame::from_bgrx(w, h, &bgrx, 9).unwrap();
        assert_eq!((b.width(), b.height()), (6, 4));
        assert_eq!((a.y(), a.u(), a.v()), (b.y(), b.u(), b.v()));
        assert!(VideoFrame::from_bgrx(w, h, &bgrx[..10], 9).is_err());
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(VideoFrame::filled(3, 2, 0, 0).is_err());
        assert!(VideoFrame::filled(0, 2, 0, 0).is_err());
        assert!(VideoFrame::new(4, 2, vec![0; 8], vec![0; 2], vec![0; 1], 0).is_err());
        assert!(AudioFrame::from_slice(&[0; 959], 0).is_err());
    }

    #[test]
    fn strided_copy_and_scale() {
        let y: Vec<u8> = (0..(6 * 4)).map(|i| i as u8).collect();
        let f =
            VideoFrame::from_strided(4, 4, &y, 6, &[1, 2, 0, 3, 4, 0], 3, &[5; 6], 3, 7).unwrap();
        assert_eq!(&f.y()[..4], &[0, 1, 2, 3]);
        assert_eq!(&f.y()[4..8], &[6, 7, 8, 9]);
        assert_eq!(f.u(), &[1, 2, 3, 4]);
        let s = VideoFrame::filled(64, 32, 200, 0)
            .unwrap()
            .scaled(16, 8)
            .unwrap();
        assert!(s.y().iter().all(|&p| p == 200));
        assert_eq!(s.u().len(), 8 * 4);
    }

    #[test]
    fn rgb_conversion() {
        // 3x2 white-ish image: odd column dropped; white is Y 235, neutral chroma.
        let f = VideoFrame::from_rgb(3, 2, &[255; 18], 1).unwrap();
        assert_eq!((f.width(), f.height()), (2, 2));
        assert_eq!(f.y(), &[235; 4]);
        assert_eq!((f.u()[0], f.v()[0]), (128, 128));
        let red = VideoFrame::from_rgb(2, 2, &[255, 0, 0].repeat(4), 0).unwrap();
        assert_eq!((red.y()[0], red.u()[0], red.v()[0]), (82, 90, 240));
        assert!(VideoFrame::from_rgb(4, 4, &[0; 10], 0).is_err());
    }
}
