//! Validation: [`Settings::validate`] checks every rule that types alone do
//! not express and reports every problem at once, each naming its key. Each
//! section checks its own rules (`validate` in its file); this file runs them
//! in a fixed order, so a report always lists problems the same way.

use crate::{BusKind, ConfigError, Problem, Settings};

impl Settings {
    /// Checks every rule that types alone do not express; reports all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.broken_rules();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every rule these settings break, in a fixed order.
    pub(crate) fn broken_rules(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("http.max_body_bytes", self.http.max_body_bytes),
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("stream.heartbeat_ms", self.stream.heartbeat_ms),
            ("stream.queue_capacity", self.stream.queue_capacity as u64),
            ("stream.max_batch_bytes", self.stream.max_batch_bytes as u64),
            ("stream.max_connections", self.stream.max_connections as u64),
            (
                "stream.max_connections_per_user",
                self.stream.max_connections_per_user as u64,
            ),
            ("memory.max_events", self.memory.max_events as u64),
            ("memory.max_bytes", self.memory.max_bytes as u64),
            ("memory.max_age_secs", self.memory.max_age_secs),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be greater than 0"));
            }
        }
        self.http.validate(&mut problems);
        self.admin.validate(&self.http.listen, &mut problems);
        self.auth.validate(&mut problems);
        self.gossip.validate(&mut problems);
        self.rebalance.validate(&mut problems);
        self.node.validate(&mut problems);
        if self.bus.kind == BusKind::Nats {
            self.nats.validate(&mut problems);
        }
        self.telemetry.validate(&mut problems);
        problems.into_iter().map(Problem::Rule).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::BusKind;
    use crate::load::testing::{SECRET, load};

    #[test]
    fn every_problem_is_reported_at_once_naming_its_key() {
        let err = load(&[
            ("HERALD__HTTP__LISTEN", "not-an-address"),
            ("HERALD__STREAM__QUEUE_CAPACITY", "0"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(message.contains("http.listen"), "{message}");
        assert!(message.contains("stream.queue_capacity"), "{message}");
        assert!(
            message.contains("auth.hs256_secret is required"),
            "{message}"
        );
    }

    #[test]
    fn algorithms_are_an_allowlist_that_needs_matching_keys() {
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__ALGORITHMS", "HS256,RS256,none"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(
            message.contains("RS256, which needs auth.public_key_file"),
            "{message}"
        );
        assert!(message.contains("unknown algorithm \"none\""), "{message}");
        let err = load(&[
            ("HERALD__AUTH__ALGORITHMS", "ES256"),
            ("HERALD__AUTH__JWKS_FILE", "/nonexistent/jwks.json"),
        ])
        .expect_err("invalid");
        assert!(err.to_string().contains("auth.jwks_file"), "{err}");
    }

    #[test]
    fn a_revocation_lasts_a_day_unless_configured_and_never_zero_seconds() {
        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert_eq!(settings.auth.revocation_ttl_secs, 86_400);
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__REVOCATION_TTL_SECS", "3600"),
        ])
        .expect("valid");
        assert_eq!(settings.auth.revocation_ttl_secs, 3600);
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__AUTH__REVOCATION_TTL_SECS", "0"),
        ])
        .expect_err("invalid");
        assert!(
            err.to_string().contains("auth.revocation_ttl_secs"),
            "{err}"
        );
    }

    #[test]
    fn the_nats_bus_is_configured_from_the_environment_and_checked() {
        let settings = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "nats"),
            ("HERALD__NATS__URL", "nats://10.0.0.1:4222"),
            ("HERALD__NATS__REPLICAS", "3"),
        ])
        .expect("valid");
        assert_eq!(settings.bus.kind, BusKind::Nats);
        assert_eq!(settings.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(settings.nats.replicas, 3);
        assert_eq!(
            settings.nats.subscription_capacity, 65_536,
            "async-nats' own default"
        );
        let err = load(&[
            ("HERALD__AUTH__HS256_SECRET", SECRET),
            ("HERALD__BUS__KIND", "nats"),
            ("HERALD__NATS__LIVE_PREFIX", "herald.live"),
            ("HERALD__NATS__MAX_BYTES", "0"),
            ("HERALD__NATS__SUBSCRIPTION_CAPACITY", "1"),
            ("HERALD__NATS__MAX_EVENT_BYTES", "2147483647"),
        ])
        .expect_err("invalid");
        let message = err.to_string();
        assert!(
            message.contains("nats.live_prefix must not overlap"),
            "{message}"
        );
        assert!(message.contains("nats.max_bytes"), "{message}");
        assert!(
            message.contains("nats.subscription_capacity must be at least 2"),
            "{message}"
        );
        assert!(
            message.contains("nats.max_event_bytes must be at most 2147479551"),
            "the stream's 32-bit message size limit: {message}"
        );
    }

    #[test]
    fn a_short_secret_is_refused_and_secrets_never_print() {
        let err = load(&[("HERALD__AUTH__HS256_SECRET", "short")]).expect_err("invalid");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");

        let settings = load(&[("HERALD__AUTH__HS256_SECRET", SECRET)]).expect("valid");
        assert!(!format!("{settings:?}").contains(SECRET));
        let json = serde_json::to_string(&settings).expect("serializes");
        assert!(!json.contains(SECRET), "{json}");
    }
}
