//! A counting allocator around mimalloc (the server's allocator), shared by
//! the micro-benchmarks that measure heap bytes: live bytes, and the
//! allocations made. Included with `#[path = "counting.rs"] mod counting;`;
//! it installs itself as the global allocator.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

use mimalloc::MiMalloc;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static ALLOC_BYTES: AtomicUsize = AtomicUsize::new(0);

fn counted(size: usize) {
    LIVE.fetch_add(size as isize, Relaxed);
    ALLOCS.fetch_add(1, Relaxed);
    ALLOC_BYTES.fetch_add(size, Relaxed);
}

// SAFETY: every method forwards to mimalloc with the caller's arguments
// unchanged; the counting around it never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is mimalloc's.
        let p = unsafe { MiMalloc.alloc(l) };
        if !p.is_null() {
            counted(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is mimalloc's.
        let p = unsafe { MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            counted(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator with layout `l`.
        unsafe { MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` came from this allocator with layout `l`.
        let q = unsafe { MiMalloc.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size() as isize, Relaxed);
            counted(new);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes allocated and not yet freed.
pub fn live() -> isize {
    LIVE.load(Relaxed)
}

/// Allocations made so far (reallocations count as one more).
#[allow(dead_code)] // not every benchmark asks
pub fn allocs() -> usize {
    ALLOCS.load(Relaxed)
}

/// Bytes asked for so far.
#[allow(dead_code)]
pub fn alloc_bytes() -> usize {
    ALLOC_BYTES.load(Relaxed)
}
