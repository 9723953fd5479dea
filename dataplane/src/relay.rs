//! One exchange with an upstream: send the request, read the response head, decide whether
//! the attempt can be retried elsewhere, and relay the response to the client as it arrives.
//!
//! The relay reads from the upstream only after the previous bytes were written to the
//! client, so a slow client slows the upstream (TCP backpressure) instead of growing a
//! buffer. A response that cannot be completed is visibly cut short — an SSE error event
//! and no end-of-stream marker for streams, a truncated body otherwise — never passed off
//! as complete. Connections go back to the pool only after a complete, well-framed response.

use std::sync::Arc;

use bytes::Buf;

use crate::adapters::{self, Usage};
use crate::config::ProviderKind;
use crate::errors::ApiError;
use crate::h1::sse::SseParser;
use crate::h1::{
    list_contains, name_eq, parse_response_head, ChunkedDecoder, Limits, ResponseError,
    ResponseFraming, Span,
};
use crate::respond::Responder;
use crate::service::Request;
use crate::upstream::conn::{Read, UpConn};
use crate::upstream::pool::{Lease, Pool};
use crate::upstream::Upstream;

/// What became of one attempt.
#[derive(Debug)]
pub enum Attempt {
    /// A response (good or bad) went to the client, or the client went away.
    Done,
    /// A pooled connection turned out closed before any response byte: retry on a fresh one.
    Stale,
    /// The upstream cannot have acted on the request (or said to try later): next upstream.
    FailOver(ApiError),
    /// Answer the client with this error; no retry.
    Fail(ApiError),
}

/// How long after it was sent upstream a request still waiting for its answer has its
/// client's connection watched for a close.
const WATCH_CLIENT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Most bytes of a JSON response kept to read its usage figures from.
const MAX_JSON_OBSERVED: usize = 4 << 20;
/// Largest single SSE event the observer buffers.
const MAX_SSE_EVENT: usize = 1 << 20;

#[allow(clippy::too_many_arguments)]
pub async fn exchange(
    pool: &Pool,
    up: &Arc<Upstream>,
    mut lease: Lease,
    head: Vec<u8>,
    body: &bytes::Bytes,
    req: &Request<'_>,
    resp: &mut Responder<'_>,
    family: ProviderKind,
    can_fail_over: bool,
) -> Attempt {
    lease.conn.uses += 1;
    if let Err(e) = lease
        .conn
        .send_request(head, body, up.read_idle_timeout)
        .await
    {
        if e.kind() == std::io::ErrorKind::TimedOut {
            // Part of the request may have gone: never resent.
            tracing::warn!(id = %req.id, upstream = %up.name, "upstream stopped taking the request");
            return Attempt::Fail(ApiError::upstream(
                504,
                "upstream_timeout",
                format!(
                    "the upstream stopped taking the request for {:?}",
                    up.read_idle_timeout
                ),
            ));
        }
        if lease.reused {
            return Attempt::Stale;
        }
        tracing::warn!(id = %req.id, upstream = %up.name, error = %e, "sending to upstream failed");
        return Attempt::FailOver(ApiError::upstream(
            502,
            "upstream_unavailable",
            "sending the request to the upstream failed",
        ));
    }
    let waited = monoio::select! {
        h = read_head(&mut lease.conn, up) => Some(h),
        _ = resp.client_closed(WATCH_CLIENT_AFTER) => None,
    };
    let Some(head) = waited else {
        // The upstream connection has a response in flight: it is dropped (closed), never
        // pooled, which also tells the provider to stop.
        tracing::info!(id = %req.id, upstream = %up.name, "client closed the connection while waiting for the upstream; abandoning the request");
        resp.client_gone();
        return Attempt::Done;
    };
    let head = match head {
        Ok(h) => h,
        Err(HeadError::TimedOut) => {
            return Attempt::Fail(ApiError::upstream(
                504,
                "upstream_timeout",
                format!(
                    "the upstream did not start answering within {}s",
                    up.first_byte_timeout.as_secs()
                ),
            ))
        }
        Err(HeadError::Closed { any_bytes: false }) if lease.reused => return Attempt::Stale,
        Err(HeadError::Closed { .. }) => {
            return Attempt::Fail(ApiError::upstream(
                502,
                "upstream_closed",
                "the upstream closed the connection without a complete answer",
            ))
        }
        Err(HeadError::Malformed(e)) => {
            tracing::warn!(id = %req.id, upstream = %up.name, error = %e, "malformed upstream response");
            return Attempt::Fail(ApiError::upstream(
                502,
                "bad_upstream_response",
                "the upstream sent a malformed response",
            ));
        }
    };
    if matches!(head.status, 429 | 500 | 502 | 503 | 504) && can_fail_over {
        tracing::info!(id = %req.id, upstream = %up.name, status = head.status, "upstream answered retryable status; failing over");
        return Attempt::FailOver(ApiError::upstream(
            if head.status == 429 { 429 } else { 502 },
            "upstream_error",
            format!("the upstream answered {}", head.status),
        ));
    }
    if head.status == 401 || head.status == 403 {
        // Providers echo part of the credential in these bodies: never relay them.
        tracing::error!(id = %req.id, upstream = %up.name, status = head.status, "upstream refused the gateway's credential");
        return Attempt::Fail(ApiError::upstream(
            502,
            "upstream_auth_failed",
            "the upstream refused the gateway's credentials",
        ));
    }
    relay_response(pool, up, lease, head, resp, family).await;
    Attempt::Done
}

/// A response head, as offsets into the connection's buffer.
#[derive(Debug)]
struct UpHead {
    status: u16,
    framing: ResponseFraming,
    keep_alive: bool,
    head_len: usize,
    fields: Vec<(Span, Span)>,
    event_stream: bool,
    json: bool,
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
        25 => &[b"strict-transport-security"],
        _ => &[],
    };
    const DROPPED_PREFIXES: &[&[u8]] = &[b"x-ratelimit-", b"anthropic-ratelimit-"];
    candidates.iter().any(|c| name_eq(name, c))
        || DROPPED_PREFIXES
            .iter()
            .any(|p| name.len() >= p.len() && name_eq(&name[..p.len()], p))
}

/// Watches the relayed body for usage figures and the end-of-stream marker.
struct Observer {
    family: ProviderKind,
    sse: Option<SseParser>,
    json: Option<Vec<u8>>,
    usage: Usage,
    saw_end: bool,
}

impl Observer {
    /// `last`: this chunk ends the body.
    fn feed(&mut self, data: &[u8], last: bool) {
        if let Some(p) = &mut self.sse {
            let (family, usage, saw_end) = (self.family, &mut self.usage, &mut self.saw_end);
            let r = p.feed(data, |e| {
                adapters::usage_from_event(family, e.event, e.data, usage);
                *saw_end |= adapters::is_stream_end(family, e.event, e.data);
            });
            if r.is_err() {
                // An event too large to watch: relay continues, usage is just not observed.
                self.sse = None;
            }
        } else if let Some(j) = &mut self.json {
            if j.is_empty() && last {
                // The whole body arrived at once (the usual case): read it where it is.
                self.usage = adapters::usage_from_json(self.family, data);
                self.json = None;
            } else if j.len() + data.len() <= MAX_JSON_OBSERVED {
                j.extend_from_slice(data);
            } else {
                self.json = None;
            }
        }
    }

    fn finish(&mut self) {
        if let Some(j) = self.json.take().filter(|j| !j.is_empty()) {
            self.usage = adapters::usage_from_json(self.family, &j);
        }
    }
}

enum BodyEnd {
    Complete,
    ClientGone,
    UpstreamFailed(&'static str),
}

async fn relay_response(
    pool: &Pool,
    up: &Arc<Upstream>,
    mut lease: Lease,
    head: UpHead,
    resp: &mut Responder<'_>,
    family: ProviderKind,
) {
    let length = match head.framing {
        ResponseFraming::None => Some(0),
        ResponseFraming::Length(n) => Some(n),
        ResponseFraming::Chunked | ResponseFraming::UntilClose => None,
    };
    {
        let buf = &lease.conn.buf[..];
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
    lease.conn.buf.advance(head.head_len);
    let mut obs = Observer {
        family,
        sse: head.event_stream.then(|| SseParser::new(MAX_SSE_EVENT)),
        json: (head.json && !head.event_stream).then(Vec::new),
        usage: Usage::default(),
        saw_end: false,
    };
    let end = pump(&mut lease.conn, up, head.framing, resp, &mut obs).await;
    obs.finish();
    if obs.usage.reported {
        resp.log.input_tokens = Some(obs.usage.input_tokens);
        resp.log.output_tokens = Some(obs.usage.output_tokens);
    }
    match end {
        BodyEnd::Complete => {
            let clean = head.keep_alive
                && lease.conn.buf.is_empty()
                && head.framing != ResponseFraming::UntilClose;
            if clean {
                pool.checkin(up, lease);
            }
        }
        BodyEnd::ClientGone => {
            // The client stopped reading: the upstream connection is mid-response, close it.
            resp.abort();
        }
        BodyEnd::UpstreamFailed(why) => {
            tracing::warn!(id = %resp.id(), upstream = %up.name, why, "upstream response cut short");
            if head.event_stream {
                let event = adapters::stream_error_event(
                    family,
                    "upstream_interrupted",
                    "the upstream stopped before the response was complete",
                );
                resp.write_body(&event, false).await;
            }
            resp.log.error_code = Some("upstream_interrupted");
            resp.abort();
        }
    }
}

/// Moves the body from upstream to client, one upstream read at a time.
async fn pump(
    conn: &mut UpConn,
    up: &Upstream,
    framing: ResponseFraming,
    resp: &mut Responder<'_>,
    obs: &mut Observer,
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
        return if resp.write_body(&[], true).await {
            BodyEnd::Complete
        } else {
            BodyEnd::ClientGone
        };
    }
    loop {
        let (data_done, wrote) = match framing {
            ResponseFraming::Length(_) => {
                let take = (remaining.min(conn.buf.len() as u64)) as usize;
                let chunk = conn.buf.split_to(take);
                remaining -= take as u64;
                let last = remaining == 0;
                obs.feed(&chunk, last);
                (last, resp.write_body(&chunk, last).await)
            }
            ResponseFraming::Chunked => {
                decoded.clear();
                let progress = match decoder.decode(&conn.buf, &mut decoded) {
                    Ok(p) => p,
                    Err(_) => return BodyEnd::UpstreamFailed("malformed chunked body"),
                };
                conn.buf.advance(progress.consumed);
                obs.feed(&decoded, progress.done);
                (
                    progress.done,
                    resp.write_body(&decoded, progress.done).await,
                )
            }
            ResponseFraming::UntilClose => {
                let chunk = conn.buf.split();
                obs.feed(&chunk, false);
                (false, resp.write_body(&chunk, false).await)
            }
            ResponseFraming::None => (true, true),
        };
        if !wrote {
            return BodyEnd::ClientGone;
        }
        if data_done {
            return BodyEnd::Complete;
        }
        match conn.read(up.read_idle_timeout).await {
            Read::Data => {}
            Read::Eof if framing == ResponseFraming::UntilClose => {
                return if resp.write_body(&[], true).await {
                    BodyEnd::Complete
                } else {
                    BodyEnd::ClientGone
                };
            }
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
