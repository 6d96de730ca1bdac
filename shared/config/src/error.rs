//! [`ConfigError`]: why settings could not be loaded, and [`Problem`]: one
//! thing wrong with them.

/// Why settings could not be loaded. Loading changes no state.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML: nothing in it was checked.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The file and the environment were read; every problem found is
    /// listed, each naming its key.
    #[error("invalid configuration:{}", bulleted(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem found: the one [`ConfigError::Load`] failure, or each of
    /// [`ConfigError::Invalid`]'s, as a line of text naming its key.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load(err) => vec![err.to_string()],
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

/// One problem with the settings.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A key that does not exist, or a value of the wrong type. The message
    /// names the key and where the value came from (the file or the
    /// environment); the key keeps its default while the rest is checked.
    #[error(transparent)]
    Unreadable(config::ConfigError),
    /// A value that reads but breaks a rule; the message names the key.
    #[error("{0}")]
    Rule(String),
}

/// `problems` as an indented list, one per line.
fn bulleted(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("\n  - {problem}"))
        .collect()
}
