//! The gateway in front of a provider that behaves like the real APIs (the mock, whose
//! shapes the official SDKs accept — see mock_provider.rs): streams cut across reads and
//! merged into one, comments and pings, the Responses API's named events, chunked JSON,
//! each API's own headers and error shapes, overload, and an upstream dying mid-stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use dataplane::config::DriverChoice;
use e2e::mock::{
    Behavior, MockOptions, MockProvider, SseWrites, ANTHROPIC_ACCOUNT_HEADERS,
    OPENAI_ACCOUNT_HEADERS,
};
use e2e::*;

/// A gateway with one route per model name given, each to the upstreams named, in order.
/// Upstreams are (name, kind, provider); every upstream presents `sk-provider` and speaks
/// OpenAI's `stream_options`.
fn gateway(
    driver: DriverChoice,
    upstreams: &[(&str, &str, &MockProvider)],
    routes: &[(&str, &[&str])],
) -> Gateway {
    let credential = secret_file("fidelity-provider-key", "sk-provider");
    let settings = format!(
        "credential_file = \"{}\"\nstream_options = true",
        credential.display()
    );
    let mut toml = String::new();
    for (name, kind, mock) in upstreams {
        toml.push_str(&upstream_toml(name, kind, &mock.base_url(), &settings));
    }
    for (model, targets) in routes {
        let targets: Vec<String> = targets
            .iter()
            .map(|t| format!("{{ upstream = \"{t}\" }}"))
            .collect();
        toml.push_str(&format!(
            "[[routes]]\nmodel = \"{model}\"\ntargets = [{}]\n",
            targets.join(", ")
        ));
    }
    Gateway::with_toml(driver, &toml, |_| {})
}

/// Requests whose provider reported usage, with their input and output tokens, over every
/// worker.
fn usage(gw: &Gateway) -> (u64, u64, u64) {
    let v = admin_get(gw.admin_addr(), "/workers").json();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0, 0), |(r, i, o), w| {
            (
                r + w["usage"]["requests"].as_u64().unwrap(),
                i + w["usage"]["input_tokens"].as_u64().unwrap(),
                o + w["usage"]["output_tokens"].as_u64().unwrap(),
            )
        })
}

// The official SDKs, through the gateway, get exactly what they get from the provider
// directly, however the provider cuts its streams: split across reads, merged into one,
// with comments; for OpenAI chat, the Responses API and Anthropic. Every request's tokens
// are counted (streams whose client did not ask for usage included), chunked JSON too.
// The provider is served under a path prefix, which the upstream's base_url carries.
both_drivers!(
    sdks_get_what_the_provider_sent_however_it_is_cut,
    |driver| {
        for sse in [SseWrites::Split(7), SseWrites::Merged] {
            let mock = |default| {
                MockProvider::start(MockOptions {
                    default,
                    credential: Some("sk-provider".into()),
                    path_prefix: "/prov".into(),
                    sse,
                    sse_comments: sse == SseWrites::Merged,
                    chunked_json: sse == SseWrites::Split(7),
                    ..Default::default()
                })
            };
            let openai = mock(Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            });
            let anthropic = mock(Behavior::AnthropicStream {
                events: 3,
                delay_ms: 0,
            });
            let gw = gateway(
                driver,
                &[("oa", "openai", &openai), ("an", "anthropic", &anthropic)],
                &[("m", &["oa", "an"])],
            );
            let base = format!("http://{}", gw.addr());
            for api in ["openai", "responses", "anthropic"] {
                let out = run_sdk_script("conformance.py", &[&base, api, "sk-client", "m"]);
                // The gateway never forwards the client's credential; it presents the
                // provider's, so the "wrong" client credential is not refused.
                assert!(
                    out.contains("wrong credential refused: false"),
                    "{api} {sse:?}: {out}"
                );
            }
            for r in openai.requests().iter().chain(anthropic.requests().iter()) {
                assert!(r.path.starts_with("/prov/v1/"), "{}", r.path);
                assert!(
                    !format!("{:?}", r.headers).contains("sk-client"),
                    "the client's credential went upstream"
                );
            }
            // openai: JSON, a stream asking for usage, one not asking (the gateway asks);
            // responses: JSON and a stream; anthropic: JSON, a stream, and the "wrong
            // credential" call, served.
            assert_eq!(usage(&gw), (8, 40, 24), "{sse:?}");
        }
    }
);

const MESSAGES: &str =
    r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

// Each provider's request id reaches the client as `x-upstream-request-id` (the client's
// `x-request-id` is the gateway's own); organisation and rate-limit headers do not reach
// it, Anthropic's (`anthropic-organization-id`, `request-id`) as well as OpenAI's.
both_drivers!(provider_headers_are_mapped_or_dropped, |driver| {
    let openai = MockProvider::start(MockOptions::default());
    let anthropic = MockProvider::start(MockOptions {
        default: Behavior::AnthropicJson,
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[("oa", "openai", &openai), ("an", "anthropic", &anthropic)],
        &[("m", &["oa", "an"])],
    );
    for (path, body, request_id, account) in [
        (
            "/v1/chat/completions",
            CHAT,
            "x-request-id",
            OPENAI_ACCOUNT_HEADERS,
        ),
        (
            "/v1/messages",
            MESSAGES,
            "request-id",
            ANTHROPIC_ACCOUNT_HEADERS,
        ),
    ] {
        let r = post_with_key(gw.addr(), "sk-client", path, body);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.header("x-upstream-request-id"),
            Some("req_mock"),
            "{path}"
        );
        assert_eq!(r.header("x-request-id").map(str::len), Some(32), "{path}");
        if request_id != "x-request-id" {
            assert_eq!(r.header(request_id), None, "{path}: relayed as it came");
        }
        for (h, _) in account {
            assert_eq!(r.header(h), None, "{path}: {h} reached the client");
        }
    }
});

// Anthropic's errors reach an Anthropic client in Anthropic's shape: a 4xx as the provider
// sent it, and an `event: error` in the middle of a stream as an event of the stream.
both_drivers!(anthropic_errors_reach_the_client_as_sent, |driver| {
    let anthropic = MockProvider::start(MockOptions {
        default: Behavior::AnthropicJson,
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[("an", "anthropic", &anthropic)],
        &[("m", &["an"])],
    );
    let error = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: must be at least 1"}}"#;
    anthropic.push_behavior(Behavior::Status {
        status: 400,
        body: error.into(),
        headers: vec![],
    });
    let r = post_with_key(gw.addr(), "sk-client", "/v1/messages", MESSAGES);
    assert_eq!(r.status, 400);
    assert_eq!(String::from_utf8_lossy(&r.body), error);

    anthropic.push_behavior(Behavior::AnthropicStreamError { events: 2 });
    let stream =
        r#"{"model":"m","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post_with_key(gw.addr(), "sk-client", "/v1/messages", stream);
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.contains("tok1 "), "{text}");
    let error_event = text
        .split("\n\n")
        .find(|e| e.starts_with("event: error"))
        .unwrap_or_else(|| panic!("no error event: {text}"));
    assert!(error_event.contains("overloaded_error"), "{error_event}");
});

// Anthropic's 529 (overloaded) means "try elsewhere": the next target serves the request,
// which the first provider did not act on.
both_drivers!(overloaded_fails_over_to_the_next_target, |driver| {
    let overloaded = MockProvider::start(MockOptions {
        default: Behavior::Status {
            status: 529,
            body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
                .into(),
            headers: vec![],
        },
        ..Default::default()
    });
    let healthy = MockProvider::start(MockOptions {
        default: Behavior::AnthropicJson,
        ..Default::default()
    });
    let gw = gateway(
        driver,
        &[
            ("first", "anthropic", &overloaded),
            ("second", "anthropic", &healthy),
        ],
        &[("m", &["first", "second"])],
    );
    let r = post_with_key(gw.addr(), "sk-client", "/v1/messages", MESSAGES);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["content"][0]["text"], "echo: hi");
    assert_eq!(overloaded.request_count(), 1);
    assert_eq!(healthy.request_count(), 1);
});

// An upstream that dies in the middle of a stream is not retried on the next target (the
// first may have generated, and billed, part of it), and the client can tell the stream
// was cut: the chunked body never ends.
both_drivers!(
    a_stream_cut_midway_is_not_retried_and_the_client_can_tell,
    |driver| {
        let dying = MockProvider::start(MockOptions {
            default: Behavior::ResetAfterEvents { events: 2 },
            ..Default::default()
        });
        let healthy = MockProvider::start(MockOptions {
            default: Behavior::OpenAiStream {
                events: 3,
                delay_ms: 0,
            },
            ..Default::default()
        });
        let gw = gateway(
            driver,
            &[("first", "openai", &dying), ("second", "openai", &healthy)],
            &[("m", &["first", "second"])],
        );
        let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut s = gw.connect();
        s.write_all(&post("/v1/chat/completions", "", body))
            .unwrap();
        let text = read_until(&mut s, "");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("tok1 "), "the events before the cut: {text}");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "the body ended as if complete: {text}"
        );
        assert_eq!(
            healthy.request_count(),
            0,
            "retried after bytes reached the client"
        );
    }
);
