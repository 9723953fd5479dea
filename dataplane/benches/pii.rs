//! PII scan + redact throughput: Hyperscan (the product) against a `regex`-crate baseline
//! running the same rule expressions, extensions, validators and overlap rule, on an 8 KiB
//! chat prompt with a few PII items and on a 1 MiB JSON-ish body.
//!
//! `cargo bench -p dataplane --bench pii -- --quick`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::pii::{baseline, Policy, Redactor, Scanner, StreamRedactor};
use regex::bytes::{Regex, RegexSet};

const PROSE: &str = "I'm trying to understand why my Rust service sometimes stalls under load. \
The handler reads a request body, parses it as JSON, calls an upstream model API and streams \
the answer back to the client. Latency is fine at p50 but p99 jumps to several seconds when \
more than a hundred connections are open. Could it be the connection pool, or the allocator? \
Here is the relevant part of the code and the configuration we deploy with version 1.24.3.\n\
```rust\nlet pool = Pool::builder().max_size(32).idle_timeout(Duration::from_secs(90)).build();\n\
for (i, chunk) in body.chunks(8192).enumerate() { hasher.update(chunk); total += chunk.len(); }\n```\n";

fn prompt_8k() -> String {
    let mut s = String::new();
    let items = [
        "Contact me at jane.roe@example.org or +1 415-555-2671 if needed. ",
        "Our staging box is 10.20.30.40 and the key is sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f. ",
        "Billing used card 4111 1111 1111 1111 last month. ",
    ];
    let mut i = 0;
    while s.len() < 8 * 1024 {
        s.push_str(PROSE);
        if i < items.len() {
            s.push_str(items[i]);
        }
        i += 1;
    }
    s.truncate(8 * 1024);
    while !s.is_char_boundary(s.len()) {
        s.pop();
    }
    s
}

fn body_1m() -> String {
    let p = prompt_8k();
    let mut s = String::with_capacity(1 << 20);
    while s.len() < (1 << 20) - p.len() {
        s.push_str(&p);
    }
    s
}

struct RegexBaseline {
    set: RegexSet,
    each: Vec<Regex>,
    max_width: usize,
}

impl RegexBaseline {
    fn new(max_width: usize) -> Self {
        let exprs: Vec<String> = baseline::expressions()
            .into_iter()
            .map(|e| format!("(?-u){e}"))
            .collect();
        Self {
            set: RegexSet::new(&exprs).unwrap(),
            each: exprs.iter().map(|e| Regex::new(e).unwrap()).collect(),
            max_width,
        }
    }

    /// Same output shape as `Redactor::redact`: typed placeholders, same value same number.
    fn redact(&self, text: &str) -> String {
        let t = text.as_bytes();
        let mut spans = Vec::new();
        for id in self.set.matches(t).iter() {
            for m in self.each[id].find_iter(t) {
                if let Some((s, e)) = baseline::confirm(id, t, m.start(), m.end()) {
                    spans.push((s, e, id));
                }
            }
        }
        let findings = baseline::resolve(spans, self.max_width);
        let mut seen: HashMap<(&'static str, &str), usize> = HashMap::new();
        let mut next: HashMap<&'static str, usize> = HashMap::new();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            out.push_str(&text[at..f.start]);
            let tag = f.entity.tag();
            let n = *seen.entry((tag, &text[f.start..f.end])).or_insert_with(|| {
                let c = next.entry(tag).or_insert(0);
                *c += 1;
                *c
            });
            out.push_str(&format!("[{tag}_{n}]"));
            at = f.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

fn bench(c: &mut Criterion) {
    let scanner = Scanner::new().unwrap();
    let base = RegexBaseline::new(scanner.max_width());
    let mut scratch = scanner.scratch().unwrap();
    for (name, text) in [("8KiB_prompt", prompt_8k()), ("1MiB_body", body_1m())] {
        let hs_out = Redactor::new(&scanner, None, Policy::default())
            .redact(&mut scratch, &text)
            .unwrap();
        assert!(hs_out.contains("[EMAIL_1]") && hs_out.contains("[SECRET_1]"));
        assert_eq!(
            hs_out.matches('[').count(),
            base.redact(&text).matches('[').count()
        );
        let mut g = c.benchmark_group(format!("pii/{name}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(BenchmarkId::new("hyperscan", "redact"), |b| {
            b.iter(|| {
                Redactor::new(&scanner, None, Policy::default())
                    .redact(&mut scratch, &text)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("regex", "redact"), |b| {
            b.iter(|| base.redact(&text))
        });
        if text.len() <= 8 * 1024 {
            g.bench_function(BenchmarkId::new("hyperscan", "stream_64B_pieces"), |b| {
                b.iter(|| {
                    let mut s =
                        StreamRedactor::new(Redactor::new(&scanner, None, Policy::default()));
                    let mut out = String::new();
                    for piece in text.as_bytes().chunks(64) {
                        out.push_str(
                            &s.push(&mut scratch, std::str::from_utf8(piece).unwrap())
                                .unwrap(),
                        );
                    }
                    out.push_str(&s.finish(&mut scratch).unwrap());
                    out
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
