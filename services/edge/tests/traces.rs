//! One OpenTelemetry span per delivery, exported over OTLP/HTTP to a real
//! receiver that decodes the official OTLP protobuf, as a child of the
//! publisher's trace.

use herald_testkit::otlp::{Collector, attributes, hex};
use herald_testkit::{EdgeNode, PATIENCE, SseClient, publisher_token, wait_until};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A publish carrying a sampled `traceparent` — over HTTP, or as a header of a
/// plain NATS message — yields a delivery span in the same trace, with the
/// publisher's span as parent and the documented attributes; an unsampled
/// publish and an untraced one (ratio 0) yield none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_span_joins_the_publishers_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await.expect("collector");
    let telemetry = herald_config::TelemetrySettings {
        otlp_endpoint: Some(endpoint),
        sample_ratio: 0.0,
        user_id: herald_config::UserIdInTraces::Raw,
        log_level: "warn".into(),
        ..Default::default()
    };
    let guard = herald_telemetry::init(&telemetry, "trace-test-node").expect("telemetry");
    assert!(guard.exports_traces());

    let node = EdgeNode::start(|s| s.telemetry = telemetry.clone())
        .await
        .expect("node starts");
    let mut stream = SseClient::open(&node, "alice").await.expect("stream opens");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for traceparent in [
        Some(format!("00-{trace_id}-{parent_span}-01")),
        Some("00-11111111111111111111111111111111-2222222222222222-00".to_owned()),
        None,
    ] {
        let mut request = http
            .post(node.url("/v1/publish"))
            .bearer_auth(publisher_token())
            .body(r#"{"user":"alice","event":"update","data":"x"}"#);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let answer: serde_json::Value = request
            .send()
            .await
            .expect("published")
            .json()
            .await
            .expect("json");
        ids.push(answer["id"].as_str().expect("id").to_owned());
    }
    let received: Vec<String> = stream
        .events(3)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(received, ids);

    drop(stream);
    node.stop().await.expect("node stops");

    // The same through NATS: a plain NATS publisher's traceparent header.
    let nats = herald_testkit::nats::NatsServer::start().expect("nats-server");
    let nats_url = nats.url();
    let nats_node = EdgeNode::start(|s| {
        s.telemetry = telemetry.clone();
        s.bus.kind = herald_config::BusKind::Nats;
        s.nats.url = nats_url;
    })
    .await
    .expect("node on NATS");
    let mut bob = SseClient::open(&nats_node, "bob").await.expect("stream");
    let nats_trace = "0af7651916cd43dd8448eb211c80319c";
    let nats_parent = "b7ad6b7169203331";
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{nats_trace}-{nats_parent}-01").as_str(),
    );
    headers.insert("Herald-Event", "nats-update");
    js.publish_with_headers("herald.user.bob", headers, "from nats".into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    assert_eq!(
        bob.next_event(PATIENCE).await.expect("event").data,
        "from nats"
    );
    drop(bob);
    nats_node.stop().await.expect("node stops");
    // Dropping the guard flushes the batch exporter (it blocks, so not on a
    // runtime worker's critical path).
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .expect("flushed");
    wait_until("the delivery spans are exported", PATIENCE, || {
        collector.spans("herald.deliver").len() >= 2
    })
    .await
    .expect("exported");

    let spans = collector.spans("herald.deliver");
    assert_eq!(spans.len(), 2, "only the sampled publishes are traced");
    let via_nats = spans
        .iter()
        .find(|span| hex(&span.trace_id) == nats_trace)
        .expect("the NATS publisher's trace");
    assert_eq!(hex(&via_nats.parent_span_id), nats_parent);
    let attrs = attributes(via_nats);
    assert_eq!(
        attrs["herald.event_type"],
        Value::StringValue("nats-update".into())
    );
    assert_eq!(attrs["herald.user"], Value::StringValue("bob".into()));

    let span = spans
        .iter()
        .find(|span| hex(&span.trace_id) == trace_id)
        .expect("the HTTP publisher's trace");
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), parent_span);
    let attrs = attributes(span);
    let seq: u64 = ids[0]
        .rsplit('-')
        .next()
        .expect("seq")
        .parse()
        .expect("number");
    assert_eq!(attrs["herald.seq"], Value::IntValue(seq as i64));
    assert_eq!(attrs["herald.event_id"], Value::StringValue(ids[0].clone()));
    assert_eq!(attrs["herald.node"], Value::StringValue("test-node".into()));
    assert_eq!(
        attrs["herald.target_kind"],
        Value::StringValue("user".into())
    );
    assert_eq!(
        attrs["herald.event_type"],
        Value::StringValue("update".into())
    );
    assert_eq!(attrs["herald.user"], Value::StringValue("alice".into()));
    assert_eq!(attrs["herald.replayed"], Value::BoolValue(false));
    assert!(matches!(attrs["herald.connection"], Value::IntValue(c) if c > 0));
    assert!(matches!(attrs["herald.bytes"], Value::IntValue(b) if b > 0));
    assert!(matches!(attrs["herald.publish_to_write_ms"], Value::DoubleValue(ms) if ms >= 0.0));
    assert!(matches!(attrs["herald.queue_ms"], Value::DoubleValue(ms) if ms >= 0.0));
}
