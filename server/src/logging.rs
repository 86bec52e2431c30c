//! The log stream: `tracing-subscriber` writing to standard error, so standard output keeps
//! the few lines meant for the person who started the server.
//!
//! - `text`: ANSI colour only when standard error is a terminal and `NO_COLOR` is unset or
//!   empty (<https://no-color.org>): a log file or the journal gets plain text.
//! - `json`: one JSON object a line (tracing-subscriber's JSON layer) with the fields of the
//!   current span, so a consultation's lines carry `"span":{"id":"…","name":"consultation"}`.
//!
//! The level comes from `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use crate::config::LogFormat;

/// Whether colour codes belong on standard error.
pub fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the global subscriber on standard error. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    init_with(format, filter, colour_wanted(), std::io::stderr);
}

/// [`init`] with the filter, colour and writer given (tests capture the stream).
pub fn init_with<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    colour: bool,
    writer: W,
) where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
