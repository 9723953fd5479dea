//! Anthropic-style API: `x-api-key`, `anthropic-version`, `{"type":"error","error":{...}}`,
//! named SSE events ending with `message_stop`, input tokens in `message_start` and output
//! tokens in `message_delta`.

use super::{Usage, UsageFields};
use aigw_wire::ProviderKind;

/// Sent when the client did not say which API version it speaks.
pub const DEFAULT_VERSION: &str = "2023-06-01";

pub fn write_credential(credential: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"x-api-key: ");
    out.extend_from_slice(credential.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn usage_from_event(event: &[u8], data: &[u8], usage: &mut Usage) {
    #[derive(serde::Deserialize)]
    struct Message {
        usage: Option<UsageFields>,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        message: Option<Message>,
        usage: Option<UsageFields>,
    }
    let Ok(e) = serde_json::from_slice::<Event>(data) else {
        return;
    };
    match event {
        // The input count (and a first output count) arrive with the message.
        b"message_start" => {
            if let Some(u) = e.message.and_then(|m| m.usage) {
                let got = u.into_usage(ProviderKind::Anthropic);
                if got.reported {
                    *usage = got;
                }
            }
        }
        // Deltas update the counts they carry, typically only the output.
        b"message_delta" => {
            if let Some(u) = e.usage {
                // Cumulative: a count given replaces the one held.
                let had_input = u.input_tokens.is_some()
                    || u.cache_read_input_tokens.is_some()
                    || u.cache_creation_input_tokens.is_some();
                let output = u.output_tokens;
                let got = u.into_usage(ProviderKind::Anthropic);
                if let Some(out) = output {
                    usage.output_tokens = out;
                    usage.reported = true;
                }
                if had_input {
                    usage.input_tokens = got.input_tokens;
                    usage.cached_input_tokens = got.cached_input_tokens;
                    usage.cache_write_tokens = got.cache_write_tokens;
                }
            }
        }
        _ => {}
    }
}

/// The event that ends a stream the gateway had to cut short, as Anthropic's own
/// mid-stream errors arrive.
pub fn stream_error_event(error: &crate::errors::ApiError) -> Vec<u8> {
    let v = error.body_value(crate::errors::Family::Anthropic);
    format!("event: error\ndata: {v}\n\n").into_bytes()
}
