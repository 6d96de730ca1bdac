//! Matrix row 14, the version guard: a node refuses to start on a nats-server
//! older than 2.10 (a real 2.9.10, which lacks the multi-filter consumers
//! Herald relies on), says why, and leaves nothing on that server.
//!
//! The 2.9 server is found in `HERALD_NATS_SERVER_2_9`, else in the
//! repository's `bin/nats-2.9/` (`make test-deps` installs it there).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use herald_testkit::nats::NatsServer;
use herald_testkit::process;

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

fn nats_server_2_9() -> PathBuf {
    let path = std::env::var_os("HERALD_NATS_SERVER_2_9")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bin/nats-2.9/nats-server")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `make test-deps` (installs nats-server 2.9.10 there)",
        path.display()
    );
    path
}

#[tokio::test]
async fn a_node_refuses_to_start_on_nats_server_2_9_and_creates_nothing_there() {
    let nats = NatsServer::start_binary(&nats_server_2_9()).expect("nats-server 2.9");
    let url = nats.url();
    let (mut command, _) = process::command(
        EDGE.as_ref(),
        &[("HERALD__BUS__KIND", "nats"), ("HERALD__NATS__URL", &url)],
    )
    .expect("command");
    let mut edge = command.stderr(Stdio::piped()).spawn().expect("herald-edge");

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = edge.try_wait().expect("status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = edge.kill();
            panic!("herald-edge kept running against nats-server 2.9.10");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut edge.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(
        !status.success(),
        "a refused start exits non-zero: {status}"
    );
    assert!(
        stderr.contains("nats-server 2.9.10 is too old") && stderr.contains("2.10 or newer"),
        "the error names the server's version and the one needed: {stderr}"
    );

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    assert!(
        js.get_stream("HERALD").await.is_err(),
        "no stream was created on the refused server"
    );
}
