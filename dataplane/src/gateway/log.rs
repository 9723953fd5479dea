//! The log phase: once per request, from its context, whatever became of it. The access
//! log never holds a header value, a query string, a body or key material: the path is
//! logged without its query (some clients put keys there) and the key by its public id.

use crate::errors::ErrorSource;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::{Finished, Head};

/// `latency`: from the head's first byte to the request's end.
pub fn run(ctx: &RequestCtx, head: &Head<'_>, done: &Finished, latency: std::time::Duration) {
    let micros = |t: Option<std::time::Instant>| {
        t.map(|t| {
            t.saturating_duration_since(ctx.timings.head_received)
                .as_micros() as u64
        })
    };
    let identity = ctx.identity.as_ref();
    let error = done.error.or(ctx.error);
    let error_source = error.map(|c| match c.source() {
        ErrorSource::Downstream => "downstream",
        ErrorSource::Upstream => "upstream",
        ErrorSource::Internal => "internal",
    });
    tracing::info!(
        target: "access",
        id = %ctx.id,
        peer = %head.peer.ip(),
        method = head.method(),
        path = head.path_only(),
        status = done.status,
        bytes_in = done.bytes_in,
        bytes_out = done.bytes_out,
        latency_us = latency.as_micros() as u64,
        ttfb_us = micros(ctx.timings.first_byte),
        tenant = identity.map(|i| &*i.tenant_id),
        environment = identity.map(|i| i.environment.name()),
        key_id = identity.map(|i| &*i.key_id),
        model = ctx.model.as_deref(),
        upstream = ctx.chosen.as_ref().map(|c| c.upstream.name.as_str()),
        attempts = ctx.attempts,
        input_tokens = ctx.usage.reported.then_some(ctx.usage.input_tokens),
        output_tokens = ctx.usage.reported.then_some(ctx.usage.output_tokens),
        error = error.map(|c| c.as_str()),
        error_source,
    );
}
