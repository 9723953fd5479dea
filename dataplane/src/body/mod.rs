//! Request bodies as JSON, parsed once at the top level and edited in place.
//!
//! The pipeline reads a few top-level fields (`model`, `stream`) and sets or removes a few
//! (a routed model name, a non-retention field). Parsing the whole tree for that would
//! allocate a node per value; instead the top-level object is split into its members with
//! each value kept as raw JSON text borrowed from the body (validated, whole), and
//! re-serialised by concatenation. Nested values are parsed only by edits that need them.
//!
//! The usual body is read by [`scan`], a validating scan of the top level; serde_json reads
//! what the scan leaves to it (escaped or repeated keys, deep nesting, every invalid body,
//! whose error it names).

pub(crate) mod scan;

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a body is not an acceptable JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body is not valid JSON: {0}")]
    Invalid(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("duplicate key {0:?} in request body")]
    DuplicateKey(String),
}

/// A top-level JSON object: each member's key and its value's raw JSON text.
#[derive(Debug, Clone)]
pub struct JsonBody<'a> {
    fields: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    edited: bool,
}

impl<'a> JsonBody<'a> {
    /// Parses `bytes`. Duplicate top-level keys are refused: parsers disagree on which one
    /// wins, so the gateway and the provider could act on different values.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BodyError> {
        // UTF-8 is checked once for the whole body (SIMD), so serde_json reads it as text
        // and does not check each member's raw text again.
        let text = simdutf8::basic::from_utf8(bytes)
            .map_err(|_| BodyError::Invalid("the body is not UTF-8".into()))?;
        if let Some(fields) = scan::top_level(text) {
            return Ok(Self {
                fields,
                edited: false,
            });
        }
        Self::parse_with_serde(text)
    }

    /// The general case: serde_json accepts the body or says what is wrong with it.
    fn parse_with_serde(text: &'a str) -> Result<Self, BodyError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = de.deserialize_any(FieldsVisitor).map_err(|e| {
            if e.to_string().starts_with(NOT_OBJECT) {
                BodyError::NotAnObject
            } else if let Some(k) = e.to_string().strip_prefix(DUPLICATE) {
                BodyError::DuplicateKey(k.split(" at line").next().unwrap_or(k).to_string())
            } else {
                BodyError::Invalid(e.to_string())
            }
        })?;
        de.end().map_err(|e| BodyError::Invalid(e.to_string()))?;
        Ok(Self {
            fields,
            edited: false,
        })
    }

    /// A member's value as raw JSON text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// A string member (`None` when absent or not a string).
    pub fn get_str(&self, key: &str) -> Option<Cow<'_, str>> {
        let raw = self.get(key)?;
        if !raw.starts_with('"') {
            return None;
        }
        // A valid string without escapes is its text between the quotes (serde would copy it).
        if !raw.contains('\\') {
            return raw.get(1..raw.len().checked_sub(1)?).map(Cow::Borrowed);
        }
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// Sets a member to a JSON value, replacing it in place or appending it.
    pub fn set(&mut self, key: &str, value: &serde_json::Value) {
        self.set_raw(key, &value.to_string());
    }

    /// Sets a member to `raw`, the text of one valid JSON value (the caller's promise: it
    /// is copied into the body as is).
    pub fn set_raw(&mut self, key: &str, raw: &str) {
        let raw = raw.to_string();
        self.edited = true;
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = Cow::Owned(raw),
            None => self
                .fields
                .push((Cow::Owned(key.to_string()), Cow::Owned(raw))),
        }
    }

    pub fn remove(&mut self, key: &str) {
        let before = self.fields.len();
        self.fields.retain(|(k, _)| k != key);
        self.edited |= self.fields.len() != before;
    }

    /// Whether any edit changed the body (if not, the original bytes can be sent as is).
    pub fn is_edited(&self) -> bool {
        self.edited
    }

    /// Writes the object, members in their original order.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *out, k.as_ref());
            out.push(b':');
            out.extend_from_slice(v.as_bytes());
        }
        out.push(b'}');
    }

    /// The object as [`Self::write`] writes it, in pieces: a value of at least
    /// `share_from` bytes that was parsed from `source` is a shared slice of it, the rest
    /// is copied. An edited request (a model renamed, a non-retention field added) then
    /// goes upstream without a second copy of its prompt, which may be megabytes.
    pub fn write_pieces(&self, source: &Bytes, share_from: usize) -> Pieces {
        let shared = |v: &Cow<'_, str>| match v {
            Cow::Borrowed(v) if v.len() >= share_from => within(source, v.as_bytes()),
            _ => None,
        };
        // Room for what is copied (keys with escapes may take a little more).
        let copied_len: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + 4 + if shared(v).is_some() { 0 } else { v.len() })
            .sum();
        let mut pieces = Pieces::default();
        let mut copied = Vec::with_capacity(copied_len + 2);
        copied.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                copied.push(b',');
            }
            let _ = serde_json::to_writer(&mut copied, k.as_ref());
            copied.push(b':');
            match shared(v) {
                Some(at) => {
                    pieces.push(Bytes::from(std::mem::take(&mut copied)));
                    pieces.push(source.slice(at..at + v.len()));
                }
                None => copied.extend_from_slice(v.as_bytes()),
            }
        }
        copied.push(b'}');
        pieces.push(Bytes::from(copied));
        pieces
    }
}

/// Where `part` starts inside `whole`, if it lies within it.
fn within(whole: &[u8], part: &[u8]) -> Option<usize> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (start + part.len() <= whole.len()).then_some(start)
}

/// A body as pieces sent one after the other (see [`JsonBody::write_pieces`]).
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    parts: smallvec::SmallVec<[Bytes; 3]>,
    len: usize,
}

impl Pieces {
    /// The whole body as one piece.
    pub fn whole(b: Bytes) -> Self {
        let mut p = Self::default();
        p.push(b);
        p
    }

    /// Appends a piece (an empty one is skipped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push(b);
        }
    }

    /// The body's length, all pieces together.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The pieces joined (a copy).
    pub fn concat(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out
    }
}

const NOT_OBJECT: &str = "expected a JSON object";
const DUPLICATE: &str = "duplicate key ";

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(Cow<'de, str>, Cow<'de, str>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NOT_OBJECT)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Self::Value = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if fields.iter().any(|(existing, _)| *existing == k) {
                return Err(de::Error::custom(format!("{DUPLICATE}{k}")));
            }
            let v: &'de RawValue = map.next_value()?;
            fields.push((k, Cow::Borrowed(v.get())));
        }
        Ok(fields)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(NOT_OBJECT))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
}

/// A key borrowed from the body when it has no escapes, owned otherwise.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_round_trips_untouched() {
        let raw = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi \"x\""}],"n":1}"#;
        let b = JsonBody::parse(raw).expect("valid");
        assert_eq!(b.get_str("model").as_deref(), Some("gpt-4o"));
        assert_eq!(b.get_bool("stream"), Some(true));
        assert_eq!(b.get_str("n"), None);
        assert!(!b.is_edited());
        let mut out = Vec::new();
        b.write(&mut out);
        assert_eq!(out, raw);
    }

    #[test]
    fn edits_in_place_and_append() {
        let raw = br#"{"model":"a","x":{"deep":[1,2]}}"#;
        let mut b = JsonBody::parse(raw).expect("valid");
        b.set("model", &serde_json::json!("b"));
        b.set("store", &serde_json::json!(false));
        b.remove("x");
        assert!(b.is_edited());
        let mut out = Vec::new();
        b.write(&mut out);
        assert_eq!(out, br#"{"model":"b","store":false}"#);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid output");
        assert_eq!(v["model"], "b");
    }

    #[test]
    fn pieces_share_large_values_and_join_to_the_written_object() {
        let big = "x".repeat(5000);
        let raw = Bytes::from(format!(
            r#"{{"model":"a", "messages":[{{"content":"{big}"}}],"n":1,"tail":"{big}"}}"#
        ));
        let mut b = JsonBody::parse(&raw).expect("valid");
        b.set("model", &serde_json::json!("b"));
        b.set("store", &serde_json::json!(false));
        let mut written = Vec::new();
        b.write(&mut written);
        let pieces = b.write_pieces(&raw, 4096);
        assert_eq!(pieces.concat(), written, "the same bytes as write");
        assert_eq!(pieces.len(), written.len());
        let shared: Vec<&Bytes> = pieces
            .parts()
            .iter()
            .filter(|p| within(&raw, p).is_some())
            .collect();
        assert_eq!(
            shared.len(),
            2,
            "both large values are slices of the source"
        );
        assert!(shared.iter().all(|p| p.len() > 5000));
        assert_eq!(
            pieces.parts().len(),
            5,
            "copied, shared, copied, shared, copied"
        );

        // Below the threshold, or parsed from other bytes: copied.
        assert_eq!(b.write_pieces(&raw, 1 << 20).parts().len(), 1);
        let elsewhere = Bytes::from(raw.to_vec());
        assert_eq!(b.write_pieces(&elsewhere, 4096).parts().len(), 1);
        assert_eq!(b.write_pieces(&elsewhere, 4096).concat(), written);
    }

    #[test]
    fn escaped_keys_and_values() {
        let raw = br#"{"mo\u0064el":"caf\u00e9"}"#;
        let b = JsonBody::parse(raw).expect("valid");
        assert_eq!(b.get_str("model").as_deref(), Some("café"));
    }

    #[test]
    fn refuses_what_is_not_one_object() {
        assert_eq!(
            JsonBody::parse(b"[1]").map(|_| ()),
            Err(BodyError::NotAnObject)
        );
        assert_eq!(
            JsonBody::parse(b"\"s\"").map(|_| ()),
            Err(BodyError::NotAnObject)
        );
        assert!(matches!(
            JsonBody::parse(b"{\"a\":1} x"),
            Err(BodyError::Invalid(_))
        ));
        assert!(matches!(
            JsonBody::parse(b"{\"a\":}"),
            Err(BodyError::Invalid(_))
        ));
        assert!(matches!(JsonBody::parse(b""), Err(BodyError::Invalid(_))));
        // Invalid UTF-8 anywhere, in a key, a nested string or a value, is refused.
        for bad in [
            &b"{\"a\xff\":1}"[..],
            b"{\"m\":[{\"c\":\"x\xc3\"}]}",
            b"{\"m\":\"\xed\xa0\x80\"}",
        ] {
            assert!(
                matches!(JsonBody::parse(bad), Err(BodyError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            JsonBody::parse(br#"{"model":"a","model":"b"}"#).map(|_| ()),
            Err(BodyError::DuplicateKey("model".into()))
        );
    }
}
