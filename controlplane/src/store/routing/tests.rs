//! The routing store end to end: sealing, validation, changes, compaction, audit.

use super::*;
use crate::store::tests::{actor, kek, temp};
use crate::store::Store;
use aigw_seal::Kek;
use aigw_wire::messages::kinds;
use aigw_wire::{Change, Record, Tombstone};
use rusqlite::Connection;

const SECRET: &str = "sk-test-PLAINTEXT-credential-0123456789";
const PROD: Environment = Environment::Production;

fn upstream(credential: Option<&str>) -> UpstreamSpec {
    UpstreamSpec {
        provider: "openai".into(),
        base_url: "http://127.0.0.1:9000/v1".into(),
        credential: credential.map(Into::into),
        non_retention: Some(NonRetention::Header {
            name: "x-no-retain".into(),
            value: "1".into(),
        }),
        stream_options: true,
        region: "eu".into(),
        baa: false,
        pass_organization_headers: false,
        max_connections: 8,
        connect_timeout_ms: 1000,
        first_byte_timeout_ms: 0,
        read_idle_timeout_ms: 0,
    }
}

fn route(model: &str, targets: &[&str]) -> RouteSpec {
    RouteSpec {
        model: Some(model.into()),
        prefix: None,
        targets: targets
            .iter()
            .map(|t| RouteTarget {
                upstream: (*t).into(),
                model: None,
            })
            .collect(),
    }
}

/// A store with tenant `t`.
fn store() -> (Store, std::path::PathBuf) {
    let dir = temp();
    let s = Store::open(&dir, kek()).expect("opens");
    s.create_tenant(&actor(), "t", "T", "pro").expect("tenant");
    (s, dir)
}

fn snapshot_upstream(s: &Store, id: &str) -> UpstreamRecord {
    let (records, _, _) = s.snapshot().expect("snapshot");
    records
        .into_iter()
        .find_map(|r| match r {
            Record::Upstream(u) if u.id == id => Some(u),
            _ => None,
        })
        .expect("upstream in the snapshot")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn error_of<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn credentials_are_sealed_at_rest_and_open_only_with_the_key() {
    let (s, dir) = store();
    let w = s
        .put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
        .expect("put");
    assert_eq!(w.record.id, "t/production/oa");
    assert!(w.record.has_credential);
    let json = serde_json::to_string(&w).expect("json");
    assert!(
        !json.contains(SECRET),
        "the API view has no credential: {json}"
    );
    assert!(json.contains("\"has_credential\":true"));
    assert!(!format!("{:?}", upstream(Some(SECRET))).contains(SECRET));

    // Not in the column, not anywhere in the database files.
    {
        let c = Connection::open(dir.join("controlplane.db")).expect("raw");
        let sealed: Vec<u8> = c
            .query_row(
                "SELECT credential_sealed FROM upstreams WHERE id = 't/production/oa'",
                [],
                |r| r.get(0),
            )
            .expect("column");
        assert!(!sealed.is_empty() && !contains(&sealed, SECRET));
    }
    for f in ["controlplane.db", "controlplane.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            assert!(!contains(&bytes, SECRET), "{f} holds the plaintext");
        }
    }
    // Nodes get the plaintext.
    assert_eq!(
        snapshot_upstream(&s, "t/production/oa")
            .credential
            .as_deref(),
        Some(SECRET)
    );

    // Omitted: kept. Empty: removed.
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
        .expect("put without credential");
    assert_eq!(
        snapshot_upstream(&s, "t/production/oa")
            .credential
            .as_deref(),
        Some(SECRET)
    );
    drop(s);

    // The right key opens it after a restart; a wrong key is refused at open.
    let s = Store::open(&dir, kek()).expect("reopens");
    assert_eq!(
        snapshot_upstream(&s, "t/production/oa")
            .credential
            .as_deref(),
        Some(SECRET)
    );
    drop(s);
    let wrong = Kek::from_hex(&"cd".repeat(32)).expect("hex");
    match Store::open(&dir, wrong) {
        Err(StoreError::Seal(m)) => assert!(m.contains("seal key"), "{m}"),
        other => panic!("a wrong key must be refused, got {other:?}"),
    }

    let s = Store::open(&dir, kek()).expect("reopens");
    let w = s
        .put_upstream(&actor(), "t", PROD, "oa", &upstream(Some("")))
        .expect("remove");
    assert!(!w.record.has_credential);
    assert_eq!(snapshot_upstream(&s, "t/production/oa").credential, None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sealed_credential_moved_to_another_upstream_does_not_open() {
    let (s, dir) = store();
    s.put_upstream(&actor(), "t", PROD, "a", &upstream(Some(SECRET)))
        .expect("a");
    s.put_upstream(&actor(), "t", PROD, "b", &upstream(None))
        .expect("b");
    drop(s);
    {
        let c = Connection::open(dir.join("controlplane.db")).expect("raw");
        c.execute(
            "UPDATE upstreams SET credential_sealed = (SELECT credential_sealed FROM upstreams WHERE id = 't/production/a') WHERE id = 't/production/b'",
            [],
        )
        .expect("copy");
    }
    let s = Store::open(&dir, kek()).expect("opens (a's credential is intact)");
    match s.snapshot() {
        Err(StoreError::Seal(m)) => assert!(m.contains("another upstream"), "{m}"),
        other => panic!("expected a seal error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn changes_since_sends_current_records_and_tombstones() {
    let (s, dir) = store();
    let r_tenant = s.revision().expect("rev");
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
        .expect("upstream");
    let r_upstream = s.revision().expect("rev");
    let w = s
        .put_route(&actor(), "t", PROD, "gpt", &route("gpt-4o", &["oa"]))
        .expect("route");
    assert_eq!(w.revision, r_upstream + 1);

    let (changes, newest) = s.changes_since(r_upstream).expect("read").expect("kept");
    assert_eq!(newest, w.revision);
    assert_eq!(changes.len(), 1);
    match &changes[0] {
        Change::Upsert(Record::Route(r)) => {
            assert_eq!(r.id, "t/production/gpt");
            assert_eq!(r.model.as_deref(), Some("gpt-4o"));
            assert_eq!(r.targets[0].upstream, "oa");
        }
        other => panic!("expected the route, got {other:?}"),
    }

    let d = s.delete_route(&actor(), "t", PROD, "gpt").expect("delete");
    assert_eq!(d.deleted, "t/production/gpt");
    let (changes, newest) = s.changes_since(r_upstream).expect("read").expect("kept");
    assert_eq!(newest, d.revision);
    assert_eq!(
        changes,
        vec![Change::Delete(Tombstone {
            kind: kinds::ROUTE,
            id: "t/production/gpt".into()
        })]
    );

    // From before the upstream: the upstream (with its credential) and the tombstone; the
    // tenant itself is not something nodes hold.
    s.put_policy(
        &actor(),
        "t",
        PROD,
        &PolicySpec {
            zero_retention: true,
            region: "eu".into(),
            hipaa: false,
            guardrails: Default::default(),
            revoke_leaked_keys: false,
            guardrails_fail_open: false,
            patterns: Vec::new(),
        },
    )
    .expect("policy");
    let (changes, _) = s.changes_since(r_tenant - 1).expect("read").expect("kept");
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(
        matches!(&changes[0], Change::Upsert(Record::Upstream(u)) if u.credential.as_deref() == Some(SECRET))
    );
    assert!(
        matches!(&changes[1], Change::Upsert(Record::Policy(p)) if p.zero_retention && p.region == "eu")
    );
    assert!(matches!(&changes[2], Change::Delete(t) if t.kind == kinds::ROUTE));

    // Bounded: more records changed than asked for is a snapshot's job.
    assert!(s
        .changes_since_at_most(r_tenant - 1, 2)
        .expect("read")
        .is_none());
    assert_eq!(
        s.changes_since_at_most(r_tenant - 1, 3)
            .expect("read")
            .map(|(c, _, _)| c.len()),
        Some(3)
    );

    // Nothing after the newest.
    let newest = s.revision().expect("rev");
    let (changes, n) = s.changes_since(newest).expect("read").expect("kept");
    assert!(changes.is_empty());
    assert_eq!(n, newest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn change_sets_order_upstreams_before_the_routes_that_name_them() {
    let (s, dir) = store();
    let from = s.revision().expect("rev");
    s.put_upstream(&actor(), "t", PROD, "old", &upstream(None))
        .expect("old");
    s.put_route(&actor(), "t", PROD, "r", &route("m", &["old"]))
        .expect("route");
    // The route moves to a new upstream created after it; the old upstream goes.
    s.put_upstream(&actor(), "t", PROD, "new", &upstream(None))
        .expect("new");
    s.put_route(&actor(), "t", PROD, "r", &route("m", &["new"]))
        .expect("move");
    s.delete_upstream(&actor(), "t", PROD, "old")
        .expect("delete");
    // Touch the new upstream again so its last change comes after the route's.
    s.put_upstream(&actor(), "t", PROD, "new", &upstream(None))
        .expect("new again");
    let (changes, _) = s.changes_since(from).expect("read").expect("kept");
    let order: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Upsert(r) => format!("upsert {}", record_id_of(r)),
            Change::Delete(t) => format!("delete {}", t.id),
        })
        .collect();
    assert_eq!(
        order,
        [
            "upsert t/production/new",
            "upsert t/production/r",
            "delete t/production/old"
        ]
    );
    let (records, _, _) = s.snapshot().expect("snapshot");
    let kinds: Vec<u64> = records.iter().map(Record::kind).collect();
    let mut sorted = kinds.clone();
    sorted.sort_unstable();
    assert_eq!(kinds, sorted, "snapshot: keys, upstreams, routes, policies");
    let _ = std::fs::remove_dir_all(&dir);
}

fn record_id_of(r: &Record) -> String {
    r.id().to_string()
}

#[test]
fn compaction_forgets_old_revisions_but_never_reuses_one() {
    let (s, dir) = store();
    for i in 0..5 {
        s.put_upstream(&actor(), "t", PROD, &format!("u{i}"), &upstream(None))
            .expect("upstream");
    }
    let newest = s.revision().expect("rev");
    assert_eq!(newest, 6);
    let c = s.compact(&actor(), 2).expect("compact");
    assert_eq!(
        c,
        crate::store::Compaction {
            compacted_through: 4,
            revision: 6,
            deleted: 4
        }
    );
    assert!(s.changes_since(1).expect("read").is_none());
    assert!(s.changes_since(3).expect("read").is_none());
    let (changes, n) = s.changes_since(4).expect("read").expect("kept");
    assert_eq!((changes.len(), n), (2, 6));
    assert_eq!(
        s.compact(&actor(), 2).expect("again").deleted,
        0,
        "nothing more to delete"
    );

    // Everything compacted: the revision still only moves forward, across restarts.
    let c = s.compact(&actor(), 0).expect("all");
    assert_eq!((c.compacted_through, c.revision), (6, 6));
    assert_eq!(s.revision().expect("rev"), 6);
    assert!(s.changes_since(5).expect("read").is_none());
    let (changes, n) = s.changes_since(6).expect("read").expect("kept");
    assert!(changes.is_empty());
    assert_eq!(n, 6);
    drop(s);
    let s = Store::open(&dir, kek()).expect("reopens");
    assert_eq!(s.revision().expect("rev"), 6);
    let w = s
        .put_route(&actor(), "t", PROD, "r", &route("m", &["u0"]))
        .expect("route");
    assert_eq!(w.revision, 7);
    let (changes, _) = s.changes_since(6).expect("read").expect("kept");
    assert_eq!(changes.len(), 1);

    let e = s.compact(&actor(), -1).expect_err("negative");
    assert!(e.to_string().starts_with("keep:"), "{e}");
    // Operator compactions are audited; periodic ones only when they delete something.
    let audited = |s: &Store| {
        s.audit(0, 10_000)
            .expect("audit")
            .iter()
            .filter(|a| a.action == "changelog.compact")
            .count()
    };
    assert_eq!(audited(&s), 3);
    s.compact_periodic(10).expect("periodic");
    assert_eq!(audited(&s), 3);
    s.compact_periodic(0).expect("periodic");
    assert_eq!(audited(&s), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_upstream_a_route_names_cannot_be_deleted() {
    let (s, dir) = store();
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
        .expect("upstream");
    s.put_upstream(&actor(), "t", Environment::Staging, "oa", &upstream(None))
        .expect("staging upstream");
    s.put_route(&actor(), "t", PROD, "gpt", &route("gpt-4o", &["oa"]))
        .expect("route");
    match s.delete_upstream(&actor(), "t", PROD, "oa") {
        Err(StoreError::Conflict(m)) => assert!(m.contains("gpt"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Another environment's upstream of the same name is free to go.
    s.delete_upstream(&actor(), "t", Environment::Staging, "oa")
        .expect("staging");
    s.delete_route(&actor(), "t", PROD, "gpt").expect("route");
    s.delete_upstream(&actor(), "t", PROD, "oa").expect("now");
    assert!(matches!(
        s.delete_upstream(&actor(), "t", PROD, "oa"),
        Err(StoreError::NotFound("upstream"))
    ));
    assert!(matches!(
        s.delete_route(&actor(), "t", PROD, "gpt"),
        Err(StoreError::NotFound("route"))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routes_name_existing_upstreams_of_their_environment() {
    let (s, dir) = store();
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
        .expect("upstream");
    s.put_upstream(
        &actor(),
        "t",
        Environment::Development,
        "dev",
        &upstream(None),
    )
    .expect("dev upstream");
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &["nope"])));
    assert!(m.starts_with("targets[0].upstream:"), "{m}");
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &["oa", "dev"])));
    assert!(m.starts_with("targets[1].upstream:"), "{m}");
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &[])));
    assert!(m.starts_with("targets:"), "{m}");
    let both = RouteSpec {
        prefix: Some("gpt-".into()),
        ..route("gpt-4o", &["oa"])
    };
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &both));
    assert!(m.contains("exactly one"), "{m}");
    let neither = RouteSpec {
        model: None,
        ..route("x", &["oa"])
    };
    assert!(error_of(s.put_route(&actor(), "t", PROD, "r", &neither)).contains("exactly one"));
    let m = error_of(s.put_route(&actor(), "t", PROD, "Bad Name", &route("m", &["oa"])));
    assert!(m.starts_with("name:"), "{m}");
    let renamed = RouteSpec {
        targets: vec![RouteTarget {
            upstream: "oa".into(),
            model: Some(String::new()),
        }],
        ..route("m", &[])
    };
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &renamed));
    assert!(m.starts_with("targets[0].model:"), "{m}");

    // An empty prefix routes every model; an empty model routes none and is refused.
    let every = RouteSpec {
        model: None,
        prefix: Some(String::new()),
        ..route("x", &["oa"])
    };
    s.put_route(&actor(), "t", PROD, "all", &every)
        .expect("catch-all");
    assert!(matches!(
        s.put_route(&actor(), "t", PROD, "all2", &every),
        Err(StoreError::Conflict(m)) if m.starts_with("prefix:")
    ));
    let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("", &["oa"])));
    assert!(m.starts_with("model:"), "{m}");

    // Two routes may not claim the same model (or prefix); replacing one's own is fine.
    s.put_route(&actor(), "t", PROD, "a", &route("gpt-4o", &["oa"]))
        .expect("a");
    s.put_route(&actor(), "t", PROD, "a", &route("gpt-4o", &["oa"]))
        .expect("a again");
    assert!(matches!(
        s.put_route(&actor(), "t", PROD, "b", &route("gpt-4o", &["oa"])),
        Err(StoreError::Conflict(m)) if m.starts_with("model:")
    ));
    assert!(matches!(
        s.put_route(&actor(), "nobody", PROD, "b", &route("x", &["oa"])),
        Err(StoreError::NotFound("tenant"))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn upstream_fields_are_validated_by_name() {
    let (s, dir) = store();
    let put = |spec: UpstreamSpec| error_of(s.put_upstream(&actor(), "t", PROD, "oa", &spec));
    let with = |f: &dyn Fn(&mut UpstreamSpec)| {
        let mut u = upstream(None);
        f(&mut u);
        u
    };
    assert!(put(with(&|u| u.provider = "azure".into())).starts_with("provider:"));
    for bad in [
        "ftp://x",
        "http://",
        "http:///path",
        "http://user:pw@host",
        "http://host/?q=1",
        "http://host/#f",
        "http://host:0",
        "http://host:99999",
        "http://ho st",
        "http://[::1",
    ] {
        let m = put(with(&|u| u.base_url = bad.into()));
        assert!(m.starts_with("base_url:"), "{bad}: {m}");
    }
    for good in [
        "https://api.openai.com/v1",
        "http://[::1]:9000",
        "http://localhost:8080",
    ] {
        s.put_upstream(
            &actor(),
            "t",
            PROD,
            "ok",
            &with(&|u| u.base_url = good.into()),
        )
        .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let m = put(with(&|u| u.credential = Some("sk-\r\nx-evil: 1".into())));
    assert!(m.starts_with("credential:") && !m.contains("evil"), "{m}");
    let m = put(with(&|u| {
        u.non_retention = Some(NonRetention::Header {
            name: "x-no-retain".into(),
            value: "1\r\nx-evil: 1".into(),
        })
    }));
    assert!(m.starts_with("non_retention.value:"), "{m}");
    let m = put(with(&|u| {
        u.non_retention = Some(NonRetention::Header {
            name: "Authorization".into(),
            value: "x".into(),
        })
    }));
    assert!(m.starts_with("non_retention.name:"), "{m}");
    let m = put(with(&|u| {
        u.non_retention = Some(NonRetention::BodyField {
            name: String::new(),
            value: aigw_wire::rules::JsonText("false".into()),
        })
    }));
    assert!(m.starts_with("non_retention.name:"), "{m}");
    assert!(put(with(&|u| u.region = "EU West".into())).starts_with("region:"));
    assert!(put(with(&|u| u.max_connections = 1 << 40)).starts_with("max_connections:"));
    assert!(put(with(&|u| u.read_idle_timeout_ms = u64::MAX)).starts_with("read_idle_timeout_ms:"));
    let m = error_of(s.put_upstream(&actor(), "t", PROD, "-x", &upstream(None)));
    assert!(m.starts_with("name:"), "{m}");
    assert!(matches!(
        s.put_upstream(&actor(), "nobody", PROD, "oa", &upstream(None)),
        Err(StoreError::NotFound("tenant"))
    ));
    // Body fields carry any JSON value to the nodes as JSON text.
    s.put_upstream(
        &actor(),
        "t",
        PROD,
        "bf",
        &with(&|u| {
            u.non_retention = Some(NonRetention::BodyField {
                name: "store".into(),
                value: aigw_wire::rules::JsonText("false".into()),
            })
        }),
    )
    .expect("body field");
    assert_eq!(
        snapshot_upstream(&s, "t/production/bf").non_retention,
        NonRetention::BodyField {
            name: "store".into(),
            value: aigw_wire::rules::JsonText("false".into())
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn policies_default_to_zero_retention_and_are_replaced_whole() {
    let (s, dir) = store();
    let p = s.get_policy("t", Environment::Staging).expect("default");
    assert_eq!(
        (
            p.id.as_str(),
            p.zero_retention,
            p.region.as_str(),
            p.hipaa,
            p.updated_at
        ),
        ("t/staging", true, "", false, 0),
        "never set: zero retention, nothing else"
    );
    assert!(matches!(
        s.get_policy("nobody", PROD),
        Err(StoreError::NotFound("tenant"))
    ));
    let spec = PolicySpec {
        zero_retention: true,
        region: "eu".into(),
        hipaa: true,
        guardrails: Default::default(),
        revoke_leaked_keys: false,
        guardrails_fail_open: false,
        patterns: Vec::new(),
    };
    let w = s
        .put_policy(&actor(), "t", Environment::Staging, &spec)
        .expect("put");
    assert!(w.record.zero_retention && w.record.hipaa && w.record.updated_at > 0);
    let w = s
        .put_policy(&actor(), "t", Environment::Staging, &PolicySpec::default())
        .expect("replace");
    assert!(w.record.zero_retention && !w.record.hipaa && w.record.region.is_empty());
    // Opting out is explicit, and audited on a line of its own.
    let w = s
        .put_policy(
            &actor(),
            "t",
            Environment::Staging,
            &PolicySpec {
                zero_retention: false,
                ..PolicySpec::default()
            },
        )
        .expect("opt out");
    assert!(!w.record.zero_retention);
    let opt_outs = |s: &Store| {
        s.audit(0, 10_000)
            .expect("audit")
            .iter()
            .filter(|r| r.action == "policy.zero_retention_opt_out")
            .count()
    };
    assert_eq!(opt_outs(&s), 1);
    s.put_policy(
        &actor(),
        "t",
        Environment::Staging,
        &PolicySpec {
            zero_retention: false,
            ..PolicySpec::default()
        },
    )
    .expect("again");
    assert_eq!(opt_outs(&s), 1, "only a change opts out");
    let m = error_of(s.put_policy(
        &actor(),
        "t",
        PROD,
        &PolicySpec {
            region: "Nowhere!".into(),
            ..PolicySpec::default()
        },
    ));
    assert!(m.starts_with("region:"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_mutation_writes_one_audit_record_without_the_credential() {
    let (s, dir) = store();
    let mut seen = s.audit(0, 10_000).expect("audit").len();
    let mut expect_one = |s: &Store, action: &str, target: &str| {
        let all = s.audit(0, 10_000).expect("audit");
        assert_eq!(all.len(), seen + 1, "one record for {action}");
        seen = all.len();
        let last = &all[all.len() - 1];
        assert_eq!(
            (last.action.as_str(), last.target.as_str()),
            (action, target)
        );
        assert_eq!(last.actor, "admin");
        assert_eq!(last.source, "127.0.0.1");
        assert!(!last.detail.to_string().contains(SECRET), "{}", last.detail);
    };
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
        .expect("put");
    expect_one(&s, "upstream.put", "t/production/oa");
    s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
        .expect("put");
    expect_one(&s, "upstream.put", "t/production/oa");
    s.put_route(&actor(), "t", PROD, "r", &route("m", &["oa"]))
        .expect("route");
    expect_one(&s, "route.put", "t/production/r");
    s.put_policy(&actor(), "t", PROD, &PolicySpec::default())
        .expect("policy");
    expect_one(&s, "policy.put", "t/production");
    s.delete_route(&actor(), "t", PROD, "r").expect("delete");
    expect_one(&s, "route.delete", "t/production/r");
    s.delete_upstream(&actor(), "t", PROD, "oa")
        .expect("delete");
    expect_one(&s, "upstream.delete", "t/production/oa");
    s.compact(&actor(), 1).expect("compact");
    expect_one(&s, "changelog.compact", "changelog");

    // A refused mutation writes nothing, not even a revision.
    let before = s.revision().expect("rev");
    assert!(s
        .put_route(&actor(), "t", PROD, "r", &route("m", &["gone"]))
        .is_err());
    assert_eq!(s.revision().expect("rev"), before);
    assert_eq!(s.audit(0, 10_000).expect("audit").len(), seen);
    let _ = std::fs::remove_dir_all(&dir);
}
