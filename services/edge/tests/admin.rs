//! The admin listener (`admin.listen`): metrics, the cluster view and the
//! health probes are served there and nowhere else. The public listener
//! answers those paths with the same JSON 404 as any unknown path, so what
//! the internet reaches never shows node ids, addresses or load; the admin
//! listener serves no streams, publishes or presence.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use herald_testkit::{EdgeNode, PATIENCE, SseClient, process, publisher_token, subscriber_token};
use serde_json::Value;

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

/// The operators' paths.
const ADMIN_PATHS: [&str; 4] = ["/metrics", "/v1/cluster", "/healthz", "/readyz"];

/// `GET url`: status, content type and body.
async fn get(url: &str) -> (u16, String, String) {
    let response = reqwest::get(url).await.expect("answered");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

/// On the public port `/metrics`, `/v1/cluster`, `/healthz` and `/readyz`
/// answer 404 with the JSON error of an unknown path; on the admin port they
/// answer as documented: Prometheus text, the cluster view naming this node,
/// alive and ready.
#[tokio::test]
async fn operator_paths_answer_on_the_admin_listener_and_404_on_the_public_one() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    assert_ne!(node.addr, node.admin_addr);

    for path in ADMIN_PATHS {
        let (status, content_type, body) = get(&node.url(path)).await;
        assert_eq!(status, 404, "public {path}: {body}");
        assert!(content_type.starts_with("application/json"), "{path}");
        let body: Value = serde_json::from_str(&body).expect("json error");
        assert_eq!(body["error"], "not_found", "public {path}: {body}");
    }

    let (status, content_type, metrics) = get(&node.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("herald_connections_open ")),
        "{metrics}"
    );

    let (status, _, cluster) = get(&node.admin_url("/v1/cluster")).await;
    assert_eq!(status, 200);
    let cluster: Value = serde_json::from_str(&cluster).expect("cluster json");
    let members = cluster["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{cluster}");
    assert_eq!(members[0]["id"], "test-node");
    assert_eq!(members[0]["http"], format!("http://{}", node.addr));

    let (status, _, healthz) = get(&node.admin_url("/healthz")).await;
    assert_eq!((status, healthz.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, _, readyz) = get(&node.admin_url("/readyz")).await;
    assert_eq!((status, readyz.as_str()), (200, r#"{"status":"ready"}"#));
}

/// The admin listener is not a second way in: a stream with a valid token, a
/// publish with a valid credential and a presence question all get 404 there
/// (and the event is not published).
#[tokio::test]
async fn the_admin_listener_serves_no_streams_publishes_or_presence() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let http = reqwest::Client::new();

    let stream = http
        .get(node.admin_url("/v1/stream"))
        .bearer_auth(subscriber_token("alice", &[]))
        .send()
        .await
        .expect("answered");
    assert_eq!(stream.status().as_u16(), 404);
    let body: Value = stream.json().await.expect("json error");
    assert_eq!(body["error"], "not_found");

    let publish = http
        .post(node.admin_url("/v1/publish"))
        .bearer_auth(publisher_token())
        .header("content-type", "application/json")
        .body(r#"{"user":"alice","data":"through the back door"}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(publish.status().as_u16(), 404);

    let presence = http
        .get(node.admin_url("/v1/presence/alice"))
        .bearer_auth(publisher_token())
        .send()
        .await
        .expect("answered");
    assert_eq!(presence.status().as_u16(), 404);

    // Nothing was published: alice's first event on the public port is the
    // one published there.
    let mut alice = SseClient::open(&node, "alice").await.expect("stream");
    herald_testkit::publish_to_user(&node, "alice", "front door")
        .await
        .expect("publish");
    let event = alice.next_event(PATIENCE).await.expect("event");
    assert_eq!(event.data, "front door");
}

/// While the node drains, the admin listener keeps answering: `/readyz` says
/// 503 with the reason `draining` (load balancers stop sending streams) and
/// `/healthz` stays 200 (the process must not be restarted mid-drain).
#[tokio::test]
async fn while_draining_the_admin_readyz_answers_503_and_healthz_200() {
    let node = EdgeNode::start(|s| s.stream.drain_ms = 3_000)
        .await
        .expect("node starts");
    // Open streams keep the node in its drain window: each ends at a random
    // moment within it, and the node stops only when the last has ended.
    let open = SseClient::open_many(&node, 5).await.expect("streams");
    let readyz = node.admin_url("/readyz");
    let healthz = node.admin_url("/healthz");
    let stopping = tokio::spawn(node.stop());

    let deadline = Instant::now() + PATIENCE;
    let (status, body) = loop {
        let (status, _, body) = get(&readyz).await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["status"], "unready");
    assert!(
        body["reasons"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r == "draining")),
        "{body}"
    );
    let (status, _, _) = get(&healthz).await;
    assert_eq!(status, 200, "alive while draining");

    for mut client in open {
        client.until_end(PATIENCE).await.expect("the stream ends");
    }
    stopping.await.expect("joined").expect("node stops");
    assert!(
        reqwest::get(&readyz).await.is_err(),
        "the admin listener closes with the node"
    );
}

/// A node whose admin port is taken does not start, and says which setting
/// names the address, so the operator knows which port to change.
#[tokio::test]
async fn a_taken_admin_port_stops_the_start_naming_admin_listen() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let err = EdgeNode::start(|s| s.admin.listen = addr.clone())
        .await
        .expect_err("the port is taken");
    let message = format!("{err:#}");
    assert!(message.contains("admin.listen"), "{message}");
    assert!(message.contains(&addr), "{message}");
}

/// `admin.listen` with port 0 (several nodes on one machine): the real binary
/// picks a free port and names it in its `listening` log line, where a tool
/// finds it; `/metrics` answers there.
#[tokio::test]
async fn a_node_given_admin_port_0_logs_the_admin_address_it_bound() {
    let (mut command, listeners) = process::command(
        EDGE.as_ref(),
        &[
            ("HERALD__ADMIN__LISTEN", "127.0.0.1:0"),
            ("HERALD__TELEMETRY__LOG_FORMAT", "json"),
            ("RUST_LOG", "info"),
        ],
    )
    .expect("command");
    // Logs go to standard output.
    let mut child = Running(command.stdout(Stdio::piped()).spawn().expect("herald-edge"));
    let logs = child.0.stdout.take().expect("stdout");
    let (found, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(logs).lines().map_while(Result::ok) {
            if found.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("a listening line in time");
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if record["message"] == "herald edge node listening" {
            break record;
        }
    };
    assert_eq!(listening["addr"], listeners.http.as_str());
    let admin = listening["admin"].as_str().expect("admin address logged");
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");
    assert_ne!(
        admin, "127.0.0.1:0",
        "the bound port, not the configured one"
    );

    let (status, _, metrics) = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("herald_connections_open"), "{metrics}");
}

/// A child process killed when the test ends, passed or failed.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
