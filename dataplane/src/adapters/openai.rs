//! OpenAI-style APIs: `Authorization: Bearer`, `{"error":{...}}`, `data:`-only SSE ending
//! in `data: [DONE]`, usage as `prompt_tokens` / `completion_tokens` (in the last stream
//! chunk when `stream_options.include_usage` is set).

use serde_json::{json, Value};

use super::Usage;

pub fn write_credential(credential: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"authorization: Bearer ");
    out.extend_from_slice(credential.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn usage_from_value(u: &Value) -> Usage {
    // Chat and completions say prompt/completion; the Responses API says input/output.
    let input = u["prompt_tokens"]
        .as_u64()
        .or_else(|| u["input_tokens"].as_u64());
    let output = u["completion_tokens"]
        .as_u64()
        .or_else(|| u["output_tokens"].as_u64());
    Usage {
        input_tokens: input.unwrap_or(0),
        output_tokens: output.unwrap_or(0),
        reported: input.is_some() || output.is_some(),
    }
}

pub fn usage_from_event(data: &[u8], usage: &mut Usage) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        // Chat chunks carry `usage`; Responses API events carry `response.usage`.
        let u = if v["usage"].is_object() {
            &v["usage"]
        } else {
            &v["response"]["usage"]
        };
        let got = usage_from_value(u);
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
