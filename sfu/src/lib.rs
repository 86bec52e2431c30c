//! `bedside-sfu`: the selective forwarding unit for group consultations.
//!
//! A consultation of three or more moves from peer to peer to the SFU: each participant then
//! holds one WebRTC connection to it, sends its audio and video once, and receives every other
//! participant's in the *slots* it offered. [`core`] is the sans-IO heart (str0m 0.25 `Rtc`s,
//! ICE-lite, time passed in); [`driver`] the one thread that owns the UDP socket and the core;
//! [`metrics`] what both count, for `/metrics`.
//! `bedside-server` starts it in-process and carries the offers, answers and candidates over its
//! signaling WebSocket.

pub mod core;
pub mod driver;
pub mod metrics;

pub use crate::core::{
    Core, Counters, Event, KEYFRAME_REQUEST_INTERVAL, ParticipantStats, SfuError, SlotLayout,
};
pub use crate::driver::{Sfu, SfuHandle, SfuSettings};
pub use crate::metrics::{IoMetrics, SfuMetrics};
