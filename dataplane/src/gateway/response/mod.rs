//! The response phase: the upstream's head goes through the head filter, its body through
//! the transform stage ([`stage`]), to the client, as it arrives.
//!
//! The relay reads from the upstream only after the previous bytes were written to the
//! client, so a slow client slows the upstream (TCP backpressure) instead of growing a
//! buffer. A response that cannot be completed is visibly cut short — an error event and no
//! end-of-stream marker for streams, a truncated body otherwise — never passed off as
//! complete; when nothing has reached the client yet, it gets a 502 instead. Connections go
//! back to the pool only after a complete, well-framed response.

mod guard;
pub(crate) mod stage;
mod stream_usage;
mod usage;

use std::time::Instant;

use bytes::Buf;

use crate::adapters;
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::gateway::exchange::{UpHead, UpstreamAnswer};
use crate::h1::{list_contains, name_eq, ChunkedDecoder, Limits, ResponseFraming};
use crate::server::respond::Responder;
use crate::server::service::Response;
use crate::upstream::conn::{Read, UpConn};
use crate::upstream::pool::Pool;
use crate::upstream::Upstream;
use stage::{Stage, Transform};

/// Relays `answer` to the client through the transforms this response needs.
pub async fn run(
    pool: &Pool,
    ctx: &mut RequestCtx,
    answer: UpstreamAnswer,
    resp: &mut Responder<'_>,
    guard: Option<&crate::gateway::guard::Guard>,
) {
    let UpstreamAnswer {
        upstream: up,
        mut lease,
        head,
    } = answer;
    let mut stage = match stage_for(ctx, &head, guard) {
        Ok(s) => s,
        Err(e) => {
            // The policy asks for a guardrail this worker cannot run: nothing is relayed.
            ctx.error = Some(e.code);
            return resp.send(Response::error(&e, ctx.family)).await;
        }
    };
    let length = match head.framing {
        ResponseFraming::None => Some(0),
        ResponseFraming::Length(_) if stage.rewrites() => None,
        ResponseFraming::Length(n) => Some(n),
        ResponseFraming::Chunked | ResponseFraming::UntilClose => None,
    };
    begin(resp, &head, &lease.conn.buf, length);
    lease.conn.buf.advance(head.head_len);
    if head.event_stream {
        lease
            .conn
            .bound_reads(crate::upstream::conn::STREAM_READ_MAX);
    }
    let end = pump(&mut lease.conn, &up, head.framing, resp, &mut stage, ctx).await;
    let end = match end {
        BodyEnd::Complete if stage.stream_refused().is_some() => BodyEnd::Refused,
        other => other,
    };
    match end {
        BodyEnd::Complete => {
            stage.end(ctx, true, resp);
            // The last bytes are not sent yet: tokens and cost are charged before the
            // client can send its next request.
            crate::gateway::limit::settle(ctx);
            crate::gateway::spend::settle_reported(ctx);
            if let Some(refusal) = stage.guard().and_then(|g| g.refused) {
                // Held whole and refused: nothing went out, an error goes instead (and the
                // upstream connection, its response read to the end, is reusable).
                let err = match refusal {
                    guard::Refusal::Blocked(entity) => crate::gateway::guard::code(entity).with(
                        "the provider's answer holds what this environment's guardrail blocks; it was not relayed",
                    ),
                    guard::Refusal::Unscannable => Code::GuardrailUnavailable.into(),
                };
                let clean = head.keep_alive
                    && lease.conn.buf.is_empty()
                    && head.framing != ResponseFraming::UntilClose;
                if clean {
                    pool.checkin(&up, lease);
                }
                if resp.retract() {
                    ctx.error = Some(err.code);
                    return resp.send(Response::error(&err, ctx.family)).await;
                }
                ctx.error = Some(err.code);
                return resp.abort();
            }
            if resp.flush(true).await {
                ctx.timings.last_byte = Some(Instant::now());
            }
            let clean = head.keep_alive
                && lease.conn.buf.is_empty()
                && head.framing != ResponseFraming::UntilClose;
            if clean {
                pool.checkin(&up, lease);
            }
        }
        BodyEnd::Refused => {
            // The client has the error event; the upstream, mid-stream, is closed.
            resp.flush(false).await;
            resp.abort();
        }
        BodyEnd::ClientGone => {
            // The client stopped reading: the upstream connection is mid-response; it is
            // dropped, which closes it.
            resp.abort();
        }
        BodyEnd::UpstreamFailed(why) => {
            tracing::warn!(id = %ctx.id, upstream = %up.name, why, "upstream response cut short");
            if resp.bytes_out() == 0 && resp.retract() {
                // Nothing reached the client: it gets an error it can act on.
                let err = Code::BadUpstreamResponse
                    .with(format!("the upstream response was cut short: {why}"));
                ctx.error = Some(err.code);
                return resp.send(Response::error(&err, ctx.family)).await;
            }
            stage.end(ctx, false, resp);
            let err = ApiError::from(Code::UpstreamInterrupted);
            if head.event_stream {
                resp.push_body(&adapters::stream_error_event(ctx.family, &err));
                resp.flush(false).await;
            }
            ctx.error = Some(err.code);
            resp.abort();
        }
    }
}

/// The transforms this response goes through, in order.
fn stage_for(
    ctx: &mut RequestCtx,
    head: &UpHead,
    guard: Option<&crate::gateway::guard::Guard>,
) -> Result<Stage, ApiError> {
    let mut transforms = smallvec::SmallVec::new();
    transforms.push(Transform::Usage(usage::UsageTap::new(
        ctx.family,
        head.json && !head.event_stream,
    )));
    let added = ctx.chosen.as_ref().is_some_and(|c| c.stream_usage_added);
    if added && head.event_stream {
        transforms.push(Transform::StreamUsage(stream_usage::StreamUsageStrip));
    }
    let routes = ctx.identity.as_ref().and_then(|i| i.routes.clone());
    let guardrails = routes.as_ref().map(|r| r.policy.guardrails);
    let patterns = || routes.as_ref().and_then(|r| r.policy.patterns.clone());
    let policy = guardrails.and_then(|g| g.responses);
    let fail_open = guardrails.is_some_and(|g| g.fail_open);
    // The scanner cannot run on this answer: refused, or relayed unscanned (and reported)
    // where the policy fails open.
    let unscanned = |ctx: &mut RequestCtx, err: ApiError| {
        if fail_open {
            tracing::warn!(id = %ctx.id, why = %err.message, "a response was relayed unscanned (the policy fails open)");
            ctx.guardrail_unscanned = Some("response");
            Ok(())
        } else {
            Err(err)
        }
    };
    if let Some(policy) = policy {
        let Some(g) = guard else {
            unscanned(ctx, Code::GuardrailUnavailable.into())?;
            return Ok(Stage::new(transforms, head.event_stream));
        };
        if head.event_stream {
            let Some(kind) = guard::stream_kind(ctx.endpoint) else {
                unscanned(
                    ctx,
                    Code::GuardrailUnavailable
                        .with("this endpoint's streams cannot be scanned; nothing was relayed"),
                )?;
                return Ok(Stage::new(transforms, head.event_stream));
            };
            transforms.push(Transform::StreamGuard(Box::new(guard::StreamGuard::new(
                g.scanner,
                std::rc::Rc::clone(&g.scratch),
                patterns(),
                policy,
                kind,
                ctx.family,
            ))));
        } else {
            transforms.push(Transform::Guard(Box::new(guard::ResponseGuard::new(
                g.scanner,
                std::rc::Rc::clone(&g.scratch),
                patterns(),
                policy,
                head.json,
                fail_open,
            ))));
        }
    }
    Ok(Stage::new(transforms, head.event_stream))
}

/// Response headers never relayed: hop-by-hop fields, framing and date (the gateway sets
/// its own), the provider's rate-limit figures (they describe the gateway's shared account,
/// not the client), and account details and cookies of the provider account.
fn is_dropped_response_header(name: &[u8]) -> bool {
    // Dispatch on length first: this runs for every header of every response.
    let candidates: &[&[u8]] = match name.len() {
        2 => &[b"te"],
        4 => &[b"date"],
        7 => &[b"trailer", b"upgrade", b"alt-svc"],
        10 => &[b"connection", b"keep-alive", b"set-cookie"],
        14 => &[b"content-length", b"openai-project"],
        16 => &[b"proxy-connection"],
        17 => &[b"transfer-encoding"],
        19 => &[b"openai-organization"],
        25 => &[b"strict-transport-security", b"anthropic-organization-id"],
        _ => &[],
    };
    const DROPPED_PREFIXES: &[&[u8]] = &[b"x-ratelimit-", b"anthropic-ratelimit-"];
    candidates.iter().any(|c| name_eq(name, c))
        || DROPPED_PREFIXES
            .iter()
            .any(|p| name.len() >= p.len() && name_eq(&name[..p.len()], p))
}

/// The head filter: the client's head from the upstream's. The provider's request id is
/// kept as `x-upstream-request-id` (the client's `x-request-id` is the gateway's).
fn begin(resp: &mut Responder<'_>, head: &UpHead, buf: &[u8], length: Option<u64>) {
    let connection = head
        .fields
        .iter()
        .find(|(n, _)| name_eq(n.get(buf), b"connection"))
        .map(|(_, v)| v.get(buf))
        .unwrap_or_default();
    resp.begin(head.status, length, |mut h| {
        for (n, v) in &head.fields {
            let (name, value) = (n.get(buf), v.get(buf));
            if name_eq(name, b"x-request-id") || name_eq(name, b"request-id") {
                h = h.header("x-upstream-request-id", value);
            } else if !is_dropped_response_header(name) && !list_contains(connection, name) {
                h = h.header(name, value);
            }
        }
        h
    });
}

enum BodyEnd {
    Complete,
    ClientGone,
    UpstreamFailed(&'static str),
    /// The stream guardrail ended the stream (its error event is out).
    Refused,
}

/// Moves the body from upstream to client, one upstream read at a time, through the stage.
async fn pump(
    conn: &mut UpConn,
    up: &Upstream,
    framing: ResponseFraming,
    resp: &mut Responder<'_>,
    stage: &mut Stage,
    ctx: &mut RequestCtx,
) -> BodyEnd {
    let mut decoder = ChunkedDecoder::new(&Limits {
        max_body_bytes: u64::MAX,
        ..Limits::default()
    });
    let mut decoded = Vec::new();
    let mut remaining = match framing {
        ResponseFraming::Length(n) => n,
        _ => 0,
    };
    if framing == ResponseFraming::None {
        return BodyEnd::Complete;
    }
    loop {
        let data_done = match framing {
            ResponseFraming::Length(_) => {
                let take = (remaining.min(conn.buf.len() as u64)) as usize;
                let chunk = conn.buf.split_to(take);
                remaining -= take as u64;
                let last = remaining == 0;
                stage.feed(ctx, &chunk, last, resp);
                last
            }
            ResponseFraming::Chunked => {
                decoded.clear();
                // Decoding never lengthens: the space of what was read, and no more.
                decoded.reserve_exact(conn.buf.len());
                let progress = match decoder.decode(&conn.buf, &mut decoded) {
                    Ok(p) => p,
                    Err(_) => return BodyEnd::UpstreamFailed("malformed chunked body"),
                };
                conn.buf.advance(progress.consumed);
                stage.feed(ctx, &decoded, progress.done, resp);
                progress.done
            }
            ResponseFraming::UntilClose => {
                let chunk = conn.buf.split();
                stage.feed(ctx, &chunk, false, resp);
                false
            }
            ResponseFraming::None => true,
        };
        if data_done {
            return BodyEnd::Complete;
        }
        if stage.stream_refused().is_some() {
            return BodyEnd::Refused;
        }
        if resp.pending() > 0 && !stage.holds_body() && !resp.flush(false).await {
            return BodyEnd::ClientGone;
        }
        match conn.read(up.read_idle_timeout).await {
            Read::Data => {}
            Read::Eof if framing == ResponseFraming::UntilClose => return BodyEnd::Complete,
            Read::Eof => return BodyEnd::UpstreamFailed("upstream closed mid-body"),
            Read::TimedOut => return BodyEnd::UpstreamFailed("upstream went silent mid-body"),
            Read::Failed(_) => {
                return BodyEnd::UpstreamFailed("upstream connection failed mid-body")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_dropped_response_header;

    #[test]
    fn dropped_response_headers_in_any_case() {
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "transfer-encoding",
            "TE",
            "trailer",
            "Upgrade",
            "content-length",
            "Date",
            "OpenAI-Organization",
            "openai-project",
            "Anthropic-Organization-Id",
            "Set-Cookie",
            "alt-svc",
            "Strict-Transport-Security",
            "x-ratelimit-remaining-requests",
            "Anthropic-RateLimit-Tokens-Limit",
        ] {
            assert!(is_dropped_response_header(name.as_bytes()), "{name}");
        }
        for name in [
            "content-type",
            "x-request-id",
            "openai-processing-ms",
            "x-ratelimit",
            "cache-control",
            "dates",
            "",
        ] {
            assert!(!is_dropped_response_header(name.as_bytes()), "{name}");
        }
    }
}
