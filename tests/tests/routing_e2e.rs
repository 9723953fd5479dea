//! Control plane + data plane + mock providers over real sockets: each tenant environment's
//! upstreams, credentials, routes and policy are managed on the control plane, pushed, and
//! decide where a key's requests go.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane::config::ControlPlaneConfig;
use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

fn authorization(m: &MockProvider) -> Option<String> {
    m.requests()
        .last()
        .and_then(|r| r.header("authorization").map(str::to_string))
}

both_drivers!(
    each_environment_routes_with_its_own_upstreams_and_credentials,
    |driver| {
        let dir = scratch_dir(&format!("routing-e2e-{driver:?}"));
        let cp = cp_start(dir, "127.0.0.1:0");
        let prod_provider = MockProvider::start(MockOptions::default());
        let stg_provider = MockProvider::start(MockOptions::default());
        tenant(&cp, "acme", "enterprise");
        tenant(&cp, "beta", "enterprise");
        let base = "/v1/tenants/acme/environments";
        let up = put(
            &cp,
            &format!("{base}/production/upstreams/oa"),
            json!({"provider": "openai", "base_url": prod_provider.base_url(), "credential": "sk-prod-credential"}),
        )
        .json();
        assert_eq!(up["has_credential"], true);
        assert!(
            !up.to_string().contains("sk-prod-credential"),
            "the credential is never shown: {up}"
        );
        put(
            &cp,
            &format!("{base}/staging/upstreams/oa"),
            json!({"provider": "openai", "base_url": stg_provider.base_url(), "credential": "sk-staging-credential"}),
        );
        put(
            &cp,
            &format!("{base}/production/routes/gpt"),
            json!({"model": "gpt-4o", "targets": [{"upstream": "oa", "model": "prod-deployment"}]}),
        );
        put(
            &cp,
            &format!("{base}/staging/routes/all"),
            json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
        );
        let prod_key = key(&cp, "acme", "production");
        let stg_key = key(&cp, "acme", "staging");
        let beta_key = key(&cp, "beta", "production");

        let gw = node(driver, &cp, |_| {});
        wait_workers(&gw, revision(&cp));

        // Production: its upstream, its credential, its model rename.
        let r = chat_with_key(gw.addr(), Some(&prod_key), "gpt-4o");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(prod_provider.request_count(), 1);
        assert_eq!(
            authorization(&prod_provider).as_deref(),
            Some("Bearer sk-prod-credential")
        );
        let sent: serde_json::Value =
            serde_json::from_slice(&prod_provider.requests()[0].body).unwrap();
        assert_eq!(sent["model"], "prod-deployment");
        // Production routes only gpt-4o; staging routes everything, to its own upstream.
        let r = chat_with_key(gw.addr(), Some(&prod_key), "gpt-3.5");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (404, Some("model_not_found"))
        );
        let r = chat_with_key(gw.addr(), Some(&stg_key), "gpt-3.5");
        assert_eq!(r.status, 200);
        assert_eq!(stg_provider.request_count(), 1);
        assert_eq!(
            authorization(&stg_provider).as_deref(),
            Some("Bearer sk-staging-credential")
        );
        // Another tenant has no routes at all.
        let r = chat_with_key(gw.addr(), Some(&beta_key), "gpt-4o");
        assert_eq!(r.status, 404);
        assert_eq!(prod_provider.request_count(), 1);
        // `/v1/models` lists what the key's environment routes.
        let raw = request("GET", "/v1/models", &key_headers(&prod_key), "");
        let models = exchange(gw.addr(), &raw).json();
        assert_eq!(models["data"][0]["id"], "gpt-4o");
        assert_eq!(models["data"].as_array().unwrap().len(), 1);

        // A route change is pushed and applies on every worker at once.
        put(
            &cp,
            &format!("{base}/production/upstreams/second"),
            json!({"provider": "openai", "base_url": stg_provider.base_url(), "credential": "sk-second"}),
        );
        put(
            &cp,
            &format!("{base}/production/routes/gpt"),
            json!({"model": "gpt-4o", "targets": [{"upstream": "second"}]}),
        );
        wait_workers(&gw, revision(&cp));
        for _ in 0..4 {
            let r = chat_with_key(gw.addr(), Some(&prod_key), "gpt-4o");
            assert_eq!(r.status, 200);
            assert_eq!(
                authorization(&stg_provider).as_deref(),
                Some("Bearer sk-second")
            );
        }
        assert_eq!(prod_provider.request_count(), 1);

        // An upstream still named by a route cannot be deleted; the route first, then it.
        let r = api(
            &cp,
            "DELETE",
            &format!("{base}/production/upstreams/second"),
            None,
        );
        assert_eq!(r.status, 409);
        let r = api(
            &cp,
            "DELETE",
            &format!("{base}/production/routes/gpt"),
            None,
        );
        assert_eq!(r.status, 200);
        let r = api(
            &cp,
            "DELETE",
            &format!("{base}/production/upstreams/second"),
            None,
        );
        assert_eq!(r.status, 200);
        wait_workers(&gw, revision(&cp));
        let r = chat_with_key(gw.addr(), Some(&prod_key), "gpt-4o");
        assert_eq!(r.status, 404, "a deleted route routes nothing");

        // Every change is in the audit log, and no credential is.
        let audit = api(&cp, "GET", "/v1/audit?limit=1000", None).json();
        let text = audit.to_string();
        for action in [
            "upstream.put",
            "route.put",
            "route.delete",
            "upstream.delete",
        ] {
            assert!(text.contains(action), "{action} audited");
        }
        assert!(!text.contains("sk-prod-credential") && !text.contains("sk-second"));
    }
);

both_drivers!(
    an_environment_policy_keeps_requests_off_upstreams_that_break_it,
    |driver| {
        let dir = scratch_dir(&format!("policy-e2e-{driver:?}"));
        let cp = cp_start(dir, "127.0.0.1:0");
        let provider = MockProvider::start(MockOptions::default());
        tenant(&cp, "clinic", "enterprise");
        let base = "/v1/tenants/clinic/environments/production";
        put(
            &cp,
            &format!("{base}/upstreams/oa"),
            json!({"provider": "openai", "base_url": provider.base_url(), "region": "us", "non_retention": {"mode": "none"}}),
        );
        put(
            &cp,
            &format!("{base}/routes/all"),
            json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
        );
        put(
            &cp,
            &format!("{base}/policy"),
            json!({"zero_retention": true}),
        );
        let k = key(&cp, "clinic", "production");
        let gw = node(driver, &cp, |_| {});
        wait_workers(&gw, revision(&cp));

        // The only upstream cannot be told not to retain: nothing is sent.
        let r = chat_with_key(gw.addr(), Some(&k), "gpt-4o");
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (403, Some("policy_blocked"))
        );
        assert_eq!(provider.request_count(), 0);

        // Once it sends a non-retention header, requests flow, carrying it.
        put(
            &cp,
            &format!("{base}/upstreams/oa"),
            json!({"provider": "openai", "base_url": provider.base_url(), "region": "us",
                   "non_retention": {"mode": "header", "name": "x-no-retain", "value": "1"}}),
        );
        wait_workers(&gw, revision(&cp));
        let r = chat_with_key(gw.addr(), Some(&k), "gpt-4o");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            provider.requests()[0].header("x-no-retain"),
            Some("1"),
            "the non-retention flag went upstream"
        );

        // Pinning the environment to the EU refuses the US upstream.
        put(
            &cp,
            &format!("{base}/policy"),
            json!({"zero_retention": true, "region": "eu"}),
        );
        wait_workers(&gw, revision(&cp));
        let r = chat_with_key(gw.addr(), Some(&k), "gpt-4o");
        assert_eq!(r.status, 403);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("region"),
            "the error says which rule"
        );
        assert_eq!(provider.request_count(), 1);
    }
);

both_drivers!(
    a_node_behind_a_compacted_changelog_gets_a_snapshot_and_its_routes_survive_restarts,
    |driver| {
        let dir = scratch_dir(&format!("compact-e2e-{driver:?}"));
        let cp = cp_start(dir.join("cp"), "127.0.0.1:0");
        let provider = MockProvider::start(MockOptions::default());
        tenant(&cp, "acme", "enterprise");
        route_env(&cp, "acme", "production", &provider);
        let k = key(&cp, "acme", "production");

        let aigw_e2e_routing_seal_key = secret_file("aigw_e2e_routing_seal_key", &"6a".repeat(32));
        let snap = dir.join("node").join("config.sealed");
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        let sealed = |c: &mut ControlPlaneConfig| {
            c.snapshot_file = Some(snap.clone());
            c.seal_key_file = Some(aigw_e2e_routing_seal_key.clone());
        };
        let link = e2e::cp::register(&cp);
        let gw = gateway_with(driver, &link, sealed);
        wait_workers(&gw, revision(&cp));
        assert_eq!(chat_with_key(gw.addr(), Some(&k), "m").status, 200);
        let held = revision(&cp);
        gw.stop();
        assert!(
            !std::fs::read(&snap)
                .unwrap()
                .windows(provider.base_url().len())
                .any(|w| w == provider.base_url().as_bytes()),
            "routing is sealed on disk too"
        );

        // While the node is away: the route moves to a model rename, and the changelog is
        // compacted past the node's revision.
        put(
            &cp,
            "/v1/tenants/acme/environments/production/routes/all",
            json!({"prefix": "", "targets": [{"upstream": "oa", "model": "renamed"}]}),
        );
        let r = api(&cp, "POST", "/v1/admin/compact", Some(json!({"keep": 0})));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["compacted_through"].as_i64().unwrap() > held);

        let gw = gateway_with(driver, &link, sealed);
        wait_workers(&gw, revision(&cp));
        let nodes = api(&cp, "GET", "/v1/nodes", None).json();
        let me = nodes["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == link.node_id)
            .unwrap();
        assert_eq!(me["snapshots_sent"], 1, "compacted away: a full snapshot");
        assert_eq!(me["changes_sent"], 0);
        assert_eq!(chat_with_key(gw.addr(), Some(&k), "m").status, 200);
        let sent: serde_json::Value =
            serde_json::from_slice(&provider.requests().last().unwrap().body).unwrap();
        assert_eq!(sent["model"], "renamed");
        gw.stop();

        // The control plane is down: the node boots from its sealed file, routes included.
        cp.stop();
        let gw = gateway_with(driver, &link, sealed);
        assert!(wait_until(Duration::from_secs(5), || admin_get(
            gw.admin_addr(),
            "/readyz"
        )
        .status
            == 200));
        let r = chat_with_key(gw.addr(), Some(&k), "m");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
);

#[test]
fn every_environment_requires_zero_retention_until_its_tenant_opts_out() {
    let dir = scratch_dir("routing-zero-retention-default");
    let cp = cp_start(dir, "127.0.0.1:0");
    let openai = MockProvider::start(MockOptions::default());
    let anthropic = MockProvider::start(MockOptions::default());
    tenant(&cp, "acme", "pro");
    let base = "/v1/tenants/acme/environments/production";
    // No non-retention mode given: each provider's default.
    put(
        &cp,
        &format!("{base}/upstreams/oa"),
        json!({"provider": "openai", "base_url": openai.base_url()}),
    );
    put(
        &cp,
        &format!("{base}/upstreams/an"),
        json!({"provider": "anthropic", "base_url": anthropic.base_url()}),
    );
    put(
        &cp,
        &format!("{base}/routes/gpt"),
        json!({"prefix": "gpt-", "targets": [{"upstream": "oa"}]}),
    );
    put(
        &cp,
        &format!("{base}/routes/claude"),
        json!({"prefix": "claude-", "targets": [{"upstream": "an"}]}),
    );
    let k = key(&cp, "acme", "production");
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));

    // OpenAI: `store: false` where the endpoint takes it, nothing where it would be refused.
    let r = chat_with_key(gw.addr(), Some(&k), "gpt-4o");
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: serde_json::Value = serde_json::from_slice(&openai.requests()[0].body).unwrap();
    assert_eq!(sent["store"], false);
    let r = post_with_key(
        gw.addr(),
        &k,
        "/v1/embeddings",
        r#"{"model":"gpt-embed","input":"x"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: serde_json::Value = serde_json::from_slice(&openai.requests()[1].body).unwrap();
    assert!(
        sent.get("store").is_none(),
        "embeddings take no `store`: {sent}"
    );

    // Anthropic has no per-request flag: without an agreement declared, nothing is sent.
    let claude =
        r#"{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post_with_key(gw.addr(), &k, "/v1/messages", claude);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "policy_blocked");
    assert!(r.text().contains("zero retention"), "{}", r.text());
    assert_eq!(anthropic.request_count(), 0);

    // The tenant opts out, explicitly: it is audited, and the request goes.
    let r = api(
        &cp,
        "PUT",
        &format!("{base}/policy"),
        Some(json!({"zero_retention": false})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_workers(&gw, revision(&cp));
    let r = post_with_key(gw.addr(), &k, "/v1/messages", claude);
    assert_eq!(r.status, 200, "{}", r.text());
    let audit = api(&cp, "GET", "/v1/audit", None).text();
    assert!(audit.contains("policy.zero_retention_opt_out"), "{audit}");
}
