//! The real `herald-edge` binary as a child process, for tests that kill a node
//! (SIGKILL), stop it with a signal or read what it prints. Killed on drop.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::nats::free_port;
use crate::{GOSSIP_KEY, SECRET};

/// Where a test node listens: free loopback ports picked before it starts.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// `127.0.0.1:<port>` of the public listener (`http.listen`).
    pub http: String,
    /// `127.0.0.1:<port>` of the admin listener (`admin.listen`).
    pub admin: String,
}

/// A running `herald-edge` process.
#[derive(Debug)]
pub struct EdgeProcess {
    /// `127.0.0.1:<port>` it listens on (streams, publish, presence).
    pub addr: String,
    /// `127.0.0.1:<port>` of its admin listener (metrics, cluster, probes).
    pub admin_addr: String,
    child: Child,
    /// Everything the process wrote to stderr so far, when started with
    /// [`EdgeProcess::start_capturing`] (a thread appends as it reads).
    stderr: Option<Arc<Mutex<Vec<u8>>>>,
}

/// The command that runs `binary` as a test node on free ports (returned
/// with it): the test secret, warnings only, sealed gossip on a free port, and `env`
/// on top. Its stderr is inherited; a test that reads it pipes it instead.
pub fn command(binary: &Path, env: &[(&str, &str)]) -> anyhow::Result<(Command, Listeners)> {
    let listeners = Listeners {
        http: format!("127.0.0.1:{}", free_port()?),
        admin: format!("127.0.0.1:{}", free_port()?),
    };
    let mut command = Command::new(binary);
    command
        .env("HERALD__HTTP__LISTEN", &listeners.http)
        .env("HERALD__ADMIN__LISTEN", &listeners.admin)
        .env("HERALD__AUTH__HS256_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        // Sealed gossip on a free port unless `env` says otherwise.
        .env("HERALD__GOSSIP__LISTEN", "127.0.0.1:0")
        .env("HERALD__GOSSIP__SECRET", GOSSIP_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    Ok((command, listeners))
}

impl EdgeProcess {
    /// Starts `binary` on free ports with the test secret and `env` on top,
    /// and waits until the admin listener's `/readyz` answers 200. The ports
    /// are picked before the process binds them, so another test can take one
    /// in between: a start that fails is retried on fresh ports (twice).
    pub async fn start(binary: &Path, env: &[(&str, &str)]) -> anyhow::Result<EdgeProcess> {
        Self::start_retrying(binary, env, false).await
    }

    /// Like [`EdgeProcess::start`], but keeps the process's stderr (its logs
    /// and any panic message) for [`EdgeProcess::stderr`] instead of passing
    /// it through.
    pub async fn start_capturing(
        binary: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<EdgeProcess> {
        Self::start_retrying(binary, env, true).await
    }

    async fn start_retrying(
        binary: &Path,
        env: &[(&str, &str)],
        capture: bool,
    ) -> anyhow::Result<EdgeProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(binary, env, capture).await {
                Ok(process) => return Ok(process),
                Err(err) if attempt < 3 => {
                    eprintln!("herald-edge start failed ({err:#}); retrying")
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_once(
        binary: &Path,
        env: &[(&str, &str)],
        capture: bool,
    ) -> anyhow::Result<EdgeProcess> {
        let (mut command, listeners) = command(binary, env)?;
        if capture {
            command.stderr(Stdio::piped());
        }
        let mut child = command.spawn().context("starting herald-edge")?;
        let stderr = child.stderr.take().map(|mut pipe| {
            let captured = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&captured);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(read @ 1..) = pipe.read(&mut chunk) {
                    sink.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .extend_from_slice(&chunk[..read]);
                }
            });
            captured
        });
        let mut process = EdgeProcess {
            addr: listeners.http,
            admin_addr: listeners.admin,
            child,
            stderr,
        };
        process.wait_ready().await?;
        Ok(process)
    }

    /// What the process has written to stderr so far (lossy UTF-8); empty
    /// unless it was started with [`EdgeProcess::start_capturing`].
    pub fn stderr(&self) -> String {
        self.stderr
            .as_ref()
            .map(|captured| {
                let bytes = captured.lock().unwrap_or_else(|p| p.into_inner());
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default()
    }

    /// `http://<addr><path>`: streams, publish, presence.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://<admin_addr><path>`: `/metrics`, `/v1/cluster`, `/healthz`,
    /// `/readyz`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("herald-edge exited during start-up ({status})");
            }
            if let Ok(response) = reqwest::get(self.admin_url("/readyz")).await {
                if response.status() == 200 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("herald-edge on {} was not ready within 15 s", self.addr)
    }

    /// SIGTERM, then waits (up to `timeout`) for the node to drain and exit;
    /// returns whether it exited successfully.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM failed ({status})");
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("herald-edge did not exit within {timeout:?} of SIGTERM")
    }

    /// SIGKILL: the node dies without closing anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
