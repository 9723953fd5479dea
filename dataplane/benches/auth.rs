//! Authenticating a request against a 100,000-key table: the first sighting of a key
//! (format, lookup, SHA-256, constant-time compare) and the cached path after it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use aigw_wire::keys::{self, Environment};
use aigw_wire::{KeyRecord, KeyStatus};
use criterion::{criterion_group, criterion_main, Criterion};
use dataplane::config::pushed::{NodeConfig, SharedConfig};
use dataplane::gateway::authenticate::LocalConfig;

fn table(n: usize) -> (Arc<SharedConfig>, Vec<String>) {
    let mut plaintexts = Vec::new();
    let records: Vec<KeyRecord> = (0..n)
        .map(|i| {
            let id = format!("{i:012}");
            let key = keys::assemble(
                Environment::Production,
                &id,
                "abcdefghijABCDEFGHIJ0123456789",
            );
            if i % 1000 == 0 {
                plaintexts.push(key.clone());
            }
            KeyRecord {
                sub_account_parents: Vec::new(),
                key_id: id,
                tenant_id: format!("tenant-{}", i % 500),
                environment: "production".into(),
                sub_account_id: None,
                hash_version: 1,
                hash: keys::hash(&key),
                status: KeyStatus::Active,
                expires_at: 0,
                grace_ends_at: 0,
                allowed_models: vec![],
                rate_limits: Default::default(),
            }
        })
        .collect();
    let shared = Arc::new(SharedConfig::default());
    shared.publish(NodeConfig::from_records(1, &records));
    (shared, plaintexts)
}

fn auth(c: &mut Criterion) {
    let (shared, plaintexts) = table(100_000);
    let local = LocalConfig::new(
        Arc::clone(&shared),
        Environment::ALL.to_vec(),
        std::time::Duration::ZERO,
    );
    let key = plaintexts[7].clone();
    let mut g = c.benchmark_group("auth");
    g.bench_function("cached_key_100k_table", |b| {
        b.iter(|| black_box(local.authenticate(Some(black_box(&key)), 1).unwrap()))
    });
    g.bench_function("first_sighting_100k_table", |b| {
        // A fresh worker view each time: format, lookup, SHA-256, compare.
        let mut i = 0;
        b.iter(|| {
            let l = LocalConfig::new(
                Arc::clone(&shared),
                Environment::ALL.to_vec(),
                std::time::Duration::ZERO,
            );
            i = (i + 1) % plaintexts.len();
            black_box(l.authenticate(Some(&plaintexts[i]), 1).unwrap())
        })
    });
    g.bench_function("format_and_checksum_only", |b| {
        b.iter(|| black_box(keys::parse(black_box(&key)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, auth);
criterion_main!(benches);
