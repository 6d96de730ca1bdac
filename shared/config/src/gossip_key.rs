//! The cluster's gossip key(s) (`gossip.secret` / `gossip.secret_file`),
//! decoded: [`GossipSettings::keys`] and [`GossipKeyError`].
//!
//! A key is base64 (standard alphabet) of [`GOSSIP_KEY_BYTES`] random bytes,
//! as `openssl rand -base64 32` prints it. During a rotation two keys are
//! active: several keys are separated by commas (or put one per line in the
//! file); the first seals what this node sends, every one opens what it
//! receives. No message here ever contains key material.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::GossipSettings;

/// Bytes in a gossip key (a 256-bit XChaCha20-Poly1305 key).
pub const GOSSIP_KEY_BYTES: usize = 32;

/// How to make a key, for every message that asks for one.
pub const GOSSIP_KEY_HOWTO: &str = "generate one with `openssl rand -base64 32` (or `head -c 32 /dev/urandom | base64`) \
     and put it in a file named by gossip.secret_file, or in HERALD__GOSSIP__SECRET; \
     every node of the cluster needs the same key (docs/security.md)";

/// Why the gossip keys could not be had. Nothing is bound or changed when
/// this is returned; the node refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum GossipKeyError {
    /// Both `gossip.secret` and `gossip.secret_file` are set.
    #[error("gossip.secret and gossip.secret_file are both set; set one")]
    BothSet,
    /// `gossip.secret_file` could not be read.
    #[error("gossip.secret_file: cannot read {path:?}")]
    Read {
        /// The file named.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The setting is set but holds no key.
    #[error("{key} holds no key; {GOSSIP_KEY_HOWTO}")]
    Empty {
        /// `gossip.secret` or `gossip.secret_file`.
        key: &'static str,
    },
    /// A key is not base64.
    #[error("{key}: key {position} is not base64 (standard alphabet); {GOSSIP_KEY_HOWTO}")]
    NotBase64 {
        /// `gossip.secret` or `gossip.secret_file`.
        key: &'static str,
        /// 1 for the first key.
        position: usize,
    },
    /// A key does not decode to [`GOSSIP_KEY_BYTES`] bytes.
    #[error(
        "{key}: key {position} decodes to {bytes} bytes, not {GOSSIP_KEY_BYTES}; {GOSSIP_KEY_HOWTO}"
    )]
    WrongLength {
        /// `gossip.secret` or `gossip.secret_file`.
        key: &'static str,
        /// 1 for the first key.
        position: usize,
        /// What it decoded to.
        bytes: usize,
    },
}

impl GossipSettings {
    /// The gossip keys, the sealing key first; empty when neither
    /// `gossip.secret` nor `gossip.secret_file` is set. Reads the file each
    /// time it is called.
    pub fn keys(&self) -> Result<Vec<[u8; GOSSIP_KEY_BYTES]>, GossipKeyError> {
        let (key, text) = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => return Err(GossipKeyError::BothSet),
            (Some(secret), None) => ("gossip.secret", secret.expose().to_owned()),
            (None, Some(path)) => (
                "gossip.secret_file",
                std::fs::read_to_string(path).map_err(|source| GossipKeyError::Read {
                    path: path.clone(),
                    source,
                })?,
            ),
            (None, None) => return Ok(Vec::new()),
        };
        let keys = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|encoded| !encoded.is_empty())
            .enumerate()
            .map(|(index, encoded)| {
                let position = index + 1;
                let bytes = STANDARD
                    .decode(encoded)
                    .map_err(|_| GossipKeyError::NotBase64 { key, position })?;
                <[u8; GOSSIP_KEY_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
                    GossipKeyError::WrongLength {
                        key,
                        position,
                        bytes: bytes.len(),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(GossipKeyError::Empty { key });
        }
        Ok(keys)
    }

    /// Adds the key problems to `problems`: unreadable or malformed keys,
    /// and a missing key when gossip listens beyond loopback.
    pub(crate) fn validate_keys(&self, problems: &mut Vec<String>) {
        let keys = match self.keys() {
            Ok(keys) => keys,
            Err(err) => {
                let mut message = err.to_string();
                if let GossipKeyError::Read { source, .. } = &err {
                    message.push_str(&format!(" ({source})"));
                }
                problems.push(message);
                return;
            }
        };
        if !self.enabled || !keys.is_empty() {
            return;
        }
        if let Ok(listen) = self.listen.parse::<SocketAddr>() {
            if !listen.ip().is_loopback() {
                problems.push(format!(
                    "gossip.secret: gossip listens on {listen}, which other hosts can reach, and no gossip key is set, \
                     so anyone who can send it a UDP datagram could rewrite the cluster view; {GOSSIP_KEY_HOWTO}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    /// Test keys, used nowhere else.
    const KEY: &str = "q5Yb3bJ0sAjeQhY6O4eH0nTq3b3m9m0m5y1xK2lV7Wc=";
    const OTHER: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn with_secret(secret: &str) -> GossipSettings {
        GossipSettings {
            secret: Some(Secret::new(secret)),
            ..GossipSettings::default()
        }
    }

    #[test]
    fn no_key_set_means_no_keys() {
        assert!(GossipSettings::default().keys().expect("ok").is_empty());
    }

    #[test]
    fn one_key_decodes_to_32_bytes() {
        let keys = with_secret(KEY).keys().expect("valid");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0], STANDARD.decode(KEY).expect("base64")[..]);
    }

    #[test]
    fn two_keys_separated_by_a_comma_keep_their_order() {
        let keys = with_secret(&format!("{OTHER}, {KEY}"))
            .keys()
            .expect("valid");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0][..4], [0, 1, 2, 3]);
    }

    #[test]
    fn a_key_file_holds_one_key_per_line() {
        let path = std::env::temp_dir().join(format!("herald-gossip-key-{}", std::process::id()));
        std::fs::write(&path, format!("{OTHER}\n{KEY}\n")).expect("write");
        let settings = GossipSettings {
            secret_file: Some(path.display().to_string()),
            ..GossipSettings::default()
        };
        let keys = settings.keys();
        let _ = std::fs::remove_file(&path);
        assert_eq!(keys.expect("valid").len(), 2);
    }

    #[test]
    fn a_short_or_non_base64_key_is_refused_without_echoing_it() {
        let short = with_secret("c2hvcnQ=").keys().expect_err("too short");
        assert!(matches!(
            short,
            GossipKeyError::WrongLength { bytes: 5, .. }
        ));
        let garbage = with_secret("not a key!").keys().expect_err("not base64");
        assert!(matches!(
            garbage,
            GossipKeyError::NotBase64 { position: 1, .. }
        ));
        for err in [short, garbage] {
            let message = err.to_string();
            assert!(message.contains("openssl rand -base64 32"), "{message}");
            assert!(
                !message.contains("c2hvcnQ") && !message.contains("not a key"),
                "{message}"
            );
        }
    }

    #[test]
    fn secret_and_secret_file_together_are_refused() {
        let settings = GossipSettings {
            secret_file: Some("/etc/herald/gossip.key".into()),
            ..with_secret(KEY)
        };
        assert!(matches!(settings.keys(), Err(GossipKeyError::BothSet)));
    }

    #[test]
    fn a_non_loopback_listen_address_without_a_key_is_a_problem_that_says_how_to_make_one() {
        for listen in ["0.0.0.0:7946", "10.1.2.3:7946", "[::]:7946"] {
            let settings = GossipSettings {
                listen: listen.into(),
                ..GossipSettings::default()
            };
            let mut problems = Vec::new();
            settings.validate_keys(&mut problems);
            assert_eq!(problems.len(), 1, "{listen}");
            assert!(
                problems[0].starts_with("gossip.secret: "),
                "{}",
                problems[0]
            );
            assert!(
                problems[0].contains("openssl rand -base64 32"),
                "{}",
                problems[0]
            );
        }
        for listen in ["127.0.0.1:7946", "[::1]:7946"] {
            let settings = GossipSettings {
                listen: listen.into(),
                ..GossipSettings::default()
            };
            let mut problems = Vec::new();
            settings.validate_keys(&mut problems);
            assert!(problems.is_empty(), "{listen}: {problems:?}");
        }
    }
}
