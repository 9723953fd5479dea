//! Request head parsing: httparse for the tokenising, then the checks a proxy needs on top of
//! it (RFC 9112). The head stays in the caller's read buffer: every string in a
//! [`RequestHead`] is a slice of it, and the header table lives in caller-provided storage,
//! so parsing allocates nothing.

use std::mem::MaybeUninit;

use super::{is_tchar, list_contains, trim_ows, H1Error, Limits};

/// HTTP versions we speak. httparse only recognises 1.0 and 1.1; anything else is answered
/// with 505 (RFC 9110 §15.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
        }
    }
}

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No Content-Length and no Transfer-Encoding: no body (RFC 9112 §6.3 rule 7).
    None,
    Length(u64),
    Chunked,
}

/// A parsed and checked request head. Borrowed from the read buffer (`'b`) and from the
/// header storage the caller handed in (`'h`).
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    pub method: &'b str,
    /// The request-target as received.
    pub target: &'b str,
    /// Path and query: the target itself in origin-form, the part after the authority in
    /// absolute-form (RFC 9112 §3.2.2), `*` in asterisk-form.
    pub path: &'b str,
    pub version: Version,
    pub headers: &'h [httparse::Header<'b>],
    /// The authority the request is for: the Host field, or the target's authority in
    /// absolute-form (which then overrides Host, RFC 9112 §3.2.2).
    pub host: Option<&'b [u8]>,
    pub framing: BodyFraming,
    /// Whether the client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (RFC 9110 §10.1.1).
    pub expect_continue: bool,
    /// Bytes of the head, final CRLF included; the body (if any) starts here.
    pub head_len: usize,
}

impl RequestHead<'_, '_> {
    /// The value of the first header named `name`, matched ignoring ASCII case. `name` is
    /// written in lowercase letters, digits and `-` (see [`super::name_eq`]).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| super::name_eq(h.name.as_bytes(), name.as_bytes()))
            .map(|h| h.value)
    }

    /// The path without its query string.
    pub fn path_only(&self) -> &str {
        match self.path.find('?') {
            Some(i) => &self.path[..i],
            None => self.path,
        }
    }
}

/// Parses the head at the start of `buf`.
///
/// `Ok(None)`: the head is incomplete and still within limits; read more and call again with
/// the same bytes at the front. `storage` bounds the number of header fields together with
/// `limits.max_headers` (whichever is smaller).
pub fn parse_request_head<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
    limits: &Limits,
) -> Result<Option<RequestHead<'h, 'b>>, H1Error> {
    let max_headers = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    // Uninitialised storage: no need to clear a table of up to 256 fields on every parse.
    let head_len = match req.parse_with_uninit_headers(buf, &mut storage[..max_headers]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            check_partial(buf, limits)?;
            return Ok(None);
        }
        Err(e) => return Err(classify_httparse_error(buf, e, limits)),
    };
    let head = &buf[..head_len];
    // httparse accepts bare LF as a line end; RFC 9112 §2.2 lets a server reject it, and a
    // proxy must, since the next hop may split lines differently.
    check_line_endings(head)?;
    if head_len > limits.max_head_bytes {
        return Err(H1Error::HeadTooLarge);
    }
    let request_line_len = memchr::memchr(b'\n', head).unwrap_or(head_len);
    if request_line_len > limits.max_request_line_bytes {
        return Err(H1Error::RequestLineTooLong);
    }

    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(H1Error::BadRequestLine);
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    let (path, target_authority) = split_target(method, target)?;
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let fields = scan_fields(headers)?;

    let host = match (version, fields.host_count) {
        (_, n) if n > 1 => return Err(H1Error::DuplicateHost),
        // RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host.
        (Version::Http11, 0) => return Err(H1Error::MissingHost),
        _ => fields.host,
    };
    if let Some(h) = host {
        if !valid_host(h) {
            return Err(H1Error::BadHost);
        }
    }
    let host = target_authority.map(str::as_bytes).or(host);

    let framing = match (fields.transfer_encoding, fields.content_length) {
        // RFC 9112 §6.1: TE in an HTTP/1.0 request means faulty framing.
        (Some(_), _) if version == Version::Http10 => return Err(H1Error::TransferEncodingHttp10),
        // RFC 9112 §6.3 rule 3: both present is a smuggling attempt until proven otherwise.
        (Some(_), Some(_)) => return Err(H1Error::LengthWithTransferEncoding),
        (Some(te), None) => {
            te?;
            BodyFraming::Chunked
        }
        (None, Some(len)) => {
            if len > limits.max_body_bytes {
                return Err(H1Error::BodyTooLarge);
            }
            BodyFraming::Length(len)
        }
        (None, None) => BodyFraming::None,
    };

    let keep_alive = match version {
        Version::Http11 => !fields.connection_close,
        Version::Http10 => fields.connection_keep_alive && !fields.connection_close,
    };

    // RFC 9110 §10.1.1: 100-continue is the only expectation defined; an HTTP/1.0 request's
    // expectation MUST be ignored.
    let expect_continue = match (version, fields.expect) {
        (Version::Http11, Some(v)) if trim_ows(v).eq_ignore_ascii_case(b"100-continue") => true,
        (Version::Http11, Some(_)) => return Err(H1Error::UnsupportedExpectation),
        _ => false,
    };

    Ok(Some(RequestHead {
        method,
        target,
        path,
        version,
        headers,
        host,
        framing,
        keep_alive,
        expect_continue,
        head_len,
    }))
}

/// Limits that apply before the head is complete: a request line that cannot fit is 414, a
/// head that cannot fit is 431. Also rejects a bare CR/LF as soon as it arrives.
fn check_partial(buf: &[u8], limits: &Limits) -> Result<(), H1Error> {
    let line_end = memchr::memchr(b'\n', buf);
    match line_end {
        None if buf.len() > limits.max_request_line_bytes => {
            return Err(H1Error::RequestLineTooLong)
        }
        Some(i) if i > limits.max_request_line_bytes => return Err(H1Error::RequestLineTooLong),
        _ => {}
    }
    // A trailing CR may still be followed by its LF in the next read.
    let complete = match buf.last() {
        Some(b'\r') => &buf[..buf.len() - 1],
        _ => buf,
    };
    check_line_endings(complete)?;
    if buf.len() >= limits.max_head_bytes {
        return Err(H1Error::HeadTooLarge);
    }
    Ok(())
}

/// httparse reports its errors coarsely; find the precise rule the input broke so the client
/// (and the operator reading logs) learns what was wrong.
fn classify_httparse_error(buf: &[u8], e: httparse::Error, limits: &Limits) -> H1Error {
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
    let head = &buf[..head_end.min(buf.len())];
    if let Err(err) = check_line_endings(head) {
        return err;
    }
    if memchr::memmem::find(head, b"\n ").is_some() || memchr::memmem::find(head, b"\n\t").is_some()
    {
        return H1Error::ObsFold;
    }
    let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
    if line_end > limits.max_request_line_bytes {
        return H1Error::RequestLineTooLong;
    }
    match e {
        httparse::Error::TooManyHeaders => H1Error::TooManyHeaders,
        httparse::Error::Version => {
            // "HTTP/" DIGIT "." DIGIT that is not 1.0 or 1.1 is well-formed but unsupported.
            let line = &head[..line_end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match line.rsplit(|&b| b == b' ').next() {
                Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor])
                    if major.is_ascii_digit() && minor.is_ascii_digit() =>
                {
                    H1Error::UnsupportedVersion
                }
                _ => H1Error::BadRequestLine,
            }
        }
        httparse::Error::Token => H1Error::BadRequestLine,
        // Real bare line ends were caught above; this is junk where a line end belongs.
        httparse::Error::NewLine => H1Error::BadRequestLine,
        httparse::Error::HeaderName | httparse::Error::HeaderValue => H1Error::BadHeader,
        _ => H1Error::BadRequestLine,
    }
}

/// RFC 9112 §2.2: every line ends in CRLF. A bare LF or a bare CR is refused.
///
/// Equivalently, the LFs sit exactly one byte after the CRs: both positions are compared as
/// bit masks, 16 bytes at a time, carrying a CR in a block's last byte into the next block.
/// A head has a dozen or more line ends, and one search per line end cost more than the
/// parse itself.
pub(crate) fn check_line_endings(head: &[u8]) -> Result<(), H1Error> {
    let mut carry = 0u32; // 1 when the byte before this block is a CR
    let mut rest = head;
    while let Some((block, tail)) = rest.split_first_chunk::<16>() {
        let (cr, lf) = cr_lf_masks(block);
        if lf != ((cr << 1) | carry) & 0xffff {
            return Err(H1Error::BareLineEnding);
        }
        carry = cr >> 15;
        rest = tail;
    }
    for &b in rest {
        let cr = u32::from(b == b'\r');
        if u32::from(b == b'\n') != carry {
            return Err(H1Error::BareLineEnding);
        }
        carry = cr;
    }
    // A CR in the last byte has no LF after it.
    if carry != 0 {
        return Err(H1Error::BareLineEnding);
    }
    Ok(())
}

/// Bit i of the first mask is set when `block[i]` is a CR, of the second when it is a LF.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(unsafe_code)]
fn cr_lf_masks(block: &[u8; 16]) -> (u32, u32) {
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8};
    // SAFETY: SSE2 is part of the x86_64 baseline; the load reads exactly the 16 bytes of
    // `block` and has no alignment requirement.
    unsafe {
        let v = _mm_loadu_si128(block.as_ptr().cast());
        let cr = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\r' as i8))) as u32;
        let lf = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))) as u32;
        (cr, lf)
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn cr_lf_masks(block: &[u8; 16]) -> (u32, u32) {
    let (mut cr, mut lf) = (0u32, 0u32);
    for (i, &b) in block.iter().enumerate() {
        cr |= u32::from(b == b'\r') << i;
        lf |= u32::from(b == b'\n') << i;
    }
    (cr, lf)
}

/// Splits the request-target into the path we route on and, in absolute-form, the authority.
/// RFC 9112 §3.2: origin-form, absolute-form, authority-form (CONNECT only) and
/// asterisk-form (OPTIONS only). We do not tunnel, so authority-form is refused.
fn split_target<'b>(method: &str, target: &'b str) -> Result<(&'b str, Option<&'b str>), H1Error> {
    // httparse admits obs-text in the target; a URI is ASCII (RFC 3986 §2).
    if target.is_empty() || !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(H1Error::BadTarget);
    }
    if target.starts_with('/') {
        return Ok((target, None));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok((target, None))
        } else {
            Err(H1Error::BadTarget)
        };
    }
    let rest = strip_prefix_ignore_case(target, "http://")
        .or_else(|| strip_prefix_ignore_case(target, "https://"))
        .ok_or(H1Error::BadTarget)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        // "http://host?q" has an empty path; we cannot re-root the query without copying.
        Some(_) => return Err(H1Error::BadTarget),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || !valid_host(authority.as_bytes()) {
        return Err(H1Error::BadTarget);
    }
    Ok((path, Some(authority)))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// uri-host [ ":" port ] (RFC 3986 §3.2.2): unreserved, pct-encoded, sub-delims, and the
/// brackets and colons of an IP literal. Whitespace, `/`, `@` and controls are refused.
fn valid_host(h: &[u8]) -> bool {
    h.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// What the framing-relevant fields said, gathered in one pass.
#[derive(Default)]
struct Fields<'b> {
    host: Option<&'b [u8]>,
    host_count: usize,
    content_length: Option<u64>,
    /// `Some(Ok)` when Transfer-Encoding is exactly `chunked`, `Some(Err)` with the reason it
    /// is not. The error is only raised once CL/TE conflicts and HTTP/1.0 are ruled out, so
    /// the client hears about the most fundamental problem first.
    transfer_encoding: Option<Result<(), H1Error>>,
    connection_close: bool,
    connection_keep_alive: bool,
    expect: Option<&'b [u8]>,
}

fn scan_fields<'b>(headers: &[httparse::Header<'b>]) -> Result<Fields<'b>, H1Error> {
    let mut f = Fields::default();
    let mut te = TeState::default();
    for h in headers {
        // Names are tokens and values hold only HTAB, SP, VCHAR and obs-text (RFC 9110 §5.1,
        // §5.5): httparse's default parser already refuses anything else (NUL, CR, LF, DEL,
        // controls), which `every_byte_in_names_and_values_is_judged_like_rfc_9110` checks
        // byte by byte, so the bytes are not scanned a second time here.
        if h.name.is_empty() {
            return Err(H1Error::BadHeader);
        }
        let name = h.name.as_bytes();
        if super::name_eq(name, b"host") {
            f.host_count += 1;
            f.host = Some(trim_ows(h.value));
        } else if super::name_eq(name, b"content-length") {
            // RFC 9112 §6.3 rule 5: duplicates or invalid values are unrecoverable.
            if f.content_length.is_some() {
                return Err(H1Error::DuplicateContentLength);
            }
            f.content_length = Some(parse_content_length(h.value)?);
        } else if super::name_eq(name, b"transfer-encoding") {
            te.add(h.value);
        } else if super::name_eq(name, b"connection") {
            f.connection_close |= list_contains(h.value, b"close");
            f.connection_keep_alive |= list_contains(h.value, b"keep-alive");
        } else if super::name_eq(name, b"expect") {
            if f.expect.is_some() {
                return Err(H1Error::UnsupportedExpectation);
            }
            f.expect = Some(h.value);
        }
    }
    f.transfer_encoding = te.finish();
    Ok(f)
}

/// Content-Length = 1*DIGIT (RFC 9110 §8.6). No sign, no hex, no fraction, no list, no
/// whitespace inside, and no value that overflows.
pub(crate) fn parse_content_length(value: &[u8]) -> Result<u64, H1Error> {
    let digits = trim_ows(value);
    if digits.is_empty() || digits.len() > 19 {
        return Err(H1Error::BadContentLength);
    }
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return Err(H1Error::BadContentLength);
        }
        n = n * 10 + u64::from(b - b'0'); // 19 digits always fit in u64
    }
    Ok(n)
}

/// Transfer-Encoding across every field line that carries it (RFC 9112 §6.1): the only
/// coding we decode is a single, final `chunked`.
#[derive(Default)]
pub(crate) struct TeState {
    seen: bool,
    malformed: bool,
    chunked_count: usize,
    last_is_chunked: bool,
    other_codings: bool,
}

impl TeState {
    pub(crate) fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for item in value.split(|&b| b == b',') {
            let item = trim_ows(item);
            if item.is_empty() {
                continue; // RFC 9110 §5.6.1: empty list elements are ignored
            }
            if item.eq_ignore_ascii_case(b"chunked") {
                self.chunked_count += 1;
                self.last_is_chunked = true;
            } else {
                self.last_is_chunked = false;
                // A coding is a token, optionally with parameters; anything else is garbage.
                let name_end = item.iter().position(|&b| b == b';').unwrap_or(item.len());
                if name_end == 0 || !trim_ows(&item[..name_end]).iter().all(|&b| is_tchar(b)) {
                    self.malformed = true;
                }
                self.other_codings = true;
            }
        }
    }

    pub(crate) fn finish(&self) -> Option<Result<(), H1Error>> {
        if !self.seen {
            return None;
        }
        Some(
            if self.malformed || self.chunked_count > 1 || !self.last_is_chunked {
                // RFC 9112 §6.3 rule 4: chunked not final (or repeated) → 400 and close.
                Err(H1Error::BadTransferEncoding)
            } else if self.other_codings {
                // RFC 9112 §6.1: a coding we do not understand → 501.
                Err(H1Error::UnsupportedTransferCoding)
            } else {
                Ok(())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::is_field_value_byte;
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<(BodyFraming, bool, usize)>, H1Error> {
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        parse_request_head(raw, &mut storage, &Limits::default())
            .map(|o| o.map(|h| (h.framing, h.keep_alive, h.head_len)))
    }

    fn err(raw: &[u8]) -> H1Error {
        match parse(raw) {
            Err(e) => e,
            Ok(v) => panic!("accepted {:?}: {v:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn parses_a_simple_request_into_slices_of_the_buffer() {
        let raw =
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello";
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(raw, &mut storage, &Limits::default())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/chat/completions?x=1");
        assert_eq!(head.path_only(), "/v1/chat/completions");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.host, Some(&b"gw"[..]));
        assert_eq!(head.framing, BodyFraming::Length(5));
        assert!(head.keep_alive);
        assert_eq!(&raw[head.head_len..], b"hello");
        let base = raw.as_ptr() as usize;
        let p = head.path.as_ptr() as usize;
        assert!(
            p >= base && p < base + raw.len(),
            "path must point into the read buffer"
        );
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), Ok(None));
        assert_eq!(parse(b"GE"), Ok(None));
    }

    #[test]
    fn leading_empty_line_is_tolerated() {
        // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request.
        assert!(matches!(
            parse(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Some(_))
        ));
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(err(raw), H1Error::LengthWithTransferEncoding);
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(err(raw), H1Error::LengthWithTransferEncoding);
    }

    #[test]
    fn duplicate_content_length_is_refused_even_when_equal() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(err(raw), H1Error::DuplicateContentLength);
    }

    #[test]
    fn malformed_content_length_is_refused() {
        for v in [
            "+1",
            "-1",
            "0x10",
            "",
            "1.5",
            "5, 5",
            "1 2",
            "99999999999999999999",
            "١",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(
                err(raw.as_bytes()),
                H1Error::BadContentLength,
                "value {v:?}"
            );
        }
    }

    #[test]
    fn content_length_accepts_surrounding_whitespace_and_leading_zeros() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  007 \r\n\r\n";
        assert_eq!(
            parse(raw).map(|o| o.map(|h| h.0)),
            Ok(Some(BodyFraming::Length(7)))
        );
    }

    #[test]
    fn oversized_content_length_is_413_before_reading_the_body() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 33554433\r\n\r\n";
        assert_eq!(err(raw), H1Error::BodyTooLarge);
        assert_eq!(H1Error::BodyTooLarge.status(), 413);
    }

    #[test]
    fn only_a_single_final_chunked_is_accepted() {
        let ok = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(
            parse(ok).map(|o| o.map(|h| h.0)),
            Ok(Some(BodyFraming::Chunked))
        );
        let cases: &[(&str, H1Error)] = &[
            ("gzip, chunked", H1Error::UnsupportedTransferCoding),
            ("chunked, gzip", H1Error::BadTransferEncoding),
            ("chunked, chunked", H1Error::BadTransferEncoding),
            ("gzip", H1Error::BadTransferEncoding),
            ("identity", H1Error::BadTransferEncoding),
            ("", H1Error::BadTransferEncoding),
            ("chunked;foo=bar", H1Error::BadTransferEncoding),
            ("\"chunked\"", H1Error::BadTransferEncoding),
            ("xchunked", H1Error::BadTransferEncoding),
        ];
        for (v, e) in cases {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n");
            assert_eq!(err(raw.as_bytes()), *e, "value {v:?}");
        }
        assert_eq!(H1Error::UnsupportedTransferCoding.status(), 501);
    }

    #[test]
    fn transfer_encoding_split_over_two_lines_is_one_list() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(err(raw), H1Error::BadTransferEncoding);
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(err(raw), H1Error::UnsupportedTransferCoding);
    }

    #[test]
    fn transfer_encoding_on_http10_is_refused() {
        let raw = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(err(raw), H1Error::TransferEncodingHttp10);
    }

    #[test]
    fn bare_lf_and_bare_cr_are_refused() {
        assert_eq!(
            err(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            H1Error::BareLineEnding
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
            H1Error::BareLineEnding
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\n\n"),
            H1Error::BareLineEnding
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n"),
            H1Error::BareLineEnding
        );
        // Caught early too, before the head is complete.
        assert_eq!(err(b"GET / HTTP/1.1\nHost: a"), H1Error::BareLineEnding);
    }

    #[test]
    fn nul_and_controls_in_values_are_refused() {
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"),
            H1Error::BadHeader
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n"),
            H1Error::BadHeader
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n"),
            H1Error::BadHeader
        );
    }

    #[test]
    fn every_byte_in_names_and_values_is_judged_like_rfc_9110() {
        super::super::assert_field_bytes_judged_like_rfc_9110(
            |head| parse(head).is_ok(),
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"\r\n\r\n",
        );
    }

    #[test]
    fn tab_and_obs_text_in_values_are_allowed() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\tb\xe9\r\n\r\n"),
            Ok(Some(_))
        ));
    }

    #[test]
    fn whitespace_before_colon_is_refused() {
        // RFC 9112 §5.1: a server MUST reject whitespace between field name and colon.
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
            H1Error::BadHeader
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX\t: b\r\n\r\n"),
            H1Error::BadHeader
        );
    }

    #[test]
    fn obs_fold_is_refused() {
        // RFC 9112 §5.2: a server MUST reject obs-fold in a request (or replace it; we reject).
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n"),
            H1Error::ObsFold
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n"),
            H1Error::ObsFold
        );
    }

    #[test]
    fn host_rules() {
        assert_eq!(err(b"GET / HTTP/1.1\r\n\r\n"), H1Error::MissingHost);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
            H1Error::DuplicateHost
        );
        assert_eq!(
            err(b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"),
            H1Error::DuplicateHost
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            H1Error::BadHost
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
            H1Error::BadHost
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"),
            H1Error::BadHost
        );
        // HTTP/1.0 may omit Host; an empty Host is legal (RFC 9110 §7.2).
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n"), Ok(Some(_))));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"),
            Ok(Some(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"),
            Ok(Some(_))
        ));
    }

    #[test]
    fn versions() {
        assert_eq!(
            err(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
            H1Error::UnsupportedVersion
        );
        assert_eq!(
            err(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
            H1Error::UnsupportedVersion
        );
        assert_eq!(H1Error::UnsupportedVersion.status(), 505);
        assert_eq!(
            err(b"GET / HTTX/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadRequestLine
        );
        assert_eq!(
            err(b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n"),
            H1Error::BadRequestLine
        );
    }

    #[test]
    fn request_line_shape() {
        assert_eq!(
            err(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadRequestLine
        );
        assert_eq!(
            err(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadRequestLine
        );
        assert_eq!(
            err(b"GET a HTTP/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadTarget
        );
        assert_eq!(
            err(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadTarget
        );
        assert_eq!(
            err(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
            H1Error::BadTarget
        );
        assert_eq!(err(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n").status(), 400);
        assert!(matches!(
            parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Some(_))
        ));
    }

    #[test]
    fn absolute_form_target_overrides_host() {
        let raw = b"GET http://Gw.example:80/v1/models?x HTTP/1.1\r\nHost: other\r\n\r\n";
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(raw, &mut storage, &Limits::default())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.path, "/v1/models?x");
        assert_eq!(head.host, Some(&b"Gw.example:80"[..]));
        assert_eq!(
            err(b"GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n"),
            H1Error::BadTarget
        );
    }

    #[test]
    fn head_and_request_line_limits() {
        let limits = Limits {
            max_head_bytes: 128,
            max_request_line_bytes: 64,
            ..Limits::default()
        };
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(80));
        let r = parse_request_head(long_line.as_bytes(), &mut storage, &limits);
        assert_eq!(r.map(|_| ()), Err(H1Error::RequestLineTooLong));
        // Still being received, no line end yet: already too long.
        let partial = format!("GET /{}", "a".repeat(80));
        let r = parse_request_head(partial.as_bytes(), &mut storage, &limits);
        assert_eq!(r.map(|_| ()), Err(H1Error::RequestLineTooLong));
        let big_head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(120)
        );
        let r = parse_request_head(big_head.as_bytes(), &mut storage, &limits);
        assert_eq!(r.map(|_| ()), Err(H1Error::HeadTooLarge));
        let partial = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "b".repeat(120));
        let r = parse_request_head(partial.as_bytes(), &mut storage, &limits);
        assert_eq!(r.map(|_| ()), Err(H1Error::HeadTooLarge));
        assert_eq!(H1Error::HeadTooLarge.status(), 431);
        assert_eq!(H1Error::RequestLineTooLong.status(), 414);
    }

    #[test]
    fn header_count_limit() {
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        let r = parse_request_head(raw, &mut storage, &limits);
        assert_eq!(r.map(|_| ()), Err(H1Error::TooManyHeaders));
        assert_eq!(H1Error::TooManyHeaders.status(), 431);
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &[u8]| parse(raw).expect("valid").expect("complete").1;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n"
        ));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn expectations() {
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let raw =
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n";
        let head = parse_request_head(raw, &mut storage, &Limits::default());
        assert!(head.expect("valid").expect("complete").expect_continue);
        assert_eq!(
            err(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n"),
            H1Error::UnsupportedExpectation
        );
        assert_eq!(H1Error::UnsupportedExpectation.status(), 417);
        // RFC 9110 §10.1.1: ignored on HTTP/1.0.
        let raw = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let head = parse_request_head(raw, &mut storage, &Limits::default());
        assert!(!head.expect("valid").expect("complete").expect_continue);
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let raw = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        let (_, _, n) = parse(raw).expect("valid").expect("complete");
        let mut storage = [std::mem::MaybeUninit::uninit(); 100];
        let second = parse_request_head(&raw[n..], &mut storage, &Limits::default());
        assert_eq!(second.expect("valid").expect("complete").path, "/b");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_accepted_heads_are_strict(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut storage = [std::mem::MaybeUninit::uninit(); 100];
            if let Ok(Some(head)) = parse_request_head(&bytes, &mut storage, &Limits::default()) {
                let h = &bytes[..head.head_len];
                proptest::prop_assert!(check_line_endings(h).is_ok());
                for f in head.headers {
                    proptest::prop_assert!(f.value.iter().all(|&b| is_field_value_byte(b)));
                }
            }
        }

        /// The block-wise check agrees with the rule read byte by byte, on inputs dense in
        /// CR and LF (and long enough to cross several 16-byte blocks).
        #[test]
        fn line_endings_agree_with_the_bytewise_rule(
            bytes in proptest::collection::vec(proptest::sample::select(vec![b'\r', b'\n', b'a', b' ']), 0..80),
            crlf_every in 1usize..20,
        ) {
            // Also a well-formed variant of the same length, so the accepted side is covered.
            let mut good = bytes.clone();
            for (i, b) in good.iter_mut().enumerate() {
                *b = if i % (crlf_every + 1) == crlf_every - 1 { b'\r' } else if i % (crlf_every + 1) == crlf_every { b'\n' } else { b'x' };
            }
            for input in [&bytes, &good] {
                let bytewise = input.iter().enumerate().all(|(i, &b)| match b {
                    b'\r' => input.get(i + 1) == Some(&b'\n'),
                    b'\n' => i > 0 && input[i - 1] == b'\r',
                    _ => true,
                });
                proptest::prop_assert_eq!(check_line_endings(input).is_ok(), bytewise, "{:?}", input);
            }
        }

        #[test]
        fn content_length_round_trips(n in 0u64..=32 * 1024 * 1024) {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n");
            proptest::prop_assert_eq!(parse(raw.as_bytes()).map(|o| o.map(|h| h.0)), Ok(Some(BodyFraming::Length(n))));
        }
    }
}
