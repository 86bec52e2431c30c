//! The shared heart of Bedside's doctor desktop app and patient mobile apps.
//!
//! - [`call`]: the consultation's call logic, one sans-IO state machine (with [`backoff`]).
//! - [`signaling`]: the WebSocket connection to the clinic server that speaks
//!   `bedside-protocol`.
//!
//! Media and the WebRTC driver are being built (issue #4).

pub mod backoff;
pub mod call;
pub mod driver;
pub mod engine;
pub mod media;
pub mod pipeline;
pub mod quality;
pub mod signaling;
pub mod stats;

/// The default log filter for client programs: warnings from Bedside, nothing from the
/// webrtc-rs crates, whose messages name socket addresses (no addresses in logs).
pub const LOG_FILTER: &str = "warn,rtc=off,rtc_ice=off,rtc_dtls=off,rtc_srtp=off,rtc_sctp=off,\
                              rtc_turn=off,rtc_stun=off,rtc_mdns=off,rtc_interceptor=off,webrtc=off";
