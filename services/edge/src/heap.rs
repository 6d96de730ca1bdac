//! Heap accounting for soaks and benchmarks, each behind its own feature.
//!
//! - `heap-stats`: live heap bytes. A node's RSS alone cannot tell a leak
//!   from the allocator keeping memory it was given back: glibc holds on to
//!   freed memory (per arena) after a burst, so RSS climbs in steps with every
//!   new high-water mark. Built with `--features heap-stats` (what `make soak`
//!   runs), the node counts the bytes allocated and not yet freed and exports
//!   them as `herald_heap_allocated_bytes`: a leak makes that climb; retained
//!   memory does not.
//! - `count-allocations`: every allocation and the bytes it asked for, since
//!   the start (`herald_allocations_total`, `herald_allocated_bytes_total`).
//!   The load generator reads both before and after its measured window and
//!   reports allocations per delivered event (`make bench-allocations`).
//!
//! Both are off by default, since every allocation then pays atomic
//! updates (the workspace forbids `unsafe`, so the wrappers are crates':
//! `cap`, `stats_alloc`).

// One global allocator: `cap`'s live-bytes count for `heap-stats` alone;
// `stats_alloc`'s counters with `count-allocations`, which give the live
// bytes too (allocated minus freed), so the two features stack.
#[cfg(all(feature = "heap-stats", not(feature = "count-allocations")))]
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: stats_alloc::StatsAlloc<std::alloc::System> = stats_alloc::StatsAlloc::system();

/// Bytes allocated and not yet freed, when the node counts them.
pub(crate) fn allocated_bytes() -> Option<usize> {
    #[cfg(all(feature = "heap-stats", not(feature = "count-allocations")))]
    {
        Some(ALLOCATOR.allocated())
    }
    #[cfg(all(feature = "heap-stats", feature = "count-allocations"))]
    {
        let stats = ALLOCATOR.stats();
        Some(
            stats
                .bytes_allocated
                .saturating_sub(stats.bytes_deallocated),
        )
    }
    #[cfg(not(feature = "heap-stats"))]
    {
        None
    }
}

/// Allocations made since the start, and the bytes they asked for, when the
/// node counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AllocationTotals {
    /// Calls that obtained memory (`alloc`, `alloc_zeroed`, `realloc`).
    pub(crate) allocations: u64,
    /// The bytes they obtained: each new block's size, and what each
    /// `realloc` grew a block by.
    pub(crate) bytes: u64,
}

/// The totals so far, when built with `count-allocations`.
pub(crate) fn allocation_totals() -> Option<AllocationTotals> {
    #[cfg(feature = "count-allocations")]
    {
        let stats = ALLOCATOR.stats();
        Some(AllocationTotals {
            allocations: (stats.allocations + stats.reallocations) as u64,
            bytes: stats.bytes_allocated as u64,
        })
    }
    #[cfg(not(feature = "count-allocations"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "heap-stats")]
    #[test]
    fn a_live_block_is_counted_until_it_is_freed() {
        const BLOCK: usize = 8 << 20;
        let before = allocated_bytes().expect("counted with heap-stats");
        let block = vec![1u8; BLOCK];
        let during = allocated_bytes().expect("counted");
        // Other test threads allocate too, but not megabytes at a time.
        assert!(during >= before + BLOCK / 2, "{before} -> {during}");
        drop(std::hint::black_box(block));
        let after = allocated_bytes().expect("counted");
        assert!(after + BLOCK / 2 <= during, "{during} -> {after}");
    }

    #[cfg(not(feature = "heap-stats"))]
    #[test]
    fn without_the_feature_nothing_is_counted() {
        assert_eq!(allocated_bytes(), None);
    }

    #[cfg(feature = "count-allocations")]
    #[test]
    fn every_allocation_and_its_bytes_move_the_totals_and_frees_do_not_take_them_back() {
        const BLOCK: usize = 3 << 20;
        let before = allocation_totals().expect("counted with count-allocations");
        let block = std::hint::black_box(vec![7u8; BLOCK]);
        let grown = {
            let mut grown = std::hint::black_box(Vec::<u8>::with_capacity(16));
            grown.extend_from_slice(&block[..BLOCK / 2]);
            grown
        };
        let during = allocation_totals().expect("counted");
        // Three calls at least (the block, the small vec, its growth); other
        // test threads may add theirs, never take any away.
        assert!(
            during.allocations >= before.allocations + 3,
            "{before:?} -> {during:?}"
        );
        assert!(
            during.bytes >= before.bytes + (BLOCK + BLOCK / 2) as u64,
            "{before:?} -> {during:?}"
        );
        drop(std::hint::black_box(block));
        drop(std::hint::black_box(grown));
        let after = allocation_totals().expect("counted");
        assert!(
            after.allocations >= during.allocations,
            "{during:?} -> {after:?}"
        );
        assert!(after.bytes >= during.bytes, "{during:?} -> {after:?}");
    }

    #[cfg(not(feature = "count-allocations"))]
    #[test]
    fn without_count_allocations_no_totals_are_kept() {
        assert_eq!(allocation_totals(), None);
    }
}
