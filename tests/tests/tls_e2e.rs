//! TLS on the client-facing listener, end to end over real sockets: TLS 1.3 only with ALPN
//! `http/1.1`, HSTS on every response (errors too), a plain-HTTP listener beside it that
//! refuses every request without HSTS or a redirect, the certificate reloaded from its
//! files without dropping open connections, and the official OpenAI Python client talking
//! to the TLS endpoint with a test CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use dataplane::config::{DriverChoice, TlsConfig};
use e2e::mock::{MockOptions, MockProvider};
use e2e::pki::{client_config, TestCa};
use e2e::*;

const HSTS: &str = "max-age=63072000; includeSubDomains";

struct TlsGateway {
    gw: Gateway,
    ca: TestCa,
    dir: std::path::PathBuf,
    _openai: MockProvider,
}

fn tls_gateway(driver: DriverChoice, name: &str) -> TlsGateway {
    let openai = MockProvider::start(MockOptions {
        default: e2e::mock::Behavior::OpenAiStream {
            events: 3,
            delay_ms: 1,
        },
        ..Default::default()
    });
    let dir = scratch_dir(name);
    let ca = TestCa::new("aigateway test CA");
    ca.write(&dir);
    let (cert_file, key_file, _) = ca.issue_files(&dir, &["localhost", "127.0.0.1"]);
    let mut toml = upstream_toml("openai", "openai", &openai.base_url(), "");
    toml.push_str("[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"openai\" }]\n");
    let gw = Gateway::with_toml(driver, &toml, |c| {
        c.tls = Some(TlsConfig {
            cert_file,
            key_file,
            plain_listen: Some("127.0.0.1:0".parse().unwrap()),
        });
    });
    TlsGateway {
        gw,
        ca,
        dir,
        _openai: openai,
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn connect_tls(
    addr: SocketAddr,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Tls {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca_pem, versions), name).unwrap();
    let tcp = connect(addr);
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn send(tls: &mut Tls, raw: &[u8]) -> Resp {
    tls.write_all(raw).unwrap();
    read_response(tls, &mut Vec::new()).expect("a response")
}

/// Sends `raw` in clear to a TLS listener and returns what came back before it closed.
fn in_clear(addr: SocketAddr, raw: &[u8]) -> String {
    let mut plain = connect(addr);
    plain.write_all(raw).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

fn chat() -> Vec<u8> {
    post(
        "/v1/chat/completions",
        "",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#,
    )
}

both_drivers!(tls_1_3_only_with_hsts_on_every_response, |driver| {
    let t = tls_gateway(driver, &format!("tls-listener-{driver:?}"));
    let ca = t.ca.pem();
    let addr = t.gw.addr();

    // TLS 1.3, ALPN http/1.1 (the client offered h2 first), HSTS on the answer.
    let mut tls = connect_tls(addr, &ca, &[&rustls::version::TLS13]);
    let r = send(&mut tls, &chat());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Errors carry it too, on the same keep-alive connection.
    let r = send(&mut tls, &post("/v1/nowhere", "", "{}"));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    let r = send(
        &mut tls,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));

    // A client that speaks only TLS 1.2 gets no connection.
    let mut old = connect_tls(addr, &ca, &[&rustls::version::TLS12]);
    let e = old.write_all(&chat()).and_then(|_| old.flush());
    let failed = e.is_err() || {
        let mut b = [0u8; 1];
        !matches!(old.read(&mut b), Ok(n) if n > 0)
    };
    assert!(failed, "a TLS 1.2 handshake succeeded");
    assert!(
        old.conn.protocol_version().is_none() || old.conn.is_handshaking(),
        "no TLS 1.2 session was made"
    );
    // Plain HTTP on the TLS port: no plaintext answer, the connection is closed.
    let got = in_clear(addr, &chat());
    assert!(
        !got.contains("HTTP/1.1"),
        "an HTTP answer in clear on the TLS port: {got:?}"
    );

    // The plain-HTTP listener beside TLS refuses every request, in the client API's error
    // shape, with no HSTS (RFC 6797 §7.2) and no redirect.
    let plain_addr = t.gw.handle().plain_addr().expect("plain listener");
    let r = exchange(
        plain_addr,
        format!(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: 2\r\n\r\n{{}}",
            plain_addr.port()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "https_required");
    assert!(
        r.text().contains(&format!(
            "https://localhost:{}/v1/chat/completions ",
            addr.port()
        )),
        "the TLS listener's URL: {}",
        r.text()
    );
    assert_eq!(r.header("strict-transport-security"), None);
    assert_eq!(r.header("location"), None);
    assert!(r.closes());
    let r = exchange(
        plain_addr,
        &post(
            "/v1/messages",
            "anthropic-version: 2023-06-01\r\n",
            r#"{"model":"claude","max_tokens":5,"messages":[]}"#,
        ),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["type"], "error", "Anthropic's shape: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "https_required");
    assert_eq!(
        t._openai.request_count(),
        1,
        "only the TLS request reached the provider"
    );
});

#[test]
fn a_renewed_certificate_is_served_without_dropping_connections() {
    let t = tls_gateway(DriverChoice::IoUring, "tls-reload");
    let ca = t.ca.pem();
    let addr = t.gw.addr();
    let leaf =
        |tls: &Tls| -> Vec<u8> { tls.conn.peer_certificates().unwrap()[0].as_ref().to_vec() };
    let mut open = connect_tls(addr, &ca, &[&rustls::version::TLS13]);
    assert_eq!(send(&mut open, &chat()).status, 200);
    let before = leaf(&open);

    let (_, _, renewed) = t.ca.issue_files(&t.dir, &["localhost", "127.0.0.1"]);
    assert_ne!(before, renewed);
    let served = wait_until(Duration::from_secs(20), || {
        let mut fresh = connect_tls(addr, &ca, &[&rustls::version::TLS13]);
        send(&mut fresh, &chat()).status == 200 && leaf(&fresh) == renewed
    });
    assert!(served, "new connections never got the renewed certificate");
    // The connection opened before the renewal is still served.
    let r = send(&mut open, &chat());
    assert_eq!(r.status, 200);
    assert_eq!(leaf(&open), before);

    // A broken pair (a key that is not the certificate's) is not taken: the renewed one
    // stays in use.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(t.dir.join("key.pem"), other.serialize_pem()).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let mut fresh = connect_tls(addr, &ca, &[&rustls::version::TLS13]);
    assert_eq!(send(&mut fresh, &chat()).status, 200);
    assert_eq!(leaf(&fresh), renewed);
}

#[test]
fn the_openai_python_client_talks_to_the_tls_endpoint_with_a_test_ca() {
    let t = tls_gateway(DriverChoice::IoUring, "tls-sdk");
    let base = format!("https://localhost:{}", t.gw.addr().port());
    let ca = t.dir.join("ca.pem");
    let plain = format!(
        "http://127.0.0.1:{}",
        t.gw.handle().plain_addr().unwrap().port()
    );
    run_sdk_script("openai_tls.py", &[&base, ca.to_str().unwrap(), &plain]);
}

#[test]
fn testssl_finds_only_tls_1_3_offered_and_hsts() {
    let t = tls_gateway(DriverChoice::IoUring, "tls-testssl");
    let findings = testssl(&format!(
        "https://127.0.0.1:{}/v1/models",
        t.gw.addr().port()
    ));
    findings.assert_tls13_only_with_hsts();
    assert_eq!(findings.get("ALPN"), "http/1.1");
}

#[test]
fn the_admin_listener_serves_tls_1_3_with_hsts_when_the_node_does() {
    let t = tls_gateway(DriverChoice::IoUring, "tls-admin");
    let ca = t.ca.pem();
    let admin = t.gw.admin_addr();
    let mut tls = connect_tls(admin, &ca, &[&rustls::version::TLS13]);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = send(
            &mut tls,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("strict-transport-security"), Some(HSTS), "{path}");
    }
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // In clear: no answer, the connection closed.
    let got = in_clear(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        !got.contains("HTTP/1.1"),
        "the admin listener answered in clear: {got:?}"
    );
}
