//! The real `herald-edge` binary as a child process, for tests that kill a node
//! (SIGKILL) or stop it with a signal. Killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::SECRET;
use crate::nats::free_port;

/// A running `herald-edge` process.
#[derive(Debug)]
pub struct EdgeProcess {
    /// `127.0.0.1:<port>` it listens on.
    pub addr: String,
    child: Child,
}

/// The command that runs `binary` as a test node on a free port (returned
/// with it): the test secret, warnings only, gossip on a free port, and `env`
/// on top. Its stderr is inherited; a test that reads it pipes it instead.
pub fn command(binary: &Path, env: &[(&str, &str)]) -> anyhow::Result<(Command, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut command = Command::new(binary);
    command
        .env("HERALD__HTTP__LISTEN", &addr)
        .env("HERALD__AUTH__HS256_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        // Gossip on a free port unless `env` says otherwise.
        .env("HERALD__GOSSIP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    Ok((command, addr))
}

impl EdgeProcess {
    /// Starts `binary` on a free port with the test secret and `env` on top,
    /// and waits until `/readyz` answers 200. The port is picked before the
    /// process binds it, so another test can take it in between: a start that
    /// fails is retried on a fresh port (twice).
    pub async fn start(binary: &Path, env: &[(&str, &str)]) -> anyhow::Result<EdgeProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(binary, env).await {
                Ok(process) => return Ok(process),
                Err(err) if attempt < 3 => {
                    eprintln!("herald-edge start failed ({err:#}); retrying")
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_once(binary: &Path, env: &[(&str, &str)]) -> anyhow::Result<EdgeProcess> {
        let (mut command, addr) = command(binary, env)?;
        let child = command.spawn().context("starting herald-edge")?;
        let mut process = EdgeProcess { addr, child };
        process.wait_ready().await?;
        Ok(process)
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("herald-edge exited during start-up ({status})");
            }
            if let Ok(response) = reqwest::get(self.url("/readyz")).await {
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
