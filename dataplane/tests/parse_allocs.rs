//! Parsing a request head, recording it in a reused `HeadIndex`, and decoding a chunked body
//! into a pre-reserved buffer allocate nothing. A counting global allocator proves it.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The global allocator below has to implement the unsafe `GlobalAlloc` trait.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use dataplane::h1::{parse_request_head, BodyFraming, ChunkedDecoder, HeadIndex, Limits};

/// Counts allocations (alloc, alloc_zeroed, realloc) made by the current thread while its
/// counting flag is on; other test threads running in parallel are not counted.
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc() {
    // `try_with`: during thread teardown the thread-locals may already be gone. Both are
    // `const`-initialised `Cell`s, so touching them never allocates (no recursion).
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if counting {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is upheld exactly as `System` upholds it; the counting only touches
// thread-local `Cell`s and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same `layout` the caller guaranteed valid (non-zero size) for `alloc`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same `layout` the caller guaranteed valid for `alloc_zeroed`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: `ptr` was allocated by this allocator (i.e. by `System`) with `layout`, and
        // the caller guarantees `new_size` is valid, as `realloc` requires.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (i.e. by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` with counting on for this thread and returns how many allocations it made.
fn count_allocs<R>(f: impl FnOnce() -> R) -> (usize, R) {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (COUNT.with(Cell::get), r)
}

const ITERATIONS: usize = 1000;

#[path = "fixtures/heads.rs"]
mod heads;
use heads::OPENAI_CHAT_HEAD as CHAT_HEAD;

const CHUNKED_HEAD: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nTransfer-Encoding: chunked\r\n\r\n";

fn chunked_body(body_len: usize, chunk: usize) -> Vec<u8> {
    let mut enc = Vec::new();
    let payload = vec![b'x'; body_len];
    for part in payload.chunks(chunk) {
        enc.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        enc.extend_from_slice(part);
        enc.extend_from_slice(b"\r\n");
    }
    enc.extend_from_slice(b"0\r\nChecksum: abc\r\n\r\n");
    enc
}

#[test]
fn counter_counts_allocations() {
    let (n, v) = count_allocs(|| Vec::<u8>::with_capacity(10));
    assert_eq!(
        n, 1,
        "Vec::with_capacity(10) must be counted as one allocation"
    );
    drop(v);

    let (n, ()) = count_allocs(|| {
        let mut v = black_box(Vec::<u8>::with_capacity(1));
        v.extend_from_slice(black_box(&[0u8; 64])); // grows: a realloc
        black_box(&v);
    });
    assert_eq!(n, 2, "alloc + realloc");

    // Nothing is counted outside the counted region.
    let (n, ()) = count_allocs(|| ());
    assert_eq!(n, 0);
}

#[test]
fn parsing_a_head_allocates_nothing() {
    let limits = Limits::default();
    // Warm-up outside the counted region (lazy statics, if any, get initialised here).
    {
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(CHAT_HEAD, &mut storage, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(head.head_len, CHAT_HEAD.len());
        assert_eq!(head.framing, BodyFraming::Length(16384));
        assert!(head.headers.len() >= 20);
    }

    let (n, total) = count_allocs(|| {
        let mut total = 0usize;
        for _ in 0..ITERATIONS {
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            let head = parse_request_head(black_box(CHAT_HEAD), &mut storage, black_box(&limits))
                .unwrap()
                .unwrap();
            total += head.head_len + head.headers.len();
            black_box(&head);
        }
        total
    });
    assert!(total > 0);
    assert_eq!(
        n, 0,
        "parse_request_head allocated {n} times in {ITERATIONS} parses"
    );
}

#[test]
fn partial_and_rejected_heads_allocate_nothing() {
    let limits = Limits::default();
    let partial = &CHAT_HEAD[..CHAT_HEAD.len() / 2];
    let bad =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (n, ()) = count_allocs(|| {
        for _ in 0..ITERATIONS {
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            let r = parse_request_head(black_box(partial), &mut storage, &limits).unwrap();
            assert!(r.is_none());
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            let r = parse_request_head(black_box(&bad[..]), &mut storage, &limits);
            assert!(r.is_err());
        }
    });
    assert_eq!(n, 0, "partial/rejected parses allocated {n} times");
}

#[test]
fn filling_a_reused_head_index_allocates_nothing() {
    let limits = Limits::default();
    // Created and used once beforehand: its field Vec already has the capacity it needs.
    let mut index = HeadIndex::default();
    {
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(CHAT_HEAD, &mut storage, &limits)
            .unwrap()
            .unwrap();
        index.fill(CHAT_HEAD, &head);
    }
    let fields = index.fields.len();
    assert!(fields >= 20);

    let (n, ()) = count_allocs(|| {
        for _ in 0..ITERATIONS {
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            let buf = black_box(CHAT_HEAD);
            let head = parse_request_head(buf, &mut storage, &limits)
                .unwrap()
                .unwrap();
            index.fill(buf, &head);
            black_box(&index);
        }
    });
    assert_eq!(n, 0, "parse + HeadIndex::fill allocated {n} times");
    assert_eq!(index.fields.len(), fields);
    assert_eq!(index.path.get(CHAT_HEAD), b"/v1/chat/completions");
}

#[test]
fn chunked_decoding_into_a_reserved_buffer_allocates_nothing() {
    let limits = Limits::default();
    let mut storage = [std::mem::MaybeUninit::uninit(); 100];
    let head = parse_request_head(CHUNKED_HEAD, &mut storage, &limits)
        .unwrap()
        .unwrap();
    assert_eq!(head.framing, BodyFraming::Chunked);

    let body_len = 16 * 1024;
    let encoded = chunked_body(body_len, 1024);
    let mut out = Vec::with_capacity(body_len);

    let (n, ()) = count_allocs(|| {
        for _ in 0..ITERATIONS / 10 {
            // All at once.
            out.clear();
            let mut d = ChunkedDecoder::new(&limits);
            let p = d.decode(black_box(&encoded), &mut out).unwrap();
            assert!(p.done);
            assert_eq!(p.consumed, encoded.len());
            assert_eq!(out.len(), body_len);

            // In reads that do not line up with chunk edges.
            out.clear();
            let mut d = ChunkedDecoder::new(&limits);
            let mut pos = 0;
            while !d.is_done() {
                let end = (pos + 1000).min(encoded.len());
                let p = d.decode(black_box(&encoded[pos..end]), &mut out).unwrap();
                pos += p.consumed;
            }
            assert_eq!(pos, encoded.len());
            assert_eq!(out.len(), body_len);
        }
    });
    assert_eq!(n, 0, "ChunkedDecoder::decode allocated {n} times");
}
