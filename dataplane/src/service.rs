//! What a connection hands to the code that answers requests, and what it gets back.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::errors::{ApiError, ApiStyle};
use crate::h1::{FieldSpan, HeadIndex, Version};
use crate::request_id::RequestId;
use crate::respond::Responder;

/// One complete request: the head as offsets into `raw` (the bytes it was read into), and
/// the decoded body. Both are `Bytes`, so forwarding them onward shares, not copies.
#[derive(Debug)]
pub struct Request<'a> {
    pub id: RequestId,
    pub peer: SocketAddr,
    /// When the first byte of the head arrived.
    pub started: Instant,
    index: &'a HeadIndex,
    raw: &'a Bytes,
    buf: &'a [u8],
    /// Method, path and query, and where the query starts (read once; asked for several
    /// times).
    method: &'a str,
    path: &'a str,
    query_at: usize,
    pub body: &'a Bytes,
}

impl<'a> Request<'a> {
    pub(crate) fn new(
        id: RequestId,
        peer: SocketAddr,
        started: Instant,
        index: &'a HeadIndex,
        raw: &'a Bytes,
        body: &'a Bytes,
    ) -> Self {
        // The parser only accepts token characters (ASCII) in the method and visible ASCII
        // in the target.
        let method = std::str::from_utf8(index.method.get(raw)).unwrap_or("");
        let path = std::str::from_utf8(index.path.get(raw)).unwrap_or("");
        let query_at = memchr::memchr(b'?', path.as_bytes()).unwrap_or(path.len());
        Self {
            id,
            peer,
            started,
            index,
            raw,
            buf: raw,
            method,
            path,
            query_at,
            body,
        }
    }

    /// The bytes the head was parsed from (the head's spans index into them).
    pub fn raw(&self) -> &'a Bytes {
        self.raw
    }

    pub fn index(&self) -> &'a HeadIndex {
        self.index
    }

    pub fn method(&self) -> &'a str {
        self.method
    }

    /// Path and query.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The path without the query.
    pub fn path_only(&self) -> &'a str {
        &self.path[..self.query_at]
    }

    pub fn version(&self) -> Version {
        self.index.version
    }

    /// The value of the first header named `name`, matched ignoring ASCII case. `name` is
    /// written in lowercase letters, digits and `-` (see [`crate::h1::name_eq`]).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.index
            .fields
            .iter()
            .find(|f| crate::h1::name_eq(f.name.get(self.buf), name.as_bytes()))
            .map(|f| f.value.get(self.buf))
    }

    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        let buf = self.buf;
        self.index
            .fields
            .iter()
            .map(move |f: &FieldSpan| (f.name.get(buf), f.value.get(buf)))
    }

    pub fn api_style(&self) -> ApiStyle {
        ApiStyle::for_path(self.path_only())
    }
}

/// A complete response. Bodies here are small (JSON answers and errors); streamed bodies
/// take another path.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra header fields (names lowercase). Allocates only when used.
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn error(err: ApiError, style: ApiStyle) -> Self {
        let mut body = Vec::with_capacity(160);
        err.write_body(style, &mut body);
        Self::json(err.status, body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Answers requests. One instance per worker, so implementations keep per-core state
/// without locks. A service answers through the [`Responder`], whole or streamed; one that
/// returns without answering gets a 500 sent for it.
pub trait Service {
    fn call(&self, req: &Request<'_>, resp: &mut Responder<'_>) -> impl Future<Output = ()>;
}
