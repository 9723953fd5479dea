//! Writing a response to the client: whole, or streamed as it arrives from an upstream.
//!
//! A head is buffered, not written, until the first body bytes (or the end) are ready, so a
//! small response leaves in one write. Streamed bodies of unknown length go out chunked, one
//! chunk per upstream read, flushed at once (SSE events must not wait). A response that
//! cannot be completed is aborted: the connection closes without the final chunk (or short
//! of its Content-Length), which every HTTP client reports as an error rather than as a
//! complete answer.

use std::io;
use std::time::Duration;

use crate::server::stream::ClientStream;
use monoio::io::AsyncWriteRentExt;

use crate::h1::ResponseHead;
use crate::server::request_id::RequestId;
use crate::server::service::Response;
use crate::server::worker::WorkerCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    /// Head buffered or sent; body under way.
    Body {
        chunked: bool,
    },
    Done,
    Aborted,
}

#[derive(Debug)]
pub struct Responder<'a> {
    stream: &'a mut ClientStream,
    out: &'a mut Vec<u8>,
    ctx: &'a WorkerCtx,
    id: RequestId,
    keep_alive: bool,
    is_head: bool,
    /// An HTTP/1.0 client cannot take chunked bodies: bodies of unknown length are
    /// delimited by closing the connection instead (RFC 9112 §6.3 rule 8).
    http10: bool,
    write_timeout: Duration,
    state: State,
    status: u16,
    bytes_out: usize,
    /// The body as the client receives it, kept for the body log when asked for.
    capture: Option<Capture>,
}

/// A response body kept as it went out, up to a bound.
#[derive(Debug, Default)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// More went out than the bound kept.
    pub truncated: bool,
}

#[derive(Debug)]
struct Capture {
    limit: usize,
    got: Captured,
}

impl<'a> Responder<'a> {
    pub(crate) fn new(
        stream: &'a mut ClientStream,
        out: &'a mut Vec<u8>,
        ctx: &'a WorkerCtx,
        id: RequestId,
        keep_alive: bool,
        is_head: bool,
        write_timeout: Duration,
    ) -> Self {
        out.clear();
        Self {
            stream,
            out,
            ctx,
            id,
            keep_alive,
            is_head,
            http10: false,
            write_timeout,
            state: State::NotStarted,
            status: 0,
            bytes_out: 0,
            capture: None,
        }
    }

    /// Keeps the body bytes of the response from now on, up to `limit`.
    pub fn capture(&mut self, limit: usize) {
        self.capture = Some(Capture {
            limit,
            got: Captured::default(),
        });
    }

    /// The body kept since [`Self::capture`].
    pub fn take_captured(&mut self) -> Option<Captured> {
        self.capture.take().map(|c| c.got)
    }

    /// Marks the client as HTTP/1.0.
    pub(crate) fn set_http10(&mut self) {
        self.http10 = true;
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn bytes_out(&self) -> usize {
        self.bytes_out
    }

    /// Whether any part of a response has been committed to (the status can no longer change).
    pub fn started(&self) -> bool {
        self.state != State::NotStarted
    }

    /// Whether a complete response went out and the connection may carry another request.
    pub fn reusable(&self) -> bool {
        self.state == State::Done && self.keep_alive && !self.ctx.shutdown.is_triggered()
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Sends a complete response.
    pub async fn send(&mut self, r: Response) {
        if self.state != State::NotStarted {
            return;
        }
        if r.close {
            self.keep_alive = false;
        }
        self.begin(r.status, Some(r.body.len() as u64), |head| {
            let mut head = head.header("content-type", r.content_type.as_bytes());
            for (name, value) in &r.headers {
                head = head.header(name, value);
            }
            head
        });
        self.write_body(&r.body, true).await;
    }

    /// Buffers the head. `length`: `Some` sends Content-Length, `None` streams chunked.
    /// `headers` adds fields beyond the ones every response gets (date, request id,
    /// length or framing, connection).
    pub fn begin<'h>(
        &'h mut self,
        status: u16,
        length: Option<u64>,
        headers: impl FnOnce(ResponseHead<'h>) -> ResponseHead<'h>,
    ) {
        if self.state != State::NotStarted {
            return;
        }
        if self.ctx.shutdown.is_triggered() {
            self.keep_alive = false;
        }
        self.status = status;
        self.out.clear();
        crate::runtime::buffers::ensure(self.out);
        if length.is_none() && self.http10 {
            self.keep_alive = false;
        }
        let chunked = length.is_none() && !self.is_head && !self.http10;
        let keep_alive = self.keep_alive;
        self.state = State::Body { chunked };
        let date = self.ctx.date();
        let mut head = ResponseHead::new(self.out, status)
            .header("date", &date)
            .header("x-request-id", self.id.as_bytes());
        head = match length {
            Some(n) => head.content_length(n),
            None if self.is_head || self.http10 => head,
            None => head.header("transfer-encoding", b"chunked"),
        };
        head = headers(head);
        if self.stream.is_tls() {
            head = head.header("strict-transport-security", crate::config::tls::HSTS);
        }
        head = head.header(
            "connection",
            if keep_alive { b"keep-alive" } else { b"close" },
        );
        head.finish();
    }

    /// Sends body bytes (and the buffered head, the first time). `last` ends the response.
    /// False when the client cannot be written to (the response is then aborted).
    pub async fn write_body(&mut self, data: &[u8], last: bool) -> bool {
        self.push_body(data);
        self.flush(last).await
    }

    /// Adds body bytes to what the next [`Self::flush`] writes (for a chunked response,
    /// as one chunk).
    pub fn push_body(&mut self, data: &[u8]) {
        let State::Body { chunked } = self.state else {
            return;
        };
        if self.is_head || data.is_empty() {
            return;
        }
        crate::runtime::buffers::ensure(self.out);
        if let Some(c) = &mut self.capture {
            let room = c.limit.saturating_sub(c.got.bytes.len());
            c.got.bytes.extend_from_slice(&data[..room.min(data.len())]);
            c.got.truncated |= data.len() > room;
        }
        if chunked {
            let mut num = [0u8; 16];
            let n = hex(data.len(), &mut num);
            self.out.extend_from_slice(&num[..n]);
            self.out.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(data);
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.out.extend_from_slice(data);
        }
    }

    /// Writes what was pushed (and the buffered head, the first time); `last` ends the
    /// response. False when the client cannot be written to (the response is then aborted).
    pub async fn flush(&mut self, last: bool) -> bool {
        let State::Body { chunked } = self.state else {
            return false;
        };
        if chunked && last && !self.is_head {
            crate::runtime::buffers::ensure(self.out);
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        if self.out.is_empty() {
            if last {
                self.state = State::Done;
            }
            return true;
        }
        let n = self.out.len();
        match write_out(self.stream, self.out, self.write_timeout).await {
            Ok(()) => {
                self.bytes_out += n;
                if last {
                    self.state = State::Done;
                }
                true
            }
            Err(_) => {
                self.state = State::Aborted;
                false
            }
        }
    }

    /// Whether the response under way is sent chunked (its body may be re-framed freely).
    pub fn is_chunked(&self) -> bool {
        matches!(self.state, State::Body { chunked: true })
    }

    /// Bytes pushed and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Gives up on the response: the connection closes without completing it.
    pub fn abort(&mut self) {
        self.state = State::Aborted;
    }

    /// Resolves once the client closed its connection (watched only `after` from now on;
    /// see [`crate::server::client_watch`]).
    pub async fn client_closed(&self, after: Duration) {
        crate::server::client_watch::closed(self.stream, after).await;
    }

    /// Takes back a response whose head is buffered but not written yet, so another can be
    /// sent instead; false when bytes already went out.
    pub fn retract(&mut self) -> bool {
        if self.bytes_out != 0 || !matches!(self.state, State::Body { .. }) {
            return false;
        }
        self.out.clear();
        self.state = State::NotStarted;
        self.status = 0;
        if let Some(c) = &mut self.capture {
            c.got = Captured::default();
        }
        true
    }

    /// The client left before any response: nothing is written, the connection is closed,
    /// and the access log shows 499 (the status nginx uses for it).
    pub fn client_gone(&mut self) {
        if self.state == State::NotStarted {
            self.status = 499;
        }
        self.state = State::Aborted;
    }
}

fn hex(mut n: usize, out: &mut [u8; 16]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 16];
    let mut i = 0;
    loop {
        tmp[i] = HEX[n & 0xf];
        i += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for j in 0..i {
        out[j] = tmp[i - 1 - j];
    }
    i
}

/// Writes all of `out`, bounded by `timeout`. Its buffer then goes back to the worker's
/// spares ([`crate::runtime::buffers`]), leaving `out` empty without capacity: a connection
/// waiting for its stream's next event, or for its next request, holds no write buffer.
pub(crate) async fn write_out(
    stream: &mut ClientStream,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<()> {
    let owned = std::mem::take(out);
    match crate::runtime::deadline::timeout(timeout, stream.write_all(owned)).await {
        Ok((res, back)) => {
            crate::runtime::buffers::give(back);
            res.map(|_| ())
        }
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_sizes() {
        let mut b = [0u8; 16];
        let n = super::hex(0x1a2f, &mut b);
        assert_eq!(&b[..n], b"1a2f");
        let n = super::hex(0, &mut b);
        assert_eq!(&b[..n], b"0");
    }
}
