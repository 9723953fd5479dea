//! The per-request JSON work: parsing the request body's top level and reading usage from a
//! response.

#![allow(clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::adapters::usage_from_json;
use dataplane::body::JsonBody;
use dataplane::config::ProviderKind;
use std::hint::black_box;

fn request_body() -> Vec<u8> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(19);
    format!(
        r#"{{"model":"bench-model","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{text}"}}],"temperature":0.2,"max_tokens":64}}"#
    )
    .into_bytes()
}

fn response_body() -> Vec<u8> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(19);
    format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"bench-model","choices":[{{"index":0,"message":{{"role":"assistant","content":"(demo) You said: {text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":214,"completion_tokens":219,"total_tokens":433}}}}"#
    )
    .into_bytes()
}

fn json(c: &mut Criterion) {
    let req = request_body();
    let resp = response_body();
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("request_top_level_parse_1k", |b| {
        b.iter(|| {
            let body = JsonBody::parse(black_box(&req)).expect("valid");
            black_box(body.get_str("model"));
        })
    });
    // Baseline: serde_json validating the same bytes without building anything.
    g.bench_function("request_serde_validate_1k_baseline", |b| {
        b.iter(|| {
            black_box(
                serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&req)).expect("valid"),
            )
        })
    });
    g.throughput(Throughput::Bytes(resp.len() as u64));
    g.bench_function("response_usage_1k", |b| {
        b.iter(|| black_box(usage_from_json(ProviderKind::Openai, black_box(&resp))))
    });
    g.finish();
}

criterion_group!(benches, json);
criterion_main!(benches);
