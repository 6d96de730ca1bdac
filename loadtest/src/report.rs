//! The result of a run: a summary table on stdout and a JSON file.

use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::options::Options;
use crate::procstat::Delta;
use crate::publishers::Published;
use crate::subscribers::Subscribers;

/// Latency percentiles, microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    scenario: String,
    /// The endpoints the server spoke (`herald` or `nchan`).
    api: &'static str,
    connections: usize,
    connected: usize,
    failed_connections: usize,
    users: usize,
    topic: Option<String>,
    connect_secs: f64,
    connects_per_sec: f64,
    rate_target: u64,
    /// Seconds of paced publishing asked for.
    duration_secs: u64,
    /// Replay mode: events each client was owed while away.
    owed: Option<u64>,
    publish_secs: f64,
    published: u64,
    publish_errors: u64,
    /// Events (through NATS) published again with the same `Nats-Msg-Id`
    /// after their acknowledgement failed.
    publish_retries: u64,
    /// Acknowledgements JetStream marked `duplicate: true`.
    duplicate_acks: u64,
    /// Longest time one event took from its first publish to being stored.
    publish_stall_max_secs: f64,
    expected_deliveries: u64,
    delivered: u64,
    delivered_per_sec: f64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    /// `herald.reset` events clients received (history lost, told).
    resets: u64,
    /// Connections that received at least one `herald.reset`.
    connections_reset: usize,
    /// Events clients did not get because a `herald.reset` came before them
    /// (excused: not counted in `lost`).
    skipped_after_reset: u64,
    /// Events seen again right after a `herald.reset` (stored again in the
    /// new history by a publisher's retry): not duplicates, the client was
    /// told to refetch.
    repeated_after_reset: u64,
    slow_connections: usize,
    /// Users that get an event only every `quiet_every_secs` (the last ones).
    quiet_users: usize,
    /// Seconds between two turns of a quiet user.
    quiet_every_secs: u64,
    /// Events a quiet user gets at each turn.
    quiet_burst: u64,
    /// Quiet users' events received by reading connections.
    quiet_delivered: u64,
    /// The longest any quiet user's event took from publish to a client,
    /// seconds (0 without quiet users): how long a lost live copy of a
    /// target that stays quiet took to be repaired, in the worst case.
    quiet_delay_max_secs: f64,
    /// Streams the servers cut as too slow (`herald_slow_disconnects_total`).
    slow_connections_closed: u64,
    /// Replay mode: seconds from "everyone back" until all resumed with
    /// everything they were owed.
    resume_secs: Option<f64>,
    reconnects: u64,
    latency_us: Latency,
    idle: Delta,
    idle_rss_per_connection_bytes: f64,
    load: Delta,
    deliveries_per_server_cpu_sec: f64,
    /// The bus's processes (`--bus-pids`, nats-server), apart from the
    /// server's: their change while connections sat idle and over the
    /// publishing phase. `null` without `--bus-pids`.
    bus_idle: Option<Delta>,
    bus_load: Option<Delta>,
    /// The server's heap allocations over the publishing phase, from nodes
    /// built with `--features count-allocations` (`null` otherwise).
    allocations: Option<AllocationsPerEvent>,
    /// One entry per second of the publishing phase.
    timeline: Vec<crate::progress::Tick>,
}

/// What the run measured besides the clients' own counters.
#[derive(Debug)]
pub struct Measured {
    /// Seconds to open every connection.
    pub connect_secs: f64,
    /// Server change while connections sat idle.
    pub idle: Delta,
    /// Server change over the publishing phase.
    pub load: Delta,
    /// `herald_slow_disconnects_total` summed over the nodes.
    pub slow_disconnects: u64,
    /// Replay mode: seconds until every client resumed.
    pub resume_secs: Option<f64>,
    /// Per-second progress while events flowed.
    pub timeline: Vec<crate::progress::Tick>,
    /// The bus's processes, when sampled apart.
    pub bus: Option<BusMeasured>,
    /// The servers' allocations over the publishing phase, when counted.
    pub allocations: Option<Allocations>,
}

/// Heap allocations of the servers (`herald_allocations_total`,
/// `herald_allocated_bytes_total` summed over the nodes).
#[derive(Debug, Clone, Copy)]
pub struct Allocations {
    /// Allocations.
    pub allocations: u64,
    /// Bytes they asked for.
    pub bytes: u64,
}

impl Allocations {
    /// What was allocated between `before` and `self`.
    pub fn since(self, before: Allocations) -> Allocations {
        Allocations {
            allocations: self.allocations.saturating_sub(before.allocations),
            bytes: self.bytes.saturating_sub(before.bytes),
        }
    }
}

/// The publishing phase's allocations, in total and per delivered event.
#[derive(Debug, Serialize)]
pub struct AllocationsPerEvent {
    allocations: u64,
    allocated_bytes: u64,
    per_delivered_event: f64,
    bytes_per_delivered_event: f64,
}

/// The bus's processes (nats-server) over the same intervals as the server.
#[derive(Debug, Clone, Copy)]
pub struct BusMeasured {
    /// Change while connections sat idle.
    pub idle: Delta,
    /// Change over the publishing phase.
    pub load: Delta,
}

impl Report {
    /// Assembles the report from what was measured.
    pub fn new(
        options: &Options,
        subscribers: &Subscribers,
        published: &Published,
        measured: Measured,
    ) -> Report {
        let Measured {
            connect_secs,
            idle,
            load,
            slow_disconnects,
            resume_secs,
            timeline,
            bus,
            allocations,
        } = measured;
        let mut expected = 0;
        let mut delivered = 0;
        let mut lost = 0;
        let mut duplicated = 0;
        let mut reordered = 0;
        let mut resets = 0;
        let mut connections_reset = 0;
        let mut skipped_after_reset = 0;
        let mut repeated_after_reset = 0;
        for connection in &subscribers.connections {
            if connection.slow {
                continue;
            }
            let sent: u64 = connection
                .targets
                .iter()
                .map(|t| published.sent(t.target))
                .sum();
            let received = connection.received.load(Ordering::Relaxed);
            let dups = connection.duplicated.load(Ordering::Relaxed);
            expected += sent;
            delivered += received;
            duplicated += dups;
            // Out of order: a target's gap, a target's event behind another
            // target's later one, or an event the connection never asked for.
            reordered += connection.jumped.load(Ordering::Relaxed)
                + connection.misordered.load(Ordering::Relaxed)
                + connection.foreign.load(Ordering::Relaxed);
            let connection_resets = connection.resets.load(Ordering::Relaxed);
            resets += connection_resets;
            connections_reset += usize::from(connection_resets > 0);
            // A reset excuses what it skipped: up to each target's next
            // event, or to the end when nothing came after it.
            let mut skipped = connection.skipped_after_reset.load(Ordering::Relaxed);
            for target in &connection.targets {
                if target.reset_pending.load(Ordering::Relaxed) {
                    skipped += published
                        .sent(target.target)
                        .saturating_sub(target.last.load(Ordering::Relaxed));
                }
            }
            skipped_after_reset += skipped;
            let repeated = connection.repeated_after_reset.load(Ordering::Relaxed);
            repeated_after_reset += repeated;
            lost += sent.saturating_sub(received - dups - repeated + skipped);
        }
        let latency = subscribers.latency();
        let slow_connections = subscribers.connections.iter().filter(|c| c.slow).count();
        let (quiet_delivered, quiet_max_us) = subscribers.quiet();
        Report {
            scenario: options.label.clone(),
            api: match options.api {
                crate::options::Api::Herald => "herald",
                crate::options::Api::Nchan => "nchan",
            },
            connections: options.connections,
            connected: subscribers.connected(),
            failed_connections: subscribers.failed(),
            users: options.users,
            topic: options.topic.clone(),
            connect_secs,
            connects_per_sec: subscribers.connected() as f64 / connect_secs.max(1e-9),
            rate_target: options.rate,
            duration_secs: options.duration_secs,
            owed: options.owed,
            publish_secs: published.secs(),
            published: published.total(),
            publish_errors: published.errors.load(Ordering::Relaxed),
            publish_retries: published.retried.load(Ordering::Relaxed),
            duplicate_acks: published.duplicate_acks.load(Ordering::Relaxed),
            publish_stall_max_secs: published.max_stall_us.load(Ordering::Relaxed) as f64 / 1e6,
            expected_deliveries: expected,
            delivered,
            delivered_per_sec: delivered as f64 / load.wall_secs.max(1e-9),
            lost,
            duplicated,
            reordered,
            resets,
            connections_reset,
            skipped_after_reset,
            repeated_after_reset,
            slow_connections,
            quiet_users: options.quiet_users,
            quiet_every_secs: options.quiet_every_secs,
            quiet_burst: options.quiet_burst,
            quiet_delivered,
            quiet_delay_max_secs: quiet_max_us as f64 / 1e6,
            slow_connections_closed: slow_disconnects,
            resume_secs,
            reconnects: subscribers.reconnects(),
            latency_us: Latency {
                p50: latency.value_at_quantile(0.5),
                p90: latency.value_at_quantile(0.9),
                p99: latency.value_at_quantile(0.99),
                p999: latency.value_at_quantile(0.999),
                max: latency.max(),
            },
            idle,
            idle_rss_per_connection_bytes: idle.rss_growth_bytes as f64
                / subscribers.connected().max(1) as f64,
            load,
            deliveries_per_server_cpu_sec: if load.cpu_secs > 0.0 {
                delivered as f64 / load.cpu_secs
            } else {
                0.0
            },
            bus_idle: bus.map(|b| b.idle),
            bus_load: bus.map(|b| b.load),
            allocations: allocations.map(|a| AllocationsPerEvent {
                allocations: a.allocations,
                allocated_bytes: a.bytes,
                per_delivered_event: a.allocations as f64 / delivered.max(1) as f64,
                bytes_per_delivered_event: a.bytes as f64 / delivered.max(1) as f64,
            }),
            timeline,
        }
    }

    /// Prints the summary table.
    pub fn print(&self) {
        let bus_line = self.bus_load.zip(self.bus_idle).map(|(load, idle)| {
            format!(
                "bus CPU under load     {:.2}s (bus RSS {} KiB, grew {:.0} bytes per conn while idle)",
                load.cpu_secs,
                load.rss_bytes / 1024,
                idle.rss_growth_bytes as f64 / self.connected.max(1) as f64
            )
        });
        let l = &self.latency_us;
        println!("scenario               {}", self.scenario);
        println!(
            "connections            {} opened, {} failed, {:.0}/s",
            self.connected, self.failed_connections, self.connects_per_sec
        );
        println!(
            "idle RSS per conn      {:.0} bytes (server RSS {} KiB)",
            self.idle_rss_per_connection_bytes,
            self.idle.rss_bytes / 1024
        );
        println!(
            "published              {} in {:.1}s ({} errors)",
            self.published, self.publish_secs, self.publish_errors
        );
        if self.publish_retries > 0 || self.duplicate_acks > 0 {
            println!(
                "publish retries        {} (duplicate acks {}, longest stall {:.2}s)",
                self.publish_retries, self.duplicate_acks, self.publish_stall_max_secs
            );
        }
        println!(
            "delivered              {} of {} expected ({:.0}/s)",
            self.delivered, self.expected_deliveries, self.delivered_per_sec
        );
        println!(
            "lost / dup / reordered {} / {} / {}",
            self.lost, self.duplicated, self.reordered
        );
        if self.resets > 0 {
            println!(
                "herald.reset           {} on {} connections (after them: {} skipped, not lost; {} seen again, not duplicates)",
                self.resets,
                self.connections_reset,
                self.skipped_after_reset,
                self.repeated_after_reset
            );
        }
        if let Some(secs) = self.resume_secs {
            println!(
                "resumed                all {} clients in {secs:.2}s ({} reconnects)",
                self.connected, self.reconnects
            );
        } else if self.reconnects > 0 {
            println!("reconnects             {}", self.reconnects);
        }
        if self.slow_connections > 0 {
            println!(
                "slow connections       {} (closed by the server: {})",
                self.slow_connections, self.slow_connections_closed
            );
        }
        if self.quiet_users > 0 {
            println!(
                "quiet users            {} ({} event(s) every {} s): {} delivered, longest delay {:.2}s",
                self.quiet_users,
                self.quiet_burst,
                self.quiet_every_secs,
                self.quiet_delivered,
                self.quiet_delay_max_secs
            );
        }
        println!(
            "latency µs             p50 {} p90 {} p99 {} p99.9 {} max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        println!(
            "server CPU under load  {:.2}s ({:.0} deliveries per CPU-second)",
            self.load.cpu_secs, self.deliveries_per_server_cpu_sec
        );
        if let Some(line) = bus_line {
            println!("{line}");
        }
        if let Some(a) = &self.allocations {
            println!(
                "server allocations     {} ({:.1} per delivered event, {:.0} bytes per delivered event)",
                a.allocations, a.per_delivered_event, a.bytes_per_delivered_event
            );
        }
    }

    /// Writes the JSON result.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}
