//! Every phase of a request can end it with an error from the catalogue, in the error shape
//! of the API the client called: OpenAI's `{"error": {..., "code"}}` or Anthropic's
//! `{"type": "error", "error": {..., "code"}}`. One keyed node, one request per phase and
//! family, over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Duration;

use e2e::cp::{cp_start, create_key, put, revision, tenant, wait_workers};
use e2e::mock::{Behavior, MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

const OPENAI: &str = "/v1/chat/completions";
const ANTHROPIC: &str = "/v1/messages";

/// A request presenting `key` in its family's own header, with `ctype` as its
/// Content-Type.
fn request(
    method: &str,
    path: &str,
    key: Option<&str>,
    ctype: Option<&str>,
    body: &str,
) -> Vec<u8> {
    let mut h = "Connection: close\r\n".to_string();
    if let Some(k) = key {
        if path.starts_with(ANTHROPIC) {
            h.push_str(&format!("x-api-key: {k}\r\n"));
        } else {
            h.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
    }
    if let Some(c) = ctype {
        h.push_str(&format!("Content-Type: {c}\r\n"));
    }
    e2e::request(method, path, &h, body)
}

fn body(path: &str, model: &str) -> String {
    if path == ANTHROPIC {
        format!(
            r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    } else {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    }
}

/// Asserts the status, the code, and the shape of the family `path` belongs to.
fn expect(phase: &str, r: &Resp, path: &str, status: u16, code: &str) {
    let v = r.json();
    assert_eq!(r.status, status, "{phase} {path}: {v}");
    assert_eq!(
        r.header("x-request-id").map(str::len),
        Some(32),
        "{phase} {path}"
    );
    if path.starts_with(ANTHROPIC) {
        assert_eq!(v["type"], "error", "{phase} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{phase} {path}: {v}");
        assert!(v["error"]["type"].is_string() && v["error"]["message"].is_string());
    } else {
        assert!(v.get("type").is_none(), "{phase} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{phase} {path}: {v}");
        assert!(v["error"]["type"].is_string() && v["error"]["message"].is_string());
        assert!(v["error"]["param"].is_null());
    }
}

both_drivers!(
    every_phase_ends_requests_with_catalogued_errors_in_both_shapes,
    |driver| {
        let ok = MockProvider::start(MockOptions::default());
        // Claims a chunked body, then sends a chunk size that is not hexadecimal.
        let broken = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::Raw(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        ..Default::default()
    });
        let dir = scratch_dir(&format!("phases-{driver:?}"));
        let cp = cp_start(dir, "127.0.0.1:0");
        tenant(&cp, "acme", "pro");
        for env in ["production", "staging"] {
            let base = format!("/v1/tenants/acme/environments/{env}");
            for (name, provider, url) in [
                ("oa", "openai", ok.base_url()),
                ("an", "anthropic", ok.base_url()),
                // Nothing listens on port 1: the connection is refused at once.
                ("oa-dead", "openai", "http://127.0.0.1:1".to_string()),
                ("an-dead", "anthropic", "http://127.0.0.1:1".to_string()),
                ("oa-broken", "openai", broken.base_url()),
                ("an-broken", "anthropic", broken.base_url()),
            ] {
                // Production's upstreams can be told not to retain (OpenAI's default,
                // Anthropic's by agreement); staging's cannot.
                let non_retention = match (env, provider) {
                    ("production", "anthropic") => json!({"mode": "account_agreement"}),
                    ("production", _) => serde_json::Value::Null,
                    _ => json!({"mode": "none"}),
                };
                put(
                    &cp,
                    &format!("{base}/upstreams/{name}"),
                    json!({"provider": provider, "base_url": url, "non_retention": non_retention}),
                );
            }
            for (route, model, target) in [
                ("gpt", "gpt-ok", "oa"),
                ("claude", "claude-ok", "an"),
                ("gpt-dead", "gpt-dead", "oa-dead"),
                ("claude-dead", "claude-dead", "an-dead"),
                ("gpt-broken", "gpt-broken", "oa-broken"),
                ("claude-broken", "claude-broken", "an-broken"),
            ] {
                put(
                    &cp,
                    &format!("{base}/routes/{route}"),
                    json!({"model": model, "targets": [{"upstream": target}]}),
                );
            }
        }
        // Staging requires zero retention, which none of its upstreams can promise.
        put(
            &cp,
            "/v1/tenants/acme/environments/staging/policy",
            json!({"zero_retention": true}),
        );
        let key = create_key(&cp, "acme", json!({"environment": "production"}))["key"]
            .as_str()
            .unwrap()
            .to_string();
        let staging = create_key(&cp, "acme", json!({"environment": "staging"}))["key"]
            .as_str()
            .unwrap()
            .to_string();
        let limited = create_key(
            &cp,
            "acme",
            json!({"environment": "production", "allowed_models": ["gpt-ok", "claude-ok"]}),
        )["key"]
            .as_str()
            .unwrap()
            .to_string();
        let gw = e2e::cp::node_with(driver, &e2e::cp::register(&cp), |c| {
            c.server.workers = 1;
            c.limits.max_body_bytes = 4000;
            c.body_budget_bytes = 4000;
        });
        wait_workers(&gw, revision(&cp));
        let send = |raw: Vec<u8>| exchange(gw.addr(), &raw);
        let json = Some("application/json");

        for path in [OPENAI, ANTHROPIC] {
            let (model_ok, dead, broken) = if path == OPENAI {
                ("gpt-ok", "gpt-dead", "gpt-broken")
            } else {
                ("claude-ok", "claude-dead", "claude-broken")
            };
            // The request goes through when nothing is wrong.
            assert_eq!(
                send(request(
                    "POST",
                    path,
                    Some(&key),
                    json,
                    &body(path, model_ok)
                ))
                .status,
                200
            );

            // endpoint
            let unknown = format!("{path}/nope");
            expect(
                "endpoint",
                &send(request("POST", &unknown, Some(&key), json, "{}")),
                &unknown,
                404,
                "not_found",
            );
            let r = send(request("GET", path, Some(&key), None, ""));
            expect("endpoint", &r, path, 405, "method_not_allowed");
            assert_eq!(r.header("allow"), Some("POST"));

            // authenticate
            expect(
                "authenticate",
                &send(request("POST", path, None, json, &body(path, model_ok))),
                path,
                401,
                "missing_api_key",
            );
            expect(
                "authenticate",
                &send(request(
                    "POST",
                    path,
                    Some("aigw_prod_x"),
                    json,
                    &body(path, model_ok),
                )),
                path,
                401,
                "malformed_api_key",
            );

            // admit: one request holds most of the body budget while its body trickles in.
            let mut holder = gw.connect();
            let head = format!("POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nx-api-key: {key}\r\nAuthorization: Bearer {key}\r\nContent-Length: 3000\r\n\r\n{{");
            holder.write_all(head.as_bytes()).unwrap();
            assert!(
                wait_until(Duration::from_secs(5), || admin_get(
                    gw.admin_addr(),
                    "/workers"
                )
                .json()["workers"][0]["body_bytes"]
                    == 3000),
                "the holder's body is reserved"
            );
            let padded = body(path, model_ok).replacen(
                '{',
                &format!("{{\"pad\":\"{}\",", "x".repeat(1500)),
                1,
            );
            let r = send(request("POST", path, Some(&key), json, &padded));
            expect("admit", &r, path, 503, "server_busy");
            assert_eq!(r.header("retry-after"), Some("1"));
            drop(holder);
            assert!(
                wait_until(Duration::from_secs(5), || admin_get(
                    gw.admin_addr(),
                    "/workers"
                )
                .json()["workers"][0]["body_bytes"]
                    == 0),
                "the reservation is given back"
            );

            // parse
            expect(
                "parse",
                &send(request(
                    "POST",
                    path,
                    Some(&key),
                    None,
                    &body(path, model_ok),
                )),
                path,
                415,
                "unsupported_media_type",
            );
            expect(
                "parse",
                &send(request("POST", path, Some(&key), json, "{\"model\":")),
                path,
                400,
                "invalid_json",
            );
            expect(
                "parse",
                &send(request("POST", path, Some(&key), json, "{\"messages\":[]}")),
                path,
                400,
                "missing_model",
            );
            expect(
                "parse",
                &send(request(
                    "POST",
                    path,
                    Some(&limited),
                    json,
                    &body(path, dead),
                )),
                path,
                403,
                "model_not_allowed",
            );

            // route
            expect(
                "route",
                &send(request(
                    "POST",
                    path,
                    Some(&key),
                    json,
                    &body(path, "nowhere"),
                )),
                path,
                404,
                "model_not_found",
            );
            expect(
                "route",
                &send(request(
                    "POST",
                    path,
                    Some(&staging),
                    json,
                    &body(path, model_ok),
                )),
                path,
                403,
                "policy_blocked",
            );

            // exchange
            expect(
                "exchange",
                &send(request("POST", path, Some(&key), json, &body(path, dead))),
                path,
                502,
                "upstream_unavailable",
            );

            // response: the body turned out malformed before anything reached the client.
            expect(
                "response",
                &send(request("POST", path, Some(&key), json, &body(path, broken))),
                path,
                502,
                "bad_upstream_response",
            );
        }
    }
);
