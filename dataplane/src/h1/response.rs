//! Response heads, written into a reusable buffer (no allocation once it has grown).

/// Builds one response head into `out`. Always HTTP/1.1 (RFC 9110 §6.2: a server sends its
/// own highest version, also to HTTP/1.0 clients).
#[derive(Debug)]
pub struct ResponseHead<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> ResponseHead<'a> {
    pub fn new(out: &'a mut Vec<u8>, status: u16) -> Self {
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(num.format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        Self { out }
    }

    /// Appends one field. Names and values come from our own code or from fields that
    /// already passed the parser's checks, so they cannot carry CR or LF; a debug assertion
    /// keeps it that way.
    pub fn header(self, name: impl AsRef<[u8]>, value: &[u8]) -> Self {
        debug_assert!(!value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
        self.out.extend_from_slice(name.as_ref());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
        self
    }

    pub fn content_length(self, n: u64) -> Self {
        let mut num = itoa::Buffer::new();
        let digits = num.format(n).as_bytes();
        self.header("content-length", digits)
    }

    /// Ends the head with the blank line.
    pub fn finish(self) {
        self.out.extend_from_slice(b"\r\n");
    }
}

/// Reason phrases for the statuses we send (RFC 9110 §15). Clients ignore them, humans
/// reading a capture do not.
pub const fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_head() {
        let mut out = Vec::new();
        ResponseHead::new(&mut out, 431)
            .header("x-request-id", b"abc")
            .content_length(12)
            .finish();
        assert_eq!(
            out,
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nx-request-id: abc\r\ncontent-length: 12\r\n\r\n"
        );
    }
}
