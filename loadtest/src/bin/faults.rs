//! `herald-faults`: network faults the chaos suite switches on and off from a
//! shell, on loopback only. Two kinds, each a set of relays in one process:
//!
//! ```text
//! herald-faults tcp    --upstream ADDR [--upstream ADDR…] [--silent 1] --addr-file FILE
//! herald-faults gossip --node ADDR [--node ADDR…] --isolate ADDR --addr-file FILE
//! ```
//!
//! `tcp` starts one proxy per upstream (an edge's route to each NATS server).
//! `gossip` starts one UDP relay per node's gossip port; every node advertises
//! its relay, so all gossip passes through them. Each relay's address goes on
//! its own line of FILE, in the order given, once all are listening.
//!
//! Signals: `SIGUSR1` cuts — `tcp` drops every proxied connection and holds
//! new ones unanswered (a route that went down), or with `--silent 1` freezes
//! them instead, closing nothing (a partition only timeouts reveal); `gossip`
//! drops every datagram to or from the `--isolate` node. `SIGUSR2` heals.
//! `SIGTERM`/`SIGINT` stop.
//! Every change is logged on stdout with a timestamp.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use herald_testkit::proxy::TcpProxy;
use herald_testkit::udp_relay::{Partition, UdpRelay};
use tokio::signal::unix::{SignalKind, signal};

/// What the command line asked for.
struct Args {
    kind: Kind,
    addrs: Vec<SocketAddr>,
    isolate: Option<SocketAddr>,
    silent: bool,
    addr_file: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tcp,
    Gossip,
}

/// The running relays, and how to cut and heal them.
enum Faults {
    Tcp {
        proxies: Vec<TcpProxy>,
        silent: bool,
    },
    Gossip {
        _relays: Vec<UdpRelay>,
        partition: Partition,
        isolate: SocketAddr,
    },
}

impl Faults {
    async fn start(args: &Args) -> anyhow::Result<(Faults, Vec<SocketAddr>)> {
        match args.kind {
            Kind::Tcp => {
                let mut proxies = Vec::new();
                for upstream in &args.addrs {
                    proxies.push(TcpProxy::start(*upstream).await?);
                }
                let addrs = proxies.iter().map(TcpProxy::addr).collect();
                let silent = args.silent;
                Ok((Faults::Tcp { proxies, silent }, addrs))
            }
            Kind::Gossip => {
                let isolate = args.isolate.context("gossip needs --isolate ADDR")?;
                if !args.addrs.contains(&isolate) {
                    bail!("--isolate {isolate} is not one of the --node addresses");
                }
                let partition = Partition::default();
                let mut relays = Vec::new();
                for node in &args.addrs {
                    relays.push(UdpRelay::start(*node, partition.clone()).await?);
                }
                let addrs = relays.iter().map(UdpRelay::addr).collect();
                Ok((
                    Faults::Gossip {
                        _relays: relays,
                        partition,
                        isolate,
                    },
                    addrs,
                ))
            }
        }
    }

    fn cut(&self) {
        match self {
            Faults::Tcp { proxies, silent } => {
                for proxy in proxies {
                    proxy.hold();
                    if *silent {
                        proxy.freeze();
                    } else {
                        proxy.cut_all();
                    }
                }
            }
            Faults::Gossip {
                partition, isolate, ..
            } => partition.isolate(*isolate),
        }
    }

    fn heal(&self) {
        match self {
            Faults::Tcp { proxies, .. } => {
                for proxy in proxies {
                    proxy.thaw();
                    proxy.release();
                }
            }
            Faults::Gossip { partition, .. } => partition.heal(),
        }
    }
}

fn parse(mut argv: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let kind = match argv.next().as_deref() {
        Some("tcp") => Kind::Tcp,
        Some("gossip") => Kind::Gossip,
        _ => bail!("usage: herald-faults tcp|gossip … (see the source header)"),
    };
    let mut args = Args {
        kind,
        addrs: Vec::new(),
        isolate: None,
        silent: false,
        addr_file: PathBuf::new(),
    };
    while let Some(flag) = argv.next() {
        let value = argv
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let addr = || -> anyhow::Result<SocketAddr> {
            let addr: SocketAddr = value
                .parse()
                .with_context(|| format!("{flag}: not IP:PORT"))?;
            if !addr.ip().is_loopback() {
                bail!("{flag}: {addr} is not a loopback address (faults stay on 127.0.0.0/8)");
            }
            Ok(addr)
        };
        match (kind, flag.as_str()) {
            (Kind::Tcp, "--upstream") | (Kind::Gossip, "--node") => args.addrs.push(addr()?),
            (Kind::Gossip, "--isolate") => args.isolate = Some(addr()?),
            (Kind::Tcp, "--silent") => args.silent = value != "0",
            (_, "--addr-file") => args.addr_file = PathBuf::from(&value),
            _ => bail!("unknown option {flag}"),
        }
    }
    if args.addrs.is_empty() || args.addr_file.as_os_str().is_empty() {
        bail!("give at least one address and --addr-file FILE");
    }
    Ok(args)
}

fn log(what: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    println!("{now:.3} {what}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse(std::env::args().skip(1))?;
    let mut cuts = signal(SignalKind::user_defined1())?;
    let mut heals = signal(SignalKind::user_defined2())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (faults, addrs) = Faults::start(&args).await?;
    // Written in one go, after every relay listens: a reader that sees the
    // file complete can use every address in it.
    let listing: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    let partial = args.addr_file.with_extension("partial");
    std::fs::write(&partial, listing)?;
    std::fs::rename(&partial, &args.addr_file)?;
    log(&format!("listening: {addrs:?}"));
    loop {
        tokio::select! {
            _ = cuts.recv() => { faults.cut(); log("cut"); }
            _ = heals.recv() => { faults.heal(); log("healed"); }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    log("stopped");
    Ok(())
}
