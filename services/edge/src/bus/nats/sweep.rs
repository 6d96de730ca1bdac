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
//! A slice is a run of follow keys in key order after the last one read,
//! wrapping around: a target followed or unfollowed mid-round neither stops
//! the round nor makes another target wait longer than a round.
//!
//! Most rounds are **since** rounds: a slice asks only for subjects with a
//! message after the lowest position its targets were all checked complete
//! through, so a quiet target costs nats-server a lookup and no message, and
//! the node nothing; a target a live copy connected to since the last
//! visit is not read at all (the dispatcher leaves it out: that copy showed
//! its chain complete). Every [`FULL_ROUND_EVERY`]th round (the first one
//! included) asks for every subject's newest message, so that each chain's
//! end is seen to still stand in the stored history at least that often,
//! quiet or not.
//!
//! How many targets a slice holds follows from what its answer will carry:
//! about [`SLICE_ANSWERS`] messages, so that a live event never waits behind
//! a long answer. A full round's slices are that many targets (every one is
//! answered). A since round sizes its slices from the share of targets the
//! last since round found with something new, up to one batched read: quiet
//! targets make large slices, and large slices matter, because nats-server
//! answers a multi-subject read by walking every subject of the stream's
//! newest blocks however few were asked (`fileStore.MultiLastSeqs`), so a
//! round of 100-subject reads paid that walk ten times more often than one
//! of 1,000-subject reads.

use std::time::Duration;

/// About how many messages one slice's answer should carry.
pub(super) const SLICE_ANSWERS: usize = 100;

/// Every this many rounds, one reads every target's newest message (the
/// others read only what is newer than each slice's checked position).
pub(super) const FULL_ROUND_EVERY: u64 = 8;

/// Where the periodic check is in its round over the followed targets.
#[derive(Debug)]
pub(super) struct Sweep {
    /// Most targets one batched read may ask for.
    per_batch: usize,
    /// Targets a slice of the round under way reads.
    per_slice: usize,
    /// How long a whole round takes.
    interval: Duration,
    /// The next slice starts at the first key at or after this one.
    cursor: u64,
    /// Rounds begun so far (the one under way included).
    rounds: u64,
    /// Targets asked for, and answered with a message, in the since round
    /// under way, then in the last one completed.
    asked: usize,
    answered: usize,
    last_since: Option<(usize, usize)>,
}

impl Sweep {
    /// A round of `interval` in slices of at most `per_batch` targets (the
    /// most one batched read may ask for).
    pub(super) fn new(per_batch: usize, interval: Duration) -> Self {
        let per_batch = per_batch.max(1);
        Sweep {
            per_batch,
            per_slice: per_batch.min(SLICE_ANSWERS),
            interval,
            cursor: 0,
            rounds: 1,
            asked: 0,
            answered: 0,
            last_since: None,
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

    /// A slice of a since round visited `asked` targets (those it left out
    /// included) and was answered with `answered` messages.
    pub(super) fn since_answered(&mut self, asked: usize, answered: usize) {
        self.asked += asked;
        self.answered += answered;
    }

    /// Starts the next round: its kind, and its slices' size.
    fn next_round(&mut self) {
        if !self.full_round() && self.asked > 0 {
            self.last_since = Some((self.asked, self.answered));
        }
        self.asked = 0;
        self.answered = 0;
        self.rounds += 1;
        let smallest = self.per_batch.min(SLICE_ANSWERS);
        self.per_slice = match self.last_since {
            Some((asked, answered)) if !self.full_round() => {
                // Targets per slice so that its answer holds about
                // SLICE_ANSWERS messages, at the last since round's share.
                (SLICE_ANSWERS.saturating_mul(asked) / answered.max(1))
                    .clamp(smallest, self.per_batch)
            }
            _ => smallest,
        };
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
            self.next_round();
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
        assert_eq!(sweep.pause(SLICE_ANSWERS), Duration::from_secs(2));
        assert_eq!(sweep.pause(SLICE_ANSWERS + 1), Duration::from_secs(1));
        assert_eq!(sweep.pause(10_000), Duration::from_millis(20));
    }

    /// Reads one whole round; each since slice is answered for `share` of
    /// its targets. Returns the sizes of the round's slices.
    fn round(sweep: &mut Sweep, keys: &[u64], share: f64) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut read = 0;
        while read < keys.len() {
            let slice = sweep.next_slice(keys.iter().copied());
            if !sweep.full_round() {
                let answered = (slice.len() as f64 * share).round() as usize;
                sweep.since_answered(slice.len(), answered);
            }
            read += slice.len();
            sizes.push(slice.len());
        }
        sizes
    }

    #[test]
    fn slices_grow_over_quiet_targets_and_shrink_back_when_they_are_busy() {
        let mut sweep = Sweep::new(1000, Duration::from_secs(2));
        let keys: Vec<u64> = (0..3000).collect();
        // The first round is full: every target is answered.
        assert!(round(&mut sweep, &keys, 1.0).iter().all(|&n| n == 100));
        // The first since round knows nothing yet; 2 % of its targets had news.
        assert!(round(&mut sweep, &keys, 0.02).iter().all(|&n| n == 100));
        // So the next one reads as many as one batched read holds.
        let quiet = round(&mut sweep, &keys, 1.0);
        assert_eq!(quiet, [1000, 1000, 1000]);
        assert_eq!(sweep.pause(3000), Duration::from_secs(2) / 3);
        // Every target had news: back to slices whose answers hold about 100.
        assert!(round(&mut sweep, &keys, 0.5).iter().all(|&n| n == 100));
        // Half had news: 200 a slice.
        assert!(round(&mut sweep, &keys, 0.5).iter().all(|&n| n == 200));
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
        assert_eq!(sweep.next_slice(0..1000).len(), SLICE_ANSWERS);
        // However quiet the targets, a since round's slice is one read.
        let keys: Vec<u64> = (0..5000).collect();
        let mut sweep = Sweep::new(700, Duration::from_secs(2));
        round(&mut sweep, &keys, 1.0);
        round(&mut sweep, &keys, 0.0);
        assert!(
            round(&mut sweep, &keys, 0.0)
                .iter()
                .all(|&n| n == 700 || n == 5000 % 700)
        );
    }
}
