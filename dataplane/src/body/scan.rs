//! A validating scan of a request body's top-level object, for the usual shape: keys without
//! escapes, each once, nesting at most [`MAX_DEPTH`] deep.
//!
//! It checks the whole document against the JSON grammar (RFC 8259) and returns each
//! top-level member as its key and its value's raw text. Anything it does not accept (any
//! syntax error, an escaped or repeated top-level key, deeper nesting) is `None`, and the
//! caller asks serde_json, which accepts or refuses it and names the error. So this scan
//! must never accept what serde_json refuses; a property test holds it to that.
//!
//! Strings, nearly all of a chat request, are scanned 16 bytes at a time for the three bytes
//! that end a run of plain text: a quote, a backslash, or a control character.

use std::borrow::Cow;

/// Deeper nesting goes to serde_json (whose own limit is 128).
pub(super) const MAX_DEPTH: usize = 64;

/// The members of the top-level object, in order, or `None` when serde_json must decide.
/// `text` must be valid UTF-8 (checked by the caller), so every slice returned is too. The
/// members come borrowed, in the form [`super::JsonBody`] keeps them.
pub(super) fn top_level(text: &str) -> Option<Vec<(Cow<'_, str>, Cow<'_, str>)>> {
    let b = text.as_bytes();
    let mut fields: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(8);
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (ws(b, i + 1) == b.len()).then_some(fields);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (end, escaped) = string(b, i)?;
        if escaped {
            return None;
        }
        let key = text.get(i + 1..end - 1)?;
        if fields.iter().any(|(k, _)| k == key) {
            return None;
        }
        i = ws(b, end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = ws(b, i + 1);
        let end = value(b, start)?;
        fields.push((Cow::Borrowed(key), Cow::Borrowed(text.get(start..end)?)));
        i = ws(b, end);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    (ws(b, i + 1) == b.len()).then_some(fields)
}

/// Index of the first byte at or after `i` that is not JSON whitespace.
#[inline]
fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Index just past the value starting at `i`, which must be a whole, valid value.
fn value(b: &[u8], mut i: usize) -> Option<usize> {
    // One bit per open container: 1 for an object, 0 for an array.
    let mut stack: u64 = 0;
    let mut depth = 0usize;
    loop {
        // A value starts at `i`.
        match *b.get(i)? {
            b'"' => i = string(b, i)?.0,
            open @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return None;
                }
                let object = open == b'{';
                stack = (stack << 1) | u64::from(object);
                depth += 1;
                i = ws(b, i + 1);
                let close = if object { b'}' } else { b']' };
                if b.get(i) == Some(&close) {
                    stack >>= 1;
                    depth -= 1;
                    i += 1;
                } else {
                    if object {
                        i = member_key(b, i)?;
                    }
                    continue;
                }
            }
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = number(b, i)?,
            _ => return None,
        }
        // After a value: close containers until one takes another element.
        loop {
            if depth == 0 {
                return Some(i);
            }
            i = ws(b, i);
            let object = stack & 1 == 1;
            match *b.get(i)? {
                b',' => {
                    i = ws(b, i + 1);
                    if object {
                        i = member_key(b, i)?;
                    }
                    break;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            stack >>= 1;
            depth -= 1;
            i += 1;
        }
    }
}

/// At a member's key: index of its value (after the key, the colon and whitespace).
#[inline]
fn member_key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = ws(b, string(b, i)?.0);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some(ws(b, i + 1))
}

#[inline]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let from = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > from).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(i)?;
    }
    Some(i)
}

/// The string starting at `i` (a quote): index just past its closing quote, and whether it
/// has escapes. Control characters and malformed escapes are refused.
pub(crate) fn string(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        j = plain_run(b, j);
        match *b.get(j)? {
            b'"' => return Some((j + 1, escaped)),
            b'\\' => {
                escaped = true;
                j = match *b.get(j + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j + 2,
                    b'u' if b.get(j + 2..j + 6)?.iter().all(u8::is_ascii_hexdigit) => j + 6,
                    _ => return None,
                };
            }
            // A control character (U+0000 to U+001F) must be escaped.
            _ => return None,
        }
    }
}

/// Index of the first quote, backslash or control character at or after `j` (or the end).
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(unsafe_code)]
fn plain_run(b: &[u8], mut j: usize) -> usize {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of the x86_64 baseline. Each load reads the 16 bytes at
    // `j..j + 16`, inside `b` by the loop's condition, and has no alignment requirement.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let limit = _mm_set1_epi8(0x1f);
        while j + 16 <= b.len() {
            let v = _mm_loadu_si128(b.as_ptr().add(j).cast());
            // Unsigned v <= 0x1f exactly when max(v, 0x1f) == 0x1f.
            let control = _mm_cmpeq_epi8(_mm_max_epu8(v, limit), limit);
            let stop = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                control,
            );
            let mask = _mm_movemask_epi8(stop) as u32;
            if mask != 0 {
                return j + mask.trailing_zeros() as usize;
            }
            j += 16;
        }
    }
    plain_tail(b, j)
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn plain_run(b: &[u8], j: usize) -> usize {
    plain_tail(b, j)
}

/// The byte-at-a-time form of [`plain_run`].
#[inline]
fn plain_tail(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && !matches!(b[j], b'"' | b'\\' | 0..=0x1f) {
        j += 1;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// serde_json's verdict on a body, as members with raw value text.
    fn serde_members(text: &str) -> Option<Vec<(String, String)>> {
        let b = super::super::JsonBody::parse_with_serde(text).ok()?;
        Some(
            b.fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn scan_members(text: &str) -> Option<Vec<(String, String)>> {
        top_level(text).map(|m| {
            m.into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[ -~\u{80}-\u{10ffff}\\\\\"\n\t\u{1}]{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::vec(("[a-z\"\\\\é]{0,6}", inner), 0..6)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(("[a-z_]{1,8}", json_value()), 0..6),
            any::<bool>(),
        )
            .prop_map(|(kv, pretty)| {
                let v = serde_json::Value::Object(kv.into_iter().collect());
                if pretty {
                    serde_json::to_string_pretty(&v).expect("serialises")
                } else {
                    serde_json::to_string(&v).expect("serialises")
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any object serde_json writes (plain keys) is accepted, with the same members.
        #[test]
        fn accepts_what_serde_writes(text in json_object()) {
            let scanned = scan_members(&text);
            prop_assert!(scanned.is_some(), "refused {text}");
            prop_assert_eq!(scanned, serde_members(&text));
        }

        /// On a damaged body the scan either leaves it to serde_json or agrees with it:
        /// it never accepts what serde_json refuses, nor reads other members.
        #[test]
        fn never_accepts_what_serde_refuses(
            text in json_object(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..3, prop::sample::select(
                vec!['"', '\\', '{', '}', '[', ']', ',', ':', ' ', '0', '1', '-', '.', 'e', 'E', '+', 'u', 't', 'n', 'a', '\u{1}', '\u{1f}', '\n'])), 1..4),
        ) {
            let mut chars: Vec<char> = text.chars().collect();
            for (at, op, c) in edits {
                if chars.is_empty() { break; }
                let i = at.index(chars.len());
                match op {
                    0 => { chars.remove(i); }
                    1 => chars.insert(i, c),
                    _ => chars[i] = c,
                }
            }
            let damaged: String = chars.into_iter().collect();
            if let Some(scanned) = scan_members(&damaged) {
                prop_assert_eq!(Some(scanned), serde_members(&damaged), "{}", damaged);
            }
        }
    }

    #[test]
    fn edge_cases() {
        let accepted = [
            r#"{}"#,
            " \t\r\n{ } \n",
            r#"{"a":-0,"b":0.5e-3,"c":1E+9,"d":[],"e":{},"f":[[],{}],"g":"\u00e9\n\"","h":null}"#,
            r#"{"a":"0123456789abcdef0123456789abcdef\\","b":true,"c":false}"#,
            "{\"a\":\"\u{7f}é\u{10ffff}\"}",
        ];
        for t in accepted {
            assert_eq!(scan_members(t), serde_members(t), "{t}");
            assert!(scan_members(t).is_some(), "{t}");
        }
        let left_to_serde = [
            // serde_json refuses these
            "",
            "{",
            "[]",
            "\"a\"",
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\t\"}",
            r#"{"a":[1,]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":1} x"#,
            r#"{"a":[1}"#,
            r#"{"a":{]}"#,
            r#"{"a":[1}}"#,
            r#"{"a":{"b":1]}"#,
            r#"{"a":[}}"#,
            r#"{a:1}"#,
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            // serde_json accepts these; the scan leaves them to it
            r#"{"mo\u0064el":"x"}"#,
            r#"{"a":1,"a":2}"#,
        ];
        for t in left_to_serde {
            assert_eq!(scan_members(t), None, "{t}");
        }
        // Nesting: up to MAX_DEPTH inside a member is scanned, deeper is left to serde_json.
        let nested = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(scan_members(&nested(MAX_DEPTH)).is_some());
        assert_eq!(scan_members(&nested(MAX_DEPTH + 1)), None);
        assert!(serde_members(&nested(MAX_DEPTH + 1)).is_some());
    }
}
