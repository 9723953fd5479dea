//! Arbitrary bytes into the HTTP/1.1 request codec: the head parser must never panic, and
//! whatever it accepts must satisfy the invariants the proxy relies on. The chunked decoder
//! must give the same result whether its input arrives in one read or two.

#![no_main]

use dataplane::h1::{parse_request_head, BodyFraming, ChunkedDecoder, H1Error, Limits};
use libfuzzer_sys::fuzz_target;

fn small_limits() -> Limits {
    Limits {
        max_head_bytes: 256,
        max_headers: 8,
        max_request_line_bytes: 64,
        max_chunk_ext_bytes: 16,
        max_trailer_bytes: 64,
        max_body_bytes: 1024,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_head(data: &[u8], limits: &Limits) {
    let mut storage = [std::mem::MaybeUninit::uninit(); 100];
    let head = match parse_request_head(data, &mut storage, limits) {
        Ok(Some(head)) => head,
        Ok(None) | Err(_) => return,
    };

    // The invariants the brief asks for.
    assert!(head.head_len <= data.len(), "head_len {} > input {}", head.head_len, data.len());
    for h in head.headers {
        assert!(
            !h.value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0),
            "CR/LF/NUL in value of {:?}: {:?}",
            h.name,
            h.value
        );
    }

    // Further invariants that follow from the codec's documented rules.
    assert!(head.head_len <= limits.max_head_bytes, "head over max_head_bytes");
    assert!(head.headers.len() <= limits.max_headers, "more fields than max_headers");
    assert!(data[..head.head_len].ends_with(b"\r\n\r\n"), "head does not end in CRLFCRLF");
    assert!(!head.method.is_empty() && head.method.bytes().all(is_tchar), "bad method token");
    for h in head.headers {
        assert!(!h.name.is_empty() && h.name.bytes().all(is_tchar), "bad field name {:?}", h.name);
    }
    if let BodyFraming::Length(n) = head.framing {
        assert!(n <= limits.max_body_bytes, "Content-Length {n} over max_body_bytes");
    }

    if head.framing == BodyFraming::Chunked {
        let rest = &data[head.head_len..];
        let mut d = ChunkedDecoder::new(limits);
        let mut out = Vec::new();
        if let Ok(p) = d.decode(rest, &mut out) {
            assert!(p.consumed <= rest.len(), "consumed {} > remaining {}", p.consumed, rest.len());
            assert!(p.done || p.consumed == rest.len(), "stopped early without finishing");
        }
        assert!(out.len() as u64 <= limits.max_body_bytes, "decoded {} bytes", out.len());
        assert!(d.body_len() <= limits.max_body_bytes, "declared {} bytes", d.body_len());
    }
}

/// Everything observable about one decode run.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    result: Result<(usize, bool), H1Error>,
    out: Vec<u8>,
}

fn decode_whole(data: &[u8], limits: &Limits) -> Outcome {
    let mut d = ChunkedDecoder::new(limits);
    let mut out = Vec::new();
    let result = d.decode(data, &mut out).map(|p| (p.consumed, p.done));
    Outcome { result, out }
}

/// Feeds `data[..split]`, then (if that did not fail) `data[split..]`. `None` when the first
/// part errors, since the comparison is only meaningful when both feeds ran.
fn decode_split(data: &[u8], split: usize, limits: &Limits) -> Option<Outcome> {
    let (first, second) = data.split_at(split);
    let mut d = ChunkedDecoder::new(limits);
    let mut out = Vec::new();
    let p1 = d.decode(first, &mut out).ok()?;
    assert!(p1.consumed <= first.len());
    if !p1.done {
        assert_eq!(p1.consumed, first.len(), "first feed stopped early without finishing");
    }
    let result = d.decode(second, &mut out).map(|p2| {
        assert!(p2.consumed <= second.len());
        if p1.done {
            // A finished decoder consumes nothing more.
            assert_eq!(p2.consumed, 0, "decoder consumed bytes after it was done");
            assert!(p2.done);
        }
        (p1.consumed + p2.consumed, p2.done)
    });
    Some(Outcome { result, out })
}

fn check_chunked_split(data: &[u8], limits: &Limits) {
    // A data-derived split point anywhere in 0..=len.
    let seed = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        [a] => usize::from(*a),
        [] => 0,
    };
    let split = seed % (data.len() + 1);
    let whole = decode_whole(data, limits);
    if let Some(split_outcome) = decode_split(data, split, limits) {
        assert_eq!(whole, split_outcome, "split at {split} changed the outcome");
    }
    if let Ok((consumed, _)) = whole.result {
        assert!(consumed <= data.len());
    }
    assert!(whole.out.len() as u64 <= limits.max_body_bytes);
}

fuzz_target!(|data: &[u8]| {
    let default = Limits::default();
    let small = small_limits();
    check_head(data, &default);
    check_head(data, &small);
    check_chunked_split(data, &default);
    check_chunked_split(data, &small);
});
