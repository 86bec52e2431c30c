//! The doctor's desktop app (egui/eframe): a view over `bedside-client-core`'s client handle.
//!
//! - [`model`]: the pure state ([`AppModel`]) the screens show, changed only by
//!   [`AppModel::apply`] with the client's `CallEvent`s, and the [`UiCommand`]s clicks produce.
//! - [`view`]: draws a model and returns the commands clicked; no I/O, testable without a server.
//! - [`app`]: the eframe app: drains events at the start of each frame, uploads the newest remote
//!   frame, runs the view and carries out its commands on the tokio runtime.
//! - [`clinic`]: background work (in-process clinic server, REST, the call client, demo patient).
//! - [`attention`]: the chime when a patient arrives, and the doctor's time zone.
//! - [`devices`]: the camera, microphone and speaker pickers and what a choice opens.
//! - [`share`]: screen sharing: the share menu, the "you are sharing" bar, what a choice opens.
//! - [`settings`]: what is remembered between runs (a TOML file; the token in the keyring).
//! - `test_hooks` (feature `test-hooks`, enabled only by the desktop's own tests): the status
//!   file, auto-admit and auto-share the end-to-end test drives the real binary with.
//!
//! The app makes no call decisions: admitting, reconnecting, audio-only fallback and quality all
//! live in `bedside-client-core`.

pub mod app;
pub mod attention;
pub mod clinic;
pub mod devices;
pub mod model;
pub mod settings;
pub mod share;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod video;
pub mod view;

pub use model::{AppModel, Screen, UiCommand};
pub use view::{Drafts, VideoView, view};
