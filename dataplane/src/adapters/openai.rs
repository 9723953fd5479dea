//! OpenAI-style APIs: `Authorization: Bearer`, `{"error":{...}}`, `data:`-only SSE ending
//! in `data: [DONE]`, usage as `prompt_tokens` / `completion_tokens` (in the last stream
//! chunk when `stream_options.include_usage` is set).

use super::{Usage, UsageFields};
use aigw_wire::ProviderKind;

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

/// The event that ends a stream the gateway had to cut short: the error body as data.
pub fn stream_error_event(error: &crate::errors::ApiError) -> Vec<u8> {
    let v = error.body_value(crate::errors::Family::Openai);
    format!("data: {v}\n\n").into_bytes()
}

/// The `stream_options` to send so that a stream ends with its usage, given the client's
/// (raw JSON, if any); `None` when the client already asked for usage, or sent something
/// that is not an object (the provider answers that as it would without the gateway).
pub fn stream_options_with_usage(client: Option<&str>) -> Option<String> {
    let mut options = match client.map(str::trim) {
        None | Some("null") => serde_json::Map::new(),
        Some(raw) => match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return None,
        },
    };
    if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    Some(serde_json::Value::Object(options).to_string())
}

/// What a chat or completions stream chunk carries as its top-level `usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkUsage {
    /// No `usage` member (or one that cannot be located cheaply).
    Absent,
    /// `"usage": null`, which every chunk carries once usage was asked for; `removable` is
    /// the member's text with a comma, to cut out.
    Null { removable: std::ops::Range<usize> },
    /// The figures; `only_usage`: the chunk has no choices (`"choices": []`), so it exists
    /// only to carry them.
    Figures {
        removable: std::ops::Range<usize>,
        only_usage: bool,
    },
}

/// Classifies a chunk's `usage` member (`data` is the event's JSON text).
pub fn chunk_usage(data: &[u8]) -> ChunkUsage {
    let Some(m) = super::last_top_level_usage_member(data) else {
        return ChunkUsage::Absent;
    };
    if &data[m.value.clone()] == b"null" {
        return ChunkUsage::Null {
            removable: m.removable,
        };
    }
    #[derive(serde::Deserialize)]
    struct Choices {
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    // Once per stream: the full parse is cheap enough.
    let only_usage = serde_json::from_slice::<Choices>(data)
        .ok()
        .and_then(|c| c.choices)
        .is_some_and(|c| c.is_empty());
    ChunkUsage::Figures {
        removable: m.removable,
        only_usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_options_gain_include_usage() {
        assert_eq!(
            stream_options_with_usage(None).as_deref(),
            Some(r#"{"include_usage":true}"#)
        );
        assert_eq!(
            stream_options_with_usage(Some("null")).as_deref(),
            Some(r#"{"include_usage":true}"#)
        );
        assert_eq!(
            stream_options_with_usage(Some(r#"{"include_usage":false}"#)).as_deref(),
            Some(r#"{"include_usage":true}"#)
        );
        assert_eq!(
            stream_options_with_usage(Some(r#"{"include_usage": true}"#)),
            None
        );
        assert_eq!(stream_options_with_usage(Some("[1]")), None);
    }

    fn cut(data: &str, r: std::ops::Range<usize>) -> String {
        format!("{}{}", &data[..r.start], &data[r.end..])
    }

    #[test]
    fn usage_members_are_found_and_cut_leaving_valid_json() {
        let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"\"usage\":null"}}],"usage":null}"#;
        let ChunkUsage::Null { removable } = chunk_usage(chunk.as_bytes()) else {
            panic!("null usage not found");
        };
        assert_eq!(
            cut(chunk, removable),
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"\"usage\":null"}}]}"#
        );
        let spaced = "{ \"usage\" : null , \"id\": \"c\" }";
        let ChunkUsage::Null { removable } = chunk_usage(spaced.as_bytes()) else {
            panic!("first member");
        };
        let left: serde_json::Value = serde_json::from_str(&cut(spaced, removable)).expect("valid");
        assert_eq!(left, serde_json::json!({"id": "c"}));
        let last = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert!(matches!(
            chunk_usage(last.as_bytes()),
            ChunkUsage::Figures {
                only_usage: true,
                ..
            }
        ));
        let with_choice = r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":3}}"#;
        let ChunkUsage::Figures {
            removable,
            only_usage: false,
        } = chunk_usage(with_choice.as_bytes())
        else {
            panic!("figures beside a choice");
        };
        assert_eq!(cut(with_choice, removable), r#"{"choices":[{"index":0}]}"#);
        assert_eq!(chunk_usage(br#"{"choices":[]}"#), ChunkUsage::Absent);
        assert_eq!(
            chunk_usage(br#"{"x":{"usage":null}}"#),
            ChunkUsage::Absent,
            "nested"
        );
    }
}
