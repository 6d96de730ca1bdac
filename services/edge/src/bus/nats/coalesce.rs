//! Coalescing concurrent reads of one thing (the stream's state): thousands of
//! clients resuming at once share a few reads instead of making one each.
//!
//! The rule that keeps it exact: a caller only takes the answer of a request
//! *sent after it arrived*. A caller joins the open round (one not sent yet);
//! the round's first caller sends it once no other request is in flight,
//! closing it first, so whoever arrives later opens the next round. An answer
//! read before a caller arrived could predate an event it was already told
//! about; one read after it arrived is as good as its own.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

use super::lock;

/// One read at a time, shared by every caller that arrived before it was sent.
pub(super) struct Coalesced<T> {
    /// The round callers arriving now join, if one is open.
    open: Mutex<Open<T>>,
    /// Held while a round's request is in flight: one at a time, in turn.
    sending: tokio::sync::Mutex<()>,
}

impl<T: Clone> Coalesced<T> {
    pub(super) fn new() -> Self {
        Coalesced {
            open: Mutex::new(Open {
                rounds: 0,
                round: None,
            }),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    /// The answer of a `request` sent after this call began, shared with the
    /// other callers that arrived before it was sent.
    pub(super) async fn read<F, Fut>(&self, request: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let (round, answer) = loop {
            let joined = {
                let mut open = lock(&self.open);
                match &open.round {
                    Some((_, answer)) => Err(answer.clone()),
                    None => {
                        open.rounds += 1;
                        let round = open.rounds;
                        let (answer, joining) = watch::channel(None);
                        open.round = Some((round, joining));
                        Ok((round, answer))
                    }
                }
            };
            match joined {
                Ok(opened) => break opened,
                Err(mut answer) => {
                    if let Ok(value) = answer.wait_for(Option::is_some).await {
                        if let Some(value) = value.as_ref() {
                            return value.clone();
                        }
                    }
                    // Its sender went away before answering (its caller
                    // gave up): arrive again; any later request is still
                    // sent after this caller arrived.
                }
            }
        };
        // This caller opened the round, so it sends it: once the request in
        // flight is answered, close the round, then send.
        let closing = Closing {
            open: &self.open,
            round,
        };
        let _sending = self.sending.lock().await;
        drop(closing);
        let value = request().await;
        answer.send_replace(Some(value.clone()));
        value
    }
}

/// The open round, if any.
struct Open<T> {
    /// Rounds opened so far (names them).
    rounds: u64,
    /// The round callers arriving now join (not sent yet): its number, and
    /// where its answer appears.
    round: Option<(u64, watch::Receiver<Option<T>>)>,
}

/// Closes a round when its sender sends it, or gives up before that (so no
/// caller joins a round nobody will send).
struct Closing<'a, T> {
    open: &'a Mutex<Open<T>>,
    round: u64,
}

impl<T> Drop for Closing<'_, T> {
    fn drop(&mut self) {
        let mut open = lock(self.open);
        if open
            .round
            .as_ref()
            .is_some_and(|(round, _)| *round == self.round)
        {
            open.round = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// A source whose requests number themselves when sent and are answered
    /// only as the test allows.
    struct Source {
        coalesced: Coalesced<u64>,
        sent: AtomicU64,
        answers: Semaphore,
    }

    impl Source {
        fn new() -> Arc<Self> {
            Arc::new(Source {
                coalesced: Coalesced::new(),
                sent: AtomicU64::new(0),
                answers: Semaphore::new(0),
            })
        }

        /// Reads through the coalescer: the number of the request answering.
        fn read(self: &Arc<Self>) -> tokio::task::JoinHandle<u64> {
            let source = Arc::clone(self);
            tokio::spawn(async move {
                let source = &source;
                source
                    .coalesced
                    .read(|| async move {
                        let number = source.sent.fetch_add(1, Ordering::SeqCst) + 1;
                        if let Ok(permit) = source.answers.acquire().await {
                            permit.forget();
                        }
                        number
                    })
                    .await
            })
        }

        async fn wait_until_sent(&self, requests: u64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while self.sent.load(Ordering::SeqCst) < requests {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "request {requests} was never sent"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        /// Lets the caller tasks run until they are parked on the coalescer.
        async fn settle() {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn a_caller_arriving_while_a_read_is_in_flight_gets_the_answer_of_a_read_sent_after_it_arrived()
     {
        let source = Source::new();
        let first = source.read();
        source.wait_until_sent(1).await;
        let second = source.read();
        Source::settle().await;
        assert_eq!(
            source.sent.load(Ordering::SeqCst),
            1,
            "the second read waits for the first to be answered"
        );
        source.answers.add_permits(2);
        assert_eq!(first.await.expect("first caller"), 1);
        assert_eq!(
            second.await.expect("second caller"),
            2,
            "never the answer of a request sent before the caller arrived"
        );
    }

    #[tokio::test]
    async fn callers_arriving_while_a_read_is_in_flight_share_the_next_read() {
        let source = Source::new();
        let first = source.read();
        source.wait_until_sent(1).await;
        let waiting: Vec<_> = (0..50).map(|_| source.read()).collect();
        Source::settle().await;
        source.answers.add_permits(2);
        assert_eq!(first.await.expect("first caller"), 1);
        for caller in waiting {
            assert_eq!(caller.await.expect("waiting caller"), 2);
        }
        assert_eq!(
            source.sent.load(Ordering::SeqCst),
            2,
            "51 callers, two reads"
        );
    }

    #[tokio::test]
    async fn callers_of_a_round_whose_sender_gave_up_still_get_a_read_sent_after_they_arrived() {
        let source = Source::new();
        let first = source.read();
        source.wait_until_sent(1).await;
        // Opens the next round and waits to send it; the second joins it.
        let sender = source.read();
        Source::settle().await;
        let joined = source.read();
        Source::settle().await;
        sender.abort();
        assert!(sender.await.is_err(), "the sender was cancelled");
        source.answers.add_permits(2);
        assert_eq!(first.await.expect("first caller"), 1);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), joined)
                .await
                .expect("the caller is not left waiting")
                .expect("joined caller"),
            2
        );
    }

    #[tokio::test]
    async fn a_caller_with_nothing_in_flight_sends_at_once() {
        let source = Source::new();
        source.answers.add_permits(2);
        assert_eq!(source.read().await.expect("caller"), 1);
        assert_eq!(
            source.read().await.expect("caller"),
            2,
            "a finished read is never reused"
        );
    }
}
