//! The engine's error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{0}")]
    Weights(String),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Input(String),
    /// The message includes the I/O error, so `source()` does not return it. Otherwise a caller
    /// that prints the whole chain, such as anyhow's `{:#}`, would show it twice.
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        EngineError::Io { context: context.into(), error }
    }
}
