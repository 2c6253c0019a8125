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

    /// Prefixes the message with the file it is about, keeping the variant, so a config error
    /// reads "FILE: invalid model config: ..." with the prefix once.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        let file = path.display();
        match self {
            EngineError::Config(message) => EngineError::Config(format!("{file}: {message}")),
            EngineError::Weights(message) => EngineError::Weights(format!("{file}: {message}")),
            EngineError::Image(message) => EngineError::Image(format!("{file}: {message}")),
            EngineError::Input(message) => EngineError::Input(format!("{file}: {message}")),
            EngineError::Device(message) => EngineError::Device(format!("{file}: {message}")),
            EngineError::Io { context, error } => EngineError::Io { context: format!("{file}: {context}"), error },
        }
    }
}
