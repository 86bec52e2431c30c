//! The one error type every fallible call returns.

/// Errors crossing the FFI. The cases are stable: apps branch on them; `details` is for logs
/// and bug reports, never for branching.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum BedsideError {
    /// The caller passed something unusable (a malformed URL, wrong plane sizes, 959 samples...).
    #[error("invalid argument: {details}")]
    InvalidArgument { details: String },
    /// Sockets or the network failed (e.g. a UDP address could not be bound).
    #[error("network: {details}")]
    Network { details: String },
    /// A bug or resource failure inside Bedside (the runtime could not be created...).
    #[error("internal: {details}")]
    Internal { details: String },
}

impl BedsideError {
    pub(crate) fn invalid(details: impl std::fmt::Display) -> Self {
        BedsideError::InvalidArgument {
            details: details.to_string(),
        }
    }

    pub(crate) fn internal(details: impl std::fmt::Display) -> Self {
        BedsideError::Internal {
            details: details.to_string(),
        }
    }
}

impl From<bedside_client_core::media::MediaError> for BedsideError {
    fn from(e: bedside_client_core::media::MediaError) -> Self {
        BedsideError::invalid(e)
    }
}

impl From<bedside_client_core::engine::EngineError> for BedsideError {
    fn from(e: bedside_client_core::engine::EngineError) -> Self {
        BedsideError::Network {
            details: e.to_string(),
        }
    }
}
