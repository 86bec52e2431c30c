//! The shared heart of Bedside's doctor desktop app and patient mobile apps.
//!
//! So far: [`signaling`], the WebSocket connection to the clinic server that speaks
//! `bedside-protocol`. The call state machine, media and the WebRTC driver are being built
//! (issue #4).

pub mod signaling;
