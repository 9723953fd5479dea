//! Throughput of the sans-I/O HTTP/1.1 request codec: head parsing (realistic, minimal and
//! many-field heads), parsing plus recording the head as offsets, and chunked body decoding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::h1::{parse_request_head, ChunkedDecoder, HeadIndex, Limits};

/// The head of a typical OpenAI SDK chat completion request (~1 KiB).
fn openai_chat_head() -> Vec<u8> {
    let head = concat!(
        "POST /v1/chat/completions HTTP/1.1\r\n",
        "Host: api.openai.com\r\n",
        "Authorization: Bearer sk-proj-4f9b2c7e1a8d3f6b0e5c9a2d7f1b4e8c3a6d9f2b5e8c1a4d7f0b3e6c9a2d5f8b1e4c7a0d3f6b9e2c5a8d1f4b7e0c3a6d9f2b5e8c1a4d\r\n",
        "Content-Type: application/json\r\n",
        "Content-Length: 16384\r\n",
        "User-Agent: OpenAI/Python 1.54.3\r\n",
        "Accept: application/json\r\n",
        "Accept-Encoding: gzip, deflate, br\r\n",
        "Connection: keep-alive\r\n",
        "OpenAI-Organization: org-Zq3xT9vW2kLmN8pR4sY6uB1c\r\n",
        "OpenAI-Project: proj_a1B2c3D4e5F6g7H8i9J0k1L2\r\n",
        "X-Stainless-Lang: python\r\n",
        "X-Stainless-Package-Version: 1.54.3\r\n",
        "X-Stainless-OS: Linux\r\n",
        "X-Stainless-Arch: x64\r\n",
        "X-Stainless-Runtime: CPython\r\n",
        "X-Stainless-Runtime-Version: 3.12.7\r\n",
        "X-Stainless-Async: false\r\n",
        "X-Stainless-Retry-Count: 0\r\n",
        "X-Stainless-Read-Timeout: 600\r\n",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
        "tracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\r\n",
        "X-Request-Id: 7b2e4c1a-9f3d-4e8b-a6c5-1d0f2e3b4a59\r\n",
        "Idempotency-Key: stainless-python-retry-2d8f6a1c-4b3e-4f7a-9c2d-8e1b5a7f3c60\r\n",
        "Cookie: __cf_bm=Qm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5d2FsZG8.1731000000-1.0.1.1-abcdefghijklmnop\r\n",
        "\r\n",
    );
    head.as_bytes().to_vec()
}

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
        ("openai_chat_1k", openai_chat_head()),
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
