//! The admin API over a real socket, on a real store.

use serde_json::{json, Value};

use crate::{start, Options, Running};

const SECRET: &str = "sk-api-test-PLAINTEXT-0123456789";

fn temp() -> std::path::PathBuf {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    let d = std::env::temp_dir().join(format!(
        "aigw-api-{}-{}",
        std::process::id(),
        u64::from_le_bytes(b)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cp(dir: &std::path::Path) -> Running {
    start(Options {
        data_dir: dir.to_path_buf(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Options::default()
    })
    .expect("starts")
}

/// Status and body (as text, to look for what must not be there), over TLS verified
/// against the control plane's CA.
fn raw(cp: &Running, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let client = crate::client::Client::new(&cp.api_url(), &cp.admin_token, Some(&cp.ca_file))
        .expect("client");
    let body = body.map(|b| serde_json::from_str::<Value>(b).expect("a JSON body"));
    client
        .call(method, path, body.as_ref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
}

fn call(cp: &Running, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (code, text) = raw(cp, method, path, body.as_deref());
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

const ENV: &str = "/v1/tenants/acme/environments/production";

#[test]
fn upstreams_routes_and_policies_over_the_api() {
    let dir = temp();
    let cp = cp(&dir);
    let (code, _) = call(
        &cp,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "Acme", "tier": "pro"})),
    );
    assert_eq!(code, 201);
    assert!(
        std::fs::metadata(dir.join("seal.key")).is_ok(),
        "seal key generated"
    );

    // An upstream; the credential goes in and never comes out.
    let up = json!({
        "provider": "openai",
        "base_url": "http://127.0.0.1:9000",
        "credential": SECRET,
        "non_retention": {"mode": "header", "name": "x-no-retain", "value": "1"},
        "region": "eu",
        "connect_timeout_ms": 500
    });
    let (code, text) = raw(
        &cp,
        "PUT",
        &format!("{ENV}/upstreams/oa"),
        Some(&up.to_string()),
    );
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains(SECRET));
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["id"], "acme/production/oa");
    assert_eq!(v["has_credential"], true);
    assert_eq!(
        v["non_retention"],
        json!({"mode": "header", "name": "x-no-retain", "value": "1"})
    );
    assert_eq!(v["connect_timeout_ms"], 500);
    assert!(v["revision"].as_i64().expect("revision") > 1);
    for path in [
        format!("{ENV}/upstreams"),
        format!("{ENV}/upstreams/oa"),
        "/v1/audit".into(),
    ] {
        let (code, text) = raw(&cp, "GET", &path, None);
        assert_eq!(code, 200, "{path}");
        assert!(!text.contains(SECRET), "{path} leaks the credential");
        assert!(text.contains("oa"), "{path}: {text}");
    }
    let (_, list) = call(&cp, "GET", &format!("{ENV}/upstreams"), None);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
    for mode in ["none", "account_agreement"] {
        let (code, v) = call(
            &cp,
            "PUT",
            &format!("{ENV}/upstreams/m"),
            Some(
                json!({"provider": "openai", "base_url": "http://h", "non_retention": {"mode": mode}}),
            ),
        );
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["non_retention"], json!({"mode": mode}));
    }
    let (_, v) = call(
        &cp,
        "PUT",
        &format!("{ENV}/upstreams/m"),
        Some(json!({"provider": "openai", "base_url": "http://h"})),
    );
    assert_eq!(
        v["non_retention"],
        json!({"mode": "body_field", "name": "store", "value": false}),
        "OpenAI's default"
    );
    let (_, v) = call(
        &cp,
        "PUT",
        &format!("{ENV}/upstreams/m"),
        Some(json!({"provider": "anthropic", "base_url": "http://h"})),
    );
    assert_eq!(
        v["non_retention"],
        json!({"mode": "none"}),
        "Anthropic has no per-request flag"
    );
    let (code, _) = call(&cp, "DELETE", &format!("{ENV}/upstreams/m"), None);
    assert_eq!(code, 200);

    // Field-naming refusals.
    let cases: &[(&str, Value, u16, &str)] = &[
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "credentials": "x"}),
            400,
            "credentials",
        ),
        (
            "upstreams/oa",
            json!({"provider": "azure", "base_url": "http://h"}),
            400,
            "provider",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "h"}),
            400,
            "base_url",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai"}),
            400,
            "base_url",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "non_retention": {"mode": "maybe"}}),
            400,
            "non_retention",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "non_retention": {"mode": "header", "name": "x"}}),
            400,
            "non_retention",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "non_retention": {"mode": "none", "name": "x"}}),
            400,
            "name",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "non_retention": {"mode": "account_agreement", "value": 1}}),
            400,
            "value",
        ),
        (
            "upstreams/oa",
            json!({"provider": "openai", "base_url": "http://h", "max_connections": -1}),
            400,
            "max_connections",
        ),
        (
            "upstreams/Bad",
            json!({"provider": "openai", "base_url": "http://h"}),
            400,
            "name",
        ),
        (
            "routes/r",
            json!({"model": "m", "targets": [{"upstream": "nope"}]}),
            400,
            "targets[0].upstream",
        ),
        (
            "routes/r",
            json!({"model": "m", "targets": [{"upstream": "oa", "weight": 2}]}),
            400,
            "weight",
        ),
        (
            "routes/r",
            json!({"model": "m", "prefix": "p", "targets": [{"upstream": "oa"}]}),
            400,
            "prefix",
        ),
        (
            "routes/r",
            json!({"model": "m", "targets": []}),
            400,
            "targets",
        ),
        (
            "policy",
            json!({"zero_retention": true, "hippa": true}),
            400,
            "hippa",
        ),
        ("policy", json!({"region": "Europe!"}), 400, "region"),
    ];
    for (path, body, status, field) in cases {
        let (code, v) = call(&cp, "PUT", &format!("{ENV}/{path}"), Some(body.clone()));
        assert_eq!(code, *status, "{path} {body}: {v}");
        assert!(message(&v).contains(field), "{path} {body}: {v}");
    }
    let (code, v) = call(
        &cp,
        "PUT",
        "/v1/tenants/acme/environments/prod/policy",
        Some(json!({})),
    );
    assert_eq!(code, 400);
    assert!(message(&v).starts_with("environment:"), "{v}");
    let (code, _) = call(
        &cp,
        "PUT",
        "/v1/tenants/nobody/environments/production/upstreams/oa",
        Some(json!({"provider": "openai", "base_url": "http://h"})),
    );
    assert_eq!(code, 404);

    // Routes.
    let (code, v) = call(
        &cp,
        "PUT",
        &format!("{ENV}/routes/gpt"),
        Some(json!({"model": "gpt-4o", "targets": [{"upstream": "oa", "model": "gpt-4o-2024"}]})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["id"], "acme/production/gpt");
    assert_eq!(v["targets"][0]["model"], "gpt-4o-2024");
    let (code, v) = call(
        &cp,
        "PUT",
        &format!("{ENV}/routes/other"),
        Some(json!({"model": "gpt-4o", "targets": [{"upstream": "oa"}]})),
    );
    assert_eq!(code, 409, "{v}");
    let (_, v) = call(&cp, "GET", &format!("{ENV}/routes"), None);
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1));
    let (code, v) = call(&cp, "DELETE", &format!("{ENV}/upstreams/oa"), None);
    assert_eq!(code, 409, "{v}");
    assert!(message(&v).contains("gpt"), "{v}");
    let (code, v) = call(&cp, "DELETE", &format!("{ENV}/routes/gpt"), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["deleted"], "acme/production/gpt");
    assert!(v["revision"].as_i64().is_some());
    let (code, _) = call(&cp, "DELETE", &format!("{ENV}/routes/gpt"), None);
    assert_eq!(code, 404);
    let (code, _) = call(&cp, "GET", &format!("{ENV}/routes/gpt"), None);
    assert_eq!(code, 404);
    let (code, v) = call(&cp, "DELETE", &format!("{ENV}/upstreams/oa"), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["deleted"], "acme/production/oa");

    // The policy.
    let (code, v) = call(&cp, "GET", &format!("{ENV}/policy"), None);
    assert_eq!(code, 200);
    assert_eq!(
        (v["zero_retention"].clone(), v["region"].clone()),
        (json!(true), json!("")),
        "never set: zero retention"
    );
    let (code, v) = call(
        &cp,
        "PUT",
        &format!("{ENV}/policy"),
        Some(json!({"region": "eu", "hipaa": false})),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["revision"].as_i64().is_some());
    let (_, v) = call(&cp, "GET", &format!("{ENV}/policy"), None);
    assert_eq!(
        (v["zero_retention"].clone(), v["region"].clone()),
        (json!(true), json!("eu"))
    );

    // Compaction.
    let (_, rev) = call(&cp, "GET", "/v1/revision", None);
    let (code, v) = call(&cp, "POST", "/v1/admin/compact", Some(json!({"keep": 0})));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["compacted_through"], rev["revision"]);
    assert_eq!(v["revision"], rev["revision"]);
    for (body, field) in [(json!({"keep": -1}), "keep"), (json!({"kep": 1}), "kep")] {
        let (code, v) = call(&cp, "POST", "/v1/admin/compact", Some(body));
        assert_eq!(code, 400);
        assert!(message(&v).contains(field), "{v}");
    }
    let (_, audit) = call(&cp, "GET", "/v1/audit", None);
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    for a in [
        "upstream.put",
        "route.put",
        "route.delete",
        "upstream.delete",
        "policy.put",
        "changelog.compact",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }

    // Every new path needs the token and is described.
    let stranger =
        crate::client::Client::new(&cp.api_url(), "", Some(&cp.ca_file)).expect("client");
    let (code, _) = stranger
        .call("GET", &format!("{ENV}/upstreams"), None)
        .expect("answered");
    assert_eq!(code, 401);
    let (_, doc) = call(&cp, "GET", "/openapi.json", None);
    for p in [
        "/v1/tenants/{tenant_id}/environments/{environment}/upstreams/{name}",
        "/v1/tenants/{tenant_id}/environments/{environment}/routes/{name}",
        "/v1/tenants/{tenant_id}/environments/{environment}/policy",
        "/v1/admin/compact",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} in the OpenAPI document");
    }
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_configured_seal_key_must_be_valid_and_match_the_stored_credentials() {
    let dir = temp();
    let key = "0f".repeat(32);
    let running = start(Options {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        seal_key: Some(key.clone()),
        ..Options::default()
    })
    .expect("starts");
    assert!(
        std::fs::metadata(dir.join("seal.key")).is_err(),
        "no key file when configured"
    );
    call(
        &running,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "A", "tier": "pro"})),
    );
    let (code, _) = call(
        &running,
        "PUT",
        &format!("{ENV}/upstreams/oa"),
        Some(json!({"provider": "anthropic", "base_url": "https://h", "credential": SECRET})),
    );
    assert_eq!(code, 200);
    running.stop();
    let again = |seal_key: Option<String>| {
        start(Options {
            data_dir: dir.clone(),
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            push_listen: "127.0.0.1:0".parse().expect("addr"),
            seal_key,
            ..Options::default()
        })
    };
    let e = again(Some("nothex".into())).expect_err("bad key");
    assert!(e.to_string().contains("seal_key"), "{e}");
    let e = again(Some("1f".repeat(32))).expect_err("wrong key");
    assert!(e.to_string().contains("seal key"), "{e}");
    // Without a configured key a fresh key file is generated, which does not open them either.
    assert!(again(None).is_err());
    again(Some(key)).expect("the right key").stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The control plane refuses at PUT what a node would refuse when applying the record, so
/// one tenant's upstream can never stop a node applying the revisions that follow it.
#[test]
fn a_base_url_a_node_would_refuse_is_refused_at_put() {
    let dir = temp();
    let cp = cp(&dir);
    let (code, _) = call(
        &cp,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "Acme", "tier": "pro"})),
    );
    assert_eq!(code, 201);
    let revision_before = call(&cp, "GET", "/v1/revision", None).1["revision"].clone();
    for url in [
        "https://api..openai.com",
        "https://-x.example.com",
        "https://exa_mple-.com",
        "http://[::zz]:80",
    ] {
        let record = aigw_wire::UpstreamRecord {
            id: "acme/production/bad".into(),
            tenant_id: "acme".into(),
            environment: "production".into(),
            name: "bad".into(),
            provider: "openai".into(),
            base_url: url.into(),
            ..Default::default()
        };
        assert!(
            aigw_wire::rules::check_upstream(&record).is_err(),
            "{url}: a node would apply it"
        );
        let (code, v) = call(
            &cp,
            "PUT",
            &format!("{ENV}/upstreams/bad"),
            Some(json!({"provider": "openai", "base_url": url})),
        );
        assert_eq!(code, 400, "{url}: {v}");
        assert!(message(&v).starts_with("base_url:"), "{url}: {v}");
    }
    assert_eq!(
        call(&cp, "GET", "/v1/revision", None).1["revision"],
        revision_before,
        "nothing was committed"
    );
    let (code, _) = call(
        &cp,
        "PUT",
        &format!("{ENV}/upstreams/good"),
        Some(json!({"provider": "openai", "base_url": "https://api.openai.com"})),
    );
    assert_eq!(code, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Secrets are written whole (an empty or short token is never reused or accepted), are
/// refused when others can read them, and live in a 0700 directory beside a 0600 database.
#[test]
fn secret_files_are_whole_private_and_checked() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("exists").mode() & 0o777;
    let dir = temp();
    let running = cp(&dir);
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "admin-token",
        "seal.key",
        "pki/server.key",
        "pki/ca.key",
        "controlplane.db",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&dir.join("pki")), 0o700);
    running.stop();

    // A token file left empty (a crash between creating and writing it) is not reused.
    std::fs::write(dir.join("admin-token"), "").expect("write");
    let e = start(Options {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Options::default()
    })
    .expect_err("an empty admin token");
    assert!(e.to_string().contains("admin-token is empty"), "{e}");
    // Nor is a short one.
    aigw_seal::files::write_private(&dir.join("admin-token"), b"short").expect("write");
    let e = start(Options {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Options::default()
    })
    .expect_err("a short admin token");
    assert!(e.to_string().contains("at least 32"), "{e}");
    aigw_seal::files::write_private(
        &dir.join("admin-token"),
        b"aigw_admin_0123456789abcdefghijklmnopqrstuvwxyz",
    )
    .expect("write");
    // A secret others can read is refused, naming the fix.
    std::fs::set_permissions(
        dir.join("admin-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let e = start(Options {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Options::default()
    })
    .expect_err("a readable admin token");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(
        dir.join("admin-token"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // A loosened data directory and database are narrowed again at start.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        dir.join("controlplane.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let running = cp(&dir);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("controlplane.db")), 0o600);
    assert_eq!(
        running.admin_token,
        "aigw_admin_0123456789abcdefghijklmnopqrstuvwxyz"
    );
    assert_eq!(
        std::fs::metadata(dir.join("admin-token"))
            .expect("token")
            .uid(),
        std::fs::metadata("/proc/self").expect("proc").uid()
    );
    running.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every key record reaches every node: its fields are bounded at the admin API.
#[test]
fn key_fields_are_bounded() {
    let dir = temp();
    let cp = cp(&dir);
    let (code, _) = call(
        &cp,
        "POST",
        "/v1/tenants",
        Some(json!({"id": "acme", "name": "Acme", "tier": "pro"})),
    );
    assert_eq!(code, 201);
    let models: Vec<String> = (0..=aigw_wire::rules::MAX_ALLOWED_MODELS)
        .map(|i| format!("m{i}"))
        .collect();
    for (body, field) in [
        (
            json!({"environment": "production", "allowed_models": models}),
            "allowed_models",
        ),
        (
            json!({"environment": "production", "allowed_models": ["a b"]}),
            "allowed_models[0].model",
        ),
        (
            json!({"environment": "production", "allowed_models": ["x".repeat(300)]}),
            "allowed_models[0].model",
        ),
        (
            json!({"environment": "production", "name": "n".repeat(200)}),
            "name",
        ),
    ] {
        let (code, v) = call(&cp, "POST", "/v1/tenants/acme/keys", Some(body));
        assert_eq!(code, 400, "{v}");
        assert!(message(&v).starts_with(field), "{field}: {v}");
    }
    let (code, _) = call(
        &cp,
        "POST",
        "/v1/tenants/acme/keys",
        Some(json!({"environment": "production", "allowed_models": ["gpt-4o"]})),
    );
    assert_eq!(code, 201);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nodes over the API: every bad input is a 400 naming its field; a node is listed from
/// its registration on, with its scope; an enrolled node cannot be added over; unknown
/// nodes are 404; the enrolment token is shown once and audited nowhere.
#[test]
fn nodes_are_registered_scoped_and_revoked_over_the_api() {
    let dir = temp();
    let cp = cp(&dir);
    for (body, field) in [
        (json!({"id": "Edge 1"}), "id:"),
        (
            json!({"id": "edge-1", "environments": ["prod"]}),
            "environments:",
        ),
        (
            json!({"id": "edge-1", "expires_in_seconds": 0}),
            "expires_in_seconds:",
        ),
        (json!({"id": "edge-1", "tenants": [""]}), "tenants:"),
        (
            json!({"id": "edge-1", "scope": {}}),
            "unknown field `scope`",
        ),
    ] {
        let (code, v) = call(&cp, "POST", "/v1/nodes", Some(body.clone()));
        assert_eq!(code, 400, "{body}: {v}");
        assert!(message(&v).contains(field), "{body}: {v}");
    }
    let (code, added) = call(
        &cp,
        "POST",
        "/v1/nodes",
        Some(json!({"id": "edge-1", "environments": ["production"], "tenants": ["acme"]})),
    );
    assert_eq!(code, 201, "{added}");
    let token = added["enrollment_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(token.starts_with("aigw_enroll_") && token.len() >= 32);
    assert_eq!(added["node"]["enrolled"], false);
    assert_eq!(added["node"]["connected"], false);
    assert_eq!(added["node"]["scope"]["tenants"][0], "acme");
    let (code, listed) = call(&cp, "GET", "/v1/nodes", None);
    assert_eq!(code, 200);
    assert_eq!(listed["data"][0]["node_id"], "edge-1");
    // Not yet enrolled: adding it again replaces it, and only the newest token is valid.
    let (code, again) = call(&cp, "POST", "/v1/nodes", Some(json!({"id": "edge-1"})));
    assert_eq!(code, 201, "{again}");
    assert_ne!(again["enrollment_token"], added["enrollment_token"]);
    assert_eq!(again["node"]["scope"]["environments"], json!([]));
    // Once enrolled it cannot be added over.
    let newest = again["enrollment_token"]
        .as_str()
        .expect("token")
        .to_string();
    let store = &cp.push.store;
    assert_eq!(store.enrollment(&token).expect("read"), None, "superseded");
    store
        .complete_enrollment(&newest, "ab".repeat(32).as_str(), "test")
        .expect("enrol");
    let (code, v) = call(&cp, "POST", "/v1/nodes", Some(json!({"id": "edge-1"})));
    assert_eq!(code, 409, "{v}");
    assert!(message(&v).contains("revoke it first"), "{v}");
    // Scope, with the same rules.
    let (code, v) = call(
        &cp,
        "PUT",
        "/v1/nodes/edge-1/scope",
        Some(json!({"environments": ["dev"]})),
    );
    assert_eq!(code, 400);
    assert!(message(&v).contains("environments:"), "{v}");
    let (code, v) = call(
        &cp,
        "PUT",
        "/v1/nodes/edge-1/scope",
        Some(json!({"environments": ["staging"]})),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["scope"]["environments"][0], "staging");
    // Re-enrolment and revocation; unknown nodes are 404.
    let (code, v) = call(&cp, "POST", "/v1/nodes/edge-1/enrollment", None);
    assert_eq!(code, 200, "{v}");
    assert!(v["enrollment_token"].as_str().is_some());
    for path in ["/v1/nodes/nope/revoke", "/v1/nodes/nope/enrollment"] {
        let (code, _) = call(&cp, "POST", path, None);
        assert_eq!(code, 404, "{path}");
    }
    let (code, v) = call(&cp, "POST", "/v1/nodes/edge-1/revoke", None);
    assert_eq!(code, 200);
    assert_eq!(v["revoked"], true);
    let (code, v) = call(&cp, "POST", "/v1/nodes/edge-1/enrollment", None);
    assert_eq!(
        code, 409,
        "a revoked node is added again, not re-enrolled: {v}"
    );
    let (_, audit) = call(&cp, "GET", "/v1/audit", None);
    let text = audit.to_string();
    for action in [
        "node.add",
        "node.enrolled",
        "node.scope",
        "node.enrollment",
        "node.revoke",
    ] {
        assert!(text.contains(action), "{action}");
    }
    assert!(
        !text.contains(&newest) && !text.contains(&token),
        "no token in the audit log"
    );
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A busy port fails the start before any secret is written.
#[test]
fn a_busy_port_fails_before_anything_is_written() {
    let dir = temp();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let e = start(Options {
        data_dir: dir.clone(),
        api_listen: busy.local_addr().expect("addr"),
        push_listen: "127.0.0.1:0".parse().expect("addr"),
        ..Options::default()
    })
    .expect_err("the port is taken");
    assert!(format!("{e:#}").contains("in use"), "{e:#}");
    assert!(!dir.exists(), "nothing written");
}

/// `/openapi.json` describes every served path, and nothing that is not served.
#[test]
fn the_openapi_document_covers_every_route() {
    let doc = crate::api::openapi::document();
    let described: std::collections::BTreeSet<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .filter(|p| *p != "/healthz")
        .collect();
    let served: std::collections::BTreeSet<&str> = crate::api::served_paths().into_iter().collect();
    assert_eq!(
        described.difference(&served).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "described, not served"
    );
    assert_eq!(
        served.difference(&described).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "served, not described"
    );
}
