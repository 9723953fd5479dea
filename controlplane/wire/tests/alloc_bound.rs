//! Decoding allocates in proportion to the bytes decoded: whatever a peer sends, the
//! decoder's peak allocation stays within a small multiple of the frame's size. A counting
//! allocator measures it over arbitrary bytes and over frames built to expand (many tiny
//! fields, empty records, empty lists).

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The global allocator below has to implement the unsafe `GlobalAlloc` trait.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use aigw_wire::codec::{put_field, put_str, put_u64};
use aigw_wire::messages::types;
use aigw_wire::{decode_frame, DEFAULT_MAX_FRAME};
use proptest::prelude::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the same layout; the counters
// are only read by this test.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if new > layout.size() {
            let live = LIVE.fetch_add(new - layout.size(), Ordering::Relaxed) + new - layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new, Ordering::Relaxed);
        }
        // SAFETY: as for `dealloc`, and `new` is the caller's.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Most bytes a decode may hold at once per byte of frame, beyond a fixed allowance.
const FACTOR: usize = 40;
const FIXED: usize = 64 * 1024;

/// Peak bytes allocated while decoding `frame` (whatever the outcome).
fn peak_of(frame: &[u8]) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let decoded = decode_frame(frame, DEFAULT_MAX_FRAME);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    drop(decoded);
    peak
}

fn frame(code: u16, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 2) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `n` copies of the field `tag` around `inner`.
fn repeat(tag: u64, inner: &[u8], n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        put_field(&mut out, tag, |o| o.extend_from_slice(inner));
    }
    out
}

/// Bodies built to expand as much as the decoder lets them.
fn adversarial(n: usize) -> Vec<(u16, Vec<u8>)> {
    let mut tombstone = Vec::new();
    put_field(&mut tombstone, 2, |o| {
        put_u64(o, 1, 1);
    });
    let mut empty_upsert = Vec::new();
    put_field(&mut empty_upsert, 1, |o| put_field(o, 9, |_| {}));
    let mut models = Vec::new();
    put_str(&mut models, 1, "abcdefghijkl");
    put_str(&mut models, 2, "t");
    put_str(&mut models, 3, "production");
    put_u64(&mut models, 5, 1);
    put_field(&mut models, 6, |o| o.extend_from_slice(&[0; 32]));
    put_field(&mut models, 7, |o| o.push(1));
    models.extend(repeat(10, b"", n));
    let mut key = Vec::new();
    put_field(&mut key, 1, |o| o.extend_from_slice(&models));
    let mut changes_head = Vec::new();
    put_u64(&mut changes_head, 2, 1);
    let with_head = |body: Vec<u8>| {
        let mut b = changes_head.clone();
        b.extend(body);
        b
    };
    let mut snapshot_head = Vec::new();
    put_u64(&mut snapshot_head, 1, 1);
    put_u64(&mut snapshot_head, 3, 1);
    let snapshot = |body: Vec<u8>| {
        let mut b = snapshot_head.clone();
        b.extend(body);
        b
    };
    vec![
        // Many empty unknown fields: no index of them is built.
        (types::HELLO, repeat(99, b"", n)),
        // Many minimal tombstones, and many unknown-kind upserts.
        (types::CHANGES, with_head(repeat(3, &tombstone, n))),
        (types::CHANGES, with_head(repeat(3, &empty_upsert, n))),
        // Many empty unknown records in a snapshot.
        (types::SNAPSHOT, snapshot(repeat(4, &[9, 0], n))),
        // A key with many empty model names.
        (types::SNAPSHOT, snapshot(key)),
        // Many empty usage entries and problems.
        (types::USAGE_REPORT, repeat(4, b"", n)),
        (types::ACK, {
            let mut b = Vec::new();
            put_u64(&mut b, 1, 1);
            b.extend(repeat(2, b"", n));
            b
        }),
    ]
}

#[test]
fn decoding_allocates_within_a_small_multiple_of_the_input() {
    for n in [1, 100, 10_000, 200_000] {
        for (code, body) in adversarial(n) {
            let f = frame(code, &body);
            let peak = peak_of(&f);
            assert!(
                peak <= FACTOR * f.len() + FIXED,
                "type {code}, {n} fields: {} bytes decoded with a peak of {peak} bytes",
                f.len()
            );
        }
    }
    proptest!(ProptestConfig::with_cases(2000), |(code in 0u16..12, body in proptest::collection::vec(any::<u8>(), 0..4096))| {
        let f = frame(code, &body);
        let peak = peak_of(&f);
        prop_assert!(peak <= FACTOR * f.len() + FIXED, "{} bytes, peak {}", f.len(), peak);
    });
}
