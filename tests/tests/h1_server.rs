//! The HTTP/1.1 server over real sockets, under io_uring and under epoll.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use e2e::*;

both_drivers!(answers_a_chat_request_with_request_id_and_date, |driver| {
    let gw = Gateway::start(driver);
    let r = exchange(gw.addr(), &chat_request(CHAT_BODY));
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("x-request-id");
    assert_eq!(id.len(), 32);
    assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "(demo) You said: hello"
    );
    // The demo provider sits behind the proxy like any upstream; its own id is relayed as
    // x-upstream-request-id, and ours is distinct.
    let upstream_id = r
        .header("x-upstream-request-id")
        .expect("upstream id relayed");
    assert_ne!(upstream_id, id);
    assert_eq!(v["id"], format!("chatcmpl-{upstream_id}"));
});

both_drivers!(
    keep_alive_serves_many_requests_on_one_connection,
    |driver| {
        let gw = Gateway::start(driver);
        let mut s = gw.connect();
        let mut pending = Vec::new();
        let mut ids = Vec::new();
        for i in 0..20 {
            let body =
                format!(r#"{{"model":"demo","messages":[{{"role":"user","content":"n{i}"}}]}}"#);
            s.write_all(&chat_request(&body)).unwrap();
            let r = read_response(&mut s, &mut pending).expect("response");
            assert_eq!(r.status, 200);
            assert!(!r.closes());
            assert_eq!(
                r.json()["choices"][0]["message"]["content"],
                format!("(demo) You said: n{i}")
            );
            ids.push(r.header("x-request-id").unwrap().to_string());
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 20, "every request gets its own id");
    }
);

both_drivers!(pipelined_requests_are_answered_in_order, |driver| {
    let gw = Gateway::start(driver);
    let mut s = gw.connect();
    let mut all = Vec::new();
    for i in 0..10 {
        let body = format!(r#"{{"model":"demo","messages":[{{"role":"user","content":"p{i}"}}]}}"#);
        all.extend_from_slice(&chat_request(&body));
    }
    all.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n");
    s.write_all(&all).unwrap();
    let mut pending = Vec::new();
    for i in 0..10 {
        let r = read_response(&mut s, &mut pending).expect("response");
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            format!("(demo) You said: p{i}")
        );
    }
    let r = read_response(&mut s, &mut pending).expect("models");
    assert_eq!(r.json()["data"][0]["id"], "demo");
});

both_drivers!(chunked_request_body_is_decoded, |driver| {
    let gw = Gateway::start(driver);
    let body = CHAT_BODY.as_bytes();
    let mut raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in body.chunks(7) {
        raw.extend_from_slice(format!("{:x};ext=\"v\"\r\n", part.len()).as_bytes());
        raw.extend_from_slice(part);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    // Delivered in small pieces, so the decoder sees every boundary split.
    let mut s = gw.connect();
    for piece in raw.chunks(5) {
        s.write_all(piece).unwrap();
        s.flush().unwrap();
    }
    let r = read_response(&mut s, &mut Vec::new()).expect("response");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "(demo) You said: hello"
    );
    // The connection stays usable after a chunked request.
    s.write_all(&chat_request(CHAT_BODY)).unwrap();
    assert_eq!(read_response(&mut s, &mut Vec::new()).unwrap().status, 200);
});

both_drivers!(expect_100_continue_gets_an_interim_response, |driver| {
    let gw = Gateway::start(driver);
    let mut s = gw.connect();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        CHAT_BODY.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let interim = read_response(&mut s, &mut pending).expect("100");
    assert_eq!(interim.status, 100);
    s.write_all(CHAT_BODY.as_bytes()).unwrap();
    let r = read_response(&mut s, &mut pending).expect("final");
    assert_eq!(r.status, 200);
});

both_drivers!(http10_clients_are_served_and_closed, |driver| {
    let gw = Gateway::start(driver);
    let mut s = gw.connect();
    s.write_all(b"GET /v1/models HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut s, &mut Vec::new()).expect("response");
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert!(is_closed(&mut s, Duration::from_secs(5)));
    // With keep-alive asked for, the connection stays open.
    let mut s = gw.connect();
    let mut pending = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s, &mut pending).expect("response");
        assert_eq!(r.status, 200);
        assert!(!r.closes());
    }
});

/// Sends `raw`, expects `status` with `code` in an OpenAI-shaped body, a request id, and a
/// closed connection.
fn expect_rejected(gw: &Gateway, raw: &[u8], status: u16, code: &str) {
    let mut s = gw.connect();
    s.write_all(raw).unwrap();
    let r = read_response(&mut s, &mut Vec::new())
        .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(raw)));
    assert_eq!(
        r.status,
        status,
        "{:?} → {:?}",
        String::from_utf8_lossy(raw),
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["error"]["code"], code);
    assert!(
        r.header("x-request-id").is_some(),
        "errors carry x-request-id too"
    );
    assert!(r.closes());
    assert!(
        is_closed(&mut s, Duration::from_secs(5)),
        "connection must be closed after {code}"
    );
}

both_drivers!(framing_errors_are_answered_and_closed, |driver| {
    let gw = Gateway::start(driver);
    let cases: &[(&[u8], u16, &str)] = &[
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "content_length_with_transfer_encoding"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400, "duplicate_content_length"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: +3\r\n\r\nabc", 400, "bad_content_length"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported_transfer_coding"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400, "bad_transfer_encoding"),
        (b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "transfer_encoding_in_http10"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n", 400, "bad_chunk_size"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\x01\r\n", 400, "bad_chunk_extension"),
        (b"GET /v1/models HTTP/1.1\nHost: gw\n\n", 400, "bare_line_ending"),
        (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX: a\r\n  b\r\n\r\n", 400, "obs_fold"),
        (b"GET /v1/models HTTP/1.1\r\nHost : gw\r\n\r\n", 400, "bad_header"),
        (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "missing_host"),
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "duplicate_host"),
        (b"GET /v1/models HTTP/2.0\r\nHost: gw\r\n\r\n", 505, "http_version_not_supported"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999999\r\n\r\n", 413, "request_too_large"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nExpect: teapot\r\n\r\n", 417, "expectation_failed"),
    ];
    for (raw, status, code) in cases {
        expect_rejected(&gw, raw, *status, code);
    }
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(20_000));
    expect_rejected(&gw, long_target.as_bytes(), 414, "uri_too_long");
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    expect_rejected(&gw, big_head.as_bytes(), 431, "header_section_too_large");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: gw\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    expect_rejected(&gw, many.as_bytes(), 431, "too_many_headers");
});

both_drivers!(nul_in_a_header_value_is_refused, |driver| {
    let gw = Gateway::start(driver);
    expect_rejected(
        &gw,
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX: a\0b\r\n\r\n",
        400,
        "bad_header",
    );
});

both_drivers!(anthropic_paths_get_anthropic_errors, |driver| {
    let gw = Gateway::start(driver);
    let r = exchange(
        gw.addr(),
        b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "duplicate_content_length");
    let body = r#"{"model":"demo","max_tokens":16,"messages":[{"role":"user","content":[{"type":"text","text":"hey"}]}]}"#;
    let raw = format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let r = exchange(gw.addr(), raw.as_bytes());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["content"][0]["text"], "(demo) You said: hey");
});

both_drivers!(body_limit_applies_to_chunked_bodies, |driver| {
    let mut c = test_config(driver);
    c.limits.max_body_bytes = 1024;
    let gw = Gateway::start_with(c);
    let mut raw =
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(b"200\r\n");
        raw.extend_from_slice(&[b'x'; 0x200]);
        raw.extend_from_slice(b"\r\n");
    }
    expect_rejected(&gw, &raw, 413, "request_too_large");
});

both_drivers!(slow_head_gets_408_and_is_closed, |driver| {
    let mut c = test_config(driver);
    c.timeouts.head_read = Duration::from_millis(300);
    let gw = Gateway::start_with(c);
    let mut s = gw.connect();
    let started = std::time::Instant::now();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
        .unwrap();
    // Keep trickling bytes for 4 s, one line every 100 ms: an idle timer would never fire
    // while they come; the head deadline runs from the first byte and fires long before.
    let mut trickle = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..40 {
            // The client's pace is what is under test, not a wait for the gateway.
            std::thread::sleep(Duration::from_millis(100));
            if trickle.write_all(b"X-Slow: 1\r\n").is_err() {
                return;
            }
        }
    });
    let r = read_response(&mut s, &mut Vec::new()).expect("408");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "answered {took:?} after the first byte, while bytes kept coming: an idle timer, not a deadline"
    );
    assert_eq!(r.status, 408);
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    assert!(is_closed(&mut s, Duration::from_secs(5)));
    writer.join().unwrap();
});

both_drivers!(idle_keep_alive_connections_are_closed, |driver| {
    let mut c = test_config(driver);
    c.timeouts.keepalive_idle = Duration::from_millis(200);
    let gw = Gateway::start_with(c);
    let mut s = gw.connect();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s, &mut Vec::new()).unwrap().status, 200);
    assert!(
        is_closed(&mut s, Duration::from_secs(5)),
        "idle connection closed"
    );
});

both_drivers!(slow_body_gets_408, |driver| {
    let mut c = test_config(driver);
    c.timeouts.body_read_idle = Duration::from_millis(200);
    let gw = Gateway::start_with(c);
    let mut s = gw.connect();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).expect("408");
    assert_eq!(r.status, 408);
});

both_drivers!(bad_json_and_unknown_paths_are_api_errors, |driver| {
    let gw = Gateway::start(driver);
    let r = exchange(gw.addr(), &chat_request("{not json"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    assert!(
        !r.closes(),
        "a well-framed bad request keeps the connection"
    );
    let r = exchange(gw.addr(), b"GET /nope HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_eq!(r.status, 404);
    let r = exchange(
        gw.addr(),
        b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
});

both_drivers!(head_requests_get_headers_only, |driver| {
    let gw = Gateway::start(driver);
    let mut s = gw.connect();
    s.write_all(
        b"HEAD /v1/models HTTP/1.1\r\nHost: gw\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .unwrap();
    // The HEAD response announces a length but carries no body: the next bytes on the wire
    // are the GET's response.
    let mut pending = Vec::new();
    let head = read_head_response(&mut s, &mut pending).expect("HEAD");
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some_and(|n| n != "0"));
    assert!(head.body.is_empty());
    let r = read_response(&mut s, &mut pending).expect("GET after HEAD");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "demo");
});

both_drivers!(admin_reports_health_readiness_and_workers, |driver| {
    let gw = Gateway::start(driver);
    assert_eq!(admin_get(gw.admin_addr(), "/healthz").status, 200);
    let r = admin_get(gw.admin_addr(), "/readyz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
    let r = admin_get(gw.admin_addr(), "/workers");
    let v = r.json();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let expected = match driver {
        dataplane::config::DriverChoice::Epoll => vec!["epoll"],
        _ => vec!["io_uring(coop_taskrun,single_issuer)", "io_uring"],
    };
    for w in workers {
        assert!(expected.contains(&w["driver"].as_str().unwrap()), "{w}");
        assert_eq!(w["running"], true);
    }
});

both_drivers!(graceful_shutdown_finishes_in_flight_requests, |driver| {
    let gw = Gateway::start(driver);
    let admin = gw.admin_addr();
    let addr = gw.addr();
    // A request whose body is still arriving when the shutdown starts.
    let mut busy = gw.connect();
    let raw = chat_request(CHAT_BODY);
    let split = raw.len() - 5;
    busy.write_all(&raw[..split]).unwrap();
    // An idle keep-alive connection.
    let mut idle = gw.connect();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut idle, &mut Vec::new()).unwrap().status,
        200
    );
    // The busy request's head has been read and its body is awaited: it is in flight.
    assert!(
        wait_until(Duration::from_secs(20), || body_bytes(admin) > 0),
        "the busy request never reached the gateway"
    );

    gw.handle().begin_shutdown();
    let stopper = std::thread::spawn(move || gw.stop());
    // Readiness flips at once so load balancers stop sending.
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(admin).is_err() || admin_get(admin, "/readyz").status == 503
    }));
    assert!(
        is_closed(&mut idle, Duration::from_secs(5)),
        "idle connections close at shutdown"
    );
    busy.write_all(&raw[split..]).unwrap();
    let r = read_response(&mut busy, &mut Vec::new()).expect("in-flight request completes");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "responses during drain close the connection");
    stopper.join().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer accepting"
    );
});

both_drivers!(reload_applies_new_limits_to_new_requests, |driver| {
    let gw = Gateway::start(driver);
    assert_eq!(exchange(gw.addr(), &chat_request(CHAT_BODY)).status, 200);
    let mut c = test_config(driver);
    c.limits.max_body_bytes = 10;
    let generation = gw.handle().reload(c);
    assert_eq!(generation, Ok(2));
    let r = exchange(gw.addr(), &chat_request(CHAT_BODY));
    assert_eq!(r.status, 413);
    let v = admin_get(gw.admin_addr(), "/workers").json();
    assert_eq!(v["settings_generation"], 2);
});
