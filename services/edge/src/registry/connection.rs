//! One SSE connection as the registry sees it: a bounded queue of frames and a
//! kill switch.

use std::sync::{Arc, OnceLock};

use std::time::Instant;

use bytes::Bytes;

use crate::bus::Event;
use tokio_util::sync::CancellationToken;

use super::queue::{self, QueueReader, QueueWriter, Refused};

use crate::metrics::Metrics;

/// An event waiting to be written to one connection (16 bytes, so that a
/// [`Queued`] entry is too).
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// The event, shared by every connection it goes to (its SSE frame is
    /// encoded once).
    pub(crate) event: Arc<Event>,
    /// Which of the connection's targets the event is for (its index in the
    /// target list the connection attached with).
    pub(crate) slot: u32,
    /// When the event was queued, for the time it waited in the queue.
    pub(crate) queued_at: QueuedAt,
}

/// A moment on a process-wide microsecond clock, in 4 bytes instead of an
/// `Instant`'s 16. It wraps after about 71 minutes, so it only measures short
/// waits (a frame never sits in a queue that long: a full queue cuts the
/// stream).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueuedAt(u32);

impl QueuedAt {
    /// Now.
    pub(crate) fn now() -> Self {
        static START: OnceLock<Instant> = OnceLock::new();
        let since = START.get_or_init(Instant::now).elapsed();
        // Truncation is the wrap-around described above.
        QueuedAt(since.as_micros() as u32)
    }

    /// Time since this moment.
    pub(crate) fn elapsed(self) -> std::time::Duration {
        std::time::Duration::from_micros(u64::from(QueuedAt::now().0.wrapping_sub(self.0)))
    }
}

/// What a connection's queue carries. An entry is 16 bytes (checked below):
/// a queue's buffer holds its entries inline, so every byte here is paid
/// once per entry a stream has room for in its buffer.
#[derive(Debug, Clone)]
pub(crate) enum Queued {
    /// An event to write.
    Event(Frame),
    /// Anything else: rare next to events, so boxed to keep entries small.
    Notice(Box<Notice>),
}

const _: () = assert!(
    std::mem::size_of::<Queued>() == 16,
    "a queue entry grew past 16 bytes: box the variant that grew"
);

impl Queued {
    /// See [`Notice::Progress`].
    pub(crate) fn progress(slot: u32, through: u64) -> Self {
        Queued::Notice(Box::new(Notice::Progress { slot, through }))
    }

    /// See [`Notice::Leave`].
    pub(crate) fn leave(reason: DisconnectReason) -> Self {
        Queued::Notice(Box::new(Notice::Leave(reason)))
    }
}

/// What a connection's queue carries besides events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// Every event of the connection's target `slot` up to `through` has
    /// been queued before this: the stream may move its position there.
    Progress {
        /// The target's index in the connection's target list.
        slot: u32,
        /// The sequence reached (in the epoch of the events queued with it:
        /// an epoch change ends every stream first).
        through: u64,
    },
    /// The node asks this stream to end: write what is queued before it, then
    /// end with a `retry:` hint so the client reconnects and resumes — on
    /// another node when rebalancing (`Moved`), or to be told with one
    /// `herald.reset` that the history changed (`HistoryChanged`).
    Leave(DisconnectReason),
    /// An SSE frame without an id (a disconnect's reason event), written as
    /// is; a `Leave` always follows it. Shared by every stream it goes to.
    Reason(Arc<Bytes>),
}

/// Why a stream ended; logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DisconnectReason {
    /// The client went away.
    ClientClosed,
    /// The client read too slowly and its queue filled up.
    Slow,
    /// The node is shutting down.
    Shutdown,
    /// The bus could not serve the stream.
    BusUnavailable,
    /// The stream's token expired.
    TokenExpired,
    /// The node moved the stream to spread load (rebalancing).
    Moved,
    /// The stored history changed under the stream (acknowledged events lost,
    /// the stream recreated): the client comes back and gets `herald.reset`.
    HistoryChanged,
    /// A publisher disconnected the user (`POST /v1/disconnect`).
    Disconnected,
    /// A publisher disconnected the user and revoked their tokens.
    Revoked,
}

impl DisconnectReason {
    /// Stable name for logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::Slow => "slow",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::BusUnavailable => "bus_unavailable",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::Moved => "moved",
            DisconnectReason::HistoryChanged => "history_changed",
            DisconnectReason::Disconnected => "disconnected",
            DisconnectReason::Revoked => "revoked",
        }
    }
}

/// Ends one HTTP connection from outside: the server closes its socket even
/// when the client stopped reading (so nothing can be written to it any more).
#[derive(Debug, Clone, Default)]
pub(crate) struct Kill {
    token: CancellationToken,
    reason: Arc<OnceLock<DisconnectReason>>,
}

impl Kill {
    /// A fresh switch for one connection.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Ends the connection; the first reason given is kept.
    pub(crate) fn kill(&self, reason: DisconnectReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Whether the connection was killed.
    pub(crate) fn is_killed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Why it was killed, if it was.
    pub(crate) fn reason(&self) -> Option<DisconnectReason> {
        self.reason.get().copied()
    }

    /// Resolves when the connection is killed.
    pub(crate) async fn killed(&self) {
        self.token.cancelled().await
    }

    /// Resolves once the connection is killed; owns what it waits on, so a
    /// stream can keep it pinned for its whole life instead of making a new
    /// waiter at every wake-up.
    pub(crate) fn killed_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

/// What the registry keeps of one connection.
#[derive(Debug)]
pub(crate) struct ConnectionHandle {
    /// Unique on this node.
    pub(crate) id: u64,
    /// Ends the connection (used when its queue overflows).
    pub(crate) kill: Kill,
    queue: QueueWriter,
    metrics: Arc<Metrics>,
}

impl ConnectionHandle {
    /// A handle and the receiving end of its queue of `capacity` frames.
    pub(crate) fn new(
        id: u64,
        capacity: usize,
        kill: Kill,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, QueueReader) {
        let (queue, frames) = queue::bounded(capacity);
        let handle = ConnectionHandle {
            id,
            kill,
            queue,
            metrics,
        };
        (Arc::new(handle), frames)
    }

    /// Events waiting in this connection's queue.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a frame without waiting; a full queue kills the connection.
    pub(crate) fn offer(&self, frame: Frame) {
        match self.queue.try_send(Queued::Event(frame)) {
            Ok(()) => {}
            Err(Refused::Full) => {
                if !self.kill.is_killed() {
                    self.metrics.slow_disconnects.inc();
                    tracing::warn!(
                        connection = self.id,
                        capacity = self.queue.capacity(),
                        "client too slow: queue full, disconnecting (it resumes from its last id)"
                    );
                }
                self.kill.kill(DisconnectReason::Slow);
            }
            // The stream is already gone and detaching.
            Err(Refused::Closed) => {}
        }
    }

    /// Queues a progress note without waiting; dropped when the queue is
    /// full (the position just stays where it is; the stream is about to be
    /// cut as slow anyway).
    pub(crate) fn offer_progress(&self, slot: u32, through: u64) {
        let _ = self.queue.try_send(Queued::progress(slot, through));
    }

    /// Asks the stream to end after what is already queued and reconnect
    /// elsewhere. Returns `false` when its queue is full (the stream is about
    /// to be cut as slow anyway) or it already ended.
    pub(crate) fn ask_to_move(&self) -> bool {
        self.queue
            .try_send(Queued::leave(DisconnectReason::Moved))
            .is_ok()
    }

    /// Asks the stream to end behind what is queued, because the history it
    /// follows changed; a stream whose queue is full is ended at once (it was
    /// about to be, as too slow). Either way the client resumes and is told.
    pub(crate) fn ask_to_leave_for_history(&self) {
        if self
            .queue
            .try_send(Queued::leave(DisconnectReason::HistoryChanged))
            .is_err()
        {
            self.kill.kill(DisconnectReason::HistoryChanged);
        }
    }

    /// Asks the stream to end behind what is queued, for `reason`, writing
    /// `notice` (an SSE frame) just before it ends; a stream whose queue has
    /// no room for both is ended at once, without the notice.
    pub(crate) fn ask_to_end(&self, reason: DisconnectReason, notice: Option<&Arc<Bytes>>) {
        // Room for both, or the notice could be queued without its end.
        let needed = 1 + usize::from(notice.is_some());
        let queued = self.queue.room() >= needed
            && notice.is_none_or(|frame| {
                self.queue
                    .try_send(Queued::Notice(Box::new(Notice::Reason(Arc::clone(frame)))))
                    .is_ok()
            })
            && self.queue.try_send(Queued::leave(reason)).is_ok();
        if !queued {
            self.kill.kill(reason);
        }
    }
}
