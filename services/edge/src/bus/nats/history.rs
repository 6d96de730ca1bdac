//! Noticing that the stored history changed under a running node.
//!
//! An SSE id is the stream's epoch and sequence. Two things can make an id
//! the node already sent name a different event, or none:
//!
//! - **The stream was recreated** (deleted and created again, or lost with
//!   every server's data): its creation time, hence its epoch, changed.
//! - **Acknowledged writes were lost** (servers restarted from storage that
//!   missed its last writes, a store restored from a backup): the creation
//!   time is the same, but the sequence went back and new events reuse
//!   sequences the node already sent. Left alone, a follower would drop those
//!   events as duplicates and a resuming client would skip them: a silent
//!   loss.
//!
//! The node keeps a [`Mark`]: the sequence and store time of the newest event
//! it delivered, and the highest sequence it has seen at all. When the NATS
//! connection drops it copies both aside (the checkpoint); once reconnected,
//! before anything read on the new connection is delivered and before any
//! follower fills its gap, it checks that the stream's last
//! sequence is not below the highest seen and that the stream still holds
//! the newest delivered event at its sequence. When either fails, the node
//! moves the epoch for every node (stream metadata
//! `herald_epoch`) and ends every stream with a `retry:` hint: each client
//! resumes with its old id, which is now from another epoch, and gets exactly
//! one `herald.reset`. A live message that could only come from a changed
//! history (at or below the mark's sequence but stored after it) asks for
//! the same check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::stream;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{API_TIMEOUT, Shared, epoch_of, lock};
use crate::bus::ReplayError;

/// Stream metadata key holding the epoch once a node found that the history
/// went back; without it the epoch is the stream's creation time.
pub(super) const EPOCH_METADATA: &str = "herald_epoch";

/// The newest event a node delivered: its sequence and, when the stream said,
/// its store time (a sequence reused after lost writes has another time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Mark {
    seq: u64,
    stored_at: Option<SystemTime>,
}

/// The node's marks and the coordination between the check and the followers.
#[derive(Debug)]
pub(super) struct History {
    mark: Mutex<Mark>,
    /// The highest stream sequence this node has seen (delivered or not: live
    /// messages, stream state, publish acknowledgements); a stream whose last
    /// sequence is now below it went back even if nothing lost was delivered.
    high_seen: AtomicU64,
    /// `high_seen` when the connection dropped.
    high_at_checkpoint: AtomicU64,
    /// Bumped each time the history changed: followers start again from the
    /// new history's position instead of their old one.
    generation: watch::Sender<u64>,
    /// The mark when the connection dropped (or when a live message looked
    /// wrong): what the check compares with the stream.
    checkpoint: Mutex<Mark>,
    /// Wakes the check for a live message that looked wrong.
    recheck: Notify,
    /// The connection number (see `Shared::connection`) up to which the
    /// history has been checked; nothing from a newer connection is
    /// delivered before it is.
    checked: watch::Sender<u64>,
}

impl History {
    pub(super) fn new() -> Arc<History> {
        Arc::new(History {
            mark: Mutex::new(Mark::default()),
            high_seen: AtomicU64::new(0),
            high_at_checkpoint: AtomicU64::new(0),
            generation: watch::channel(0).0,
            checkpoint: Mutex::new(Mark::default()),
            recheck: Notify::new(),
            checked: watch::channel(0).0,
        })
    }

    /// Records an event delivered from the stream (a filled gap; live
    /// messages are recorded by [`History::suspicious`]).
    pub(super) fn delivered(&self, seq: u64, stored_at: Option<SystemTime>) {
        let mut mark = lock(&self.mark);
        if seq > mark.seq {
            *mark = Mark { seq, stored_at };
        }
    }

    /// Records a stream sequence seen in any way.
    pub(super) fn seen(&self, seq: u64) {
        self.high_seen.fetch_max(seq, Ordering::Relaxed);
    }

    /// The connection dropped: what was delivered until now is what the
    /// stream must still hold when it is back, and its last sequence may not
    /// be lower than what was seen.
    pub(super) fn disconnected(&self) {
        let mark = *lock(&self.mark);
        *lock(&self.checkpoint) = mark;
        self.high_at_checkpoint
            .store(self.high_seen.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The history changed: nothing seen or delivered before counts, and
    /// followers start again.
    fn changed(&self) {
        *lock(&self.mark) = Mark::default();
        *lock(&self.checkpoint) = Mark::default();
        self.high_seen.store(0, Ordering::Relaxed);
        self.high_at_checkpoint.store(0, Ordering::Relaxed);
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// How many times the history changed so far.
    pub(super) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Watches for history changes (see [`History::changed`]).
    pub(super) fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A live message at `seq`, stored at `stored_at`. One above the newest
    /// delivered sequence becomes the newest (it is delivered next: one lock
    /// per live message, not two). One at or below it but stored after it
    /// cannot be a late copy of an event already delivered, only an event of
    /// a changed history: asks for the check and returns `true` then.
    pub(super) fn suspicious(&self, seq: u64, stored_at: Option<SystemTime>) -> bool {
        let mut mark = lock(&self.mark);
        if seq > mark.seq {
            *mark = Mark { seq, stored_at };
            return false;
        }
        let suspicious =
            matches!((stored_at, mark.stored_at), (Some(at), Some(newest)) if at > newest);
        if suspicious {
            let newest = *mark;
            drop(mark);
            *lock(&self.checkpoint) = newest;
            self.recheck.notify_one();
        }
        suspicious
    }

    /// Records that the history needs no check for connections up to
    /// `connection` (the one the bus started with).
    pub(super) fn checked_up_to(&self, connection: u64) {
        self.checked.send_replace(connection);
    }

    /// Whether the history was checked after connection `connection`.
    pub(super) fn is_checked(&self, connection: u64) -> bool {
        *self.checked.borrow() >= connection
    }

    /// Waits until the history was checked after connection number
    /// `connection` (or `stop`). Returns `false` when stopped.
    pub(super) async fn checked_after(&self, connection: u64, stop: &CancellationToken) -> bool {
        let mut checked = self.checked.subscribe();
        tokio::select! {
            _ = stop.cancelled() => false,
            result = checked.wait_for(|&checked| checked >= connection) => result.is_ok(),
        }
    }
}

impl Shared {
    /// Whether the history changed under this node since the checkpoint: the
    /// epoch moved (stream recreated, or another node found lost writes), or
    /// the stream no longer holds the checkpoint's event at its sequence (then
    /// this node moves the epoch for everyone).
    async fn history_changed(&self) -> Result<bool, ReplayError> {
        let known = self.epoch.load(Ordering::Relaxed);
        let state = self.state().await?;
        if self.epoch.load(Ordering::Relaxed) != known {
            return Ok(true);
        }
        let high = self.history.high_at_checkpoint.load(Ordering::Relaxed);
        if state.last_sequence < high {
            tracing::warn!(
                stream = %self.settings.stream,
                seen = high,
                stored = state.last_sequence,
                "the stream's last sequence went back (acknowledged writes lost, or restored from an older copy)"
            );
            self.move_epoch(known).await?;
            return Ok(true);
        }
        let checkpoint = *lock(&self.history.checkpoint);
        if checkpoint.seq == 0 {
            return Ok(false);
        }
        let held =
            match tokio::time::timeout(API_TIMEOUT, self.stream.get_raw_message(checkpoint.seq))
                .await
                .map_err(|_| ReplayError("reading the checkpoint's event timed out".into()))?
            {
                Ok(message) => checkpoint
                    .stored_at
                    .is_none_or(|at| SystemTime::from(message.time) == at),
                // Removed by the limits or a purge: gone forward, not back.
                Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    checkpoint.seq <= state.last_sequence
                }
                Err(err) => return Err(ReplayError(err.to_string())),
            };
        if held {
            return Ok(false);
        }
        tracing::warn!(
            stream = %self.settings.stream,
            delivered = checkpoint.seq,
            stored = state.last_sequence,
            "the stream lost events this node delivered (acknowledged writes lost, or restored from an older copy)"
        );
        self.move_epoch(known).await?;
        Ok(true)
    }

    /// Gives the stream a new epoch (stream metadata), unless another node
    /// already did: every id sent before becomes another epoch's.
    async fn move_epoch(&self, known: u64) -> Result<(), ReplayError> {
        let failed = |err: String| ReplayError(format!("cannot move the epoch: {err}"));
        let mut stream = self
            .jetstream
            .get_stream(&self.settings.stream)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = stream.info().await.map_err(|e| failed(e.to_string()))?;
        let current = epoch_of(info);
        if current != known {
            self.epoch.store(current, Ordering::Relaxed);
            return Ok(());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let next = now.max(known + 1);
        let mut config = info.config.clone();
        config
            .metadata
            .insert(EPOCH_METADATA.to_owned(), format!("{next:x}"));
        self.jetstream
            .update_stream(config)
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.epoch.store(next, Ordering::Relaxed);
        tracing::warn!(stream = %self.settings.stream, epoch = %format!("{next:x}"), "moved the epoch: old ids now get herald.reset");
        Ok(())
    }
}

/// Checks the history after every reconnect and whenever a live message
/// looked wrong, until the stream answers; ends every stream when it changed.
/// Runs until `stop` (the bus is dropped).
pub(super) async fn watch(
    shared: Weak<Shared>,
    history: Arc<History>,
    mut connections: watch::Receiver<()>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = connections.changed() => if changed.is_err() { return },
            _ = history.recheck.notified() => {}
        }
        connections.mark_unchanged();
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            // Read before the check: a reconnect during it is checked again.
            let connection = shared.connection();
            match shared.history_changed().await {
                Ok(changed) => {
                    if changed {
                        history.changed();
                        shared.metrics.history_changes.inc();
                        shared.sink.history_changed();
                    }
                    history
                        .checked
                        .send_modify(|checked| *checked = (*checked).max(connection));
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot check the stream's history yet; live gaps wait for it");
                }
            }
            drop(shared);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: u64) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_micros(micros))
    }

    #[test]
    fn a_late_copy_of_a_delivered_event_is_not_suspicious() {
        let history = History::new();
        history.delivered(10, at(1_000));
        history.delivered(12, at(1_200));
        assert!(!history.suspicious(11, at(1_100)));
        assert!(!history.suspicious(12, at(1_200)));
        assert!(
            !history.suspicious(13, at(1_300)),
            "newer events are simply new"
        );
    }

    #[test]
    fn a_reused_sequence_stored_later_is_suspicious_and_sets_the_checkpoint() {
        let history = History::new();
        history.delivered(12, at(1_200));
        assert!(history.suspicious(11, at(5_000)));
        assert_eq!(
            *lock(&history.checkpoint),
            Mark {
                seq: 12,
                stored_at: at(1_200)
            }
        );
    }

    #[test]
    fn the_checkpoint_is_the_mark_when_the_connection_dropped() {
        let history = History::new();
        history.delivered(7, at(700));
        history.disconnected();
        // Events delivered after the drop do not move what is checked.
        history.delivered(9, at(900));
        assert_eq!(
            *lock(&history.checkpoint),
            Mark {
                seq: 7,
                stored_at: at(700)
            }
        );
    }

    #[test]
    fn without_store_times_nothing_is_suspicious() {
        let history = History::new();
        history.delivered(12, None);
        assert!(!history.suspicious(3, at(9_999)));
    }
}
