//! `herald-nats-interest`: what one subscription costs nats-server, on the
//! server the subscriber is connected to and on the other members of its
//! cluster (which hold the interest too, to route messages to it). The
//! capacity model in docs/deploy.md is derived from these numbers.
//!
//! ```text
//! herald-nats-interest [--subscriptions N]   (default 50,000)
//! ```
//!
//! Starts three clustered nats-servers (bin/nats-server, or
//! HERALD_NATS_SERVER), subscribes N live subjects shaped like Herald's
//! (`herald.live.user.<id>`) through one client on the first, and prints each
//! server's resident memory growth per subscription once interest settled.

use std::time::Duration;

use anyhow::{Context, bail};
use herald_testkit::nats::NatsCluster;

fn main() -> anyhow::Result<()> {
    let subscriptions = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => 50_000,
        [flag, value] if flag == "--subscriptions" => value.parse().context("--subscriptions N")?,
        other => bail!("usage: herald-nats-interest [--subscriptions N], not {other:?}"),
    };
    let cluster = NatsCluster::start(3)?;
    let pids = cluster
        .servers
        .iter()
        .map(|server| server.pid().context("a server exited"))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let before = resident(&pids)?;
    let url = cluster.servers[0].url();
    let runtime = tokio::runtime::Runtime::new()?;
    let _client = runtime.block_on(async {
        let client = async_nats::connect(&url).await?;
        let mut held = Vec::with_capacity(subscriptions);
        for n in 0..subscriptions {
            held.push(
                client
                    .subscribe(format!("herald.live.user.u{n:08}"))
                    .await?,
            );
        }
        client.flush().await?;
        // Route interest travels asynchronously; let it settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        anyhow::Ok((client, held))
    })?;
    let after = resident(&pids)?;
    println!("nats-server resident memory per subscription ({subscriptions} subscriptions):");
    for (index, (before, after)) in before.iter().zip(&after).enumerate() {
        let role = if index == 0 {
            "the subscriber's server"
        } else {
            "a route peer"
        };
        let per = (after.saturating_sub(*before)) as f64 / subscriptions as f64;
        println!(
            "  n{index} ({role}): {per:.0} bytes ({} -> {} KiB)",
            before / 1024,
            after / 1024
        );
    }
    Ok(())
}

/// Each process's resident set size, in bytes.
fn resident(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let kib: u64 = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .context("no VmRSS in /proc/<pid>/status")?;
            Ok(kib * 1024)
        })
        .collect()
}
