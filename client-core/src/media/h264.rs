//! H.264 over openh264: an encoder whose bitrate, frame rate and resolution change while it
//! runs, and a decoder to I420 [`VideoFrame`]s. Output is Annex-B (start-code delimited NAL
//! units), one access unit per encoded frame: what webrtc's `TrackLocalStaticSample` takes.

use std::ptr::addr_of_mut;

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, RateControlMode, UsageType,
};
use openh264::formats::{YUVSlices, YUVSource};
use openh264::{OpenH264API, Timestamp};
use openh264_sys2::{
    ENCODER_OPTION_BITRATE, ENCODER_OPTION_FRAME_RATE, ENCODER_OPTION_MAX_BITRATE, SBitrateInfo,
    SPATIAL_LAYER_ALL,
};

use super::error::{MediaError, Result};
use super::frame::VideoFrame;
use super::source::ContentHint;

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H264Config {
    /// Encoded width (even). Input frames of another size are scaled.
    pub width: u32,
    /// Encoded height (even).
    pub height: u32,
    /// Target bitrate in bits per second.
    pub bitrate_bps: u32,
    /// Maximum frame rate, used by rate control to budget bits per frame.
    pub max_fps: f32,
    /// Let rate control skip frames to hold the bitrate (recommended for live calls; a skipped
    /// frame makes [`H264Encoder::encode`] return `Ok(None)`).
    pub frame_skip: bool,
    /// Encoder threads (1 keeps CPU use predictable on small machines).
    pub threads: u16,
    /// How much CPU the encoder spends per frame for quality.
    pub effort: EncoderEffort,
}

/// openh264's search and analysis settings.
///
/// Measured with `cargo xtask bench-media` (1280x720 moving pattern, one core, shared machine):
/// see the figures in ARCHITECTURE.md. The picture a call sends is a face in front of a still
/// background: low complexity costs little PSNR at conversational bitrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderEffort {
    /// For a live call: low-complexity mode decision and motion search, no adaptive
    /// quantization (a per-macroblock variance analysis of every frame) and no background
    /// detection.
    #[default]
    Realtime,
    /// openh264's defaults (medium complexity, adaptive quantization and background detection
    /// on): the comparison for `bench-media`.
    Balanced,
}

impl Default for H264Config {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 720,
            bitrate_bps: 1_500_000,
            max_fps: 30.0,
            frame_skip: true,
            threads: 1,
            effort: EncoderEffort::Realtime,
        }
    }
}

impl H264Config {
    fn validate(&self) -> Result<()> {
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(2)
            || !self.height.is_multiple_of(2)
            || self.width.max(self.height) > 3840
            || self.width.min(self.height) > 2160
        {
            return Err(MediaError::InvalidConfig(format!(
                "H.264 resolution {}x{} must be even, non-zero, at most 3840x2160",
                self.width, self.height
            )));
        }
        if !(10_000..=50_000_000).contains(&self.bitrate_bps) {
            return Err(MediaError::InvalidConfig(format!(
                "bitrate {} bps out of 10 kbps..50 Mbps",
                self.bitrate_bps
            )));
        }
        if !(self.max_fps >= 1.0 && self.max_fps <= 120.0) {
            return Err(MediaError::InvalidConfig(format!(
                "max_fps {} out of 1..120",
                self.max_fps
            )));
        }
        Ok(())
    }
}

/// One encoded access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedVideo {
    /// Annex-B bytes (SPS and PPS precede every IDR).
    pub data: Vec<u8>,
    /// True for an IDR access unit (a decoder can start here).
    pub keyframe: bool,
    /// Capture time of the source frame (microseconds since the session epoch).
    pub capture_us: u64,
    /// Encoded width.
    pub width: u32,
    /// Encoded height.
    pub height: u32,
}

/// True when Annex-B `data` holds an IDR slice (NAL type 5).
pub fn contains_idr(data: &[u8]) -> bool {
    openh264::nal_units(data).any(|nal| {
        let hdr = nal
            .iter()
            .position(|&b| b == 1)
            .and_then(|i| nal.get(i + 1));
        matches!(hdr, Some(h) if h & 0x1F == 5)
    })
}

/// H.264 encoder (openh264, constrained baseline, real-time camera usage).
pub struct H264Encoder {
    inner: Encoder,
    config: H264Config,
    content: ContentHint,
    keyframe_requested: bool,
    frames: u64,
}

impl std::fmt::Debug for H264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Encoder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn enc_err(e: impl std::fmt::Display) -> MediaError {
    MediaError::H264Encode(e.to_string())
}

fn build_encoder(c: &H264Config, content: ContentHint) -> Result<Encoder> {
    let usage = match content {
        ContentHint::Motion => UsageType::CameraVideoRealTime,
        ContentHint::Text => UsageType::ScreenContentRealTime,
    };
    let (complexity, analysis) = match c.effort {
        EncoderEffort::Realtime => (Complexity::Low, false),
        EncoderEffort::Balanced => (Complexity::Medium, true),
    };
    let cfg = EncoderConfig::new()
        .complexity(complexity)
        .adaptive_quantization(analysis)
        .background_detection(analysis)
        .bitrate(BitRate::from_bps(c.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(c.max_fps))
        .skip_frames(c.frame_skip)
        .usage_type(usage)
        .rate_control_mode(RateControlMode::Bitrate)
        .num_threads(c.threads);
    Encoder::with_api_config(OpenH264API::from_source(), cfg).map_err(enc_err)
}

impl H264Encoder {
    /// A new encoder; its first output is an IDR.
    ///
    /// # Errors
    /// [`MediaError::InvalidConfig`] for an out-of-range setting; [`MediaError::H264Encode`] if
    /// openh264 cannot be created.
    pub fn new(config: H264Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inner: build_encoder(&config, ContentHint::Motion)?,
            config,
            content: ContentHint::Motion,
            keyframe_requested: false,
            frames: 0,
        })
    }

    /// The current settings.
    pub fn config(&self) -> &H264Config {
        &self.config
    }

    /// What the encoder is tuned for.
    pub fn content(&self) -> ContentHint {
        self.content
    }

    /// Tunes the encoder for camera video or for screen content (openh264's
    /// `SCREEN_CONTENT_REAL_TIME`: sharper text, fewer bits for what did not change). A change
    /// rebuilds the encoder; its next output is an IDR.
    ///
    /// # Errors
    /// [`MediaError::H264Encode`] if openh264 cannot be created.
    pub fn set_content(&mut self, content: ContentHint) -> Result<()> {
        if content != self.content {
            self.inner = build_encoder(&self.config, content)?;
            self.content = content;
            self.frames = 0;
            self.keyframe_requested = false;
        }
        Ok(())
    }

    /// Forces the next encoded frame to be an IDR (answer to a PLI/FIR).
    pub fn request_keyframe(&mut self) {
        self.keyframe_requested = true;
    }

    /// Changes the target bitrate at once, without restarting the encoder.
    ///
    /// # Errors
    /// [`MediaError::InvalidConfig`] if out of range; [`MediaError::H264Encode`] if openh264
    /// refuses it.
    pub fn set_bitrate(&mut self, bps: u32) -> Result<()> {
        let new = H264Config {
            bitrate_bps: bps,
            ..self.config
        };
        new.validate()?;
        if self.frames > 0 {
            // Raise the ceiling before the target when going up, and lower the target before
            // the ceiling when going down, so the target never exceeds the maximum.
            let (first, second) = if bps >= self.config.bitrate_bps {
                (ENCODER_OPTION_MAX_BITRATE, ENCODER_OPTION_BITRATE)
            } else {
                (ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE)
            };
            for option in [first, second] {
                let mut info = SBitrateInfo {
                    iLayer: SPATIAL_LAYER_ALL,
                    iBitrate: bps as i32,
                };
                // SAFETY: the encoder is initialised (a frame was encoded), and the option takes a
                // pointer to an SBitrateInfo that lives for the duration of the call.
                let rc = unsafe {
                    self.inner
                        .raw_api()
                        .set_option(option, addr_of_mut!(info).cast())
                };
                if rc != 0 {
                    return Err(MediaError::H264Encode(format!(
                        "set bitrate {bps} failed: {rc}"
                    )));
                }
            }
        } else {
            // Not yet initialised (openh264 initialises on the first frame): rebuild.
            self.inner = build_encoder(&new, self.content)?;
        }
        self.config = new;
        Ok(())
    }

    /// Changes the maximum frame rate (rate control's bits-per-frame budget) at once.
    ///
    /// # Errors
    /// As [`H264Encoder::set_bitrate`].
    pub fn set_max_fps(&mut self, fps: f32) -> Result<()> {
        let new = H264Config {
            max_fps: fps,
            ..self.config
        };
        new.validate()?;
        if self.frames > 0 {
            let mut value = fps;
            // SAFETY: initialised encoder; the option takes a pointer to a float.
            let rc = unsafe {
                self.inner
                    .raw_api()
                    .set_option(ENCODER_OPTION_FRAME_RATE, addr_of_mut!(value).cast())
            };
            if rc != 0 {
                return Err(MediaError::H264Encode(format!(
                    "set frame rate {fps} failed: {rc}"
                )));
            }
        } else {
            self.inner = build_encoder(&new, self.content)?;
        }
        self.config = new;
        Ok(())
    }

    /// Changes the encoded resolution: the encoder is rebuilt and its next output is an IDR with
    /// new SPS/PPS. Input frames keep whatever size the camera gives; they are scaled.
    ///
    /// # Errors
    /// [`MediaError::InvalidConfig`] for odd, zero or too large dimensions.
    pub fn set_resolution(&mut self, width: u32, height: u32) -> Result<()> {
        let new = H264Config {
            width,
            height,
            ..self.config
        };
        new.validate()?;
        if (width, height) != (self.config.width, self.config.height) {
            self.inner = build_encoder(&new, self.content)?;
            self.frames = 0;
            self.keyframe_requested = false;
        }
        self.config = new;
        Ok(())
    }

    /// Encodes one frame. `Ok(None)` when rate control skipped it (nothing to send).
    ///
    /// # Errors
    /// [`MediaError::H264Encode`] if openh264 fails.
    pub fn encode(&mut self, frame: &VideoFrame) -> Result<Option<EncodedVideo>> {
        let scaled;
        let frame = if (frame.width(), frame.height()) == (self.config.width, self.config.height) {
            frame
        } else {
            scaled = frame.scaled(self.config.width, self.config.height)?;
            &scaled
        };
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        let yuv = YUVSlices::new((frame.y(), frame.u(), frame.v()), (w, h), (w, w / 2, w / 2));
        debug_assert_eq!(yuv.dimensions(), (w, h));
        if self.keyframe_requested && self.frames > 0 {
            self.inner.force_intra_frame();
        }
        self.keyframe_requested = false;
        let ts = Timestamp::from_millis(frame.capture_us / 1000);
        let bs = self.inner.encode_at(&yuv, ts).map_err(enc_err)?;
        self.frames += 1;
        let frame_type = bs.frame_type();
        if matches!(frame_type, FrameType::Skip | FrameType::Invalid) {
            return Ok(None);
        }
        let data = bs.to_vec();
        if data.is_empty() {
            return Ok(None);
        }
        let keyframe = frame_type == FrameType::IDR || contains_idr(&data);
        Ok(Some(EncodedVideo {
            data,
            keyframe,
            capture_us: frame.capture_us,
            width: self.config.width,
            height: self.config.height,
        }))
    }
}

/// H.264 decoder (openh264) to I420 frames.
pub struct H264Decoder {
    inner: openh264::decoder::Decoder,
    needs_keyframe: bool,
}

impl std::fmt::Debug for H264Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Decoder")
            .field("needs_keyframe", &self.needs_keyframe)
            .finish_non_exhaustive()
    }
}

impl H264Decoder {
    /// A new decoder. It waits for an IDR before producing pictures.
    ///
    /// # Errors
    /// [`MediaError::H264Decode`] if openh264 cannot be created.
    pub fn new() -> Result<Self> {
        let inner = openh264::decoder::Decoder::with_api_config(
            OpenH264API::from_source(),
            openh264::decoder::DecoderConfig::new(),
        )
        .map_err(|e| MediaError::H264Decode(e.to_string()))?;
        Ok(Self {
            inner,
            needs_keyframe: true,
        })
    }

    /// True after a decode error (or before the first IDR): the receiver should send a
    /// rate-limited PLI. Cleared when an IDR decodes.
    pub fn needs_keyframe(&self) -> bool {
        self.needs_keyframe
    }

    /// Decodes one Annex-B access unit; `capture_us` is stamped on the picture.
    /// `Ok(None)` when the decoder has no picture to show yet.
    ///
    /// # Errors
    /// [`MediaError::H264Decode`] for a corrupt or undecodable access unit (never a panic).
    pub fn decode(&mut self, data: &[u8], capture_us: u64) -> Result<Option<VideoFrame>> {
        if data.is_empty() {
            return Ok(None);
        }
        let idr = contains_idr(data);
        if data.len() > i32::MAX as usize {
            return Err(MediaError::H264Decode("access unit too large".into()));
        }
        let decoded = match self.inner.decode(data) {
            Ok(d) => d,
            Err(e) => {
                self.needs_keyframe = true;
                return Err(MediaError::H264Decode(e.to_string()));
            }
        };
        let Some(yuv) = decoded else {
            return Ok(None);
        };
        let (w, h) = yuv.dimensions();
        let (sy, su, sv) = yuv.strides();
        let frame = VideoFrame::from_strided(
            w as u32,
            h as u32,
            yuv.y(),
            sy,
            yuv.u(),
            su,
            yuv.v(),
            sv,
            capture_us,
        )
        .map_err(|e| MediaError::H264Decode(e.to_string()))?;
        if idr {
            self.needs_keyframe = false;
        }
        Ok(Some(frame))
    }
}
