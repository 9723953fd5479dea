//! PII and secret guardrails end to end: a policy set on the control plane, pushed to a
//! node, applied to requests before they leave — redacted with typed placeholders, or
//! refused with a code naming the guardrail in the client API's error shape — and only in
//! the environments whose policy says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::{json, Value};

fn chat(content: &str) -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": content}]}).to_string()
}

/// A control plane whose tenant `acme` routes production to `openai`, with answers'
/// e-mails redacted and card numbers blocked; a key of it; a node in sync.
fn answers_guarded(
    driver: dataplane::config::DriverChoice,
    name: &str,
    openai: &MockProvider,
) -> (controlplane::Running, String, Gateway) {
    let cp = cp_start(scratch_dir(&format!("{name}-{driver:?}")), "127.0.0.1:0");
    tenant(&cp, "acme", "enterprise");
    route_env(&cp, "acme", "production", openai);
    put(
        &cp,
        "/v1/tenants/acme/environments/production/policy",
        json!({"guardrails": {"email": {"responses": "redact"}, "card": {"responses": "block"}}}),
    );
    let acme = key(&cp, "acme", "production");
    let gw = gateway(driver, &cp);
    wait_workers(&gw, revision(&cp));
    (cp, acme, gw)
}

/// What the provider received last, as JSON.
fn sent(mock: &MockProvider) -> Value {
    serde_json::from_slice(&mock.requests().last().unwrap().body).unwrap()
}

both_drivers!(
    requests_are_redacted_or_refused_as_the_policy_says,
    |driver| {
        let openai = MockProvider::start(MockOptions::default());
        let anthropic = MockProvider::start(MockOptions {
            default: e2e::mock::Behavior::AnthropicJson,
            ..Default::default()
        });
        let cp = cp_start(
            scratch_dir(&format!("guardrails-{driver:?}")),
            "127.0.0.1:0",
        );
        tenant(&cp, "acme", "enterprise");
        tenant(&cp, "beta", "pro");
        route_env(&cp, "acme", "production", &openai);
        route_env(&cp, "beta", "production", &openai);
        let base = "/v1/tenants/acme/environments/production";
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
        // Refused at PUT, naming the field: an unknown entity, an unknown action.
        for (bad, field) in [
            (
                json!({"guardrails": {"colour": "redact"}}),
                "guardrails.colour",
            ),
            (
                json!({"guardrails": {"email": {"requests": "hide"}}}),
                "guardrails.email.requests",
            ),
        ] {
            let r = api(&cp, "PUT", &format!("{base}/policy"), Some(bad));
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
            assert!(
                String::from_utf8_lossy(&r.body).contains(field),
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let policy = put(
        &cp,
        &format!("{base}/policy"),
        json!({"guardrails": {"email": "redact", "card": {"requests": "block"}, "secret": "block"}}),
    )
    .json();
        assert_eq!(
            policy["guardrails"]["card"]["responses"], "allow",
            "{policy}"
        );
        let acme = key(&cp, "acme", "production");
        let beta = key(&cp, "beta", "production");
        let gw = gateway(driver, &cp);
        wait_workers(&gw, revision(&cp));

        // Redacted: the same address gets the same placeholder, another the next one; an
        // address written with a JSON escape is found too; the JSON stays valid.
        let body =
            chat("write to jane.doe@example.com, cc jane.doe@example.com and bob@example.org")
                .replace("bob@example.org", "bob\\u0040example.org");
        let r = post_with_key(gw.addr(), &acme, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let got = sent(&openai);
        assert_eq!(
            got["messages"][0]["content"], "write to [EMAIL_1], cc [EMAIL_1] and [EMAIL_2]",
            "{got}"
        );
        assert_eq!(got["model"], "m");

        // Refused, in each API's error shape, and nothing reaches a provider.
        let before = (openai.request_count(), anthropic.request_count());
        let r = post_with_key(
            gw.addr(),
            &acme,
            "/v1/chat/completions",
            &chat("my card is 4111 1111 1111 1111"),
        );
        assert_eq!(r.status, 400);
        let e = r.json();
        assert_eq!(e["error"]["code"], "guardrail_card", "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        let messages = json!({"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "key: sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"}]}).to_string();
        let r = post_with_key(gw.addr(), &acme, "/v1/messages", &messages);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["code"], "guardrail_secret", "{e}");
        assert_eq!((openai.request_count(), anthropic.request_count()), before);
        // A card number that fails the Luhn check is not a card.
        let r = post_with_key(
            gw.addr(),
            &acme,
            "/v1/chat/completions",
            &chat("order 4111 1111 1111 1112"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

        // Each block is in the control plane's audit log: who and what kind, never the value.
        let blocks = || -> Vec<Value> {
            api(&cp, "GET", "/v1/audit?after=0&limit=10000", None).json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["action"] == "guardrail.block")
                .cloned()
                .collect()
        };
        assert!(
            wait_until(std::time::Duration::from_secs(10), || blocks().len() == 2),
            "{:?}",
            blocks()
        );
        let logged = blocks();
        let mut entities: Vec<&str> = logged
            .iter()
            .map(|r| r["detail"]["entity"].as_str().unwrap())
            .collect();
        // Workers report in their own time: in any order.
        entities.sort_unstable();
        assert_eq!(entities, ["card", "secret"], "{logged:?}");
        for r in &logged {
            assert!(r["actor"].as_str().unwrap().starts_with("node:"), "{r}");
            assert_eq!(r["detail"]["tenant_id"], "acme");
            assert_eq!(r["detail"]["direction"], "request");
            assert!(acme.contains(r["target"].as_str().unwrap()), "{r}");
            let text = r.to_string();
            assert!(
                !text.contains("4111") && !text.contains("sk-proj"),
                "{text}"
            );
        }

        // Another tenant without guardrails: untouched.
        let r = post_with_key(
            gw.addr(),
            &beta,
            "/v1/chat/completions",
            &chat("write to jane.doe@example.com, card 4111 1111 1111 1111"),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            sent(&openai)["messages"][0]["content"],
            "write to jane.doe@example.com, card 4111 1111 1111 1111"
        );
    }
);

// Responses: the provider's answer is redacted before it reaches the client, or refused
// whole (nothing of it relayed) with the guardrail's code; requests are left alone when the
// policy says so.
both_drivers!(
    answers_are_redacted_or_refused_before_the_client_sees_them,
    |driver| {
        let openai = MockProvider::start(MockOptions {
            chunked_json: true,
            ..Default::default()
        });
        let (cp, acme, gw) = answers_guarded(driver, "guardrails-resp", &openai);

        // The mock echoes the prompt: the request went as written, the answer comes back
        // redacted (a chunked JSON answer, held whole, valid JSON after).
        let r = post_with_key(
            gw.addr(),
            &acme,
            "/v1/chat/completions",
            &chat("mail jane.doe@example.com"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            sent(&openai)["messages"][0]["content"],
            "mail jane.doe@example.com"
        );
        let answer = r.json();
        assert_eq!(
            answer["choices"][0]["message"]["content"], "echo: mail [EMAIL_1]",
            "{answer}"
        );
        // Blocked: the client gets the guardrail's error instead of the answer.
        let r = post_with_key(
            gw.addr(),
            &acme,
            "/v1/chat/completions",
            &chat("card 4111 1111 1111 1111"),
        );
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["error"]["code"], "guardrail_card", "{e}");
        assert!(!String::from_utf8_lossy(&r.body).contains("4111"));
        // The connection to the provider was read to its end and serves the next request.
        let r = post_with_key(gw.addr(), &acme, "/v1/chat/completions", &chat("hello"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hello");
        let blocked = || {
            api(&cp, "GET", "/v1/audit?after=0&limit=10000", None).json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "guardrail.block" && r["detail"]["direction"] == "response")
        };
        assert!(
            wait_until(std::time::Duration::from_secs(10), blocked),
            "the response block is audited"
        );
    }
);

/// A raw chunked SSE response of these events (each `data:` payload, with an optional
/// `event:` name), one chunk per event.
fn sse_response(events: &[(Option<&str>, &str)]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for (name, data) in events {
        let ev = match name {
            Some(n) => format!("event: {n}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        };
        out.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn chat_chunk(content: &str, finish: Option<&str>) -> String {
    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})
    .to_string()
}

/// The text of a relayed OpenAI stream: its content deltas joined.
fn streamed_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

// Streams: a value split across events is redacted as a whole, what is held back arrives
// before the event that ends the text, and a blocked value ends the stream with an error
// event before any of it went out.
both_drivers!(streamed_answers_are_redacted_across_events, |driver| {
    let openai = MockProvider::start(MockOptions::default());
    let (cp, acme, gw) = answers_guarded(driver, "guardrails-stream", &openai);
    let stream_request =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();

    openai.push_behavior(e2e::mock::Behavior::Raw(sse_response(&[
        (None, &chat_chunk("", None)),
        (None, &chat_chunk("mail jane.d", None)),
        (None, &chat_chunk("oe@exam", None)),
        (None, &chat_chunk("ple.com now", None)),
        (None, &chat_chunk("", Some("stop"))),
        (None, "[DONE]"),
    ])));
    let r = post_with_key(gw.addr(), &acme, "/v1/chat/completions", &stream_request);
    assert_eq!(r.status, 200);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(streamed_text(&body), "mail [EMAIL_1] now", "{body}");
    assert!(!body.contains("exam"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    openai.push_behavior(e2e::mock::Behavior::Raw(sse_response(&[
        (None, &chat_chunk("card 4111 1111 ", None)),
        (None, &chat_chunk("1111 1111 thanks", None)),
        (None, &chat_chunk("", Some("stop"))),
        (None, "[DONE]"),
    ])));
    let mut s = gw.connect();
    {
        use std::io::Write;
        s.write_all(&post(
            "/v1/chat/completions",
            &key_headers(&acme),
            &stream_request,
        ))
        .unwrap();
        let got = read_until(&mut s, "");
        assert!(got.contains("guardrail_card"), "{got}");
        assert!(!got.contains("4111") && !got.contains("[DONE]"), "{got}");
    }

    // Anthropic's stream: text deltas of a content block.
    let anthropic = MockProvider::start(MockOptions::default());
    put(
        &cp,
        "/v1/tenants/acme/environments/production/upstreams/an",
        json!({"provider": "anthropic", "base_url": anthropic.base_url(), "non_retention": {"mode": "account_agreement"}}),
    );
    put(
        &cp,
        "/v1/tenants/acme/environments/production/routes/claude",
        json!({"prefix": "claude-", "targets": [{"upstream": "an"}]}),
    );
    wait_workers(&gw, revision(&cp));
    let delta = |t: &str| {
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}).to_string()
    };
    anthropic.push_behavior(e2e::mock::Behavior::Raw(sse_response(&[
        (Some("message_start"), r#"{"type":"message_start","message":{"id":"m1","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":5,"output_tokens":1}}}"#),
        (Some("content_block_start"), r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
        (Some("content_block_delta"), &delta("to bob@exa")),
        (Some("content_block_delta"), &delta("mple.org!")),
        (Some("content_block_stop"), r#"{"type":"content_block_stop","index":0}"#),
        (Some("message_stop"), r#"{"type":"message_stop"}"#),
    ])));
    let r = post_with_key(gw.addr(),
        &acme,
        "/v1/messages",
        &json!({"model": "claude-x", "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = String::from_utf8_lossy(&r.body).into_owned();
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["type"] == "content_block_delta")
        .filter_map(|v| v["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "to [EMAIL_1]!", "{body}");
    assert!(body.contains("event: message_stop"), "{body}");
});

// Leak detection: a valid key of ours in a prompt is reported (its id and hash, never the
// key), confirmed against the store, marked leaked and audited; where the owning
// environment's policy says so it is revoked at once and every node refuses it. A string
// that only looks like a key (a bad checksum) is not reported.
both_drivers!(
    a_key_seen_in_a_prompt_is_marked_leaked_and_revoked,
    |driver| {
        let openai = MockProvider::start(MockOptions::default());
        let cp = cp_start(scratch_dir(&format!("leak-{driver:?}")), "127.0.0.1:0");
        tenant(&cp, "acme", "enterprise");
        route_env(&cp, "acme", "production", &openai);
        route_env(&cp, "acme", "staging", &openai);
        put(
            &cp,
            "/v1/tenants/acme/environments/production/policy",
            json!({"revoke_leaked_keys": true}),
        );
        let user = key(&cp, "acme", "staging");
        let leaked = create_key(&cp, "acme", json!({"environment": "production"}));
        let (leaked_key, leaked_id) = (
            leaked["key"].as_str().unwrap().to_string(),
            leaked["info"]["key_id"].as_str().unwrap().to_string(),
        );
        let kept = create_key(&cp, "acme", json!({"environment": "staging"}));
        let (kept_key, kept_id) = (
            kept["key"].as_str().unwrap().to_string(),
            kept["info"]["key_id"].as_str().unwrap().to_string(),
        );
        let gw = gateway(driver, &cp);
        wait_workers(&gw, revision(&cp));
        assert_eq!(chat_with_key(gw.addr(), Some(&leaked_key), "m").status, 200);

        // A look-alike with a broken checksum, then the real keys pasted into a prompt.
        let mut fake = leaked_key.clone();
        let last = fake.pop().unwrap();
        fake.push(if last == 'a' { 'b' } else { 'a' });
        let r = post_with_key(
            gw.addr(),
            &user,
            "/v1/chat/completions",
            &chat(&format!("debug this: {fake}")),
        );
        assert_eq!(r.status, 200);
        let r = post_with_key(
            gw.addr(),
            &user,
            "/v1/chat/completions",
            &chat(&format!(
                "my keys are {leaked_key} and {kept_key}, why do they fail?"
            )),
        );
        assert_eq!(r.status, 200);

        // The production key's policy revokes it; the staging key is only marked.
        assert!(
            wait_until(std::time::Duration::from_secs(10), || {
                chat_with_key(gw.addr(), Some(&leaked_key), "m").status == 401
            }),
            "the leaked key was revoked on the node"
        );
        let info = api(&cp, "GET", &format!("/v1/keys/{leaked_id}"), None).json();
        assert_eq!(info["status"], "revoked", "{info}");
        assert!(info["leaked_at"].as_i64().unwrap() > 0, "{info}");
        let info = api(&cp, "GET", &format!("/v1/keys/{kept_id}"), None).json();
        assert_eq!(info["status"], "active", "{info}");
        assert!(info["leaked_at"].as_i64().unwrap() > 0, "{info}");
        assert_eq!(chat_with_key(gw.addr(), Some(&kept_key), "m").status, 200);
        let audit = api(&cp, "GET", "/v1/audit?after=0&limit=10000", None).json();
        let records = audit["data"].as_array().unwrap();
        let reported: Vec<&str> = records
            .iter()
            .filter(|r| r["action"] == "key.leaked")
            .map(|r| r["detail"]["leaked_key_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            reported.len(),
            2,
            "the look-alike was not reported: {reported:?}"
        );
        assert!(records.iter().any(|r| r["action"] == "key.revoke"
            && r["target"] == leaked_id.as_str()
            && r["detail"]["reason"] == "leaked"));
        let text = audit.to_string();
        assert!(
            !text.contains(&leaked_key) && !text.contains(&kept_key),
            "no key in the audit log"
        );

        // In an answer too.
        let third = create_key(&cp, "acme", json!({"environment": "staging"}));
        let (third_key, third_id) = (
            third["key"].as_str().unwrap().to_string(),
            third["info"]["key_id"].as_str().unwrap().to_string(),
        );
        openai.push_behavior(e2e::mock::Behavior::Status {
        status: 200,
        body: json!({"id": "c", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("use {third_key}")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        .to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    });
        assert_eq!(chat_with_key(gw.addr(), Some(&user), "m").status, 200);
        assert!(
            wait_until(std::time::Duration::from_secs(10), || {
                api(&cp, "GET", &format!("/v1/keys/{third_id}"), None).json()["leaked_at"]
                    .as_i64()
                    .unwrap()
                    > 0
            }),
            "a key in an answer is reported"
        );
    }
);

both_drivers!(
    an_answer_that_cannot_be_scanned_is_refused_unless_the_policy_fails_open,
    |driver| {
        // An answer that is not text: the scanner cannot read it.
        let mut raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 6\r\nconnection: close\r\n\r\n".to_vec();
        raw.extend_from_slice(&[0xff, 0xfe, b'a', 0x00, 0x80, b'z']);
        let openai = MockProvider::start(MockOptions {
            default: e2e::mock::Behavior::Raw(raw.clone()),
            ..Default::default()
        });
        let (cp, acme, gw) = answers_guarded(driver, "guardrails-fail-open", &openai);
        let r = post_with_key(gw.addr(), &acme, "/v1/chat/completions", &chat("hello"));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "guardrail_unavailable");

        // The tenant chooses to fail open: relayed as it came, and audited.
        put(
            &cp,
            "/v1/tenants/acme/environments/production/policy",
            json!({"guardrails": {"email": {"responses": "redact"}}, "guardrails_fail_open": true}),
        );
        wait_workers(&gw, revision(&cp));
        let r = post_with_key(gw.addr(), &acme, "/v1/chat/completions", &chat("hello"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, raw[raw.len() - 6..], "relayed unchanged");
        let unscanned = || {
            api(&cp, "GET", "/v1/audit?after=0&limit=10000", None).json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| {
                    r["action"] == "guardrail.unscanned" && r["detail"]["direction"] == "response"
                })
        };
        assert!(
            wait_until(std::time::Duration::from_secs(10), unscanned),
            "failing open is audited"
        );
        let policy = api(
            &cp,
            "GET",
            "/v1/tenants/acme/environments/production/policy",
            None,
        );
        assert_eq!(
            policy.json()["guardrails_fail_open"],
            true,
            "{}",
            policy.text()
        );
    }
);

both_drivers!(a_tenants_own_patterns_are_redacted_or_blocked, |driver| {
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(
        scratch_dir(&format!("guardrails-patterns-{driver:?}")),
        "127.0.0.1:0",
    );
    tenant(&cp, "acme", "enterprise");
    route_env(&cp, "acme", "production", &openai);
    route_env(&cp, "acme", "staging", &openai);
    let policy = |env: &str| format!("/v1/tenants/acme/environments/{env}/policy");
    // A pattern no parser reads is refused, naming it.
    let r = api(
        &cp,
        "PUT",
        &policy("production"),
        Some(json!({"patterns": ["ok", "(unclosed"], "guardrails": {"custom": "redact"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("patterns[1]"), "{}", r.text());
    put(
        &cp,
        &policy("production"),
        json!({"patterns": [r"PROJ-[0-9]{4}", r"acct#[a-z]{3,8}"], "guardrails": {"custom": "redact"}}),
    );
    put(
        &cp,
        &policy("staging"),
        json!({"patterns": [r"PROJ-[0-9]{4}"], "guardrails": {"custom": {"requests": "block"}}}),
    );
    let prod = key(&cp, "acme", "production");
    let staging = key(&cp, "acme", "staging");
    let gw = gateway(driver, &cp);
    wait_workers(&gw, revision(&cp));

    let r = post_with_key(
        gw.addr(),
        &prod,
        "/v1/chat/completions",
        &chat("see PROJ-1234 and acct#alpha, again PROJ-1234; not PROJ-12"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sent(&openai)["messages"][0]["content"],
        "see [CUSTOM_1] and [CUSTOM_2], again [CUSTOM_1]; not PROJ-12"
    );
    let r = post_with_key(
        gw.addr(),
        &staging,
        "/v1/chat/completions",
        &chat("ticket PROJ-0042"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "guardrail_custom");
    assert_eq!(
        openai.request_count(),
        1,
        "the blocked request was not sent"
    );
});
