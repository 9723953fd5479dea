//! The meter phase: once per request that presented a key, after the response, its figures
//! are added to this worker's counters — requests, errors, tokens by kind (reported, or
//! estimated when the provider never said), latency and time to first byte — by (key,
//! model, UTC day). About once a second the worker hands them to the control thread
//! ([`crate::config::usage::Outbox`]), which reports them to the control plane.
//!
//! No lock and no allocation per request on the usual path: the counters are this
//! worker's own, and a (key, model, day) seen before is found without building a key.

use std::cell::RefCell;

use aigw_wire::UsageEntry;
use rustc_hash::FxHashMap;

use crate::config::usage::Outbox;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Finished;

/// Bytes per token assumed when a provider never reported a request's tokens.
const BYTES_PER_TOKEN: u64 = 4;

type Models = FxHashMap<Box<str>, UsageEntry>;

#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// day → key id → model → figures.
    days: RefCell<FxHashMap<u64, FxHashMap<Box<str>, Models>>>,
}

impl Meter {
    /// `latency`: from the head's first byte to the request's end.
    pub(crate) fn record(&self, ctx: &RequestCtx, done: &Finished, latency: std::time::Duration) {
        let Some(identity) = &ctx.identity else {
            return;
        };
        let day = crate::config::usage::utc_day();
        let model = ctx.model.as_deref().unwrap_or("");
        let mut days = self.days.borrow_mut();
        let keys = days.entry(day).or_default();
        if !keys.contains_key(&*identity.key_id) {
            keys.insert(identity.key_id.clone(), Models::default());
        }
        let Some(models) = keys.get_mut(&*identity.key_id) else {
            return;
        };
        if !models.contains_key(model) {
            models.insert(
                model.into(),
                UsageEntry {
                    key_id: identity.key_id.to_string(),
                    model: model.to_string(),
                    day,
                    ..UsageEntry::default()
                },
            );
        }
        let Some(e) = models.get_mut(model) else {
            return;
        };
        e.requests += 1;
        if done.status >= 400 {
            e.errors += 1;
        }
        let u = &ctx.usage;
        if u.reported {
            e.input_tokens += u.input_tokens;
            e.output_tokens += u.output_tokens;
            e.cached_input_tokens += u.cached_input_tokens;
            e.cache_write_tokens += u.cache_write_tokens;
            e.reasoning_tokens += u.reasoning_tokens;
        } else if ctx.chosen.is_some() && (200..300).contains(&done.status) {
            // A provider answered and never said what it used (a stream cut short, or one
            // that does not report): estimated from the bytes each way, and flagged so.
            let (input, output) = estimate(done);
            e.input_tokens += input;
            e.output_tokens += output;
            e.estimated_requests += 1;
        }
        let started = ctx.timings.head_received;
        e.latency.record(micros(latency));
        if let Some(first) = ctx.timings.first_byte {
            e.ttfb
                .record(micros(first.saturating_duration_since(started)));
        }
    }

    /// Hands everything counted so far to the control thread.
    pub(crate) fn flush(&self, outbox: &Outbox) {
        let days = std::mem::take(&mut *self.days.borrow_mut());
        if days.is_empty() {
            return;
        }
        outbox.add(
            days.into_values()
                .flat_map(|keys| keys.into_values())
                .flat_map(|models| models.into_values()),
        );
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Input and output tokens of an answer whose provider never reported them, estimated from
/// the bytes each way.
pub(crate) fn estimate(done: &Finished) -> (u64, u64) {
    (
        done.bytes_in as u64 / BYTES_PER_TOKEN,
        done.bytes_out as u64 / BYTES_PER_TOKEN,
    )
}
