//! [`ConfigError`]: why settings could not be loaded.

/// Why settings could not be loaded. Loading changes no state.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or a value has the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// Values parsed but are not usable; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}
