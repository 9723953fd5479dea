//! What a connection hands to the code that answers requests, and what it gets back.
//!
//! A request reaches its [`Service`] in three steps, so that nothing is reserved for a
//! request before the service has looked at its head:
//!
//! 1. [`Service::head`]: the head is parsed, no body byte has been read and no
//!    `100 Continue` sent. The service creates its per-request context, authenticates, and
//!    either admits the body (with a reservation against the worker's body budget) or
//!    answers at once.
//! 2. [`Service::call`]: the body has arrived; the service answers through the
//!    [`Responder`], whole or streamed.
//! 3. [`Service::finish`]: once per request that reached step 1, whatever became of it
//!    (answered, refused, body not received), with what the connection saw.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use crate::errors::{ApiError, Family};
use crate::h1::{BodyFraming, FieldSpan, HeadIndex, Version};
use crate::server::request_id::RequestId;
use crate::server::respond::Responder;
use crate::server::worker::BodyBudget;

/// A parsed request head: offsets into the bytes it was read into. Borrowed for the duration
/// of [`Service::head`]; the same accessors exist on [`Request`].
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub id: RequestId,
    pub peer: SocketAddr,
    /// When the first byte of the head arrived.
    pub started: Instant,
    index: &'a HeadIndex,
    raw: &'a [u8],
    /// Method, path and query, and where the query starts (read once; asked for several
    /// times).
    method: &'a str,
    path: &'a str,
    query_at: usize,
}

impl<'a> Head<'a> {
    pub(crate) fn new(
        id: RequestId,
        peer: SocketAddr,
        started: Instant,
        index: &'a HeadIndex,
        raw: &'a [u8],
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
            method,
            path,
            query_at,
        }
    }

    /// The bytes the head was parsed from (the index's spans point into them).
    pub fn raw(&self) -> &'a [u8] {
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

    /// The announced body length, when the body has a Content-Length (chunked bodies
    /// announce none).
    pub fn content_length(&self) -> Option<u64> {
        match self.index.framing {
            BodyFraming::Length(n) => Some(n),
            BodyFraming::None => Some(0),
            BodyFraming::Chunked => None,
        }
    }

    /// The value of the first header named `name`, matched ignoring ASCII case. `name` is
    /// written in lowercase letters, digits and `-` (see [`crate::h1::name_eq`]).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.index
            .fields
            .iter()
            .find(|f| crate::h1::name_eq(f.name.get(self.raw), name.as_bytes()))
            .map(|f| f.value.get(self.raw))
    }

    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        let raw = self.raw;
        self.index
            .fields
            .iter()
            .map(move |f: &FieldSpan| (f.name.get(raw), f.value.get(raw)))
    }
}

/// One complete request: its head and its decoded body. The request owns its bytes, so a
/// service can give a large body back ([`Request::release_body`]) as soon as it no longer
/// needs it, instead of holding it for the life of a long stream.
#[derive(Debug)]
pub struct Request<'a> {
    id: RequestId,
    peer: SocketAddr,
    started: Instant,
    index: &'a HeadIndex,
    /// The head (and, for a Content-Length body, the body behind it).
    raw: Bytes,
    body: Bytes,
    /// The body's reservation against the worker's budget, given back with the body.
    budget: Option<BodyBudget>,
}

/// A request holding more than this gives its memory back when its body is released.
const RELEASE_ABOVE: usize = 16 * 1024;

impl<'a> Request<'a> {
    pub(crate) fn new(
        id: RequestId,
        peer: SocketAddr,
        started: Instant,
        index: &'a HeadIndex,
        raw: Bytes,
        body: Bytes,
        budget: BodyBudget,
    ) -> Self {
        Self {
            id,
            peer,
            started,
            index,
            raw,
            body,
            budget: Some(budget),
        }
    }

    /// The head, borrowed from this request.
    pub fn head(&self) -> Head<'_> {
        Head::new(self.id, self.peer, self.started, self.index, &self.raw)
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Drops the body: a large request's memory goes back at once, keeping only a copy of
    /// its head.
    pub fn release_body(&mut self) {
        self.body = Bytes::new();
        self.budget = None;
        if self.raw.len() > RELEASE_ABOVE {
            let head = &self.raw[..self.index.head_len.min(self.raw.len())];
            self.raw = Bytes::copy_from_slice(head);
        }
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

    /// An error in the shape of `family`'s API; `Retry-After` when the catalogue says the
    /// client may retry.
    pub fn error(err: &ApiError, family: Family) -> Self {
        let mut body = Vec::with_capacity(160);
        err.write_body(family, &mut body);
        let mut r = Self::json(err.status(), body);
        if err.code.final_answer() {
            r = r.with_header("x-should-retry", "false");
        }
        match err.code.retry_after() {
            Some(s) => r.with_header("retry-after", s.to_string()),
            None => r,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// What [`Service::head`] decided.
#[derive(Debug)]
pub enum Verdict<C> {
    /// Read the body (within this reservation), then [`Service::call`].
    Proceed(C, BodyBudget),
    /// Answer this without reading the body.
    Answer(C, Response),
}

/// What became of a request, as the connection saw it.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    /// The status sent (499 when the client left before any response).
    pub status: u16,
    /// Bytes of the request (head and body) read.
    pub bytes_in: usize,
    /// Bytes of the response written.
    pub bytes_out: usize,
    /// The error the connection answered on the service's behalf (a body that did not
    /// arrive, or arrived malformed).
    pub error: Option<crate::errors::Code>,
}

/// Answers requests. One instance per worker, so implementations keep per-core state
/// without locks.
pub trait Service: 'static {
    /// What the service keeps about one request, from its head to its end.
    type Ctx;

    /// Called once, on the worker's thread inside its runtime, before the first connection
    /// (for tasks of the service's own).
    fn start(self: &Rc<Self>) {}

    /// Called once when the worker stops, after its connections drained (or the drain
    /// deadline passed): hand over what must not be lost.
    fn stopped(&self) {}

    /// Decides on a request from its head alone (see the module docs).
    fn head(&self, head: &Head<'_>) -> Verdict<Self::Ctx>;

    /// Answers a request whose body has arrived. One that returns without answering gets a
    /// 500 sent for it.
    fn call(
        &self,
        ctx: &mut Self::Ctx,
        req: &mut Request<'_>,
        resp: &mut Responder<'_>,
    ) -> impl Future<Output = ()>;

    /// The request is over: once for every request [`Service::head`] saw.
    fn finish(&self, ctx: Self::Ctx, head: &Head<'_>, done: &Finished);
}
