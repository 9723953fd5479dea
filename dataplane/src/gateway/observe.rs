//! The metrics phase: once per request, after the response, its status class, endpoint,
//! upstream, latency, time to first byte, retries and tokens are counted in this worker's
//! own figures; about once a second they are published for the admin listener's `/metrics`
//! (see [`crate::metrics`]).
//!
//! Upstreams are counted by their process-unique id and named only when published, so a
//! request allocates nothing here once its (class, endpoint, upstream) has been seen.

use std::cell::RefCell;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::gateway::ctx::RequestCtx;
use crate::metrics::WorkerMetrics;
use crate::server::service::Finished;

#[derive(Debug, Default)]
struct Local {
    /// (status class, endpoint, upstream id; 0 = none) → requests.
    requests: FxHashMap<(u8, &'static str, u64), u64>,
    upstream_errors: FxHashMap<u64, u64>,
    names: FxHashMap<u64, Arc<str>>,
    rest: WorkerMetrics,
}

#[derive(Debug, Default)]
pub(crate) struct Observer {
    local: RefCell<Local>,
}

impl Observer {
    /// `latency`: from the head's first byte to the request's end.
    pub(crate) fn record(&self, ctx: &RequestCtx, done: &Finished, latency: std::time::Duration) {
        let mut l = self.local.borrow_mut();
        let class = u8::try_from(done.status / 100).unwrap_or(5);
        let endpoint = ctx.endpoint.map_or("other", |e| e.name());
        let upstream = match &ctx.chosen {
            Some(c) => {
                // A pushed upstream's name is `tenant/environment/name`: the label is its
                // last part, so series do not multiply with tenants.
                l.names
                    .entry(c.upstream.uid)
                    .or_insert_with(|| Arc::from(c.upstream.name.rsplit('/').next().unwrap_or("")));
                c.upstream.uid
            }
            None => 0,
        };
        *l.requests.entry((class, endpoint, upstream)).or_default() += 1;
        if upstream != 0 && done.status >= 500 {
            *l.upstream_errors.entry(upstream).or_default() += 1;
        }
        let r = &mut l.rest;
        r.retries += u64::from(ctx.attempts.saturating_sub(1));
        let started = ctx.timings.head_received;
        r.latency.observe(latency.as_secs_f64());
        if let Some(first) = ctx.timings.first_byte {
            r.ttfb
                .observe(first.saturating_duration_since(started).as_secs_f64());
        }
        let u = &ctx.usage;
        if u.reported {
            r.input_tokens += u.input_tokens;
            r.output_tokens += u.output_tokens;
            r.cached_input_tokens += u.cached_input_tokens;
            r.cache_write_tokens += u.cache_write_tokens;
            r.reasoning_tokens += u.reasoning_tokens;
        }
    }

    /// Publishes what was counted since the last time into `slot`.
    pub(crate) fn publish(&self, slot: &std::sync::Mutex<WorkerMetrics>) {
        let mut l = self.local.borrow_mut();
        if l.requests.is_empty() {
            return;
        }
        let Local {
            requests,
            upstream_errors,
            names,
            rest,
        } = &mut *l;
        let name =
            |id: &u64| -> Arc<str> { names.get(id).cloned().unwrap_or_else(|| Arc::from("")) };
        for ((class, endpoint, id), n) in requests.drain() {
            *rest
                .requests
                .entry((class, endpoint, name(&id)))
                .or_default() += n;
        }
        for (id, n) in upstream_errors.drain() {
            *rest.upstream_errors.entry(name(&id)).or_default() += n;
        }
        rest.publish_into(slot);
    }
}
