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

/// True when `value` is a comma-separated list containing `token` (ASCII case-insensitive),
/// as used by `Connection` (RFC 9110 §7.6.1).
pub fn list_contains(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| trim_ows(item).eq_ignore_ascii_case(token))
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
