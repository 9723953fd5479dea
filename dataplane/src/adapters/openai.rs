//! OpenAI-style APIs: `Authorization: Bearer`, `{"error":{...}}`, `data:`-only SSE ending
//! in `data: [DONE]`, usage as `prompt_tokens` / `completion_tokens` (in the last stream
//! chunk when `stream_options.include_usage` is set).

use serde_json::json;

use super::{Usage, UsageFields};
use crate::config::ProviderKind;

pub fn write_credential(credential: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"authorization: Bearer ");
    out.extend_from_slice(credential.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn usage_from_event(data: &[u8], usage: &mut Usage) {
    // Chat chunks carry `usage` (null until the last one); Responses API events carry
    // `response.usage`.
    #[derive(serde::Deserialize)]
    struct Response {
        usage: Option<UsageFields>,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        usage: Option<UsageFields>,
        response: Option<Response>,
    }
    let Ok(e) = serde_json::from_slice::<Event>(data) else {
        return;
    };
    if let Some(u) = e.usage.or(e.response.and_then(|r| r.usage)) {
        let got = u.into_usage(ProviderKind::Openai);
        if got.reported {
            *usage = got;
        }
    }
}

pub fn stream_error_event(code: &str, message: &str) -> Vec<u8> {
    let v =
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
    format!("data: {v}\n\n").into_bytes()
}
