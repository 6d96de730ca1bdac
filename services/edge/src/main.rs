//! `herald-edge`: run an edge node, mint a development token, or check a
//! configuration file.
//!
//! ```text
//! herald-edge [serve] [--config FILE]
//! herald-edge token --user ID [--topic NAME]... [--ttl SECS] [--config FILE]
//! herald-edge token --publish [--publish-to user:ID|topic:NAME]... [--ttl SECS] [--config FILE]
//! herald-edge check-config [FILE]
//! herald-edge --help | --version
//! ```
//! Without a command it serves, as it always has. Configuration comes from
//! defaults, the optional TOML file and `HERALD__*` variables; invalid
//! configuration (or usage) exits with status 64 and a message naming each
//! bad key. The arguments are parsed by clap.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand};
use herald_config::Settings;
use herald_edge::{Claims, PublishClaim, expiry_in, mint, now_secs};

/// Exit status for invalid configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Herald edge node: holds browsers' Server-Sent Events connections and
/// streams each user their events from NATS JetStream.
#[derive(Debug, Parser)]
#[command(
    name = "herald-edge",
    version,
    after_help = "Configuration: built-in defaults, then --config FILE (TOML), then \
HERALD__SECTION__KEY environment variables (docs/configuration.md).\n\
Exit status: 0 success, 64 invalid configuration or usage, 1 any other failure."
)]
struct Cli {
    /// TOML configuration file; HERALD__SECTION__KEY variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// What to do; without a command, `serve`.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an edge node until SIGTERM or Ctrl-C (the default).
    Serve,
    /// Print a token signed with auth.hs256_secret (for development and
    /// smoke tests).
    Token(TokenArgs),
    /// Load a configuration file as `serve` would (HERALD__* variables on
    /// top) and print every problem, not only the first; exit 0 when valid.
    CheckConfig {
        /// The TOML file to check (default: --config, or none: defaults and
        /// the environment only).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).multiple(true).args(["user", "publish", "publish_to"])))]
struct TokenArgs {
    /// A subscriber token for this user id (the `sub` claim).
    #[arg(long, value_name = "ID")]
    user: Option<String>,
    /// A topic (name or pattern) the subscriber may follow; repeatable.
    #[arg(long = "topic", value_name = "NAME")]
    topics: Vec<String>,
    /// A publisher credential for any target (narrowed by --publish-to).
    #[arg(long)]
    publish: bool,
    /// A target the publisher may publish to, `user:ID` or `topic:NAME`;
    /// repeatable, implies --publish.
    #[arg(long = "publish-to", value_name = "TARGET")]
    publish_to: Vec<String>,
    /// Lifetime, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    ttl: u64,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version go to stdout and succeed; usage errors
            // go to stderr with the configuration status.
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let config = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match load(config) {
            Some(settings) => serve(settings),
            None => ExitCode::from(EXIT_CONFIG),
        },
        Command::Token(request) => {
            let Some(settings) = load(config) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            match token(&settings, request) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("herald-edge token: {err:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::CheckConfig { file } => check_config(file.as_deref().or(config)),
    }
}

/// The settings from `file` and the environment, or `None` once the
/// problems are printed.
fn load(file: Option<&Path>) -> Option<Settings> {
    match Settings::load(file) {
        Ok(settings) => Some(settings),
        Err(err) => {
            eprintln!("herald-edge: {err}");
            None
        }
    }
}

/// Loads `file` as `serve` would, then reads the key files it names and
/// parses the log filter; prints
/// every problem on stderr (exit 64) or that it is valid on stdout.
fn check_config(file: Option<&Path>) -> ExitCode {
    let name = file.map_or_else(
        || "the configuration".to_owned(),
        |f| f.display().to_string(),
    );
    let problems = match Settings::load(file) {
        // What only start-up finds: key files that hold no key, a log filter
        // that does not parse.
        Ok(settings) => [
            herald_edge::check_keys(&settings.auth).map_err(|err| err.to_string()),
            herald_telemetry::check(&settings.telemetry).map_err(|err| err.to_string()),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect(),
        Err(err) => err.problems(),
    };
    if problems.is_empty() {
        println!("{name}: valid");
        return ExitCode::SUCCESS;
    }
    let count = problems.len();
    eprintln!(
        "herald-edge check-config: {name}: {count} problem{}",
        if count == 1 { "" } else { "s" }
    );
    for problem in problems {
        eprintln!("  - {problem}");
    }
    ExitCode::from(EXIT_CONFIG)
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

fn token(settings: &Settings, request: TokenArgs) -> anyhow::Result<String> {
    let secret = settings
        .auth
        .hs256_secret
        .as_ref()
        .context("auth.hs256_secret is required to mint tokens")?;
    let herald_publish = if !request.publish_to.is_empty() {
        Some(PublishClaim::Targets(request.publish_to))
    } else if request.publish {
        Some(PublishClaim::All(true))
    } else {
        None
    };
    let claims = Claims {
        sub: request.user,
        exp: expiry_in(Duration::from_secs(request.ttl)),
        iat: Some(now_secs()),
        nbf: None,
        topics: request.topics,
        herald_publish,
        iss: settings.auth.issuer.clone(),
        aud: settings.auth.audience.clone(),
    };
    Ok(mint(secret.expose(), &claims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_command_means_serve_and_config_goes_before_or_after_a_command() {
        let cli = Cli::try_parse_from(["herald-edge", "--config", "a.toml"]).expect("parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.config.as_deref(), Some(Path::new("a.toml")));
        let cli =
            Cli::try_parse_from(["herald-edge", "token", "--user", "u", "--config", "b.toml"])
                .expect("parses");
        assert_eq!(cli.config.as_deref(), Some(Path::new("b.toml")));
    }

    #[test]
    fn a_token_needs_a_user_or_a_publish_right() {
        let err = Cli::try_parse_from(["herald-edge", "token", "--ttl", "5"]).expect_err("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        for args in [
            &["--user", "alice"][..],
            &["--publish"],
            &["--publish-to", "user:alice"],
            &["--user", "alice", "--publish"],
        ] {
            let full = ["herald-edge", "token"].iter().chain(args);
            assert!(Cli::try_parse_from(full).is_ok(), "{args:?}");
        }
    }
}
