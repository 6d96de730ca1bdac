//! Telemetry set-up shared by Herald's binaries: logs and OpenTelemetry traces.
//!
//! [`init`] installs the global `tracing` subscriber:
//! - logs: human-readable lines or one JSON object per line
//!   (`telemetry.log_format`), filtered by `RUST_LOG` when set, else by
//!   `telemetry.log_level`;
//! - traces: when an OTLP endpoint is configured (`telemetry.otlp_endpoint` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`), spans of the `herald::trace` target are
//!   exported over OTLP (gRPC or HTTP/protobuf) through a batch processor with
//!   a bounded queue: when the collector is slow or down, spans are dropped, and
//!   delivery never waits for telemetry.
//!
//! Which deliveries get a span is decided by the caller before the span is
//! built (see `herald-edge`'s `telemetry` module), so an unsampled event costs
//! no span at all; the SDK therefore samples every span it is handed.
//!
//! Keep the returned [`TelemetryGuard`] alive until exit: dropping it flushes
//! and shuts down the exporter.

mod exporter;

use std::collections::HashMap;
use std::time::Duration;

use herald_config::{LogFormat, OtlpProtocol, TelemetrySettings};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of spans meant for export; other spans stay local.
pub const TRACE_TARGET: &str = "herald::trace";

/// Most spans waiting for export; beyond it new spans are dropped.
const MAX_QUEUED_SPANS: usize = 8192;

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
    /// The exporter's own runtime (its thread) could not be started.
    #[error("telemetry.otlp_endpoint: cannot set up the OTLP exporter: {0}")]
    ExporterRuntime(#[source] std::io::Error),
    /// The OTLP exporter could not be built (bad endpoint, ...).
    #[error("telemetry.otlp_endpoint: cannot set up the OTLP exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps telemetry running; dropping it flushes and stops the trace exporter.
#[derive(Debug)]
#[must_use = "dropping the guard ends telemetry"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                eprintln!("telemetry: flushing traces at shutdown failed: {err}");
            }
        }
    }
}

/// Checks what [`init`] would refuse without installing anything (for
/// `herald-edge check-config`): the log filter, `RUST_LOG` or
/// `telemetry.log_level`.
pub fn check(settings: &TelemetrySettings) -> Result<(), TelemetryError> {
    log_filter(settings).map(drop)
}

/// The log filter: `RUST_LOG` when set and not empty, else
/// `telemetry.log_level`.
fn log_filter(settings: &TelemetrySettings) -> Result<EnvFilter, TelemetryError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| settings.log_level.clone());
    EnvFilter::try_new(&filter_text).map_err(|source| TelemetryError::Filter {
        filter: filter_text,
        source,
    })
}

/// Installs the global subscriber described by `settings`; `node_id` becomes
/// the `service.instance.id` of exported spans.
pub fn init(settings: &TelemetrySettings, node_id: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = log_filter(settings)?;
    let logs = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    }
    .with_filter(filter);

    let provider = tracer_provider(settings, node_id)?;
    let traces = provider.as_ref().map(|provider| {
        let only_trace_spans =
            tracing_subscriber::filter::filter_fn(|metadata| metadata.target() == TRACE_TARGET);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("herald"))
            .with_filter(only_trace_spans)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// The OTLP endpoint from settings, else from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn endpoint(settings: &TelemetrySettings) -> Option<String> {
    settings
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|endpoint| !endpoint.is_empty())
}

fn tracer_provider(
    settings: &TelemetrySettings,
    node_id: &str,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = endpoint(settings) else {
        return Ok(None);
    };
    let headers: HashMap<String, String> = settings
        .otlp_headers
        .iter()
        .filter_map(|header| header.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let runtime = exporter::ExportRuntime::new().map_err(TelemetryError::ExporterRuntime)?;
    let built = {
        // The gRPC channel is set up inside the exporter's own runtime.
        let _entered = runtime.enter();
        match settings.otlp_protocol {
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(http_traces_url(&endpoint))
                .with_headers(headers)
                .with_timeout(Duration::from_secs(5))
                .build()
                .map(exporter::AnyExporter::Http),
            OtlpProtocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (key, value) in &headers {
                    if let (Ok(key), Ok(value)) = (
                        tonic::metadata::MetadataKey::from_bytes(key.to_lowercase().as_bytes()),
                        value.parse(),
                    ) {
                        metadata.insert(key, value);
                    }
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_metadata(metadata)
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map(exporter::AnyExporter::Grpc)
            }
        }
    }
    .map_err(TelemetryError::Exporter)?;
    let processor = BatchSpanProcessor::builder(exporter::OnOwnRuntime::new(built, runtime))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUED_SPANS)
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node_id.to_owned(),
        ))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build(),
    ))
}

/// `http://host:4318` → `http://host:4318/v1/traces`; a URL with a path is kept.
fn http_traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_endpoint_without_a_path_gets_the_traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("https://c/otlp/v1/traces"),
            "https://c/otlp/v1/traces"
        );
    }
}
