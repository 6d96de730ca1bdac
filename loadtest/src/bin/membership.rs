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
//!    and any member not `alive` counts as a false suspicion (target: none).
//!
//! Usage: `membership --edge target/release/herald-edge [--rounds 3]
//! [--load-secs 60] [--out results.json]`. Everything runs on 127.0.0.1,
//! bounded in time; the processes are killed on exit.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const SECRET: &str = "herald-membership-bench-secret-0123456789";
const POLL: Duration = Duration::from_millis(50);
const GIVE_UP: Duration = Duration::from_secs(60);

struct Edge {
    id: String,
    http: u16,
    child: Child,
}

impl Edge {
    fn cluster_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/cluster", self.http)
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
        let id = format!("bench-{n}");
        let child = Command::new(&self.binary)
            .env("HERALD__AUTH__HS256_SECRET", SECRET)
            .env("HERALD__HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env("HERALD__NODE__ID", &id)
            .env("HERALD__GOSSIP__LISTEN", format!("127.0.0.1:{gossip}"))
            .env("HERALD__GOSSIP__SEEDS", self.seed())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary))?;
        let edge = Edge { id, http, child };
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

fn state_of<'a>(view: &'a Value, id: &str) -> Option<&'a str> {
    view["members"].as_array()?.iter().find(|m| m["id"] == id)?["state"].as_str()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut binary = "target/release/herald-edge".to_string();
    let mut rounds = 3usize;
    let mut load_secs = 60u64;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--edge" => binary = value()?,
            "--rounds" => rounds = value()?.parse()?,
            "--load-secs" => load_secs = value()?.parse()?,
            "--out" => out = Some(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    let base_port = 20_000 + (std::process::id() % 20_000) as u16;
    let mut bench = Bench {
        binary,
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
    bench.next = 1;
    let mut edges = Vec::new();
    for _ in 0..5 {
        edges.push(bench.start().await?);
    }
    let ids: Vec<String> = edges.iter().map(|e| e.id.clone()).collect();
    for id in &ids {
        let all: Vec<&Edge> = edges.iter().collect();
        bench.time_until(&all, id, |s| s == Some("alive")).await?;
    }
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

    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let result = json!({
        "nodes": 5,
        "rounds": rounds,
        "join_seconds": joins,
        "sigkill_detect_seconds": kills,
        "sigterm_left_seconds": terms,
        "join_max": max(&joins),
        "sigkill_detect_max": max(&kills),
        "sigterm_left_max": max(&terms),
        "load": {"seconds": load_secs, "busy_threads": cores, "views_polled": polls, "false_suspicions": false_suspicions},
    });
    println!(
        "\nmembership (5 nodes, defaults): join max {:.2} s (target 3), SIGKILL detected max {:.2} s (target 10), \
         SIGTERM left max {:.3} s, {} false suspicions in {} views over {} s of full load",
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
