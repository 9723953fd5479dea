//! What a request may hold before and while its body arrives: nothing before its key is
//! checked, a bounded share of the worker's body reads per client address, and a total
//! time for its body.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use e2e::cp::{cp_start, key, revision, route_env, tenant, wait_workers};
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;

fn body_bytes(gw: &Gateway) -> i64 {
    admin_get(gw.admin_addr(), "/workers").json()["workers"][0]["body_bytes"]
        .as_i64()
        .unwrap()
}

fn chat(key: &str) -> Vec<u8> {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    post("/v1/chat/completions", &key_headers(key), body)
}

/// A connection from `local` (any 127/8 address) to `to`.
fn connect_from(local: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((local, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A keyed node with one worker, tweaked.
fn node(
    driver: dataplane::config::DriverChoice,
    tweak: impl FnOnce(&mut dataplane::config::Config),
) -> (Gateway, String, controlplane::Running, MockProvider) {
    let mock = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir(&format!("admission-{driver:?}")), "127.0.0.1:0");
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &mock);
    let k = key(&cp, "acme", "production");
    let gw = e2e::cp::node_with(driver, &e2e::cp::register(&cp), |c| {
        c.server.workers = 1;
        tweak(c);
    });
    wait_workers(&gw, revision(&cp));
    (gw, k, cp, mock)
}

both_drivers!(requests_without_a_valid_key_reserve_nothing, |driver| {
    let (gw, k, _cp, _mock) = node(driver, |c| c.body_budget_bytes = 64 << 20);
    // 32 keyless requests announcing 32 MiB bodies, half asking for 100 Continue: each is
    // refused from its head, without a 100 Continue and without a byte of budget.
    let mut held = Vec::new();
    for i in 0..32 {
        let mut s = gw.connect();
        let expect = if i % 2 == 0 {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{expect}Content-Length: 33554432\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let r = read_response(&mut s, &mut Vec::new()).expect("an answer");
        assert_eq!(r.status, 401, "request {i}: no 100 Continue, an answer");
        assert_eq!(r.json()["error"]["code"], "missing_api_key");
        assert!(r.closes(), "the unread body cannot be taken for a request");
        held.push(s);
    }
    assert_eq!(body_bytes(&gw), 0);
    let r = exchange(gw.addr(), &chat(&k));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A keyed request with 100-continue gets it once admitted.
    let mut s = gw.connect();
    s.write_all(
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {k}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).unwrap().status, 100);
    s.write_all(b"{}").unwrap();
    let r = read_response(&mut s, &mut pending).unwrap();
    assert_eq!(r.json()["error"]["code"], "missing_model");
    drop(held);
});

both_drivers!(
    one_client_address_holds_only_its_share_of_body_reads,
    |driver| {
        let (gw, k, _cp, _mock) = node(driver, |c| c.limits.max_body_reads_per_client = 2);
        let body_head = |s: &mut TcpStream| {
            let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {k}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{");
            s.write_all(head.as_bytes()).unwrap();
        };
        let mut trickling = Vec::new();
        for _ in 0..2 {
            let mut s = connect_from([127, 0, 0, 1], gw.addr());
            body_head(&mut s);
            trickling.push(s);
        }
        assert!(
            wait_until(Duration::from_secs(5), || body_bytes(&gw) == 200),
            "both bodies reserved"
        );
        let mut third = connect_from([127, 0, 0, 1], gw.addr());
        body_head(&mut third);
        let r = read_response(&mut third, &mut Vec::new()).expect("an answer");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], "server_busy");
        // Another address still gets its bodies read.
        let mut other = connect_from([127, 0, 0, 2], gw.addr());
        other.write_all(&chat(&k)).unwrap();
        assert_eq!(
            read_response(&mut other, &mut Vec::new()).unwrap().status,
            200
        );
        drop(trickling);
        assert!(wait_until(Duration::from_secs(5), || body_bytes(&gw) == 0));
        let mut again = connect_from([127, 0, 0, 1], gw.addr());
        again.write_all(&chat(&k)).unwrap();
        assert_eq!(
            read_response(&mut again, &mut Vec::new()).unwrap().status,
            200
        );
    }
);

both_drivers!(a_body_that_keeps_trickling_still_has_a_deadline, |driver| {
    let (gw, k, _cp, _mock) = node(driver, |c| {
        c.timeouts.body_read_idle = Duration::from_secs(1);
        c.timeouts.body_read_total = Duration::from_secs(2);
    });
    let mut s = gw.connect();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {k}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let start = Instant::now();
    // The read timeout paces the client (the thing under test), not a wait for the gateway.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = Vec::new();
    // One byte every 300 ms: never idle for the 1 s idle bound.
    while start.elapsed() < Duration::from_secs(10) {
        if s.write_all(b" ").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // Answered while bytes kept coming (an idle bound never would), and not before the
    // total bound.
    assert!(
        elapsed >= Duration::from_secs(2),
        "answered after {elapsed:?}: the total bound, not the idle one"
    );
});
