//! The mock LLM provider, talked to directly over std sockets (and rustls for TLS), and
//! checked against what does not come from it: the official SDKs (conformance.py), and the
//! data plane's own strict upstream response parser, SSE framer and usage extractors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use aigw_wire::ProviderKind;
use dataplane::adapters::{usage_from_event, usage_from_json, Usage};
use e2e::mock::{Behavior, MockOptions, MockProvider, SseWrites};
use e2e::*;

// Every answer here is read by `e2e::read_response`, the data plane's own strict upstream
// response parser and chunked decoder: a framing the gateway would refuse fails the test.

fn connect(p: &MockProvider) -> TcpStream {
    e2e::connect(p.addr())
}

/// Usage as the data plane reads it from a JSON answer: 5 input tokens and 3 output, as
/// the mock reports for every answer.
fn reported(input_tokens: u64, output_tokens: u64) -> Usage {
    Usage {
        input_tokens,
        output_tokens,
        reported: true,
        ..Usage::default()
    }
}

/// Usage as the data plane folds it from a stream's events.
fn stream_usage(kind: ProviderKind, body: &[u8]) -> Usage {
    let mut usage = Usage::default();
    for (event, data) in sse_events(body) {
        usage_from_event(kind, event.as_bytes(), data.as_bytes(), &mut usage);
    }
    usage
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
    let r = exchange(
        p.addr(),
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
    assert_eq!(
        usage_from_json(ProviderKind::Openai, &r.body),
        reported(5, 3)
    );
    let reqs = p.requests();
    assert_eq!(reqs[0].path, "/openai/v1/chat/completions");
    assert_eq!(reqs[0].body, CHAT.as_bytes());
    assert!(reqs[0]
        .headers
        .iter()
        .any(|(k, v)| k == "X-Custom-Case" && v == "Yes"));

    // Outside the prefix; a wrong and a missing credential.
    let r = exchange(
        p.addr(),
        &post(
            "/v1/chat/completions",
            "Authorization: Bearer sk-test\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 404);
    let r = exchange(
        p.addr(),
        &post(
            "/openai/v1/chat/completions",
            "Authorization: Bearer sk-nope\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 401);
    // OpenAI's error shape, as its API reference gives it.
    let error = &r.json()["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "OpenAI's shape: {}", r.text());
    }
    let r = exchange(p.addr(), &post("/openai/v1/chat/completions", "", CHAT));
    assert_eq!(r.status, 401);

    // Anthropic: the credential in x-api-key (or as a bearer token), its error shape, its
    // version header.
    let r = exchange(
        p.addr(),
        &post(
            "/openai/v1/messages",
            "x-api-key: sk-nope\r\nanthropic-version: 2023-06-01\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = exchange(
        p.addr(),
        &post("/openai/v1/messages", "x-api-key: sk-test\r\n", CHAT),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
    let r = exchange(
        p.addr(),
        &post(
            "/openai/v1/messages",
            "x-api-key: sk-test\r\nanthropic-version: 2023-06-01\r\n",
            CHAT,
        ),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        usage_from_json(ProviderKind::Anthropic, &r.body),
        reported(5, 3)
    );
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

/// The stream is cut as asked — `Split(n)` sends no chunk over n bytes, `Merged` several
/// events in one chunk — and however it is cut, the data plane's SSE framer reads the same
/// events from it, and its usage extractor the same figures, for each API family.
#[test]
fn streams_are_cut_as_asked() {
    let stream = |model: &str| {
        format!(
            r#"{{"model":"{model}","max_tokens":8,"stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hi"}}],"input":"hi"}}"#
        )
    };
    // (chunk sizes with the events each holds, the decoded body)
    let cut = |sse, default, path: &str| {
        let p = MockProvider::start(MockOptions {
            default,
            sse,
            ..Default::default()
        });
        let mut s = connect(&p);
        s.write_all(&post(
            path,
            "anthropic-version: 2023-06-01\r\n",
            &stream("m"),
        ))
        .unwrap();
        let raw = read_until(&mut s, "\r\n0\r\n\r\n").into_bytes();
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut sizes = Vec::new();
        let mut rest = &raw[head_end..];
        loop {
            let Ok(httparse::Status::Complete((at, size))) = httparse::parse_chunk_size(rest)
            else {
                panic!("bad chunk: {:?}", String::from_utf8_lossy(rest))
            };
            if size == 0 {
                break;
            }
            let data = &rest[at..at + size as usize];
            let events = String::from_utf8_lossy(data).matches("data: ").count();
            sizes.push((size as usize, events));
            rest = &rest[at + size as usize + 2..];
        }
        let body = read_response(&mut &raw[..], &mut Vec::new()).unwrap().body;
        (sizes, body)
    };
    let families = [
        (
            ProviderKind::Openai,
            "/v1/chat/completions",
            Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            },
        ),
        (
            ProviderKind::Openai,
            "/v1/responses",
            Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            },
        ),
        (
            ProviderKind::Anthropic,
            "/v1/messages",
            Behavior::AnthropicStream {
                events: 3,
                delay_ms: 0,
            },
        ),
    ];
    for (kind, path, default) in families {
        let (whole, whole_body) = cut(SseWrites::Whole, default.clone(), path);
        assert!(
            whole.iter().all(|&(_, events)| events == 1),
            "{path}: {whole:?}"
        );
        let events = sse_events(&whole_body);
        assert!(events.len() >= 5, "{path}: {events:?}");
        assert_eq!(stream_usage(kind, &whole_body), reported(5, 3), "{path}");

        let (split, split_body) = cut(SseWrites::Split(7), default.clone(), path);
        assert!(split.iter().all(|&(n, _)| n <= 7), "{path}: {split:?}");
        assert_eq!(sse_events(&split_body), events, "{path}");

        let (merged, merged_body) = cut(SseWrites::Merged, default, path);
        assert_eq!(merged.len(), 1, "{path}: {merged:?}");
        assert_eq!(sse_events(&merged_body), events, "{path}");
    }
}

#[test]
fn keep_alive_reuses_one_connection() {
    let p = MockProvider::start(MockOptions::default());
    let mut s = connect(&p);
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(&post("/v1/chat/completions", "", CHAT))
            .unwrap();
        let r = read_response(&mut s, &mut buf).unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.keep_alive,
            "the data plane would not reuse the connection"
        );
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
    let r = exchange(p.addr(), req.as_bytes());
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
    s.write_all(&post("/v1/chat/completions", "", CHAT))
        .unwrap();
    let r = read_response(&mut s, &mut buf).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.text(), r#"{"error":"overloaded"}"#);
    s.write_all(&post("/v1/chat/completions", "", CHAT))
        .unwrap();
    let r = read_response(&mut s, &mut buf).unwrap();
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
    s.write_all(&post("/v1/chat/completions", "", CHAT))
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());

    // Raw bytes, then close.
    p.push_behavior(Behavior::Raw(b"HTTP/1.1 200 OK\r\nbroken".to_vec()));
    let mut s = connect(&p);
    s.write_all(&post("/v1/chat/completions", "", CHAT))
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nbroken");

    // Reset after events: some events, then an error (RST), not a clean EOF.
    p.push_behavior(Behavior::ResetAfterEvents { events: 2 });
    let mut s = connect(&p);
    s.write_all(&post("/v1/chat/completions", "", stream_body))
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
    s.write_all(&post("/v1/chat/completions", "", stream_body))
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

    // Dropping the provider ends the stall: the socket closes, and no more events come.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    drop(p);
    let rest = read_until(&mut s, "");
    assert!(!rest.contains("tok1"), "{rest}");
}

#[test]
fn tls_json_request() {
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

    for name in ["localhost", "127.0.0.1"] {
        let mut tls = tls_connect(p.ca_pem().as_bytes(), name, p.addr(), None);
        let mut buf = Vec::new();
        for _ in 0..2 {
            tls.write_all(&post(
                "/v1/chat/completions",
                "Authorization: Bearer t\r\n",
                CHAT,
            ))
            .unwrap();
            let r = read_response(&mut tls, &mut buf).unwrap();
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
