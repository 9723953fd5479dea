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

use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::errors::{ApiError, ApiStyle};
use crate::h1::limits::MAX_HEADERS_CEILING;
use crate::h1::{
    parse_request_head, BodyFraming, ChunkedDecoder, H1Error, HeadIndex, Limits, ResponseHead,
};
use crate::request_id::RequestId;
use crate::service::{Request, Response, Service};
use crate::settings::Settings;
use crate::worker::WorkerCtx;

/// Initial read buffer; grows up to the head limit plus the body limit.
const INITIAL_BUF: usize = 8 * 1024;
/// Minimum free space offered to each read.
const MIN_READ: usize = 4 * 1024;
/// A connection whose buffer grew past this (a large body) gets a fresh small one once the
/// request is done, so idle keep-alive connections do not pin megabytes.
const SHRINK_ABOVE: usize = 256 * 1024;

/// Per-connection buffers, reused for every request on the connection.
struct ConnBufs {
    /// Bytes read from the client: the current head, body and anything pipelined after.
    read: BytesMut,
    /// The response being written.
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
pub(crate) async fn serve<S: Service>(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    service: Rc<S>,
) {
    let _ = stream.set_nodelay(true);
    let mut bufs = ConnBufs {
        read: BytesMut::with_capacity(INITIAL_BUF),
        out: Vec::with_capacity(1024),
        index: HeadIndex::default(),
        chunked_body: Vec::new(),
    };
    loop {
        let settings = ctx.settings.current();
        let (head, started) = read_head(&mut stream, &mut bufs, &settings, &ctx).await;
        let id = ctx.next_request_id();
        match head {
            HeadOutcome::Ready => {}
            HeadOutcome::Closed | HeadOutcome::Io => return,
            HeadOutcome::TimedOut => {
                let err = ApiError::downstream(
                    408,
                    "request_timeout",
                    "request head not received in time",
                );
                let style = ApiStyle::sniff(&bufs.read);
                let _ =
                    respond_error(&mut stream, &mut bufs, &ctx, &settings, id, err, style).await;
                ctx.log_error(id, peer, 408, started);
                return;
            }
            HeadOutcome::Invalid(e) => {
                let style = ApiStyle::sniff(&bufs.read);
                let status = e.status();
                let _ = respond_error(&mut stream, &mut bufs, &ctx, &settings, id, e.into(), style)
                    .await;
                ctx.log_error(id, peer, status, started);
                return;
            }
        }

        let body = read_body(&mut stream, &mut bufs, &settings).await;
        let (start, end, chunked, consumed) = match body {
            BodyOutcome::Ready {
                start,
                end,
                chunked,
                consumed,
            } => (start, end, chunked, consumed),
            BodyOutcome::Invalid(e) => {
                let style = ApiStyle::for_path(path_of(&bufs));
                let status = e.status();
                let _ = respond_error(&mut stream, &mut bufs, &ctx, &settings, id, e.into(), style)
                    .await;
                ctx.log_error(id, peer, status, started);
                return;
            }
            BodyOutcome::TimedOut => {
                let err = ApiError::downstream(
                    408,
                    "request_timeout",
                    "request body not received in time",
                );
                let style = ApiStyle::for_path(path_of(&bufs));
                let _ =
                    respond_error(&mut stream, &mut bufs, &ctx, &settings, id, err, style).await;
                ctx.log_error(id, peer, 408, started);
                return;
            }
            BodyOutcome::Io => return,
        };

        let response = {
            let body = if chunked {
                &bufs.chunked_body[..]
            } else {
                &bufs.read[start..end]
            };
            let req = Request::new(id, peer, &bufs.index, &bufs.read, body);
            service.call(&req).await
        };
        let keep_alive = bufs.index.keep_alive && !response.close && !ctx.shutdown.is_triggered();
        let is_head = bufs.index.method.get(&bufs.read) == b"HEAD";
        encode_response(&mut bufs.out, &response, id, keep_alive, is_head, &ctx);
        let bytes_out = bufs.out.len();
        let written = write_out(&mut stream, &mut bufs.out, settings.write_timeout).await;
        ctx.finish_request();
        if settings.access_log {
            access_log(
                id,
                peer,
                &bufs,
                response.status,
                consumed,
                bytes_out,
                started,
            );
        }
        if written.is_err() || !keep_alive {
            return;
        }
        bufs.read.advance(consumed);
        if bufs.read.capacity() > SHRINK_ABOVE && bufs.read.len() < INITIAL_BUF {
            let mut fresh = BytesMut::with_capacity(INITIAL_BUF);
            fresh.extend_from_slice(&bufs.read);
            bufs.read = fresh;
        }
        if bufs.chunked_body.capacity() > SHRINK_ABOVE {
            bufs.chunked_body = Vec::new();
        }
    }
}

/// One line per request. Never a header value or a body byte: the path is logged without its
/// query string, since some clients put keys there.
fn access_log(
    id: RequestId,
    peer: SocketAddr,
    bufs: &ConnBufs,
    status: u16,
    bytes_in: usize,
    bytes_out: usize,
    started: Instant,
) {
    let method = std::str::from_utf8(bufs.index.method.get(&bufs.read)).unwrap_or("");
    let path = path_of(bufs);
    let path = path.split('?').next().unwrap_or(path);
    tracing::info!(
        target: "access",
        id = %id,
        peer = %peer.ip(),
        method,
        path,
        status,
        bytes_in,
        bytes_out,
        latency_us = started.elapsed().as_micros() as u64,
    );
}

fn path_of(bufs: &ConnBufs) -> &str {
    std::str::from_utf8(bufs.index.path.get(&bufs.read)).unwrap_or("")
}

/// Reads until `bufs.read` starts with a complete, valid head. Returns when the head began
/// (the request's latency starts there).
async fn read_head(
    stream: &mut TcpStream,
    bufs: &mut ConnBufs,
    settings: &Settings,
    ctx: &WorkerCtx,
) -> (HeadOutcome, Instant) {
    let limits = &settings.limits;
    let mut started = Instant::now();
    // Pipelined bytes already here: the head clock runs from now.
    let mut deadline = (!bufs.read.is_empty()).then(|| started + settings.head_read_timeout);
    let mut scanned = 0;
    loop {
        if !bufs.read.is_empty() {
            match try_parse(&bufs.read, &mut scanned, limits, &mut bufs.index) {
                Ok(true) => return (HeadOutcome::Ready, started),
                Ok(false) => {}
                Err(e) => return (HeadOutcome::Invalid(e), started),
            }
        }
        let n = match deadline {
            // Between requests: wait up to the keep-alive timeout, and leave at shutdown.
            None => {
                let read = read_more(stream, &mut bufs.read, settings.keepalive_idle_timeout);
                monoio::select! {
                    r = read => r,
                    _ = ctx.shutdown.wait() => return (HeadOutcome::Closed, started),
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
                    started = Instant::now();
                    deadline = Some(started + settings.head_read_timeout);
                }
            }
            ReadResult::Eof | ReadResult::Io => return (HeadOutcome::Closed, started),
            ReadResult::TimedOut if deadline.is_none() => return (HeadOutcome::Closed, started),
            ReadResult::TimedOut => return (HeadOutcome::TimedOut, started),
        }
        if bufs.read.is_empty() {
            return (HeadOutcome::Io, started);
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
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
    match parse_request_head(buf, &mut storage, limits)? {
        Some(head) => {
            index.fill(buf, &head);
            Ok(true)
        }
        None => Ok(false),
    }
}

async fn read_body(
    stream: &mut TcpStream,
    bufs: &mut ConnBufs,
    settings: &Settings,
) -> BodyOutcome {
    let head_len = bufs.index.head_len;
    let needs_body = !matches!(
        bufs.index.framing,
        BodyFraming::None | BodyFraming::Length(0)
    );
    // RFC 9110 §10.1.1: send 100 Continue only if no body byte has been received yet.
    if bufs.index.expect_continue && needs_body && bufs.read.len() == head_len {
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
                match read_more(stream, &mut bufs.read, settings.body_read_idle_timeout).await {
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
                // Everything after the head up to `pos` is decoded: drop it so the raw
                // chunked bytes never pile up next to their decoded copy.
                let tail = bufs.read.len() - pos;
                bufs.read.copy_within(pos.., head_len);
                bufs.read.truncate(head_len + tail);
                pos = head_len;
                match read_more(stream, &mut bufs.read, settings.body_read_idle_timeout).await {
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
async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut, timeout: Duration) -> ReadResult {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(MIN_READ);
    }
    let owned = std::mem::take(buf);
    let len = owned.len();
    let cap = owned.capacity();
    match monoio::time::timeout(timeout, stream.read(owned.slice_mut(len..cap))).await {
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

/// Writes all of `out` (then clears it), bounded by `timeout`.
async fn write_out(stream: &mut TcpStream, out: &mut Vec<u8>, timeout: Duration) -> io::Result<()> {
    let owned = std::mem::take(out);
    match monoio::time::timeout(timeout, stream.write_all(owned)).await {
        Ok((res, mut back)) => {
            back.clear();
            *out = back;
            res.map(|_| ())
        }
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn encode_response(
    out: &mut Vec<u8>,
    r: &Response,
    id: RequestId,
    keep_alive: bool,
    is_head: bool,
    ctx: &WorkerCtx,
) {
    out.clear();
    let mut head = ResponseHead::new(out, r.status)
        .header("date", &ctx.date())
        .header("x-request-id", id.as_bytes())
        .header("content-type", r.content_type.as_bytes())
        .content_length(r.body.len() as u64);
    for (name, value) in &r.headers {
        head = head.header(name, value);
    }
    head = head.header(
        "connection",
        if keep_alive { b"keep-alive" } else { b"close" },
    );
    head.finish();
    if !is_head {
        out.extend_from_slice(&r.body);
    }
}

async fn respond_error(
    stream: &mut TcpStream,
    bufs: &mut ConnBufs,
    ctx: &WorkerCtx,
    settings: &Settings,
    id: RequestId,
    err: ApiError,
    style: ApiStyle,
) -> io::Result<()> {
    let mut r = Response::error(err, style);
    r.close = true;
    encode_response(&mut bufs.out, &r, id, false, false, ctx);
    ctx.finish_request();
    // Best effort: the client may already be gone. A short write bound keeps a client that
    // stopped reading from holding the worker.
    let timeout = settings.write_timeout.min(Duration::from_secs(5));
    let res = write_out(stream, &mut bufs.out, timeout).await;
    linger(stream).await;
    res
}

/// Closing a socket with unread input makes the kernel send RST, which can destroy the
/// error response before the client reads it. Stop sending, then read and discard what the
/// client still sends, for a short bounded time (RFC 9112 §9.6).
async fn linger(stream: &mut TcpStream) {
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
        match monoio::time::timeout(left, stream.read(scratch)).await {
            Ok((Ok(n), back)) if n > 0 => {
                discarded += n;
                scratch = back;
            }
            _ => return,
        }
    }
}

impl ApiStyle {
    /// The style for a request whose head did not parse: look at the request line's target.
    pub(crate) fn sniff(buf: &[u8]) -> Self {
        let line_end = memchr::memchr(b'\n', buf)
            .unwrap_or(buf.len())
            .min(8 * 1024);
        let line = &buf[..line_end];
        let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
        Self::for_path(std::str::from_utf8(target).unwrap_or(""))
    }
}
