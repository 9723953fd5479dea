//! The gateway in front of mock providers: routing, adapters, the body pipeline, failover,
//! streaming and upstream TLS, over real sockets, under io_uring and epoll.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use dataplane::config::{Config, DriverChoice};
use e2e::mock::{Behavior, MockOptions, MockProvider};
use e2e::*;

const CRED: &str = "sk-upstream-credential-123";

/// The secret file holding [`CRED`].
fn cred_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| secret_file("proxy-upstream-credential", CRED))
}

/// A gateway with the given upstreams (name, kind, base_url, extra TOML), each presenting
/// [`CRED`], and routes TOML.
fn gateway(
    driver: DriverChoice,
    upstreams: &[(&str, &str, String, &str)],
    routes: &str,
    tweak: impl FnOnce(&mut Config),
) -> Gateway {
    let credential = format!("credential_file = \"{}\"", cred_file().display());
    let mut toml = String::new();
    for (name, kind, url, extra) in upstreams {
        toml.push_str(&upstream_toml(
            name,
            kind,
            url,
            &format!("{credential}\n{extra}"),
        ));
    }
    toml.push_str(routes);
    Gateway::with_toml(driver, &toml, tweak)
}

fn one_openai(driver: DriverChoice, mock: &MockProvider) -> Gateway {
    gateway(
        driver,
        &[("oa", "openai", mock.base_url(), "")],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
        |_| {},
    )
}

fn chat(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hello"}}]}}"#
    )
}

both_drivers!(
    openai_request_is_forwarded_with_the_upstream_credential_only,
    |driver| {
        let mock = MockProvider::start(MockOptions::default());
        let gw = one_openai(driver, &mock);
        let raw = post("/v1/chat/completions?trace=1", "Authorization: Bearer sk-client-secret\r\nX-Api-Key: sk-client-other\r\nCookie: s=1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nAccept-Encoding: gzip\r\nUser-Agent: OpenAI/Python 1.0\r\n", &chat("gpt-x", false));
        let r = exchange(gw.addr(), &raw);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hello");
        assert_eq!(
            r.header("x-mock-saw-auth"),
            Some(format!("authorization:Bearer {CRED}").as_str())
        );
        // Provider account details never reach the client; its request id is relayed renamed.
        for (h, _) in e2e::mock::OPENAI_ACCOUNT_HEADERS {
            assert!(r.header(h).is_none(), "{h} must be stripped");
        }
        assert_eq!(r.header("x-upstream-request-id"), Some("req_mock"));
        assert_eq!(r.header("x-request-id").map(str::len), Some(32));

        let seen = &mock.requests()[0];
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path, "/v1/chat/completions?trace=1");
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {CRED}").as_str())
        );
        let all = format!("{:?}", seen.headers);
        assert!(
            !all.contains("sk-client"),
            "the client's key never goes upstream: {all}"
        );
        for h in ["x-api-key", "cookie", "x-hop", "accept-encoding", "expect"] {
            assert!(seen.header(h).is_none(), "{h} must not be forwarded");
        }
        assert_eq!(
            seen.header("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(seen.header("user-agent"), Some("OpenAI/Python 1.0"));
        assert_eq!(seen.header("host"), Some(mock.addr().to_string().as_str()));
        assert_eq!(seen.json().unwrap()["model"], "gpt-x");
    }
);

both_drivers!(anthropic_request_gets_x_api_key_and_a_version, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::AnthropicJson,
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[("an", "anthropic", mock.base_url(), "")],
        "[[routes]]\nprefix = \"claude\"\ntargets = [{ upstream = \"an\" }]\n",
        |_| {},
    );
    let body =
        r#"{"model":"claude-x","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = exchange(
        gw.addr(),
        &post("/v1/messages", "x-api-key: sk-ant-client\r\n", body),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["content"][0]["text"], "echo: hi");
    let seen = &mock.requests()[0];
    assert_eq!(seen.header("x-api-key"), Some(CRED));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    let r = exchange(
        gw.addr(),
        &post(
            "/v1/messages",
            "anthropic-version: 2099-01-01\r\nanthropic-beta: b1\r\n",
            body,
        ),
    );
    assert_eq!(r.status, 200);
    let seen = &mock.requests()[1];
    assert_eq!(seen.header("anthropic-version"), Some("2099-01-01"));
    assert_eq!(seen.header("anthropic-beta"), Some("b1"));
    // An OpenAI-style request has no route on an Anthropic-only table.
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("claude-x", false)),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
});

both_drivers!(routes_pick_upstreams_and_edit_the_body, |driver| {
    let a = MockProvider::start(MockOptions::default());
    let b = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[
            ("a", "openai", a.base_url(), "non_retention = { mode = \"body_field\", name = \"store\", value = false }"),
            ("b", "openai", b.base_url(), "non_retention = { mode = \"header\", name = \"x-zero-retention\", value = \"true\" }"),
        ],
        "[[routes]]\nmodel = \"fast\"\ntargets = [{ upstream = \"b\", model = \"b-fast-2024\" }]\n[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"a\" }]\n",
        |_| {},
    );
    assert_eq!(
        exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("fast", false))
        )
        .status,
        200
    );
    assert_eq!(
        exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("other", false))
        )
        .status,
        200
    );
    let to_b = &b.requests()[0];
    assert_eq!(to_b.json().unwrap()["model"], "b-fast-2024");
    assert_eq!(to_b.header("x-zero-retention"), Some("true"));
    assert_eq!(
        to_b.header("content-length")
            .map(|v| v.parse::<usize>().unwrap()),
        Some(to_b.body.len())
    );
    let to_a = &a.requests()[0];
    assert_eq!(to_a.json().unwrap()["model"], "other");
    assert_eq!(to_a.json().unwrap()["store"], false);
    assert_eq!(to_a.json().unwrap()["messages"][0]["content"], "hello");

    let models = exchange(gw.addr(), b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n").json();
    assert_eq!(models["data"][0]["id"], "fast");
});

// Headers the gateway sets replace the client's of the same name, and the client's choice
// of provider organisation or project is dropped unless the upstream passes it.
both_drivers!(the_gateway_s_headers_win_over_the_client_s, |driver| {
    let a = MockProvider::start(MockOptions::default());
    let b = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[
            ("a", "openai", a.base_url(), "non_retention = { mode = \"header\", name = \"x-no-log\", value = \"1\" }"),
            ("b", "openai", b.base_url(), "pass_organization_headers = true"),
        ],
        "[[routes]]\nmodel = \"to-b\"\ntargets = [{ upstream = \"b\" }]\n[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"a\" }]\n",
        |_| {},
    );
    let client = "X-No-Log: 0\r\nOpenAI-Organization: org-client\r\nOpenAI-Project: proj-client\r\nx-keep: yes\r\n";
    for model in ["other", "to-b"] {
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", client, &chat(model, false)),
        );
        assert_eq!(r.status, 200);
    }
    let to_a = &a.requests()[0];
    let no_log: Vec<&str> = to_a
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-no-log"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        no_log,
        ["1"],
        "the gateway's value only: {:?}",
        to_a.headers
    );
    assert_eq!(to_a.header("openai-organization"), None);
    assert_eq!(to_a.header("openai-project"), None);
    assert_eq!(to_a.header("x-keep"), Some("yes"));
    let to_b = &b.requests()[0];
    assert_eq!(to_b.header("openai-organization"), Some("org-client"));
    assert_eq!(to_b.header("openai-project"), Some("proj-client"));
    assert_eq!(to_b.header("x-no-log"), Some("0"), "b sets no such header");
});

both_drivers!(request_errors_come_in_the_api_shape, |driver| {
    let mock = MockProvider::start(MockOptions::default());
    let gw = one_openai(driver, &mock);
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", r#"{"messages":[]}"#),
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("missing_model"))
    );
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", r#"{"model":"a","model":"b"}"#),
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("duplicate_key"))
    );
    let r = exchange(gw.addr(), &post("/v1/chat/completions", "", "[1,2]"));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi";
    let r = exchange(gw.addr(), raw);
    assert_eq!(r.status, 415);
    let r = exchange(
        gw.addr(),
        &post(
            "/v1/messages",
            "",
            r#"{"model":"x","max_tokens":1,"messages":[]}"#,
        ),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    assert_eq!(
        mock.request_count(),
        0,
        "nothing invalid reaches the provider"
    );
});

both_drivers!(large_base64_media_passes_unchanged, |driver| {
    let mock = MockProvider::start(MockOptions::default());
    let gw = one_openai(driver, &mock);
    let image = "QUJD".repeat(400_000); // 1.6 MB of base64
    let body = format!(
        r#"{{"model":"v","messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
    );
    let r = exchange(gw.addr(), &post("/v1/chat/completions", "", &body));
    assert_eq!(r.status, 200);
    // Unchanged, but for the non-retention flag OpenAI upstreams get by default.
    let sent = format!("{},\"store\":false}}", &body[..body.len() - 1]);
    assert_eq!(mock.requests()[0].body, sent.as_bytes());
});

both_drivers!(
    keep_alive_connections_to_the_upstream_are_reused,
    |driver| {
        let mock = MockProvider::start(MockOptions::default());
        let mut c = test_config(driver);
        c.server.workers = 1;
        let gw = gateway(
            driver,
            &[("oa", "openai", mock.base_url(), "")],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
            |cfg| cfg.server.workers = 1,
        );
        drop(c);
        for _ in 0..5 {
            assert_eq!(
                exchange(
                    gw.addr(),
                    &post("/v1/chat/completions", "", &chat("m", false))
                )
                .status,
                200
            );
        }
        assert_eq!(mock.request_count(), 5);
        assert_eq!(
            mock.connections_accepted(),
            1,
            "one pooled upstream connection serves them all"
        );
    }
);

both_drivers!(
    a_stale_pooled_connection_is_retried_on_a_fresh_one,
    |driver| {
        let mock = MockProvider::start(MockOptions::default());
        let gw = gateway(
            driver,
            &[("oa", "openai", mock.base_url(), "")],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
            |cfg| cfg.server.workers = 1,
        );
        assert_eq!(
            exchange(
                gw.addr(),
                &post("/v1/chat/completions", "", &chat("m", false))
            )
            .status,
            200
        );
        mock.push_behavior(Behavior::CloseBeforeResponse);
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(mock.connections_accepted(), 2);
        // On a fresh connection the same failure is not retried: the provider may have acted.
        mock.push_behavior(Behavior::CloseBeforeResponse);
        let gw2 = one_openai(driver, &mock);
        let r = exchange(
            gw2.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"]["code"], "upstream_closed");
    }
);

both_drivers!(
    retryable_statuses_fail_over_to_the_next_upstream,
    |driver| {
        let a = MockProvider::start(MockOptions::default());
        let b = MockProvider::start(MockOptions::default());
        let gw = gateway(
            driver,
            &[
                ("a", "openai", a.base_url(), ""),
                ("b", "openai", b.base_url(), ""),
            ],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"a\" }, { upstream = \"b\" }]\n",
            |_| {},
        );
        for status in [429u16, 500, 502, 503, 504] {
            a.push_behavior(Behavior::Status {
                status,
                body: r#"{"error":{"message":"busy"}}"#.into(),
                headers: vec![],
            });
            let r = exchange(
                gw.addr(),
                &post("/v1/chat/completions", "", &chat("m", false)),
            );
            assert_eq!(r.status, 200, "after {status} from a");
        }
        assert_eq!(b.request_count(), 5);
        // A non-retryable status is relayed as is.
        a.push_behavior(Behavior::Status { status: 400, body: r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#.into(), headers: vec![] });
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["message"], "bad");
        assert_eq!(b.request_count(), 5);
        // The last upstream's retryable answer is relayed too.
        a.push_behavior(Behavior::Status {
            status: 503,
            body: "{}".into(),
            headers: vec![],
        });
        b.push_behavior(Behavior::Status {
            status: 429,
            body: r#"{"error":{"message":"slow down"}}"#.into(),
            headers: vec![],
        });
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["message"], "slow down");
    }
);

both_drivers!(unreachable_upstreams_fail_over_then_502, |driver| {
    // Port 1 on loopback: nothing listens there, and no parallel test can take it.
    let dead = e2e::DEAD_UPSTREAM.to_string();
    let b = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[("dead", "openai", dead.clone(), ""), ("b", "openai", b.base_url(), "")],
        "[[routes]]\nmodel = \"ok\"\ntargets = [{ upstream = \"dead\" }, { upstream = \"b\" }]\n[[routes]]\nmodel = \"bad\"\ntargets = [{ upstream = \"dead\" }]\n",
        |_| {},
    );
    assert_eq!(
        exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("ok", false))
        )
        .status,
        200
    );
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("bad", false)),
    );
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
    let r = exchange(
        gw.addr(),
        &post(
            "/v1/messages",
            "",
            r#"{"model":"bad","max_tokens":1,"messages":[]}"#,
        ),
    );
    assert_eq!(r.status, 404, "no Anthropic upstream on that route");
});

both_drivers!(first_byte_timeout_is_504_and_never_retried, |driver| {
    let a = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::Stall,
        ..Default::default()
    });
    let b = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[
            (
                "a",
                "openai",
                a.base_url(),
                "first_byte_timeout = \"300ms\"",
            ),
            ("b", "openai", b.base_url(), ""),
        ],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"a\" }, { upstream = \"b\" }]\n",
        |_| {},
    );
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("m", false)),
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_eq!(
        b.request_count(),
        0,
        "a POST that may be in progress is never sent twice"
    );
});

both_drivers!(an_upstream_that_stops_taking_the_request_is_504, |driver| {
    // Accepts, then never reads: once the socket buffers are full the upload stalls.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", sink.local_addr().unwrap());
    // The sink holds the connection open until the test has its answer, so the answer
    // cannot come from a close: only from the gateway's own timer.
    let (answered, until_answered) = std::sync::mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let (conn, _) = sink.accept().unwrap();
        let _ = until_answered.recv_timeout(Duration::from_secs(120));
        drop(conn);
    });
    let b = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[
            ("sink", "openai", url, "read_idle_timeout = \"300ms\""),
            ("b", "openai", b.base_url(), ""),
        ],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"sink\" }, { upstream = \"b\" }]\n",
        |c| c.limits.max_body_bytes = 64 << 20,
    );
    let content = "QUJD".repeat(6 << 20); // 24 MiB: more than loopback socket buffers hold
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    let r = exchange(gw.addr(), &post("/v1/chat/completions", "", &body));
    answered.send(()).unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_eq!(
        b.request_count(),
        0,
        "a partly sent request is never sent again"
    );
    held.join().unwrap();
});

both_drivers!(upstream_auth_failures_are_not_relayed, |driver| {
    let mock = MockProvider::start(MockOptions::default());
    let gw = one_openai(driver, &mock);
    for status in [401u16, 403] {
        mock.push_behavior(Behavior::Status {
            status,
            body: format!(r#"{{"error":{{"message":"Incorrect API key provided: {}...","code":"invalid_api_key"}}}}"#, &CRED[..10]),
            headers: vec![],
        });
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"]["code"], "upstream_auth_failed");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("sk-upstrea"),
            "credential echo must not leak"
        );
    }
});

both_drivers!(malformed_upstream_responses_become_502, |driver| {
    let mock = MockProvider::start(MockOptions::default());
    let gw = one_openai(driver, &mock);
    let bad: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nab",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"garbage\r\n\r\n",
    ];
    for raw in bad {
        mock.push_behavior(Behavior::Raw(raw.to_vec()));
        let r = exchange(
            gw.addr(),
            &post("/v1/chat/completions", "", &chat("m", false)),
        );
        assert_eq!(r.status, 502, "{:?}", String::from_utf8_lossy(raw));
        assert_eq!(r.json()["error"]["code"], "bad_upstream_response");
    }
    // A body shorter than announced is cut short visibly: the client never gets a complete
    // response.
    mock.push_behavior(Behavior::Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\":".to_vec()));
    let mut s = gw.connect();
    s.write_all(&post("/v1/chat/completions", "", &chat("m", false)))
        .unwrap();
    assert!(
        read_response(&mut s, &mut Vec::new()).is_none(),
        "a truncated body is not a response"
    );
});

both_drivers!(sse_streams_are_relayed_event_by_event, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::OpenAiStream {
            events: 5,
            delay_ms: 10,
        },
        ..Default::default()
    });
    let gw = one_openai(driver, &mock);
    let mut s = gw.connect();
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    s.write_all(&post("/v1/chat/completions", "", body))
        .unwrap();
    let text = read_until(&mut s, "0\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"));
    assert!(text.contains("content-type: text/event-stream"));
    for i in 0..5 {
        assert!(text.contains(&format!("tok{i} ")), "{text}");
    }
    assert!(text.contains("\"usage\""));
    assert!(text.contains("data: [DONE]"));
    assert!(text.ends_with("0\r\n\r\n"), "stream ends properly");

    // Events reach the client while the upstream is still producing: with an upstream that
    // sends two events and then stalls, both arrive.
    mock.push_behavior(Behavior::StallAfterEvents { events: 2 });
    let mut s = gw.connect();
    s.write_all(&post("/v1/chat/completions", "", body))
        .unwrap();
    let text = read_until(&mut s, "tok1 ");
    assert!(text.contains("tok0 ") && text.contains("tok1 "), "{text}");
});

both_drivers!(http10_clients_get_streams_close_delimited, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::OpenAiStream {
            events: 3,
            delay_ms: 1,
        },
        ..Default::default()
    });
    let gw = one_openai(driver, &mock);
    let mut s = gw.connect();
    let body = chat("m", true);
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(raw.as_bytes()).unwrap();
    let text = read_until(&mut s, "");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "no chunked coding for HTTP/1.0: {text}"
    );
    assert!(text.contains("connection: close"));
    assert!(
        text.contains("tok2 ") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
});

both_drivers!(anthropic_streams_are_relayed, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::AnthropicStream {
            events: 3,
            delay_ms: 5,
        },
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[("an", "anthropic", mock.base_url(), "")],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"an\" }]\n",
        |_| {},
    );
    let mut s = gw.connect();
    let body =
        r#"{"model":"c","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    s.write_all(&post("/v1/messages", "", body)).unwrap();
    let text = read_until(&mut s, "0\r\n\r\n");
    for e in [
        "event: message_start",
        "event: content_block_delta",
        "event: message_delta",
        "event: message_stop",
    ] {
        assert!(text.contains(e), "{e} missing: {text}");
    }
});

both_drivers!(
    an_upstream_dying_mid_stream_ends_the_stream_visibly,
    |driver| {
        let mock = MockProvider::start(MockOptions {
            tls: false,
            default: Behavior::ResetAfterEvents { events: 2 },
            ..Default::default()
        });
        let gw = one_openai(driver, &mock);
        let mut s = gw.connect();
        s.write_all(&post("/v1/chat/completions", "", &chat("m", true)))
            .unwrap();
        let text = read_until(&mut s, "");
        assert!(text.contains("tok1 "), "{text}");
        assert!(
            text.contains("upstream_interrupted"),
            "an error event tells the client: {text}"
        );
        assert!(!text.contains("[DONE]"), "no silent [DONE]");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "no clean end of the chunked body"
        );
    }
);

both_drivers!(an_upstream_stalling_mid_stream_is_cut_off, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::StallAfterEvents { events: 1 },
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[(
            "oa",
            "openai",
            mock.base_url(),
            "read_idle_timeout = \"300ms\"",
        )],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
        |_| {},
    );
    let mut s = gw.connect();
    s.write_all(&post("/v1/chat/completions", "", &chat("m", true)))
        .unwrap();
    let text = read_until(&mut s, "");
    assert!(
        text.contains("tok0 ") && text.contains("upstream_interrupted"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
});

both_drivers!(
    a_client_that_stops_reading_is_cut_off_not_buffered,
    |driver| {
        // About 44 MB of events, far more than the kernel's socket buffers hold.
        let events = 400_000;
        let mock = MockProvider::start(MockOptions {
            tls: false,
            default: Behavior::OpenAiStream {
                events,
                delay_ms: 0,
            },
            ..Default::default()
        });
        let gw = gateway(
            driver,
            &[("oa", "openai", mock.base_url(), "")],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
            |c| c.timeouts.write = Duration::from_millis(300),
        );
        let mut s = gw.connect();
        s.write_all(&post("/v1/chat/completions", "", &chat("m", true)))
            .unwrap();
        // The client stops reading; the gateway's writes block, it stops reading the upstream
        // (backpressure), and after the write timeout it gives up on the client, and on the
        // upstream with it.
        assert!(
            wait_until(Duration::from_secs(20), || mock.closed_by_peer() == 1),
            "the gateway never gave up the stream"
        );
        let text = read_until(&mut s, "");
        assert!(text.contains("tok0 "));
        assert!(
            !text.contains("[DONE]"),
            "the stream was cut off, not buffered to completion"
        );
        assert!(
            text.len() < events * 100,
            "only what the socket buffers held arrived: {} bytes",
            text.len()
        );
        // The gateway is still healthy.
        mock.set_default(Behavior::OpenAiJson);
        assert_eq!(
            exchange(
                gw.addr(),
                &post("/v1/chat/completions", "", &chat("m", false))
            )
            .status,
            200
        );
    }
);

// A client that leaves mid-stream has its upstream connection closed: the provider stops
// generating for nobody. The stream is far longer than the test's deadline, so an upstream
// relayed on to nobody until it ends would not be closed in time.
both_drivers!(
    a_client_disconnecting_mid_stream_releases_the_upstream,
    |driver| {
        let mock = MockProvider::start(MockOptions {
            default: Behavior::OpenAiStream {
                events: 100_000,
                delay_ms: 10,
            },
            ..Default::default()
        });
        let gw = gateway(
            driver,
            &[("oa", "openai", mock.base_url(), "")],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
            |c| c.server.workers = 1,
        );
        let mut s = gw.connect();
        s.write_all(&post("/v1/chat/completions", "", &chat("m", true)))
            .unwrap();
        let _ = read_until(&mut s, "tok2 ");
        assert_eq!(mock.closed_by_peer(), 0);
        drop(s);
        assert!(
            wait_until(Duration::from_secs(20), || mock.closed_by_peer() == 1),
            "the upstream connection was not closed when its client left"
        );
        // The interrupted upstream connection is not handed to the next request.
        mock.set_default(Behavior::OpenAiJson);
        assert_eq!(
            exchange(
                gw.addr(),
                &post("/v1/chat/completions", "", &chat("m", false))
            )
            .status,
            200
        );
        assert_eq!(mock.connections_accepted(), 2);
    }
);

both_drivers!(https_upstreams_are_verified, |driver| {
    let mock = MockProvider::start(MockOptions {
        tls: true,
        default: Behavior::OpenAiJson,
        ..Default::default()
    });
    let dir = scratch_dir(&format!("tls-{driver:?}"));
    let ca = mock.write_ca_file(&dir);
    let url = mock.base_url();
    let gw = gateway(
        driver,
        &[
            ("trusted", "openai", url.clone(), &format!("ca_file = \"{}\"", ca.display())),
            ("untrusted", "openai", url.clone(), ""),
            ("insecure", "openai", url.clone(), "danger_accept_invalid_certs = true"),
        ],
        "[[routes]]\nmodel = \"t\"\ntargets = [{ upstream = \"trusted\" }]\n[[routes]]\nmodel = \"u\"\ntargets = [{ upstream = \"untrusted\" }]\n[[routes]]\nmodel = \"i\"\ntargets = [{ upstream = \"insecure\" }]\n",
        |_| {},
    );
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("t", false)),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hello");
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("u", false)),
    );
    assert_eq!(r.status, 502, "an unknown CA is refused");
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("i", false)),
    );
    assert_eq!(r.status, 200);
    // A stream through the verified upstream arrives whole, event by event.
    mock.set_default(Behavior::OpenAiStream {
        events: 3,
        delay_ms: 1,
    });
    let r = exchange(
        gw.addr(),
        &post("/v1/chat/completions", "", &chat("t", true)),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(chat_stream_text(&r.body), "tok0 tok1 tok2 ");
    let events = sse_events(&r.body);
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    // A large prompt, edited (the non-retention flag): the re-serialised pieces and the
    // prompt, sent as a slice of the client's request, arrive as one body, byte for byte.
    mock.set_default(Behavior::OpenAiJson);
    let content = "QUJD".repeat(100_000);
    let body =
        format!(r#"{{"model":"t","messages":[{{"role":"user","content":"{content}"}}],"n":1}}"#);
    let r = exchange(gw.addr(), &post("/v1/chat/completions", "", &body));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sent = format!("{},\"store\":false}}", &body[..body.len() - 1]);
    let got = mock.requests().last().map(|q| q.body.clone()).unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent.as_bytes(), "the upstream got the body exactly");
});

both_drivers!(body_memory_budget_answers_503, |driver| {
    let mock = MockProvider::start(MockOptions::default());
    let gw = gateway(
        driver,
        &[("oa", "openai", mock.base_url(), "")],
        "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
        |c| {
            c.server.workers = 1;
            c.limits.max_body_bytes = 2000;
            c.body_budget_bytes = 2000;
        },
    );
    // One request holds 1500 bytes of the budget while its body trickles in.
    let mut holder = gw.connect();
    holder.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1500\r\n\r\n{").unwrap();
    wait_body_bytes(gw.admin_addr(), 1500);
    let body = format!(
        r#"{{"model":"m","messages":[],"pad":"{}"}}"#,
        "x".repeat(900)
    );
    let r = exchange(gw.addr(), &post("/v1/chat/completions", "", &body));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "server_busy");
    drop(holder);
    wait_body_bytes(gw.admin_addr(), 0);
    assert_eq!(
        exchange(gw.addr(), &post("/v1/chat/completions", "", &body)).status,
        200,
        "budget returns when requests end"
    );
});

#[test]
fn demo_provider_streams_through_the_proxy() {
    let gw = Gateway::start(DriverChoice::Auto);
    let mut s = gw.connect();
    s.write_all(&post(
        "/v1/chat/completions",
        "",
        r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"a b c"}]}"#,
    ))
    .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).expect("response");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("\"content\":\"c\"") && text.contains("data: [DONE]"),
        "{text}"
    );
}

both_drivers!(
    a_client_that_leaves_while_its_request_waits_upstream_releases_it,
    |driver| {
        let mock = MockProvider::start(MockOptions {
            tls: false,
            default: Behavior::Hold,
            ..Default::default()
        });
        let gw = gateway(
            driver,
            &[("oa", "openai", mock.base_url(), "")],
            "[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"oa\" }]\n",
            |c| c.server.workers = 1,
        );
        // A client that stays, and sends its next request pipelined while the first waits,
        // is not taken for gone.
        let mut staying = gw.connect();
        staying
            .write_all(&post("/v1/chat/completions", "", &chat("m", false)))
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || mock.request_count() == 1));
        staying
            .write_all(&post("/v1/chat/completions", "", &chat("m", false)))
            .unwrap();
        // A client that leaves: once the request has waited a second, the gateway notices and
        // closes the upstream connection (the provider stops generating for nobody).
        let mut leaving = gw.connect();
        leaving
            .write_all(&post("/v1/chat/completions", "", &chat("m", false)))
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || mock.request_count() == 2));
        let upstream_of = |i: usize| mock.requests()[i].connection;
        let (staying_upstream, leaving_upstream) = (upstream_of(0), upstream_of(1));
        drop(leaving);
        assert!(
            wait_until(Duration::from_secs(20), || mock
                .closed_connections()
                .contains(&leaving_upstream)),
            "the abandoned upstream connection was closed"
        );
        // The leaving request was first looked at a second after it was sent, itself after
        // the staying client's pipelined bytes; the staying request, looked at every second
        // on the same worker, has been looked at since those bytes arrived.
        assert_eq!(
            mock.closed_connections(),
            [leaving_upstream],
            "the staying client's upstream connection is still held"
        );
        drop(staying);
        assert!(
            wait_until(Duration::from_secs(20), || mock
                .closed_connections()
                .contains(&staying_upstream)),
            "and released once that client leaves too"
        );
    }
);
