//! Guarantees checked with a client we did not write: the npm `eventsource`
//! package (WHATWG-conformant EventSource for Node), installed by
//! `make sse-clients` into `tools/sse-clients`.

use std::path::PathBuf;
use std::process::Stdio;

use herald_testkit::proxy::TcpProxy;
use herald_testkit::{EdgeNode, PATIENCE, publish, subscriber_token};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The folder holding the npm clients (`HERALD_SSE_CLIENTS`, set by the Makefile).
fn clients_dir() -> PathBuf {
    let dir = std::env::var_os("HERALD_SSE_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/sse-clients")
        });
    assert!(
        dir.join("node_modules/eventsource").is_dir(),
        "the npm eventsource client is not installed in {}: run `make sse-clients`",
        dir.display()
    );
    dir
}

/// The Node script `eventsource-client.mjs`, and what it printed so far.
struct NodeClient {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// `{"status":"open"}` lines seen: one per (re)connection.
    opens: usize,
}

impl NodeClient {
    fn spawn(url: &str, count: usize, types: &[&str]) -> NodeClient {
        let dir = clients_dir();
        let mut child = Command::new("node")
            .arg(dir.join("eventsource-client.mjs"))
            .arg(url)
            .arg(count.to_string())
            .arg("30000")
            .args(types)
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let stdout = child.stdout.take().expect("piped stdout");
        NodeClient {
            child,
            lines: BufReader::new(stdout).lines(),
            opens: 0,
        }
    }

    /// The next JSON line the client printed.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("the client reports in time")
            .expect("readable stdout")
            .expect("the client is still running");
        let line: Value = serde_json::from_str(&line).expect("a JSON line");
        if line["status"] == "open" {
            self.opens += 1;
        }
        line
    }

    /// Reads lines until one matches, returning the events seen on the way.
    async fn until(&mut self, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let line = self.next().await;
            if line.get("id").is_some() {
                events.push(line.clone());
            }
            if done(&line) {
                return events;
            }
        }
    }
}

/// Publishes `data` to alice, typed when `event` is given; returns the event
/// as the client must report it.
async fn publish_event(node: &EdgeNode, event: Option<&str>, data: &str) -> Value {
    let mut body = json!({"user": "alice", "data": data});
    if let Some(event) = event {
        body["event"] = json!(event);
    }
    let (status, body) = publish(node, body).await.expect("publish");
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id");
    json!({"type": event.unwrap_or("message"), "id": id, "data": data})
}

/// The npm `eventsource` client receives typed, untyped and multi-line
/// events; when the network drops its connection it reconnects by itself
/// (a second `open`) with `Last-Event-ID`, the events published while it was
/// away come back through the replay, and across the whole run it receives
/// every published event exactly once, in order, with its type and data.
#[tokio::test]
async fn the_npm_eventsource_client_resumes_after_a_dropped_connection_without_loss() {
    let node = EdgeNode::start(|settings| {
        settings.stream.retry_ms = 100;
        settings.stream.retry_jitter_ms = 100;
    })
    .await
    .expect("node starts");
    let proxy = TcpProxy::start(node.addr).await.expect("proxy");
    let token = subscriber_token("alice", &[]);
    let url = format!("http://{}/v1/stream?access_token={token}", proxy.addr());
    let mut client = NodeClient::spawn(&url, 6, &["greeting"]);
    client.until(|line| line["status"] == "open").await;

    let mut published = vec![
        publish_event(&node, Some("greeting"), "first").await,
        publish_event(&node, None, "second\nwith two lines").await,
        publish_event(&node, Some("greeting"), "third").await,
    ];
    let last = published[2]["id"].clone();
    let mut received = client.until(|line| line["id"] == last).await;

    // The network drops, and stays down until the events below are stored:
    // the client's reconnect attempt is held by the proxy, not timed.
    proxy.hold();
    proxy.cut_all();
    client.until(|line| line["status"] == "error").await;
    herald_testkit::wait_until("the client tries to reconnect", PATIENCE, || {
        proxy.held() == 1
    })
    .await
    .expect("the client reconnects by itself");
    published.push(publish_event(&node, Some("greeting"), "fourth").await);
    published.push(publish_event(&node, None, "fifth\n\nafter a blank line").await);
    published.push(publish_event(&node, Some("greeting"), "sixth").await);
    proxy.release();
    let last = published[5]["id"].clone();
    received.extend(client.until(|line| line["id"] == last).await);

    assert_eq!(received, published);
    assert_eq!(client.opens, 2, "one connection, one reconnection");
    let metrics = node.handle.metrics_text();
    for expected in ["herald_replays_total 1", "herald_replayed_events_total 3"] {
        assert!(
            metrics.lines().any(|line| line == expected),
            "the missed events came from one Last-Event-ID replay: {expected}\n{metrics}"
        );
    }
    let status = client.child.wait().await.expect("client exits");
    assert!(status.success());
}

/// A publisher written in another language (the Node `nats` client) needs only
/// the documented subject rule and headers: its event, for a user id that is
/// not a plain name, arrives typed on that user's SSE stream, and its retry
/// with the same `Nats-Msg-Id` is not delivered twice.
#[tokio::test]
async fn a_node_nats_client_publishes_to_a_stream() {
    let nats = herald_testkit::nats::NatsServer::start().expect("nats-server");
    let url = nats.url();
    let node = EdgeNode::start(move |s| {
        s.bus.kind = herald_config::BusKind::Nats;
        s.nats.url = url;
    })
    .await
    .expect("node starts");
    let user = "jürgen.müller@example.com";
    let token = subscriber_token(user, &[]);
    let mut stream = herald_testkit::SseClient::connect(
        &node.url("/v1/stream"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("stream");
    let dir = clients_dir();
    let mut acks = Vec::new();
    for _ in 0..2 {
        let output = Command::new("node")
            .arg(dir.join("nats-publish.mjs"))
            .args([
                nats.url().as_str(),
                user,
                "invoice.paid",
                "{\"amount\":42}",
                "invoice-7",
            ])
            .current_dir(&dir)
            .output()
            .await
            .expect("node runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        acks.push(serde_json::from_slice::<Value>(&output.stdout).expect("ack json"));
    }
    assert_eq!(acks[1]["duplicate"], true);
    let event = stream.next_event(PATIENCE).await.expect("event");
    assert_eq!(event.event_type, "invoice.paid");
    assert_eq!(event.data, "{\"amount\":42}");
    assert!(
        event.id.ends_with(&format!("-{}", acks[0]["seq"])),
        "{} vs {}",
        event.id,
        acks[0]
    );
}
