//! A progress line every second while events flow, kept as a timeline in the
//! JSON result so `make bench-report` can plot latency over time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::procstat::Sampler;
use crate::subscribers::Subscribers;

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Seconds since the progress started.
    pub t_secs: f64,
    /// Events received over the second (all connections).
    pub delivered_per_sec: f64,
    /// Latency of the events received in that second, microseconds.
    pub p50_us: u64,
    /// Latency of the events received in that second, microseconds.
    pub p99_us: u64,
    /// Latency of the events received in that second, microseconds.
    pub max_us: u64,
    /// Server RSS at the end of the second, bytes.
    pub server_rss_bytes: u64,
}

/// Prints a line per second until `stop`, and returns the timeline.
pub async fn run(
    label: String,
    subscribers: Arc<Subscribers>,
    pids: Vec<u32>,
    stop: CancellationToken,
) -> Vec<Tick> {
    let sampler = Sampler::new(&pids);
    let started = Instant::now();
    let mut ticks = Vec::new();
    let mut previous_count = received(&subscribers);
    let mut previous_histogram = subscribers.latency();
    let mut previous_at = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return ticks,
            _ = every.tick() => {}
        }
        let now = Instant::now();
        let count = received(&subscribers);
        let histogram = subscribers.latency();
        let mut second = histogram.clone();
        if second.subtract(&previous_histogram).is_err() {
            second =
                Histogram::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|_| histogram.clone());
        }
        let elapsed = now.duration_since(previous_at).as_secs_f64().max(1e-3);
        let tick = Tick {
            t_secs: started.elapsed().as_secs_f64(),
            delivered_per_sec: count.saturating_sub(previous_count) as f64 / elapsed,
            p50_us: second.value_at_quantile(0.5),
            p99_us: second.value_at_quantile(0.99),
            max_us: second.max(),
            server_rss_bytes: sampler.sample().rss_bytes(),
        };
        eprintln!(
            "[{label}] {:>4.0}s  {:>9.0} ev/s  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  server RSS {:>7} KiB  streaming {}",
            tick.t_secs,
            tick.delivered_per_sec,
            tick.p50_us as f64 / 1000.0,
            tick.p99_us as f64 / 1000.0,
            tick.max_us as f64 / 1000.0,
            tick.server_rss_bytes / 1024,
            subscribers.streaming(),
        );
        ticks.push(tick);
        previous_count = count;
        previous_histogram = histogram;
        previous_at = now;
    }
}

fn received(subscribers: &Subscribers) -> u64 {
    subscribers
        .connections
        .iter()
        .map(|c| c.received.load(Ordering::Relaxed))
        .sum()
}
