//! The periodic check's schedule: which followed targets each check reads,
//! and when the next one is due.
//!
//! One check read of every followed target at once is a burst: at 10,000
//! targets, ten 1,000-subject Direct Gets back to back every interval, each
//! answered with a message per subject, which is what a live event published
//! at that moment waits behind. So a **round** over every followed target is
//! split into **slices** of at most one batched read each, spread evenly over
//! the interval: every target is still read once per interval, and the
//! leader answers one batch at a time.
//!
//! A slice is at most [`SLICE_TARGETS`] targets (one batched read): at
//! 10,000 targets and the default 2 s interval, one 1,000-subject read every
//! 200 ms. Slices are not smaller because nats-server answers a multi-subject
//! read by walking every subject of the stream's newest blocks, however few
//! were asked (`fileStore.MultiLastSeqs`): at 100 subjects a read, that walk
//! cost nats-server more than everything else the round asked of it. A
//! slice is the next follow keys in key order after the last one read,
//! wrapping around: a target followed or unfollowed mid-round neither stops
//! the round nor makes another target wait longer than a round.
//!
//! Most rounds are **since** rounds: a slice asks only for subjects with a
//! message after the lowest position its targets were all checked complete
//! through, so a quiet target costs nats-server a lookup and no message, and
//! the node nothing. Every [`FULL_ROUND_EVERY`]th round (the first one
//! included) asks for every subject's newest message, so that each chain's
//! end is seen to still stand in the stored history at least that often,
//! quiet or not.

use std::time::Duration;

/// Most targets one slice of the periodic round reads.
pub(super) const SLICE_TARGETS: usize = 1000;

/// Every this many rounds, one reads every target's newest message (the
/// others read only what is newer than each slice's checked position).
pub(super) const FULL_ROUND_EVERY: u64 = 8;

/// Where the periodic check is in its round over the followed targets.
#[derive(Debug)]
pub(super) struct Sweep {
    /// Most targets one slice reads (one batched read at most).
    per_slice: usize,
    /// How long a whole round takes.
    interval: Duration,
    /// The next slice starts at the first key at or after this one.
    cursor: u64,
    /// Rounds begun so far (the one under way included).
    rounds: u64,
}

impl Sweep {
    /// A round of `interval` in slices of [`SLICE_TARGETS`] targets, or of
    /// `per_batch` (the most one batched read may ask for) when fewer.
    pub(super) fn new(per_batch: usize, interval: Duration) -> Self {
        Sweep {
            per_slice: per_batch.clamp(1, SLICE_TARGETS),
            interval,
            cursor: 0,
            rounds: 1,
        }
    }

    /// How long after this slice the next one is due, with `followed`
    /// targets: the interval divided by the slices a round takes.
    pub(super) fn pause(&self, followed: usize) -> Duration {
        let slices = followed.div_ceil(self.per_slice).max(1);
        self.interval / u32::try_from(slices).unwrap_or(u32::MAX)
    }

    /// Whether the round under way reads every subject's newest message,
    /// not only those newer than each slice's checked position.
    pub(super) fn full_round(&self) -> bool {
        self.rounds % FULL_ROUND_EVERY == 1
    }

    /// The keys the next slice reads, from the followed targets' `keys` (in
    /// any order), and moves past them. Linear in the followed targets: only
    /// the slice itself is sorted.
    pub(super) fn next_slice(&mut self, keys: impl Iterator<Item = u64> + Clone) -> Vec<u64> {
        let cursor = self.cursor;
        let mut slice: Vec<u64> = keys.clone().filter(|&key| key >= cursor).collect();
        if slice.is_empty() {
            // The round is over: the next starts again at the lowest key.
            slice = keys.collect();
            self.rounds += 1;
        }
        if slice.len() > self.per_slice {
            slice.select_nth_unstable(self.per_slice - 1);
            slice.truncate(self.per_slice);
        }
        slice.sort_unstable();
        if let Some(&last) = slice.last() {
            self.cursor = last + 1;
        }
        slice
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_round_reads_every_followed_target_exactly_once_in_slices_of_one_batch() {
        let mut sweep = Sweep::new(3, Duration::from_secs(2));
        let keys = [9_u64, 2, 7, 4, 1, 12, 5];
        let mut reads: HashMap<u64, u32> = HashMap::new();
        for _ in 0..keys.len().div_ceil(3) {
            let slice = sweep.next_slice(keys.iter().copied());
            assert!(!slice.is_empty() && slice.len() <= 3, "{slice:?}");
            for key in slice {
                *reads.entry(key).or_default() += 1;
            }
        }
        for key in keys {
            assert_eq!(reads.get(&key), Some(&1), "key {key} in {reads:?}");
        }
    }

    #[test]
    fn the_next_round_starts_again_at_the_lowest_key() {
        let mut sweep = Sweep::new(2, Duration::from_secs(2));
        let keys = [3_u64, 1, 2];
        assert_eq!(sweep.next_slice(keys.iter().copied()), vec![1, 2]);
        assert_eq!(sweep.next_slice(keys.iter().copied()), vec![3]);
        assert_eq!(sweep.next_slice(keys.iter().copied()), vec![1, 2]);
    }

    #[test]
    fn targets_followed_or_unfollowed_mid_round_do_not_restart_it() {
        let mut sweep = Sweep::new(2, Duration::from_secs(2));
        assert_eq!(sweep.next_slice([1_u64, 2, 3, 4].into_iter()), vec![1, 2]);
        // 3 went away and 5 arrived: the round goes on after 2.
        assert_eq!(sweep.next_slice([1_u64, 2, 4, 5].into_iter()), vec![4, 5]);
        assert_eq!(sweep.next_slice([1_u64, 2, 4, 5].into_iter()), vec![1, 2]);
    }

    #[test]
    fn nothing_followed_reads_nothing() {
        let mut sweep = Sweep::new(2, Duration::from_secs(2));
        assert!(sweep.next_slice(std::iter::empty()).is_empty());
    }

    #[test]
    fn slices_are_spread_evenly_over_the_interval() {
        let sweep = Sweep::new(1000, Duration::from_secs(2));
        assert_eq!(sweep.pause(0), Duration::from_secs(2));
        assert_eq!(sweep.pause(SLICE_TARGETS), Duration::from_secs(2));
        assert_eq!(sweep.pause(SLICE_TARGETS + 1), Duration::from_secs(1));
        assert_eq!(sweep.pause(10_000), Duration::from_millis(200));
    }

    #[test]
    fn the_first_round_and_every_eighth_after_it_read_everything() {
        let mut sweep = Sweep::new(2, Duration::from_secs(2));
        let keys = [1_u64, 2, 3];
        let mut full = Vec::new();
        for _ in 0..(2 * FULL_ROUND_EVERY + 1) {
            // Two slices a round: [1, 2] begins it, [3] ends it.
            let first = sweep.next_slice(keys.iter().copied());
            assert_eq!(first, vec![1, 2]);
            let begun_full = sweep.full_round();
            sweep.next_slice(keys.iter().copied());
            assert_eq!(
                sweep.full_round(),
                begun_full,
                "a round is one kind throughout"
            );
            full.push(begun_full);
        }
        let full_rounds: Vec<usize> = (0..full.len()).filter(|&round| full[round]).collect();
        assert_eq!(full_rounds, [0, 8, 16]);
    }

    #[test]
    fn a_slice_never_asks_for_more_than_one_batched_read_holds() {
        let mut sweep = Sweep::new(3, Duration::from_secs(2));
        assert_eq!(sweep.next_slice(0..1000).len(), 3);
        let mut sweep = Sweep::new(1000, Duration::from_secs(2));
        assert_eq!(sweep.next_slice(0..1000).len(), SLICE_TARGETS);
    }
}
