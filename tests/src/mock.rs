//! A scripted mock LLM provider (OpenAI- and Anthropic-shaped) for the end-to-end tests.
//!
//! Blocking `std::net`, one thread per connection, no async runtime. HTTP/1.1 with keep-alive,
//! Content-Length and chunked request bodies, optional TLS (rustls + a throwaway CA from rcgen).
//! Every request is recorded; the response to each request is taken from a FIFO queue of
//! [`Behavior`]s (see [`MockProvider::push_behavior`]) and, when the queue is empty, from
//! [`MockOptions::default`].
//!
//! Routing of the JSON behaviours is by path, whatever the variant: `/v1/messages` gets the
//! Anthropic shape, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and
//! `/v1/responses` get OpenAI shapes, `GET /v1/models` a model list, anything else a 404.
//! The streaming variants stream only when the request body has `"stream": true` (otherwise
//! they answer like the JSON variants); `StallAfterEvents` and `ResetAfterEvents` always stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// What OpenAI's API says of the account behind a request, sent by the mock on every
/// OpenAI answer (with its request id, `x-request-id: req_mock`): its organisation, rate
/// limits and a cookie. None of it may reach a gateway's client.
pub const OPENAI_ACCOUNT_HEADERS: &[(&str, &str)] = &[
    ("openai-organization", "mock-org"),
    ("x-ratelimit-remaining-requests", "99"),
    ("set-cookie", "__cf_bm=abc"),
];

/// [`OPENAI_ACCOUNT_HEADERS`] for Anthropic's API (`/v1/messages`), whose request id is
/// `request-id: req_mock`.
pub const ANTHROPIC_ACCOUNT_HEADERS: &[(&str, &str)] = &[
    ("anthropic-organization-id", "org-mock"),
    ("anthropic-ratelimit-requests-remaining", "99"),
    ("set-cookie", "__cf_bm=abc"),
];

/// What the mock does with one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behavior {
    /// OpenAI-shaped JSON answers (chat completion echoing the last user message as
    /// `"echo: <text>"`, completions, embeddings, responses, model list); routed by path.
    #[default]
    OpenAiJson,
    /// For requests with `"stream": true`: an OpenAI SSE stream of `events` chunk events,
    /// `delay_ms` apart, then a usage chunk if `stream_options.include_usage`, then
    /// `data: [DONE]`. Non-streaming requests get the [`Behavior::OpenAiJson`] answer.
    OpenAiStream { events: usize, delay_ms: u64 },
    /// Anthropic-shaped JSON answer for `POST /v1/messages`; routed by path like `OpenAiJson`.
    AnthropicJson,
    /// For requests with `"stream": true`: an Anthropic SSE stream (message_start,
    /// content_block_start, `events` × content_block_delta, content_block_stop, message_delta,
    /// message_stop). Non-streaming requests get the [`Behavior::AnthropicJson`] answer.
    AnthropicStream { events: usize, delay_ms: u64 },
    /// A fixed response with Content-Length (plus the usual provider headers and the given ones).
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Read the request, never answer; the socket stays open until the provider is dropped.
    Stall,
    /// Read the request, never answer, and wait for the peer to close the connection
    /// (counted, as every close by the peer is: [`MockProvider::closed_by_peer`]).
    Hold,
    /// Send the head and `events` OpenAI SSE events (chunked), then stall until dropped.
    StallAfterEvents { events: usize },
    /// Send the head and `events` OpenAI SSE events (chunked), then reset the connection (RST).
    ResetAfterEvents { events: usize },
    /// An Anthropic stream that fails after `events` deltas with a mid-stream
    /// `event: error` (`overloaded_error`), as Anthropic reports overload once streaming.
    AnthropicStreamError { events: usize },
    /// Read the request, then close the connection without answering.
    CloseBeforeResponse,
    /// Wait `delay_ms`, then answer like [`Behavior::OpenAiJson`].
    Slow { delay_ms: u64 },
    /// Write these exact bytes as the response, then close.
    Raw(Vec<u8>),
}

/// How to start a [`MockProvider`].
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Serve HTTPS with a certificate for `localhost` and `127.0.0.1` signed by a fresh CA.
    pub tls: bool,
    /// The behaviour used when the scripted queue is empty.
    pub default: Behavior,
    /// The credential every request must present, as the provider's API takes it
    /// (`Authorization: Bearer`; on `/v1/messages` also `x-api-key`); otherwise
    /// 401 in the API's error shape. `None`: any credential, or none.
    pub credential: Option<String>,
    /// The path the API is served under (a deployment behind a proxy, say): requests
    /// outside it are 404.
    pub path_prefix: String,
    /// How streamed events are cut into writes.
    pub sse: SseWrites,
    /// Streams carry SSE comments (`: keep-alive`) between events, as some providers send.
    pub sse_comments: bool,
    /// JSON answers are sent chunked, in two chunks, as providers often send them.
    pub chunked_json: bool,
}

/// How the mock cuts a stream into writes (each a chunk of the chunked body, flushed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SseWrites {
    /// One event per write.
    #[default]
    Whole,
    /// Every event in pieces of at most this many bytes, a millisecond apart, so events
    /// arrive split across reads.
    Split(usize),
    /// Every event that is not held back by a delay in one write: several events per read.
    Merged,
}

/// One request as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    /// All headers in order, names in their original case.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if it was sent chunked.
    pub body: Vec<u8>,
    /// Which accepted connection (0-based, in accept order) carried the request.
    pub connection: usize,
}

impl RecordedRequest {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A running mock provider on 127.0.0.1 port 0, stopped on drop.
#[derive(Debug)]
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca_pem: Option<String>,
    accept_thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    queue: Mutex<VecDeque<Behavior>>,
    default: Mutex<Behavior>,
    connections: AtomicUsize,
    /// The connections (by accept order) the peer closed or reset, in the order it did
    /// (see [`MockProvider::closed_by_peer`]).
    closed_by_peer: Mutex<Vec<usize>>,
    next_conn_key: AtomicU64,
    /// Clones of the open connections' sockets, shut down on drop to unblock their threads.
    open: Mutex<HashMap<u64, TcpStream>>,
    credential: Option<String>,
    path_prefix: String,
    sse: SseWrites,
    sse_comments: bool,
    chunked_json: bool,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn next_behavior(&self) -> Behavior {
        let queued = self.queue.lock().unwrap().pop_front();
        match queued {
            Some(b) => b,
            None => self.default.lock().unwrap().clone(),
        }
    }
}

impl MockProvider {
    /// Binds 127.0.0.1:0 and starts accepting. Panics if the socket or TLS material can't be set up.
    pub fn start(opts: MockOptions) -> MockProvider {
        let listener = TcpListener::bind("127.0.0.1:0").expect("mock: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock: local_addr");
        let (tls_config, ca_pem) = if opts.tls {
            let (cfg, pem) = make_tls();
            (Some(cfg), Some(pem))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            requests: Arc::new(Mutex::new(Vec::new())),
            queue: Mutex::new(VecDeque::new()),
            default: Mutex::new(opts.default),
            connections: AtomicUsize::new(0),
            closed_by_peer: Mutex::new(Vec::new()),
            next_conn_key: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            credential: opts.credential,
            path_prefix: opts.path_prefix.trim_end_matches('/').to_string(),
            sse: opts.sse,
            sse_comments: opts.sse_comments,
            chunked_json: opts.chunked_json,
        });
        let sh = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name(format!("mock-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, sh, tls_config))
            .expect("mock: spawn accept thread");
        MockProvider {
            addr,
            shared,
            ca_pem,
            accept_thread: Some(accept_thread),
        }
    }

    /// The bound address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS, then the path prefix.
    pub fn base_url(&self) -> String {
        let prefix = &self.shared.path_prefix;
        if self.ca_pem.is_some() {
            format!("https://localhost:{}{prefix}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}{prefix}", self.addr.port())
        }
    }

    /// Queues a behaviour for the next request that finds the queue non-empty (FIFO).
    pub fn push_behavior(&self, b: Behavior) {
        self.shared.queue.lock().unwrap().push_back(b);
    }

    /// Replaces the behaviour used when the queue is empty.
    pub fn set_default(&self, b: Behavior) {
        *self.shared.default.lock().unwrap() = b;
    }

    /// A snapshot of every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The shared log itself (e.g. to clear it between phases of a test).
    pub fn requests_handle(&self) -> Arc<Mutex<Vec<RecordedRequest>>> {
        self.shared.requests.clone()
    }

    /// How many requests have been received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// How many connections the peer (the gateway) has ended: closed between requests,
    /// closed while a request was held ([`Behavior::Hold`]), or closed or reset while the
    /// mock was still writing an answer (a stream nobody reads any more). Closes made by the
    /// mock itself, and those at its own drop, are not counted.
    pub fn closed_by_peer(&self) -> usize {
        self.shared.closed_by_peer.lock().unwrap().len()
    }

    /// Which connections (as [`RecordedRequest::connection`] numbers them) the peer has
    /// ended, in the order it did; see [`MockProvider::closed_by_peer`].
    pub fn closed_connections(&self) -> Vec<usize> {
        self.shared.closed_by_peer.lock().unwrap().clone()
    }

    /// How many TCP connections have been accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// PEM of the CA that signed the server certificate. Panics if started without TLS.
    pub fn ca_pem(&self) -> String {
        self.ca_pem
            .clone()
            .expect("MockProvider::ca_pem: the provider was started without tls")
    }

    /// Writes [`MockProvider::ca_pem`] to `dir/mock-ca-PORT.pem` and returns the path.
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("mock-ca-{}.pem", self.addr.port()));
        std::fs::write(&path, self.ca_pem()).expect("mock: write CA file");
        path
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // Unblock connection threads stuck in read(); stalled ones see the flag.
        let open: Vec<TcpStream> = self
            .shared
            .open
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in open {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn make_tls() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().expect("mock: CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("mock: CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "aigateway e2e mock CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("mock: self-sign CA");

    let srv_key = KeyPair::generate().expect("mock: server key");
    let mut srv_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("mock: server params");
    srv_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    srv_params.is_ca = IsCa::ExplicitNoCa;
    let srv_cert = srv_params
        .signed_by(&srv_key, &ca_cert, &ca_key)
        .expect("mock: sign server cert");

    let chain: Vec<CertificateDer<'static>> = vec![srv_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(srv_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("mock: rustls protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("mock: rustls server cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(cfg), ca_cert.pem())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<rustls::ServerConfig>>) {
    loop {
        let accepted = listener.accept();
        if shared.stopped() {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let index = shared.connections.fetch_add(1, Ordering::SeqCst);
        let key = shared.next_conn_key.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared.open.lock().unwrap().insert(key, clone);
        }
        let sh = shared.clone();
        let tls = tls.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mock-conn-{index}"))
            .spawn(move || {
                let ended = serve_connection(stream, index, &sh, tls);
                if ended_by_peer(&ended) && !sh.stopped() {
                    sh.closed_by_peer.lock().unwrap().push(index);
                }
                if let Ok(mut open) = sh.open.lock() {
                    open.remove(&key);
                }
            });
        if spawned.is_err() {
            shared.open.lock().unwrap().remove(&key);
        }
    }
}

/// A plain or TLS connection.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }

    /// Graceful close: close_notify for TLS, then FIN.
    fn close(mut self) {
        if let Conn::Tls(s) = &mut self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }

    /// Abortive close: RST.
    fn reset(self) {
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(Duration::ZERO));
        drop(self);
    }
}

struct Request {
    method: String,
    /// The path within the API (the provider's prefix removed).
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
    /// Anthropic's API (`/v1/messages`) rather than OpenAI's.
    anthropic: bool,
    chunked_json: bool,
    sse: SseWrites,
    sse_comments: bool,
}

impl Request {
    /// An error body in the shape of the API called.
    fn error(&self, kind: &str, message: &str) -> Value {
        if self.anthropic {
            json!({"type": "error", "error": {"type": kind, "message": message}})
        } else {
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Who ended a connection.
enum Ending {
    /// The peer: it closed between requests, or while a request was held.
    Peer,
    /// The mock: after its answer, as scripted, or at its drop.
    Mock,
}

/// Whether the connection was ended by the peer: it said so, or an I/O error shows it
/// closed or reset the connection while the mock read or wrote.
fn ended_by_peer(ended: &io::Result<Ending>) -> bool {
    match ended {
        Ok(Ending::Peer) => true,
        Ok(Ending::Mock) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        ),
    }
}

fn serve_connection(
    stream: TcpStream,
    index: usize,
    shared: &Shared,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<Ending> {
    let _ = stream.set_nodelay(true);
    let mut conn = match tls {
        None => Conn::Plain(stream),
        Some(cfg) => {
            let sc = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(sc, stream)))
        }
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if shared.stopped() {
            return Ok(Ending::Mock);
        }
        let Some(mut req) = read_request(&mut conn, &mut buf)? else {
            return Ok(Ending::Peer);
        };
        shared.requests.lock().unwrap().push(RecordedRequest {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
            connection: index,
        });
        req.chunked_json = shared.chunked_json;
        req.sse = shared.sse;
        req.sse_comments = shared.sse_comments;
        // What a real provider checks before anything else; a refused request leaves the
        // scripted behaviours for the next one.
        let after = match check(&mut req, shared) {
            Some((status, error)) => {
                write_json(&mut conn, &req, status, &error)?;
                After::KeepAlive
            }
            None => respond(&mut conn, &req, shared.next_behavior(), shared)?,
        };
        match after {
            After::KeepAlive if req.keep_alive => continue,
            After::KeepAlive | After::Close => {
                conn.close();
                return Ok(Ending::Mock);
            }
            After::Reset => {
                conn.reset();
                return Ok(Ending::Mock);
            }
            After::Drop => return Ok(Ending::Mock),
            After::PeerClosed => return Ok(Ending::Peer),
        }
    }
}

/// The provider's own checks: the path under its prefix, the credential, Anthropic's
/// version header. An answer (status, error body) when the request fails one.
fn check(req: &mut Request, shared: &Shared) -> Option<(u16, Value)> {
    let prefix = &shared.path_prefix;
    match req.path.strip_prefix(prefix.as_str()) {
        Some(rest) if rest.starts_with('/') => req.path = rest.to_string(),
        _ => {
            return Some((
                404,
                req.error("not_found_error", &format!("no such path: {}", req.path)),
            ))
        }
    }
    req.anthropic = req.path.starts_with("/v1/messages");
    if let Some(credential) = &shared.credential {
        let bearer = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        // Anthropic takes `x-api-key`, or a bearer token (as its newer SDKs send).
        let presented = if req.anthropic {
            req.header("x-api-key").map(str::to_string).or(bearer)
        } else {
            bearer
        };
        if presented.as_deref() != Some(credential.as_str()) {
            let kind = if req.anthropic {
                "authentication_error"
            } else {
                "invalid_request_error"
            };
            return Some((401, req.error(kind, "invalid x-api-key or bearer token")));
        }
    }
    if req.anthropic && req.method == "POST" && req.header("anthropic-version").is_none() {
        return Some((
            400,
            req.error(
                "invalid_request_error",
                "anthropic-version: header is required",
            ),
        ));
    }
    None
}

// ---------------------------------------------------------------- request parsing

const MAX_HEAD: usize = 1 << 20;

fn fill(conn: &mut Conn, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut tmp = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut tmp) {
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn fill_or_eof(conn: &mut Conn, buf: &mut Vec<u8>) -> io::Result<()> {
    if fill(conn, buf)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "mock: peer closed mid-request",
        ));
    }
    Ok(())
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("mock: {msg}"))
}

/// Reads one request; `Ok(None)` on a clean close between requests.
fn read_request(conn: &mut Conn, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let (head_len, method, path, version, headers) = loop {
        if !buf.is_empty() {
            let mut hdrs = [httparse::EMPTY_HEADER; 128];
            let mut r = httparse::Request::new(&mut hdrs);
            match r.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (
                        n,
                        r.method.unwrap_or("").to_string(),
                        r.path.unwrap_or("").to_string(),
                        r.version.unwrap_or(1),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(bad("request head too large"));
                    }
                }
                Err(e) => return Err(bad(&format!("bad request head: {e}"))),
            }
        }
        if fill(conn, buf)? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "mock: peer closed mid-head",
            ));
        }
    };
    buf.drain(..head_len);

    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let has_token = |name: &str, token: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let chunked = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .next_back()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
    let content_length = match get("content-length") {
        Some(v) => Some(
            v.trim()
                .parse::<usize>()
                .map_err(|_| bad("bad content-length"))?,
        ),
        None => None,
    };
    let keep_alive = if version >= 1 {
        !has_token("connection", "close")
    } else {
        has_token("connection", "keep-alive")
    };

    if get("expect").is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
        && (chunked || content_length.unwrap_or(0) > 0)
    {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        conn.flush()?;
    }

    let body = if chunked {
        read_chunked(conn, buf)?
    } else if let Some(n) = content_length {
        while buf.len() < n {
            fill_or_eof(conn, buf)?;
        }
        buf.drain(..n).collect()
    } else {
        Vec::new()
    };
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
        keep_alive,
        anthropic: false,
        chunked_json: false,
        sse: SseWrites::Whole,
        sse_comments: false,
    }))
}

fn read_line(conn: &mut Conn, buf: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("line too long"));
        }
        fill_or_eof(conn, buf)?;
    }
}

fn read_chunked(conn: &mut Conn, buf: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(conn, buf)?;
        let line = String::from_utf8_lossy(&line);
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(conn, buf)?.is_empty() {}
            return Ok(body);
        }
        while buf.len() < size + 2 {
            fill_or_eof(conn, buf)?;
        }
        body.extend(buf.drain(..size));
        if &buf[..2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
        buf.drain(..2);
    }
}

// ---------------------------------------------------------------- responses

enum After {
    /// Response complete; keep the connection if the request allows it.
    KeepAlive,
    /// Close gracefully.
    Close,
    /// Close with RST.
    Reset,
    /// Just drop the connection (already dealt with).
    Drop,
    /// The peer closed the connection while the mock held it.
    PeerClosed,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Status",
    }
}

fn saw_auth(req: &Request) -> String {
    let mut parts = Vec::new();
    if let Some(v) = req.header("authorization") {
        parts.push(format!("authorization:{v}"));
    }
    if let Some(v) = req.header("x-api-key") {
        parts.push(format!("x-api-key:{v}"));
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

/// The head every generated response carries, plus `extra`.
fn head(req: &Request, status: u16, extra: &[(String, String)]) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    // What each provider sends: its request id, and what it says of the account.
    let (request_id, account) = if req.anthropic {
        ("request-id", ANTHROPIC_ACCOUNT_HEADERS)
    } else {
        ("x-request-id", OPENAI_ACCOUNT_HEADERS)
    };
    h.push_str(&format!("{request_id}: req_mock\r\n"));
    for (k, v) in account {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str(&format!("x-mock-saw-auth: {}\r\n", saw_auth(req)));
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if !req.keep_alive {
        h.push_str("connection: close\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn write_fixed(
    conn: &mut Conn,
    req: &Request,
    status: u16,
    content_type: Option<&str>,
    mut extra: Vec<(String, String)>,
    body: &[u8],
) -> io::Result<()> {
    if let Some(ct) = content_type {
        if !extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            extra.push(("content-type".into(), ct.into()));
        }
    }
    extra.retain(|(k, _)| !k.eq_ignore_ascii_case("content-length"));
    extra.push(("content-length".into(), body.len().to_string()));
    let mut out = head(req, status, &extra);
    if req.method != "HEAD" {
        out.extend_from_slice(body);
    }
    conn.write_all(&out)?;
    conn.flush()
}

fn write_json(conn: &mut Conn, req: &Request, status: u16, v: &Value) -> io::Result<()> {
    if req.chunked_json && req.method != "HEAD" {
        let body = v.to_string().into_bytes();
        let extra = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("transfer-encoding".to_string(), "chunked".to_string()),
        ];
        conn.write_all(&head(req, status, &extra))?;
        let (a, b) = body.split_at(body.len() / 2);
        write_chunk(conn, a)?;
        write_chunk(conn, b)?;
        return write_last_chunk(conn);
    }
    write_fixed(
        conn,
        req,
        status,
        Some("application/json"),
        Vec::new(),
        v.to_string().as_bytes(),
    )
}

fn write_stream_head(conn: &mut Conn, req: &Request) -> io::Result<()> {
    let extra = vec![
        ("content-type".to_string(), "text/event-stream".to_string()),
        ("cache-control".to_string(), "no-cache".to_string()),
        ("transfer-encoding".to_string(), "chunked".to_string()),
    ];
    conn.write_all(&head(req, 200, &extra))?;
    conn.flush()
}

fn write_chunk(conn: &mut Conn, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    conn.write_all(&out)?;
    conn.flush()
}

fn write_last_chunk(conn: &mut Conn) -> io::Result<()> {
    conn.write_all(b"0\r\n\r\n")?;
    conn.flush()
}

/// Sleeps `ms`, in steps of at most 50 ms; `false` if the provider was stopped meanwhile.
fn sleep_checked(shared: &Shared, ms: u64) -> bool {
    let mut left = ms;
    while left > 0 {
        if shared.stopped() {
            return false;
        }
        let step = left.min(50);
        std::thread::sleep(Duration::from_millis(step));
        left -= step;
    }
    !shared.stopped()
}

fn stall(shared: &Shared) {
    while sleep_checked(shared, 50) {}
}

/// Writes a stream's events as the provider is set to cut them (see [`SseWrites`]).
struct Sse<'a> {
    conn: &'a mut Conn,
    mode: SseWrites,
    comments: bool,
    pending: Vec<u8>,
}

impl<'a> Sse<'a> {
    /// Sends the stream's head.
    fn start(conn: &'a mut Conn, req: &Request) -> io::Result<Self> {
        write_stream_head(conn, req)?;
        Ok(Self {
            conn,
            mode: req.sse,
            comments: req.sse_comments,
            pending: Vec::new(),
        })
    }

    fn event(&mut self, ev: &[u8]) -> io::Result<()> {
        match self.mode {
            SseWrites::Whole => write_chunk(self.conn, ev)?,
            SseWrites::Split(n) => {
                for piece in ev.chunks(n.max(1)) {
                    write_chunk(self.conn, piece)?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            SseWrites::Merged => self.pending.extend_from_slice(ev),
        }
        if self.comments {
            match self.mode {
                SseWrites::Merged => self.pending.extend_from_slice(b": keep-alive\n\n"),
                _ => write_chunk(self.conn, b": keep-alive\n\n")?,
            }
        }
        Ok(())
    }

    /// Sends what a merged stream holds (before a pause, and at the end).
    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            write_chunk(self.conn, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Waits `ms` between events; `false` if the provider stopped meanwhile.
    fn pause(&mut self, shared: &Shared, ms: u64) -> io::Result<bool> {
        if ms == 0 {
            return Ok(true);
        }
        self.flush()?;
        Ok(sleep_checked(shared, ms))
    }

    fn end(mut self) -> io::Result<()> {
        self.flush()?;
        write_last_chunk(self.conn)
    }
}

fn respond(
    conn: &mut Conn,
    req: &Request,
    behavior: Behavior,
    shared: &Shared,
) -> io::Result<After> {
    let body = serde_json::from_slice::<Value>(&req.body).unwrap_or(Value::Null);
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    match behavior {
        Behavior::OpenAiJson | Behavior::AnthropicJson => json_route(conn, req, &body),
        Behavior::Slow { delay_ms } => {
            if !sleep_checked(shared, delay_ms) {
                return Ok(After::Drop);
            }
            json_route(conn, req, &body)
        }
        Behavior::OpenAiStream { events, delay_ms } => {
            if !streaming {
                return json_route(conn, req, &body);
            }
            if req.path.starts_with("/v1/responses") {
                let mut sse = Sse::start(conn, req)?;
                if !responses_events(&mut sse, shared, &model_of(&body), events, delay_ms)? {
                    return Ok(After::Drop);
                }
                sse.end()?;
                return Ok(After::KeepAlive);
            }
            let include_usage = body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut sse = Sse::start(conn, req)?;
            // As OpenAI streams: a role chunk, the content, a finish chunk; with usage asked
            // for, every chunk says `"usage":null` and a last chunk carries the figures.
            let null = include_usage.then_some("null");
            let with_usage = null.map_or(String::new(), |u| format!(",\"usage\":{u}"));
            let role = format!("data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]{with_usage}}}\n\n");
            sse.event(role.as_bytes())?;
            if !openai_events(&mut sse, shared, events, delay_ms, null)? {
                return Ok(After::Drop);
            }
            let finish = format!("data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{with_usage}}}\n\n");
            sse.event(finish.as_bytes())?;
            if include_usage {
                let usage = format!(
                    "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\n",
                    5 + events
                );
                sse.event(usage.as_bytes())?;
            }
            sse.event(b"data: [DONE]\n\n")?;
            sse.end()?;
            Ok(After::KeepAlive)
        }
        Behavior::AnthropicStream { events, delay_ms } => {
            if !streaming {
                return json_route(conn, req, &body);
            }
            let mut sse = Sse::start(conn, req)?;
            if !anthropic_events(&mut sse, shared, &model_of(&body), events, delay_ms, false)? {
                return Ok(After::Drop);
            }
            sse.end()?;
            Ok(After::KeepAlive)
        }
        Behavior::AnthropicStreamError { events } => {
            let mut sse = Sse::start(conn, req)?;
            anthropic_events(&mut sse, shared, &model_of(&body), events, 0, true)?;
            sse.end()?;
            Ok(After::KeepAlive)
        }
        Behavior::Status {
            status,
            body: text,
            headers,
        } => {
            write_fixed(
                conn,
                req,
                status,
                Some("application/json"),
                headers,
                text.as_bytes(),
            )?;
            Ok(After::KeepAlive)
        }
        Behavior::Stall => {
            stall(shared);
            Ok(After::Drop)
        }
        Behavior::Hold => {
            let mut sink = Vec::new();
            while !shared.stopped() && matches!(fill(conn, &mut sink), Ok(n) if n > 0) {
                sink.clear();
            }
            Ok(After::PeerClosed)
        }
        Behavior::StallAfterEvents { events } => {
            let mut sse = Sse::start(conn, req)?;
            openai_events(&mut sse, shared, events, 0, None)?;
            sse.flush()?;
            stall(shared);
            Ok(After::Drop)
        }
        Behavior::ResetAfterEvents { events } => {
            let mut sse = Sse::start(conn, req)?;
            openai_events(&mut sse, shared, events, 0, None)?;
            sse.flush()?;
            Ok(After::Reset)
        }
        Behavior::CloseBeforeResponse => Ok(After::Close),
        Behavior::Raw(bytes) => {
            conn.write_all(&bytes)?;
            conn.flush()?;
            Ok(After::Close)
        }
    }
}

/// Writes `events` OpenAI chunk events; `false` if the provider stopped meanwhile.
/// `usage`: what OpenAI puts in every chunk's `usage` member once the request asked for
/// usage (`"null"`), or nothing.
fn openai_events(
    sse: &mut Sse<'_>,
    shared: &Shared,
    events: usize,
    delay_ms: u64,
    usage: Option<&str>,
) -> io::Result<bool> {
    let usage = usage.map_or(String::new(), |u| format!(",\"usage\":{u}"));
    for i in 0..events {
        if i > 0 && !sse.pause(shared, delay_ms)? {
            return Ok(false);
        }
        let ev = format!(
            "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]{usage}}}\n\n"
        );
        sse.event(ev.as_bytes())?;
    }
    Ok(true)
}

/// The Responses API's stream: named events, the usage in `response.completed`, no
/// `[DONE]`.
fn responses_events(
    sse: &mut Sse<'_>,
    shared: &Shared,
    model: &str,
    events: usize,
    delay_ms: u64,
) -> io::Result<bool> {
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let response = |status: &str, usage: Value| {
        json!({"id": "resp_mock", "object": "response", "created_at": 1700000000, "status": status,
               "model": model, "output": [], "usage": usage})
    };
    sse.event(
        ev(
            "response.created",
            json!({"type": "response.created", "sequence_number": next(), "response": response("in_progress", Value::Null)}),
        )
        .as_bytes(),
    )?;
    let mut text = String::new();
    for i in 0..events {
        if i > 0 && !sse.pause(shared, delay_ms)? {
            return Ok(false);
        }
        let delta = format!("tok{i} ");
        text.push_str(&delta);
        sse.event(
            ev(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "sequence_number": next(), "item_id": "msg_mock",
                       "output_index": 0, "content_index": 0, "delta": delta}),
            )
            .as_bytes(),
        )?;
    }
    let mut done = response(
        "completed",
        json!({"input_tokens": 5, "output_tokens": events, "total_tokens": 5 + events}),
    );
    done["output"] = json!([{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                              "content": [{"type": "output_text", "text": text, "annotations": []}]}]);
    sse.event(
        ev(
            "response.completed",
            json!({"type": "response.completed", "sequence_number": next(), "response": done}),
        )
        .as_bytes(),
    )?;
    Ok(true)
}

/// Anthropic's stream: message_start, a ping, a text block of `events` deltas, then
/// message_delta (with the output tokens) and message_stop — or, when `fail`, an
/// `event: error` (overloaded) after the deltas.
fn anthropic_events(
    sse: &mut Sse<'_>,
    shared: &Shared,
    model: &str,
    events: usize,
    delay_ms: u64,
    fail: bool,
) -> io::Result<bool> {
    let model = Value::String(model.to_string()).to_string();
    let ev = |name: &str, data: String| format!("event: {name}\ndata: {data}\n\n");
    sse.event(ev(
        "message_start",
        format!(
            "{{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_mock\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{model},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":5,\"output_tokens\":1}}}}}}"
        ),
    ).as_bytes())?;
    sse.event(ev("ping", "{\"type\": \"ping\"}".into()).as_bytes())?;
    sse.event(ev(
        "content_block_start",
        "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}".into(),
    ).as_bytes())?;
    for i in 0..events {
        if !sse.pause(shared, delay_ms)? {
            return Ok(false);
        }
        sse.event(ev(
            "content_block_delta",
            format!(
                "{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i} \"}}}}"
            ),
        ).as_bytes())?;
    }
    if fail {
        sse.event(ev(
            "error",
            "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}".into(),
        ).as_bytes())?;
        return Ok(true);
    }
    sse.event(
        ev(
            "content_block_stop",
            "{\"type\":\"content_block_stop\",\"index\":0}".into(),
        )
        .as_bytes(),
    )?;
    sse.event(ev(
        "message_delta",
        format!(
            "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{events}}}}}"
        ),
    ).as_bytes())?;
    sse.event(ev("message_stop", "{\"type\":\"message_stop\"}".into()).as_bytes())?;
    Ok(true)
}

fn model_of(body: &Value) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string()
}

/// The text of a message `content`: a string, or the concatenated `text` of its parts.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.clone()),
                _ => p.get("text").and_then(Value::as_str).map(str::to_string),
            })
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The last user message's text in `messages` (chat / Anthropic) or `input` (responses).
fn last_user_text(body: &Value) -> String {
    let from_items = |items: &Vec<Value>| {
        items
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
            .map(content_text)
    };
    if let Some(Value::Array(msgs)) = body.get("messages") {
        return from_items(msgs).unwrap_or_default();
    }
    match body.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => from_items(items).unwrap_or_default(),
        _ => String::new(),
    }
}

fn json_route(conn: &mut Conn, req: &Request, body: &Value) -> io::Result<After> {
    let path = req.path.split('?').next().unwrap_or("");
    let model = model_of(body);
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8});
    let v = match (req.method.as_str(), path) {
        ("GET", "/v1/models") => json!({
            "object": "list",
            "data": [
                {"id": "mock-model", "object": "model", "created": 1700000000, "owned_by": "mock"},
                {"id": "mock-model-2", "object": "model", "created": 1700000000, "owned_by": "mock"}
            ]
        }),
        ("POST", "/v1/chat/completions") => json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": format!("echo: {}", last_user_text(body))},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": usage
        }),
        ("POST", "/v1/completions") => {
            let prompt = match body.get("prompt") {
                Some(p) => content_text(p),
                None => String::new(),
            };
            json!({
                "id": "cmpl-mock",
                "object": "text_completion",
                "created": 1700000000,
                "model": model,
                "choices": [{"text": format!("echo: {prompt}"), "index": 0, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage
            })
        }
        ("POST", "/v1/embeddings") => {
            let n = match body.get("input") {
                Some(Value::Array(a)) if !a.is_empty() && !a[0].is_number() => a.len(),
                _ => 1,
            };
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
                .collect();
            json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 5, "total_tokens": 5}})
        }
        ("POST", "/v1/responses") => json!({
            "id": "resp_mock",
            "object": "response",
            "created_at": 1700000000,
            "status": "completed",
            "model": model,
            "output": [{
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": format!("echo: {}", last_user_text(body)), "annotations": []}]
            }],
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
        }),
        ("POST", "/v1/messages") => json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": format!("echo: {}", last_user_text(body))}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 5, "output_tokens": 3}
        }),
        _ => {
            let err = req.error(
                if req.anthropic {
                    "not_found_error"
                } else {
                    "invalid_request_error"
                },
                &format!("mock: no route for {} {}", req.method, req.path),
            );
            write_json(conn, req, 404, &err)?;
            return Ok(After::KeepAlive);
        }
    };
    write_json(conn, req, 200, &v)?;
    Ok(After::KeepAlive)
}
