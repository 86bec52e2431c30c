//! The media layer: raw frames, sources, codecs, the audio playout buffer and sinks.
//!
//! Everything here is synchronous and sans-IO where time matters: clocks are arguments
//! (`now_us`, `arrival_us`, `capture_us`, microseconds since the session epoch), never read
//! inside. The call driver owns the threads and the webrtc tracks and moves data between them:
//!
//! ```text
//! send:    VideoSource ─ VideoFrame ─▶ H264Encoder ─ EncodedVideo (Annex-B) ─▶ video track
//!          AudioSource ─ AudioFrame ─▶ OpusEncoder ─ packet ─────────────────▶ audio track
//! receive: video track ─ access unit ─▶ H264Decoder ─ VideoFrame ─▶ LatestFrame ─▶ UI
//!          audio track ─ packet, seq, ts, arrival ─▶ AudioPlayoutBuffer ─ pull every 20 ms ─▶ speaker
//! ```
//!
//! - [`frame`]: [`VideoFrame`] (I420) and [`AudioFrame`] (20 ms, 48 kHz mono i16).
//! - [`source`]: [`VideoSource`]/[`AudioSource`] traits, [`push_source`] for hosts whose cameras
//!   deliver frames by callback, [`NoDevice`].
//! - [`pattern`] and [`tone`]: deterministic synthetic sources whose markers survive the codecs
//!   (for tests, demos, probes).
//! - [`h264`] and [`opus_codec`]: the codecs; [`assembler`]: H.264 access units from RTP
//!   packets, each handed out as soon as its last packet is in.
//! - [`playout`]: the adaptive audio jitter buffer with FEC and PLC.
//! - [`sink`]: the UI's [`LatestFrame`].
//! - `devices` (feature `devices`): real cameras, microphones and speakers.
//! - [`screen`]: screen sharing: the encoding policy for screen content, and (feature `devices`,
//!   X11) the screen or a window as a [`VideoSource`].
//! - `apm` (feature `devices`): echo cancellation, noise suppression and automatic gain on the
//!   microphone path, the speaker's output as the echo reference.

pub mod assembler;
pub mod error;
pub mod frame;
pub mod h264;
pub mod opus_codec;
pub mod pattern;
pub mod playout;
pub mod red;
pub mod screen;
pub mod sink;
pub mod source;
pub mod tone;

#[cfg(feature = "devices")]
pub mod apm;
#[cfg(feature = "devices")]
pub mod devices;

pub use assembler::{AccessUnit, FrameAssembler};
pub use error::{MediaError, Result};
pub use frame::{AudioFrame, FRAME_MS, FRAME_SAMPLES, FRAME_US, Rotation, SAMPLE_RATE, VideoFrame};
pub use h264::{EncodedVideo, EncoderEffort, H264Config, H264Decoder, H264Encoder, contains_idr};
pub use opus_codec::{AudioDecoder, OpusConfig, OpusDecoder, OpusEncoder, is_dtx_packet};
pub use pattern::{
    FrameMarker, PatternConfig, TestPatternSource, read_marker, render_pattern, write_marker,
};
pub use playout::{AudioPlayoutBuffer, Playout, PlayoutConfig, PlayoutKind, PlayoutStats};
pub use red::{RED_PAYLOAD_TYPE, RedBlock, RedEncoder};
pub use sink::{LatestFrame, PLAYED_AUDIO_CAPACITY, PlayedAudio};
pub use source::{
    AudioSource, Capture, ContentHint, FramePusher, NoDevice, PushedSource, RealTimeGate,
    VideoSource, push_source,
};
pub use tone::{
    AudioMarker, AudioMarkerReader, DOCTOR_TONE_HZ, PATIENT_TONE_HZ, ToneConfig, ToneSource,
    detect_tone, read_audio_marker,
};
