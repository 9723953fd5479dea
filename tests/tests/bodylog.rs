//! The body log end to end: a node linked to a control plane logs a request's bodies,
//! sealed, and the admin API returns them by the request's id; the client's header and the
//! tenant's opt-out keep bodies out of it; no body is ever in plaintext on disk; a tampered
//! segment is refused; a node whose body queue cannot take more drops (counted, audited) or
//! refuses, per tenant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::config::DriverChoice;
use e2e::cp::*;
use e2e::mock::{Behavior, MockOptions, MockProvider};
use e2e::*;
use serde_json::{json, Value};

const MARKER: &str = "BODYLOG-MARKER-5f2c9e";

fn chat(text: &str, stream: bool) -> String {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

/// A chat request with extra header lines; the answer.
fn send(gw: std::net::SocketAddr, key: &str, extra: &str, body: &str) -> Resp {
    let headers = format!("{}{extra}", key_headers(key));
    exchange(gw, &post("/v1/chat/completions", &headers, body))
}

fn logged(cp: &controlplane::Running, tenant: &str, id: &str) -> Resp {
    api(
        cp,
        "GET",
        &format!("/v1/tenants/{tenant}/bodies/{id}"),
        None,
    )
}

/// Waits until the request `id` is in the body log; its record.
fn wait_logged(cp: &controlplane::Running, tenant: &str, id: &str) -> Value {
    let mut last = None;
    let found = wait_until(Duration::from_secs(20), || {
        let r = logged(cp, tenant, id);
        let ok = r.status == 200;
        last = Some(r);
        ok
    });
    let r = last.unwrap();
    assert!(found, "{id} never logged: {} {}", r.status, r.text());
    r.json()
}

/// Waits until the node holds `n` opted-out tenants.
fn wait_opted_out(gw: &Gateway, n: u64) {
    assert!(
        wait_until(Duration::from_secs(10), || {
            admin_get(gw.admin_addr(), "/readyz").json()["body_log_opted_out_tenants"] == n
        }),
        "the node never heard of the setting"
    );
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn assert_no_plaintext(dirs: &[&Path]) {
    let mut seen = 0;
    for dir in dirs {
        for f in files_under(dir) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            seen += 1;
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "{} holds a body in plaintext",
                f.display()
            );
        }
    }
    assert!(seen > 0, "no files to look at");
}

fn audit_actions(cp: &controlplane::Running) -> Vec<String> {
    let r = api(cp, "GET", "/v1/audit?limit=1000", None);
    assert_eq!(r.status, 200);
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap_or("").to_string())
        .collect()
}

both_drivers!(
    bodies_are_logged_sealed_by_request_id_unless_opted_out,
    |driver| {
        let mock = MockProvider::start(MockOptions {
            default: Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            },
            ..Default::default()
        });
        let dir = scratch_dir(&format!("bodylog-{driver:?}"));
        let cp = cp_start(dir.clone(), "127.0.0.1:0");
        tenant(&cp, "acme", "pro");
        route_env(&cp, "acme", "production", &mock);
        let key = key(&cp, "acme", "production");
        let link = register(&cp);
        let gw = gateway_with(driver, &link, |_| {});
        wait_workers(&gw, revision(&cp));

        // A JSON answer: both bodies, by the x-request-id the client got.
        let r = send(
            gw.addr(),
            &key,
            "",
            &chat(&format!("hello {MARKER}"), false),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let first = r.header("x-request-id").unwrap().to_string();
        let rec = wait_logged(&cp, "acme", &first);
        assert!(
            rec["request_body"].as_str().unwrap().contains(MARKER),
            "{rec}"
        );
        assert_eq!(rec["response_body"].as_str().unwrap(), r.text(), "{rec}");
        assert_eq!(rec["meta"]["status"], 200);
        assert_eq!(rec["meta"]["request_id"], first.as_str());
        assert_eq!(rec["meta"]["model"], "gpt-4o");
        assert_eq!(rec["meta"]["response_truncated"], false);
        // The same through the command line.
        let via_cli = cli_of(&cp, &["body-get", "acme", &first]);
        assert_eq!(via_cli, rec);
        // Another tenant's id space: not found.
        tenant(&cp, "other", "free");
        assert_eq!(logged(&cp, "other", &first).status, 404);

        // A stream: the bytes relayed.
        let r = send(
            gw.addr(),
            &key,
            "",
            &chat(&format!("stream {MARKER}"), true),
        );
        assert_eq!(r.status, 200);
        let streamed = r.header("x-request-id").unwrap().to_string();
        let rec = wait_logged(&cp, "acme", &streamed);
        let body = rec["response_body"].as_str().unwrap();
        assert!(body.contains("data: [DONE]"), "{body}");
        assert_eq!(chat_stream_text(body.as_bytes()), chat_stream_text(&r.body));
        assert_eq!(rec["meta"]["stream"], true);

        // The client's header: nothing logged, and the header is not forwarded.
        let r = send(
            gw.addr(),
            &key,
            "x-aigw-no-log: 1\r\n",
            &chat(&format!("private {MARKER}"), false),
        );
        assert_eq!(r.status, 200);
        let private = r.header("x-request-id").unwrap().to_string();
        let upstream = mock.requests().pop().unwrap();
        assert!(
            !upstream
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("x-aigw-no-log")),
            "{:?}",
            upstream.headers
        );
        // A value it does not know is refused, naming the header.
        let r = send(
            gw.addr(),
            &key,
            "x-aigw-no-log: maybe\r\n",
            &chat("x", false),
        );
        assert_eq!(r.status, 400);
        assert!(r.text().contains("x-aigw-no-log"), "{}", r.text());
        // Records travel in order on the link: once a later one is in, the private one
        // would be too.
        let r = send(gw.addr(), &key, "", &chat("later", false));
        let later = r.header("x-request-id").unwrap().to_string();
        wait_logged(&cp, "acme", &later);
        assert_eq!(logged(&cp, "acme", &private).status, 404);

        // No body in plaintext under the control plane's data or the node's directories.
        assert_no_plaintext(&[&dir, link.dir.path()]);

        // A tampered segment is refused, not served.
        let segments: Vec<_> = files_under(&dir.join("bodies"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "seal"))
            .collect();
        assert_eq!(segments.len(), 1, "{segments:?}");
        let mut bytes = std::fs::read(&segments[0]).unwrap();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x40;
        std::fs::write(&segments[0], &bytes).unwrap();
        let r = logged(&cp, "acme", &first);
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "body_log_damaged");
        bytes[at] ^= 0x40;
        std::fs::write(&segments[0], &bytes).unwrap();
        assert_eq!(logged(&cp, "acme", &first).status, 200);

        // The tenant opts out (audited): nothing more is written, and what was logged is
        // deleted by the sweep it starts.
        let r = put(&cp, "/v1/tenants/acme/body-log", json!({"enabled": false}));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(audit_actions(&cp).contains(&"body_log.opt_out".to_string()));
        assert!(
            wait_until(Duration::from_secs(10), || logged(&cp, "acme", &first)
                .status
                == 404),
            "the opted-out tenant's bodies were not deleted"
        );
        wait_opted_out(&gw, 1);
        let r = send(
            gw.addr(),
            &key,
            "",
            &chat(&format!("after {MARKER}"), false),
        );
        assert_eq!(r.status, 200);
        let after = r.header("x-request-id").unwrap().to_string();
        let r = put(&cp, "/v1/tenants/acme/body-log", json!({"enabled": true}));
        assert_eq!(r.status, 200);
        wait_opted_out(&gw, 0);
        let r = send(gw.addr(), &key, "", &chat("back on", false));
        let back = r.header("x-request-id").unwrap().to_string();
        wait_logged(&cp, "acme", &back);
        assert_eq!(logged(&cp, "acme", &after).status, 404);
        assert!(files_under(&dir.join("bodies"))
            .iter()
            .all(|f| !std::fs::read(f)
                .unwrap()
                .windows(MARKER.len())
                .any(|w| w == MARKER.as_bytes())));

        // Settings beyond the tier are refused, naming the field.
        let r = api(
            &cp,
            "PUT",
            "/v1/tenants/acme/body-log",
            Some(json!({"retention_days": 31})),
        );
        assert_eq!(r.status, 400);
        assert!(r.text().contains("retention_days"), "{}", r.text());
        let r = api(
            &cp,
            "PUT",
            "/v1/tenants/acme/body-log",
            Some(json!({"when_behind": "wait"})),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("when_behind"), "{}", r.text());
        let got = api(&cp, "GET", "/v1/tenants/acme/body-log", None).json();
        assert_eq!(
            got,
            json!({"enabled": true, "retention_days": 30, "when_behind": "drop"})
        );
        let set = cli_of(
            &cp,
            &[
                "body-log-set",
                "acme",
                "--retention-days",
                "14",
                "--when-behind",
                "refuse",
            ],
        );
        assert_eq!(
            set,
            json!({"enabled": true, "retention_days": 14, "when_behind": "refuse"})
        );
        assert_eq!(cli_of(&cp, &["body-log-get", "acme"]), set);
    }
);

#[test]
fn a_full_queue_drops_counted_and_audited_or_refuses_per_tenant() {
    let mock = MockProvider::start(MockOptions::default());
    let cp = cp_start(scratch_dir("bodylog-full"), "127.0.0.1:0");
    tenant(&cp, "dropper", "pro");
    tenant(&cp, "refuser", "enterprise");
    route_env(&cp, "dropper", "production", &mock);
    route_env(&cp, "refuser", "production", &mock);
    let r = put(
        &cp,
        "/v1/tenants/refuser/body-log",
        json!({"when_behind": "refuse", "retention_days": 90}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let dropper = key(&cp, "dropper", "production");
    let refuser = key(&cp, "refuser", "production");
    // A queue that can hold nothing: always full.
    let gw = node(DriverChoice::Epoll, &cp, |c| c.body_log_queue_bytes = 0);
    wait_workers(&gw, revision(&cp));

    assert!(
        wait_until(Duration::from_secs(10), || {
            admin_get(gw.admin_addr(), "/readyz").json()["body_log_refusing_tenants"] == 1
        }),
        "the node never heard of the setting"
    );

    // Refuse: answered 503, and nothing is forwarded.
    let before = mock.request_count();
    let r = send(gw.addr(), &refuser, "", &chat("x", false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "body_log_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(mock.request_count(), before);

    // Drop: served, counted in /metrics, and in the tenant's audit log.
    let r = send(gw.addr(), &dropper, "", &chat("y", false));
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-request-id").unwrap().to_string();
    // Counted when the request ends, just after its answer went out.
    let dropped = || -> u64 {
        admin_get(gw.admin_addr(), "/metrics")
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("aigw_body_log_dropped_total "))
            .expect("the counter is exported")
            .parse()
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || dropped() >= 1),
        "the drop was not counted"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = api(&cp, "GET", "/v1/audit?limit=1000", None);
            r.json()["data"].as_array().unwrap().iter().any(|a| {
                a["action"] == "body_log.dropped" && a["detail"]["request_id"] == id.as_str()
            })
        }),
        "no audit record of the drop"
    );
    assert_eq!(logged(&cp, "dropper", &id).status, 404);
}
