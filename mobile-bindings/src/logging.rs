//! Bedside's log lines, handed to the app's logger (Logcat, os_log...).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::error::BedsideError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<&Level> for LogLevel {
    fn from(l: &Level) -> Self {
        match *l {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

/// The app's logger. Called on whichever thread logged; must not block for long.
#[uniffi::export(foreign)]
pub trait LogSink: Send + Sync {
    /// `target` is the Rust module (`bedside_client_core::driver`), `message` the formatted
    /// event with its fields (`message key=value...`).
    fn log(&self, level: LogLevel, target: String, message: String);
}

static SINK: Mutex<Option<Arc<dyn LogSink>>> = Mutex::new(None);
static MAX_LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Warn as u8);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Sends Bedside's log lines up to `max_level` to `sink` (replacing any earlier sink). The
/// webrtc-rs crates stay silent whatever the level (their messages name socket addresses):
/// the filter is `bedside_client_core::LOG_FILTER` with Bedside's own crates opened up.
///
/// Installs the process-wide tracing subscriber on first use: fails with `Internal` if the
/// process already has another one.
#[uniffi::export]
pub fn set_log_sink(sink: Arc<dyn LogSink>, max_level: LogLevel) -> Result<(), BedsideError> {
    INSTALLED
        .get_or_init(|| {
            let mut filter = EnvFilter::new(bedside_client_core::LOG_FILTER);
            for krate in ["bedside_client_core", "bedside_protocol", "bedside_mobile"] {
                let directive = format!("{krate}=trace")
                    .parse()
                    .map_err(|e| format!("{e}"))?;
                filter = filter.add_directive(directive);
            }
            let subscriber = tracing_subscriber::registry().with(filter).with(SinkLayer);
            tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(BedsideError::internal)?;
    MAX_LEVEL.store(max_level as u8, Ordering::Relaxed);
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    Ok(())
}

/// Stops forwarding log lines.
#[uniffi::export]
pub fn clear_log_sink() {
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

struct SinkLayer;

impl<S: Subscriber> Layer<S> for SinkLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = LogLevel::from(event.metadata().level());
        if level as u8 > MAX_LEVEL.load(Ordering::Relaxed) {
            return;
        }
        let Some(sink) = SINK.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let mut line = Line::default();
        event.record(&mut line);
        sink.log(level, event.metadata().target().to_owned(), line.0);
    }
}

/// `message key=value key=value`.
#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
