//! Spend caps end to end: set on the control plane, leased to nodes, held as a bound.
//!
//! Prices here are $1,000 per million tokens (1,000 millionths of a dollar a token), so a
//! request's maximum cost — its body's bytes as input tokens plus its output limit — is
//! about 100,000 micro-USD while the mock provider's answer (5 input and 3 output tokens)
//! costs 8,000: many requests fit a cap at once, and the cap is reached after a few dozen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane::config::DriverChoice;
use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::{json, Value};

/// The cost of one mock answer: (5 + 3) tokens × 1,000 micro-USD.
const ANSWER_MICROS: u64 = 8_000;
/// The cap: half a dollar a day.
const CAP_MICROS: u64 = 500_000;

const BODY: &str =
    r#"{"model":"m","max_completion_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;

fn setup(cp: &controlplane::Running, openai: &MockProvider) -> (String, String) {
    tenant(cp, "acme", "pro");
    route_env(cp, "acme", "production", openai);
    let r = api(
        cp,
        "PUT",
        "/v1/prices",
        Some(json!({"model": "m", "input_per_mtok": 1000.0, "output_per_mtok": 1000.0})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let k = create_key(cp, "acme", json!({"environment": "production"}));
    let (key, key_id) = (
        k["key"].as_str().unwrap().to_string(),
        k["info"]["key_id"].as_str().unwrap().to_string(),
    );
    (key, key_id)
}

fn put_cap(cp: &controlplane::Running, body: Value) -> Value {
    let r = api(cp, "PUT", "/v1/tenants/acme/spend-caps", Some(body));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn cap_view(cp: &controlplane::Running, id: &str) -> Value {
    let r = api(cp, "GET", "/v1/tenants/acme/spend-caps", None);
    assert_eq!(r.status, 200);
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no cap {id}: {}", r.json()))
}

fn micros(usd: &Value) -> u64 {
    (usd.as_f64().unwrap() * 1e6).round() as u64
}

/// `clients` threads each sending `each` requests through whichever of `gateways` comes
/// next; returns (answered, refused as insufficient_quota), failing on anything else.
fn hammer(gateways: &[std::net::SocketAddr], key: &str, clients: usize, each: usize) -> (u64, u64) {
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let (mut ok, mut refused) = (0, 0);
                    for i in 0..each {
                        let gw = gateways[(c + i) % gateways.len()];
                        let r = post_with_key(gw, key, "/v1/chat/completions", BODY);
                        match r.status {
                            200 => ok += 1,
                            429 => {
                                assert_eq!(r.json()["error"]["code"], "insufficient_quota");
                                assert_eq!(r.header("x-should-retry"), Some("false"));
                                refused += 1;
                            }
                            other => panic!("{other}: {}", String::from_utf8_lossy(&r.body)),
                        }
                    }
                    (ok, refused)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results
        .iter()
        .fold((0, 0), |(a, b), (ok, refused)| (a + ok, b + refused))
}

/// Waits until the control plane has every answered request's cost, and returns what the
/// cap's period spent.
fn settled_spend(cp: &controlplane::Running, cap: &str, answered: u64) -> u64 {
    let want = answered * ANSWER_MICROS;
    let reached = wait_until(Duration::from_secs(30), || {
        micros(&cap_view(cp, cap)["spent_usd"]) == want
    });
    let spent = micros(&cap_view(cp, cap)["spent_usd"]);
    assert!(reached, "spend recorded {spent}, answers cost {want}");
    spent
}

#[test]
fn a_cap_holds_on_one_node_under_32_concurrent_clients() {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir("spend-caps-one"), "127.0.0.1:0");
    let (key, key_id) = setup(&cp, &openai);

    // Fields are named when wrong.
    let r = api(
        &cp,
        "PUT",
        "/v1/tenants/acme/spend-caps",
        Some(json!({"scope": "key", "id": key_id, "period": "week", "limit_usd": 1})),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("period"), "{}", r.text());

    let cap = put_cap(
        &cp,
        json!({"scope": "key", "id": key_id, "period": "day", "limit_usd": CAP_MICROS as f64 / 1e6}),
    );
    let cap_id = cap["id"].as_str().unwrap().to_string();
    let gw = gateway(DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));

    // A request that may cost more than the whole cap is refused before it is sent: with no
    // output limit it gets the default one (4,096 tokens), which alone costs $4.10.
    let r = post_with_key(
        gw.addr(),
        &key,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("lower its output limit"), "{}", r.text());
    // An unpriced model cannot be bounded.
    let r = post_with_key(
        gw.addr(),
        &key,
        "/v1/chat/completions",
        r#"{"model":"unpriced","max_tokens":1,"messages":[]}"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_priced");
    assert_eq!(
        openai.request_count(),
        0,
        "nothing refused reached the provider"
    );

    let (answered, refused) = hammer(&[gw.addr()], &key, 32, 4);
    assert_eq!(answered + refused, 128);
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    assert_eq!(
        openai.request_count() as u64,
        answered,
        "refused requests were not sent"
    );
    let spent = settled_spend(&cp, &cap_id, answered);
    assert!(spent <= CAP_MICROS, "settled {spent} > cap {CAP_MICROS}");
    // Refusals start only once what is left cannot hold one more request's maximum cost
    // (about 93,000): the cap was used, not merely reserved away.
    assert!(
        spent + 2 * 93_000 + ANSWER_MICROS * 32 > CAP_MICROS,
        "{spent} of {CAP_MICROS} spent"
    );
    let leased = micros(&cap_view(&cp, &cap_id)["leased_usd"]);
    assert!(leased <= CAP_MICROS, "leased {leased}");
    // Sent one at a time, requests go on being answered while what is left holds one
    // more request's maximum cost, then are refused, naming the cap; the spend stays
    // within it.
    let mut more = 0;
    let refusal = loop {
        let r = post_with_key(gw.addr(), &key, "/v1/chat/completions", BODY);
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        more += 1;
        assert!(more <= 10, "the cap stopped binding");
    };
    assert!(
        refusal.text().contains(&cap_id),
        "the cap is named: {}",
        refusal.text()
    );
    let spent = settled_spend(&cp, &cap_id, answered + more);
    assert!(spent <= CAP_MICROS, "settled {spent} > cap {CAP_MICROS}");
    assert!(
        spent + 93_000 > CAP_MICROS,
        "refused with {spent} of {CAP_MICROS} spent"
    );

    // Raising the limit mid-period lets the key spend again.
    put_cap(
        &cp,
        json!({"scope": "key", "id": key_id, "period": "day", "limit_usd": 1.0}),
    );
    let reopened = wait_until(Duration::from_secs(10), || {
        post_with_key(gw.addr(), &key, "/v1/chat/completions", BODY).status == 200
    });
    assert!(reopened, "the raised cap was not used");
}

#[test]
fn a_sub_account_cap_covers_keys_below_it_and_the_default_limit_is_sent() {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir("spend-caps-sub"), "127.0.0.1:0");
    tenant(&cp, "acme", "pro");
    route_env(&cp, "acme", "production", &openai);
    api(
        &cp,
        "PUT",
        "/v1/prices",
        Some(json!({"model": "m", "input_per_mtok": 1000.0, "output_per_mtok": 1000.0})),
    );
    let mut parent: Option<String> = None;
    let mut team = String::new();
    for name in ["team", "squad"] {
        let r = api(
            &cp,
            "POST",
            "/v1/tenants/acme/sub-accounts",
            Some(json!({"name": name, "parent_id": parent})),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        if name == "team" {
            team = id.clone();
        }
        parent = Some(id);
    }
    let k = create_key(
        &cp,
        "acme",
        json!({"environment": "production", "sub_account_id": parent}),
    );
    let key = k["key"].as_str().unwrap().to_string();
    // $4.20 a day on the parent: at $1,000/Mtok, the default output limit (4,096 tokens)
    // and the prompt (57 bytes) reserve $4.153 and an answer costs $0.008, so a few
    // requests fit one after another before what is left is too little.
    let cap = put_cap(
        &cp,
        json!({"scope": "sub_account", "id": team, "period": "day", "limit_usd": 4.2}),
    );
    let cap_id = cap["id"].as_str().unwrap().to_string();
    let gw = gateway(DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut answered = 0;
    loop {
        let r = post_with_key(gw.addr(), &key, "/v1/chat/completions", body);
        if r.status == 429 {
            assert_eq!(r.json()["error"]["code"], "insufficient_quota");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        answered += 1;
        assert!(answered < 10, "the parent's cap never bound the key");
    }
    // (4,200,000 − 4,153,000) / 8,000 answers fit beyond the first.
    assert_eq!(answered, 6, "answers before the parent's cap refused");
    // The request went out with the output limit the gateway set.
    let sent: Value = serde_json::from_slice(&openai.requests()[0].body).unwrap();
    assert_eq!(sent["max_completion_tokens"], 4096, "{sent}");
    assert!(
        micros(&cap_view(&cp, &cap_id)["leased_usd"]) <= 4_200_000,
        "leases stay within the cap"
    );
}

#[test]
fn two_nodes_never_spend_more_than_the_cap_and_a_stopping_node_gives_back_its_lease() {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir("spend-caps-two"), "127.0.0.1:0");
    let (key, key_id) = setup(&cp, &openai);
    let cap = put_cap(
        &cp,
        json!({"scope": "key", "id": key_id, "period": "month", "limit_usd": CAP_MICROS as f64 / 1e6}),
    );
    let cap_id = cap["id"].as_str().unwrap().to_string();
    let a = gateway(DriverChoice::IoUring, &cp);
    let b = gateway(DriverChoice::IoUring, &cp);
    wait_workers(&a, revision(&cp));
    wait_workers(&b, revision(&cp));

    let (answered, refused) = hammer(&[a.addr(), b.addr()], &key, 16, 8);
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    assert_eq!(openai.request_count() as u64, answered);
    let spent = settled_spend(&cp, &cap_id, answered);
    assert!(
        spent <= CAP_MICROS,
        "settled {spent} > cap {CAP_MICROS}: the bound is 0"
    );
    let leased = micros(&cap_view(&cp, &cap_id)["leased_usd"]);
    assert!(leased <= CAP_MICROS, "leased {leased}");

    // Node a stops in an orderly way: what it holds unspent goes back.
    a.stop();
    let given_back = wait_until(Duration::from_secs(20), || {
        micros(&cap_view(&cp, &cap_id)["leased_usd"]) < leased
    });
    assert!(given_back, "the stopped node kept its lease");
    // What stays leased still covers everything both nodes spent: only unspent budget came
    // back.
    let after = micros(&cap_view(&cp, &cap_id)["leased_usd"]);
    assert!(after >= spent, "leased {after} < spent {spent}");
}
