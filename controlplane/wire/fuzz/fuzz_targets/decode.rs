#![no_main]
//! Arbitrary bytes through the frame decoder: never a panic, whatever decodes re-encodes
//! to a frame that decodes to the same message, and decoding never holds more than a small
//! multiple of the bytes it was given (a counting allocator measures the peak).
//!
//! One exception to the round trip: a message of near-empty repeated items that arrived
//! padded (unknown or repeated fields, which decoding drops) re-encodes smaller, and the
//! smaller frame may exceed the decoder's expansion bound. It is never a frame an honest
//! peer sends (real records are far larger than the bound's 1/16 of their size in memory),
//! and the re-encoding is then always smaller than what was received.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use aigw_wire::{decode_frame, encode_frame, Frame, DEFAULT_MAX_FRAME};
use libfuzzer_sys::fuzz_target;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// As in the crate's `alloc_bound` test.
const FACTOR: usize = 40;
const FIXED: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let first = decode_frame(data, DEFAULT_MAX_FRAME);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        peak <= FACTOR * data.len() + FIXED,
        "{} bytes decoded with a peak of {peak}",
        data.len()
    );
    drop(first);
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest, DEFAULT_MAX_FRAME) {
        assert!(used <= rest.len() && used >= 6);
        if let Frame::Message(m) = frame {
            let mut again = Vec::new();
            encode_frame(&m, &mut again);
            let (back, n) = match decode_frame(&again, DEFAULT_MAX_FRAME) {
                Ok(v) => v.expect("complete"),
                Err(aigw_wire::codec::InvalidMessage::Expansion) => {
                    assert!(again.len() < used, "refused a re-encoding no smaller than its input");
                    rest = &rest[used..];
                    continue;
                }
                Err(e) => panic!("re-encoded frame does not decode: {e}"),
            };
            assert_eq!(n, again.len());
            assert_eq!(back, Frame::Message(m));
        }
        rest = &rest[used..];
    }
});
