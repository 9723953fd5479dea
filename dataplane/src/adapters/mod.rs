//! Provider adapters: what differs between the API families the gateway speaks.
//!
//! Per family: which endpoints exist, where the client's key arrives, how the upstream
//! credential is sent, the error shape clients expect, the SSE grammar, and where usage
//! figures sit. The client's key never goes upstream: both families' key headers are
//! dropped from every forwarded request whatever the family.

pub mod anthropic;
pub mod openai;

use std::sync::LazyLock;

use aigw_wire::ProviderKind;
use memchr::memmem::Finder;

/// Searched for in every JSON answer, and in every event of a stream: finders built once.
static QUOTED_USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"usage"));

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

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::Models => "models",
        }
    }
}

/// Token counts reported by the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, those read from or written to a prompt cache included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of the input tokens, those read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Of the input tokens, those written to the provider's prompt cache (Anthropic).
    pub cache_write_tokens: u64,
    /// Of the output tokens, those spent reasoning.
    pub reasoning_tokens: u64,
    /// Whether the provider reported any figure at all.
    pub reported: bool,
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
    // Providers put `usage` last: find it from the end and read only that member.
    if let Some(raw) = last_top_level_usage(body) {
        if let Some(f) = UsageFields::read_plain(raw) {
            return f.into_usage(kind);
        }
        if let Ok(f) = serde_json::from_slice::<UsageFields>(raw) {
            return f.into_usage(kind);
        }
    }
    if QUOTED_USAGE.find(body).is_none() {
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
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub(crate) struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// Anthropic: input read from and written to the prompt cache, not in `input_tokens`.
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    /// OpenAI chat (`prompt_…`, `completion_…`) and Responses (`input_…`, `output_…`).
    prompt_tokens_details: Option<TokenDetails>,
    input_tokens_details: Option<TokenDetails>,
    completion_tokens_details: Option<TokenDetails>,
    output_tokens_details: Option<TokenDetails>,
}

/// The breakdowns OpenAI's APIs report beside a count.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
pub(crate) struct TokenDetails {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl UsageFields {
    /// Reads a `usage` object of the usual shape without serde: keys without escapes, each
    /// count at most once and a plain integer (or absent). Anything else is `None`, and the
    /// caller asks serde. Members other than the four counts are skipped, not validated.
    fn read_plain(b: &[u8]) -> Option<Self> {
        let ws = |mut i: usize| {
            while b.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            i
        };
        let mut f = Self::default();
        let mut seen = 0u8;
        let mut i = ws(0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i = ws(i + 1);
        if b.get(i) == Some(&b'}') {
            return (ws(i + 1) == b.len()).then_some(f);
        }
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let after_key = skip_string(b, i)?;
            let key = &b[i + 1..after_key - 1];
            if key.contains(&b'\\') {
                return None;
            }
            i = ws(after_key);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = ws(i + 1);
            let details = match key {
                b"prompt_tokens_details" => Some(&mut f.prompt_tokens_details),
                b"input_tokens_details" => Some(&mut f.input_tokens_details),
                b"completion_tokens_details" => Some(&mut f.completion_tokens_details),
                b"output_tokens_details" => Some(&mut f.output_tokens_details),
                _ => None,
            };
            if let Some(slot) = details {
                // A small object: serde reads it in place.
                let end = skip_value(b, i)?;
                // A second copy, or null (which a second copy could follow): serde decides.
                if slot.is_some() || b[i..].starts_with(b"null") {
                    return None;
                }
                *slot = serde_json::from_slice::<Option<TokenDetails>>(&b[i..end]).ok()?;
                i = ws(end);
                match b.get(i) {
                    Some(b',') => {
                        i = ws(i + 1);
                        continue;
                    }
                    Some(b'}') => return (ws(i + 1) == b.len()).then_some(f),
                    _ => return None,
                }
            }
            let (count, bit) = match key {
                b"prompt_tokens" => (Some(&mut f.prompt_tokens), 1),
                b"completion_tokens" => (Some(&mut f.completion_tokens), 2),
                b"input_tokens" => (Some(&mut f.input_tokens), 4),
                b"output_tokens" => (Some(&mut f.output_tokens), 8),
                b"cache_read_input_tokens" => (Some(&mut f.cache_read_input_tokens), 16),
                b"cache_creation_input_tokens" => (Some(&mut f.cache_creation_input_tokens), 32),
                _ => (None, 0),
            };
            // A second copy of a count (null or not): serde decides (it refuses duplicates).
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            match count {
                // A count given as null is absent.
                Some(_) if b[i..].starts_with(b"null") => i += 4,
                Some(slot) => {
                    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                    // Empty, a leading zero, 20+ digits (may not fit), or a fraction or
                    // exponent next: serde decides.
                    if digits == 0
                        || digits > 19
                        || (digits > 1 && b[i] == b'0')
                        || matches!(b.get(i + digits), Some(b'.' | b'e' | b'E'))
                    {
                        return None;
                    }
                    let n = b[i..i + digits]
                        .iter()
                        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                    *slot = Some(n);
                    i += digits;
                }
                None => i = skip_value(b, i)?,
            }
            i = ws(i);
            match b.get(i) {
                Some(b',') => i = ws(i + 1),
                Some(b'}') => return (ws(i + 1) == b.len()).then_some(f),
                _ => return None,
            }
        }
    }

    pub(crate) fn into_usage(self, kind: ProviderKind) -> Usage {
        match kind {
            // Chat and completions say prompt/completion; the Responses API says input/output.
            // Input counts include the cached part, output counts the reasoning.
            ProviderKind::Openai => {
                let input = self.prompt_tokens.or(self.input_tokens);
                let output = self.completion_tokens.or(self.output_tokens);
                let inputs = self.prompt_tokens_details.or(self.input_tokens_details);
                let outputs = self
                    .completion_tokens_details
                    .or(self.output_tokens_details);
                Usage {
                    input_tokens: input.unwrap_or(0),
                    output_tokens: output.unwrap_or(0),
                    cached_input_tokens: inputs.and_then(|d| d.cached_tokens).unwrap_or(0),
                    cache_write_tokens: 0,
                    reasoning_tokens: outputs.and_then(|d| d.reasoning_tokens).unwrap_or(0),
                    reported: input.is_some() || output.is_some(),
                }
            }
            // Anthropic's input count leaves out what the cache read and wrote.
            ProviderKind::Anthropic => {
                let read = self.cache_read_input_tokens.unwrap_or(0);
                let written = self.cache_creation_input_tokens.unwrap_or(0);
                Usage {
                    input_tokens: self.input_tokens.unwrap_or(0) + read + written,
                    output_tokens: self.output_tokens.unwrap_or(0),
                    cached_input_tokens: read,
                    cache_write_tokens: written,
                    reasoning_tokens: 0,
                    reported: self.input_tokens.is_some() || self.output_tokens.is_some(),
                }
            }
        }
    }
}

/// The raw value of the last member named `usage` when it belongs to the top-level object, found by scanning from the end; `None` when that cannot be
/// confirmed cheaply (the caller then parses the whole document).
///
/// In JSON a quote inside a string is always escaped, so `"usage"` followed by a colon only
/// ever occurs as an object key; whether that object is the top-level one is checked by
/// scanning the (short) rest of the document: it must close exactly one level.
fn last_top_level_usage(body: &[u8]) -> Option<&[u8]> {
    last_top_level_usage_member(body).map(|m| &body[m.value])
}

/// Where a top-level member sits in a JSON object's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The member's text with one of the commas around it (the one before it, or the one
    /// after it when it is first): removing this range leaves a valid object.
    pub removable: std::ops::Range<usize>,
    pub value: std::ops::Range<usize>,
}

/// The last member named `usage` when it belongs to the top-level object (see
/// [`last_top_level_usage`]).
pub(crate) fn last_top_level_usage_member(body: &[u8]) -> Option<Member> {
    const KEY: &[u8] = b"\"usage\"";
    // Built once, not per response.
    static FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(KEY));
    let at = FINDER.rfind(body)?;
    let mut i = at + KEY.len();
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
                if !body[j + 1..].iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let value_start = start
                    + body[start..end]
                        .iter()
                        .take_while(|b| b.is_ascii_whitespace())
                        .count();
                let before = body[..at].iter().rposition(|b| !b.is_ascii_whitespace())?;
                let removable = match body[before] {
                    b',' => before..end,
                    // The first member: take the comma after it, if another member follows.
                    b'{' => {
                        let next =
                            end + body[end..].iter().position(|b| !b.is_ascii_whitespace())?;
                        if body[next] == b',' {
                            at..next + 1
                        } else {
                            at..end
                        }
                    }
                    _ => return None,
                };
                return Some(Member {
                    removable,
                    value: value_start..end,
                });
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

/// Index just past the string starting at `i` (which is a quote); `None` if it is not a
/// valid JSON string.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    crate::body::scan::string(b, i).map(|(end, _)| end)
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
    if USAGE.find(data).is_none() {
        return;
    }
    match kind {
        ProviderKind::Openai => openai::usage_from_event(data, usage),
        ProviderKind::Anthropic => anthropic::usage_from_event(event, data, usage),
    }
}

/// The SSE event that ends a stream the gateway had to cut short, in the family's grammar.
pub fn stream_error_event(kind: ProviderKind, error: &crate::errors::ApiError) -> Vec<u8> {
    match kind {
        ProviderKind::Openai => openai::stream_error_event(error),
        ProviderKind::Anthropic => anthropic::stream_error_event(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

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
    fn usage_is_found_from_the_end_only_at_the_top_level() {
        let top = br#"{"choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(
            last_top_level_usage(top),
            Some(&br#"{"prompt_tokens":3,"completion_tokens":4}"#[..])
        );
        let nested = br#"{"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":9}}}"#;
        assert_eq!(last_top_level_usage(nested), None);
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
            let expected = usage.map_or(Usage::default(), |(i, o)| Usage { input_tokens: i, output_tokens: o, reported: true, ..Usage::default() });
            proptest::prop_assert_eq!(fast, expected);
        }
    }

    proptest::proptest! {
        #[test]
        fn reading_usage_without_serde_agrees_with_serde(
            members in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                        "total_tokens", "prompt_tokens_details", "cache_creation_input_tokens",
                    ]),
                    proptest::prop_oneof![
                        (0u64..u64::MAX).prop_map(|n| n.to_string()),
                        proptest::strategy::Just("null".to_string()),
                        proptest::strategy::Just("1.5".to_string()),
                        proptest::strategy::Just("1e3".to_string()),
                        proptest::strategy::Just("-4".to_string()),
                        proptest::strategy::Just(r#"{"cached_tokens":3,"audio":[1,{"x":"}"}]}"#.to_string()),
                        proptest::strategy::Just(r#""a \" quote""#.to_string()),
                    ],
                ),
                0..6,
            ),
            spaced in proptest::bool::ANY,
        ) {
            let sep = if spaced { " , " } else { "," };
            let colon = if spaced { " : " } else { ":" };
            let inner: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("\"{k}\"{colon}{v}"))
                .collect();
            let raw = format!("{{{}}}", inner.join(sep));
            let by_serde = serde_json::from_slice::<UsageFields>(raw.as_bytes()).ok();
            if let Some(plain) = UsageFields::read_plain(raw.as_bytes()) {
                let serde = by_serde.as_ref();
                proptest::prop_assert!(serde.is_some(), "{raw}: read without serde, refused by it");
                for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
                    proptest::prop_assert_eq!(
                        plain.clone().into_usage(kind),
                        serde.cloned().map(|u| u.into_usage(kind)).unwrap_or_default(),
                        "{}", raw
                    );
                }
            }
            // Through the whole path, the answer is serde's.
            let body = format!("{{\"id\":\"x\",\"usage\":{raw}}}");
            let expected = by_serde.map(|f| f.into_usage(ProviderKind::Openai)).unwrap_or_default();
            proptest::prop_assert_eq!(usage_from_json(ProviderKind::Openai, body.as_bytes()), expected);
        }
    }

    #[test]
    fn usual_usage_objects_are_read_without_serde() {
        let f = UsageFields::read_plain(
            br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}}"#,
        )
        .expect("the usual OpenAI shape");
        assert_eq!((f.prompt_tokens, f.completion_tokens), (Some(19), Some(10)));
        let f = UsageFields::read_plain(
            br#"{ "input_tokens": 25, "cache_creation_input_tokens": null, "output_tokens": 7 }"#,
        )
        .expect("the usual Anthropic shape");
        assert_eq!((f.input_tokens, f.output_tokens), (Some(25), Some(7)));
        for unusual in [
            &br#"{"prompt_tokens":1,"prompt_tokens":2}"#[..],
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt\u005ftokens":1}"#,
            br#"{"prompt_tokens":012}"#,
            br#"{"prompt_tokens":1} x"#,
        ] {
            assert!(
                UsageFields::read_plain(unusual).is_none(),
                "{}",
                String::from_utf8_lossy(unusual)
            );
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

    /// Cached, cache-written and reasoning tokens, as each API reports them, whether the
    /// usage object is read without serde or with it (members in another order, escapes).
    #[test]
    fn token_breakdowns_of_each_api() {
        let chat = br#"{"id":"x","usage":{"prompt_tokens":100,"completion_tokens":40,"total_tokens":140,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":30}}}"#;
        let responses = br#"{"usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":64},"output_tokens":40,"output_tokens_details":{"reasoning_tokens":30},"total_tokens":140}}"#;
        for body in [&chat[..], &responses[..]] {
            let u = usage_from_json(ProviderKind::Openai, body);
            assert_eq!(
                (
                    u.input_tokens,
                    u.output_tokens,
                    u.cached_input_tokens,
                    u.reasoning_tokens
                ),
                (100, 40, 64, 30),
                "{}",
                String::from_utf8_lossy(body)
            );
            // The same through serde (an escaped key sends it there).
            let escaped =
                String::from_utf8_lossy(body).replace("\"total_tokens\"", "\"tot\\u0061l\"");
            let u = usage_from_json(ProviderKind::Openai, escaped.as_bytes());
            assert_eq!(
                (u.cached_input_tokens, u.reasoning_tokens),
                (64, 30),
                "{escaped}"
            );
        }
        // Anthropic: input excludes what the cache read and wrote; the total includes both.
        let mut u = Usage::default();
        usage_from_event(
            ProviderKind::Anthropic,
            b"message_start",
            br#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":200,"cache_creation_input_tokens":50,"output_tokens":1}}}"#,
            &mut u,
        );
        usage_from_event(
            ProviderKind::Anthropic,
            b"message_delta",
            br#"{"type":"message_delta","usage":{"output_tokens":77}}"#,
            &mut u,
        );
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_tokens,
                u.output_tokens
            ),
            (260, 200, 50, 77)
        );
    }
}
