//! Provider adapters: what differs between the API families the gateway speaks.
//!
//! Per family: which endpoints exist, where the client's key arrives, how the upstream
//! credential is sent, the error shape clients expect, the SSE grammar, and where usage
//! figures sit. The client's key never goes upstream: both families' key headers are
//! dropped from every forwarded request whatever the family.

pub mod anthropic;
pub mod openai;

use crate::config::ProviderKind;
use crate::errors::ApiStyle;

/// The endpoints the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Messages,
    Models,
}

impl Endpoint {
    /// The endpoint for a path (query ignored), or `None`.
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Responses,
            "/v1/messages" => Self::Messages,
            "/v1/models" => Self::Models,
            _ => return None,
        })
    }

    pub fn family(self) -> ProviderKind {
        match self {
            Self::Messages => ProviderKind::Anthropic,
            _ => ProviderKind::Openai,
        }
    }

    pub fn method(self) -> &'static str {
        match self {
            Self::Models => "GET",
            _ => "POST",
        }
    }
}

impl ProviderKind {
    pub fn style(self) -> ApiStyle {
        match self {
            Self::Openai => ApiStyle::OpenAi,
            Self::Anthropic => ApiStyle::Anthropic,
        }
    }
}

/// Token counts reported by the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Whether the provider reported any figure at all.
    pub reported: bool,
}

/// Request headers that carry a client's key in either family, or that only make sense for
/// the hop from the client. Never forwarded.
pub fn is_client_credential(name: &[u8]) -> bool {
    [
        &b"authorization"[..],
        b"x-api-key",
        b"api-key",
        b"proxy-authorization",
        b"cookie",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

/// Appends the upstream credential header lines for `kind`.
pub fn write_credential(kind: ProviderKind, credential: &str, out: &mut Vec<u8>) {
    match kind {
        ProviderKind::Openai => openai::write_credential(credential, out),
        ProviderKind::Anthropic => anthropic::write_credential(credential, out),
    }
}

/// Usage from a complete JSON response body.
pub fn usage_from_json(kind: ProviderKind, body: &[u8]) -> Usage {
    if memchr::memmem::find(body, b"usage").is_none() {
        return Usage::default();
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Usage::default();
    };
    match kind {
        ProviderKind::Openai => openai::usage_from_value(&v["usage"]),
        ProviderKind::Anthropic => anthropic::usage_from_value(&v["usage"]),
    }
}

/// Folds one SSE event's usage figures into `usage`.
pub fn usage_from_event(kind: ProviderKind, event: &[u8], data: &[u8], usage: &mut Usage) {
    if memchr::memmem::find(data, b"usage").is_none() {
        return;
    }
    match kind {
        ProviderKind::Openai => openai::usage_from_event(data, usage),
        ProviderKind::Anthropic => anthropic::usage_from_event(event, data, usage),
    }
}

/// Whether this event is the family's end-of-stream marker.
pub fn is_stream_end(kind: ProviderKind, event: &[u8], data: &[u8]) -> bool {
    match kind {
        ProviderKind::Openai => data == b"[DONE]",
        ProviderKind::Anthropic => event == b"message_stop",
    }
}

/// The SSE event that ends a stream the gateway had to cut short, in the family's grammar.
pub fn stream_error_event(kind: ProviderKind, code: &str, message: &str) -> Vec<u8> {
    match kind {
        ProviderKind::Openai => openai::stream_error_event(code, message),
        ProviderKind::Anthropic => anthropic::stream_error_event(code, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::from_path("/v1/messages").map(Endpoint::family),
            Some(ProviderKind::Anthropic)
        );
        assert_eq!(
            Endpoint::from_path("/v1/embeddings").map(Endpoint::family),
            Some(ProviderKind::Openai)
        );
        assert_eq!(Endpoint::from_path("/v1/other"), None);
    }

    #[test]
    fn client_credentials_are_recognised_in_any_case() {
        for h in ["Authorization", "X-API-KEY", "api-key", "Cookie"] {
            assert!(is_client_credential(h.as_bytes()), "{h}");
        }
        assert!(!is_client_credential(b"anthropic-version"));
    }

    #[test]
    fn usage_both_shapes() {
        let u = usage_from_json(
            ProviderKind::Openai,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert_eq!((u.input_tokens, u.output_tokens, u.reported), (3, 4, true));
        let u = usage_from_json(
            ProviderKind::Anthropic,
            br#"{"usage":{"input_tokens":5,"output_tokens":6}}"#,
        );
        assert_eq!((u.input_tokens, u.output_tokens), (5, 6));
        let mut u = Usage::default();
        usage_from_event(
            ProviderKind::Anthropic,
            b"message_start",
            br#"{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}"#,
            &mut u,
        );
        usage_from_event(
            ProviderKind::Anthropic,
            b"message_delta",
            br#"{"type":"message_delta","usage":{"output_tokens":12}}"#,
            &mut u,
        );
        assert_eq!((u.input_tokens, u.output_tokens), (9, 12));
        let mut u = Usage::default();
        usage_from_event(
            ProviderKind::Openai,
            b"",
            br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":8}}"#,
            &mut u,
        );
        assert_eq!((u.input_tokens, u.output_tokens), (2, 8));
    }
}
