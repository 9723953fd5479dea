//! Anthropic-style API: `x-api-key`, `anthropic-version`, `{"type":"error","error":{...}}`,
//! named SSE events ending with `message_stop`, input tokens in `message_start` and output
//! tokens in `message_delta`.

use serde_json::{json, Value};

use super::Usage;

/// Sent when the client did not say which API version it speaks.
pub const DEFAULT_VERSION: &str = "2023-06-01";

pub fn write_credential(credential: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"x-api-key: ");
    out.extend_from_slice(credential.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn usage_from_value(u: &Value) -> Usage {
    let input = u["input_tokens"].as_u64();
    let output = u["output_tokens"].as_u64();
    Usage {
        input_tokens: input.unwrap_or(0),
        output_tokens: output.unwrap_or(0),
        reported: input.is_some() || output.is_some(),
    }
}

pub fn usage_from_event(event: &[u8], data: &[u8], usage: &mut Usage) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match event {
        b"message_start" => {
            let u = usage_from_value(&v["message"]["usage"]);
            if u.reported {
                *usage = u;
            }
        }
        b"message_delta" => {
            if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                usage.output_tokens = out;
                usage.reported = true;
            }
            if let Some(inp) = v["usage"]["input_tokens"].as_u64() {
                usage.input_tokens = inp;
            }
        }
        _ => {}
    }
}

pub fn stream_error_event(code: &str, message: &str) -> Vec<u8> {
    let v =
        json!({"type": "error", "error": {"type": "api_error", "message": message, "code": code}});
    format!("event: error\ndata: {v}\n\n").into_bytes()
}
