//! Real `nats-server` processes for tests, killed on drop.
//!
//! The binary is found in `HERALD_NATS_SERVER` (the Makefile points it at the
//! repository's `bin/nats-server`), else `<workspace>/bin/nats-server`, else on
//! `PATH`. Run `make nats-server` to install the pinned version.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One JetStream-enabled nats-server on loopback.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_NATS_SERVER") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
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

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and a fresh store.
    pub fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> anyhow::Result<NatsServer> {
        let port = free_port()?;
        let store = std::env::temp_dir().join(format!("herald-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&store)?;
        let mut server = NatsServer {
            port,
            store,
            args: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(binary()?)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        wait_for_port(self.port)
    }

    /// `nats://127.0.0.1:<port>`.
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
    }
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nats-server did not listen on port {port} within 10 s")
}

/// Three JetStream servers clustered on loopback, for replicated streams.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, in start order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other as cluster `herald-test`.
    pub fn start(size: usize) -> anyhow::Result<NatsCluster> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_, _>>()?;
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::with_capacity(size);
        for (index, cluster_port) in cluster_ports.iter().enumerate() {
            let name = format!("n{index}");
            let listen = format!("nats://127.0.0.1:{cluster_port}");
            servers.push(NatsServer::start_with(&[
                "-n",
                &name,
                "--cluster_name",
                "herald-test",
                "--cluster",
                &listen,
                "--routes",
                &routes,
            ])?);
        }
        Ok(NatsCluster { servers })
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
