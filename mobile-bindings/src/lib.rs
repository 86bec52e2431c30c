//! uniffi bindings for the Bedside patient apps (Kotlin, Swift; Python for tests).
//!
//! A thin layer over `bedside-client-core` that makes no decisions: commands go straight to
//! the client's handle, `CallEvent`s come back one-to-one as [`ClientListener`] calls, capture
//! is pushed by the platform into client-core's push sources, and remote video is polled from
//! client-core's latest-frame sinks. Call logic (admission, reconnection, quality) lives in
//! client-core only.
//!
//! - [`BedsideClient`]: one consultation: join, leave, mute, camera, push capture.
//! - [`ClientListener`] / [`ListenerHandle`]: events out; dropping the handle stops delivery.
//! - [`set_log_sink`]: Bedside's log lines to the app's logger.
//! - [`BedsideError`]: the one error type, stable cases with a `details` string.

mod client;
mod error;
mod listener;
mod logging;
mod types;

pub use client::BedsideClient;
pub use error::BedsideError;
pub use listener::{ClientListener, ListenerHandle, VIDEO_POLL_INTERVAL};
pub use logging::{LogLevel, LogSink, clear_log_sink, set_log_sink};
pub use types::*;

uniffi::setup_scaffolding!();
