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
    // Providers put `usage` last: find it from the end and parse only that member.
    if let Some(raw) = last_top_level_member(body, b"\"usage\"") {
        if let Ok(f) = serde_json::from_slice::<UsageFields>(raw) {
            return f.into_usage(kind);
        }
    }
    if memchr::memmem::find(body, b"\"usage\"").is_none() {
        return Usage::default();
    }
    // Not last, or not provably top-level: parse the document, materialising only `usage`
    // (the rest, the completion text, is skipped without allocating).
    #[derive(serde::Deserialize)]
    struct Envelope {
        usage: Option<UsageFields>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { usage: Some(u) }) => u.into_usage(kind),
        _ => Usage::default(),
    }
}

/// The token counts of either family's `usage` object (other members are skipped): the one
/// place that knows which names each family uses.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl UsageFields {
    pub(crate) fn into_usage(self, kind: ProviderKind) -> Usage {
        let (input, output) = match kind {
            // Chat and completions say prompt/completion; the Responses API says input/output.
            ProviderKind::Openai => (
                self.prompt_tokens.or(self.input_tokens),
                self.completion_tokens.or(self.output_tokens),
            ),
            ProviderKind::Anthropic => (self.input_tokens, self.output_tokens),
        };
        Usage {
            input_tokens: input.unwrap_or(0),
            output_tokens: output.unwrap_or(0),
            reported: input.is_some() || output.is_some(),
        }
    }
}

/// The raw value of the last member named `quoted_key` (with its quotes) when it belongs to
/// the top-level object, found by scanning from the end; `None` when that cannot be
/// confirmed cheaply (the caller then parses the whole document).
///
/// In JSON a quote inside a string is always escaped, so `"key"` followed by a colon only
/// ever occurs as an object key; whether that object is the top-level one is checked by
/// scanning the (short) rest of the document: it must close exactly one level.
fn last_top_level_member<'a>(body: &'a [u8], quoted_key: &[u8]) -> Option<&'a [u8]> {
    let at = memchr::memmem::rfind(body, quoted_key)?;
    let mut i = at + quoted_key.len();
    while body.get(i)?.is_ascii_whitespace() {
        i += 1;
    }
    if body[i] != b':' {
        return None;
    }
    let start = i + 1;
    // Find the end of the value, then check what follows closes the top-level object.
    let end = skip_value(body, start)?;
    let mut depth = 0usize;
    let mut j = end;
    while j < body.len() {
        match body[j] {
            b'"' => j = skip_string(body, j)?,
            b'{' | b'[' => {
                depth += 1;
                j += 1;
            }
            b'}' | b']' if depth == 0 => {
                // The enclosing object closes here: it is the top level only if nothing
                // but whitespace follows.
                return body[j + 1..]
                    .iter()
                    .all(u8::is_ascii_whitespace)
                    .then(|| &body[start..end]);
            }
            b'}' | b']' => {
                depth -= 1;
                j += 1;
            }
            _ => j += 1,
        }
    }
    None
}

/// Index just past the string starting at `i` (which is a quote).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'\\' {
            j = k + 2;
        } else {
            return Some(k + 1);
        }
    }
}

/// Index just past the JSON value starting at or after `i`.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    while b.get(i)?.is_ascii_whitespace() {
        i += 1;
    }
    match b[i] {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let len = b[i..]
                .iter()
                .position(|&c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())?;
            Some(i + len)
        }
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
    fn usage_is_found_from_the_end_only_at_the_top_level() {
        let top = br#"{"choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(
            last_top_level_member(top, b"\"usage\""),
            Some(&br#"{"prompt_tokens":3,"completion_tokens":4}"#[..])
        );
        let nested = br#"{"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":9}}}"#;
        assert_eq!(last_top_level_member(nested, b"\"usage\""), None);
        // The full parse still finds the top-level one.
        let u = usage_from_json(ProviderKind::Openai, nested);
        assert_eq!(u.input_tokens, 1);
        let trailing = b"{\"usage\" : {\"input_tokens\":5,\"output_tokens\":6} , \"id\":\"x}\"}\n";
        assert_eq!(
            usage_from_json(ProviderKind::Anthropic, trailing).output_tokens,
            6
        );
        let top_u = usage_from_json(ProviderKind::Openai, top);
        assert_eq!((top_u.input_tokens, top_u.output_tokens), (3, 4));
    }

    proptest::proptest! {
        #[test]
        fn scanning_from_the_end_agrees_with_a_full_parse(
            usage in proptest::option::of((0u64..1000, 0u64..1000)),
            content in "[ -~]{0,40}",
            nested in proptest::bool::ANY,
        ) {
            let mut v = serde_json::json!({"id": "x", "choices": [{"message": {"content": content}}]});
            if nested {
                v["choices"][0]["usage"] = serde_json::json!({"prompt_tokens": 77});
            }
            if let Some((i, o)) = usage {
                v["usage"] = serde_json::json!({"prompt_tokens": i, "completion_tokens": o});
            }
            let body = serde_json::to_vec(&v).expect("serialises");
            let fast = usage_from_json(ProviderKind::Openai, &body);
            let expected = usage.map_or(Usage::default(), |(i, o)| Usage { input_tokens: i, output_tokens: o, reported: true });
            proptest::prop_assert_eq!(fast, expected);
        }
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
