#![no_main]
//! Arbitrary bytes through the sealed-file reader, as a node reads its snapshot at boot:
//! never a panic, and never an allocation beyond a small multiple of the bytes given (a
//! chunk's claimed length costs only the bytes that are there). Half the inputs start with
//! a valid head, so chunk parsing is reached.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use aigw_seal::{Kek, Opener, Sealer};
use libfuzzer_sys::fuzz_target;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn kek() -> &'static Kek {
    static K: OnceLock<Kek> = OnceLock::new();
    K.get_or_init(|| Kek::from_hex(&"42".repeat(32)).expect("hex"))
}

/// A valid head for the snapshot purpose, so mutations reach the chunks.
fn head() -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| Sealer::new(kek(), "key-snapshot").expect("sealer").1)
}

fuzz_target!(|data: &[u8]| {
    let input: Vec<u8> = if data.first().is_some_and(|b| b & 1 == 1) {
        let mut v = head().to_vec();
        v.extend_from_slice(&data[1..]);
        v
    } else {
        data.to_vec()
    };
    LARGEST.store(0, Ordering::Relaxed);
    if let Ok(mut o) = Opener::new(kek(), "key-snapshot", input.as_slice()) {
        while let Ok(Some(_)) = o.next_chunk() {}
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= 2 * input.len() + 4096,
        "{} bytes in, an allocation of {largest}",
        input.len()
    );
});
