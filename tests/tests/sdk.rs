//! The official OpenAI and Anthropic Python SDKs, unmodified, talking to the gateway.
//!
//! `.ci/setup` installs them into `target/sdk-venv`; `AIGW_SDK_PYTHON` points elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane::config::DriverChoice;
use e2e::mock::{Behavior, MockOptions, MockProvider};
use e2e::*;

fn run_script(script: &str, base: &str) {
    run_sdk_script(script, &[base]);
}

fn sdk_gateway(
    driver: DriverChoice,
    ok: &MockProvider,
    broken: &MockProvider,
    kind: &str,
    prefix: &str,
) -> Gateway {
    // Port 1 on loopback: nothing listens there, and no parallel test can take it.
    let dead = e2e::DEAD_UPSTREAM.to_string();
    let mut toml = upstream_toml("ok", kind, &ok.base_url(), "");
    toml.push_str(&upstream_toml("broken", kind, &broken.base_url(), ""));
    toml.push_str(&upstream_toml("dead", kind, &dead, ""));
    for target in ["ok", "broken", "dead"] {
        toml.push_str(&format!(
            "[[routes]]\nmodel = \"{prefix}-{target}\"\ntargets = [{{ upstream = \"{target}\" }}]\n"
        ));
    }
    Gateway::with_toml(driver, &toml, |_| {})
}

both_drivers!(openai_python_sdk, |driver| {
    let ok = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::OpenAiStream {
            events: 3,
            delay_ms: 1,
        },
        ..Default::default()
    });
    let broken = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::ResetAfterEvents { events: 1 },
        ..Default::default()
    });
    let gw = sdk_gateway(driver, &ok, &broken, "openai", "gpt");
    run_script("openai_sdk.py", &format!("http://{}", gw.addr()));
    for r in ok.requests() {
        assert!(
            !format!("{:?}", r.headers).contains("sk-client"),
            "client key forwarded"
        );
    }
});

both_drivers!(anthropic_python_sdk, |driver| {
    let ok = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::AnthropicStream {
            events: 3,
            delay_ms: 1,
        },
        ..Default::default()
    });
    let broken = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::ResetAfterEvents { events: 1 },
        ..Default::default()
    });
    let gw = sdk_gateway(driver, &ok, &broken, "anthropic", "claude");
    run_script("anthropic_sdk.py", &format!("http://{}", gw.addr()));
    for r in ok.requests() {
        assert!(
            !format!("{:?}", r.headers).contains("sk-ant-client"),
            "client key forwarded"
        );
    }
});

/// The gateway asks an upstream that takes `stream_options` for every stream's usage; a
/// client that did not ask for it receives no usage field and no usage chunk, while the
/// access log has the stream's token counts. A client that asked gets them as before.
#[test]
fn openai_sdk_streams_get_usage_only_when_they_ask_and_the_log_always_has_it() {
    let mock = MockProvider::start(MockOptions {
        tls: false,
        default: Behavior::OpenAiStream {
            events: 3,
            delay_ms: 1,
        },
        ..Default::default()
    });
    let dir = scratch_dir("sdk-stream-usage");
    let toml = upstream_toml("oa", "openai", &mock.base_url(), "stream_options = true")
        + "[[routes]]\nmodel = \"gpt-usage\"\ntargets = [{ upstream = \"oa\" }]\n";
    let gw = GatewayProcess::start(&process_toml(1, &toml), &dir);
    run_script("openai_stream_usage.py", &format!("http://{}", gw.addr));
    let sent: Vec<serde_json::Value> = mock
        .requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(sent.len(), 2);
    for body in &sent {
        assert_eq!(
            body["stream_options"]["include_usage"], true,
            "the gateway asked for usage: {body}"
        );
    }
    let logged = || {
        gw.log()
            .lines()
            .filter(|l| {
                l.contains("access")
                    && l.contains("/v1/chat/completions")
                    && l.contains("input_tokens=5")
                    && l.contains("output_tokens=3")
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || logged() == 2),
        "both streams' token counts in the access log:\n{}",
        gw.log()
    );
}
