//! A real OTLP/HTTP trace receiver for tests: accepts `POST /v1/traces`,
//! decodes the official OTLP protobuf, and keeps every span.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Spans received so far.
#[derive(Debug, Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<Span>>>);

impl Collector {
    /// Serves on an ephemeral loopback port; returns its base URL.
    pub async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::clone(&self.0);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let spans = Arc::clone(&spans);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let spans = Arc::clone(&spans);
                            async move {
                                let status = if request.uri().path() == "/v1/traces" {
                                    200
                                } else {
                                    404
                                };
                                let body = request.into_body().collect().await?.to_bytes();
                                if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                                    if let Ok(mut spans) = spans.lock() {
                                        for resource in export.resource_spans {
                                            for scope in resource.scope_spans {
                                                spans.extend(scope.spans);
                                            }
                                        }
                                    }
                                }
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status).unwrap_or_default();
                                Ok::<_, hyper::Error>(response)
                            }
                        },
                    );
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// Every span received with this name.
    pub fn spans(&self, name: &str) -> Vec<Span> {
        self.0
            .lock()
            .map(|spans| spans.iter().filter(|s| s.name == name).cloned().collect())
            .unwrap_or_default()
    }
}

/// A span's attributes by key.
pub fn attributes(span: &Span) -> HashMap<String, Value> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?)))
        .collect()
}

/// Lowercase hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
