//! Setting up the NATS side: the client connection, the server version
//! check, and the stream Herald needs (created if missing, validated or
//! updated if present).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, ServerAddr};
use herald_config::{NatsSettings, NatsStorage};
use tokio::sync::Notify;

use super::NatsError;
use crate::metrics::Metrics;

/// Oldest nats-server accepted: multi-subject filters and RePublish as Herald
/// uses them are reliable from 2.10 on.
pub(super) const MIN_SERVER: (u64, u64) = (2, 10);

/// First server line answering multi-subject Direct Gets (the periodic check
/// reads many subjects' newest messages in one request from here on).
const BATCHED_READS: (u64, u64) = (2, 11);

/// What the connection tells the rest of the bus.
#[derive(Debug, Default)]
pub(super) struct ConnectionEvents {
    /// Whether the client is connected right now.
    pub connected: AtomicBool,
    /// Live copies may have been lost (a reconnect, a slow-consumer drop):
    /// the dispatcher checks every target now instead of at its next round.
    pub check_now: Notify,
}

/// Connects with the settings' options; `events` hears of every (dis)connection.
pub(super) async fn connect_client(
    settings: &NatsSettings,
    node_id: &str,
    events: Arc<ConnectionEvents>,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, NatsError> {
    let mut options = ConnectOptions::new()
        .name(node_id)
        .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .ping_interval(Duration::from_millis(settings.ping_interval_ms))
        .require_tls(settings.tls_required)
        .subscription_capacity(settings.subscription_capacity)
        .event_callback(move |event| {
            let events = Arc::clone(&events);
            let metrics = Arc::clone(&metrics);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        events.connected.store(true, Ordering::SeqCst);
                        metrics.nats_connected.set(1);
                        // Copies republished while disconnected are gone.
                        events.check_now.notify_one();
                        tracing::info!("NATS connection (re)established");
                    }
                    async_nats::Event::Disconnected => {
                        events.connected.store(false, Ordering::SeqCst);
                        metrics.nats_connected.set(0);
                        tracing::warn!(
                            "NATS connection lost; streams stay open, gaps are filled on reconnect"
                        );
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics.nats_slow_consumer.inc();
                        tracing::warn!(
                            subscription = sid,
                            "NATS dropped live messages for a slow subscription; checking every target"
                        );
                        events.check_now.notify_one();
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(seed) = &settings.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &settings.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::Setting {
                key: "nats.creds_file",
                source,
            })?;
    }
    if let Some(path) = &settings.tls_ca_file {
        options = options.add_root_certificates(path.into());
    }
    let servers = settings
        .url
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| NatsError::Setting {
            key: "nats.url",
            source,
        })?;
    if settings.ignore_discovered_servers {
        options = options.ignore_discovered_servers();
    }
    options
        .connect(servers)
        .await
        .map_err(|source| NatsError::Connect {
            url: settings.url.clone(),
            source,
        })
}

/// Locks `mutex`, taking over the data of a holder that panicked (every
/// value guarded here stays valid between statements).
/// Refuses servers older than [`MIN_SERVER`].
pub(super) fn check_version(version: &str) -> Result<(), NatsError> {
    if server_line(version) < MIN_SERVER {
        return Err(NatsError::ServerTooOld {
            found: version.to_owned(),
        });
    }
    Ok(())
}

/// The stream configuration Herald needs.
fn stream_config(settings: &NatsSettings) -> stream::Config {
    let prefix = &settings.subject_prefix;
    stream::Config {
        name: settings.stream.clone(),
        subjects: vec![format!("{prefix}.user.*"), format!("{prefix}.topic.*")],
        republish: Some(stream::Republish {
            source: format!("{prefix}.>"),
            destination: format!("{}.>", settings.live_prefix),
            headers_only: false,
        }),
        allow_direct: true,
        storage: match settings.storage {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: settings.replicas,
        max_age: Duration::from_secs(settings.max_age_secs),
        max_bytes: settings.max_bytes,
        max_messages_per_subject: settings.max_messages_per_subject,
        duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
        discard: stream::DiscardPolicy::Old,
        // Publishers get an error, not an acknowledgement, for an event no
        // edge would deliver (validation keeps this within 32 bits).
        max_message_size: i32::try_from(settings.max_message_bytes()).unwrap_or(i32::MAX),
        ..Default::default()
    }
}

/// Whether `found` refuses oversize events at a different size than Herald
/// wants: `(found, wanted)` limits, `-1` meaning none. Herald works either
/// way (the edge drops what it would not deliver), so this is updated under
/// `nats.update_stream` and otherwise reported and left alone, unlike a
/// [`conflict`].
fn outdated_size_limit(found: &stream::Config, wanted: &stream::Config) -> Option<(i32, i32)> {
    (found.max_message_size != wanted.max_message_size)
        .then_some((found.max_message_size, wanted.max_message_size))
}

/// The first field of `found` that conflicts with what Herald needs.
fn conflict(
    found: &stream::Config,
    wanted: &stream::Config,
) -> Option<(&'static str, String, String)> {
    let mut found_subjects = found.subjects.clone();
    let mut wanted_subjects = wanted.subjects.clone();
    found_subjects.sort();
    wanted_subjects.sort();
    if found_subjects != wanted_subjects {
        return Some((
            "subjects",
            format!("{found_subjects:?}"),
            format!("{wanted_subjects:?}"),
        ));
    }
    let republish = |r: &Option<stream::Republish>| {
        r.as_ref()
            .map(|r| {
                format!(
                    "{} -> {} (headers only: {})",
                    r.source, r.destination, r.headers_only
                )
            })
            .unwrap_or_else(|| "none".into())
    };
    if republish(&found.republish) != republish(&wanted.republish) {
        return Some((
            "republish",
            republish(&found.republish),
            republish(&wanted.republish),
        ));
    }
    None
}

/// Whether a stream creation failed only because the JetStream cluster is
/// still forming (see [`ensure_stream`]).
fn cluster_forming(kind: &jetstream::context::CreateStreamErrorKind) -> bool {
    use jetstream::context::CreateStreamErrorKind as Kind;
    match kind {
        Kind::TimedOut | Kind::JetStreamUnavailable => true,
        Kind::JetStream(err) => err.error_code() == jetstream::ErrorCode::CLUSTER_NO_PEERS,
        _ => false,
    }
}

/// Creates the stream if missing; validates (or updates) it if present.
pub(super) async fn ensure_stream(
    jetstream: &jetstream::Context,
    settings: &NatsSettings,
) -> Result<(stream::Stream, u64), NatsError> {
    let failed = |source: async_nats::Error| NatsError::Stream {
        stream: settings.stream.clone(),
        source,
    };
    let wanted = stream_config(settings);
    // A JetStream cluster whose servers were started together times requests
    // out while it elects its leaders, and refuses to place a replicated
    // stream until its peers have joined ("no suitable peers"): retry those
    // for a bounded time instead of failing the start. Anything else fails
    // at once.
    let patience = Duration::from_millis(settings.connect_timeout_ms.max(1_000) * 6);
    let started = std::time::Instant::now();
    let mut stream = loop {
        match jetstream.get_or_create_stream(wanted.clone()).await {
            Ok(stream) => break stream,
            Err(err) if cluster_forming(&err.kind()) && started.elapsed() < patience => {
                tracing::warn!(stream = %settings.stream, error = %err, "JetStream not answering yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => return Err(failed(err.into())),
        }
    };
    let info = stream
        .info()
        .await
        .map_err(|err| failed(err.into()))?
        .clone();
    let conflicting = conflict(&info.config, &wanted);
    let size_limit = outdated_size_limit(&info.config, &wanted);
    if let Some(&(field, ref found, ref wanted_value)) = conflicting.as_ref() {
        if !settings.update_stream {
            return Err(NatsError::StreamConflict {
                stream: settings.stream.clone(),
                field,
                found: found.clone(),
                wanted: wanted_value.clone(),
            });
        }
        tracing::warn!(stream = %settings.stream, field, %found, "updating the stream's configuration (nats.update_stream = true)");
    }
    if let Some((found, wanted_limit)) = size_limit {
        if settings.update_stream {
            tracing::warn!(stream = %settings.stream, found, wanted = wanted_limit, "updating the stream's max_msg_size (nats.update_stream = true)");
        } else {
            tracing::warn!(
                stream = %settings.stream,
                found,
                wanted = wanted_limit,
                "the stream's max_msg_size differs from the one nats.max_event_bytes asks for; left as it is (set nats.update_stream = true to update it)"
            );
        }
    }
    if settings.update_stream && (conflicting.is_some() || size_limit.is_some()) {
        let mut updated = info.config.clone();
        updated.subjects = wanted.subjects.clone();
        updated.republish = wanted.republish.clone();
        updated.max_message_size = wanted.max_message_size;
        jetstream
            .update_stream(updated)
            .await
            .map_err(|err| failed(err.into()))?;
        stream = jetstream
            .get_stream(&settings.stream)
            .await
            .map_err(|err| failed(err.into()))?;
    }
    Ok((stream, super::store::epoch_of(&info)))
}

/// Whether `version` answers multi-subject Direct Gets.
pub(super) fn has_batched_reads(version: &str) -> bool {
    server_line(version) >= BATCHED_READS
}

/// The (major, minor) of a server version string.
fn server_line(version: &str) -> (u64, u64) {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_10_are_refused() {
        assert!(check_version("2.9.25").is_err());
        assert!(check_version("v2.9.10").is_err());
        assert!(check_version("2.10.23").is_ok());
        assert!(check_version("2.11.9").is_ok());
        assert!(check_version("2.12.0-beta.1").is_ok());
    }

    #[test]
    fn batched_reads_start_with_2_11() {
        assert!(!has_batched_reads("2.10.29"));
        assert!(has_batched_reads("2.11.9"));
        assert!(has_batched_reads("v2.12.0-beta.1"));
    }

    #[test]
    fn start_up_waits_only_for_a_cluster_still_forming() {
        use jetstream::context::CreateStreamErrorKind as Kind;
        let refused = |code: u64| {
            let error: jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 400, "err_code": code, "description": "refused"
            }))
            .expect("a JetStream API error");
            Kind::JetStream(error)
        };
        assert!(cluster_forming(&Kind::TimedOut));
        assert!(cluster_forming(&Kind::JetStreamUnavailable));
        // "no suitable peers for placement": the replicas have not joined yet.
        assert!(cluster_forming(&refused(10005)));
        // "stream name already in use with a different configuration".
        assert!(!cluster_forming(&refused(10058)));
        assert!(!cluster_forming(&Kind::InvalidStreamName));
    }

    #[test]
    fn a_stream_without_republish_or_with_other_subjects_conflicts() {
        let settings = NatsSettings::default();
        let wanted = stream_config(&settings);
        assert!(conflict(&wanted, &wanted).is_none());
        let mut other = wanted.clone();
        other.republish = None;
        assert_eq!(conflict(&other, &wanted).map(|c| c.0), Some("republish"));
        let mut other = wanted.clone();
        other.subjects = vec!["herald.>".into()];
        assert_eq!(conflict(&other, &wanted).map(|c| c.0), Some("subjects"));
        let mut other = wanted.clone();
        other.allow_direct = false;
        assert!(
            conflict(&other, &wanted).is_none(),
            "Herald reads from the stream leader, not with Direct Get"
        );
    }

    #[test]
    fn the_stream_refuses_messages_over_the_event_limit_plus_the_header_allowance() {
        let settings = NatsSettings {
            max_event_bytes: 1024,
            ..NatsSettings::default()
        };
        let wanted = stream_config(&settings);
        assert_eq!(
            wanted.max_message_size as usize,
            1024 + herald_config::STREAM_HEADER_ALLOWANCE_BYTES
        );
        let mut unlimited = wanted.clone();
        unlimited.max_message_size = -1;
        assert_eq!(
            outdated_size_limit(&unlimited, &wanted),
            Some((-1, wanted.max_message_size))
        );
        assert!(
            conflict(&unlimited, &wanted).is_none(),
            "a stream without the limit still works: it is not a conflict"
        );
        assert_eq!(outdated_size_limit(&wanted, &wanted), None);
    }
}
