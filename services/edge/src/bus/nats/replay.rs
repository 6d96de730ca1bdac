//! Reading what a resuming client missed: each target's stored events after
//! the client's position for it, up to the head read from the stream leader.
//!
//! On nats-server 2.11+ a target is read with batched Direct Gets, which any
//! replica may answer, and the answer is used only when it proves itself
//! complete (below); otherwise, and always on older servers, the target is
//! read from the leader one event at a time, as before.
//!
//! # Why a replica's answer may be trusted here
//!
//! A replica's store is a prefix of the leader's history: it applies the same
//! entries in the same order, so a replica holding a message at sequence `s`
//! holds (or removed) everything before `s` exactly as the leader did. And a
//! subject's stored messages are always a window of what was ever stored on
//! it: the per-subject limit and the stream's limits remove the oldest first.
//!
//! Two reads, sent together:
//!
//! 1. a multi-subject "newest of" read ([`Store::newest_gathered`], shared
//!    with the resumes and follows of the moment), whose end
//!    status names the sequence `up_to` its server's view reached. Only used
//!    when `up_to >= head`: then its `newest` for the subject is the newest
//!    message stored at or before a point past `head`. If `newest <= after`
//!    (or the subject holds nothing), nothing of the subject was stored in
//!    `(after, head]` that is still there, and nothing newer than `newest` can
//!    have been removed while `newest` stayed (oldest first): nothing to send.
//! 2. a batched read of the subject from `after` itself on
//!    ([`Store::run_from`]), by any replica: a run of that replica's stored
//!    messages of the subject, in order, from `after`. Complete up to `head`
//!    as soon as it reaches `newest` (when `newest <= head`, nothing of the
//!    subject lies in `(newest, head]`) or passes `head` (the replica holds
//!    everything up to it); more batches are read until it does, and when the
//!    replica runs out first the answer proves nothing: the leader is read.
//!
//! What the run lacks can then only be what its replica removed. The
//! eviction check (the same rule as the leader path's count-and-oldest check,
//! judged on the run's own first message `first`): when `first` is the event
//! at `after` itself, nothing after it was removed (oldest first). Otherwise
//! something after `after` can only be missing when the subject's oldest
//! stored message lies beyond `after`; then every stored message of the
//! subject is from `after` on, so `first`'s `Nats-Num-Pending` is the
//! subject's whole count, and the per-subject limit removed something only if
//! that count is at the limit. So the history is reported lost (`expired`)
//! when `first > after + 1` and that count is at the limit: a needless reset
//! when the gap never held a message of the subject, never a silent skip.
//! Removals by the stream's own limits move its first sequence, which
//! [`check_position`] already judged from the leader's state.

use std::sync::Arc;

use herald_protocol::{EventId, StreamPosition, Target};

use super::decode::Decoder;
use super::store::{Batch, Newest, ReadError, Store, Stored, pending_of};
use crate::bus::{LostReason, Replay, ReplayError, check_position};

/// What a replay reads with.
pub(super) struct Replayer<'a> {
    pub(super) store: &'a Arc<Store>,
    pub(super) decoder: &'a Decoder,
    /// `nats.max_messages_per_subject`.
    pub(super) per_subject: u64,
}

/// One target's part of a replay.
enum Part {
    /// Its events after the position, up to the head (at most `left + 1`).
    Events(Vec<Stored>),
    /// Some of its history is gone.
    Lost(LostReason),
}

/// What was read for every target at once, before judging them one by one.
struct Prefetched {
    newest: Newest,
    /// Each target's first batch (by the targets' order; `None` when it had
    /// nothing to read).
    runs: Vec<Option<Batch>>,
}

impl Replayer<'_> {
    /// The events of `targets` after `from`, up to the stream's head, at most
    /// `limit` of them.
    pub(super) async fn replay(
        &self,
        targets: &[Target],
        from: &StreamPosition,
        limit: usize,
    ) -> Result<Replay, ReplayError> {
        let state = self.store.state().await?;
        let head = self.store.id(state.last_sequence);
        let lost = |reason| Ok(Replay::HistoryLost { reason, head });
        let subjects: Vec<String> = targets
            .iter()
            .map(|target| self.decoder.stored_subject(target))
            .collect();
        let mut prefetched = self.prefetch(&subjects, &from.seqs, head.seq, limit).await;
        let mut events = Vec::new();
        for (index, (subject, &after)) in subjects.iter().zip(&from.seqs).enumerate() {
            let position = EventId {
                epoch: from.epoch,
                seq: after,
            };
            if let Some(reason) = check_position(
                position,
                head.epoch,
                state.first_sequence,
                state.last_sequence,
            ) {
                return lost(reason);
            }
            let left = limit.saturating_sub(events.len());
            if after == head.seq {
                // Nothing can lie in (after, head]: a fresh stream's targets.
                continue;
            }
            let proven = match &mut prefetched {
                Some(prefetched) => {
                    let run = prefetched.runs.get_mut(index).and_then(Option::take);
                    self.proven(subject, after, head.seq, left, &prefetched.newest, run)
                        .await?
                }
                None => None,
            };
            let part = match proven {
                Some(part) => part,
                None => {
                    self.read_from_leader(subject, after, head.seq, left)
                        .await?
                }
            };
            let stored = match part {
                Part::Lost(reason) => return lost(reason),
                Part::Events(stored) if stored.len() > left => {
                    return lost(LostReason::TooFarBehind);
                }
                Part::Events(stored) => stored,
            };
            events.extend(stored.into_iter().filter_map(|message| {
                self.decoder
                    .decode(
                        &message.subject,
                        self.store.id(message.seq),
                        Some(&message.headers),
                        &message.payload,
                        message.stored_at,
                    )
                    .map(Arc::new)
            }));
        }
        events.sort_by_key(|event| event.id.seq);
        Ok(Replay::Complete { events, head })
    }

    /// The batched reads of every target, sent together (`None` on servers
    /// without batched reads, or when they failed: the leader is read).
    async fn prefetch(
        &self,
        subjects: &[String],
        afters: &[u64],
        head: u64,
        limit: usize,
    ) -> Option<Prefetched> {
        // Only targets with something in (after, head] to read.
        let wanted: Vec<usize> = (0..subjects.len())
            .filter(|&index| afters.get(index).is_some_and(|&after| after < head))
            .collect();
        if !self.store.batched_reads() || wanted.is_empty() {
            return None;
        }
        let asked: Vec<String> = wanted.iter().map(|&i| subjects[i].clone()).collect();
        // The event at `after` and one more than `limit` say all there is.
        let count = limit.saturating_add(2);
        let runs = wanted
            .iter()
            .map(|&i| self.store.run_from(&subjects[i], afters[i], count));
        let (newest, read) = futures_util::future::join(
            self.store.newest_gathered(asked),
            futures_util::future::join_all(runs),
        )
        .await;
        let outcome = newest.and_then(|newest| {
            let mut runs: Vec<Option<Batch>> = subjects.iter().map(|_| None).collect();
            for (&index, run) in wanted.iter().zip(read) {
                runs[index] = Some(run?);
            }
            Ok(Prefetched { newest, runs })
        });
        match outcome {
            Ok(prefetched) => Some(prefetched),
            Err(error) => {
                tracing::debug!(%error, "a batched replay read failed: reading from the leader");
                None
            }
        }
    }

    /// `subject`'s part, from the batched reads when they prove themselves
    /// complete up to `head` (see the module docs); `None` when they do not.
    async fn proven(
        &self,
        subject: &str,
        after: u64,
        head: u64,
        left: usize,
        newest: &Newest,
        run: Option<Batch>,
    ) -> Result<Option<Part>, ReadError> {
        if newest.unanswered.contains(subject) {
            // Nothing of any subject asked was stored (a 404, which says
            // nothing of how far its server looked): the leader's newest of
            // the subject settles the common case, a target with nothing new.
            return Ok(match self.store.last_of(subject).await? {
                None => Some(Part::Events(Vec::new())),
                Some(newest) if newest.seq <= after => Some(Part::Events(Vec::new())),
                Some(_) => None,
            });
        }
        if newest.through.is_none_or(|through| through < head) {
            return Ok(None);
        }
        let reach = match newest.by_subject.get(subject) {
            None => return Ok(Some(Part::Events(Vec::new()))),
            Some(link) if link.seq <= after => return Ok(Some(Part::Events(Vec::new()))),
            Some(link) if link.seq <= head => link.seq,
            Some(_) => head + 1,
        };
        let Some(mut batch) = run else {
            return Ok(None);
        };
        let Some(first) = batch.messages.first() else {
            return Ok(None);
        };
        if first.seq > after + 1 {
            // Its count is the subject's whole count (module docs).
            let Some(count) = pending_of(first) else {
                return Ok(None);
            };
            if count >= self.per_subject {
                return Ok(Some(Part::Lost(LostReason::Expired)));
            }
        }
        let mut events = Vec::new();
        loop {
            let Some(end) = batch.end else {
                return Ok(None);
            };
            let Some(last) = batch.messages.last().map(|message| message.seq) else {
                return Ok(None);
            };
            events.extend(
                batch
                    .messages
                    .into_iter()
                    .filter(|message| message.seq > after && message.seq <= head),
            );
            if events.len() > left || last >= reach {
                return Ok(Some(Part::Events(events)));
            }
            if end.pending == Some(0) {
                // Its replica had nothing more: the run ends short of what
                // the newest read says was stored.
                return Ok(None);
            }
            let count = (left - events.len()).saturating_add(1);
            batch = self.store.run_from(subject, last + 1, count).await?;
        }
    }

    /// `subject`'s part read from the stream leader, one event at a time.
    async fn read_from_leader(
        &self,
        subject: &str,
        after: u64,
        head: u64,
        left: usize,
    ) -> Result<Part, ReadError> {
        if self.evicted_after(subject, after).await? {
            return Ok(Part::Lost(LostReason::Expired));
        }
        Ok(Part::Events(
            self.store.between(subject, after, head, left).await?,
        ))
    }

    /// Whether the per-subject limit may have evicted messages of `subject`
    /// after `after`. The per-subject limit removes a subject's oldest messages
    /// without moving the stream's first sequence, so compare with the subject
    /// itself: when the subject is at its cap and its oldest retained message
    /// is newer than `after + 1`, something after `after` may be gone. This can
    /// answer "yes" for a gap that never held a message of this subject (a
    /// needless reset), never "no" for a real eviction (a silent skip).
    async fn evicted_after(&self, subject: &str, after: u64) -> Result<bool, ReadError> {
        if self.store.count_of(subject).await? < self.per_subject {
            return Ok(false);
        }
        Ok(self
            .store
            .first_of(subject)
            .await?
            .is_some_and(|oldest| oldest.seq > after + 1))
    }
}
