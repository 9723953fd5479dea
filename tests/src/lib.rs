//! Shared harness for the end-to-end tests: start gateways (in-process or as processes) on
//! port 0 and talk to them over real sockets, byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cp;
pub mod mock;
pub mod pki;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dataplane::config::{Config, DriverChoice};
use dataplane::node::ServerHandle;

/// Runs a test body once per I/O driver: `both_drivers!(name, |driver| { ... });` expands to
/// `mod name { #[test] fn io_uring() ; #[test] fn epoll() }`.
#[macro_export]
macro_rules! both_drivers {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn io_uring() {
                let f: fn(::dataplane::config::DriverChoice) = $body;
                f(::dataplane::config::DriverChoice::IoUring)
            }
            #[test]
            fn epoll() {
                let f: fn(::dataplane::config::DriverChoice) = $body;
                f(::dataplane::config::DriverChoice::Epoll)
            }
        }
    };
}

/// A gateway running in this process on loopback port 0, stopped on drop.
#[derive(Debug)]
pub struct Gateway {
    handle: Option<ServerHandle>,
    /// Directories the gateway uses (a node's identity), removed once it has stopped.
    held: Vec<std::sync::Arc<tempfile::TempDir>>,
}

/// A config for tests: loopback, port 0, two unpinned workers, the given driver.
pub fn test_config(driver: DriverChoice) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.server.workers = 2;
    c.server.pin_workers = false;
    c.server.driver = driver;
    c.log.access = false;
    // Tests drop gateways with streams still open; do not wait long for them.
    c.timeouts.shutdown_drain = Duration::from_secs(1);
    c
}

/// One `[[upstreams]]` entry of a gateway's TOML: `name`, `kind`, `base_url`, then the
/// `extra` lines given (settings of that upstream).
pub fn upstream_toml(name: &str, kind: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nkind = \"{kind}\"\nbase_url = \"{base_url}\"\n{extra}\n"
    )
}

/// The TOML file of a gateway process: loopback, port 0, `workers` unpinned workers, the
/// admin listener, then `extra` (sections of its own).
pub fn process_toml(workers: usize, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = {workers}\npin_workers = false\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"
    )
}

impl Gateway {
    /// A gateway of [`test_config`] with the `[[upstreams]]` and `[[routes]]` of `toml`
    /// (see [`upstream_toml`]), then adjusted by `tweak`.
    pub fn with_toml(driver: DriverChoice, toml: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let parsed = Config::parse(toml, "test").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let mut c = test_config(driver);
        c.upstreams = parsed.upstreams;
        c.routes = parsed.routes;
        tweak(&mut c);
        Self::start_with(c)
    }

    pub fn start(driver: DriverChoice) -> Self {
        Self::start_with(test_config(driver))
    }

    pub fn start_with(config: Config) -> Self {
        let handle = dataplane::node::start(config).expect("gateway starts");
        Self {
            handle: Some(handle),
            held: Vec::new(),
        }
    }

    /// Keeps `dir` until the gateway has stopped.
    pub fn holding(mut self, dir: std::sync::Arc<tempfile::TempDir>) -> Self {
        self.held.push(dir);
        self
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle().addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.handle().admin_addr()
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr())
    }

    /// Stops the gateway gracefully and waits for it.
    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection may carry another request afterwards, by the response's
    /// version, framing and `Connection` header.
    pub keep_alive: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server said it will close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Reads one response, as strictly as the data plane reads an upstream's (its own parser:
/// CRLF line ends, no conflicting framing): Content-Length framed, chunked (decoded; the
/// body is what the chunks carry), or delimited by the close; 1xx responses are returned
/// like any other, with no body. `pending` carries bytes read past the response into the
/// next call. `None` when the connection ends (or the read times out) before the response
/// does; a panic when the response is malformed.
pub fn read_response(stream: &mut impl Read, pending: &mut Vec<u8>) -> Option<Resp> {
    read_response_to(stream, pending, false)
}

/// [`read_response`] for the answer to a HEAD request, which has no body whatever its
/// head announces.
pub fn read_head_response(stream: &mut impl Read, pending: &mut Vec<u8>) -> Option<Resp> {
    read_response_to(stream, pending, true)
}

fn read_response_to(
    stream: &mut impl Read,
    pending: &mut Vec<u8>,
    request_was_head: bool,
) -> Option<Resp> {
    use dataplane::h1::{parse_response_head, ChunkedDecoder, Limits, ResponseFraming};
    let limits = Limits {
        max_body_bytes: u64::MAX,
        max_headers: 256,
        ..Limits::default()
    };
    let mut more = |pending: &mut Vec<u8>| -> Option<()> {
        let mut chunk = [0u8; 16 * 1024];
        let got = stream.read(&mut chunk).ok()?;
        if got == 0 {
            return None;
        }
        pending.extend_from_slice(&chunk[..got]);
        Some(())
    };
    let (status, headers, framing, keep_alive, head_len) = loop {
        let mut storage = [std::mem::MaybeUninit::uninit(); 256];
        match parse_response_head(pending, &mut storage, &limits, request_was_head) {
            Ok(Some(h)) => {
                let headers = h
                    .headers
                    .iter()
                    .map(|f| {
                        (
                            f.name.to_string(),
                            String::from_utf8_lossy(f.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (h.status, headers, h.framing, h.keep_alive, h.head_len);
            }
            Ok(None) => more(pending)?,
            Err(e) => panic!(
                "malformed response ({e}): {:?}",
                String::from_utf8_lossy(pending)
            ),
        }
    };
    pending.drain(..head_len);
    let body = match framing {
        ResponseFraming::None => Vec::new(),
        ResponseFraming::Length(n) => {
            let n = usize::try_from(n).unwrap();
            while pending.len() < n {
                more(pending)?;
            }
            pending.drain(..n).collect()
        }
        ResponseFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(&limits);
            let mut body = Vec::new();
            loop {
                let progress = decoder
                    .decode(pending, &mut body)
                    .unwrap_or_else(|e| panic!("malformed chunked body: {e}"));
                pending.drain(..progress.consumed);
                if progress.done {
                    break body;
                }
                more(pending)?;
            }
        }
        ResponseFraming::UntilClose => {
            while more(pending).is_some() {}
            std::mem::take(pending)
        }
    };
    Some(Resp {
        status,
        headers,
        body,
        keep_alive,
    })
}

/// Reads whatever arrives until the peer closes or resets the connection, or `stop` (when
/// not empty) has arrived: for streams read in part, or cut short. Panics if nothing ends
/// it within the stream's read timeout.
pub fn read_until(stream: &mut impl Read, stop: &str) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                break
            }
            Err(e) => panic!(
                "{e} before the stream ended; read so far: {}",
                String::from_utf8_lossy(&all)
            ),
        }
        if !stop.is_empty() && String::from_utf8_lossy(&all).contains(stop) {
            break;
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Sends `raw` on a new connection and reads one response.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Resp {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_response(&mut s, &mut Vec::new()).expect("a response")
}

/// A TLS client connection to `addr` (TLS 1.3, by the data plane's own client settings),
/// trusting the CA certificates of `ca_pem`, naming the server `name`, and presenting
/// `identity` (a node's certificate) when given: the TLS client of the node link and of
/// providers. The handshake runs on the first read or write.
pub fn tls_connect(
    ca_pem: &[u8],
    name: &str,
    addr: SocketAddr,
    identity: Option<&dataplane::config::identity::Identity>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = dataplane::config::identity::client_config(&roots, identity).unwrap();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = connect(addr);
    tcp.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// An HTTPS client's TLS settings: `versions` only, ALPN `http/1.1`, trusting only the CA
/// certificates of `ca_pem`, presenting no certificate.
pub fn https_client_config(
    ca_pem: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// A TLS connection to `addr` with `config`, naming the server `name`; the handshake runs
/// on the first read or write.
pub fn tls_connect_with(
    config: std::sync::Arc<rustls::ClientConfig>,
    name: &str,
    addr: SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = connect(addr);
    tcp.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Sends `raw` over HTTPS (TLS 1.3, trusting the CA certificates of `ca_pem`, naming the
/// server `name`) on a new connection to `addr` and reads one response: the admin API's
/// client.
pub fn exchange_tls(ca_pem: &[u8], name: &str, addr: SocketAddr, raw: &[u8]) -> Resp {
    let config = https_client_config(ca_pem, &[&rustls::version::TLS13]);
    let mut s = tls_connect_with(config, name, addr);
    s.write_all(raw)
        .unwrap_or_else(|e| panic!("TLS to {addr} as {name}: {e}"));
    read_response(&mut s, &mut Vec::new()).expect("a response")
}

/// True when the peer has closed the connection (EOF, or a reset) within `within`.
pub fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    matches!(stream.read(&mut b), Ok(0) | Err(_))
        && !matches!(stream.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A raw HTTP/1.1 request: the request line, `Host`, the `headers` given (each line ending
/// in CRLF), and, with a body (or for a POST or PUT), its `Content-Length`. The one
/// request builder of these tests.
pub fn request(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    let length = if body.is_empty() && method != "POST" && method != "PUT" {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!("{method} {path} HTTP/1.1\r\nHost: gw\r\n{headers}{length}\r\n{body}").into_bytes()
}

/// A POST of the JSON `body` to `path` with the `headers` given (see [`request`]).
pub fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    request(
        "POST",
        path,
        &format!("Content-Type: application/json\r\n{headers}"),
        body,
    )
}

/// The header lines presenting an API key, as OpenAI's clients do (`Authorization:
/// Bearer`), with the `anthropic-version` Anthropic's API requires (OpenAI's ignores it).
pub fn key_headers(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\nanthropic-version: 2023-06-01\r\n")
}

/// A POST of `body` (JSON text, or a `serde_json::Value`) to `path` on the gateway at `gw`,
/// presenting `key` (see [`key_headers`]), on a connection of its own; its answer.
pub fn post_with_key(
    gw: SocketAddr,
    key: &str,
    path: &str,
    body: &(impl std::fmt::Display + ?Sized),
) -> Resp {
    exchange(gw, &post(path, &key_headers(key), &body.to_string()))
}

/// A JSON chat request in OpenAI's shape.
pub fn chat_request(body: &str) -> Vec<u8> {
    post("/v1/chat/completions", "", body)
}

pub const CHAT_BODY: &str = r#"{"model":"demo","messages":[{"role":"user","content":"hello"}]}"#;

/// The events of a server-sent event stream as (event name, data), cut and read by the
/// data plane's own SSE framer (WHATWG rules: CRLF, CR or LF line ends, multi-line data),
/// which is independent of the mock that writes them. Comments and keep-alives, which
/// carry no data, are left out.
pub fn sse_events(body: &[u8]) -> Vec<(String, String)> {
    let mut framer = dataplane::h1::sse::SseFramer::new(usize::MAX);
    let mut raw = Vec::new();
    framer
        .feed(body, |event, _| raw.push(event.to_vec()))
        .unwrap();
    assert!(
        framer.incomplete().is_empty(),
        "the stream ends inside an event: {:?}",
        String::from_utf8_lossy(framer.incomplete())
    );
    raw.iter()
        .map(|e| dataplane::h1::sse::SseEvent::parse(e))
        .filter(|e| e.data.is_some())
        .map(|e| {
            (
                String::from_utf8_lossy(e.event).into_owned(),
                String::from_utf8_lossy(e.data()).into_owned(),
            )
        })
        .collect()
}

/// The text an OpenAI chat stream carries: every chunk's `choices[0].delta.content`, in
/// order.
pub fn chat_stream_text(body: &[u8]) -> String {
    sse_events(body)
        .iter()
        .filter(|(_, data)| data != "[DONE]")
        .filter_map(|(_, data)| {
            let v: serde_json::Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("an event's data is not JSON ({e}): {data}"));
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// GET on the admin listener.
pub fn admin_get(addr: SocketAddr, path: &str) -> Resp {
    exchange(addr, &request("GET", path, "Connection: close\r\n", ""))
}

/// Each worker's state as the admin listener's `/workers` reports it.
pub fn workers(admin: SocketAddr) -> Vec<serde_json::Value> {
    match admin_get(admin, "/workers").json()["workers"].take() {
        serde_json::Value::Array(w) => w,
        other => panic!("/workers has no workers: {other}"),
    }
}

/// Runs `send` (one request to the gateway whose admin listener is `admin`, nothing else
/// in flight) and returns which worker answered it, by the worker whose count of finished
/// requests rose, with what `send` returned.
pub fn answered_by<R>(admin: SocketAddr, send: impl FnOnce() -> R) -> (usize, R) {
    let counts = || -> Vec<u64> {
        workers(admin)
            .iter()
            .map(|w| w["requests"].as_u64().unwrap())
            .collect()
    };
    let before = counts();
    let out = send();
    let mut after = counts();
    assert!(
        wait_until(Duration::from_secs(20), || {
            after = counts();
            after.iter().sum::<u64>() > before.iter().sum::<u64>()
        }),
        "no worker counted the request"
    );
    let moved: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    assert_eq!(moved.len(), 1, "requests counted {before:?} → {after:?}");
    (moved[0], out)
}

/// Sends `send` on new connections until each worker of the gateway has answered one (new
/// connections are spread over the workers by the kernel, `SO_REUSEPORT`), and calls
/// `check` with every answer: for a change every worker must apply.
pub fn on_every_worker<R>(
    admin: SocketAddr,
    mut send: impl FnMut() -> R,
    mut check: impl FnMut(&R),
) {
    let n = workers(admin).len();
    let mut seen = vec![false; n];
    for _ in 0..500 {
        let (worker, out) = answered_by(admin, &mut send);
        check(&out);
        seen[worker] = true;
        if seen.iter().all(|&s| s) {
            return;
        }
    }
    panic!("500 connections never reached every worker: {seen:?}");
}

/// Bytes of request bodies the workers hold reserved against their budget, in all: more
/// than zero once a request's head is read and its body is awaited (it is in flight).
pub fn body_bytes(admin: SocketAddr) -> u64 {
    workers(admin)
        .iter()
        .map(|w| w["body_bytes"].as_u64().unwrap())
        .sum()
}

/// Waits until the workers hold exactly `bytes` of request bodies reserved (see
/// [`body_bytes`]): a body's reservation made, or every reservation returned.
pub fn wait_body_bytes(admin: SocketAddr, bytes: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || body_bytes(admin) == bytes),
        "the workers hold {} bytes of bodies, not {bytes}",
        body_bytes(admin)
    );
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Path of a workspace binary, built on first use if a plain `cargo test` did not build it.
pub fn bin_path(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let path = dir.join(name);
    BUILT.get_or_init(|| {
        if !path.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--bin", name])
                .status()
                .expect("cargo build");
            assert!(status.success(), "building {name}");
        }
    });
    path
}

/// A gateway process started from the real binary; killed on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stderr_log: PathBuf,
}

impl GatewayProcess {
    /// Starts `dataplane --config <file>` and waits for its "listening" line.
    pub fn start(config_toml: &str, dir: &std::path::Path) -> Self {
        Self::start_with_env(config_toml, dir, &[])
    }

    /// [`GatewayProcess::start`] with these variables set for it (and only for it: a
    /// variable set in this process would race other tests' threads).
    pub fn start_with_env(config_toml: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let cfg = dir.join("dataplane.toml");
        std::fs::write(&cfg, config_toml).unwrap();
        let log = dir.join("dataplane.log");
        let child = Command::new(bin_path("dataplane"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn dataplane");
        let mut addrs = None;
        wait_until(Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            addrs = text.lines().find(|l| l.contains(" listening ")).map(|l| {
                (
                    field(l, "addr=").parse().unwrap(),
                    field(l, "admin=").parse().unwrap(),
                )
            });
            addrs.is_some()
        });
        let (addr, admin_addr) = addrs.unwrap_or_else(|| {
            panic!(
                "no listening line: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Self {
            child,
            addr,
            admin_addr,
            stderr_log: log,
        }
    }

    pub fn signal(&self, sig: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on a child we spawned and still own; no memory is involved.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `key` in a log line, up to the next space.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(key).map(|i| i + key.len()).unwrap_or(line.len());
    let rest = &line[start..];
    rest.split_whitespace().next().unwrap_or("")
}

/// A fresh scratch directory under the target dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .unwrap()
        .join("e2e-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `secret` to a new private file (mode 0600) in a directory of its own, as a
/// secret is passed to a gateway: a setting naming the file, never a variable set in the
/// test process, which would race other tests' threads.
pub fn secret_file(name: &str, secret: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch_dir(&format!("secret-{name}-{n}"));
    let path = dir.join(name);
    dataplane::seal::files::write_private(&path, secret.as_bytes()).unwrap();
    path
}

/// An upstream address that refuses every connection: port 1 on loopback, where nothing
/// listens (binding it needs privileges no test takes), unlike a port bound and released,
/// which a parallel test may take.
pub const DEAD_UPSTREAM: &str = "http://127.0.0.1:1";

/// The Python with the official OpenAI and Anthropic SDKs: `AIGW_SDK_PYTHON`, else the
/// virtualenv `.ci/setup` makes in `target/sdk-venv`.
pub fn sdk_python() -> PathBuf {
    if let Ok(p) = std::env::var("AIGW_SDK_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join("target/sdk-venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run `bash .ci/setup` to install the SDKs",
        p.display()
    );
    p
}

/// Runs `tests/sdk/<script>` with `args`; asserts it succeeded and printed `ok …`, and
/// returns what it printed.
pub fn run_sdk_script(script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sdk")
        .join(script);
    let out = Command::new(sdk_python())
        .arg(&path)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.starts_with("ok "),
        "{script} {args:?} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

/// What testssl.sh found, as (id, finding).
#[derive(Debug)]
pub struct Findings(pub Vec<(String, String)>);

impl Findings {
    /// The finding `id`; a missing one fails the test.
    pub fn get(&self, id: &str) -> &str {
        self.0
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, f)| f.as_str())
            .unwrap_or_else(|| panic!("no {id} in {:?}", self.0))
    }

    /// Only TLS 1.3 offered, and HSTS for two years covering subdomains.
    pub fn assert_tls13_only_with_hsts(&self) {
        for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"] {
            assert_eq!(self.get(old), "not offered", "{old}");
        }
        assert!(self.get("TLS1_3").starts_with("offered"), "{:?}", self.0);
        assert!(
            self.get("HSTS_time").starts_with("730 days"),
            "{:?}",
            self.0
        );
        assert_eq!(self.get("HSTS_subdomains"), "includes subdomains");
    }
}

/// testssl.sh (the Debian package `.ci/setup` installs) against `url`, checking protocols
/// and HTTP headers only.
pub fn testssl(url: &str) -> Findings {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("findings.json");
    let out = Command::new("testssl")
        .args(["--protocols", "--headers", "--quiet", "--color", "0"])
        .args(["--warnings", "off", "--jsonfile"])
        .arg(&json)
        .arg(url)
        .output()
        .expect("testssl is installed (bash .ci/setup)");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "testssl wrote no findings ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let found: serde_json::Value = serde_json::from_str(&text).unwrap();
    Findings(
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["id"].as_str().unwrap_or_default().to_string(),
                    f["finding"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}
