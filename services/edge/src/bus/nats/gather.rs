//! Gathering "newest of" reads: the follows being set up and the replays
//! being read at the same moment (a resume storm after an edge went away)
//! share multi-subject Direct Gets instead of sending one each.
//!
//! The rule that keeps each answer exact is [`coalesce`](super::coalesce)'s:
//! a caller only takes the answer of a request *sent after it arrived*. A
//! caller queues its subjects; a reader takes queued callers, oldest first,
//! up to one request's worth of subjects ([`Store::per_batch`]), sends the
//! read and hands each caller its own subjects' part. A caller is taken only
//! after it queued, so its request is sent after it arrived. At most
//! [`READERS`] reads are in flight; a reader ends when the queue is empty.
//!
//! Each part is what a read of the caller's subjects alone would have
//! answered: its subjects' newest messages, the answer's `through` (every
//! stored message up to it was considered, whichever subjects were asked),
//! and which of its subjects the answer could not speak for.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::lock;
use super::store::{Newest, ReadError, Store};

/// Most gathered reads in flight at once.
const READERS: usize = 4;

/// What one queued caller asked, and where its part goes.
struct Caller {
    subjects: Vec<String>,
    answer: oneshot::Sender<Result<Newest, ReadError>>,
}

/// The callers waiting for a read, and the readers serving them.
#[derive(Default)]
pub(super) struct Gathered {
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    callers: VecDeque<Caller>,
    readers: usize,
}

impl Gathered {
    /// The newest stored message of each of `subjects`, read by a request
    /// sent after this call began and shared with other callers.
    pub(super) async fn newest_of(
        &self,
        store: &Arc<Store>,
        subjects: Vec<String>,
    ) -> Result<Newest, ReadError> {
        let (answer, part) = oneshot::channel();
        let start_reader = {
            let mut waiting = lock(&self.waiting);
            waiting.callers.push_back(Caller { subjects, answer });
            let start = waiting.readers < READERS;
            if start {
                waiting.readers += 1;
            }
            start
        };
        if start_reader {
            tokio::spawn(read_while_waiting(Arc::clone(store)));
        }
        match part.await {
            Ok(part) => part,
            // The reader went away (the runtime is shutting down).
            Err(_) => Err(ReadError::Failed("the gathered read was dropped".into())),
        }
    }

    /// The next callers to serve together (oldest first, up to `per_batch`
    /// subjects, at least one caller); none ends the reader.
    fn next_batch(&self, per_batch: usize) -> Vec<Caller> {
        let mut waiting = lock(&self.waiting);
        let mut batch: Vec<Caller> = Vec::new();
        let mut subjects = 0;
        while let Some(next) = waiting.callers.front() {
            if !batch.is_empty() && subjects + next.subjects.len() > per_batch {
                break;
            }
            subjects += next.subjects.len();
            batch.extend(waiting.callers.pop_front());
        }
        if batch.is_empty() {
            waiting.readers -= 1;
        }
        batch
    }
}

/// A reader: serves queued callers until none is left.
async fn read_while_waiting(store: Arc<Store>) {
    loop {
        let batch = store.gathered().next_batch(store.per_batch());
        if batch.is_empty() {
            return;
        }
        let mut seen = HashSet::new();
        let subjects: Vec<String> = batch
            .iter()
            .flat_map(|caller| caller.subjects.iter())
            .filter(|subject| seen.insert(subject.as_str()))
            .cloned()
            .collect();
        let read = store.newest_of(&subjects).await.map_err(Arc::new);
        for caller in batch {
            let part = match &read {
                Ok(newest) => Ok(part_for(newest, &caller.subjects)),
                Err(error) => Err(ReadError::Shared(Arc::clone(error))),
            };
            let _ = caller.answer.send(part);
        }
    }
}

/// The part of `newest` that answers `subjects`.
fn part_for(newest: &Newest, subjects: &[String]) -> Newest {
    Newest {
        by_subject: subjects
            .iter()
            .filter_map(|subject| {
                newest
                    .by_subject
                    .get(subject)
                    .map(|link| (subject.clone(), *link))
            })
            .collect(),
        through: newest.through,
        unanswered: subjects
            .iter()
            .filter(|subject| newest.unanswered.contains(*subject))
            .cloned()
            .collect(),
        reads: newest.reads,
        left_out_through: newest.left_out_through,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::nats::chain::Link;

    fn caller(subjects: &[&str]) -> (Caller, oneshot::Receiver<Result<Newest, ReadError>>) {
        let (answer, part) = oneshot::channel();
        let caller = Caller {
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            answer,
        };
        (caller, part)
    }

    fn gathered(callers: Vec<Caller>, readers: usize) -> Gathered {
        Gathered {
            waiting: Mutex::new(Waiting {
                callers: callers.into(),
                readers,
            }),
        }
    }

    #[test]
    fn a_batch_takes_callers_oldest_first_up_to_one_requests_worth_of_subjects() {
        let (a, _a) = caller(&["a1", "a2"]);
        let (b, _b) = caller(&["b1"]);
        let (c, _c) = caller(&["c1", "c2"]);
        let queue = gathered(vec![a, b, c], 1);
        let first: Vec<usize> = queue
            .next_batch(3)
            .iter()
            .map(|c| c.subjects.len())
            .collect();
        assert_eq!(first, vec![2, 1]);
        let second: Vec<usize> = queue
            .next_batch(3)
            .iter()
            .map(|c| c.subjects.len())
            .collect();
        assert_eq!(second, vec![2]);
        assert!(queue.next_batch(3).is_empty());
        assert_eq!(lock(&queue.waiting).readers, 0, "the reader ended");
    }

    #[test]
    fn a_caller_with_more_subjects_than_one_request_is_served_alone() {
        let (a, _a) = caller(&["a1", "a2", "a3", "a4"]);
        let (b, _b) = caller(&["b1"]);
        let queue = gathered(vec![a, b], 1);
        assert_eq!(queue.next_batch(2).len(), 1);
        assert_eq!(queue.next_batch(2).len(), 1);
    }

    #[test]
    fn each_caller_gets_only_its_own_subjects_with_the_answers_reach() {
        let link = |seq| Link {
            seq,
            stored_at: None,
        };
        let newest = Newest {
            by_subject: [("a".to_owned(), link(4)), ("b".to_owned(), link(9))].into(),
            through: Some(12),
            unanswered: ["z".to_owned()].into(),
            reads: 1,
            left_out_through: 0,
        };
        let part = part_for(&newest, &["b".to_owned(), "c".to_owned(), "z".to_owned()]);
        assert_eq!(part.by_subject.len(), 1);
        assert_eq!(part.by_subject.get("b").map(|l| l.seq), Some(9));
        assert_eq!(part.through, Some(12));
        assert_eq!(part.unanswered, ["z".to_owned()].into());
    }
}
