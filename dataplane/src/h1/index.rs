//! A parsed head as offsets into the connection's read buffer.
//!
//! [`RequestHead`] borrows the buffer, but the buffer must keep growing while the body
//! arrives (and may move when it does). Recording offsets lets the head outlive that without
//! copying a byte: the head's bytes stay where they were read, and are later written onward
//! from there. The header table is reused across the connection's requests, so steady-state
//! parsing allocates nothing.

use super::{BodyFraming, RequestHead, Version};

/// A byte range of the read buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// The span `part` occupies in `base`. `part` must be a sub-slice of `base` (every slice
    /// of a [`RequestHead`] is a slice of the buffer it was parsed from).
    fn of(base: &[u8], part: &[u8]) -> Self {
        let start = (part.as_ptr() as usize).saturating_sub(base.as_ptr() as usize);
        debug_assert!(start + part.len() <= base.len(), "span outside its buffer");
        // Heads are bounded far below 4 GiB by `Limits::max_head_bytes`.
        Self {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub fn get<'a>(&self, base: &'a [u8]) -> &'a [u8] {
        base.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// One header field: name and value spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldSpan {
    pub name: Span,
    pub value: Span,
}

/// Everything the connection needs from a head, as offsets.
#[derive(Debug, Clone)]
pub struct HeadIndex {
    pub method: Span,
    pub path: Span,
    pub version: Version,
    pub host: Option<Span>,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub head_len: usize,
    pub fields: Vec<FieldSpan>,
}

impl Default for HeadIndex {
    fn default() -> Self {
        Self {
            method: Span::default(),
            path: Span::default(),
            version: Version::Http11,
            host: None,
            framing: BodyFraming::None,
            keep_alive: false,
            expect_continue: false,
            head_len: 0,
            fields: Vec::with_capacity(32),
        }
    }
}

impl HeadIndex {
    /// Records `head`, which was parsed from `base`.
    pub fn fill(&mut self, base: &[u8], head: &RequestHead<'_, '_>) {
        self.method = Span::of(base, head.method.as_bytes());
        self.path = Span::of(base, head.path.as_bytes());
        self.version = head.version;
        self.host = head.host.map(|h| Span::of(base, h));
        self.framing = head.framing;
        self.keep_alive = head.keep_alive;
        self.expect_continue = head.expect_continue;
        self.head_len = head.head_len;
        self.fields.clear();
        self.fields.extend(head.headers.iter().map(|h| FieldSpan {
            name: Span::of(base, h.name.as_bytes()),
            value: Span::of(base, h.value),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::{parse_request_head, Limits};

    #[test]
    fn spans_point_back_into_the_buffer() {
        let raw = b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n";
        let mut storage = [std::mem::MaybeUninit::uninit(); 16];
        let head = parse_request_head(raw, &mut storage, &Limits::default())
            .expect("valid")
            .expect("complete");
        let mut idx = HeadIndex::default();
        idx.fill(raw, &head);
        assert_eq!(idx.method.get(raw), b"POST");
        assert_eq!(idx.path.get(raw), b"/v1/x");
        assert_eq!(idx.host.map(|h| h.get(raw)), Some(&b"gw"[..]));
        assert_eq!(idx.fields.len(), 3);
        assert_eq!(idx.fields[1].name.get(raw), b"X-A");
        assert_eq!(idx.fields[1].value.get(raw), b"1");
        assert_eq!(idx.head_len, raw.len());
    }
}
