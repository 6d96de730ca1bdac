//! A connection's queue: bounded, written by the bus's fan-out and the
//! registry, read by the connection's one stream.
//!
//! Every open stream has one, most of them idle, so what an empty queue
//! holds is memory per stream: here a lock and an empty [`VecDeque`] (no
//! buffer until the first entry), about 80 bytes in all. tokio's bounded
//! channel, used before, allocated about 1 KiB per queue up front (its
//! cache-padded channel state and a first block of 32 entries).
//!
//! Entries are taken in the order they were queued. The reader is told when
//! the queue was closed (the writer, the registry's [`ConnectionHandle`],
//! dropped): what was queued before is still read first. A queue whose
//! reader is gone refuses entries, and drops those it held.
//!
//! [`ConnectionHandle`]: super::ConnectionHandle

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::Queued;

/// A queue that shrank back to nothing keeps a buffer of at most this many
/// entries (a burst's larger buffer is given back once it drained).
const KEPT_WHEN_EMPTY: usize = 64;

/// Why an entry was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue holds as many entries as it may.
    Full,
    /// The stream reading it is gone.
    Closed,
}

/// A bounded queue of `capacity` entries: its writing and reading ends.
pub(crate) fn bounded(capacity: usize) -> (QueueWriter, QueueReader) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        state: Mutex::new(State {
            entries: VecDeque::new(),
            reader: None,
            writer_gone: false,
            reader_gone: false,
        }),
    });
    (
        QueueWriter {
            shared: Arc::clone(&shared),
        },
        QueueReader { shared },
    )
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    entries: VecDeque<Queued>,
    /// Wakes the reader when an entry arrives or the writer goes.
    reader: Option<Waker>,
    writer_gone: bool,
    reader_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can panic while the lock is held; a poisoned lock
        // still holds a consistent queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end (one per queue, kept by the connection's handle).
pub(crate) struct QueueWriter {
    shared: Arc<Shared>,
}

impl QueueWriter {
    /// Queues `entry` unless the queue is full or its reader is gone.
    pub(crate) fn try_send(&self, entry: Queued) -> Result<(), Refused> {
        let waker = {
            let mut state = self.shared.lock();
            if state.reader_gone {
                return Err(Refused::Closed);
            }
            if state.entries.len() >= self.shared.capacity {
                return Err(Refused::Full);
            }
            state.entries.push_back(entry);
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Entries waiting to be read.
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().entries.len()
    }

    /// Entries that may still be queued.
    pub(crate) fn room(&self) -> usize {
        self.shared.capacity.saturating_sub(self.len())
    }

    /// Most entries the queue holds.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl Drop for QueueWriter {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.writer_gone = true;
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl std::fmt::Debug for QueueWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueWriter")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// The reading end (the stream's).
pub(crate) struct QueueReader {
    shared: Arc<Shared>,
}

impl QueueReader {
    /// The next entry; `Ready(None)` once the writer is gone and every entry
    /// queued before was read.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Queued>> {
        let mut state = self.shared.lock();
        if let Some(entry) = take(&mut state) {
            return Poll::Ready(Some(entry));
        }
        if state.writer_gone {
            return Poll::Ready(None);
        }
        match &mut state.reader {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next entry if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<Queued> {
        take(&mut self.shared.lock())
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        let dropped = {
            let mut state = self.shared.lock();
            state.reader_gone = true;
            state.reader = None;
            std::mem::take(&mut state.entries)
        };
        // Entries hold events shared with other streams: let them go
        // outside the lock.
        drop(dropped);
    }
}

/// Takes the oldest entry, giving back a burst's buffer once it drained.
fn take(state: &mut State) -> Option<Queued> {
    let entry = state.entries.pop_front()?;
    if state.entries.is_empty() && state.entries.capacity() > KEPT_WHEN_EMPTY {
        state.entries = VecDeque::new();
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Notice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    fn progress(through: u64) -> Queued {
        Queued::progress(0, through)
    }

    fn through(entry: Option<Queued>) -> Option<u64> {
        match entry {
            Some(Queued::Notice(notice)) => match *notice {
                Notice::Progress { through, .. } => Some(through),
                _ => None,
            },
            _ => None,
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn entries_are_read_in_the_order_they_were_queued() {
        let (writer, mut reader) = bounded(8);
        for n in 1..=5 {
            writer.try_send(progress(n)).expect("room");
        }
        assert_eq!(writer.len(), 5);
        let read: Vec<u64> = std::iter::from_fn(|| through(reader.try_recv())).collect();
        assert_eq!(read, vec![1, 2, 3, 4, 5]);
        assert_eq!(writer.len(), 0);
    }

    #[test]
    fn a_full_queue_refuses_until_an_entry_is_read() {
        let (writer, mut reader) = bounded(2);
        writer.try_send(progress(1)).expect("room");
        writer.try_send(progress(2)).expect("room");
        assert_eq!(writer.room(), 0);
        assert_eq!(writer.try_send(progress(3)), Err(Refused::Full));
        assert_eq!(through(reader.try_recv()), Some(1));
        writer.try_send(progress(3)).expect("room again");
        assert_eq!(through(reader.try_recv()), Some(2));
        assert_eq!(through(reader.try_recv()), Some(3));
    }

    #[test]
    fn the_waiting_reader_is_woken_by_an_entry_and_by_the_writer_going() {
        let (writer, mut reader) = bounded(4);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        assert!(reader.poll_recv(&mut cx).is_pending());
        writer.try_send(progress(7)).expect("room");
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        match reader.poll_recv(&mut cx) {
            Poll::Ready(entry) => assert_eq!(through(entry), Some(7)),
            Poll::Pending => panic!("an entry was queued"),
        }
        assert!(reader.poll_recv(&mut cx).is_pending());
        drop(writer);
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(matches!(reader.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn what_was_queued_before_the_writer_went_is_still_read() {
        let (writer, mut reader) = bounded(4);
        writer.try_send(progress(1)).expect("room");
        drop(writer);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        match reader.poll_recv(&mut cx) {
            Poll::Ready(entry) => assert_eq!(through(entry), Some(1)),
            Poll::Pending => panic!("an entry was queued"),
        }
        assert!(matches!(reader.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_queue_without_its_reader_refuses_and_lets_go_of_what_it_held() {
        let (writer, reader) = bounded(4);
        writer.try_send(progress(1)).expect("room");
        drop(reader);
        assert_eq!(writer.len(), 0);
        assert_eq!(writer.try_send(progress(2)), Err(Refused::Closed));
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let (writer, mut reader) = bounded(1_000);
        for n in 0..500 {
            writer.try_send(progress(n)).expect("room");
        }
        while reader.try_recv().is_some() {}
        assert!(writer.shared.lock().entries.capacity() <= KEPT_WHEN_EMPTY);
    }
}
