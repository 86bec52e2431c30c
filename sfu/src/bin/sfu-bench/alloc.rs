//! A counting global allocator: live heap bytes of the main thread (the load generator) and of
//! every other thread (in this process only the SFU's thread allocates), so the bench can tell
//! the SFU's memory per participant apart from its own clients'. A block freed by another thread
//! than the one that allocated it moves its bytes between the two counts (the offers and answers
//! that cross the command channel: a few KiB per participant, both ways, so they about cancel).
//! Another thread allocating at the same time as the SFU's could lose an update of the second
//! count; in this process there is none once the bench runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

pub struct Counting;

/// Each count on its own cache line: the two threads add to them on every allocation.
#[repr(align(128))]
struct Padded(AtomicI64);

static MAIN: Padded = Padded(AtomicI64::new(0));
static OTHER: Padded = Padded(AtomicI64::new(0));

thread_local! {
    static IS_MAIN: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the load generator's.
pub fn mark_main() {
    IS_MAIN.with(|m| m.set(true));
}

/// Live heap bytes allocated by threads other than the main one.
pub fn other_bytes() -> i64 {
    OTHER.0.load(Relaxed)
}

/// Each count has one writer (the main thread, the SFU's thread), so a plain load and store
/// does: no locked instruction on the SFU's hot path, whose CPU time the bench measures.
fn account(delta: i64) {
    let main = IS_MAIN.try_with(Cell::get).unwrap_or(false);
    let c = &if main { &MAIN } else { &OTHER }.0;
    c.store(c.load(Relaxed) + delta, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as i64));
        // SAFETY: the caller's block, allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's block and layout, forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as i64 - layout.size() as i64);
        }
        p
    }
}
