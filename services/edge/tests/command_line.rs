//! The `herald-edge` command line, run as the real binary: `--help` and
//! `--version`, `check-config` on good and bad files, and `token` minting
//! credentials a running node accepts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use herald_testkit::{EdgeNode, PATIENCE, SECRET, SseClient};
use serde_json::json;

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

/// Runs the binary with `args` and exactly the environment `env` (nothing
/// inherited, so a `HERALD__*` variable of the test runner cannot leak in).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(EDGE)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("herald-edge runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A directory of its own for one test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("herald-command-line-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// `--help` and `--version` print on stdout and exit 0 (a script piping
/// `herald-edge --help | less` gets the text); the help names every command.
#[test]
fn help_and_version_print_on_stdout_and_exit_0() {
    let help = run(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0), "{}", stderr(&help));
    let text = stdout(&help);
    for expected in [
        "Usage: herald-edge",
        "serve",
        "token",
        "check-config",
        "--config",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
    assert!(help.stderr.is_empty(), "{}", stderr(&help));

    let version = run(&["--version"], &[]);
    assert_eq!(version.status.code(), Some(0), "{}", stderr(&version));
    assert_eq!(
        stdout(&version).trim(),
        format!("herald-edge {}", env!("CARGO_PKG_VERSION"))
    );

    let token_help = run(&["token", "--help"], &[]);
    assert_eq!(token_help.status.code(), Some(0));
    assert!(
        stdout(&token_help).contains("--publish-to"),
        "{}",
        stdout(&token_help)
    );
}

/// An argument the binary does not know is a usage error: status 64 and a
/// message on stderr naming it, nothing on stdout (a script capturing a token
/// never captures an error message instead).
#[test]
fn an_unknown_argument_is_refused_with_status_64_on_stderr() {
    let output = run(&["token", "--usr", "alice"], &[]);
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("--usr"), "{}", stderr(&output));
    assert!(output.stdout.is_empty(), "{}", stdout(&output));
}

/// A valid file passes `check-config` with status 0.
#[test]
fn check_config_accepts_a_valid_file() {
    let dir = TempDir::new("valid");
    let file = dir.file(
        "herald.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:8080\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
             [bus]\nkind = \"nats\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n"
        ),
    );
    let output = run(&["check-config", path(&file)], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("valid"), "{}", stdout(&output));
}

/// A file with many problems — an unknown section, an unknown key, a value of
/// the wrong type, broken rules — plus a bad value in the environment (which
/// overlays the file as it does for `serve`): `check-config` names every one
/// of them, not only the first, and exits 64.
#[test]
fn check_config_names_every_problem_of_a_file_and_the_environment() {
    let dir = TempDir::new("invalid");
    let file = dir.file(
        "herald.toml",
        "[htp]\nlisten = \"127.0.0.1:8080\"\n\
         [http]\nmax_body_bytez = 10\nheader_read_timeout_ms = \"soon\"\n\
         [stream]\nqueue_capacity = 0\n\
         [auth]\nhs256_secret = \"short\"\n",
    );
    let output = run(
        &["check-config", path(&file)],
        &[("HERALD__GOSSIP__SEEDS", "edge-1")],
    );
    assert_eq!(output.status.code(), Some(64), "{}", stdout(&output));
    let report = stderr(&output);
    for expected in [
        "htp",
        "max_body_bytez",
        "http.header_read_timeout_ms",
        "stream.queue_capacity",
        "auth.hs256_secret",
        "gossip.seeds",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} not named in:\n{report}"
        );
    }
    assert!(report.contains("6 problems"), "{report}");
}

/// `check-config` finds what otherwise only start-up finds: it reads the
/// key files the configuration names (a public key file that exists but
/// holds no key is a problem) and parses the log filter.
#[test]
fn check_config_finds_unusable_key_files_and_log_filters_as_start_up_would() {
    let dir = TempDir::new("keys");
    let not_a_key = dir.file("not-a-key.pem", "hello\n");
    let file = dir.file(
        "herald.toml",
        &format!(
            "[auth]\nalgorithms = [\"RS256\"]\npublic_key_file = \"{}\"\n\
             [telemetry]\nlog_level = \"herald=loud\"\n",
            path(&not_a_key)
        ),
    );
    let output = run(&["check-config", path(&file)], &[]);
    assert_eq!(output.status.code(), Some(64), "{}", stdout(&output));
    let report = stderr(&output);
    assert!(report.contains("auth.public_key_file"), "{report}");
    assert!(report.contains("herald=loud"), "{report}");
}

/// `token` mints credentials a node with the same secret accepts: the
/// subscriber token opens the user's stream, the publisher credential
/// (limited to that user) publishes an event the stream then delivers.
/// `--config` works after the command as it did before clap.
#[tokio::test]
async fn minted_tokens_open_a_stream_and_publish_to_it_on_a_running_node() {
    let node = EdgeNode::start(|_| {}).await.expect("node");
    let dir = TempDir::new("token");
    let file = dir.file(
        "herald.toml",
        &format!("[auth]\nhs256_secret = \"{SECRET}\"\n"),
    );
    let subscriber = run(
        &[
            "token",
            "--user",
            "alice",
            "--ttl",
            "600",
            "--config",
            path(&file),
        ],
        &[],
    );
    assert_eq!(subscriber.status.code(), Some(0), "{}", stderr(&subscriber));
    let publisher = run(
        &["token", "--publish-to", "user:alice"],
        &[("HERALD__AUTH__HS256_SECRET", SECRET)],
    );
    assert_eq!(publisher.status.code(), Some(0), "{}", stderr(&publisher));

    let bearer = format!("Bearer {}", stdout(&subscriber).trim());
    let mut stream = SseClient::connect(&node.url("/v1/stream"), &[("authorization", &bearer)])
        .await
        .expect("stream");
    assert_eq!(stream.status, 200);
    let credential = stdout(&publisher).trim().to_owned();
    let publish = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(node.url("/v1/publish"))
            .bearer_auth(&credential)
            .json(&body)
            .send()
    };
    let response = publish(json!({"user": "alice", "data": "minted"}))
        .await
        .expect("publish");
    assert_eq!(response.status().as_u16(), 200);
    let event = stream.next_event(PATIENCE).await.expect("event");
    assert_eq!(event.data, "minted");

    let elsewhere = publish(json!({"user": "bob", "data": "not allowed"}))
        .await
        .expect("publish");
    assert_eq!(
        elsewhere.status().as_u16(),
        403,
        "--publish-to limits the credential to its targets"
    );
}
