//! The mock LLM provider, talked to directly over std sockets (and rustls for TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use e2e::mock::{Behavior, MockOptions, MockProvider, SseWrites};
use e2e::run_sdk_script;

/// A parsed response: status, headers, de-chunked body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn connect(p: &MockProvider) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn fill<S: Read>(s: &mut S, buf: &mut Vec<u8>) {
    let mut tmp = [0u8; 8192];
    let n = s.read(&mut tmp).unwrap();
    assert!(
        n > 0,
        "unexpected EOF; have {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&tmp[..n]);
}

/// Reads one response (Content-Length or chunked body) from `s`, keeping leftovers in `buf`.
fn read_response<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> Resp {
    let (n, status, headers) = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hdrs);
        if let httparse::Status::Complete(n) = r.parse(buf).unwrap() {
            let headers = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            break (n, r.code.unwrap(), headers);
        }
        fill(s, buf);
    };
    buf.drain(..n);
    let get = |k: &str| {
        headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let body = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            while !buf.windows(2).any(|w| w == b"\r\n") {
                fill(s, buf);
            }
            let i = buf.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..i]).unwrap().trim(), 16).unwrap();
            buf.drain(..i + 2);
            while buf.len() < size + 2 {
                fill(s, buf);
            }
            body.extend(buf.drain(..size));
            assert_eq!(&buf[..2], b"\r\n");
            buf.drain(..2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let len: usize = get("content-length").unwrap().parse().unwrap();
        while buf.len() < len {
            fill(s, buf);
        }
        buf.drain(..len).collect()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn post(path: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn roundtrip(p: &MockProvider, req: &str) -> Resp {
    let mut s = connect(p);
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s, &mut Vec::new())
}

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}]}"#;

/// The mock records each request as it came, and refuses what the real APIs refuse: a
/// missing or wrong credential (401, in the API's error shape), an Anthropic request
/// without `anthropic-version` (400), a path outside its prefix (404).
#[test]
fn requests_are_recorded_and_checked_as_providers_check_them() {
    let p = MockProvider::start(MockOptions {
        credential: Some("sk-test".into()),
        path_prefix: "/openai".into(),
        ..Default::default()
    });
    assert!(p.base_url().ends_with("/openai"));
    let r = roundtrip(
        &p,
        &post(
            "/openai/v1/chat/completions",
            "Authorization: Bearer sk-test\r\nX-Custom-Case: Yes\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    let reqs = p.requests();
    assert_eq!(reqs[0].path, "/openai/v1/chat/completions");
    assert_eq!(reqs[0].body, CHAT.as_bytes());
    assert!(reqs[0]
        .headers
        .iter()
        .any(|(k, v)| k == "X-Custom-Case" && v == "Yes"));

    // Outside the prefix; a wrong and a missing credential.
    let r = roundtrip(
        &p,
        &post(
            "/v1/chat/completions",
            "Authorization: Bearer sk-test\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 404);
    let r = roundtrip(
        &p,
        &post(
            "/openai/v1/chat/completions",
            "Authorization: Bearer sk-nope\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]["message"].is_string(),
        "OpenAI's shape: {}",
        r.text()
    );
    let r = roundtrip(&p, &post("/openai/v1/chat/completions", "", CHAT));
    assert_eq!(r.status, 401);

    // Anthropic: the credential in x-api-key (or as a bearer token), its error shape, its
    // version header.
    let r = roundtrip(
        &p,
        &post(
            "/openai/v1/messages",
            "x-api-key: sk-nope\r\nanthropic-version: 2023-06-01\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = roundtrip(
        &p,
        &post("/openai/v1/messages", "x-api-key: sk-test\r\n", CHAT),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
    let r = roundtrip(
        &p,
        &post(
            "/openai/v1/messages",
            "x-api-key: sk-test\r\nanthropic-version: 2023-06-01\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 200);
    // Each API's own headers: its request id and organisation.
    assert_eq!(r.header("request-id"), Some("req_mock"));
    assert_eq!(r.header("anthropic-organization-id"), Some("org-mock"));
    assert_eq!(r.header("x-request-id"), None);
    assert_eq!(p.request_count(), 7, "refused requests are recorded too");
}

/// The official SDKs accept what the mock sends — JSON, streams of each API family,
/// usage — however its streams are cut into writes: the mock's shapes are the real ones.
#[test]
fn the_official_sdks_accept_what_the_mock_sends() {
    for sse in [SseWrites::Whole, SseWrites::Split(7), SseWrites::Merged] {
        for (api, default) in [
            (
                "openai",
                Behavior::OpenAiStream {
                    events: 3,
                    delay_ms: 0,
                },
            ),
            (
                "responses",
                Behavior::OpenAiStream {
                    events: 3,
                    delay_ms: 0,
                },
            ),
            (
                "anthropic",
                Behavior::AnthropicStream {
                    events: 3,
                    delay_ms: 0,
                },
            ),
        ] {
            let p = MockProvider::start(MockOptions {
                default,
                credential: Some("sk-provider".into()),
                sse,
                sse_comments: sse == SseWrites::Merged,
                chunked_json: sse == SseWrites::Split(7),
                ..Default::default()
            });
            let out = run_sdk_script("conformance.py", &[&p.base_url(), api, "sk-provider", "m"]);
            assert!(
                out.contains("wrong credential refused: true"),
                "{api} {sse:?}: {out}"
            );
        }
    }
}

/// The stream is cut as asked: `Split(n)` sends no chunk over n bytes, `Merged` several
/// events in one chunk.
#[test]
fn streams_are_cut_as_asked() {
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let chunk_sizes = |sse| {
        let p = MockProvider::start(MockOptions {
            default: Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            },
            sse,
            ..Default::default()
        });
        let mut s = connect(&p);
        s.write_all(post("/v1/chat/completions", "", stream).as_bytes())
            .unwrap();
        let mut raw = Vec::new();
        let mut tmp = [0u8; 4096];
        while !raw.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut tmp).unwrap();
            assert!(n > 0);
            raw.extend_from_slice(&tmp[..n]);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let mut sizes = Vec::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                break;
            }
            sizes.push((size, after[..size].matches("data: ").count()));
            rest = &after[size + 2..];
        }
        sizes
    };
    let split = chunk_sizes(SseWrites::Split(7));
    assert!(split.iter().all(|&(n, _)| n <= 7), "{split:?}");
    let merged = chunk_sizes(SseWrites::Merged);
    assert_eq!(merged.len(), 1, "{merged:?}");
    assert!(merged[0].1 >= 5, "every event in one chunk: {merged:?}");
    let whole = chunk_sizes(SseWrites::Whole);
    assert!(whole.iter().all(|&(_, events)| events == 1), "{whole:?}");
}

#[test]
fn keep_alive_reuses_one_connection() {
    let p = MockProvider::start(MockOptions::default());
    let mut s = connect(&p);
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
            .unwrap();
        let r = read_response(&mut s, &mut buf);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
    }
    assert_eq!(p.request_count(), 2);
    assert_eq!(p.connections_accepted(), 1);
    assert!(p.requests().iter().all(|r| r.connection == 0));
}

#[test]
fn chunked_request_body_is_accepted() {
    let p = MockProvider::start(MockOptions::default());
    let (a, b) = CHAT.split_at(20);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let r = roundtrip(&p, &req);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert_eq!(p.requests()[0].body, CHAT.as_bytes());
}

#[test]
fn scripted_queue_503_then_200() {
    let p = MockProvider::start(MockOptions::default());
    p.push_behavior(Behavior::Status {
        status: 503,
        body: r#"{"error":"overloaded"}"#.into(),
        headers: vec![("retry-after".into(), "1".into())],
    });
    let mut s = connect(&p);
    let mut buf = Vec::new();
    s.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
        .unwrap();
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.text(), r#"{"error":"overloaded"}"#);
    s.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
        .unwrap();
    let r = read_response(&mut s, &mut buf);
    assert_eq!(r.status, 200);
    assert_eq!(p.request_count(), 2);
}

#[test]
fn failure_behaviours() {
    let p = MockProvider::start(MockOptions::default());
    let stream_body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    // Close before response: EOF with nothing read.
    p.push_behavior(Behavior::CloseBeforeResponse);
    let mut s = connect(&p);
    s.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());

    // Raw bytes, then close.
    p.push_behavior(Behavior::Raw(b"HTTP/1.1 200 OK\r\nbroken".to_vec()));
    let mut s = connect(&p);
    s.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nbroken");

    // Reset after events: some events, then an error (RST), not a clean EOF.
    p.push_behavior(Behavior::ResetAfterEvents { events: 2 });
    let mut s = connect(&p);
    s.write_all(post("/v1/chat/completions", "", stream_body).as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let res = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(
        res.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{text}"
    );
    assert!(!text.contains("0\r\n\r\n"), "{text}");

    // Stall after events: events arrive, then nothing.
    p.push_behavior(Behavior::StallAfterEvents { events: 1 });
    let mut s = connect(&p);
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s.write_all(post("/v1/chat/completions", "", stream_body).as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let mut tmp = [0u8; 4096];
    let err = loop {
        match s.read(&mut tmp) {
            Ok(0) => panic!("stalled connection closed"),
            Ok(n) => out.extend_from_slice(&tmp[..n]),
            Err(e) => break e,
        }
    };
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    assert!(String::from_utf8_lossy(&out).contains("tok0"));

    // Dropping the provider ends the stall: the socket closes.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    drop(p);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn tls_json_request() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let p = MockProvider::start(MockOptions {
        tls: true,
        default: Behavior::OpenAiJson,
        ..Default::default()
    });
    assert!(p.base_url().starts_with("https://localhost:"));
    let dir = std::env::temp_dir();
    let ca_file = p.write_ca_file(&dir);
    assert_eq!(std::fs::read_to_string(&ca_file).unwrap(), p.ca_pem());
    let _ = std::fs::remove_file(ca_file);

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(p.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let cfg = Arc::new(cfg);

    for name in ["localhost", "127.0.0.1"] {
        let conn = rustls::ClientConnection::new(
            cfg.clone(),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, connect(&p));
        let mut buf = Vec::new();
        for _ in 0..2 {
            tls.write_all(
                post("/v1/chat/completions", "Authorization: Bearer t\r\n", CHAT).as_bytes(),
            )
            .unwrap();
            let r = read_response(&mut tls, &mut buf);
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-mock-saw-auth"), Some("authorization:Bearer t"));
            assert_eq!(
                r.json()["choices"][0]["message"]["content"],
                "echo: hello there"
            );
        }
    }
    assert_eq!(p.request_count(), 4);
    assert_eq!(p.connections_accepted(), 2);
}
