//! Per-key rate limits end to end: set on the control plane, pushed, enforced exactly by a
//! node across its workers — requests per minute as a burst then a steady rate, tokens per
//! minute charged with what each answer used — with 429 `rate_limit_exceeded`, Retry-After
//! and `x-ratelimit-*` headers; other keys unaffected; a rotated key keeps its limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane::config::DriverChoice;
use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

both_drivers!(keys_are_held_to_their_rate_limits, |driver| {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(
        scratch_dir(&format!("rate-limits-{driver:?}")),
        "127.0.0.1:0",
    );
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &openai);
    let limited = create_key(&cp, "acme", json!({"environment": "production"}));
    let (limited_key, limited_id) = (
        limited["key"].as_str().unwrap().to_string(),
        limited["info"]["key_id"].as_str().unwrap().to_string(),
    );
    let r = api(
        &cp,
        "PUT",
        &format!("/v1/keys/{limited_id}/rate-limits"),
        Some(json!({"requests_per_minute": 3})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["rate_limits"]["requests_per_minute"], 3);
    let r = api(
        &cp,
        "PUT",
        &format!("/v1/keys/{limited_id}/rate-limits"),
        Some(json!({"rpm": 3})),
    );
    assert_eq!(r.status, 400, "an unknown field is named");
    let tokens = create_key(&cp, "acme", json!({"environment": "production"}));
    let (tokens_key, tokens_id) = (
        tokens["key"].as_str().unwrap().to_string(),
        tokens["info"]["key_id"].as_str().unwrap().to_string(),
    );
    api(
        &cp,
        "PUT",
        &format!("/v1/keys/{tokens_id}/rate-limits"),
        Some(json!({"tokens_per_minute": 10})),
    );
    let free = key(&cp, "acme", "production");
    let gw = gateway(driver, &cp);
    wait_workers(&gw, revision(&cp));

    // Requests: a burst of 3 (on whichever workers), then refused with when to retry.
    for _ in 0..3 {
        assert_eq!(
            chat_with_key(gw.addr(), Some(&limited_key), "m").status,
            200
        );
    }
    let r = chat_with_key(gw.addr(), Some(&limited_key), "m");
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "one request every 20 s: {retry}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    // Another key is not affected.
    assert_eq!(chat_with_key(gw.addr(), Some(&free), "m").status, 200);

    // Tokens: each answer uses 8 (5 in, 3 out); a limit of 10 admits two, then refuses.
    assert_eq!(chat_with_key(gw.addr(), Some(&tokens_key), "m").status, 200);
    assert_eq!(chat_with_key(gw.addr(), Some(&tokens_key), "m").status, 200);
    let r = chat_with_key(gw.addr(), Some(&tokens_key), "m");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("10"));

    // A rotated key keeps its limits.
    let r = api(
        &cp,
        "POST",
        &format!("/v1/keys/{limited_id}/rotate"),
        Some(json!({"grace_seconds": 60})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let rotated = r.json();
    assert_eq!(
        rotated["info"]["rate_limits"]["requests_per_minute"], 3,
        "{rotated}"
    );
    let refused = openai.request_count();
    assert_eq!(
        refused,
        3 + 1 + 2,
        "refused requests never reached the provider"
    );
});

both_drivers!(a_sub_account_limit_covers_every_key_below_it, |driver| {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(
        scratch_dir(&format!("rate-limits-sub-{driver:?}")),
        "127.0.0.1:0",
    );
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &openai);
    let sub = |name: &str, parent: Option<&str>| -> String {
        let r = api(
            &cp,
            "POST",
            "/v1/tenants/acme/sub-accounts",
            Some(json!({"name": name, "parent_id": parent})),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let team = sub("team", None);
    let squad = sub("squad", Some(&team));
    let other = sub("other", None);
    let key_in = |sub: &str| -> String {
        let k = create_key(
            &cp,
            "acme",
            json!({"environment": "production", "sub_account_id": sub}),
        );
        k["key"].as_str().unwrap().to_string()
    };
    let (a, b, c) = (key_in(&team), key_in(&squad), key_in(&other));
    let path = format!("/v1/tenants/acme/sub-accounts/{team}/rate-limits");
    let r = api(&cp, "PUT", &path, Some(json!({"requests_per_minute": 3})));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api(&cp, "PUT", &path, Some(json!({"rpm": 3})));
    assert_eq!(r.status, 400, "an unknown field is named: {}", r.text());
    let r = api(
        &cp,
        "PUT",
        &format!("/v1/tenants/other-tenant/sub-accounts/{team}/rate-limits"),
        Some(json!({"requests_per_minute": 1})),
    );
    assert_eq!(r.status, 404, "another tenant's sub-account: {}", r.text());
    let gw = gateway(driver, &cp);
    wait_workers(&gw, revision(&cp));

    // Three requests between the team's key and its squad's, then refused for both.
    for key in [&a, &b, &a] {
        assert_eq!(chat_with_key(gw.addr(), Some(key), "m").status, 200);
    }
    for key in [&a, &b] {
        let r = chat_with_key(gw.addr(), Some(key), "m");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
        assert!(
            r.text().contains(&team),
            "the sub-account is named: {}",
            r.text()
        );
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
    }
    // Another sub-account is not covered.
    assert_eq!(chat_with_key(gw.addr(), Some(&c), "m").status, 200);
    assert_eq!(
        openai.request_count(),
        4,
        "refused requests never reached the provider"
    );

    // Lifting the limit (0) frees the subtree.
    let r = api(&cp, "PUT", &path, Some(json!({"requests_per_minute": 0})));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_workers(&gw, revision(&cp));
    assert_eq!(chat_with_key(gw.addr(), Some(&b), "m").status, 200);
});

/// Waits, when the current UTC minute is about to end, for the next one: a limit is leased
/// between nodes minute by minute, and a test counting one minute's admissions must not
/// straddle two.
fn early_in_a_minute() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs % 60 > 40 {
        std::thread::sleep(std::time::Duration::from_secs(61 - secs % 60));
    }
}

#[test]
fn two_nodes_share_a_limit_between_them() {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir("rate-limits-two-nodes"), "127.0.0.1:0");
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &openai);
    let limited = create_key(&cp, "acme", json!({"environment": "production"}));
    let (key, key_id) = (
        limited["key"].as_str().unwrap().to_string(),
        limited["info"]["key_id"].as_str().unwrap().to_string(),
    );
    let r = api(
        &cp,
        "PUT",
        &format!("/v1/keys/{key_id}/rate-limits"),
        Some(json!({"requests_per_minute": 6})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api(
        &cp,
        "POST",
        "/v1/tenants/acme/sub-accounts",
        Some(json!({"name": "team"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let team = r.json()["id"].as_str().unwrap().to_string();
    let r = api(
        &cp,
        "PUT",
        &format!("/v1/tenants/acme/sub-accounts/{team}/rate-limits"),
        Some(json!({"requests_per_minute": 4})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let in_team: Vec<String> = (0..2)
        .map(|_| {
            create_key(
                &cp,
                "acme",
                json!({"environment": "production", "sub_account_id": team}),
            )["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let a = gateway(DriverChoice::IoUring, &cp);
    let b = gateway(DriverChoice::Epoll, &cp);
    wait_workers(&a, revision(&cp));
    wait_workers(&b, revision(&cp));
    let nodes = [a.addr(), b.addr()];
    early_in_a_minute();

    // Each node alone would admit 6 (its own cells); together they admit 6 in this minute.
    let mut admitted = 0;
    for i in 0..12 {
        let r = chat_with_key(nodes[i % 2], Some(&key), "m");
        match r.status {
            200 => admitted += 1,
            429 => {
                assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
                let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "until the minute ends: {retry}");
                assert_eq!(r.header("x-ratelimit-limit-requests"), Some("6"));
            }
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert_eq!(admitted, 6, "the key's limit holds across both nodes");

    // A sub-account's limit covers its keys on every node together: two keys, one per node.
    let mut admitted = 0;
    for i in 0..8 {
        let r = chat_with_key(nodes[i % 2], Some(&in_team[i % 2]), "m");
        match r.status {
            200 => admitted += 1,
            429 => assert!(r.text().contains(&team), "{}", r.text()),
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert_eq!(
        admitted, 4,
        "the sub-account's limit holds across both nodes"
    );
    assert_eq!(
        openai.request_count(),
        6 + 4,
        "refused requests never reached the provider"
    );

    // Without the control plane a node goes on under its own cells: the key's minute is
    // used up across the nodes, and node a (which admitted 3 of its own 6) admits again.
    cp.stop();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            chat_with_key(nodes[0], Some(&key), "m").status == 200
        }),
        "a node that cannot reach the control plane refuses what its own limit admits"
    );
}
