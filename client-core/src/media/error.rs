//! The media layer's one error type.

/// Everything that can go wrong in the media layer.
///
/// Bad input (a corrupt packet, a frame of the wrong size) is an error value, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A frame's dimensions or plane sizes are not valid I420.
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    /// An audio frame did not hold exactly one 20 ms frame of 48 kHz mono samples.
    #[error("audio frame must hold {expected} samples, got {got}")]
    AudioFrameLength {
        /// Samples expected (960).
        expected: usize,
        /// Samples given.
        got: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The H.264 encoder (openh264) failed.
    #[error("H.264 encoder: {0}")]
    H264Encode(String),
    /// The H.264 decoder (openh264) rejected the bitstream, e.g. a corrupt or truncated packet.
    #[error("H.264 decoder: {0}")]
    H264Decode(String),
    /// libopus failed, e.g. on a corrupt packet.
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
    /// An Opus packet decoded to a duration other than 20 ms.
    #[error("Opus packet decoded to {0} samples, expected 960 (20 ms)")]
    OpusFrameSize(usize),
    /// A packet's framing is malformed (e.g. a RED payload whose headers run past its end).
    #[error("malformed packet: {0}")]
    Decode(String),
    /// An audio or video device failed (only with the `devices` feature).
    #[error("device: {0}")]
    Device(String),
    /// The audio processing module (echo cancellation) rejected a frame.
    #[error("audio processing: {0}")]
    Audio(String),
}

/// Shorthand for results in the media layer.
pub type Result<T, E = MediaError> = std::result::Result<T, E>;
