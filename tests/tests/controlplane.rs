//! The control plane's admin API over real sockets, on a real SQLite store: tenants,
//! sub-accounts, keys (shown once, stored as hashes), revocation, rotation, and the audit
//! record every mutation writes in the same transaction.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::cp::{admin_exchange, call, cp_start};
use e2e::*;
use serde_json::json;

#[test]
fn keys_are_minted_once_revoked_rotated_and_every_change_is_audited() {
    let dir = scratch_dir("controlplane-keys");
    let cp = cp_start(dir.clone(), "127.0.0.1:0");
    let token = cp.admin_token.clone();

    // Without the admin token: 401, and nothing is recorded.
    let r = call(
        &cp,
        "wrong",
        "POST",
        "/v1/tenants",
        Some(json!({"name": "x", "tier": "pro"})),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");

    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "Acme", "tier": "pro"})),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants",
        Some(json!({"name": "Acme", "tier": "gold"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tier"));
    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants",
        Some(json!({"name": "Acme", "tier": "pro", "colour": "red"})),
    );
    assert_eq!(r.status, 400, "unknown fields are refused");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "the message names the field"
    );

    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants/acme/sub-accounts",
        Some(json!({"name": "end-user-1"})),
    );
    assert_eq!(r.status, 201);
    let sub = r.json()["id"].as_str().unwrap().to_string();

    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants/acme/keys",
        Some(json!({"environment": "production", "name": "ci", "sub_account_id": sub})),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let created = r.json();
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["info"]["key_id"].as_str().unwrap().to_string();
    let parsed = aigw_wire::keys::parse(&key).expect("a checksummed key");
    assert_eq!(parsed.key_id, key_id);
    assert!(key.starts_with("aigw_prod_"));

    // Listing never shows the key or its hash.
    let r = call(&cp, &token, "GET", "/v1/tenants/acme/keys", None);
    let listed = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        listed.contains(&key_id) && !listed.contains(&key),
        "{listed}"
    );
    assert!(!listed.contains("hash"), "{listed}");

    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants/acme/keys",
        Some(json!({"environment": "prod"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("environment"));
    let r = call(
        &cp,
        &token,
        "POST",
        "/v1/tenants/nope/keys",
        Some(json!({"environment": "staging"})),
    );
    assert_eq!(r.status, 404);

    // Rotation: a new key, the old one with a grace end 24 h out by default.
    let r = call(
        &cp,
        &token,
        "POST",
        &format!("/v1/keys/{key_id}/rotate"),
        None,
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let rotated = r.json();
    let new_id = rotated["info"]["key_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, key_id);
    let grace = rotated["old"]["grace_ends_at"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (grace - now - 86_400).abs() < 60,
        "grace {grace} vs now {now}"
    );
    assert_eq!(rotated["info"]["sub_account_id"], sub.as_str());
    let r = call(
        &cp,
        &token,
        "POST",
        &format!("/v1/keys/{key_id}/rotate"),
        None,
    );
    assert_eq!(r.status, 409, "a key rotates once");

    let r = call(
        &cp,
        &token,
        "POST",
        &format!("/v1/keys/{new_id}/revoke"),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "revoked");
    let r = call(
        &cp,
        &token,
        "POST",
        &format!("/v1/keys/{new_id}/revoke"),
        None,
    );
    assert_eq!(r.status, 409);

    let rev = call(&cp, &token, "GET", "/v1/revision", None).json()["revision"]
        .as_i64()
        .unwrap();
    assert!(rev >= 6, "every mutation moves the revision: {rev}");

    let audit = call(&cp, &token, "GET", "/v1/audit", None).json();
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "sub_account.create",
            "key.create",
            "key.rotate",
            "key.revoke"
        ]
    );
    for a in audit["data"].as_array().unwrap() {
        assert_eq!(a["actor"], "admin-token");
        assert_eq!(a["source"], "127.0.0.1");
        assert!(a["at"].as_i64().unwrap() >= now - 60);
    }
    assert!(
        !audit.to_string().contains(&key),
        "the audit log never holds a key"
    );

    // Restart on the same data directory: everything is still there (real SQLite on disk).
    cp.stop();
    let cp = cp_start(dir, "127.0.0.1:0");
    let r = call(&cp, &token, "GET", "/v1/tenants/acme/keys", None);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        call(&cp, &token, "GET", "/v1/revision", None).json()["revision"]
            .as_i64()
            .unwrap(),
        rev
    );
}

#[test]
fn openapi_document_and_health_need_no_token() {
    let dir = scratch_dir("controlplane-openapi");
    let cp = cp_start(dir, "127.0.0.1:0");
    let r = admin_exchange(
        &cp,
        b"GET /openapi.json HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/tenants",
        "/v1/tenants/{tenant_id}/keys",
        "/v1/keys/{key_id}/revoke",
        "/v1/keys/{key_id}/rotate",
        "/v1/audit",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
    assert_eq!(
        admin_exchange(
            &cp,
            b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n"
        )
        .status,
        200
    );
}
