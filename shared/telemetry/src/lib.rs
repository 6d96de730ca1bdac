//! Telemetry set-up shared by Herald's binaries.
//!
//! [`init`] installs the global `tracing` subscriber: human-readable lines on a
//! terminal or one JSON object per line (`telemetry.log_format`), filtered by
//! `RUST_LOG` when set, else by `telemetry.log_level`. Call it once, early in
//! `main`, and keep the returned [`TelemetryGuard`] alive until exit: it is where
//! flushing of exporters belongs.

use herald_config::{LogFormat, TelemetrySettings};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why telemetry could not be set up. Nothing was installed when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.log_level` (or `RUST_LOG`) is not a valid filter.
    #[error("telemetry.log_level: invalid filter {filter:?}: {source}")]
    Filter {
        /// The filter text as given.
        filter: String,
        /// The parser's complaint.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps telemetry running; dropping it flushes what can be flushed.
#[derive(Debug)]
#[must_use = "dropping the guard ends telemetry"]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global subscriber described by `settings`.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| settings.log_level.clone());
    let filter = EnvFilter::try_new(&filter_text).map_err(|source| TelemetryError::Filter {
        filter: filter_text.clone(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match settings.log_format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_target(true))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { _private: () })
}
