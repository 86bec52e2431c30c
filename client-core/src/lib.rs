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
