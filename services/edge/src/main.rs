//! `herald-edge`: run an edge node, or mint a development token.
//!
//! ```text
//! herald-edge [--config FILE]
//! herald-edge token --user ID [--topic NAME]... [--ttl SECS] [--config FILE]
//! herald-edge token --publish [--publish-to user:ID|topic:NAME]... [--ttl SECS] [--config FILE]
//! ```
//! Configuration comes from defaults, the optional TOML file and `HERALD__*`
//! variables; invalid configuration exits with status 64 and a message naming
//! each bad key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_config::Settings;
use herald_edge::{Claims, PublishClaim, expiry_in, mint, now_secs};

/// Exit status for invalid configuration or usage (EX_USAGE / EX_CONFIG family).
const EXIT_CONFIG: u8 = 64;

enum Command {
    Serve,
    Token(TokenRequest),
}

#[derive(Default)]
struct TokenRequest {
    user: Option<String>,
    topics: Vec<String>,
    publish: Option<Vec<String>>,
    ttl_secs: u64,
}

fn main() -> ExitCode {
    let (command, config) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("herald-edge: {err:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match Settings::load(config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("herald-edge: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match command {
        Command::Token(request) => match token(&settings, request) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("herald-edge token: {err:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve => serve(settings),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let _telemetry = match herald_telemetry::init(&settings.telemetry, &settings.node.resolved_id())
    {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("herald-edge: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald-edge: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(settings = %serde_json::to_string(&settings).unwrap_or_default(), "effective configuration");
    match runtime.block_on(herald_edge::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ herald_edge::StartError::GossipStopped) => {
            tracing::error!(error = %err, "herald edge node stopped after a fatal error");
            eprintln!("herald-edge: {err}");
            ExitCode::FAILURE
        }
        Err(err) => {
            tracing::error!(error = %err, "herald edge node failed to start");
            eprintln!("herald-edge: {err}");
            match err {
                // Unusable keys and the like are configuration problems too.
                herald_edge::StartError::Config(_) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

fn token(settings: &Settings, request: TokenRequest) -> anyhow::Result<String> {
    let secret = settings
        .auth
        .hs256_secret
        .as_ref()
        .context("auth.hs256_secret is required to mint tokens")?;
    let claims = Claims {
        sub: request.user,
        exp: expiry_in(Duration::from_secs(request.ttl_secs)),
        iat: Some(now_secs()),
        nbf: None,
        topics: request.topics,
        herald_publish: request.publish.map(|targets| {
            if targets.is_empty() {
                PublishClaim::All(true)
            } else {
                PublishClaim::Targets(targets)
            }
        }),
        iss: settings.auth.issuer.clone(),
        aud: settings.auth.audience.clone(),
    };
    if claims.sub.is_none() && claims.herald_publish.is_none() {
        bail!("give --user ID for a subscriber token or --publish for a publisher credential");
    }
    Ok(mint(secret.expose(), &claims)?)
}

fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> anyhow::Result<(Command, Option<PathBuf>)> {
    let mut config = None;
    let mut command = Command::Serve;
    let mut first = true;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "token" if first => {
                command = Command::Token(TokenRequest {
                    ttl_secs: 3600,
                    ..Default::default()
                })
            }
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--user" | "--topic" | "--ttl" | "--publish-to" => {
                let Command::Token(request) = &mut command else {
                    bail!("{arg} belongs to the token subcommand");
                };
                let given = value(&arg)?;
                match arg.as_str() {
                    "--user" => request.user = Some(given),
                    "--topic" => request.topics.push(given),
                    "--publish-to" => request.publish.get_or_insert_with(Vec::new).push(given),
                    _ => request.ttl_secs = given.parse().context("--ttl takes seconds")?,
                }
            }
            "--publish" => {
                let Command::Token(request) = &mut command else {
                    bail!("--publish belongs to the token subcommand");
                };
                request.publish.get_or_insert_with(Vec::new);
            }
            "-h" | "--help" => bail!(
                "usage: herald-edge [--config FILE]\n       herald-edge token (--user ID [--topic NAME]... | --publish [--publish-to user:ID|topic:NAME]...) [--ttl SECS] [--config FILE]"
            ),
            other => bail!("unknown argument {other:?} (try --help)"),
        }
        first = false;
    }
    Ok((command, config))
}
