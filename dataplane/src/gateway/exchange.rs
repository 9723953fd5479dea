//! The upstream exchange: for each target in failover order, prepare the request for it,
//! send it, and read the response head; hand the first usable answer to the response phase.
//!
//! Retrying or failing over happens only when the upstream cannot have acted on the request
//! ([`Attempt`]): nothing was sent, a pooled connection turned out stale, or it answered
//! 429, 500, 502, 503, 504 or 529 (Anthropic's "overloaded") before any byte reached the
//! client. A first-byte timeout is never retried: the provider may still be generating, and
//! billing, the first attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};

use crate::body::{JsonBody, Pieces};
use crate::config::routing::Target;
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::{Chosen, RequestCtx};
use crate::gateway::request;
use crate::h1::{parse_response_head, Limits, ResponseError, ResponseFraming, Span};
use crate::server::respond::Responder;
use crate::server::service::Head;
use crate::upstream::conn::{Read, UpConn};
use crate::upstream::pool::{CheckoutError, Lease, Pool};
use crate::upstream::Upstream;

/// What became of one attempt. The rule it encodes: an attempt may be repeated (on the same
/// upstream or the next) only when the upstream cannot have acted on it.
// The answer is moved once per request; boxing it would allocate once per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Attempt {
    /// A response head arrived that goes to the client.
    Answer(UpstreamAnswer),
    /// The client went away while the request waited.
    ClientGone,
    /// A pooled connection turned out closed before any response byte: retry on a fresh one.
    Stale,
    /// The upstream cannot have acted on the request (or said to try later): next upstream.
    FailOver(ApiError),
    /// Answer the client with this error; no retry.
    Fail(ApiError),
}

/// A response head from the upstream that answers, with the connection it arrived on.
#[derive(Debug)]
pub struct UpstreamAnswer {
    pub upstream: Arc<Upstream>,
    pub lease: Lease,
    pub head: UpHead,
}

/// What the exchange ended with.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Exchanged {
    Answer(UpstreamAnswer),
    ClientGone,
    Error(ApiError),
}

/// How long after it was sent upstream a request still waiting for its answer has its
/// client's connection watched for a close.
const WATCH_CLIENT_AFTER: Duration = Duration::from_secs(1);

/// Statuses that say the upstream did not act on the request and another one may.
fn may_fail_over(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504 | 529)
}

/// Tries `targets` in order until one answers.
pub async fn run(
    pool: &Pool,
    ctx: &mut RequestCtx,
    head: &Head<'_>,
    parsed: &JsonBody<'_>,
    original: &Bytes,
    targets: &[&Target],
    resp: &mut Responder<'_>,
) -> Exchanged {
    let mut last_err = ApiError::from(Code::UpstreamUnavailable);
    for (i, target) in targets.iter().enumerate() {
        let is_last = i + 1 == targets.len();
        let up = &target.upstream;
        let outgoing = request::prepare(ctx, parsed, original, target);
        ctx.chosen = Some(Chosen {
            upstream: Arc::clone(up),
            stream_usage_added: outgoing.stream_usage_added,
        });
        // One fresh retry on the same upstream when a pooled connection was stale.
        let mut fresh_only = false;
        loop {
            ctx.attempts += 1;
            let lease = match pool.checkout(up).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(id = %ctx.id, upstream = %up.name, error = %e, "upstream unavailable");
                    last_err = match e {
                        CheckoutError::Exhausted(_) => Code::UpstreamBusy.into(),
                        CheckoutError::Connect(_) => {
                            Code::UpstreamUnavailable.with("the upstream could not be reached")
                        }
                    };
                    break; // nothing was sent: fail over
                }
            };
            if fresh_only && lease.reused {
                // Another stale one: drop it and connect anew.
                drop(lease);
                continue;
            }
            ctx.timings.upstream_connected = Some(Instant::now());
            let reserve = lease.conn.copied_len(&outgoing.body);
            let wire_head = request::build_head(
                head,
                target,
                &outgoing,
                ctx.family,
                reserve,
                crate::runtime::buffers::take(),
            );
            match attempt(up, lease, wire_head, &outgoing.body, ctx, resp, !is_last).await {
                Attempt::Answer(a) => return Exchanged::Answer(a),
                Attempt::ClientGone => return Exchanged::ClientGone,
                Attempt::Stale if !fresh_only => fresh_only = true,
                Attempt::Stale => {
                    last_err = Code::UpstreamUnavailable.with("the upstream closed the connection");
                    break;
                }
                Attempt::FailOver(err) => {
                    last_err = err;
                    break;
                }
                Attempt::Fail(err) => return Exchanged::Error(err),
            }
        }
    }
    Exchanged::Error(last_err)
}

/// One attempt on one connection.
async fn attempt(
    up: &Arc<Upstream>,
    mut lease: Lease,
    wire_head: Vec<u8>,
    body: &Pieces,
    ctx: &mut RequestCtx,
    resp: &mut Responder<'_>,
    can_fail_over: bool,
) -> Attempt {
    lease.conn.uses += 1;
    if let Err(e) = lease
        .conn
        .send_request(wire_head, body, up.read_idle_timeout)
        .await
    {
        if e.kind() == std::io::ErrorKind::TimedOut {
            // Part of the request may have gone: never resent.
            tracing::warn!(id = %ctx.id, upstream = %up.name, "upstream stopped taking the request");
            return Attempt::Fail(Code::UpstreamTimeout.with(format!(
                "the upstream stopped taking the request for {:?}",
                up.read_idle_timeout
            )));
        }
        if lease.reused {
            return Attempt::Stale;
        }
        tracing::warn!(id = %ctx.id, upstream = %up.name, error = %e, "sending to upstream failed");
        return Attempt::FailOver(
            Code::UpstreamUnavailable.with("sending the request to the upstream failed"),
        );
    }
    let waited = monoio::select! {
        h = read_head(&mut lease.conn, up) => Some(h),
        _ = resp.client_closed(WATCH_CLIENT_AFTER) => None,
    };
    let Some(head) = waited else {
        // The upstream connection has a response in flight: it is dropped (closed), never
        // pooled, which also tells the provider to stop.
        tracing::info!(id = %ctx.id, upstream = %up.name, "client closed the connection while waiting for the upstream; abandoning the request");
        resp.client_gone();
        return Attempt::ClientGone;
    };
    let head = match head {
        Ok(h) => h,
        Err(HeadError::TimedOut) => {
            return Attempt::Fail(Code::UpstreamTimeout.with(format!(
                "the upstream did not start answering within {}s",
                up.first_byte_timeout.as_secs()
            )))
        }
        Err(HeadError::Closed { any_bytes: false }) if lease.reused => return Attempt::Stale,
        Err(HeadError::Closed { .. }) => return Attempt::Fail(Code::UpstreamClosed.into()),
        Err(HeadError::Malformed(e)) => {
            tracing::warn!(id = %ctx.id, upstream = %up.name, error = %e, "malformed upstream response");
            return Attempt::Fail(Code::BadUpstreamResponse.into());
        }
    };
    ctx.timings.first_byte = Some(Instant::now());
    if may_fail_over(head.status) && can_fail_over {
        tracing::info!(id = %ctx.id, upstream = %up.name, status = head.status, "upstream answered retryable status; failing over");
        let code = if head.status == 429 {
            Code::UpstreamRateLimited
        } else {
            Code::UpstreamError
        };
        return Attempt::FailOver(code.with(format!("the upstream answered {}", head.status)));
    }
    if head.status == 401 || head.status == 403 {
        // Providers echo part of the credential in these bodies: never relay them.
        tracing::error!(id = %ctx.id, upstream = %up.name, status = head.status, "upstream refused the gateway's credential");
        return Attempt::Fail(Code::UpstreamAuthFailed.into());
    }
    Attempt::Answer(UpstreamAnswer {
        upstream: Arc::clone(up),
        lease,
        head,
    })
}

/// A response head, as offsets into the front of its connection's read buffer (the
/// response phase consumes it from there).
#[derive(Debug)]
pub struct UpHead {
    pub status: u16,
    pub framing: ResponseFraming,
    pub keep_alive: bool,
    pub head_len: usize,
    pub fields: Vec<(Span, Span)>,
    pub event_stream: bool,
    pub json: bool,
}

#[derive(Debug)]
enum HeadError {
    TimedOut,
    Closed { any_bytes: bool },
    Malformed(ResponseError),
}

async fn read_head(conn: &mut UpConn, up: &Upstream) -> Result<UpHead, HeadError> {
    let limits = Limits::default();
    let mut timeout = up.first_byte_timeout;
    loop {
        if !conn.buf.is_empty() {
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            let parsed = parse_response_head(&conn.buf, &mut storage, &limits, false);
            match parsed {
                Ok(Some(h)) if h.is_interim() => {
                    let n = h.head_len;
                    conn.buf.advance(n);
                    continue;
                }
                Ok(Some(h)) => {
                    let base = conn.buf.as_ptr() as usize;
                    let span = |s: &[u8]| {
                        let start = (s.as_ptr() as usize - base) as u32;
                        Span {
                            start,
                            end: start + s.len() as u32,
                        }
                    };
                    let ctype = h.header("content-type").unwrap_or_default();
                    let starts = |p: &[u8]| {
                        ctype.len() >= p.len() && ctype[..p.len()].eq_ignore_ascii_case(p)
                    };
                    return Ok(UpHead {
                        status: h.status,
                        framing: h.framing,
                        keep_alive: h.keep_alive,
                        head_len: h.head_len,
                        fields: h
                            .headers
                            .iter()
                            .map(|f| (span(f.name.as_bytes()), span(f.value)))
                            .collect(),
                        event_stream: starts(b"text/event-stream"),
                        json: starts(b"application/json"),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(HeadError::Malformed(e)),
            }
        }
        match conn.read(timeout).await {
            Read::Data => timeout = up.read_idle_timeout,
            Read::TimedOut => return Err(HeadError::TimedOut),
            Read::Eof | Read::Failed(_) => {
                return Err(HeadError::Closed {
                    any_bytes: !conn.buf.is_empty(),
                })
            }
        }
    }
}
