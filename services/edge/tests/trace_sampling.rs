//! With `telemetry.sample_ratio = 1.0`, streams without a publisher trace are
//! traced too: the delivery starts a root trace, and the stream's open, replay
//! and close each get a span. (A test binary of its own: the global telemetry
//! subscriber is installed once per process.)

use herald_testkit::otlp::{Collector, attributes};
use herald_testkit::{
    EdgeNode, PATIENCE, SseClient, publish_to_user, subscriber_token, wait_until,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// Every stream event of a fully sampled node is traced, and user ids are
/// hashed by default (the raw id appears in no span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fully_sampled_node_traces_open_replay_delivery_and_close() {
    let collector = Collector::default();
    let telemetry = herald_config::TelemetrySettings {
        otlp_endpoint: Some(collector.start().await.expect("collector")),
        sample_ratio: 1.0,
        log_level: "warn".into(),
        ..Default::default()
    };
    let guard = herald_telemetry::init(&telemetry, "sampling-node").expect("telemetry");
    let node = EdgeNode::start(|s| s.telemetry = telemetry.clone())
        .await
        .expect("node");

    let mut first = SseClient::open(&node, "alice").await.expect("stream");
    let id = publish_to_user(&node, "alice", "one")
        .await
        .expect("published");
    assert_eq!(first.next_event(PATIENCE).await.expect("event").id, id);
    drop(first);
    publish_to_user(&node, "alice", "two")
        .await
        .expect("published");
    let token = subscriber_token("alice", &[]);
    let mut resumed = SseClient::connect(
        &node.url("/v1/stream"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("last-event-id", &id),
        ],
    )
    .await
    .expect("stream");
    assert_eq!(
        resumed.next_event(PATIENCE).await.expect("replayed").data,
        "two"
    );
    drop(resumed);
    node.stop().await.expect("node stops");
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .expect("flushed");

    wait_until("the spans are exported", PATIENCE, || {
        collector.spans("herald.stream.close").len() >= 2
    })
    .await
    .expect("exported");
    assert_eq!(collector.spans("herald.stream.open").len(), 2);
    let replays = collector.spans("herald.replay");
    assert_eq!(replays.len(), 1);
    assert_eq!(attributes(&replays[0])["herald.events"], Value::IntValue(1));
    let deliveries = collector.spans("herald.deliver");
    assert_eq!(deliveries.len(), 2, "one live delivery, one replayed");
    for span in &deliveries {
        assert!(
            span.parent_span_id.is_empty(),
            "root traces without a publisher context"
        );
        let user = attributes(span)["herald.user"].clone();
        assert!(
            matches!(user, Value::StringValue(ref hashed) if hashed.len() == 16 && hashed != "alice")
        );
    }
}
