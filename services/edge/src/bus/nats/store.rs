//! Reading the stream: every read the NATS bus makes of stored events, and
//! the stream's epoch.
//!
//! Reads that decide what a client is sent go to the stream leader
//! (`STREAM.MSG.GET`), never Direct Get: any replica answers a Direct Get, and
//! one that has not caught up answers "nothing after" for events the leader
//! already acknowledged and republished; a replay or gap fill read that way
//! would skip them silently. Two exceptions, both batched Direct Gets whose
//! answers are only trusted as far as they prove themselves complete: the
//! periodic check's read of many subjects' newest messages
//! ([`Store::newest_of`]: it only *finds* work, and its answer carries the
//! sequence it is complete up to), and a resume's read of what a client
//! missed ([`Store::run_from`]; the proof and its fallback to leader reads
//! are in `replay`).
//!
//! The stream's state (a full `STREAM.INFO` from the leader) is read through a
//! [`Coalesced`] read: callers arriving together share one request, but only
//! one sent after they arrived.
//!
//! The epoch (the first half of every SSE id) is the stream's creation time,
//! or, once a node found that the stored history went back, the value it
//! wrote into the stream's metadata ([`Store::move_epoch`]). Every read of the
//! stream's state notices a changed epoch and publishes it on a watch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_protocol::{Epoch, EventId};
use tokio::sync::watch;

use super::chain::Link;
use super::coalesce::Coalesced;
use super::gather::Gathered;
use super::lock;

/// Stream metadata key holding the epoch once a node found that the history
/// went back; without it the epoch is the stream's creation time.
pub(super) const EPOCH_METADATA: &str = "herald_epoch";

/// How long one JetStream API call may take.
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Most subjects (or messages) one batched read asks for (nats-server answers
/// at most 1024 messages to one multi-subject Direct Get).
const SUBJECTS_PER_BATCH: usize = 1000;

/// How many subjects (or messages of one subject) one batched read may ask
/// for when each subscription buffers `capacity` messages
/// (`nats.subscription_capacity`). The answer comes on a fresh inbox
/// subscription: one message per subject (or per message asked), then the
/// end-of-batch status, all possibly in one read from the socket before the
/// reader takes any. async-nats drops what does not fit, and a dropped answer
/// would read as "nothing stored": so at most `capacity - 1`, never fewer
/// than one.
pub(super) fn subjects_per_batch(capacity: usize) -> usize {
    SUBJECTS_PER_BATCH.min(capacity.saturating_sub(1)).max(1)
}

/// What one multi-subject read's answer says. An answer cut short (the server
/// stops at its byte limit, `max_pending`, and says how many it did not send)
/// says nothing of the subjects left: a subject missing from it could then
/// have a newer message than any sent, so no part of it is complete.
fn newest_answered(batch: Batch) -> Newest {
    let complete = batch.end.filter(|end| end.pending.unwrap_or(0) == 0);
    Newest {
        by_subject: batch
            .messages
            .iter()
            .map(|message| (message.subject.clone(), message.link()))
            .collect(),
        through: complete.and_then(|end| end.up_to),
        ..Newest::default()
    }
}

/// Why the stream could not be read. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The server did not answer within [`API_TIMEOUT`].
    #[error("reading the stream timed out")]
    TimedOut,
    /// The request failed (no connection, no leader, refused).
    #[error("reading the stream failed")]
    Failed(#[source] async_nats::Error),
    /// A batched read was answered with an error status.
    #[error("the server refused a batched read: {0}")]
    BatchRefused(#[source] BatchRefusal),
    /// A read shared with other callers ([`Coalesced`]) failed.
    #[error(transparent)]
    Shared(Arc<ReadError>),
}

/// How the server refused a batched read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchRefusal {
    /// A reply lacked the headers every answer carries.
    #[error("a reply without subject, sequence or time")]
    Malformed,
    /// No server answers Direct Gets for the stream.
    #[error("no responders")]
    NoResponders,
    /// Another error status, with the server's description of it.
    #[error("{code} {description}")]
    Status {
        /// The status code.
        code: u16,
        /// The server's words (empty when it gave none).
        description: String,
    },
}

/// One stored message, as read from the stream.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) subject: String,
    pub(super) seq: u64,
    pub(super) stored_at: SystemTime,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

impl Stored {
    /// Its place in its subject's chain.
    pub(super) fn link(&self) -> Link {
        Link {
            seq: self.seq,
            stored_at: Some(self.stored_at),
        }
    }
}

impl From<jetstream::message::StreamMessage> for Stored {
    fn from(message: jetstream::message::StreamMessage) -> Self {
        Stored {
            subject: message.subject.to_string(),
            seq: message.sequence,
            stored_at: message.time.into(),
            headers: message.headers,
            payload: message.payload,
        }
    }
}

/// Whether the event a chain ends with is still what the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// The stream holds it, at its sequence, with its store time.
    Stands,
    /// It was removed (limits, purge, delete): history moved forward.
    Removed,
    /// Its sequence holds another event, or lies beyond the stream's end: the
    /// stored history went back (acknowledged events lost).
    Rewound,
}

/// The newest stored message of many subjects, complete up to `through`.
#[derive(Debug, Default)]
pub(super) struct Newest {
    /// Subject → its newest message (subjects with none are absent).
    pub(super) by_subject: HashMap<String, Link>,
    /// Every stored message up to this sequence was considered; `None` when the
    /// answer cannot say (nothing stored for any subject asked).
    pub(super) through: Option<u64>,
    /// Subjects whose part of the answer cannot say how far it is complete
    /// (a batch with nothing stored for any of its subjects): judged by the
    /// next check instead.
    pub(super) unanswered: HashSet<String>,
    /// Requests the answer took.
    pub(super) reads: u64,
    /// Subjects whose newest message is at or below this sequence were left
    /// out of the answer ([`Store::newest_after`]): absent from `by_subject`
    /// means "nothing after it", not "nothing stored". 0: nothing left out.
    pub(super) left_out_through: u64,
}

/// A batched Direct Get's answer: the messages, in stream order, then how it
/// ended.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The messages answered.
    pub(super) messages: Vec<Stored>,
    /// The end-of-batch status; `None` when the server had nothing to answer
    /// (a 404 instead, which says nothing of how far it looked).
    pub(super) end: Option<BatchEnd>,
}

/// What the end-of-batch status (204) of a batched Direct Get says.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BatchEnd {
    /// `Nats-Num-Pending`: how many more messages match after the last one
    /// answered (the batch was cut short when it is more than 0).
    pub(super) pending: Option<u64>,
    /// `Nats-UpTo-Sequence` (multi-subject reads only): the answering
    /// server's last sequence; every message up to it was considered.
    pub(super) up_to: Option<u64>,
}

/// The bus's reads of the stream, and its epoch.
pub(super) struct Store {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: stream::Stream,
    name: String,
    epoch: AtomicU64,
    epochs: watch::Sender<u64>,
    /// Whether the server answers multi-subject Direct Gets (2.11+).
    batched_reads: bool,
    /// Most subjects (or messages) one batched read asks for
    /// ([`subjects_per_batch`]).
    per_batch: usize,
    /// The stream's state, read by one request for every caller that arrived
    /// before it was sent.
    states: Coalesced<Result<stream::State, Arc<ReadError>>>,
    /// The furthest stream position this node has seen the stream reach,
    /// and the epoch it was seen in ([`Store::is_known`]).
    seen_head: Mutex<EventId>,
    /// "Newest of" reads shared by callers arriving together.
    gathered: Gathered,
    /// The stream has one copy: any Direct Get is answered by the leader.
    single_copy: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("stream", &self.name)
            .field("epoch", &self.epoch())
            .field("batched_reads", &self.batched_reads)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub(super) fn new(
        client: async_nats::Client,
        jetstream: jetstream::Context,
        stream: stream::Stream,
        name: String,
        epoch: u64,
        batched_reads: bool,
        per_batch: usize,
    ) -> Self {
        let single_copy = stream.cached_info().config.num_replicas <= 1;
        Store {
            client,
            jetstream,
            stream,
            name,
            epoch: AtomicU64::new(epoch),
            epochs: watch::channel(epoch).0,
            batched_reads,
            per_batch,
            states: Coalesced::new(),
            seen_head: Mutex::new(EventId {
                epoch: Epoch(epoch),
                seq: 0,
            }),
            gathered: Gathered::default(),
            single_copy,
        }
    }

    /// The shared "newest of" reads ([`Store::newest_gathered`]).
    pub(super) fn gathered(&self) -> &Gathered {
        &self.gathered
    }

    /// [`Store::newest_of`], by a request sent after this call began and
    /// shared with the callers that arrived with it ([`gather`]) on servers
    /// with batched reads.
    ///
    /// [`gather`]: super::gather
    pub(super) async fn newest_gathered(
        self: &Arc<Self>,
        subjects: Vec<String>,
    ) -> Result<Newest, ReadError> {
        if !self.batched_reads {
            return self.newest_of(&subjects).await;
        }
        self.gathered.newest_of(self, subjects).await
    }

    /// Where a chain of `subject` starts once its live subscription is in
    /// place: its newest stored event (sequence 0: none). Read with the
    /// anchors and replays of the moment (a Direct Get, which any replica
    /// may answer), then checked, else (or when it fails) the leader is
    /// asked:
    ///
    /// - **not behind:** the answer reaches at least as far as this node has
    ///   seen the stream go (or, on a stream with one copy, found nothing at
    ///   all). An anchor older than the real one would only make the first
    ///   live copy fill the difference from the stream, but a replica far
    ///   behind would make that fill long;
    /// - **not ahead of the leader:** a replica may have applied an event the
    ///   leader's state does not show yet, and a resuming stream replays only
    ///   up to the head it reads from the leader *after* the anchor: an
    ///   anchor past that head would skip the events in between. So unless
    ///   the stream has one copy (the leader answered), the anchor is taken
    ///   only when the leader's state, read after it, already holds it.
    pub(super) async fn anchor_of(self: &Arc<Self>, subject: &str) -> Result<Link, ReadError> {
        if self.batched_reads {
            match self.shared_anchor(subject).await {
                Ok(Some(anchor)) => return Ok(anchor),
                Ok(None) => {}
                // E.g. a stream that does not allow Direct Gets.
                Err(error) => {
                    tracing::debug!(%error, "a shared anchor read failed: asking the leader");
                }
            }
        }
        Ok(self
            .last_of(subject)
            .await?
            .map(|message| message.link())
            .unwrap_or_default())
    }

    /// The anchor from a shared read, when it passes [`Store::anchor_of`]'s
    /// checks.
    async fn shared_anchor(self: &Arc<Self>, subject: &str) -> Result<Option<Link>, ReadError> {
        let seen = {
            let seen = lock(&self.seen_head);
            if seen.epoch == self.epoch() {
                seen.seq
            } else {
                0
            }
        };
        let newest = self.newest_gathered(vec![subject.to_owned()]).await?;
        let not_behind = match newest.through {
            Some(through) => through >= seen,
            None => self.single_copy,
        };
        if !not_behind {
            return Ok(None);
        }
        let anchor = newest.by_subject.get(subject).copied().unwrap_or_default();
        if self.single_copy || anchor.seq == 0 {
            return Ok(Some(anchor));
        }
        let leader = self.state().await?;
        Ok((anchor.seq <= leader.last_sequence).then_some(anchor))
    }

    /// The stream was seen holding sequence `seq` in `epoch` (a state read,
    /// a live copy).
    pub(super) fn note_head(&self, epoch: Epoch, seq: u64) {
        let mut seen = lock(&self.seen_head);
        if seen.epoch != epoch {
            // Positions of one epoch say nothing of another's.
            *seen = EventId { epoch, seq: 0 };
        }
        seen.seq = seen.seq.max(seq);
    }

    /// Whether `seq` in `epoch` is a position the stream has reached (at
    /// most a head this node has seen in that epoch): an id naming it came
    /// from the stream, not from invention.
    pub(super) fn is_known(&self, epoch: Epoch, seq: u64) -> bool {
        let seen = lock(&self.seen_head);
        seen.epoch == epoch && seq <= seen.seq
    }

    /// Whether the server answers batched Direct Gets (nats-server 2.11+).
    pub(super) fn batched_reads(&self) -> bool {
        self.batched_reads
    }

    /// The current epoch.
    pub(super) fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Relaxed))
    }

    /// Watches the epoch: it changes when the stream was recreated or a node
    /// found that its history went back.
    pub(super) fn epochs(&self) -> watch::Receiver<u64> {
        self.epochs.subscribe()
    }

    /// The id of stream sequence `seq` in the current epoch.
    pub(super) fn id(&self, seq: u64) -> EventId {
        EventId {
            epoch: self.epoch(),
            seq,
        }
    }

    fn adopt_epoch(&self, epoch: u64) {
        if self.epoch.swap(epoch, Ordering::Relaxed) != epoch {
            tracing::warn!(stream = %self.name, epoch = %format!("{epoch:x}"), "the stream's epoch changed (recreated, or its history went back): old ids now get herald.reset");
            self.epochs.send_replace(epoch);
        }
    }

    /// Most subjects one batched read asks for.
    pub(super) fn per_batch(&self) -> usize {
        self.per_batch
    }

    /// Reads the stream's state from its leader, noticing a changed epoch:
    /// the answer of a request sent after this call began, shared with the
    /// callers that arrived with it ([`Coalesced`]).
    pub(super) async fn state(&self) -> Result<stream::State, ReadError> {
        self.states
            .read(|| async {
                let stream = timed(self.jetstream.get_stream(&self.name))
                    .await
                    .map_err(Arc::new)?;
                let info = stream.cached_info();
                let epoch = epoch_of(info);
                self.adopt_epoch(epoch);
                self.note_head(Epoch(epoch), info.state.last_sequence);
                Ok(info.state.clone())
            })
            .await
            .map_err(ReadError::Shared)
    }

    /// The newest stored message of `subject` (`None` when it has none).
    pub(super) async fn last_of(&self, subject: &str) -> Result<Option<Stored>, ReadError> {
        match timed_raw(self.stream.get_last_raw_message_by_subject(subject)).await? {
            Ok(message) => Ok(Some(message.into())),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(ReadError::Failed(err.into())),
        }
    }

    /// The message stored at `seq` (`None` when there is none).
    pub(super) async fn at(&self, seq: u64) -> Result<Option<Stored>, ReadError> {
        match timed_raw(self.stream.get_raw_message(seq)).await? {
            Ok(message) => Ok(Some(message.into())),
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(ReadError::Failed(err.into())),
        }
    }

    /// The stored messages of `subject` after `after` and up to `through`, at
    /// most `limit + 1` of them (one more than `limit` says "too many").
    pub(super) async fn between(
        &self,
        subject: &str,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, ReadError> {
        let mut messages = Vec::new();
        let mut next = after + 1;
        while next <= through && messages.len() <= limit {
            let read =
                timed_raw(self.stream.get_first_raw_message_by_subject(subject, next)).await?;
            let message: Stored = match read {
                Ok(message) => message.into(),
                Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(err) => return Err(ReadError::Failed(err.into())),
            };
            if message.seq > through {
                break;
            }
            next = message.seq + 1;
            messages.push(message);
        }
        Ok(messages)
    }

    /// Whether the event at `link` is still what `subject` holds there.
    pub(super) async fn standing(&self, subject: &str, link: Link) -> Result<Standing, ReadError> {
        if link.seq == 0 {
            return Ok(Standing::Stands);
        }
        match self.at(link.seq).await? {
            Some(message) => {
                let same_time = link.stored_at.is_none_or(|at| at == message.stored_at);
                Ok(if message.subject == subject && same_time {
                    Standing::Stands
                } else {
                    Standing::Rewound
                })
            }
            None => {
                let state = self.state().await?;
                Ok(if state.last_sequence >= link.seq {
                    Standing::Removed
                } else {
                    Standing::Rewound
                })
            }
        }
    }

    /// The newest stored message of each of `subjects`: batched multi-subject
    /// Direct Gets on nats-server 2.11+, one leader read per subject before.
    pub(super) async fn newest_of(&self, subjects: &[String]) -> Result<Newest, ReadError> {
        self.newest_after(subjects, 0).await
    }

    /// [`Store::newest_of`], leaving out every subject whose newest message
    /// is at or below `since` (nats-server skips them: a subject quiet since
    /// then costs its lookup, not a message). Old servers answer every
    /// subject, and then nothing is left out.
    pub(super) async fn newest_after(
        &self,
        subjects: &[String],
        since: u64,
    ) -> Result<Newest, ReadError> {
        if !self.batched_reads {
            return self.newest_one_by_one(subjects).await;
        }
        let mut newest = Newest {
            left_out_through: since,
            ..Newest::default()
        };
        let mut through: Option<u64> = None;
        for batch in subjects.chunks(self.per_batch) {
            let part = self.newest_batch(batch, since).await?;
            newest.reads += 1;
            newest.by_subject.extend(part.by_subject);
            // The whole answer is complete only as far as its least complete
            // part; a part that cannot say is left out of it.
            match part.through {
                Some(part) => through = Some(through.map_or(part, |so_far: u64| so_far.min(part))),
                None => newest.unanswered.extend(batch.iter().cloned()),
            }
        }
        newest.through = through;
        Ok(newest)
    }

    /// One multi-subject Direct Get: each subject's newest message, complete
    /// up to the end-of-batch status's `Nats-UpTo-Sequence`, the sequence the
    /// answering server's view reaches (every message up to it was
    /// considered).
    async fn newest_batch(&self, subjects: &[String], since: u64) -> Result<Newest, ReadError> {
        let request = if since == 0 {
            serde_json::json!({ "multi_last": subjects })
        } else {
            // `seq`: only newest messages at or after it are sent.
            serde_json::json!({ "multi_last": subjects, "seq": since + 1 })
        };
        Ok(newest_answered(self.direct_batch(&request).await?))
    }

    /// The stored messages of `subject` from sequence `from` on (`from`
    /// itself included), at most `count` of them, as one batched Direct Get
    /// answers it: any replica may, so the answer is only as complete as
    /// that replica's view (see `replay` for what may rest on it). Each
    /// message keeps its `Nats-Num-Pending` header ([`pending_of`]).
    pub(super) async fn run_from(
        &self,
        subject: &str,
        from: u64,
        count: usize,
    ) -> Result<Batch, ReadError> {
        let count = count.clamp(1, self.per_batch);
        self.direct_batch(&serde_json::json!({
            "seq": from,
            "next_by_subj": subject,
            "batch": count,
        }))
        .await
    }

    /// Sends one batched Direct Get and reads its answer. The replies come on
    /// a fresh inbox (the request must ask for at most `per_batch` messages,
    /// so they all fit in its buffer): one message each, then the
    /// end-of-batch status; or a 404 when there was nothing to answer.
    async fn direct_batch(&self, request: &serde_json::Value) -> Result<Batch, ReadError> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|err| ReadError::Failed(err.into()))?;
        let payload = Bytes::from(request.to_string());
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{}", self.name), inbox, payload)
            .await
            .map_err(|err| ReadError::Failed(err.into()))?;
        let mut batch = Batch::default();
        let deadline = tokio::time::Instant::now() + API_TIMEOUT;
        loop {
            let reply = tokio::time::timeout_at(deadline, replies.next())
                .await
                .map_err(|_| ReadError::TimedOut)?
                .ok_or(ReadError::TimedOut)?;
            let header = |name: &str| {
                reply
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(name))
                    .map(|value| value.as_str().to_owned())
            };
            match reply.status {
                None | Some(StatusCode::OK) => {
                    let (Some(subject), Some(seq), Some(stored_at)) = (
                        header("Nats-Subject"),
                        header("Nats-Sequence").and_then(|s| s.parse::<u64>().ok()),
                        header("Nats-Time-Stamp").and_then(|t| parse_time(&t)),
                    ) else {
                        return Err(ReadError::BatchRefused(BatchRefusal::Malformed));
                    };
                    batch.messages.push(Stored {
                        subject,
                        seq,
                        stored_at,
                        headers: reply.headers.unwrap_or_default(),
                        payload: reply.payload,
                    });
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    return Err(ReadError::BatchRefused(BatchRefusal::NoResponders));
                }
                Some(status) if status.as_u16() == 204 => {
                    let number = |name| header(name).and_then(|s| s.parse::<u64>().ok());
                    batch.end = Some(BatchEnd {
                        pending: number("Nats-Num-Pending"),
                        up_to: number("Nats-UpTo-Sequence"),
                    });
                    return Ok(batch);
                }
                Some(StatusCode::NOT_FOUND) => return Ok(batch),
                Some(status) => {
                    return Err(ReadError::BatchRefused(BatchRefusal::Status {
                        code: status.as_u16(),
                        description: reply.description.clone().unwrap_or_default(),
                    }));
                }
            }
        }
    }

    /// [`Store::newest_of`] for servers without batched reads: the stream's
    /// last sequence first, then each subject's newest message from the
    /// leader, so the answer is complete up to that sequence.
    async fn newest_one_by_one(&self, subjects: &[String]) -> Result<Newest, ReadError> {
        let through = self.state().await?.last_sequence;
        let mut newest = Newest {
            through: Some(through),
            reads: 1 + subjects.len() as u64,
            ..Newest::default()
        };
        for chunk in subjects.chunks(16) {
            let reads =
                futures_util::future::join_all(chunk.iter().map(|subject| self.last_of(subject)))
                    .await;
            for (subject, read) in chunk.iter().zip(reads) {
                if let Some(message) = read? {
                    newest.by_subject.insert(subject.clone(), message.link());
                }
            }
        }
        Ok(newest)
    }

    /// Gives the stream a new epoch (stream metadata), unless another node
    /// already did since `known` was read: every id sent before becomes
    /// another epoch's, so its client gets `herald.reset` when it resumes.
    pub(super) async fn move_epoch(&self, known: Epoch) -> Result<(), ReadError> {
        let mut stream = timed(self.jetstream.get_stream(&self.name)).await?;
        let info = timed(stream.info()).await?.clone();
        let current = epoch_of(&info);
        if current != known.0 {
            self.adopt_epoch(current);
            return Ok(());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let next = now.max(known.0 + 1);
        let mut config = info.config.clone();
        config
            .metadata
            .insert(EPOCH_METADATA.to_owned(), format!("{next:x}"));
        timed(self.jetstream.update_stream(config)).await?;
        tracing::warn!(stream = %self.name, epoch = %format!("{next:x}"), "moved the epoch: old ids now get herald.reset");
        self.adopt_epoch(next);
        Ok(())
    }

    /// How many messages `subject` holds.
    pub(super) async fn count_of(&self, subject: &str) -> Result<u64, ReadError> {
        let mut subjects = timed(self.stream.info_with_subjects(subject)).await?;
        let mut count = 0u64;
        while let Some(entry) = subjects.next().await {
            let (_, messages) = entry.map_err(|err| ReadError::Failed(err.into()))?;
            count += messages as u64;
        }
        Ok(count)
    }

    /// The oldest stored message of `subject`, if any.
    pub(super) async fn first_of(&self, subject: &str) -> Result<Option<Stored>, ReadError> {
        Ok(self
            .between(subject, 0, u64::MAX, 0)
            .await?
            .into_iter()
            .next())
    }
}

/// The epoch of a stream: its creation time, or the one a node wrote into
/// its metadata after finding that the history went back.
pub(super) fn epoch_of(info: &stream::Info) -> u64 {
    info.config
        .metadata
        .get(EPOCH_METADATA)
        .and_then(|epoch| u64::from_str_radix(epoch, 16).ok())
        .unwrap_or_else(|| u64::try_from(info.created.unix_timestamp_nanos() / 1_000).unwrap_or(0))
}

/// A batched read's `Nats-Num-Pending` on `message`: how many messages
/// matched from it on (itself included) when the read began.
pub(super) fn pending_of(message: &Stored) -> Option<u64> {
    message
        .headers
        .get("Nats-Num-Pending")
        .and_then(|value| value.as_str().parse().ok())
}

/// Parses a JetStream RFC 3339 time stamp.
pub(super) fn parse_time(value: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(Into::into)
}

/// Runs one API call within [`API_TIMEOUT`], keeping its error.
async fn timed<T, E>(call: impl Future<Output = Result<T, E>>) -> Result<T, ReadError>
where
    E: Into<async_nats::Error>,
{
    timed_raw(call)
        .await?
        .map_err(|err| ReadError::Failed(err.into()))
}

/// Runs one API call within [`API_TIMEOUT`]; its own result is the caller's.
async fn timed_raw<T>(call: impl Future<Output = T>) -> Result<T, ReadError> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| ReadError::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batched_reads_answer_and_its_end_always_fit_in_one_subscriptions_buffer() {
        assert_eq!(subjects_per_batch(64 * 1024), SUBJECTS_PER_BATCH);
        assert_eq!(subjects_per_batch(1001), 1000);
        assert_eq!(subjects_per_batch(16), 15);
        assert_eq!(subjects_per_batch(2), 1);
        assert_eq!(subjects_per_batch(1), 1, "never zero subjects per read");
    }

    fn stored(subject: &str, seq: u64) -> Stored {
        Stored {
            subject: subject.to_owned(),
            seq,
            stored_at: SystemTime::UNIX_EPOCH,
            headers: HeaderMap::new(),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn a_newest_of_answer_is_complete_up_to_its_end_unless_it_was_cut_short() {
        let answer = |pending| Batch {
            messages: vec![stored("a", 3), stored("b", 7)],
            end: Some(BatchEnd {
                pending: Some(pending),
                up_to: Some(9),
            }),
        };
        let whole = newest_answered(answer(0));
        assert_eq!(whole.through, Some(9));
        assert_eq!(whole.by_subject.get("b").map(|link| link.seq), Some(7));
        // The server stopped at its byte limit with one subject's message
        // unsent: nothing may be concluded of the subjects missing from it.
        let cut = newest_answered(answer(1));
        assert_eq!(cut.through, None);
        assert_eq!(
            cut.by_subject.len(),
            2,
            "what was sent is still each subject's newest"
        );
        // A 404 (nothing stored for any subject asked) says nothing either.
        let nothing = newest_answered(Batch::default());
        assert_eq!(nothing.through, None);
    }
}
