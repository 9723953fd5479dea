//! A data-plane node against a scripted control plane over the real TLS link: revisions the
//! node cannot use (a route naming an upstream its environment lacks, a route left dangling
//! by a deleted upstream, an unusable base URL) are refused with a NACK and reach no worker;
//! the node keeps serving its previous configuration, and valid revisions after a refusal
//! still apply.
//!
//! The real control plane validates everything itself and never sends such revisions, so the
//! test speaks the protocol itself: a real control plane is started once only to generate the
//! link's PKI and node token, then stopped, and a blocking rustls server on its certificate
//! plays the control plane frame by frame.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigw_wire::keys::{assemble, hash, Environment, HASH_VERSION};
use aigw_wire::messages::kinds;
use aigw_wire::{
    decode_frame, encode_frame, Change, Frame, KeyRecord, KeyStatus, Message, Record, RouteRecord,
    RouteTargetRecord, Tombstone, UpstreamRecord, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use e2e::cp::{chat_with_key, gateway_with, wait_workers};
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;

/// How long any single wait on the link may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const TENANT: &str = "acme";
const ENV: &str = "production";
const KEY_ID: &str = "nackKey00001";
const UPSTREAM_ID: &str = "acme/production/oa";
const ROUTE_ID: &str = "acme/production/all";

/// The control plane's end of one link, driven step by step by the test.
struct FakeControlPlane {
    tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    buf: Vec<u8>,
}

impl FakeControlPlane {
    /// Waits for the node to connect (the TLS handshake runs on the first read).
    fn accept(listener: &TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + IO_TIMEOUT;
        let tcp = loop {
            match listener.accept() {
                Ok((tcp, _)) => break tcp,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "the node never connected to the control plane"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ServerConnection::new(config).unwrap();
        Self {
            tls: rustls::StreamOwned::new(conn, tcp),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, m: &Message) {
        let mut out = Vec::new();
        encode_frame(m, &mut out);
        self.tls.write_all(&out).expect("writing to the node");
        self.tls.flush().expect("flushing to the node");
    }

    /// The next message from the node; fails on a timeout or a closed link.
    fn recv(&mut self) -> Message {
        loop {
            if let Some((frame, used)) =
                decode_frame(&self.buf, DEFAULT_MAX_FRAME).expect("a well-formed frame")
            {
                self.buf.drain(..used);
                match frame {
                    Frame::Message(m) => return m,
                    Frame::Unknown(code) => panic!("the node sent an unknown message type {code}"),
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.tls.read(&mut chunk) {
                Ok(0) => panic!("the node closed the link"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading from the node: {e}"),
            }
        }
    }

    /// The node's answer to what was just sent: the next Ack or Nack, heartbeats skipped.
    fn answer(&mut self) -> Message {
        loop {
            match self.recv() {
                Message::Heartbeat { .. } => {}
                m @ (Message::Ack { .. } | Message::Nack { .. }) => return m,
                other => panic!("expected an Ack or a Nack, got {other:?}"),
            }
        }
    }

    /// Sends a heartbeat (the node echoes it) then `m`, and returns the node's answer.
    fn push(&mut self, m: &Message) -> Message {
        self.send(&Message::Heartbeat { unix_ms: 1 });
        self.send(m);
        self.answer()
    }

    fn expect_ack(&mut self, m: &Message, revision: u64) {
        assert_eq!(self.push(m), Message::Ack { revision });
    }

    /// Pushes `m`, expects a Nack of `revision`, and returns its error text.
    fn expect_nack(&mut self, m: &Message, revision: u64) -> String {
        match self.push(m) {
            Message::Nack { revision: r, error } if r == revision => error,
            other => panic!("expected a Nack of revision {revision}, got {other:?}"),
        }
    }
}

fn key_record(key: &str, status: KeyStatus) -> Record {
    Record::Key(KeyRecord {
        key_id: KEY_ID.into(),
        tenant_id: TENANT.into(),
        environment: ENV.into(),
        sub_account_id: None,
        hash_version: HASH_VERSION,
        hash: hash(key),
        status,
        expires_at: 0,
        grace_ends_at: 0,
        allowed_models: vec![],
    })
}

fn upstream_record(base_url: &str) -> Record {
    Record::Upstream(UpstreamRecord {
        id: UPSTREAM_ID.into(),
        tenant_id: TENANT.into(),
        environment: ENV.into(),
        name: "oa".into(),
        provider: "openai".into(),
        base_url: base_url.into(),
        credential: Some("sk-upstream".into()),
        ..Default::default()
    })
}

/// Every model of the environment to the upstream named `upstream`.
fn route_record(upstream: &str) -> Record {
    Record::Route(RouteRecord {
        id: ROUTE_ID.into(),
        tenant_id: TENANT.into(),
        environment: ENV.into(),
        model: None,
        prefix: Some(String::new()),
        targets: vec![RouteTargetRecord {
            upstream: upstream.into(),
            model: None,
        }],
    })
}

/// The node's revision, as the control thread holds it and as each worker reports it.
fn revisions(gw: &Gateway) -> (i64, Vec<i64>) {
    let v = admin_get(gw.admin_addr(), "/workers").json();
    let workers = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["config_revision"].as_i64().unwrap())
        .collect();
    (v["config_revision"].as_i64().unwrap(), workers)
}

/// After a refusal: nothing was published, on the control thread nor on any worker.
fn still_at(gw: &Gateway, revision: i64) {
    // Give a wrongly published table time to reach the workers before looking.
    std::thread::sleep(Duration::from_millis(300));
    let (held, workers) = revisions(gw);
    assert_eq!(held, revision, "the node's revision moved: {workers:?}");
    assert!(
        !workers.is_empty() && workers.iter().all(|&r| r == revision),
        "every worker stays at {revision}: {workers:?}"
    );
    let ready = admin_get(gw.admin_addr(), "/readyz");
    assert_eq!(ready.status, 200, "the node keeps serving");
    assert_eq!(ready.json()["config_revision"].as_i64(), Some(revision));
}

/// One request with the key reaches the mock and succeeds.
fn served(gw: &Gateway, mock: &MockProvider, key: &str) {
    let before = mock.request_count();
    let r = chat_with_key(gw.addr(), Some(key), "m");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        mock.request_count(),
        before + 1,
        "the request reached the mock"
    );
}

/// One request with the key is refused as revoked, without reaching the mock.
fn revoked(gw: &Gateway, mock: &MockProvider, key: &str) {
    let before = mock.request_count();
    let r = chat_with_key(gw.addr(), Some(key), "m");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("revoked_api_key"))
    );
    assert_eq!(mock.request_count(), before, "nothing reached the mock");
}

both_drivers!(refused_revisions_reach_no_worker, |driver| {
    // The link's PKI and node token come from a real control plane, stopped at once.
    let dir = scratch_dir(&format!("nack-e2e-{driver:?}"));
    let cp = e2e::cp::cp_start(dir.clone(), "127.0.0.1:0");
    let node_token = cp.node_token.clone();
    let ca_file = cp.ca_file.clone();
    cp.stop();
    let tls = controlplane::pki::Pki::under(&dir)
        .server_config()
        .expect("the control plane's server certificate");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = listener.local_addr().unwrap();

    let mock = MockProvider::start(MockOptions::default());
    let key = assemble(
        Environment::Production,
        KEY_ID,
        "abcdefghijABCDEFGHIJ0123456789",
    );
    aigw_wire::keys::parse(&key).expect("a well-formed key");

    let gw = gateway_with(driver, fake_addr, &node_token, &ca_file, |_| {});
    let mut link = FakeControlPlane::accept(&listener, tls);

    // The node introduces itself with nothing held, and is not ready before a config.
    match link.recv() {
        Message::Hello {
            protocol_version,
            node_id,
            revision_held,
            token,
            ..
        } => {
            assert_eq!(protocol_version, PROTOCOL_VERSION);
            assert_eq!(node_id, format!("node-{driver:?}"));
            assert_eq!(revision_held, 0);
            assert_eq!(token, node_token, "the node presents its token");
        }
        other => panic!("expected Hello first, got {other:?}"),
    }
    let ready = admin_get(gw.admin_addr(), "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["config_loaded"].as_bool(), Some(false));

    // 1. A valid snapshot: acknowledged, on every worker, and the key's requests are served.
    link.expect_ack(
        &Message::Snapshot {
            revision: 5,
            part: 0,
            parts: 1,
            records: vec![
                key_record(&key, KeyStatus::Active),
                upstream_record(&mock.base_url()),
                route_record("oa"),
            ],
        },
        5,
    );
    wait_workers(&gw, 5);
    still_at(&gw, 5);
    served(&gw, &mock, &key);

    // 2. A route to an upstream the environment lacks: the whole change set is refused,
    //    the key revocation it also carries included.
    let error = link.expect_nack(
        &Message::Changes {
            from_revision: 5,
            to_revision: 6,
            changes: vec![
                Change::Upsert(key_record(&key, KeyStatus::Revoked)),
                Change::Upsert(route_record("missing")),
            ],
        },
        6,
    );
    assert!(error.contains("\"missing\""), "the error names it: {error}");
    assert!(error.contains("does not exist"), "{error}");
    still_at(&gw, 5);
    served(&gw, &mock, &key);

    // 3. Deleting the upstream the route names leaves the route dangling: refused.
    let error = link.expect_nack(
        &Message::Changes {
            from_revision: 5,
            to_revision: 7,
            changes: vec![
                Change::Upsert(key_record(&key, KeyStatus::Revoked)),
                Change::Delete(Tombstone {
                    kind: kinds::UPSTREAM,
                    id: UPSTREAM_ID.into(),
                }),
            ],
        },
        7,
    );
    assert!(error.contains("\"oa\" does not exist"), "{error}");
    still_at(&gw, 5);
    served(&gw, &mock, &key);

    // 4. A valid revocation after the refusals: acknowledged and enforced everywhere.
    link.expect_ack(
        &Message::Changes {
            from_revision: 5,
            to_revision: 8,
            changes: vec![Change::Upsert(key_record(&key, KeyStatus::Revoked))],
        },
        8,
    );
    wait_workers(&gw, 8);
    still_at(&gw, 8);
    revoked(&gw, &mock, &key);

    // 5. A snapshot in two parts whose second part holds an unusable upstream: refused
    //    whole, the reactivated key of its first part included.
    link.send(&Message::Heartbeat { unix_ms: 2 });
    link.send(&Message::Snapshot {
        revision: 9,
        part: 0,
        parts: 2,
        records: vec![key_record(&key, KeyStatus::Active)],
    });
    let error = link.expect_nack(
        &Message::Snapshot {
            revision: 9,
            part: 1,
            parts: 2,
            records: vec![upstream_record("ftp://x"), route_record("oa")],
        },
        9,
    );
    assert!(
        error.contains("ftp://x"),
        "the error names the URL: {error}"
    );
    still_at(&gw, 8);
    revoked(&gw, &mock, &key);

    // 6. The link survived every refusal: a valid two-part snapshot applies.
    link.send(&Message::Snapshot {
        revision: 10,
        part: 0,
        parts: 2,
        records: vec![key_record(&key, KeyStatus::Active)],
    });
    link.expect_ack(
        &Message::Snapshot {
            revision: 10,
            part: 1,
            parts: 2,
            records: vec![upstream_record(&mock.base_url()), route_record("oa")],
        },
        10,
    );
    wait_workers(&gw, 10);
    still_at(&gw, 10);
    served(&gw, &mock, &key);

    // 7. Snapshots whose parts do not fit together are refused: a skipped part, parts of two
    //    revisions, a part number past the count.
    link.send(&Message::Snapshot {
        revision: 11,
        part: 0,
        parts: 3,
        records: vec![key_record(&key, KeyStatus::Revoked)],
    });
    let error = link.expect_nack(
        &Message::Snapshot {
            revision: 11,
            part: 2,
            parts: 3,
            records: vec![upstream_record(&mock.base_url()), route_record("oa")],
        },
        11,
    );
    assert!(error.contains("expected part 1/3"), "{error}");
    link.send(&Message::Snapshot {
        revision: 12,
        part: 0,
        parts: 2,
        records: vec![key_record(&key, KeyStatus::Revoked)],
    });
    link.expect_nack(
        &Message::Snapshot {
            revision: 13,
            part: 1,
            parts: 2,
            records: vec![upstream_record(&mock.base_url()), route_record("oa")],
        },
        13,
    );
    link.expect_nack(
        &Message::Snapshot {
            revision: 14,
            part: 2,
            parts: 2,
            records: vec![],
        },
        14,
    );
    still_at(&gw, 10);
    served(&gw, &mock, &key);

    // 8. Changes that would take the node backwards are refused.
    let error = link.expect_nack(
        &Message::Changes {
            from_revision: 5,
            to_revision: 6,
            changes: vec![Change::Upsert(key_record(&key, KeyStatus::Revoked))],
        },
        6,
    );
    assert!(error.contains("do not move this node past 10"), "{error}");
    still_at(&gw, 10);
    served(&gw, &mock, &key);

    gw.stop();
});
