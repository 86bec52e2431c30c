//! The shared heart of Bedside's doctor desktop app and patient mobile apps.
//!
//! - [`call`]: the consultation's call logic, one sans-IO state machine (with [`backoff`] and
//!   the [`quality`] ladder).
//! - [`driver`]: the tokio driver that feeds it and carries out what it decides, with the
//!   WebRTC [`engine`], the media [`pipeline`] (over [`media`]) and call [`stats`].
//! - [`signaling`]: the WebSocket connection to the clinic server that speaks
//!   `bedside-protocol`.
//! - [`e2ee`]: end-to-end media encryption (SFrame frames, HPKE-sealed per-sender keys).
//! - [`turn_tcp`]: TURN over TCP and TLS, which webrtc 0.21 lacks, for TCP-only networks.

pub mod backoff;
pub mod call;
pub mod congestion;
pub mod driver;
pub mod e2ee;
pub mod engine;
#[cfg(feature = "impair")]
pub mod impair;
pub mod loss_control;
pub mod media;
pub mod pacer;
pub mod pipeline;
pub mod quality;
pub mod signaling;
pub mod stats;
pub mod turn_tcp;

/// The default log filter for client programs: warnings from Bedside, nothing from the
/// webrtc-rs crates, whose messages name socket addresses (no addresses in logs).
pub const LOG_FILTER: &str = "warn,rtc=off,rtc_ice=off,rtc_dtls=off,rtc_srtp=off,rtc_sctp=off,\
                              rtc_turn=off,rtc_stun=off,rtc_mdns=off,rtc_interceptor=off,webrtc=off";
