//! Metering end to end: requests of every API family through a node linked to a control
//! plane, the usage the provider reported (or an estimate, flagged, when it never did)
//! counted per key and model, shipped to the control plane and read back from its usage
//! API — exactly once, across control-plane outages and node restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane::config::DriverChoice;
use e2e::cp::*;
use e2e::mock::{Behavior, MockOptions, MockProvider};
use e2e::*;
use serde_json::{json, Value};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

/// The tenant's usage on the control plane, by model: (requests, errors, input, output,
/// estimated requests).
fn by_model(cp: &controlplane::Running, tenant: &str) -> Vec<(String, [u64; 5])> {
    let r = api(
        cp,
        "GET",
        &format!("/v1/tenants/{tenant}/usage?group_by=model"),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let n = |f: &str| row[f].as_u64().unwrap();
            (
                row["model"].as_str().unwrap().to_string(),
                [
                    n("requests"),
                    n("errors"),
                    n("input_tokens"),
                    n("output_tokens"),
                    n("estimated_requests"),
                ],
            )
        })
        .collect()
}

fn total_requests(cp: &controlplane::Running, tenant: &str) -> u64 {
    by_model(cp, tenant).iter().map(|(_, c)| c[0]).sum()
}

/// Usage entries the node holds that the control plane has not acknowledged.
fn backlog(gw: &Gateway) -> u64 {
    admin_get(gw.admin_addr(), "/readyz").json()["usage_unacknowledged_entries"]
        .as_u64()
        .unwrap()
}

/// A control plane with tenant `acme`: OpenAI-style models on `openai`, `claude-*` on
/// `anthropic`.
fn stack(
    dir: std::path::PathBuf,
    push: &str,
    openai: &MockProvider,
    anthropic: &MockProvider,
) -> controlplane::Running {
    let cp = cp_start(dir, push);
    tenant(&cp, "acme", "pro");
    let base = "/v1/tenants/acme/environments/production";
    put(
        &cp,
        &format!("{base}/upstreams/oa"),
        json!({"provider": "openai", "base_url": openai.base_url(), "stream_options": true}),
    );
    put(
        &cp,
        &format!("{base}/upstreams/an"),
        json!({"provider": "anthropic", "base_url": anthropic.base_url(), "non_retention": {"mode": "account_agreement"}}),
    );
    put(
        &cp,
        &format!("{base}/routes/claude"),
        json!({"prefix": "claude-", "targets": [{"upstream": "an"}]}),
    );
    put(
        &cp,
        &format!("{base}/routes/all"),
        json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
    );
    cp
}

both_drivers!(
    usage_of_every_api_family_reaches_the_control_plane_as_the_provider_reported_it,
    |driver| {
        let openai = MockProvider::start(MockOptions {
            default: Behavior::OpenAiStream {
                events: 4,
                delay_ms: 0,
            },
            ..Default::default()
        });
        let anthropic = MockProvider::start(MockOptions {
            default: Behavior::AnthropicStream {
                events: 3,
                delay_ms: 0,
            },
            ..Default::default()
        });
        let cp = stack(
            scratch_dir(&format!("metering-{driver:?}")),
            "127.0.0.1:0",
            &openai,
            &anthropic,
        );
        let key = key(&cp, "acme", "production");
        // Prices: a global one, a tenant's own (which wins over a global one), the rest
        // unpriced.
        cli_of(
            &cp,
            &[
                "price-set",
                "chat-json",
                "--input-price",
                "1000",
                "--output-price",
                "2000",
            ],
        );
        cli_of(
            &cp,
            &[
                "price-set",
                "chat-stream",
                "--input-price",
                "7",
                "--output-price",
                "7",
            ],
        );
        let own = cli_of(
            &cp,
            &[
                "price-set",
                "chat-stream",
                "--tenant",
                "acme",
                "--input-price",
                "100",
                "--output-price",
                "0",
            ],
        );
        assert_eq!(own["tenant_id"], "acme");
        let listed = cli_of(&cp, &["price-list", "--tenant", "acme"]);
        assert_eq!(listed["data"].as_array().unwrap().len(), 3, "{listed}");
        let gw = gateway(driver, &cp);
        wait_workers(&gw, revision(&cp));

        // A provider error: counted as a request and an error, with no tokens.
        openai.push_behavior(Behavior::Status {
            status: 400,
            body: r#"{"error":{"message":"bad","type":"invalid_request_error","code":null}}"#
                .into(),
            headers: vec![],
        });
        assert_eq!(
            post_with_key(
                gw.addr(),
                &key,
                "/v1/chat/completions",
                &chat("chat-err", false)
            )
            .status,
            400
        );
        for _ in 0..2 {
            let r = post_with_key(
                gw.addr(),
                &key,
                "/v1/chat/completions",
                &chat("chat-json", false),
            );
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
        // A stream whose client did not ask for usage: the gateway asks, and counts it.
        let r = post_with_key(
            gw.addr(),
            &key,
            "/v1/chat/completions",
            &chat("chat-stream", true),
        );
        assert_eq!(r.status, 200);
        assert!(
            !String::from_utf8_lossy(&r.body).contains("prompt_tokens"),
            "the usage the gateway asked for is not relayed"
        );
        let r = post_with_key(
            gw.addr(),
            &key,
            "/v1/responses",
            &json!({"model": "resp-json", "input": "hi"}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = post_with_key(
            gw.addr(),
            &key,
            "/v1/embeddings",
            &json!({"model": "embed", "input": "hi"}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = post_with_key(
            gw.addr(),
            &key,
            "/v1/messages",
            &json!({"model": "claude-stream", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // A stream cut short before its usage: estimated from its bytes, and flagged.
        openai.push_behavior(Behavior::ResetAfterEvents { events: 2 });
        {
            use std::io::Write;
            let mut s = gw.connect();
            s.write_all(&post(
                "/v1/chat/completions",
                &key_headers(&key),
                &chat("chat-cut", true).to_string(),
            ))
            .unwrap();
            let got = read_until(&mut s, "");
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        }

        let expected: Vec<(String, [u64; 5])> = [
            ("chat-err", [1, 1, 0, 0, 0]),
            ("chat-json", [2, 0, 10, 6, 0]),
            ("chat-stream", [1, 0, 5, 4, 0]),
            ("claude-stream", [1, 0, 5, 3, 0]),
            ("embed", [1, 0, 5, 0, 0]),
            ("resp-json", [1, 0, 5, 3, 0]),
        ]
        .into_iter()
        .map(|(m, c)| (m.to_string(), c))
        .collect();
        assert!(
            wait_until(Duration::from_secs(15), || total_requests(&cp, "acme") == 8
                && backlog(&gw) == 0),
            "usage never arrived: {:?}",
            by_model(&cp, "acme")
        );
        let got = by_model(&cp, "acme");
        let (cut, reported): (Vec<_>, Vec<_>) = got.into_iter().partition(|(m, _)| m == "chat-cut");
        assert_eq!(reported, expected);
        let [requests, errors, input, output, estimated] = cut[0].1;
        assert_eq!((requests, errors, estimated), (1, 0, 1), "{cut:?}");
        assert!(
            input > 0 && output > 0,
            "estimated from the bytes each way: {cut:?}"
        );

        // The node's Prometheus metrics: by status class, endpoint and upstream; tokens.
        let node_metrics =
            || String::from_utf8_lossy(&admin_get(gw.admin_addr(), "/metrics").body).into_owned();
        assert!(
            wait_until(Duration::from_secs(5), || node_metrics().contains(
                "aigw_requests_total{code=\"2xx\",endpoint=\"chat_completions\",upstream=\"oa\"} 4"
            )),
            "{}",
            node_metrics()
        );
        let m = node_metrics();
        for line in [
            "aigw_requests_total{code=\"4xx\",endpoint=\"chat_completions\",upstream=\"oa\"} 1",
            "aigw_requests_total{code=\"2xx\",endpoint=\"messages\",upstream=\"an\"} 1",
            "aigw_tokens_total{kind=\"input\"} 30",
            "aigw_request_duration_seconds_count 8",
            "aigw_control_plane_connected 1",
            "aigw_usage_unacknowledged_entries 0",
        ] {
            assert!(m.contains(line), "{line} not in:\n{m}");
        }
        // The control plane's, without the admin token.
        let r = call(&cp, "", "GET", "/metrics", None);
        assert_eq!(r.status, 200);
        let m = String::from_utf8_lossy(&r.body).into_owned();
        assert!(m.contains("aigw_cp_nodes{state=\"connected\"} 1"), "{m}");
        assert!(m.contains("aigw_cp_node_lag_revisions{node="), "{m}");
        let applied: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("aigw_cp_usage_reports_total{result=\"applied\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(applied >= 1, "{m}");

        // Cost: chat-json 10 input × $1000/M + 6 output × $2000/M; chat-stream at the
        // tenant's price, 5 × $100/M; the other five requests unpriced.
        let usage = cli_of(&cp, &["usage", "--tenant", "acme", "--group-by", "model"]);
        let cost = |model: &str| {
            usage["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["model"] == model)
                .unwrap()["cost_usd"]
                .as_f64()
                .unwrap()
        };
        assert!((cost("chat-json") - 0.022).abs() < 1e-9, "{usage}");
        assert!((cost("chat-stream") - 0.0005).abs() < 1e-9, "{usage}");
        assert_eq!(cost("embed"), 0.0);
        let total = cli_of(&cp, &["usage", "--tenant", "acme"]);
        assert_eq!(total["data"][0]["unpriced_requests"], 5, "{total}");

        // Latency and time to first byte, per group; and per key.
        let r = api(
            &cp,
            "GET",
            "/v1/tenants/acme/usage?group_by=key,model&model=chat-stream",
            None,
        )
        .json();
        let row = &r["data"][0];
        assert!(
            row["key_id"].as_str().is_some_and(|k| key.contains(k)),
            "{r}"
        );
        assert!(row["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
        assert!(row["ttfb_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
        // Bad queries name what is wrong.
        for (q, field) in [
            ("group_by=colour", "group_by"),
            ("from=2026-13-01", "from"),
            ("limit=3", "limit"),
        ] {
            let r = api(&cp, "GET", &format!("/v1/tenants/acme/usage?{q}"), None);
            assert_eq!(r.status, 400, "{q}");
            assert!(
                String::from_utf8_lossy(&r.body).contains(field),
                "{q}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        assert_eq!(
            api(&cp, "GET", "/v1/tenants/nobody/usage", None).status,
            404
        );
    }
);

/// The control plane goes away twice under traffic. The first time the node keeps the
/// usage in memory and sends it when the link is back; the second time the node is stopped
/// too, spills the usage to its sealed file, and sends it after its restart. Every request
/// is counted exactly once.
#[test]
fn usage_survives_control_plane_outages_and_a_node_restart_counted_once() {
    let openai = MockProvider::start(MockOptions::default());
    let anthropic = MockProvider::start(MockOptions::default());
    let dir = scratch_dir("metering-outage");
    let cp = stack(dir.clone(), "127.0.0.1:0", &openai, &anthropic);
    let push = cp.push_addr;
    let created = create_key(&cp, "acme", json!({"environment": "production"}));
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["info"]["key_id"].as_str().unwrap().to_string();
    let link = register(&cp);
    let node_dir = scratch_dir("metering-outage-node");
    let config = || {
        node_config(DriverChoice::Auto, &link, |c| {
            c.snapshot_file = Some(node_dir.join("config.sealed"));
            c.seal_key_file = Some(secret_file("metering-node-seal", &"5a".repeat(32)));
        })
    };
    let send = |gw: &Gateway, n: usize| {
        for _ in 0..n {
            let r = post_with_key(gw.addr(), &key, "/v1/chat/completions", &chat("m", false));
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    let gw = Gateway::start_with(config());
    wait_workers(&gw, revision(&cp));
    send(&gw, 5);
    assert!(wait_until(Duration::from_secs(15), || total_requests(
        &cp, "acme"
    ) == 5));

    // Outage one: the node keeps serving (from what it holds) and keeps the usage.
    cp.stop();
    send(&gw, 7);
    assert!(
        wait_until(Duration::from_secs(10), || backlog(&gw) > 0),
        "the node holds usage the control plane has not acknowledged"
    );
    let cp = cp_start(dir.clone(), &push.to_string());
    assert!(
        wait_until(Duration::from_secs(30), || backlog(&gw) == 0),
        "the node's usage was never acknowledged"
    );
    assert_eq!(total_requests(&cp, "acme"), 12);

    // Outage two, and the node restarts during it: its usage waits in the sealed spill
    // file.
    cp.stop();
    send(&gw, 4);
    gw.stop();
    let spill = node_dir.join("config.sealed.usage");
    let sealed = std::fs::read(&spill).expect("the node spilled its usage at stop");
    assert!(
        !sealed.is_empty() && !String::from_utf8_lossy(&sealed).contains(&key_id),
        "the spill file is sealed"
    );
    let cp = cp_start(dir, &push.to_string());
    let gw = Gateway::start_with(config());
    assert!(
        wait_until(Duration::from_secs(30), || total_requests(&cp, "acme")
            >= 16
            && backlog(&gw) == 0),
        "the spilled usage never arrived: {:?}",
        by_model(&cp, "acme")
    );
    assert_eq!(total_requests(&cp, "acme"), 16, "counted once");
    assert!(
        wait_until(Duration::from_secs(15), || !spill.exists()),
        "the spill file goes once acknowledged"
    );
}

/// A tenant that drops usage fields: they are not stored, and usage answers leave them out
/// (absent, not zero), while requests, tokens and cost stay.
#[test]
fn dropped_usage_fields_are_absent_not_zero() {
    let openai = MockProvider::start(MockOptions::default());
    let anthropic = MockProvider::start(MockOptions::default());
    let cp = stack(
        scratch_dir("metering-drop"),
        "127.0.0.1:0",
        &openai,
        &anthropic,
    );
    let r = api(
        &cp,
        "PUT",
        "/v1/tenants/acme/usage-settings",
        Some(json!({"drop": ["colour"]})),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("colour") && r.text().contains("drop"),
        "{}",
        r.text()
    );
    let r = api(
        &cp,
        "PUT",
        "/v1/tenants/acme/usage-settings",
        Some(json!({"drop": ["model", "latency", "reasoning_tokens"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let settings = cli_of(
        &cp,
        &[
            "usage-drop",
            "acme",
            "--fields",
            "model,latency,reasoning_tokens",
        ],
    );
    assert_eq!(
        settings["drop"],
        json!(["model", "latency", "reasoning_tokens"])
    );
    let key = key(&cp, "acme", "production");
    let gw = gateway(DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    for model in ["m-one", "m-two"] {
        let r = post_with_key(
            gw.addr(),
            &key,
            "/v1/chat/completions",
            &chat(model, false).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let counted = wait_until(Duration::from_secs(20), || {
        let r = api(&cp, "GET", "/v1/tenants/acme/usage", None).json();
        r["data"][0]["requests"] == 2
    });
    assert!(counted, "usage never arrived");
    let r = api(
        &cp,
        "GET",
        "/v1/tenants/acme/usage?group_by=key,model",
        None,
    )
    .json();
    let rows = r["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "both models' usage is merged: {r}");
    let row = rows[0].as_object().unwrap();
    for gone in ["model", "latency_ms", "reasoning_tokens"] {
        assert!(!row.contains_key(gone), "{gone} present: {r}");
    }
    assert!(
        row["key_id"].as_str().is_some_and(|k| key.contains(k)),
        "{r}"
    );
    assert_eq!(row["requests"], 2);
    assert!(row["input_tokens"].as_u64().unwrap() > 0, "{r}");
    assert!(
        row["ttfb_ms"]["p50"].as_f64().is_some(),
        "kept fields stay: {r}"
    );
    assert_eq!(row["cached_input_tokens"], 0, "kept, and zero: {r}");
}
