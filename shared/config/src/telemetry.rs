//! `[telemetry]`: logs and traces ([`TelemetrySettings`], [`LogFormat`],
//! [`OtlpProtocol`], [`UserIdInTraces`]).

use crate::Secret;
use serde::{Deserialize, Serialize};

/// Log output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collector port 4317).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP protobuf over HTTP (collector port 4318, path `/v1/traces`). Default.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// How a user id appears in traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserIdInTraces {
    /// As is.
    Raw,
    /// A stable hash of it (default): correlate without exposing it.
    #[default]
    Hashed,
    /// Not recorded.
    Omitted,
}

/// Logs and traces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax; `RUST_LOG` wins when set. Default `info`.
    pub log_level: String,
    /// OTLP collector endpoint, e.g. `http://127.0.0.1:4318` (HTTP) or
    /// `http://127.0.0.1:4317` (gRPC). Unset (default): no traces are
    /// exported, unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`.
    pub otlp_protocol: OtlpProtocol,
    /// Extra headers sent to the collector, `key=value` each (comma-separated
    /// in the environment), e.g. an API key. Default: none.
    pub otlp_headers: Vec<String>,
    /// Share of deliveries traced when the publisher sent no trace context,
    /// 0.0 to 1.0; a publisher's sampled/unsampled decision is always followed
    /// (parent-based). Default 0.01.
    pub sample_ratio: f64,
    /// How user ids appear in spans and logs: `hashed` (default: keyed with
    /// `telemetry.user_id_key`, so a guessed id cannot be checked against
    /// them), `raw` or `omitted`.
    pub user_id: UserIdInTraces,
    /// The deployment's key for hashed user ids (any text, 16 bytes or
    /// more; give every node the same one so their logs agree). Default:
    /// derived from `gossip.secret` or else `auth.hs256_secret`; with
    /// neither, a key drawn at start-up (hashes then differ between nodes
    /// and restarts, and the node says so).
    pub user_id_key: Option<Secret>,
    /// `service.name` of the exported spans. Default `herald-edge`.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            otlp_headers: Vec::new(),
            sample_ratio: 0.01,
            user_id: UserIdInTraces::Hashed,
            user_id_key: None,
            service_name: "herald-edge".into(),
        }
    }
}

impl TelemetrySettings {
    /// The sample ratio and the collector headers.
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        if self
            .user_id_key
            .as_ref()
            .is_some_and(|key| key.expose().len() < 16)
        {
            problems.push("telemetry.user_id_key must be at least 16 bytes".into());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push("telemetry.sample_ratio must be between 0.0 and 1.0".into());
        }
        for header in &self.otlp_headers {
            let key = header.split_once('=').map(|(key, _)| key.trim());
            if key.is_none_or(str::is_empty) {
                problems.push(format!(
                    "telemetry.otlp_headers: {header:?} is not key=value"
                ));
            }
        }
    }
}
