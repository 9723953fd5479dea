//! PII scan + redact throughput of the text scanner alone (no JSON parsing): Hyperscan (the
//! product) against a `regex`-crate baseline running the same rule expressions, extensions,
//! validators and overlap rule (`RegexSet` to find which rules match, then each rule's
//! `Regex` to locate).
//!
//! Inputs: clean text (prose and code, no entity) and PII-dense text (an entity about every
//! 80 bytes, 12.7 per KiB: e-mail, phone, card, IPv4, IBAN, SSN, API key in turn, between short prose
//! fragments) at 1 KiB, 16 KiB and 256 KiB; and the labelled corpus `pii-corpus/generate.py`
//! builds (seed 1, 3,000 prompts in English, German and French), redacted one prompt at a
//! time as requests are.
//!
//! `cargo bench -p dataplane --bench pii`

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

/// Clean text of `len` bytes: prose and code, no entity.
fn clean(len: usize) -> String {
    let mut s = String::with_capacity(len + PROSE.len());
    while s.len() < len {
        s.push_str(PROSE);
    }
    cut(s, len)
}

/// Entities planted in the dense text, one after each prose fragment.
const ITEMS: [&str; 7] = [
    "jane.roe@example.org",
    "+1 415-555-2671",
    "4111 1111 1111 1111",
    "10.20.30.40",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f",
];

/// PII-dense text of `len` bytes: an entity about every 80 bytes. Returns the text and
/// how many entities it holds.
fn dense(len: usize) -> (String, usize) {
    let fragments = [
        "Please update the record for the customer, whose details follow: ",
        "The invoice was sent again today, and the contact on file is ",
        "For the server migration we still need access to ",
        "Refund requested; the details given on the phone were ",
    ];
    let mut s = String::with_capacity(len + 128);
    let mut n = 0;
    while s.len() < len {
        s.push_str(fragments[n % fragments.len()]);
        s.push_str(ITEMS[n % ITEMS.len()]);
        s.push_str(". ");
        n += 1;
    }
    let s = cut(s, len);
    (s, n)
}

fn cut(mut s: String, len: usize) -> String {
    s.truncate(len);
    while !s.is_char_boundary(s.len()) {
        s.pop();
    }
    s
}

/// The generated corpus's prompts (seed 1), `None` when Python cannot run here.
fn corpus() -> Option<Vec<String>> {
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("corpus.jsonl");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pii-corpus/generate.py");
    let ok = std::process::Command::new("python3")
        .arg(script)
        .args(["--seed", "1", "--count", "3000", "--out"])
        .arg(&out)
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let text = std::fs::read_to_string(out).ok()?;
    Some(
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["text"].as_str().unwrap().to_string()
            })
            .collect(),
    )
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
    let mut inputs: Vec<(String, String)> = Vec::new();
    for (size, len) in [
        ("1KiB", 1 << 10),
        ("16KiB", 16 << 10),
        ("256KiB", 256 << 10),
    ] {
        inputs.push((format!("clean_{size}"), clean(len)));
        let (text, n) = dense(len);
        eprintln!(
            "dense_{size}: {n} entities in {} bytes ({:.1} per KiB)",
            text.len(),
            n as f64 * 1024.0 / text.len() as f64
        );
        inputs.push((format!("dense_{size}"), text));
    }
    for (name, text) in &inputs {
        let hs_out = Redactor::new(&scanner, None, Policy::default())
            .redact(&mut scratch, text)
            .unwrap();
        // Both find the same entities (clean text: none).
        assert_eq!(
            hs_out.matches('[').count(),
            base.redact(text).matches('[').count(),
            "{name}"
        );
        if name.starts_with("clean") {
            assert_eq!(&hs_out, text, "{name} holds no entity");
        } else {
            assert!(hs_out.contains("[EMAIL_1]") && hs_out.contains("[SECRET_1]"));
        }
        let mut g = c.benchmark_group(format!("pii/{name}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(BenchmarkId::new("hyperscan", "redact"), |b| {
            b.iter(|| {
                Redactor::new(&scanner, None, Policy::default())
                    .redact(&mut scratch, text)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("regex", "redact"), |b| {
            b.iter(|| base.redact(text))
        });
        if text.len() <= 16 * 1024 {
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
    match corpus() {
        Some(prompts) => {
            let bytes: usize = prompts.iter().map(String::len).sum();
            let mut g = c.benchmark_group("pii/corpus");
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_function(BenchmarkId::new("hyperscan", "redact"), |b| {
                b.iter(|| {
                    for p in &prompts {
                        Redactor::new(&scanner, None, Policy::default())
                            .redact(&mut scratch, p)
                            .unwrap();
                    }
                })
            });
            g.bench_function(BenchmarkId::new("regex", "redact"), |b| {
                b.iter(|| {
                    for p in &prompts {
                        base.redact(p);
                    }
                })
            });
            g.finish();
        }
        None => eprintln!("pii/corpus skipped: python3 could not build the corpus"),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
