//! A data-plane node against a scripted control plane over the real TLS link.
//!
//! A record the node cannot apply (a route naming an upstream its environment lacks, an
//! upstream of a provider kind it does not know, an unusable base URL) is isolated: the node
//! applies every other record of the revision — other tenants, and key revocations in the
//! same change set — acknowledges it with the record reported, and answers that tenant
//! environment's requests for the broken route with `route_unavailable`. Revisions that do
//! not fit together (snapshot parts out of order, changes that would go backwards) are
//! refused with a NACK and reach no worker.
//!
//! The real control plane checks every record with the nodes' own rules and never sends
//! such records (short of a newer control plane's provider kind), so the test speaks the
//! protocol itself: a real control plane is started once only to generate the link's PKI
//! and node token, then stopped, and a blocking rustls server on its certificate plays the
//! control plane frame by frame.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigw_wire::keys::{assemble, hash, Environment, HASH_VERSION};
use aigw_wire::messages::kinds;
use aigw_wire::{
    decode_frame, encode_frame, Change, Frame, KeyRecord, KeyStatus, Message, Record, RouteRecord,
    RouteTargetRecord, UpstreamRecord, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use e2e::cp::{chat_with_key, gateway_with, wait_workers};
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;

/// How long any single wait on the link may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const TENANT: &str = "acme";
const OTHER: &str = "beta";
const ENV: &str = "production";
const KEY_ID: &str = "nackKey00001";
const OTHER_KEY_ID: &str = "betaKey00001";
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

    /// Whether the node presented a client certificate (the CA's, as the TLS layer checked).
    fn client_certified(&self) -> bool {
        self.tls
            .conn
            .peer_certificates()
            .is_some_and(|c| !c.is_empty())
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
                    // Usage is not this fake control plane's concern (never acknowledged,
                    // so the node keeps it).
                    Frame::Message(Message::UsageReport { .. } | Message::BodyLog { .. }) => {
                        continue
                    }
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
        assert_eq!(
            self.push(m),
            Message::Ack {
                revision,
                problems: vec![],
                problems_total: 0
            }
        );
    }

    /// Pushes `m`, expects an Ack of `revision`, and returns the problems it reports, as
    /// (kind, id, error).
    fn expect_ack_with_problems(
        &mut self,
        m: &Message,
        revision: u64,
    ) -> Vec<(u64, String, String)> {
        match self.push(m) {
            Message::Ack {
                revision: r,
                problems,
                problems_total,
            } if r == revision => {
                assert_eq!(problems_total as usize, problems.len());
                problems
                    .into_iter()
                    .map(|p| (p.kind, p.id, p.error))
                    .collect()
            }
            other => panic!("expected an Ack of revision {revision}, got {other:?}"),
        }
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
    key_record_of(TENANT, KEY_ID, key, status)
}

fn key_record_of(tenant: &str, key_id: &str, key: &str, status: KeyStatus) -> Record {
    Record::Key(KeyRecord {
        sub_account_parents: Vec::new(),
        key_id: key_id.into(),
        tenant_id: tenant.into(),
        environment: ENV.into(),
        sub_account_id: None,
        hash_version: HASH_VERSION,
        hash: hash(key),
        status,
        expires_at: 0,
        grace_ends_at: 0,
        allowed_models: vec![],
        rate_limits: Default::default(),
    })
}

fn upstream_record(base_url: &str) -> Record {
    upstream_record_of(TENANT, "openai", base_url)
}

fn upstream_record_of(tenant: &str, provider: &str, base_url: &str) -> Record {
    Record::Upstream(UpstreamRecord {
        id: format!("{tenant}/{ENV}/oa"),
        tenant_id: tenant.into(),
        environment: ENV.into(),
        name: "oa".into(),
        provider: provider.into(),
        base_url: base_url.into(),
        credential: Some("sk-upstream".into()),
        non_retention: aigw_wire::NonRetention::AccountAgreement {},
        ..Default::default()
    })
}

/// Every model of the environment to the upstream named `upstream`.
fn route_record(upstream: &str) -> Record {
    route_record_of(TENANT, upstream)
}

fn route_record_of(tenant: &str, upstream: &str) -> Record {
    Record::Route(RouteRecord {
        id: format!("{tenant}/{ENV}/all"),
        tenant_id: tenant.into(),
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
    let held = admin_get(gw.admin_addr(), "/workers").json()["config_revision"]
        .as_i64()
        .unwrap();
    let workers = workers(gw.admin_addr())
        .iter()
        .map(|w| w["config_revision"].as_i64().unwrap())
        .collect();
    (held, workers)
}

/// After a refusal: nothing was published, on the control thread nor on any worker. The
/// node publishes a revision before it answers for it, and the revision it holds is what
/// it last published: once the refusal is in, a published table would show here at once.
fn still_at(gw: &Gateway, revision: i64) {
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

/// One request with the key is refused because its route cannot be used, naming why,
/// without reaching the mock.
fn unusable(gw: &Gateway, mock: &MockProvider, key: &str, why: &str) {
    let before = mock.request_count();
    let r = chat_with_key(gw.addr(), Some(key), "m");
    let v = r.json();
    assert_eq!(
        (r.status, v["error"]["code"].as_str()),
        (503, Some("route_unavailable")),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
    assert_eq!(mock.request_count(), before, "nothing reached the mock");
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

both_drivers!(
    unusable_records_are_isolated_and_revisions_that_do_not_fit_are_refused,
    |driver| {
        // The link's PKI and the node's identity come from a real control plane, stopped at
        // once.
        let dir = scratch_dir(&format!("nack-e2e-{driver:?}"));
        let cp = e2e::cp::cp_start(dir.clone(), "127.0.0.1:0");
        let enrolled = e2e::cp::enrolled(&cp);
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

        let gw = gateway_with(driver, &enrolled.at(fake_addr), |_| {});
        let mut link = FakeControlPlane::accept(&listener, tls);

        // The node introduces itself with nothing held, and is not ready before a config.
        match link.recv() {
            Message::Hello {
                protocol_version,
                node_id,
                revision_held,
                ..
            } => {
                assert_eq!(protocol_version, PROTOCOL_VERSION);
                assert_eq!(node_id, enrolled.node_id, "the id it enrolled with");
                assert_eq!(revision_held, 0);
                assert!(link.client_certified(), "the node presents its certificate");
            }
            other => panic!("expected Hello first, got {other:?}"),
        }
        let ready = admin_get(gw.admin_addr(), "/readyz");
        assert_eq!(ready.status, 503);
        assert_eq!(ready.json()["config_loaded"].as_bool(), Some(false));

        let other_key = assemble(
            Environment::Production,
            OTHER_KEY_ID,
            "zyxwvutsrqZYXWVUTSRQ9876543210",
        );
        let beta = |status| {
            vec![
                key_record_of(OTHER, OTHER_KEY_ID, &other_key, status),
                upstream_record_of(OTHER, "openai", &mock.base_url()),
                route_record_of(OTHER, "oa"),
            ]
        };

        // 1. A valid snapshot of two tenants: acknowledged, on every worker, both served.
        let mut records = vec![
            key_record(&key, KeyStatus::Active),
            upstream_record(&mock.base_url()),
            route_record("oa"),
        ];
        records.extend(beta(KeyStatus::Active));
        link.expect_ack(
            &Message::Snapshot {
                revision: 5,
                part: 0,
                parts: 1,
                records,
                revision_id: 0,
            },
            5,
        );
        wait_workers(&gw, 5);
        still_at(&gw, 5);
        served(&gw, &mock, &key);
        served(&gw, &mock, &other_key);

        // 2. Acme's route names an upstream its environment lacks, in the same change set as a
        //    revocation of beta's key: the revocation applies, acme's route is reported and out
        //    of use, and nothing else changes.
        let problems = link.expect_ack_with_problems(
            &Message::Changes {
                from_revision: 5,
                to_revision: 6,
                changes: vec![
                    Change::Upsert(key_record_of(
                        OTHER,
                        OTHER_KEY_ID,
                        &other_key,
                        KeyStatus::Revoked,
                    )),
                    Change::Upsert(route_record("missing")),
                ],
                revision_id: 0,
            },
            6,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            (problems[0].0, problems[0].1.as_str()),
            (kinds::ROUTE, ROUTE_ID)
        );
        assert!(
            problems[0].2.contains("missing does not exist"),
            "{problems:?}"
        );
        wait_workers(&gw, 6);
        still_at(&gw, 6);
        revoked(&gw, &mock, &other_key);
        unusable(&gw, &mock, &key, "missing does not exist");

        // 3. Acme's upstream, of a provider kind this node does not know (a newer control
        //    plane's): reported, with its route; beta's key comes back.
        let problems = link.expect_ack_with_problems(
            &Message::Changes {
                from_revision: 6,
                to_revision: 7,
                changes: vec![
                    Change::Upsert(upstream_record_of(TENANT, "gemini", &mock.base_url())),
                    Change::Upsert(route_record("oa")),
                    Change::Upsert(key_record_of(
                        OTHER,
                        OTHER_KEY_ID,
                        &other_key,
                        KeyStatus::Active,
                    )),
                ],
                revision_id: 0,
            },
            7,
        );
        let ids: Vec<&str> = problems.iter().map(|p| p.1.as_str()).collect();
        assert_eq!(ids, [UPSTREAM_ID, ROUTE_ID], "{problems:?}");
        assert!(problems[0].2.contains("provider"), "{problems:?}");
        wait_workers(&gw, 7);
        unusable(&gw, &mock, &key, "provider");
        served(&gw, &mock, &other_key);

        // 4. The record fixed: no problem left, acme served again.
        link.expect_ack(
            &Message::Changes {
                from_revision: 7,
                to_revision: 8,
                changes: vec![Change::Upsert(upstream_record(&mock.base_url()))],
                revision_id: 0,
            },
            8,
        );
        wait_workers(&gw, 8);
        still_at(&gw, 8);
        served(&gw, &mock, &key);
        served(&gw, &mock, &other_key);

        // 5. A snapshot in two parts whose second part holds an unusable upstream of acme's:
        //    applied, with the upstream reported; beta's revocation in it applies.
        link.send(&Message::Heartbeat { unix_ms: 2 });
        link.send(&Message::Snapshot {
            revision: 9,
            part: 0,
            parts: 2,
            records: vec![key_record(&key, KeyStatus::Active)],
            revision_id: 0,
        });
        let mut second = vec![upstream_record("ftp://x"), route_record("oa")];
        second.extend(beta(KeyStatus::Revoked));
        let problems = link.expect_ack_with_problems(
            &Message::Snapshot {
                revision: 9,
                part: 1,
                parts: 2,
                records: second,
                revision_id: 0,
            },
            9,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].2.contains("ftp://x"),
            "the error names the URL: {problems:?}"
        );
        wait_workers(&gw, 9);
        unusable(&gw, &mock, &key, "ftp://x");
        revoked(&gw, &mock, &other_key);

        // 6. A valid two-part snapshot clears everything.
        link.send(&Message::Snapshot {
            revision: 10,
            part: 0,
            parts: 2,
            records: vec![key_record(&key, KeyStatus::Active)],
            revision_id: 0,
        });
        let mut second = vec![upstream_record(&mock.base_url()), route_record("oa")];
        second.extend(beta(KeyStatus::Active));
        link.expect_ack(
            &Message::Snapshot {
                revision: 10,
                part: 1,
                parts: 2,
                records: second,
                revision_id: 0,
            },
            10,
        );
        wait_workers(&gw, 10);
        still_at(&gw, 10);
        served(&gw, &mock, &key);
        served(&gw, &mock, &other_key);

        // 7. Snapshots whose parts do not fit together are refused: a skipped part, parts of two
        //    revisions, a part number past the count.
        link.send(&Message::Snapshot {
            revision: 11,
            part: 0,
            parts: 3,
            records: vec![key_record(&key, KeyStatus::Revoked)],
            revision_id: 0,
        });
        let error = link.expect_nack(
            &Message::Snapshot {
                revision: 11,
                part: 2,
                parts: 3,
                records: vec![upstream_record(&mock.base_url()), route_record("oa")],
                revision_id: 0,
            },
            11,
        );
        assert!(error.contains("expected part 1/3"), "{error}");
        link.send(&Message::Snapshot {
            revision: 12,
            part: 0,
            parts: 2,
            records: vec![key_record(&key, KeyStatus::Revoked)],
            revision_id: 0,
        });
        link.expect_nack(
            &Message::Snapshot {
                revision: 13,
                part: 1,
                parts: 2,
                records: vec![upstream_record(&mock.base_url()), route_record("oa")],
                revision_id: 0,
            },
            13,
        );
        link.expect_nack(
            &Message::Snapshot {
                revision: 14,
                part: 2,
                parts: 2,
                records: vec![],
                revision_id: 0,
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
                revision_id: 0,
            },
            6,
        );
        assert!(error.contains("do not move this node past 10"), "{error}");
        still_at(&gw, 10);
        served(&gw, &mock, &key);

        gw.stop();
    }
);

// A node that keeps hearing from its control plane but stands on a refused revision is not
// current: past `max_stale` it is not ready and answers `stale_config`, until a revision
// applies again.
both_drivers!(
    a_node_that_is_connected_but_not_applying_goes_stale,
    |driver| {
        let dir = scratch_dir(&format!("nack-stale-{driver:?}"));
        let cp = e2e::cp::cp_start(dir.clone(), "127.0.0.1:0");
        let enrolled = e2e::cp::enrolled(&cp);
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
        let gw = gateway_with(driver, &enrolled.at(fake_addr), |c| {
            c.max_stale = Duration::from_secs(1);
        });
        let mut link = FakeControlPlane::accept(&listener, tls);
        assert!(matches!(link.recv(), Message::Hello { .. }));
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
                revision_id: 0,
            },
            5,
        );
        wait_workers(&gw, 5);
        served(&gw, &mock, &key);
        // A snapshot whose parts do not fit: refused. Heartbeats keep coming.
        link.send(&Message::Snapshot {
            revision: 6,
            part: 0,
            parts: 2,
            records: vec![],
            revision_id: 0,
        });
        link.expect_nack(
            &Message::Snapshot {
                revision: 7,
                part: 1,
                parts: 2,
                records: vec![],
                revision_id: 0,
            },
            7,
        );
        let stale = wait_until(Duration::from_secs(10), || {
            link.send(&Message::Heartbeat { unix_ms: 3 });
            assert!(matches!(link.recv(), Message::Heartbeat { .. }));
            admin_get(gw.admin_addr(), "/readyz").status == 503
        });
        assert!(stale, "the node went stale while connected");
        let r = chat_with_key(gw.addr(), Some(&key), "m");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (503, Some("stale_config"))
        );
        // A revision that applies makes it current again.
        link.expect_ack(
            &Message::Changes {
                from_revision: 5,
                to_revision: 8,
                changes: vec![Change::Upsert(key_record(&key, KeyStatus::Active))],
                revision_id: 0,
            },
            8,
        );
        assert!(wait_until(Duration::from_secs(5), || {
            admin_get(gw.admin_addr(), "/readyz").status == 200
        }));
        served(&gw, &mock, &key);
        gw.stop();
    }
);
