//! HTTP/1.1 codec without I/O: bytes in, parsed heads and body events out.
//!
//! Everything here is runtime-free so every framing rule is unit-tested and fuzzed on its own.
//! The parser is deliberately stricter than httparse alone (RFC 9112 is the reference; each
//! rule cites its section): a proxy that is lenient where the next hop is strict, or the other
//! way round, is how request smuggling happens.

pub mod chunked;
pub mod error;
pub mod index;
pub mod limits;
pub mod request;
pub mod response;
pub mod sse;
pub mod upstream_response;

pub use chunked::{ChunkedDecoder, ChunkedProgress};
pub use error::H1Error;
pub use index::{FieldSpan, HeadIndex, Span};
pub use limits::Limits;
pub use request::{parse_request_head, BodyFraming, RequestHead, Version};
pub use response::ResponseHead;
pub use upstream_response::{
    parse_response_head, ResponseError, ResponseFraming, UpstreamResponseHead,
};

/// `tchar` from RFC 9110 §5.6.2: the bytes allowed in a token (method, field name, coding).
pub const fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// A byte allowed inside a field value (RFC 9110 §5.5): VCHAR, obs-text, SP and HTAB.
/// NUL, CR, LF and the other controls are never allowed.
pub const fn is_field_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// Whether the field name `name` equals `lower`, ignoring ASCII case, eight bytes at a
/// time. `name` must be a parsed field name (token characters only, as httparse and the
/// request parser guarantee) and `lower` must be written in lowercase letters, digits and
/// `-`. For those, setting bit 0x20 of each byte of `name` lowercases its letters and maps
/// no other token character onto a letter, a digit or `-` (the bytes that would, such as
/// CR onto `-`, are not token characters), so the test is exact; the tests check every
/// pair of bytes.
#[inline]
pub fn name_eq(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower
        .iter()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-')));
    const FOLD: u64 = 0x2020_2020_2020_2020;
    fn word(b: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    }
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b);
    }
    let mut at = 0;
    while at + 8 <= n {
        if word(name, at) | FOLD != word(lower, at) {
            return false;
        }
        at += 8;
    }
    // The last, partial word: compare the final eight bytes (overlapping the previous).
    at == n || word(name, n - 8) | FOLD == word(lower, n - 8)
}

/// True when `value` is a comma-separated list containing `token` (ASCII case-insensitive),
/// as used by `Connection` (RFC 9110 §7.6.1).
pub fn list_contains(value: &[u8], token: &[u8]) -> bool {
    // Usually there is no such header: asked once per header line, this is the common exit.
    let mut rest = value;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
        let item = trim_ows(&rest[..end]);
        // Most items differ in length from the token: no byte compare then.
        if item.len() == token.len() && item.eq_ignore_ascii_case(token) {
            return true;
        }
        rest = rest.get(end + 1..).unwrap_or_default();
    }
    false
}

/// Strips optional whitespace (SP / HTAB, RFC 9110 §5.6.3) from both ends.
pub fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Checks, for every byte, that a head with it inside a header value (`X: a<b>b`) or name
/// (`X<b>Y: v`) between `start` and `end` is accepted exactly when RFC 9110 allows the byte
/// there (a bare CR or LF in a value is always refused). Request and response parsing rely
/// on httparse for these byte sets; this guards that they match.
#[cfg(test)]
pub(crate) fn assert_field_bytes_judged_like_rfc_9110(
    accepts: impl Fn(&[u8]) -> bool,
    start: &[u8],
    end: &[u8],
) {
    for b in 0..=255u8 {
        let value = [start, b"X: a", &[b, b'b'], end].concat();
        if b == b'\r' || b == b'\n' {
            assert!(!accepts(&value), "a bare {b:#x} in a value is refused");
        } else {
            assert_eq!(accepts(&value), is_field_value_byte(b), "value byte {b:#x}");
        }
        if b != b':' {
            let name = [start, b"X", &[b, b'Y'], b": v", end].concat();
            assert_eq!(accepts(&name), is_tchar(b), "name byte {b:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TARGET_BYTES: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";

    #[test]
    fn name_eq_agrees_with_case_folding_for_every_pair_of_bytes() {
        // Every token byte against every byte a lowercase name may hold, at each position
        // of a short name, of a name of whole words and of one with a partial last word.
        for len in [1usize, 7, 8, 9, 16, 17] {
            for at in [0, len / 2, len - 1] {
                for name_byte in (0..=255u8).filter(|&b| is_tchar(b)) {
                    for &lower_byte in TARGET_BYTES {
                        let mut name = vec![b'a'; len];
                        let mut lower = vec![b'a'; len];
                        name[at] = name_byte;
                        lower[at] = lower_byte;
                        assert_eq!(
                            name_eq(&name, &lower),
                            name.eq_ignore_ascii_case(&lower),
                            "{:?} vs {:?}",
                            String::from_utf8_lossy(&name),
                            String::from_utf8_lossy(&lower),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn name_eq_examples() {
        assert!(name_eq(b"Content-Length", b"content-length"));
        assert!(name_eq(b"TRANSFER-ENCODING", b"transfer-encoding"));
        assert!(name_eq(b"te", b"te"));
        assert!(!name_eq(b"Content-Lengths", b"content-length"));
        assert!(!name_eq(b"Content_Length", b"content-length"));
        assert!(!name_eq(b"content-lengtH2", b"content-length3"));
        assert!(!name_eq(b"Host", b"hosts"));
        assert!(name_eq(b"", b""));
    }

    proptest! {
        #[test]
        fn name_eq_agrees_with_case_folding(
            lower in proptest::collection::vec(proptest::sample::select(TARGET_BYTES), 0..40),
            flips in proptest::collection::vec(any::<bool>(), 40),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), (0..=255u8).prop_filter("token", |&b| is_tchar(b))),
                0..3,
            ),
        ) {
            // The same name in mixed case, with up to two bytes replaced by any token byte.
            let mut name: Vec<u8> = lower
                .iter()
                .zip(&flips)
                .map(|(&b, &up)| if up { b.to_ascii_uppercase() } else { b })
                .collect();
            if !name.is_empty() {
                for (i, b) in &edits {
                    let i = i.index(name.len());
                    name[i] = *b;
                }
            }
            prop_assert_eq!(name_eq(&name, &lower), name.eq_ignore_ascii_case(&lower));
        }

        #[test]
        fn list_contains_agrees_with_splitting_the_list(
            value in proptest::collection::vec(
                proptest::sample::select(b"aAbB-, \t".as_slice()), 0..24),
            // Tokens are field names or options, never empty.
            token in proptest::collection::vec(proptest::sample::select(b"aAbB-".as_slice()), 1..4),
        ) {
            let split = value
                .split(|&b| b == b',')
                .any(|item| trim_ows(item).eq_ignore_ascii_case(&token));
            prop_assert_eq!(list_contains(&value, &token), split);
        }
    }

    #[test]
    fn list_contains_finds_tokens_of_connection_lists() {
        assert!(list_contains(b"keep-alive", b"keep-alive"));
        assert!(list_contains(b"Keep-Alive, Upgrade", b"upgrade"));
        assert!(list_contains(b" close ,\tX-Foo", b"x-foo"));
        assert!(list_contains(b"a,,close", b"close"));
        assert!(!list_contains(b"keep-alive", b"close"));
        assert!(!list_contains(b"closed", b"close"));
        assert!(!list_contains(b"", b"close"));
        assert!(!list_contains(b"close-x,xclose", b"close"));
        assert!(!list_contains(b",, ,", b"close"));
    }
}
