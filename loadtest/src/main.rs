//! `herald-loadtest`: opens many SSE connections to Herald, publishes paced
//! events, and reports delivery, loss, duplicates, reordering, end-to-end latency
//! and the server's memory and CPU. The same program drives the baselines
//! (`loadtest/baselines/`): the Express + Redis design speaks Herald's
//! endpoints, nchan its own (`--api nchan`).
//!
//! Layout:
//! - [`options`]: command-line options;
//! - [`subscribers`]: the SSE connections and the per-connection accounting;
//! - [`publishers`]: paced publishing over HTTP;
//! - [`procstat`]: RSS and CPU time of server processes from `/proc`;
//! - [`report`]: the summary table and the JSON result.
//!
//! Each event's data is `{"k":<per-target sequence>,"t":<publish time, µs>}`
//! (plus padding), so every receiver can tell lost, duplicated and reordered
//! events apart and measure publish-to-receive latency on the same clock.

mod options;
mod procstat;
mod progress;
mod publishers;
mod report;
mod subscribers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::options::Options;
use crate::report::Report;
use crate::subscribers::Subscribers;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    if (limit as usize) < options.connections + 256 {
        eprintln!(
            "warning: open-file limit is {limit}; {} connections need more (split over processes)",
            options.connections
        );
    }
    let servers = procstat::Sampler::new(&options.pids);
    let bus = procstat::Sampler::new(&options.bus_pids);
    let idle_before = servers.sample();
    let bus_idle_before = bus.sample();

    eprintln!(
        "[{}] connecting {} SSE streams ({} users{}) to {}",
        options.label,
        options.connections,
        options.users,
        options
            .topic
            .as_ref()
            .map(|t| format!(
                ", topic {t}{}",
                if options.mixed { " and their own" } else { "" }
            ))
            .unwrap_or_default(),
        options.urls.join(","),
    );
    let started = Instant::now();
    let subscribers = Arc::new(Subscribers::connect(&options).await?);
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[{}] {} connected in {connect_secs:.2}s ({} failed)",
        options.label,
        subscribers.connected(),
        subscribers.failed()
    );
    // Let the node settle before measuring the memory the connections hold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_after = servers.sample();
    let bus_idle_after = bus.sample();
    let allocations_before = allocation_totals(&options).await;

    let publish = Arc::new(publishers::Published::new(options.targets()));
    let resume_secs = match options.owed {
        Some(owed) => Some(replay(&options, &subscribers, &publish, owed).await?),
        None => None,
    };
    let stop_progress = tokio_util::sync::CancellationToken::new();
    let timeline = tokio::spawn(progress::run(
        options.label.clone(),
        Arc::clone(&subscribers),
        options.pids.clone(),
        stop_progress.clone(),
    ));
    publishers::run(&options, &publish).await?;
    let deadline = Instant::now() + Duration::from_secs(options.drain_secs);
    while Instant::now() < deadline && !subscribers.all_received(&publish) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_progress.cancel();
    let timeline = timeline.await.unwrap_or_default();
    let loaded = servers.sample();
    let bus_loaded = bus.sample();
    let allocations = allocations_before
        .zip(allocation_totals(&options).await)
        .map(|(before, after)| after.since(before));
    let slow_disconnects = match options.api {
        options::Api::Herald => {
            server_counter(&options.admin_urls, "herald_slow_disconnects_total")
                .await
                .unwrap_or(0)
        }
        options::Api::Nchan => 0,
    };
    let bus_measured = (!options.bus_pids.is_empty()).then(|| report::BusMeasured {
        idle: procstat::Delta::between(&bus_idle_before, &bus_idle_after),
        load: procstat::Delta::between(&bus_idle_after, &bus_loaded),
    });

    let report = Report::new(
        &options,
        &subscribers,
        &publish,
        report::Measured {
            connect_secs,
            idle: procstat::Delta::between(&idle_before, &idle_after),
            load: procstat::Delta::between(&idle_after, &loaded),
            slow_disconnects,
            resume_secs,
            timeline,
            bus: bus_measured,
            allocations,
        },
    );
    report.print();
    if let Some(path) = &options.out {
        report.write_json(path)?;
        eprintln!("[{}] result written to {}", options.label, path.display());
    }
    subscribers.close();
    Ok(())
}

/// Sends every client away, publishes `owed` events to each target, brings
/// every client back at once and returns the seconds until all of them are
/// streaming again with everything they were owed.
async fn replay(
    options: &Options,
    subscribers: &Subscribers,
    published: &Arc<publishers::Published>,
    owed: u64,
) -> anyhow::Result<f64> {
    let bounded =
        |what: &'static str, secs: u64| (what, Instant::now() + Duration::from_secs(secs));
    subscribers.set_phase(subscribers::Phase::Away);
    let (what, deadline) = bounded("clients to leave", 30);
    while subscribers.streaming() > 0 {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "[{}] all clients away; publishing {owed} event(s) to each target",
        options.label
    );
    publishers::burst(options, published, owed).await?;
    eprintln!(
        "[{}] {} clients reconnecting at once",
        options.label,
        subscribers.connected()
    );
    let started = Instant::now();
    subscribers.set_phase(subscribers::Phase::Stream);
    let (what, deadline) = bounded("every client to resume", 120);
    while subscribers.streaming() < subscribers.connected() || !subscribers.all_received(published)
    {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("[{}] all resumed in {secs:.2}s", options.label);
    Ok(secs)
}

/// The servers' allocation totals (`herald_allocations_total`,
/// `herald_allocated_bytes_total`): only from nodes built with
/// `--features count-allocations`, `None` from others (and from nchan).
async fn allocation_totals(options: &Options) -> Option<report::Allocations> {
    if options.api != options::Api::Herald {
        return None;
    }
    let urls = &options.admin_urls;
    Some(report::Allocations {
        allocations: server_counter(urls, "herald_allocations_total").await?,
        bytes: server_counter(urls, "herald_allocated_bytes_total").await?,
    })
}

/// Sums a counter from every node's `/metrics` on its admin listener;
/// `None` when no node exports it (nodes that cannot be read count 0).
async fn server_counter(urls: &[String], name: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = None;
    for url in urls {
        let addr = url.trim_start_matches("http://").trim_end_matches('/');
        let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        let mut text = String::new();
        if socket.write_all(request.as_bytes()).await.is_err()
            || socket.read_to_string(&mut text).await.is_err()
        {
            continue;
        }
        if let Some(value) = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
        {
            *total.get_or_insert(0) += value;
        }
    }
    total
}
