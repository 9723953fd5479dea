//! Arbitrary bytes as an upstream's response, as the gateway reads it: the head parser, the
//! chunked body decoder and the SSE framer must never panic, the decoder must give the same
//! body whether its input arrives in one read or two, and the framer must keep every byte,
//! in order, whatever the split.

#![no_main]

use dataplane::h1::sse::{SseEvent, SseFramer};
use dataplane::h1::{parse_response_head, ChunkedDecoder, Limits};
use libfuzzer_sys::fuzz_target;

fn decode(limits: &Limits, parts: &[&[u8]]) -> Result<(Vec<u8>, bool), ()> {
    let mut d = ChunkedDecoder::new(limits);
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    for p in parts {
        pending.extend_from_slice(p);
        let progress = d.decode(&pending, &mut out).map_err(|_| ())?;
        pending.drain(..progress.consumed);
        done = progress.done;
        if done {
            break;
        }
    }
    Ok((out, done))
}

fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut f = SseFramer::new(256);
    let mut kept = Vec::new();
    for p in parts {
        let fed = f.feed(p, |raw, range| {
            if let Some(r) = &range {
                assert_eq!(&p[r.clone()], raw);
            }
            let e = SseEvent::parse(raw);
            assert!(e.raw.len() == raw.len());
            kept.extend_from_slice(raw);
        });
        match fed {
            Ok(()) => {}
            Err(e) => {
                // Too large: what was held and the rest of the chunk are what remains.
                kept.extend_from_slice(f.incomplete());
                kept.extend_from_slice(&p[e.unsent_from..]);
                return kept;
            }
        }
    }
    kept.extend_from_slice(f.incomplete());
    kept
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_body_bytes: 1 << 20,
        ..Limits::default()
    };
    let mut storage = [std::mem::MaybeUninit::uninit(); 100];
    if let Ok(Some(head)) = parse_response_head(data, &mut storage, &limits, false) {
        assert!(head.head_len <= data.len());
        let body = &data[head.head_len..];
        let whole = decode(&limits, &[body]);
        for cut in [1, body.len() / 2, body.len().saturating_sub(1)] {
            if cut > 0 && cut < body.len() {
                let split = decode(&limits, &[&body[..cut], &body[cut..]]);
                assert_eq!(whole.is_ok(), split.is_ok(), "cut at {cut}");
                if let (Ok((a, true)), Ok((b, true))) = (&whole, &split) {
                    assert_eq!(a, b, "cut at {cut}");
                }
            }
        }
    }
    // The SSE framer over the raw bytes, whole and split, keeps every byte in order (an
    // event too large for it aside, which is relayed untouched).
    let whole = frame(&[data]);
    if data.len() <= 256 {
        assert_eq!(whole, data);
    }
    let cut = data.len() / 3;
    let split = frame(&[&data[..cut], &data[cut..]]);
    if data.len() <= 256 {
        assert_eq!(split, data);
    }
});
