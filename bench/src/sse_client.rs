//! The streaming load client: many keep-alive connections on one thread, each sending a
//! streaming chat request, reading the chunked SSE answer to its end, and sending the next.
//!
//! It runs on its own thread of the harness, pinned to the load core, on a single-threaded
//! monoio runtime (see [`crate::sse_mock`] for why monoio). The measuring thread reads the
//! shared [`Counters`] at the edges of its window; per-stream figures (time to first byte,
//! error details) come back in a [`LoadReport`] when the load stops.
//!
//! Responses are checked, not just drained: the chunked framing is decoded (and refused when
//! malformed), `data:` events are counted, and a stream counts as complete only with status
//! 200, a `data: [DONE]` event and the terminal chunk. Anything else — another status, a
//! reset, a stream cut short, a stall past the read timeout — is an error, counted
//! separately; the first few are kept with their status and body.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::netio::{self, Conn};

/// What each connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Read every stream to its end and send the next request, until stopped.
    Stream,
    /// Send one request, read the response head and the first bytes after it, then stop
    /// reading (keeping the connection open) until stopped.
    Stall,
}

/// One load: where, how many connections, what each sends.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    pub(crate) target: SocketAddr,
    pub(crate) connections: usize,
    /// The whole request, head and body.
    pub(crate) request: Arc<Vec<u8>>,
    /// Connection `i` starts `ramp * i / connections` after the first.
    pub(crate) ramp: Duration,
    pub(crate) mode: Mode,
    /// Longest silence accepted while a response is read.
    pub(crate) read_timeout: Duration,
    /// Pause after an error before the connection tries again.
    pub(crate) error_pause: Duration,
    /// How long the load may take to end its streams once stopped.
    pub(crate) stop_grace: Duration,
}

/// Figures the measuring thread reads while the load runs. Totals since the start.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// `data:` events received (`[DONE]` included).
    pub(crate) events: AtomicU64,
    /// Response heads received, any status.
    pub(crate) responses: AtomicU64,
    /// Streams complete and clean.
    pub(crate) streams_ok: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Requests sent whose response has not ended yet.
    pub(crate) open: AtomicU64,
    /// Connections holding a stalled stream ([`Mode::Stall`]).
    pub(crate) stalled: AtomicU64,
    stop: AtomicBool,
}

/// One time to first byte: when the request's last byte was written, and how long after
/// it the first byte of the response body arrived.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ttfb {
    pub(crate) sent: Instant,
    pub(crate) ttfb: Duration,
}

/// Error samples kept per load.
const ERROR_SAMPLES: usize = 5;
/// Body bytes kept per error sample.
const SAMPLE_BODY: usize = 300;

/// What a load saw, beyond the counters.
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    pub(crate) ttfb: Vec<Ttfb>,
    /// The first few errors, described.
    pub(crate) error_samples: Vec<String>,
}

/// A load running on its own thread.
#[derive(Debug)]
pub(crate) struct Load {
    pub(crate) counters: Arc<Counters>,
    thread: std::thread::JoinHandle<anyhow::Result<LoadReport>>,
}

impl Load {
    /// Starts the load on a new thread pinned to `core`.
    pub(crate) fn start(spec: LoadSpec, core: usize) -> anyhow::Result<Self> {
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let thread = std::thread::Builder::new()
            .name("aigw-bench-load".into())
            .spawn(move || {
                core_affinity::set_for_current(core_affinity::CoreId { id: core });
                let (mut rt, _) = netio::runtime()?;
                Ok(rt.block_on(run(spec, shared)))
            })?;
        Ok(Self { counters, thread })
    }

    /// Stops the load: streams in flight may end (within the spec's grace), then every
    /// connection is closed.
    pub(crate) fn stop(self) -> anyhow::Result<LoadReport> {
        self.counters.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the load thread panicked"),
        }
    }
}

/// State shared by one load's connections, on its thread.
#[derive(Debug)]
struct Shared {
    spec: LoadSpec,
    counters: Arc<Counters>,
    report: RefCell<LoadReport>,
    running: std::cell::Cell<usize>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.counters.stop.load(Ordering::Relaxed)
    }

    /// Bytes asked for per read: stalled readers read no more than the head and the first
    /// few bytes after it.
    fn read_size(&self) -> usize {
        match self.spec.mode {
            Mode::Stream => READ_BUF,
            Mode::Stall => STALL_READ,
        }
    }

    fn error(&self, what: impl FnOnce() -> String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let mut r = self.report.borrow_mut();
        if r.error_samples.len() < ERROR_SAMPLES {
            r.error_samples.push(what());
        }
    }
}

async fn run(spec: LoadSpec, counters: Arc<Counters>) -> LoadReport {
    let n = spec.connections;
    let shared = Rc::new(Shared {
        spec,
        counters,
        report: RefCell::new(LoadReport::default()),
        running: std::cell::Cell::new(n),
    });
    for i in 0..n {
        let s = shared.clone();
        monoio::spawn(async move {
            connection(i, &s).await;
            s.running.set(s.running.get() - 1);
        });
    }
    while !shared.stopping() {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = Instant::now() + shared.spec.stop_grace;
    while shared.running.get() > 0 && Instant::now() < end {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connections still running are dropped with the runtime: their sockets close.
    shared.report.take()
}

async fn connection(i: usize, s: &Shared) {
    let spec = &s.spec;
    let delay = spec.ramp.mul_f64(i as f64 / spec.connections.max(1) as f64);
    monoio::time::sleep(delay).await;
    let mut conn: Option<Conn> = None;
    while !s.stopping() {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match TcpStream::connect_addr(spec.target).await {
                Ok(stream) => Conn::new(stream, s.read_size()),
                Err(e) => {
                    s.error(|| format!("connect: {e}"));
                    monoio::time::sleep(spec.error_pause).await;
                    continue;
                }
            },
        };
        match spec.mode {
            Mode::Stream => {
                let keep = exchange(&mut c, s).await;
                if keep == Keep::Yes {
                    conn = Some(c);
                } else if keep == Keep::NoAfterError {
                    monoio::time::sleep(spec.error_pause).await;
                }
            }
            Mode::Stall => {
                stall(&mut c, s).await;
                return;
            }
        }
    }
}

/// Bytes read at a time.
const READ_BUF: usize = 16 * 1024;
/// Bytes read at a time in [`Mode::Stall`].
const STALL_READ: usize = 512;

/// Whether a connection may carry the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Yes,
    No,
    NoAfterError,
}

/// A response head, parsed.
#[derive(Debug, Clone, Copy)]
struct RespHead {
    status: u16,
    len: usize,
    chunked: bool,
    content_length: Option<u64>,
    close: bool,
}

fn parse_response_head(buf: &[u8]) -> Result<Option<RespHead>, String> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
            return Err("response head too large".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let mut head = RespHead {
        status: resp.code.unwrap_or(0),
        len,
        chunked: false,
        content_length: None,
        close: resp.version == Some(0),
    };
    for f in resp.headers.iter() {
        let value = String::from_utf8_lossy(f.value).to_ascii_lowercase();
        if f.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.trim().ends_with("chunked");
        } else if f.name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.trim().parse().map_err(|_| "bad content-length")?);
        } else if f.name.eq_ignore_ascii_case("connection") {
            head.close |= value.contains("close");
        }
    }
    Ok(Some(head))
}

/// Marks a request open until dropped.
struct Open<'a>(&'a Counters);

impl<'a> Open<'a> {
    fn new(c: &'a Counters) -> Self {
        c.open.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads more into `c.buf`, within the read timeout: `Ok(0)` at end of stream.
async fn read_some(c: &mut Conn, s: &Shared) -> io::Result<usize> {
    match monoio::time::timeout(s.spec.read_timeout, c.fill(s.read_size())).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
    }
}

/// Sends the request and reads the head; on success `c.buf` holds the bytes after it.
async fn send_and_read_head(c: &mut Conn, s: &Shared) -> Result<(RespHead, Instant), Keep> {
    c.buf.clear();
    if let Err(e) = c.write(s.spec.request.clone()).await {
        s.error(|| format!("sending the request: {e}"));
        return Err(Keep::NoAfterError);
    }
    let sent = Instant::now();
    loop {
        match read_some(c, s).await {
            Ok(0) => {
                s.error(|| "closed before the response head".into());
                return Err(Keep::NoAfterError);
            }
            Ok(_) => {}
            Err(e) => {
                s.error(|| format!("reading the response head: {e}"));
                return Err(Keep::NoAfterError);
            }
        }
        match parse_response_head(&c.buf) {
            Ok(Some(h)) => {
                s.counters.responses.fetch_add(1, Ordering::Relaxed);
                c.buf.drain(..h.len);
                return Ok((h, sent));
            }
            Ok(None) => {}
            Err(e) => {
                s.error(|| e);
                return Err(Keep::NoAfterError);
            }
        }
    }
}

/// One streaming request and its response.
async fn exchange(c: &mut Conn, s: &Shared) -> Keep {
    let _open = Open::new(&s.counters);
    let (head, sent) = match send_and_read_head(c, s).await {
        Ok(h) => h,
        Err(keep) => return keep,
    };
    if head.status != 200 || !head.chunked {
        return drain_error(c, s, head).await;
    }
    let mut decoder = ChunkedDecoder::default();
    let mut sse = SseCounter::default();
    let mut first_byte = false;
    loop {
        if !c.buf.is_empty() {
            if !first_byte {
                first_byte = true;
                s.report.borrow_mut().ttfb.push(Ttfb {
                    sent,
                    ttfb: sent.elapsed(),
                });
            }
            let before = sse.events;
            let fed = decoder.decode(&c.buf, |data| sse.feed(data));
            s.counters
                .events
                .fetch_add(sse.events - before, Ordering::Relaxed);
            match fed {
                Ok(used) if decoder.is_done() => {
                    if used != c.buf.len() {
                        s.error(|| "bytes after the end of the response".into());
                        return Keep::NoAfterError;
                    }
                    if !sse.done {
                        s.error(|| {
                            format!("stream ended without [DONE] after {} events", sse.events)
                        });
                        return Keep::NoAfterError;
                    }
                    s.counters.streams_ok.fetch_add(1, Ordering::Relaxed);
                    return if head.close { Keep::No } else { Keep::Yes };
                }
                Ok(_) => c.buf.clear(),
                Err(e) => {
                    s.error(|| format!("malformed chunked body: {e}"));
                    return Keep::NoAfterError;
                }
            }
        }
        match read_some(c, s).await {
            Ok(0) => {
                s.error(|| format!("stream cut after {} events", sse.events));
                return Keep::NoAfterError;
            }
            Ok(_) => {}
            Err(e) => {
                s.error(|| format!("stream failed after {} events: {e}", sse.events));
                return Keep::NoAfterError;
            }
        }
    }
}

/// Reads the body of an unwanted response (to keep the connection usable and to show what
/// it said) and counts the error.
async fn drain_error(c: &mut Conn, s: &Shared, head: RespHead) -> Keep {
    let mut body = Vec::new();
    let mut decoder = ChunkedDecoder::default();
    let mut remaining = head.content_length.unwrap_or(0);
    let complete = loop {
        if head.chunked {
            let fed = decoder.decode(&c.buf, |d| {
                let room = SAMPLE_BODY.saturating_sub(body.len());
                body.extend_from_slice(&d[..d.len().min(room)]);
            });
            c.buf.clear();
            match fed {
                Ok(_) if decoder.is_done() => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        } else {
            let take = (c.buf.len() as u64).min(remaining) as usize;
            let room = SAMPLE_BODY.saturating_sub(body.len());
            body.extend_from_slice(&c.buf[..take.min(room)]);
            c.buf.clear();
            remaining -= take as u64;
            if remaining == 0 && head.content_length.is_some() {
                break true;
            }
        }
        match read_some(c, s).await {
            Ok(0) => break head.content_length.is_none() && !head.chunked,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    let what = if head.status == 200 {
        "200 without chunked framing".to_string()
    } else {
        format!("status {}", head.status)
    };
    s.error(|| format!("{what}: {}", String::from_utf8_lossy(&body)));
    if complete && !head.close && (head.chunked || head.content_length.is_some()) {
        monoio::time::sleep(s.spec.error_pause).await;
        Keep::Yes
    } else {
        Keep::NoAfterError
    }
}

/// One stalled stream: the head and the first bytes, then no more reading until stopped.
async fn stall(c: &mut Conn, s: &Shared) {
    let _open = Open::new(&s.counters);
    let (head, sent) = match send_and_read_head(c, s).await {
        Ok(h) => h,
        Err(_) => return,
    };
    if head.status != 200 {
        let _ = drain_error(c, s, head).await;
        return;
    }
    if c.buf.is_empty() {
        match monoio::time::timeout(s.spec.read_timeout, c.fill(STALL_READ)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => {
                s.error(|| "no body after the head".into());
                return;
            }
        }
    }
    s.report.borrow_mut().ttfb.push(Ttfb {
        sent,
        ttfb: sent.elapsed(),
    });
    s.counters.stalled.fetch_add(1, Ordering::Relaxed);
    while !s.stopping() {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    s.counters.stalled.fetch_sub(1, Ordering::Relaxed);
}

/// A chunked body decoder (RFC 9112 §7.1) that hands out the data as it goes.
#[derive(Debug, Default)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk-size line: the size so far, whether a digit was seen, whether in an
    /// extension.
    #[default]
    SizeStart,
    Size {
        size: u64,
        ext: bool,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: at the start of a line or inside one.
    TrailerLineStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkedDecoder {
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, calling `out` with each run of data; returns how many bytes it used
    /// (all of them unless the body ended).
    pub(crate) fn decode<'a>(
        &mut self,
        input: &'a [u8],
        mut out: impl FnMut(&'a [u8]),
    ) -> Result<usize, &'static str> {
        use ChunkState as S;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                S::SizeStart => match hex(b) {
                    Some(d) => S::Size {
                        size: u64::from(d),
                        ext: false,
                    },
                    None => return Err("chunk size expected"),
                },
                S::Size { size, ext: false } => match (hex(b), b) {
                    (Some(d), _) => S::Size {
                        size: size
                            .checked_mul(16)
                            .map(|v| v + u64::from(d))
                            .filter(|&v| v < 1 << 60)
                            .ok_or("chunk size overflows")?,
                        ext: false,
                    },
                    (None, b';' | b' ' | b'\t') => S::Size { size, ext: true },
                    (None, b'\r') => S::SizeLf { size },
                    _ => return Err("bad chunk size"),
                },
                S::Size { size, ext: true } => match b {
                    b'\r' => S::SizeLf { size },
                    b'\n' => return Err("bare LF in chunk extension"),
                    _ => S::Size { size, ext: true },
                },
                S::SizeLf { size } => match b {
                    b'\n' if size == 0 => S::TrailerLineStart,
                    b'\n' => S::Data(size),
                    _ => return Err("CR without LF after chunk size"),
                },
                S::Data(n) => {
                    let take = (input.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    out(&input[i..i + take]);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 { S::DataCr } else { S::Data(left) };
                    continue;
                }
                S::DataCr => match b {
                    b'\r' => S::DataLf,
                    _ => return Err("chunk data longer than its size"),
                },
                S::DataLf | S::TrailerLf | S::EndLf => match (self.state, b) {
                    (S::DataLf, b'\n') => S::SizeStart,
                    (S::TrailerLf, b'\n') => S::TrailerLineStart,
                    (S::EndLf, b'\n') => S::Done,
                    _ => return Err("CR without LF"),
                },
                S::TrailerLineStart => match b {
                    b'\r' => S::EndLf,
                    _ => S::TrailerLine,
                },
                S::TrailerLine => match b {
                    b'\r' => S::TrailerLf,
                    _ => S::TrailerLine,
                },
                S::Done => return Ok(i),
            };
            i += 1;
            if self.state == S::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Counts server-sent events that carry data, and sees `data: [DONE]`.
#[derive(Debug, Default)]
pub(crate) struct SseCounter {
    pub(crate) events: u64,
    pub(crate) done: bool,
    /// The start of the current line (enough to recognise `data:` and `[DONE]`).
    prefix: [u8; 16],
    line_len: usize,
    data_in_event: bool,
}

impl SseCounter {
    pub(crate) fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            let (line, rest, ended) = match memchr::memchr(b'\n', input) {
                Some(i) => (&input[..i], &input[i + 1..], true),
                None => (input, &[][..], false),
            };
            let room = self.prefix.len().saturating_sub(self.line_len);
            let keep = line.len().min(room);
            self.prefix[self.line_len.min(16)..self.line_len.min(16) + keep]
                .copy_from_slice(&line[..keep]);
            self.line_len += line.len();
            if ended {
                self.end_line();
            }
            input = rest;
        }
    }

    fn end_line(&mut self) {
        let mut len = self.line_len;
        if len > 0 && len <= self.prefix.len() && self.prefix[len - 1] == b'\r' {
            len -= 1;
        }
        let seen = &self.prefix[..len.min(self.prefix.len())];
        if len == 0 {
            if self.data_in_event {
                self.events += 1;
            }
            self.data_in_event = false;
        } else if seen.starts_with(b"data:") {
            self.data_in_event = true;
            if len <= self.prefix.len() && seen[5..].trim_ascii() == b"[DONE]" {
                self.done = true;
            }
        }
        self.line_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(parts: &[&[u8]]) -> (Vec<u8>, Result<bool, &'static str>) {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        for p in parts {
            match d.decode(p, |x| out.extend_from_slice(x)) {
                Ok(_) => {}
                Err(e) => return (out, Err(e)),
            }
        }
        (out, Ok(d.is_done()))
    }

    const BODY: &[u8] =
        b"6\r\ndata: \r\n17;ext=1\r\n{\"a\":1}\n\ndata: [DONE]\n\n\r\n0\r\nx-trailer: y\r\n\r\n";

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let (whole, done) = decode_all(&[BODY]);
        assert_eq!(done, Ok(true));
        assert_eq!(whole, b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        for cut in 0..BODY.len() {
            let (got, done) = decode_all(&[&BODY[..cut], &BODY[cut..]]);
            assert_eq!((got, done), (whole.clone(), Ok(true)), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = BODY.chunks(1).collect();
        assert_eq!(decode_all(&bytes), (whole, Ok(true)));
    }

    #[test]
    fn the_decoder_stops_at_the_end_of_the_body() {
        let mut d = ChunkedDecoder::default();
        let input = b"0\r\n\r\nHTTP/1.1";
        assert_eq!(d.decode(input, |_| {}), Ok(5));
        assert!(d.is_done());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"3\r\nabcd\r\n",
            b"3\nabc",
            b"3\r\nabc\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                decode_all(&[bad]).1.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Incomplete is not an error, and not done either.
        assert_eq!(decode_all(&[b"3\r\nab"]).1, Ok(false));
    }

    fn count(parts: &[&[u8]]) -> (u64, bool) {
        let mut c = SseCounter::default();
        for p in parts {
            c.feed(p);
        }
        (c.events, c.done)
    }

    #[test]
    fn events_are_counted_however_they_are_split() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"long enough to pass the prefix\"}}]}\n\n: comment\n\ndata: a\r\ndata: b\r\n\r\ndata:[DONE]\n\n";
        assert_eq!(count(&[body]), (3, true));
        for cut in 0..body.len() {
            assert_eq!(
                count(&[&body[..cut], &body[cut..]]),
                (3, true),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(count(&bytes), (3, true));
    }

    #[test]
    fn done_only_as_the_whole_data() {
        assert_eq!(count(&[b"data: [DONE] and more\n\n"]), (1, false));
        assert_eq!(count(&[b"data: {\"text\":\"[DONE]\"}\n\n"]), (1, false));
        assert_eq!(count(&[b"event: x\n\n"]), (0, false));
    }

    #[test]
    fn response_heads() {
        let h = parse_response_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n5\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.chunked && !h.close && h.status == 200);
        assert_eq!(h.len, 80);
        let h = parse_response_head(
            b"HTTP/1.1 503 x\r\nContent-Length: 7\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.close && h.content_length == Some(7) && !h.chunked);
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n")
            .unwrap()
            .is_none());
    }
}
