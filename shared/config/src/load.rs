//! Layered loading: serde defaults, then an optional TOML file, then
//! `HERALD__SECTION__KEY` environment variables; the result is validated
//! ([`Settings::load`]).
//!
//! The merged values are read one `section.key` at a time: serde stops at
//! the first unknown key or mistyped value, and an operator fixing a file
//! should hear of every problem at once. A key that cannot be read keeps its
//! default while the rules are checked on the rest.

use std::path::Path;

use config::{Map, Source, Value, ValueKind};
use serde::Deserialize;

use crate::{ConfigError, Problem, Settings};

/// Prefix of the environment variables read by [`Settings::load`].
pub const ENV_PREFIX: &str = "HERALD";

impl Settings {
    /// Loads defaults, then `file` (TOML) if given, then `HERALD__*` variables
    /// from the process environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, None)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("http.cors_allowed_origins")
                .with_list_parse_key("auth.algorithms")
                .with_list_parse_key("telemetry.otlp_headers")
                .with_list_parse_key("gossip.seeds")
                .source(env),
        );
        let values = builder.build()?.collect()?;
        let (settings, mut problems) = read_each_key(values);
        problems.extend(settings.broken_rules());
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Reads `values` (sections of keys) into settings key by key: every key
/// that does not exist or holds a value of the wrong type is a problem, in
/// section and key order, and is left at its default.
fn read_each_key(values: Map<String, Value>) -> (Settings, Vec<Problem>) {
    let mut readable = Map::new();
    let mut problems = Vec::new();
    for (section, value) in sorted(values) {
        if let Err(err) = Settings::deserialize(table([(section.clone(), table([]))])) {
            // A section that does not exist: one problem, not one per key.
            problems.push(Problem::Unreadable(err));
            continue;
        }
        let ValueKind::Table(keys) = &value.kind else {
            // Not a table: `http = 5`.
            match Settings::deserialize(table([(section.clone(), value.clone())])) {
                Ok(_) => {
                    readable.insert(section, value);
                }
                Err(err) => problems.push(Problem::Unreadable(err)),
            }
            continue;
        };
        let mut kept = Map::new();
        for (key, value) in sorted(keys.clone()) {
            let single = table([(section.clone(), table([(key.clone(), value.clone())]))]);
            match Settings::deserialize(single) {
                Ok(_) => {
                    kept.insert(key, value);
                }
                Err(err) => problems.push(Problem::Unreadable(err)),
            }
        }
        readable.insert(section, Value::new(None, ValueKind::Table(kept)));
    }
    // Each key reads on its own and no setting depends on another's type,
    // so together they read too; should that ever change, say so rather
    // than check the rules on settings that were not read.
    match Settings::deserialize(Value::new(None, ValueKind::Table(readable))) {
        Ok(settings) => (settings, problems),
        Err(err) => {
            problems.push(Problem::Unreadable(err));
            (Settings::default(), problems)
        }
    }
}

/// A table value holding `entries`.
fn table<const N: usize>(entries: [(String, Value); N]) -> Value {
    Value::new(None, ValueKind::Table(entries.into_iter().collect()))
}

/// `map`'s entries in key order (the map itself has none).
fn sorted(map: Map<String, Value>) -> Vec<(String, Value)> {
    let mut entries: Vec<_> = map.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// Loading with an explicit environment, for the tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{ConfigError, Settings};

    /// An HS256 secret of the shortest accepted length.
    pub(crate) const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// An environment holding exactly `pairs`.
    pub(crate) fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Defaults plus the environment `pairs`, validated.
    pub(crate) fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(None, env(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{SECRET, env, load};
    use crate::{BusKind, ConfigError, Settings};

    #[test]
    fn defaults_plus_a_secret_are_valid() {
        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert_eq!(settings.http.listen, "127.0.0.1:8080");
        assert_eq!(settings.stream.heartbeat_ms, 15_000);
        assert_eq!(settings.bus.kind, BusKind::Memory);
    }

    #[test]
    fn environment_variables_override_nested_keys() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN", "0.0.0.0:9000"),
            ("HERALD__STREAM__QUEUE_CAPACITY", "8"),
        ])
        .expect("valid");
        assert_eq!(settings.http.listen, "0.0.0.0:9000");
        assert_eq!(settings.stream.queue_capacity, 8);
    }

    #[test]
    fn the_listen_backlog_holds_a_reconnect_storm_by_default_and_cannot_be_zero() {
        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert_eq!(settings.http.listen_backlog, 4096);
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN_BACKLOG", "16384"),
        ])
        .expect("valid");
        assert_eq!(settings.http.listen_backlog, 16384);
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTEN_BACKLOG", "0"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("http.listen_backlog"), "{err}");
    }

    #[test]
    fn cors_origins_are_a_comma_separated_list_in_the_environment() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            (
                "HERALD__HTTP__CORS_ALLOWED_ORIGINS",
                "https://a.example.com,http://localhost:3000",
            ),
        ])
        .expect("valid");
        assert_eq!(
            settings.http.cors_allowed_origins,
            ["https://a.example.com", "http://localhost:3000"]
        );
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__CORS_ALLOWED_ORIGINS", "a.example.com/"),
        ])
        .expect_err("invalid");
        assert!(
            err.to_string().contains("http.cors_allowed_origins"),
            "{err}"
        );
    }

    #[test]
    fn gossip_seeds_are_a_comma_separated_list_and_each_must_be_host_port() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__GOSSIP__SEEDS", "edge-1:7946,10.0.0.7:7946"),
            ("HERALD__GOSSIP__ADVERTISE", "edge-2:7946"),
        ])
        .expect("valid");
        assert_eq!(settings.gossip.seeds, ["edge-1:7946", "10.0.0.7:7946"]);
        assert_eq!(settings.gossip.advertise.as_deref(), Some("edge-2:7946"));
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__GOSSIP__SEEDS", "edge-1"),
            ("HERALD__GOSSIP__LISTEN", "everywhere"),
            ("HERALD__NODE__HTTP_ADVERTISE", "edge-1:8080"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        for key in ["gossip.seeds", "gossip.listen", "node.http_advertise"] {
            assert!(message.contains(key), "{key} not named in: {message}");
        }
    }

    /// Loads `toml` as a file `herald.toml`, with exactly the environment
    /// `pairs` on top.
    fn load_file(tag: &str, toml: &str, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("herald-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(&path, toml).expect("write");
        let loaded = Settings::load_from(Some(&path), env(pairs));
        let _ = std::fs::remove_dir_all(dir);
        loaded
    }

    #[test]
    fn a_file_is_read_and_the_environment_wins_over_it() {
        let settings = load_file(
            "layers",
            &format!("[http]\nlisten = \"127.0.0.1:7000\"\nmax_body_bytes = 10\n[auth]\nhs256_secret = \"{SECRET}\"\n"),
            &[("HERALD__HTTP__MAX_BODY_BYTES", "20")],
        )
        .expect("valid");
        assert_eq!(settings.http.listen, "127.0.0.1:7000");
        assert_eq!(settings.http.max_body_bytes, 20);
    }

    #[test]
    fn an_unknown_bus_kind_is_refused_naming_the_key() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "carrier-pigeon"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(message.contains("bus.kind"), "{message}");
        assert!(message.contains("carrier-pigeon"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_refused_rather_than_ignored() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__HTTP__LISTNE", "127.0.0.1:1"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn every_unknown_key_and_mistyped_value_is_reported_with_the_broken_rules() {
        let err = load_file(
            "many",
            "colour = \"blue\"\n\
             [colours]\nbackground = \"blue\"\nforeground = \"red\"\n\
             [http]\nlistne = \"127.0.0.1:1\"\nmax_body_bytes = \"lots\"\n\
             [stream]\nqueue_capacity = 0\n\
             [nats]\nreplicas = \"three\"\n",
            &[("HERALD__GOSSIP__SEEDS", "edge-1")],
        )
        .expect_err("invalid");
        let problems = err.problems();
        for expected in [
            "`colour`",
            "`colours`",
            "listne",
            "http.max_body_bytes",
            "nats.replicas",
            "stream.queue_capacity must be greater than 0",
            "gossip.seeds",
            "auth.hs256_secret is required",
        ] {
            assert_eq!(
                problems.iter().filter(|p| p.contains(expected)).count(),
                1,
                "{expected:?} once in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 8, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("http.max_body_bytes") && p.contains("herald.toml")),
            "a mistyped value names the file it came from: {problems:#?}"
        );
    }
}
