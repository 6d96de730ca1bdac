//! Real `nats-server` processes for tests, killed on drop.
//!
//! The binary is found in `HERALD_NATS_SERVER` (the Makefile points it at the
//! repository's `bin/nats-server`), else `<workspace>/bin/nats-server`, else on
//! `PATH`. Run `make nats-server` to install the pinned version.
//!
//! A server counts as started only once the port answers with the server's
//! own name, and a cluster only once every member lists all the others: a
//! port someone else answers on, or a member that died at start, fails the
//! start (which picks fresh ports and tries again) instead of leaving a test
//! waiting on a cluster that can never place a replicated stream.

use std::hash::{BuildHasher, RandomState};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How many times a start that lost its ports is tried on fresh ones.
const START_ATTEMPTS: usize = 3;

/// One JetStream-enabled nats-server on loopback.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    name: String,
    port: u16,
    store: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_NATS_SERVER") {
        // Asked for by name (`make test-nats-oldest`): another server in its
        // place would make a run against one version pass as another.
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "HERALD_NATS_SERVER={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    found.context(
        "nats-server not found: run `make nats-server` (installs the pinned version into bin/)",
    )
}

/// The lowest port [`free_port`] hands out.
const FIRST_TEST_PORT: u32 = 10_000;

/// A loopback port that no socket holds (TCP or UDP), for a process about to
/// bind it.
///
/// Binding port 0 and releasing it would race with everything else that asks
/// the kernel for an ephemeral port (the local port of every outgoing
/// connection, another test's pick) between the pick and the bind. Ports come
/// instead from a sequence below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), starting at a random point in each
/// process, so the kernel never hands them out and this process never hands
/// out one twice (until the sequence wraps).
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    let (start, span) = *RANGE.get_or_init(|| {
        let end = ephemeral_start().max(FIRST_TEST_PORT + 1_000);
        let span = end - FIRST_TEST_PORT;
        let offset = (RandomState::new().hash_one(std::process::id()) % u64::from(span)) as u32;
        (offset, span)
    });
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST_TEST_PORT + (start + step) % span) as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST_TEST_PORT} and the ephemeral range")
}

/// The first port of the kernel's ephemeral range (32768 if unreadable).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// What a server says about itself in the `INFO` line it greets clients with.
#[derive(Debug)]
struct Greeting {
    name: String,
    /// The client URLs of every server in its cluster (itself included).
    cluster: Vec<String>,
}

/// Reads the `INFO` line the server on `port` greets a new connection with.
fn greeting(port: u16) -> anyhow::Result<Greeting> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let info = line
        .strip_prefix("INFO ")
        .with_context(|| format!("port {port} did not greet like a NATS server: {line:?}"))?;
    let info: serde_json::Value = serde_json::from_str(info.trim())?;
    let urls = info["connect_urls"].as_array().cloned().unwrap_or_default();
    Ok(Greeting {
        name: info["server_name"].as_str().unwrap_or_default().to_owned(),
        cluster: urls
            .iter()
            .filter_map(|url| url.as_str().map(str::to_owned))
            .collect(),
    })
}

/// A name no other server on this machine has: the process and a port of ours.
fn unique_name(prefix: &str, port: u16) -> String {
    format!("{prefix}-{}-{port}", std::process::id())
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and a fresh store.
    pub fn start() -> anyhow::Result<NatsServer> {
        Self::start_binary(&binary()?)
    }

    /// Starts `binary` (another server version) like [`NatsServer::start`].
    pub fn start_binary(binary: &Path) -> anyhow::Result<NatsServer> {
        retry_start(|| {
            let port = free_port()?;
            Self::start_on(binary, unique_name("herald-test", port), port, &[])
        })
    }

    /// Starts `binary` named `name` on `port` with extra command-line
    /// arguments, once.
    fn start_on(
        binary: &Path,
        name: String,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<NatsServer> {
        let store = std::env::temp_dir().join(format!("herald-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&store)?;
        let mut server = NatsServer {
            binary: binary.to_owned(),
            name,
            port,
            store,
            args: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-n",
                &self.name,
                "-sd",
            ])
            .arg(&self.store)
            .arg("-l")
            .arg(self.log_path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        self.wait_answering()
    }

    /// Waits until the port answers with this server's name; fails at once if
    /// the process exits (a port or store it could not take).
    fn wait_answering(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("nats-server {} exited at start ({status})", self.name);
                }
            }
            match greeting(self.port) {
                Ok(greeting) if greeting.name == self.name => return Ok(()),
                Ok(greeting) => last = Some(format!("answered by {:?}", greeting.name)),
                Err(err) => last = Some(err.to_string()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "nats-server {} did not answer on port {} within 10 s (last: {})",
            self.name,
            self.port,
            last.unwrap_or_default()
        )
    }

    /// `nats://127.0.0.1:<port>`.
    /// The running server's process id (`None` once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); its store stays for [`NatsServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Stops the server, copies its store aside and starts it again; a later
    /// [`NatsServer::rewind`] puts the copy back.
    pub fn copy_store(&mut self) -> anyhow::Result<()> {
        self.kill();
        let copy = self.store_copy();
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(&self.store, &copy)?;
        self.spawn()
    }

    /// Kills the server and restarts it from the copy [`NatsServer::copy_store`]
    /// made: every event stored since is gone, acknowledged or not, as when
    /// writes are lost or a store is restored from an older backup.
    pub fn rewind(&mut self) -> anyhow::Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.store)?;
        std::fs::rename(self.store_copy(), &self.store)
            .context("no copy of the store to rewind to")?;
        self.spawn()
    }

    fn log_path(&self) -> PathBuf {
        self.store.with_extension("log")
    }

    /// The last `lines` lines of the server's log (for a failing test's
    /// message; the log goes when the server is dropped).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn store_copy(&self) -> PathBuf {
        self.store.with_extension("copy")
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
        let _ = std::fs::remove_dir_all(self.store_copy());
        let _ = std::fs::remove_file(self.log_path());
    }
}

/// Three JetStream servers clustered on loopback, for replicated streams.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, in start order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other as a cluster of their own
    /// (its name is unique, so no stray server can join it), and waits until
    /// every member lists all the others.
    pub fn start(size: usize) -> anyhow::Result<NatsCluster> {
        retry_start(|| Self::start_once(size))
    }

    fn start_once(size: usize) -> anyhow::Result<NatsCluster> {
        let binary = binary()?;
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_, _>>()?;
        let cluster_name = unique_name("herald-test-cluster", cluster_ports[0]);
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::with_capacity(size);
        for (index, cluster_port) in cluster_ports.iter().enumerate() {
            let listen = format!("nats://127.0.0.1:{cluster_port}");
            servers.push(NatsServer::start_on(
                &binary,
                format!("n{index}"),
                free_port()?,
                &[
                    "--cluster_name",
                    &cluster_name,
                    "--cluster",
                    &listen,
                    "--routes",
                    &routes,
                ],
            )?);
        }
        let cluster = NatsCluster { servers };
        cluster.wait_formed()?;
        Ok(cluster)
    }

    /// Waits until every member's greeting lists exactly the cluster's members.
    fn wait_formed(&self) -> anyhow::Result<()> {
        let mut members: Vec<String> = self
            .servers
            .iter()
            .map(|server| format!("127.0.0.1:{}", server.port))
            .collect();
        members.sort();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.unformed(&members)? {
                None => return Ok(()),
                Some(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the NATS cluster {members:?} did not form within 20 s ({last})")
    }

    /// The first member whose greeting does not list exactly `members`
    /// (sorted), and what it lists; `None` once the cluster has formed.
    fn unformed(&self, members: &[String]) -> anyhow::Result<Option<String>> {
        for server in &self.servers {
            let mut listed = greeting(server.port)?.cluster;
            listed.sort();
            if listed != members {
                return Ok(Some(format!("{} lists {listed:?}", server.name)));
            }
        }
        Ok(None)
    }

    /// Each member's last `lines` log lines, headed by its name.
    pub fn log_tails(&self, lines: usize) -> String {
        self.servers
            .iter()
            .map(|server| format!("--- {} ---\n{}", server.name, server.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every server's URL, comma-separated (as `nats.url` takes them).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Runs a start up to [`START_ATTEMPTS`] times: each attempt picks fresh ports,
/// so one that lost a port to another process succeeds on the next.
fn retry_start<T>(mut start: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Ok(started) => return Ok(started),
            Err(err) if attempt < START_ATTEMPTS => {
                eprintln!("nats-server start failed ({err:#}); retrying on fresh ports");
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Publishes `data` to `subject` through `js` and waits until JetStream has
/// stored it; returns its stream sequence.
pub async fn store(js: &async_nats::jetstream::Context, subject: &str, data: &str) -> u64 {
    js.publish(subject.to_owned(), data.to_owned().into())
        .await
        .expect("sent")
        .await
        .expect("stored")
        .sequence
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_handed_out_once_and_never_from_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().expect("port")).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let ephemeral = ephemeral_start();
        assert!(
            ports
                .iter()
                .all(|&p| u32::from(p) >= FIRST_TEST_PORT && u32::from(p) < ephemeral)
        );
    }

    #[test]
    fn a_server_whose_port_another_server_answers_on_fails_to_start() {
        let first = NatsServer::start().expect("nats-server");
        let err = NatsServer::start_on(
            &binary().expect("binary"),
            "intruder".into(),
            first.port,
            &[],
        )
        .expect_err("the port is taken");
        assert!(
            err.to_string().contains("intruder"),
            "the error names the server that did not start: {err:#}"
        );
    }

    #[test]
    fn a_cluster_starts_only_once_every_member_lists_the_others() {
        let cluster = NatsCluster::start(3).expect("cluster");
        let urls: Vec<String> = cluster
            .servers
            .iter()
            .map(|server| format!("127.0.0.1:{}", server.port))
            .collect();
        for server in &cluster.servers {
            let mut listed = greeting(server.port).expect("greeting").cluster;
            listed.sort();
            let mut wanted = urls.clone();
            wanted.sort();
            assert_eq!(listed, wanted, "{} sees the whole cluster", server.name);
            assert!(
                server.log_tail(1_000).contains("Server is ready"),
                "{}'s log is kept for failure messages",
                server.name
            );
        }
    }
}
