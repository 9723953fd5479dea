//! Throughput of the sans-I/O HTTP/1.1 request codec: head parsing (realistic, minimal and
//! many-field heads), parsing plus recording the head as offsets, and chunked body decoding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::h1::{parse_request_head, ChunkedDecoder, HeadIndex, Limits};

#[path = "../tests/fixtures/heads.rs"]
mod heads;

fn minimal_head() -> Vec<u8> {
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()
}

fn forty_header_head() -> Vec<u8> {
    let mut h =
        b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway.internal\r\nContent-Length: 512\r\n"
            .to_vec();
    for i in 0..38 {
        h.extend_from_slice(
            format!("X-Custom-Header-{i:02}: value-{i:02}-abcdefghijklmnopqrstuvwxyz\r\n")
                .as_bytes(),
        );
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// `body_len` bytes of payload in chunks of `chunk` bytes, chunked-encoded.
fn chunked_body(body_len: usize, chunk: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..body_len)
        .map(|i| b"{\"role\":\"user\"}"[i % 15])
        .collect();
    let mut enc = Vec::with_capacity(body_len + body_len / chunk * 8 + 8);
    for part in payload.chunks(chunk) {
        enc.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        enc.extend_from_slice(part);
        enc.extend_from_slice(b"\r\n");
    }
    enc.extend_from_slice(b"0\r\n\r\n");
    enc
}

fn bench_parse(c: &mut Criterion) {
    let limits = Limits::default();
    let cases = [
        ("openai_chat_1k", heads::OPENAI_CHAT_HEAD.to_vec()),
        ("minimal", minimal_head()),
        ("40_headers", forty_header_head()),
    ];

    let mut g = c.benchmark_group("parse_request_head");
    for (name, raw) in &cases {
        // Every case must be a complete, valid head or the numbers mean nothing.
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(raw, &mut storage, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(head.head_len, raw.len(), "{name}");

        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut storage = [std::mem::MaybeUninit::uninit(); 100];
                let head = parse_request_head(black_box(raw), &mut storage, black_box(&limits))
                    .unwrap()
                    .unwrap();
                black_box(head.head_len);
                black_box(head.framing);
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("parse_and_index");
    for (name, raw) in &cases {
        g.throughput(Throughput::Bytes(raw.len() as u64));
        let mut index = HeadIndex::default();
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut storage = [std::mem::MaybeUninit::uninit(); 100];
                let buf = black_box(&raw[..]);
                let head = parse_request_head(buf, &mut storage, black_box(&limits))
                    .unwrap()
                    .unwrap();
                index.fill(buf, &head);
                black_box(&index);
            });
        });
    }
    g.finish();
}

fn bench_chunked(c: &mut Criterion) {
    let limits = Limits::default();
    let encoded = chunked_body(16 * 1024, 1024);
    let mut out = Vec::with_capacity(16 * 1024);

    // Sanity: decodes in one feed to the full body.
    let mut d = ChunkedDecoder::new(&limits);
    let p = d.decode(&encoded, &mut out).unwrap();
    assert!(p.done && p.consumed == encoded.len() && out.len() == 16 * 1024);

    let mut g = c.benchmark_group("chunked_decode");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("16k_body_1k_chunks", |b| {
        b.iter(|| {
            out.clear();
            let mut d = ChunkedDecoder::new(black_box(&limits));
            let p = d.decode(black_box(&encoded), &mut out).unwrap();
            black_box(p);
            black_box(out.len());
        });
    });
    // The same body arriving in 1 KiB network reads that do not line up with chunk edges.
    g.bench_function("16k_body_1k_chunks_fed_in_1000b_reads", |b| {
        b.iter(|| {
            out.clear();
            let mut d = ChunkedDecoder::new(black_box(&limits));
            let mut pos = 0;
            while pos < encoded.len() {
                let end = (pos + 1000).min(encoded.len());
                let p = d.decode(black_box(&encoded[pos..end]), &mut out).unwrap();
                pos += p.consumed;
                if p.done {
                    break;
                }
            }
            black_box(out.len());
        });
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_chunked);
criterion_main!(benches);
