//! Live heap bytes, for memory soaks.
//!
//! A node's RSS alone cannot tell a leak from the allocator keeping memory it
//! was given back: glibc holds on to freed memory (per arena) after a burst,
//! so RSS climbs in steps with every new high-water mark. Built with
//! `--features heap-stats` (what `make soak` runs), the node counts the bytes
//! allocated and not yet freed and exports them as
//! `herald_heap_allocated_bytes`: a leak makes that climb; retained memory
//! does not. Off by default, since every allocation then pays an atomic
//! update.

#[cfg(feature = "heap-stats")]
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Bytes allocated and not yet freed, when the node counts them.
pub(crate) fn allocated_bytes() -> Option<usize> {
    #[cfg(feature = "heap-stats")]
    {
        Some(ALLOCATOR.allocated())
    }
    #[cfg(not(feature = "heap-stats"))]
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
}
