//! Runs span export on a Tokio runtime of its own.
//!
//! The SDK's batch processor exports from a plain OS thread, but the OTLP
//! transports (hyper for HTTP, tonic for gRPC) need a Tokio reactor. Exporting
//! through the node's runtime would tie telemetry to delivery; a small
//! dedicated current-thread runtime keeps them apart.

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// A current-thread runtime used only for exporting.
#[derive(Debug)]
pub struct ExportRuntime(tokio::runtime::Runtime);

impl ExportRuntime {
    /// Builds the runtime.
    pub fn new() -> std::io::Result<Self> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("herald-otlp")
            .build()
            .map(ExportRuntime)
    }

    /// Enters the runtime's context (to build clients that need one).
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.0.enter()
    }
}

/// The exporter for the configured protocol.
#[derive(Debug)]
pub enum AnyExporter {
    /// OTLP/HTTP protobuf.
    Http(opentelemetry_otlp::SpanExporter),
    /// OTLP/gRPC.
    Grpc(opentelemetry_otlp::SpanExporter),
}

impl AnyExporter {
    fn inner(&self) -> &opentelemetry_otlp::SpanExporter {
        match self {
            AnyExporter::Http(exporter) | AnyExporter::Grpc(exporter) => exporter,
        }
    }
}

/// An exporter whose calls are driven to completion on an [`ExportRuntime`].
#[derive(Debug)]
pub struct OnOwnRuntime {
    exporter: AnyExporter,
    runtime: ExportRuntime,
}

impl OnOwnRuntime {
    /// Wraps `exporter`.
    pub fn new(exporter: AnyExporter, runtime: ExportRuntime) -> Self {
        OnOwnRuntime { exporter, runtime }
    }
}

impl SpanExporter for OnOwnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread, never inside a runtime.
        let result = self.runtime.0.block_on(self.exporter.inner().export(batch));
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.exporter.inner().shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.inner().force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        match &mut self.exporter {
            AnyExporter::Http(exporter) | AnyExporter::Grpc(exporter) => {
                exporter.set_resource(resource)
            }
        }
    }
}
