//! Gossip membership benchmark: five `herald-edge` processes on loopback with
//! the default gossip settings, measuring what docs/benchmarks.md reports:
//!
//! 1. join: with four nodes settled, a fifth starts; time until every node
//!    lists it `alive` (target: 3 s);
//! 2. SIGKILL: time until every other node lists the killed node as not alive
//!    (target: 10 s);
//! 3. SIGTERM: time until every other node lists the stopped node as `left`
//!    (target: at once);
//! 4. load: both cores busy for `--load-secs`; every node's view is polled
//!    and any member not `alive` counts as a false suspicion (target: none);
//! 5. cost of sealing: five settled nodes, their CPU time (`/proc/<pid>/stat`)
//!    over `--cpu-secs`, with plain gossip and with sealed gossip, alternated
//!    `--cpu-rounds` times (target: sealed within 10 % of plain).
//!
//! Gossip is sealed with a bench key in 1 to 4 (as production runs it);
//! `--plain` runs them with plain gossip (allowed on loopback only).
//!
//! Usage: `membership --edge target/release/herald-edge [--rounds 3]
//! [--load-secs 60] [--cpu-secs 60] [--cpu-rounds 2] [--plain]
//! [--out results.json]`. Everything runs on 127.0.0.1, bounded in time; the
//! processes are killed on exit.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const SECRET: &str = "herald-membership-bench-secret-0123456789";
/// The bench cluster's gossip key (a benchmark key, used nowhere else).
const GOSSIP_KEY: &str = "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=";
const POLL: Duration = Duration::from_millis(50);
const GIVE_UP: Duration = Duration::from_secs(60);

struct Edge {
    id: String,
    /// Port of its admin listener (`/v1/cluster`).
    admin: u16,
    child: Child,
}

impl Edge {
    fn cluster_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/cluster", self.admin)
    }

    fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} failed");
        }
        Ok(())
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench {
    binary: String,
    /// Seal gossip with [`GOSSIP_KEY`].
    sealed: bool,
    base_port: u16,
    next: u16,
    client: reqwest::Client,
}

impl Bench {
    fn seed(&self) -> String {
        format!("127.0.0.1:{}", self.base_port + 1001)
    }

    async fn start(&mut self) -> anyhow::Result<Edge> {
        let n = self.next;
        self.next += 1;
        let http = self.base_port + n;
        let gossip = self.base_port + 1000 + n;
        let admin = self.base_port + 2000 + n;
        let id = format!("bench-{n}");
        let mut command = Command::new(&self.binary);
        if self.sealed {
            command.env("HERALD__GOSSIP__SECRET", GOSSIP_KEY);
        }
        let child = command
            .env("HERALD__AUTH__HS256_SECRET", SECRET)
            .env("HERALD__HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env("HERALD__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("HERALD__NODE__ID", &id)
            .env("HERALD__GOSSIP__LISTEN", format!("127.0.0.1:{gossip}"))
            .env("HERALD__GOSSIP__SEEDS", self.seed())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary))?;
        let edge = Edge { id, admin, child };
        let started = Instant::now();
        while self.view(&edge).await.is_err() {
            if started.elapsed() > GIVE_UP {
                bail!("{} did not answer", edge.id);
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(edge)
    }

    async fn view(&self, edge: &Edge) -> anyhow::Result<Value> {
        let body = self
            .client
            .get(edge.cluster_url())
            .timeout(Duration::from_secs(2))
            .send()
            .await?
            .bytes()
            .await?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Seconds until `condition(state of `id`)` holds in every view of `observers`.
    async fn time_until(
        &self,
        observers: &[&Edge],
        id: &str,
        condition: impl Fn(Option<&str>) -> bool,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            let mut all = true;
            let mut last = Value::Null;
            for observer in observers {
                let view = self.view(observer).await?;
                if !condition(state_of(&view, id)) {
                    all = false;
                    last = view;
                    break;
                }
            }
            if all {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > GIVE_UP {
                bail!("condition on {id} not met within {GIVE_UP:?}; last view: {last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Bench {
    /// Starts five nodes and waits until every one lists all five `alive`.
    async fn settled_five(&mut self) -> anyhow::Result<Vec<Edge>> {
        self.next = 1;
        let mut edges = Vec::new();
        for _ in 0..5 {
            edges.push(self.start().await?);
        }
        let ids: Vec<String> = edges.iter().map(|e| e.id.clone()).collect();
        for id in &ids {
            let all: Vec<&Edge> = edges.iter().collect();
            self.time_until(&all, id, |s| s == Some("alive")).await?;
        }
        Ok(edges)
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(index)
            .context("short /proc stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15: indexes 11 and 12 here.
    Ok((ticks(11)? + ticks(12)?) / ticks_per_second)
}

/// `getconf CLK_TCK` (100 on Linux unless configured otherwise).
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds five settled nodes use together over `seconds`.
async fn cluster_cpu(bench: &mut Bench, seconds: u64) -> anyhow::Result<f64> {
    let edges = bench.settled_five().await?;
    let hz = ticks_per_second();
    let before: Vec<f64> = edges
        .iter()
        .map(|e| cpu_seconds(e.child.id(), hz))
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after: Vec<f64> = edges
        .iter()
        .map(|e| cpu_seconds(e.child.id(), hz))
        .collect::<anyhow::Result<_>>()?;
    Ok(after.iter().zip(&before).map(|(a, b)| a - b).sum())
}

fn state_of<'a>(view: &'a Value, id: &str) -> Option<&'a str> {
    view["members"].as_array()?.iter().find(|m| m["id"] == id)?["state"].as_str()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut binary = "target/release/herald-edge".to_string();
    let mut rounds = 3usize;
    let mut load_secs = 60u64;
    let mut out = None;
    let mut cpu_secs = 60u64;
    let mut cpu_rounds = 2usize;
    let mut sealed = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--edge" => binary = value()?,
            "--rounds" => rounds = value()?.parse()?,
            "--load-secs" => load_secs = value()?.parse()?,
            "--out" => out = Some(value()?),
            "--cpu-secs" => cpu_secs = value()?.parse()?,
            "--cpu-rounds" => cpu_rounds = value()?.parse()?,
            "--plain" => sealed = false,
            other => bail!("unknown argument {other}"),
        }
    }
    // HTTP base+n, gossip base+1000+n, admin base+2000+n: all below 32768,
    // where Linux draws ephemeral ports, so no outgoing connection on the
    // machine can hold one when a node binds it.
    let base_port = 20_000 + (std::process::id() % 10_000) as u16;
    let mut bench = Bench {
        binary,
        sealed,
        base_port,
        next: 1,
        client: reqwest::Client::new(),
    };

    let mut joins = Vec::new();
    let mut kills = Vec::new();
    let mut terms = Vec::new();
    for round in 0..rounds {
        bench.next = 1;
        let mut edges = Vec::new();
        for _ in 0..4 {
            edges.push(bench.start().await?);
        }
        // Four nodes settled; the fifth joins.
        let ids: Vec<String> = edges.iter().map(|e| e.id.clone()).collect();
        for id in &ids {
            let all: Vec<&Edge> = edges.iter().collect();
            bench.time_until(&all, id, |s| s == Some("alive")).await?;
        }
        let newcomer = bench.start().await?;
        let id = newcomer.id.clone();
        edges.push(newcomer);
        let all: Vec<&Edge> = edges.iter().collect();
        let join = bench.time_until(&all, &id, |s| s == Some("alive")).await?;

        // SIGKILL the newcomer: no goodbye.
        let mut victim = edges.pop().context("five nodes")?;
        victim.signal("-KILL")?;
        let others: Vec<&Edge> = edges.iter().collect();
        let kill = bench
            .time_until(&others, &victim.id, |s| {
                matches!(s, Some("suspect" | "dead"))
            })
            .await?;
        drop(victim);

        // SIGTERM another: it announces its departure.
        let mut leaving = edges.pop().context("four nodes")?;
        leaving.signal("-TERM")?;
        let others: Vec<&Edge> = edges.iter().collect();
        let term = bench
            .time_until(&others, &leaving.id, |s| s == Some("left"))
            .await?;
        drop(leaving);
        println!(
            "round {}: join {:.2} s, SIGKILL detected {:.2} s, SIGTERM seen as left {:.3} s",
            round + 1,
            join,
            kill,
            term
        );
        joins.push(join);
        kills.push(kill);
        terms.push(term);
    }

    // Five nodes under full CPU load on every core.
    let edges = bench.settled_five().await?;
    let ids: Vec<String> = edges.iter().map(|e| e.id.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut polls = 0u64;
    let mut false_suspicions = 0u64;
    while started.elapsed() < Duration::from_secs(load_secs) {
        for edge in &edges {
            if let Ok(view) = bench.view(edge).await {
                polls += 1;
                for id in &ids {
                    if state_of(&view, id) != Some("alive") {
                        false_suspicions += 1;
                        println!(
                            "false suspicion: {} saw {id} as {:?}",
                            edge.id,
                            state_of(&view, id)
                        );
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for burner in burners {
        let _ = burner.join();
    }
    drop(edges);

    // The cost of sealing: plain and sealed alternated, same everything else.
    let mut plain_cpu = Vec::new();
    let mut sealed_cpu = Vec::new();
    if cpu_secs > 0 {
        for round in 0..cpu_rounds {
            for seal in [false, true] {
                bench.sealed = seal;
                let used = cluster_cpu(&mut bench, cpu_secs).await?;
                println!(
                    "cpu round {}: {} gossip, 5 nodes used {used:.2} CPU s in {cpu_secs} s",
                    round + 1,
                    if seal { "sealed" } else { "plain" }
                );
                if seal {
                    sealed_cpu.push(used);
                } else {
                    plain_cpu.push(used);
                }
            }
        }
        bench.sealed = sealed;
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let cpu_overhead_percent = if sum(&plain_cpu) > 0.0 {
        (sum(&sealed_cpu) / sum(&plain_cpu) - 1.0) * 100.0
    } else {
        0.0
    };

    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let result = json!({
        "nodes": 5,
        "gossip": if sealed { "sealed" } else { "plain" },
        "rounds": rounds,
        "join_seconds": joins,
        "sigkill_detect_seconds": kills,
        "sigterm_left_seconds": terms,
        "join_max": max(&joins),
        "sigkill_detect_max": max(&kills),
        "sigterm_left_max": max(&terms),
        "load": {"seconds": load_secs, "busy_threads": cores, "views_polled": polls, "false_suspicions": false_suspicions},
        "cpu": {
            "seconds_per_run": cpu_secs,
            "plain_cpu_seconds": plain_cpu,
            "sealed_cpu_seconds": sealed_cpu,
            "sealed_overhead_percent": cpu_overhead_percent,
        },
    });
    if cpu_secs > 0 {
        println!(
            "\ngossip CPU, 5 nodes x {cpu_secs} s x {cpu_rounds}: plain {:.2} s, sealed {:.2} s: sealed costs {cpu_overhead_percent:+.1} % (target: at most +10 %)",
            sum(&plain_cpu),
            sum(&sealed_cpu)
        );
    }
    println!(
        "\nmembership (5 nodes, defaults, {} gossip): join max {:.2} s (target 3), SIGKILL detected max {:.2} s (target 10), \
         SIGTERM left max {:.3} s, {} false suspicions in {} views over {} s of full load",
        if sealed { "sealed" } else { "plain" },
        max(&joins),
        max(&kills),
        max(&terms),
        false_suspicions,
        polls,
        load_secs
    );
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
        println!("result written to {out}");
    }
    Ok(())
}
