//! One client connection: read a head, read its body, answer, repeat.
//!
//! Requests on a connection are answered strictly in order, one at a time, so pipelined
//! requests (already sitting in the read buffer) are served in order with no extra
//! bookkeeping. The head and body of a request stay in one read buffer; the head is parsed
//! in place. Any error that leaves the framing in doubt is answered and the connection
//! closed (RFC 9112 §9.6 / §6.3). After an I/O timeout the connection is always closed:
//! cancelling an owned-buffer operation is best effort, so the stream is not reused.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::server::stream::ClientStream;
use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use bytes::Buf;

use crate::config::settings::Settings;
use crate::errors::{family_for_path, family_for_raw_head, ApiError, Code, Family};
use crate::h1::limits::MAX_HEADERS_CEILING;
use crate::h1::{parse_request_head, BodyFraming, ChunkedDecoder, H1Error, HeadIndex, Limits};
use crate::server::request_id::RequestId;
use crate::server::respond::{write_out, Responder};
use crate::server::service::{Finished, Head, Request, Response, Service, Verdict};
use crate::server::worker::{BodyBudget, BodyReadSlot, WorkerCtx};

/// Initial read buffer; grows up to the head limit plus the body limit.
const INITIAL_BUF: usize = 2 * 1024;
/// Minimum free space offered to each read.
const MIN_READ: usize = 2 * 1024;
/// A connection whose buffer grew past this (a large body) gets a fresh small one once the
/// request is done, so idle keep-alive connections do not pin megabytes.
const SHRINK_ABOVE: usize = 256 * 1024;
/// A request whose read buffer is larger than this gives the bytes after it (a pipelined
/// request, usually none) a fresh buffer instead of sharing its allocation.
const SHARE_UP_TO: usize = 64 * 1024;

/// Per-connection buffers, reused for every request on the connection.
struct ConnBufs {
    /// Bytes read from the client: the current head, body and anything pipelined after.
    read: BytesMut,
    /// The response being written: a buffer lent by the worker
    /// ([`crate::runtime::buffers`]) while bytes wait in it, none between writes.
    out: Vec<u8>,
    /// The current head's offsets.
    index: HeadIndex,
    /// Decoded chunked body.
    chunked_body: Vec<u8>,
}

enum HeadOutcome {
    Ready,
    /// The client closed or went idle between requests: close quietly.
    Closed,
    /// Part of a head arrived, then nothing until the deadline.
    TimedOut,
    Invalid(H1Error),
    Io,
}

enum BodyOutcome {
    /// The worker's memory budget for bodies cannot take this one.
    OverBudget,
    /// The worker already waits for as many bodies as it may (or this client has its share).
    TooManyReads,
    /// The body is `read[start..end]` (Content-Length) or `chunked_body` (chunked); the
    /// request occupied `read[..consumed]`.
    Ready {
        start: usize,
        end: usize,
        chunked: bool,
        consumed: usize,
    },
    Invalid(H1Error),
    TimedOut,
    Io,
}

/// Serves one connection until it closes.
///
/// `plain_refused`: the connection came to the plain-HTTP listener of a node that serves
/// over TLS on that port; its first request is answered with 403 `https_required` (naming
/// the https URL) and it is closed.
pub(crate) async fn serve<S: Service>(
    mut stream: ClientStream,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    service: Rc<S>,
    plain_refused: Option<u16>,
) {
    let mut bufs = ConnBufs {
        read: BytesMut::with_capacity(INITIAL_BUF),
        out: Vec::new(),
        index: HeadIndex::default(),
        chunked_body: Vec::new(),
    };
    loop {
        let settings = ctx.settings.current();
        let (head, started) = read_head(&mut stream, &mut bufs, &settings, &ctx).await;
        let id = ctx.next_request_id();
        let rejected = match head {
            HeadOutcome::Ready => None,
            HeadOutcome::Closed | HeadOutcome::Io => return,
            HeadOutcome::TimedOut => {
                Some(Code::RequestTimeout.with("request head not received in time"))
            }
            HeadOutcome::Invalid(e) => Some(e.into()),
        };
        let rejected = match (rejected, plain_refused) {
            (None, Some(tls_port)) => Some(Code::HttpsRequired.with(format!(
                "this gateway takes API requests over https only: send this request to {} (the request was not processed; rotate any API key it carried if the network is not trusted)",
                https_url(&bufs.index, &bufs.read, tls_port),
            ))),
            (other, _) => other,
        };
        if let Some(err) = rejected {
            let family = family_for_raw_head(&bufs.read);
            reject(
                &mut stream,
                &mut bufs,
                &ctx,
                &settings,
                id,
                peer,
                started,
                err,
                family,
            )
            .await;
            return;
        }
        let verdict = service.head(&Head::new(id, peer, started, &bufs.index, &bufs.read));
        let keep_going = match verdict {
            Verdict::Answer(sctx, response) => {
                answer_unread(
                    &mut stream,
                    &mut bufs,
                    &ctx,
                    &settings,
                    &*service,
                    sctx,
                    response,
                    (id, peer, started),
                )
                .await
            }
            Verdict::Proceed(sctx, budget) => {
                proceed(
                    &mut stream,
                    &mut bufs,
                    &ctx,
                    &settings,
                    &*service,
                    sctx,
                    budget,
                    (id, peer, started),
                )
                .await
            }
        };
        if !keep_going {
            return;
        }
        if bufs.read.capacity() > SHRINK_ABOVE && bufs.read.len() < INITIAL_BUF {
            let mut fresh = BytesMut::with_capacity(INITIAL_BUF);
            fresh.extend_from_slice(&bufs.read);
            bufs.read = fresh;
        }
    }
}

/// Who sent a request and when: its id, peer and the arrival of its head.
type Origin = (RequestId, SocketAddr, Instant);

/// Answers a request the service refused from its head, without reading its body. A body
/// already received in full (a small one usually arrives with its head) is skipped and the
/// connection kept; otherwise it is closed, since the unread body would be taken for the
/// next request. Returns whether the connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn answer_unread<S: Service>(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    ctx: &WorkerCtx,
    settings: &Settings,
    service: &S,
    sctx: S::Ctx,
    mut response: Response,
    (id, peer, started): Origin,
) -> bool {
    let head_len = bufs.index.head_len;
    let whole = match bufs.index.framing {
        BodyFraming::None => Some(head_len),
        BodyFraming::Length(n) => head_len
            .checked_add(usize::try_from(n).unwrap_or(usize::MAX))
            .filter(|end| *end <= bufs.read.len()),
        BodyFraming::Chunked => None,
    };
    if whole.is_none() {
        response.close = true;
    }
    let is_head = bufs.index.method.get(&bufs.read) == b"HEAD";
    let (status, bytes_out, reusable) = {
        let mut resp = responder(stream, bufs, ctx, settings, id, is_head);
        resp.send(response).await;
        (resp.status(), resp.bytes_out(), resp.reusable())
    };
    let consumed = whole.unwrap_or(bufs.read.len());
    service.finish(
        sctx,
        &Head::new(id, peer, started, &bufs.index, &bufs.read),
        &Finished {
            status,
            bytes_in: consumed,
            bytes_out,
            error: None,
        },
    );
    ctx.finish_request(settings.generation);
    if whole.is_none() {
        linger(stream).await;
        return false;
    }
    bufs.read.advance(consumed);
    reusable
}

/// Reads the body of an admitted request, then lets the service answer it. Returns whether
/// the connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn proceed<S: Service>(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    ctx: &WorkerCtx,
    settings: &Settings,
    service: &S,
    mut sctx: S::Ctx,
    mut budget: BodyBudget,
    (id, peer, started): Origin,
) -> bool {
    let slot = || {
        ctx.body_read_slot(
            peer.ip(),
            settings.max_body_reads,
            settings.max_body_reads_per_client,
        )
    };
    let body = read_body(stream, bufs, settings, &mut budget, slot).await;
    let (body_range, consumed) = match body {
        BodyOutcome::Ready {
            start,
            end,
            chunked,
            consumed,
        } => ((!chunked).then_some(start..end), consumed),
        failed => {
            let err = match failed {
                BodyOutcome::Invalid(e) => e.into(),
                BodyOutcome::OverBudget => ApiError::from(Code::ServerBusy),
                BodyOutcome::TooManyReads => Code::ServerBusy
                    .with("the gateway is receiving as many request bodies as it may at once; retry shortly"),
                BodyOutcome::TimedOut => {
                    Code::RequestTimeout.with("request body not received in time")
                }
                BodyOutcome::Io | BodyOutcome::Ready { .. } => {
                    // The client is gone: nothing can be answered.
                    let finished = Finished {
                        status: 499,
                        bytes_in: bufs.read.len(),
                        bytes_out: 0,
                        error: None,
                    };
                    service.finish(
                        sctx,
                        &Head::new(id, peer, started, &bufs.index, &bufs.read),
                        &finished,
                    );
                    ctx.finish_request(settings.generation);
                    return false;
                }
            };
            let family = family_for_path(path_of(&bufs.index, &bufs.read));
            let (status, bytes_out) =
                send_closing(stream, bufs, ctx, settings, id, &err, family).await;
            let finished = Finished {
                status,
                bytes_in: bufs.read.len(),
                bytes_out,
                error: Some(err.code),
            };
            service.finish(
                sctx,
                &Head::new(id, peer, started, &bufs.index, &bufs.read),
                &finished,
            );
            ctx.finish_request(settings.generation);
            linger(stream).await;
            return false;
        }
    };

    // The request's bytes leave the read buffer as shared `Bytes`: the body is a slice of
    // them (a large one goes upstream without a copy); pipelined bytes stay behind for the
    // next round, in a buffer of their own when the request's was large: what stays behind
    // shares the request's allocation, and would pin the request's memory for the life of
    // its response (a stream may last minutes) instead of letting it go as soon as the
    // request is done with it.
    let allocation = bufs.read.capacity();
    let raw = bufs.read.split_to(consumed).freeze();
    if allocation > SHARE_UP_TO {
        let mut fresh = BytesMut::with_capacity(INITIAL_BUF.max(bufs.read.len()));
        fresh.extend_from_slice(&bufs.read);
        bufs.read = fresh;
    }
    let body = match body_range {
        Some(r) => raw.slice(r),
        None => Bytes::from(std::mem::take(&mut bufs.chunked_body)),
    };
    let is_head = bufs.index.method.get(&raw) == b"HEAD";
    let index = &bufs.index;
    let mut req = Request::new(id, peer, started, index, raw, body, budget);
    let (status, bytes_out, reusable) = {
        let mut resp = Responder::new(
            stream,
            &mut bufs.out,
            ctx,
            id,
            index.keep_alive,
            is_head,
            settings.write_timeout,
        );
        if index.version == crate::h1::Version::Http10 {
            resp.set_http10();
        }
        service.call(&mut sctx, &mut req, &mut resp).await;
        if !resp.started() {
            let family = family_for_path(req.head().path_only());
            resp.send(Response::error(&Code::InternalError.into(), family))
                .await;
        } else if !resp.is_done() {
            resp.abort();
        }
        (resp.status(), resp.bytes_out(), resp.reusable())
    };
    let finished = Finished {
        status,
        bytes_in: consumed,
        bytes_out,
        error: None,
    };
    service.finish(sctx, &req.head(), &finished);
    ctx.finish_request(settings.generation);
    reusable
}

fn responder<'a>(
    stream: &'a mut ClientStream,
    bufs: &'a mut ConnBufs,
    ctx: &'a WorkerCtx,
    settings: &Settings,
    id: RequestId,
    is_head: bool,
) -> Responder<'a> {
    let mut resp = Responder::new(
        stream,
        &mut bufs.out,
        ctx,
        id,
        bufs.index.keep_alive,
        is_head,
        settings.write_timeout,
    );
    if bufs.index.version == crate::h1::Version::Http10 {
        resp.set_http10();
    }
    resp
}

/// Sends an error and marks the connection for closing; a client that stopped reading gets
/// a short write bound, so it cannot hold the worker. Returns the status and bytes written.
async fn send_closing(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    ctx: &WorkerCtx,
    settings: &Settings,
    id: RequestId,
    err: &ApiError,
    family: Family,
) -> (u16, usize) {
    let mut r = Response::error(err, family);
    r.close = true;
    let timeout = settings.write_timeout.min(Duration::from_secs(5));
    let mut resp = Responder::new(stream, &mut bufs.out, ctx, id, false, false, timeout);
    resp.send(r).await;
    (resp.status(), resp.bytes_out())
}

/// Answers a request whose head could not be parsed (or did not arrive in time), logs it,
/// and closes the connection: no service saw it.
#[allow(clippy::too_many_arguments)]
async fn reject(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    ctx: &WorkerCtx,
    settings: &Settings,
    id: RequestId,
    peer: SocketAddr,
    started: Instant,
    err: ApiError,
    family: Family,
) {
    let (status, _) = send_closing(stream, bufs, ctx, settings, id, &err, family).await;
    ctx.finish_request(settings.generation);
    if settings.access_log {
        tracing::info!(
            target: "access",
            id = %id,
            peer = %peer.ip(),
            status,
            error = err.code.as_str(),
            latency_us = started.elapsed().as_micros() as u64,
            "rejected"
        );
    }
    linger(stream).await;
}

/// Where a request sent over plain HTTP should go: its host (without the plain
/// listener's port) on the TLS listener's port, and its path without the query.
fn https_url(index: &HeadIndex, raw: &[u8], tls_port: u16) -> String {
    let host = index
        .host
        .map(|h| h.get(raw))
        .and_then(|h| std::str::from_utf8(h).ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("<host>");
    // `[v6]:port`, `name:port`, or no port.
    let name = match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && (host.starts_with('[') || !host[..i].contains(':')) =>
        {
            &host[..i]
        }
        _ => host,
    };
    let path = path_of(index, raw).split('?').next().unwrap_or_default();
    if tls_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{tls_port}{path}")
    }
}

fn path_of<'a>(index: &HeadIndex, raw: &'a [u8]) -> &'a str {
    std::str::from_utf8(index.path.get(raw)).unwrap_or("")
}

/// Reads until `bufs.read` starts with a complete, valid head. Returns when the head began
/// (the request's latency starts there).
async fn read_head(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    settings: &Settings,
    ctx: &WorkerCtx,
) -> (HeadOutcome, Instant) {
    let limits = &settings.limits;
    // The clock is read when the head's first bytes are here (now, if pipelined bytes are);
    // a connection that closes while idle never reads it.
    let mut started = (!bufs.read.is_empty()).then(Instant::now);
    let mut deadline = started.map(|s| s + settings.head_read_timeout);
    let mut scanned = 0;
    let started_at = |s: Option<Instant>| s.unwrap_or_else(Instant::now);
    loop {
        if !bufs.read.is_empty() {
            match try_parse(&bufs.read, &mut scanned, limits, &mut bufs.index) {
                Ok(true) => return (HeadOutcome::Ready, started_at(started)),
                Ok(false) => {}
                Err(e) => return (HeadOutcome::Invalid(e), started_at(started)),
            }
        }
        let n = match deadline {
            // Between requests: wait up to the keep-alive timeout, and leave at shutdown.
            None => {
                let read = read_more(stream, &mut bufs.read, settings.keepalive_idle_timeout);
                monoio::select! {
                    r = read => r,
                    _ = ctx.shutdown.wait() => return (HeadOutcome::Closed, started_at(started)),
                }
            }
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                read_more(stream, &mut bufs.read, left).await
            }
        };
        match n {
            ReadResult::Data => {
                if deadline.is_none() {
                    let now = Instant::now();
                    started = Some(now);
                    deadline = Some(now + settings.head_read_timeout);
                }
            }
            ReadResult::Eof | ReadResult::Io => return (HeadOutcome::Closed, started_at(started)),
            ReadResult::TimedOut if deadline.is_none() => {
                return (HeadOutcome::Closed, started_at(started))
            }
            ReadResult::TimedOut => return (HeadOutcome::TimedOut, started_at(started)),
        }
        if bufs.read.is_empty() {
            return (HeadOutcome::Io, started_at(started));
        }
    }
}

/// Parses the head if the new bytes could have completed it. httparse is stateless, so a
/// head trickling in a byte at a time would be re-parsed once per byte; a head can only end
/// at a LF, so bytes without one only need the size checks.
fn try_parse(
    buf: &[u8],
    scanned: &mut usize,
    limits: &Limits,
    index: &mut HeadIndex,
) -> Result<bool, H1Error> {
    let new_lf = memchr::memchr(b'\n', &buf[*scanned..]).is_some();
    *scanned = buf.len();
    if !new_lf {
        let any_lf = memchr::memchr(b'\n', buf).is_some();
        if !any_lf && buf.len() > limits.max_request_line_bytes {
            return Err(H1Error::RequestLineTooLong);
        }
        if buf.len() >= limits.max_head_bytes {
            return Err(if any_lf {
                H1Error::HeadTooLarge
            } else {
                H1Error::RequestLineTooLong
            });
        }
        return Ok(false);
    }
    let mut storage = [std::mem::MaybeUninit::uninit(); MAX_HEADERS_CEILING];
    match parse_request_head(buf, &mut storage, limits)? {
        Some(head) => {
            index.fill(buf, &head);
            Ok(true)
        }
        None => Ok(false),
    }
}

async fn read_body(
    stream: &mut ClientStream,
    bufs: &mut ConnBufs,
    settings: &Settings,
    budget: &mut BodyBudget,
    slot: impl FnOnce() -> Option<BodyReadSlot>,
) -> BodyOutcome {
    let head_len = bufs.index.head_len;
    // A body still to arrive takes one of the worker's places for bodies being waited for
    // (bounded in all and per client address), for as long as it takes.
    let complete = match bufs.index.framing {
        BodyFraming::None => true,
        BodyFraming::Length(n) => bufs.read.len() as u64 >= head_len as u64 + n,
        BodyFraming::Chunked => false,
    };
    let _slot = if complete {
        None
    } else {
        match slot() {
            Some(s) => Some(s),
            None => return BodyOutcome::TooManyReads,
        }
    };
    let deadline = Instant::now() + settings.body_read_total_timeout;
    let wait = || {
        settings
            .body_read_idle_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
    };
    // Reserved before asking for the body (100-continue) or reading it; the service usually
    // reserved it already, when it admitted the request.
    if let BodyFraming::Length(n) = bufs.index.framing {
        if !budget.grow_to(n) {
            return BodyOutcome::OverBudget;
        }
    }
    let needs_body = !matches!(
        bufs.index.framing,
        BodyFraming::None | BodyFraming::Length(0)
    );
    // RFC 9110 §10.1.1: send 100 Continue only if no body byte has been received yet.
    if bufs.index.expect_continue && needs_body && bufs.read.len() == head_len {
        crate::runtime::buffers::ensure(&mut bufs.out);
        bufs.out.clear();
        bufs.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        if write_out(stream, &mut bufs.out, settings.write_timeout)
            .await
            .is_err()
        {
            return BodyOutcome::Io;
        }
    }
    match bufs.index.framing {
        BodyFraming::None => BodyOutcome::Ready {
            start: head_len,
            end: head_len,
            chunked: false,
            consumed: head_len,
        },
        BodyFraming::Length(n) => {
            // `n` is bounded by `max_body_bytes` (checked by the parser).
            let end = head_len + n as usize;
            while bufs.read.len() < end {
                let want = end - bufs.read.len();
                if bufs.read.capacity() - bufs.read.len() < want.min(64 * 1024) {
                    bufs.read.reserve(want.min(1 << 20));
                }
                match read_more(stream, &mut bufs.read, wait()).await {
                    ReadResult::Data => {}
                    ReadResult::TimedOut => return BodyOutcome::TimedOut,
                    ReadResult::Eof | ReadResult::Io => return BodyOutcome::Io,
                }
            }
            BodyOutcome::Ready {
                start: head_len,
                end,
                chunked: false,
                consumed: end,
            }
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(&settings.limits);
            bufs.chunked_body.clear();
            let mut pos = head_len;
            loop {
                match decoder.decode(&bufs.read[pos..], &mut bufs.chunked_body) {
                    Ok(p) if p.done => {
                        return BodyOutcome::Ready {
                            start: 0,
                            end: 0,
                            chunked: true,
                            consumed: pos + p.consumed,
                        };
                    }
                    Ok(p) => pos += p.consumed,
                    Err(e) => return BodyOutcome::Invalid(e),
                }
                if !budget.grow_to(bufs.chunked_body.len() as u64) {
                    return BodyOutcome::OverBudget;
                }
                // Everything after the head up to `pos` is decoded: drop it so the raw
                // chunked bytes never pile up next to their decoded copy.
                let tail = bufs.read.len() - pos;
                bufs.read.copy_within(pos.., head_len);
                bufs.read.truncate(head_len + tail);
                pos = head_len;
                match read_more(stream, &mut bufs.read, wait()).await {
                    ReadResult::Data => {}
                    ReadResult::TimedOut => return BodyOutcome::TimedOut,
                    ReadResult::Eof | ReadResult::Io => return BodyOutcome::Io,
                }
            }
        }
    }
}

enum ReadResult {
    Data,
    Eof,
    TimedOut,
    Io,
}

/// One read into the free space of `buf`, bounded by `timeout`.
async fn read_more(stream: &mut ClientStream, buf: &mut BytesMut, timeout: Duration) -> ReadResult {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(MIN_READ);
    }
    let owned = std::mem::take(buf);
    let len = owned.len();
    let cap = owned.capacity();
    match crate::runtime::deadline::timeout(timeout, stream.read(owned.slice_mut(len..cap))).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            match res {
                Ok(0) => ReadResult::Eof,
                Ok(_) => ReadResult::Data,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadResult::Data,
                Err(_) => ReadResult::Io,
            }
        }
        // The buffer went with the cancelled read; the connection is closed anyway.
        Err(_) => ReadResult::TimedOut,
    }
}

/// Closing a socket with unread input makes the kernel send RST, which can destroy the
/// error response before the client reads it. Stop sending, then read and discard what the
/// client still sends, for a short bounded time (RFC 9112 §9.6).
async fn linger(stream: &mut ClientStream) {
    const LINGER: Duration = Duration::from_millis(500);
    const MAX_DISCARD: usize = 256 * 1024;
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER;
    let mut scratch = Vec::with_capacity(16 * 1024);
    let mut discarded = 0;
    while discarded < MAX_DISCARD {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        scratch.clear();
        match crate::runtime::deadline::timeout(left, stream.read(scratch)).await {
            Ok((Ok(n), back)) if n > 0 => {
                discarded += n;
                scratch = back;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(head: &str, tls_port: u16) -> String {
        let raw = head.as_bytes();
        let mut storage = [std::mem::MaybeUninit::uninit(); MAX_HEADERS_CEILING];
        let parsed = parse_request_head(raw, &mut storage, &Limits::default())
            .expect("valid")
            .expect("complete");
        let mut index = HeadIndex::default();
        index.fill(raw, &parsed);
        https_url(&index, raw, tls_port)
    }

    #[test]
    fn plain_requests_are_told_the_https_url() {
        assert_eq!(
            url(
                "POST /v1/chat/completions?k=v HTTP/1.1\r\nHost: gw.example:8080\r\n\r\n",
                8443
            ),
            "https://gw.example:8443/v1/chat/completions"
        );
        assert_eq!(
            url("POST /v1/messages HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 443),
            "https://[::1]/v1/messages"
        );
        assert_eq!(
            url("POST /v1/messages HTTP/1.1\r\nHost: [::1]\r\n\r\n", 443),
            "https://[::1]/v1/messages"
        );
        assert_eq!(
            url("POST /v1/x HTTP/1.0\r\n\r\n", 443),
            "https://<host>/v1/x"
        );
    }
}
