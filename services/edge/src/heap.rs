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
//! Both are off by default, since every allocation then pays an atomic
//! update; together they stack (the counter wraps the live-bytes cap).

#[cfg(feature = "count-allocations")]
use std::alloc::{GlobalAlloc, Layout};
#[cfg(feature = "count-allocations")]
use std::sync::atomic::{AtomicU64, Ordering};

/// The allocator the counters wrap: `cap`'s live-bytes count with
/// `heap-stats`, the system allocator without.
#[cfg(feature = "heap-stats")]
type Inner = cap::Cap<std::alloc::System>;
#[cfg(all(feature = "count-allocations", not(feature = "heap-stats")))]
type Inner = std::alloc::System;

#[cfg(feature = "heap-stats")]
const INNER: Inner = cap::Cap::new(std::alloc::System, usize::MAX);
#[cfg(all(feature = "count-allocations", not(feature = "heap-stats")))]
const INNER: Inner = std::alloc::System;

#[cfg(all(feature = "heap-stats", not(feature = "count-allocations")))]
#[global_allocator]
static ALLOCATOR: Inner = INNER;

#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: Counting = Counting {
    inner: INNER,
    allocations: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

/// An allocator that counts the blocks it hands out and their sizes, then
/// leaves the work to `inner`. A `realloc` counts as one allocation of its
/// new size (it is a call into the allocator that may move the block).
/// Relaxed atomics: the counts are read at scrapes, long after the fact,
/// and the node runs pinned to one core in benchmarks (no line bouncing).
#[cfg(feature = "count-allocations")]
struct Counting {
    inner: Inner,
    allocations: AtomicU64,
    bytes: AtomicU64,
}

#[cfg(feature = "count-allocations")]
impl Counting {
    fn count(&self, size: usize) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed unchanged to `inner`, a correct allocator;
// counting touches only atomics and never allocates.
#[cfg(feature = "count-allocations")]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size());
        // SAFETY: as above.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count(new_size);
        // SAFETY: as above.
        unsafe { self.inner.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.inner.dealloc(ptr, layout) }
    }
}

/// Bytes allocated and not yet freed, when the node counts them.
pub(crate) fn allocated_bytes() -> Option<usize> {
    #[cfg(feature = "heap-stats")]
    {
        #[cfg(feature = "count-allocations")]
        let cap = &ALLOCATOR.inner;
        #[cfg(not(feature = "count-allocations"))]
        let cap = &ALLOCATOR;
        Some(cap.allocated())
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
    /// The sizes those calls asked for, summed.
    pub(crate) bytes: u64,
}

/// The totals so far, when built with `count-allocations`.
pub(crate) fn allocation_totals() -> Option<AllocationTotals> {
    #[cfg(feature = "count-allocations")]
    {
        Some(AllocationTotals {
            allocations: ALLOCATOR.allocations.load(Ordering::Relaxed),
            bytes: ALLOCATOR.bytes.load(Ordering::Relaxed),
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
            during.bytes >= before.bytes + (BLOCK + 16 + BLOCK / 2) as u64,
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
