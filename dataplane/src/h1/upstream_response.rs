//! Upstream response heads, parsed as strictly as client requests.
//!
//! An upstream is a peer like any other: a response with ambiguous framing relayed as if it
//! were valid would let one upstream desynchronise a pooled connection, or smuggle a second
//! response to the next client. Anything malformed is refused, becomes a 502 (or a visibly
//! aborted response once bytes have reached the client), and the connection is not reused.

use std::mem::MaybeUninit;

use super::request::{check_line_endings, parse_content_length, TeState};
use super::{list_contains, Limits};

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// 1xx, 204, 304, or a response to HEAD.
    None,
    Length(u64),
    Chunked,
    /// Neither Content-Length nor Transfer-Encoding: the body ends when the upstream closes.
    UntilClose,
}

/// Why an upstream response was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    #[error("malformed status line")]
    BadStatusLine,
    #[error("malformed header field")]
    BadHeader,
    #[error("line ending is not CRLF")]
    BareLineEnding,
    #[error("response head too large")]
    HeadTooLarge,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("malformed or conflicting Content-Length")]
    BadContentLength,
    #[error("both Content-Length and Transfer-Encoding present")]
    LengthWithTransferEncoding,
    #[error("unsupported or malformed Transfer-Encoding")]
    BadTransferEncoding,
    #[error("protocol switch not requested")]
    UnexpectedUpgrade,
}

/// A parsed upstream response head.
#[derive(Debug)]
pub struct UpstreamResponseHead<'h, 'b> {
    pub status: u16,
    pub headers: &'h [httparse::Header<'b>],
    pub framing: ResponseFraming,
    /// Whether the upstream connection may carry another request afterwards.
    pub keep_alive: bool,
    pub head_len: usize,
}

impl UpstreamResponseHead<'_, '_> {
    /// An interim (1xx) response: skip it and parse the next head (RFC 9110 §15.2).
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// The value of the first header named `name`, matched ignoring ASCII case. `name` is
    /// written in lowercase letters, digits and `-` (see [`super::name_eq`]).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| super::name_eq(h.name.as_bytes(), name.as_bytes()))
            .map(|h| h.value)
    }
}

/// Parses the response head at the start of `buf`; `Ok(None)` means read more.
/// `request_was_head`: the response to a HEAD request has no body whatever it announces.
pub fn parse_response_head<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
    limits: &Limits,
    request_was_head: bool,
) -> Result<Option<UpstreamResponseHead<'h, 'b>>, ResponseError> {
    let max_headers = limits.max_headers.min(storage.len());
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage[..max_headers],
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_head_bytes {
                return Err(ResponseError::HeadTooLarge);
            }
            let complete = buf.strip_suffix(b"\r").unwrap_or(buf);
            check_line_endings(complete).map_err(|_| ResponseError::BareLineEnding)?;
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyHeaders),
        Err(httparse::Error::Status | httparse::Error::Version | httparse::Error::Token) => {
            return Err(ResponseError::BadStatusLine)
        }
        Err(_) => {
            let end = memchr::memmem::find(buf, b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
            check_line_endings(&buf[..end]).map_err(|_| ResponseError::BareLineEnding)?;
            return Err(ResponseError::BadHeader);
        }
    };
    check_line_endings(&buf[..head_len]).map_err(|_| ResponseError::BareLineEnding)?;
    if head_len > limits.max_head_bytes {
        return Err(ResponseError::HeadTooLarge);
    }
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(ResponseError::BadStatusLine);
    };
    if !(100..=599).contains(&status) {
        return Err(ResponseError::BadStatusLine);
    }
    if status == 101 {
        return Err(ResponseError::UnexpectedUpgrade);
    }
    let headers: &'h [httparse::Header<'b>] = resp.headers;

    let mut content_length = None;
    let mut te = TeState::default();
    let mut close = false;
    let mut keep_alive_token = false;
    for h in headers {
        // Name and value bytes were checked by httparse (see the byte-by-byte test below).
        if h.name.is_empty() {
            return Err(ResponseError::BadHeader);
        }
        if super::name_eq(h.name.as_bytes(), b"content-length") {
            if content_length.is_some() {
                return Err(ResponseError::BadContentLength);
            }
            content_length =
                Some(parse_content_length(h.value).map_err(|_| ResponseError::BadContentLength)?);
        } else if super::name_eq(h.name.as_bytes(), b"transfer-encoding") {
            te.add(h.value);
        } else if super::name_eq(h.name.as_bytes(), b"connection") {
            close |= list_contains(h.value, b"close");
            keep_alive_token |= list_contains(h.value, b"keep-alive");
        }
    }
    let te = te.finish();
    let no_body =
        request_was_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (te, content_length) {
        // RFC 9112 §6.3 rule 3: a proxy must not forward such a message as is.
        (Some(_), Some(_)) => return Err(ResponseError::LengthWithTransferEncoding),
        (Some(Err(_)), None) => return Err(ResponseError::BadTransferEncoding),
        _ if no_body => ResponseFraming::None,
        (Some(Ok(())), None) if minor == 0 => return Err(ResponseError::BadTransferEncoding),
        (Some(Ok(())), None) => ResponseFraming::Chunked,
        (None, Some(n)) => ResponseFraming::Length(n),
        (None, None) => ResponseFraming::UntilClose,
    };
    let keep_alive =
        framing != ResponseFraming::UntilClose && !close && (minor == 1 || keep_alive_token);
    Ok(Some(UpstreamResponseHead {
        status,
        headers,
        framing,
        keep_alive,
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_in_names_and_values_is_judged_like_rfc_9110() {
        super::super::assert_field_bytes_judged_like_rfc_9110(
            |head| parse(head).is_ok(),
            b"HTTP/1.1 200 OK\r\n",
            b"\r\nContent-Length: 0\r\n\r\n",
        );
    }

    fn parse(raw: &[u8]) -> Result<Option<(u16, ResponseFraming, bool)>, ResponseError> {
        let mut storage = [std::mem::MaybeUninit::uninit(); 64];
        parse_response_head(raw, &mut storage, &Limits::default(), false)
            .map(|o| o.map(|h| (h.status, h.framing, h.keep_alive)))
    }

    #[test]
    fn framings() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((200, ResponseFraming::Length(5), true)))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Some((200, ResponseFraming::Chunked, true)))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"),
            Ok(Some((200, ResponseFraming::UntilClose, false)))
        );
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((204, ResponseFraming::None, true)))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"),
            Ok(Some((200, ResponseFraming::Length(5), false)))
        );
        assert_eq!(
            parse(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((200, ResponseFraming::Length(5), false)))
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), Ok(None));
    }

    #[test]
    fn response_to_head_has_no_body() {
        let mut storage = [std::mem::MaybeUninit::uninit(); 8];
        let h = parse_response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &mut storage,
            &Limits::default(),
            true,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(h.framing, ResponseFraming::None);
    }

    #[test]
    fn interim_responses_are_marked() {
        let mut storage = [std::mem::MaybeUninit::uninit(); 8];
        let h = parse_response_head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
            &mut storage,
            &Limits::default(),
            false,
        )
        .expect("valid")
        .expect("complete");
        assert!(h.is_interim());
        assert_eq!(h.head_len, 25);
        assert_eq!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            Err(ResponseError::UnexpectedUpgrade)
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ResponseError::LengthWithTransferEncoding)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(ResponseError::BadTransferEncoding)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Err(ResponseError::BadTransferEncoding)
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\nContent-Length: 5\n\n"),
            Err(ResponseError::BareLineEnding)
        );
        assert_eq!(
            parse(b"HTTP/1.1 20 OK\r\n\r\n"),
            Err(ResponseError::BadStatusLine)
        );
        assert_eq!(
            parse(b"HTTP/1.1 999 Nope\r\n\r\n"),
            Err(ResponseError::BadStatusLine)
        );
        assert_eq!(
            parse(b"HTTX/1.1 200 OK\r\n\r\n"),
            Err(ResponseError::BadStatusLine)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n"),
            Err(ResponseError::BadHeader)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nX : b\r\n\r\n"),
            Err(ResponseError::BadHeader)
        );
        let limits = Limits {
            max_head_bytes: 1024,
            ..Limits::default()
        };
        let mut storage = [std::mem::MaybeUninit::uninit(); 8];
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(2000));
        assert_eq!(
            parse_response_head(big.as_bytes(), &mut storage, &limits, false).map(|_| ()),
            Err(ResponseError::HeadTooLarge)
        );
    }
}
