//! Control plane + data plane + mock provider over real sockets: keys created, revoked and
//! rotated on the control plane are enforced by every worker of the data plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane::config::ControlPlaneConfig;
use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

both_drivers!(
    keys_are_enforced_revoked_and_rotated_on_every_worker,
    |driver| {
        let dir = scratch_dir(&format!("keys-e2e-{driver:?}"));
        let cp = cp_start(dir.clone(), "127.0.0.1:0");
        let mock = MockProvider::start(MockOptions::default());
        tenant(&cp, "acme", "pro");
        route_env(&cp, "acme", "production", &mock);
        let created = create_key(
            &cp,
            "acme",
            json!({"environment": "production", "allowed_models": ["gpt-ok", "gpt-other"]}),
        );
        let key = created["key"].as_str().unwrap().to_string();
        let key_id = created["info"]["key_id"].as_str().unwrap().to_string();

        let gw = gateway(driver, &cp);
        assert!(
            wait_until(Duration::from_secs(10), || admin_get(
                gw.admin_addr(),
                "/readyz"
            )
            .status
                == 200),
            "ready once a config is held"
        );
        wait_workers(&gw, revision(&cp));

        assert_eq!(chat_with_key(gw.addr(), Some(&key), "gpt-ok").status, 200);
        let r = chat_with_key(gw.addr(), None, "gpt-ok");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (401, Some("missing_api_key"))
        );
        let r = chat_with_key(gw.addr(), Some("sk-not-ours"), "gpt-ok");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (401, Some("malformed_api_key"))
        );
        let forged = aigw_wire::keys::assemble(
            aigw_wire::keys::Environment::Production,
            &key_id,
            "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
        );
        let r = chat_with_key(gw.addr(), Some(&forged), "gpt-ok");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (401, Some("unknown_api_key"))
        );
        let r = chat_with_key(gw.addr(), Some(&key), "gpt-forbidden");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (403, Some("model_not_allowed"))
        );
        assert!(
            mock.requests()
                .iter()
                .all(|r| !format!("{:?}", r.headers).contains(&key)),
            "the key never goes upstream"
        );

        // Rotation: both keys work during the grace period; the old one stops after it.
        let rotated = api(
            &cp,
            "POST",
            &format!("/v1/keys/{key_id}/rotate"),
            Some(json!({"grace_seconds": 5})),
        )
        .json();
        let new_key = rotated["key"].as_str().unwrap().to_string();
        let new_id = rotated["info"]["key_id"].as_str().unwrap().to_string();
        // The grace ends at a whole second: checks are made only while a full second of
        // it is left, however slowly this machine runs them.
        let grace_ends_at = rotated["old"]["grace_ends_at"].as_u64().unwrap();
        let unix_now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        wait_workers(&gw, revision(&cp));
        let mut checked = 0;
        while checked < 4 && unix_now() + 1 < grace_ends_at {
            checked += 1;
            assert_eq!(
                chat_with_key(gw.addr(), Some(&key), "gpt-ok").status,
                200,
                "old key in grace"
            );
            assert_eq!(
                chat_with_key(gw.addr(), Some(&new_key), "gpt-ok").status,
                200,
                "new key"
            );
        }
        assert!(checked > 0, "the grace period passed before any check");
        assert!(wait_until(Duration::from_secs(10), || chat_with_key(
            gw.addr(),
            Some(&key),
            "gpt-ok"
        )
        .status
            == 401));
        let r = chat_with_key(gw.addr(), Some(&key), "gpt-ok");
        assert_eq!(r.json()["error"]["code"], "rotated_api_key");
        assert_eq!(
            chat_with_key(gw.addr(), Some(&new_key), "gpt-ok").status,
            200
        );

        // Revocation: applied by every worker, then refused by each of them. (How soon is
        // a figure measured by `aigw-bench revocation`, not asserted here.)
        assert_eq!(
            api(&cp, "POST", &format!("/v1/keys/{new_id}/revoke"), None).status,
            200
        );
        wait_workers(&gw, revision(&cp));
        on_every_worker(
            gw.admin_addr(),
            || chat_with_key(gw.addr(), Some(&new_key), "gpt-ok"),
            |r| {
                assert_eq!(
                    (r.status, r.json()["error"]["code"].as_str()),
                    (401, Some("revoked_api_key"))
                )
            },
        );

        // The control plane shows the node's applied revision.
        let nodes = api(&cp, "GET", "/v1/nodes", None).json();
        let node = &nodes["data"][0];
        assert_eq!(node["connected"], true);
        assert!(wait_until(Duration::from_secs(5), || {
            api(&cp, "GET", "/v1/nodes", None).json()["data"][0]["applied_revision"].as_i64()
                == Some(revision(&cp))
        }));

        // Control plane down: the node keeps serving with what it holds.
        let before_change = std::time::Instant::now();
        let third = create_key(&cp, "acme", json!({"environment": "production"}));
        let third_key = third["key"].as_str().unwrap().to_string();
        let rev_before_stop = revision(&cp);
        wait_workers(&gw, rev_before_stop);
        let push_addr = cp.push_addr;
        let readyz = || admin_get(gw.admin_addr(), "/readyz").json();
        let ready = readyz();
        assert_eq!(ready["control_plane_connected"], true);
        // While linked, the configuration's age counts from the last word of the control
        // plane: here the change just applied, so no more than the time since it was made.
        assert!(
            ready["config_age_seconds"].as_u64().unwrap() <= before_change.elapsed().as_secs(),
            "{ready}, {:?} after the change",
            before_change.elapsed()
        );
        cp.stop();
        // The node notices, keeps serving, and its configuration ages from its last contact.
        assert!(
            wait_until(Duration::from_secs(20), || readyz()
                ["control_plane_connected"]
                == false),
            "the node never noticed: {}",
            readyz()
        );
        let age = readyz()["config_age_seconds"].as_u64().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || readyz()["config_age_seconds"]
                .as_u64()
                .unwrap()
                > age),
            "the configuration's age does not grow"
        );
        assert_eq!(readyz()["ready"], true, "{}", readyz());
        assert_eq!(
            chat_with_key(gw.addr(), Some(&third_key), "gpt-ok").status,
            200
        );
        assert_eq!(
            chat_with_key(gw.addr(), Some(&new_key), "gpt-ok").status,
            401
        );

        // Control plane back on the same address: the node resumes from its revision with
        // changes, not a full snapshot.
        let cp = cp_start(dir, &push_addr.to_string());
        let third_id = third["info"]["key_id"].as_str().unwrap().to_string();
        assert!(wait_until(Duration::from_secs(15), || {
            api(&cp, "GET", "/v1/nodes", None).json()["data"]
                .as_array()
                .is_some_and(|a| !a.is_empty() && a[0]["connected"] == true)
        }));
        assert_eq!(
            api(&cp, "POST", &format!("/v1/keys/{third_id}/revoke"), None).status,
            200
        );
        wait_workers(&gw, revision(&cp));
        assert_eq!(
            chat_with_key(gw.addr(), Some(&third_key), "gpt-ok").status,
            401
        );
        let node = &api(&cp, "GET", "/v1/nodes", None).json()["data"][0];
        assert_eq!(
            node["snapshots_sent"], 0,
            "resumed without a full snapshot: {node}"
        );
        assert!(node["changes_sent"].as_u64().unwrap() >= 1);
    }
);

#[test]
fn a_node_one_protocol_version_behind_still_syncs() {
    use aigw_wire::{decode_frame, encode_frame, Frame, Message, Record};
    use std::io::{Read, Write};
    let dir = scratch_dir("keys-e2e-old-node");
    let cp = cp_start(dir, "127.0.0.1:0");
    tenant(&cp, "t", "free");
    let k = create_key(&cp, "t", json!({"environment": "staging"}));

    let old = e2e::cp::enrolled(&cp);
    let mut s = e2e::cp::link_client_as(&cp, Some(&old));
    let mut out = Vec::new();
    encode_frame(
        &Message::Hello {
            protocol_version: aigw_wire::PROTOCOL_VERSION - 1,
            node_id: "old".into(),
            boot_epoch: 1,
            revision_held: 0,
            token: String::new(),
            revision_id: 0,
        },
        &mut out,
    );
    // A message type from another version, which the control plane must skip.
    out.extend_from_slice(&4u32.to_be_bytes());
    out.extend_from_slice(&4242u16.to_be_bytes());
    out.extend_from_slice(b"??");
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let snapshot = loop {
        if let Some((f, used)) = decode_frame(&buf, aigw_wire::DEFAULT_MAX_FRAME).unwrap() {
            buf.drain(..used);
            if let Frame::Message(m @ Message::Snapshot { .. }) = f {
                break m;
            }
            continue;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    };
    let Message::Snapshot { records, .. } = snapshot else {
        unreachable!()
    };
    assert!(records.iter().any(
        |r| matches!(r, Record::Key(rec) if rec.key_id == k["info"]["key_id"].as_str().unwrap())
    ));
}

both_drivers!(
    a_node_restarted_while_the_control_plane_is_down_serves_its_sealed_snapshot,
    |driver| {
        let dir = scratch_dir(&format!("sealed-{driver:?}"));
        let cp = cp_start(dir.join("cp"), "127.0.0.1:0");
        let mock = MockProvider::start(MockOptions::default());
        tenant(&cp, "acme", "pro");
        route_env(&cp, "acme", "production", &mock);
        let good = create_key(&cp, "acme", json!({"environment": "production"}));
        let bad = create_key(&cp, "acme", json!({"environment": "production"}));
        let bad_id = bad["info"]["key_id"].as_str().unwrap().to_string();
        assert_eq!(
            api(&cp, "POST", &format!("/v1/keys/{bad_id}/revoke"), None).status,
            200
        );
        let (good, bad) = (
            good["key"].as_str().unwrap().to_string(),
            bad["key"].as_str().unwrap().to_string(),
        );

        let aigw_e2e_seal_key = secret_file("aigw_e2e_seal_key", &"5e".repeat(32));
        let snap = dir.join("node").join("keys.sealed");
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        let sealed = |c: &mut ControlPlaneConfig| {
            c.snapshot_file = Some(snap.clone());
            c.seal_key_file = Some(aigw_e2e_seal_key.clone());
        };
        let link = e2e::cp::register(&cp);
        let gw = gateway_with(driver, &link, sealed);
        wait_workers(&gw, revision(&cp));
        assert_eq!(chat_with_key(gw.addr(), Some(&good), "m").status, 200);
        gw.stop(); // an orderly stop writes the snapshot
        assert!(snap.exists(), "sealed snapshot written");
        let on_disk = std::fs::read(&snap).unwrap();
        assert!(on_disk.starts_with(b"AIGWSEAL"));
        assert!(
            !on_disk
                .windows(12)
                .any(|w| good.as_bytes().windows(12).any(|g| g == w)),
            "no key material in the clear"
        );

        cp.stop();
        // The control plane is down; the node restarts and serves from the sealed snapshot.
        let gw = gateway_with(driver, &link, sealed);
        assert!(
            wait_until(Duration::from_secs(5), || admin_get(
                gw.admin_addr(),
                "/readyz"
            )
            .status
                == 200),
            "ready from disk"
        );
        // Its configuration is as old as the snapshot, not unknown.
        let saved = std::fs::metadata(&snap).unwrap().modified().unwrap();
        let age = admin_get(gw.admin_addr(), "/readyz").json()["config_age_seconds"].as_u64();
        let expected = saved.elapsed().unwrap().as_secs();
        assert!(
            age.is_some_and(|a| a >= expected && a <= expected + 2),
            "config_age_seconds {age:?}, snapshot saved {expected} s ago"
        );
        assert_eq!(chat_with_key(gw.addr(), Some(&good), "m").status, 200);
        let r = chat_with_key(gw.addr(), Some(&bad), "m");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (401, Some("revoked_api_key"))
        );
        gw.stop();

        // With the wrong seal key the snapshot is unusable: the node fails closed.
        let aigw_e2e_seal_key_wrong = secret_file("aigw_e2e_seal_key_wrong", &"77".repeat(32));
        let gw = gateway_with(driver, &link, |c| {
            c.snapshot_file = Some(snap.clone());
            c.seal_key_file = Some(aigw_e2e_seal_key_wrong.clone());
        });
        // The sealed snapshot is read before the node starts serving, and its control plane
        // is down: nothing can give it a configuration later.
        let ready = admin_get(gw.admin_addr(), "/readyz");
        assert_eq!(
            (ready.status, &ready.json()["config_loaded"]),
            (503, &json!(false))
        );
        // Not "unknown key": the node holds no configuration yet, and says so, so clients
        // retry instead of discarding a good key.
        let r = chat_with_key(gw.addr(), Some(&good), "m");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (503, Some("config_not_loaded"))
        );
        assert_eq!(r.header("retry-after"), Some("1"));
    }
);

// A node restarted while its control plane is down never serves a configuration older than
// the one it last applied: a sealed snapshot that is behind (here, put back from before a
// revocation) is refused, and the node waits for its control plane.
both_drivers!(a_restart_never_rolls_back_to_an_older_snapshot, |driver| {
    let dir = scratch_dir(&format!("rollback-{driver:?}"));
    let cp = cp_start(dir.join("cp"), "127.0.0.1:0");
    let mock = MockProvider::start(MockOptions::default());
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &mock);
    let k = create_key(&cp, "acme", json!({"environment": "production"}));
    let (key, key_id) = (
        k["key"].as_str().unwrap().to_string(),
        k["info"]["key_id"].as_str().unwrap().to_string(),
    );
    let aigw_e2e_rollback_seal_key = secret_file("aigw_e2e_rollback_seal_key", &"6f".repeat(32));
    let snap = dir.join("node").join("keys.sealed");
    let sealed = |c: &mut ControlPlaneConfig| {
        c.snapshot_file = Some(snap.clone());
        c.seal_key_file = Some(aigw_e2e_rollback_seal_key.clone());
    };
    let link = e2e::cp::register(&cp);
    let gw = gateway_with(driver, &link, sealed);
    wait_workers(&gw, revision(&cp));
    assert_eq!(chat_with_key(gw.addr(), Some(&key), "m").status, 200);
    gw.stop();
    let before_revocation = std::fs::read(&snap).unwrap();
    // The snapshot's directory did not exist: the node made it, private.
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(snap.parent().unwrap())
                .unwrap()
                .permissions()
        ) & 0o777,
        0o700
    );

    let gw = gateway_with(driver, &link, sealed);
    wait_workers(&gw, revision(&cp));
    assert_eq!(
        api(&cp, "POST", &format!("/v1/keys/{key_id}/revoke"), None).status,
        200
    );
    wait_workers(&gw, revision(&cp));
    gw.stop();
    cp.stop();

    // The snapshot from before the revocation is put back, the control plane is down.
    std::fs::write(&snap, &before_revocation).unwrap();
    let gw = gateway_with(driver, &link, sealed);
    // The sealed snapshot is read before the node starts serving, and its control plane is
    // down: nothing can give it a configuration later.
    let ready = admin_get(gw.admin_addr(), "/readyz");
    assert_eq!(
        (ready.status, &ready.json()["config_loaded"]),
        (503, &json!(false))
    );
    let r = chat_with_key(gw.addr(), Some(&key), "m");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("config_not_loaded")),
        "the revoked key is not served from the older snapshot"
    );
});

// After the control plane's database is restored from a backup and changed, a node that
// holds a revision of the lost history gets a snapshot, not changes that do not apply to
// what it holds: keys only the lost history knew are gone from it.
both_drivers!(a_node_of_a_lost_history_gets_a_snapshot, |driver| {
    let dir = scratch_dir(&format!("history-{driver:?}"));
    let cp_dir = dir.join("cp");
    let backup = dir.join("cp-backup");
    let cp = cp_start(cp_dir.clone(), "127.0.0.1:0");
    let push = cp.push_addr;
    let mock = MockProvider::start(MockOptions::default());
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &mock);
    // The node enrols before the backup: the restored database knows it.
    let link = e2e::cp::enrolled(&cp);
    cp.stop();
    copy_dir(&cp_dir, &backup);

    // The lost history: one more key, which a node applies (and seals to disk).
    let cp = cp_start(cp_dir.clone(), &push.to_string());
    let lost = key(&cp, "acme", "production");
    let aigw_e2e_history_seal_key = secret_file("aigw_e2e_history_seal_key", &"7a".repeat(32));
    let snap = dir.join("node").join("keys.sealed");
    let sealed = |c: &mut ControlPlaneConfig| {
        c.snapshot_file = Some(snap.clone());
        c.seal_key_file = Some(aigw_e2e_history_seal_key.clone());
    };
    let gw = gateway_with(driver, &link, sealed);
    wait_workers(&gw, revision(&cp));
    let held = revision(&cp);
    assert_eq!(chat_with_key(gw.addr(), Some(&lost), "m").status, 200);
    gw.stop();
    cp.stop();

    // The backup is restored and changed until it reaches the same revision number; only
    // then does the node come back, holding that number from the lost history.
    let cp = cp_start(backup.clone(), &push.to_string());
    let mut kept = key(&cp, "acme", "production");
    while revision(&cp) < held {
        kept = key(&cp, "acme", "production");
    }
    assert_eq!(
        revision(&cp),
        held,
        "the same revision number, another history"
    );
    let gw = gateway_with(driver, &link, sealed);
    assert!(
        wait_until(Duration::from_secs(15), || chat_with_key(
            gw.addr(),
            Some(&kept),
            "m"
        )
        .status
            == 200),
        "the node holds the restored history"
    );
    let r = chat_with_key(gw.addr(), Some(&lost), "m");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("unknown_api_key")),
        "a key of the lost history is gone"
    );
    let node = api(&cp, "GET", "/v1/nodes", None).json()["data"][0].clone();
    assert_eq!(node["snapshots_sent"], 1, "{node}");
});

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

// A node serving only some environments answers a key of another one 403
// `environment_not_served`, whatever its control plane sends it, and sends nothing upstream.
both_drivers!(a_node_serves_only_its_environments, |driver| {
    let cp = cp_start(scratch_dir(&format!("envs-{driver:?}")), "127.0.0.1:0");
    let mock = MockProvider::start(MockOptions::default());
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &mock);
    route_env(&cp, "acme", "staging", &mock);
    let production = key(&cp, "acme", "production");
    let staging = key(&cp, "acme", "staging");
    let gw = node(driver, &cp, |c| c.environments = vec!["production".into()]);
    wait_workers(&gw, revision(&cp));
    assert_eq!(chat_with_key(gw.addr(), Some(&production), "m").status, 200);
    let r = chat_with_key(gw.addr(), Some(&staging), "m");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("environment_not_served"))
    );
    assert_eq!(
        mock.request_count(),
        1,
        "only the production request went upstream"
    );
});
