//! One connection to an upstream, plain or TLS, with the read buffer that belongs to it.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::dns::DnsCache;
use super::Upstream;
use crate::body::Pieces;
use crate::upstream::iovec::IoVecs;

/// A connection's first reads are this size: a stream's events are small, and each open
/// stream keeps its buffer for its whole life.
const READ_BUF_MIN: usize = 2 * 1024;
/// Reads grow (doubling each time one fills the space it was given) up to this size, for
/// large answers.
const READ_BUF_MAX: usize = 64 * 1024;
/// Reads of an event stream grow to this size at most ([`UpConn::bound_reads`]): events are
/// small, and a provider that outruns a slow client must not grow what each stalled stream
/// holds.
pub const STREAM_READ_MAX: usize = 8 * 1024;

enum Io {
    Plain(TcpStream),
    Tls(Box<monoio_rustls::ClientTlsStream<TcpStream>>),
}

/// A request whose body is at most this size is sent from one buffer (see `send_request`);
/// larger bodies, such as base64 media, go out with `writev`, uncopied.
const FLATTEN_UP_TO: usize = 16 * 1024;

/// Writes `flat` whole, bounded by `idle` for the whole write (`TimedOut` past it); the
/// buffer then goes back to the worker's spares ([`crate::runtime::buffers`]) for the next
/// request: a connection holds no send buffer while its response streams.
async fn write_flat<S: AsyncWriteRent>(s: &mut S, flat: Vec<u8>, idle: Duration) -> io::Result<()> {
    let (res, back) = crate::runtime::deadline::timeout(idle, s.write_all(flat))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
    crate::runtime::buffers::give(back);
    res.map(|_| ())
}

/// A live connection. Dropping it closes it.
pub struct UpConn {
    io: Io,
    /// Bytes read and not yet consumed.
    pub buf: BytesMut,
    /// When it went back to the pool, on the coarse clock (a tick is a few milliseconds;
    /// idle timeouts are far longer).
    pub idle_since_ms: u64,
    /// Requests sent on this connection so far.
    pub uses: u32,
    /// The space reads are given.
    space: ReadSpace,
}

/// The space a connection's reads are given: [`READ_BUF_MIN`] at first, doubling each time
/// a read fills what it was given, up to a bound ([`READ_BUF_MAX`], or less for the response
/// under way: [`UpConn::bound_reads`]).
#[derive(Debug, Clone, Copy)]
struct ReadSpace {
    size: usize,
    max: usize,
}

impl ReadSpace {
    const fn new() -> Self {
        Self {
            size: READ_BUF_MIN,
            max: READ_BUF_MAX,
        }
    }

    /// Makes room in `buf` for the next read.
    fn prepare(&self, buf: &mut BytesMut) {
        if buf.capacity() - buf.len() < self.size / 2 {
            buf.reserve(self.size);
        }
    }

    /// A read of `n` bytes into `offered` bytes of space.
    fn read(&mut self, n: usize, offered: usize) {
        if n == offered {
            self.size = (self.size * 2).min(self.max);
        }
    }

    /// Bounds reads to `max`, giving back read space in `buf` above it.
    fn bound(&mut self, max: usize, buf: &mut BytesMut) {
        self.max = max;
        self.size = self.size.min(max);
        if buf.capacity() > 2 * max.max(buf.len()) {
            let mut fresh = BytesMut::with_capacity(self.size.max(buf.len()));
            fresh.extend_from_slice(buf);
            *buf = fresh;
        }
    }
}

impl std::fmt::Debug for UpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.io {
            Io::Plain(_) => "plain",
            Io::Tls(_) => "tls",
        };
        f.debug_struct("UpConn")
            .field("io", &kind)
            .field("uses", &self.uses)
            .finish()
    }
}

/// Why a connection could not be opened. Nothing was sent, so failing over is safe.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("resolving {0}: {1}")]
    Resolve(String, io::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(String, String),
    #[error("connecting to {0}: timed out")]
    Timeout(String),
}

/// Outcome of one read.
#[derive(Debug)]
pub enum Read {
    Data,
    Eof,
    TimedOut,
    Failed(io::Error),
}

impl UpConn {
    /// Resolves, connects and (for https) handshakes, all within the connect timeout.
    pub async fn connect(up: &Upstream, dns: &DnsCache) -> Result<Self, ConnectError> {
        match monoio::time::timeout(up.connect_timeout, Self::connect_inner(up, dns)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(up.name.clone())),
        }
    }

    async fn connect_inner(up: &Upstream, dns: &DnsCache) -> Result<Self, ConnectError> {
        let addrs = dns
            .resolve(&up.url.host, up.url.port)
            .await
            .map_err(|e| ConnectError::Resolve(up.url.host.clone(), e))?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_addr(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            ConnectError::Connect(
                up.name.clone(),
                last.unwrap_or_else(|| io::ErrorKind::NotFound.into()),
            )
        })?;
        let _ = stream.set_nodelay(true);
        let io = match &up.tls {
            None => Io::Plain(stream),
            Some(tls) => {
                let s = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| ConnectError::Tls(up.name.clone(), e.to_string()))?;
                Io::Tls(Box::new(s))
            }
        };
        Ok(Self {
            io,
            buf: BytesMut::with_capacity(READ_BUF_MIN),
            idle_since_ms: crate::runtime::deadline::coarse_now_ms(),
            uses: 0,
            space: ReadSpace::new(),
        })
    }

    /// How many of the body's bytes [`Self::send_request`] copies in behind the head (the
    /// rest it sends as they are): the whole of a small body on a plain connection (one
    /// `send` is cheaper in the kernel than importing an iovec for `writev`), the small
    /// pieces of any body over TLS (which encrypts into records of its own anyway), nothing
    /// of a large body on a plain connection (`writev`).
    pub fn copied_len(&self, body: &Pieces) -> usize {
        match self.io {
            Io::Plain(_) if body.len() <= FLATTEN_UP_TO => body.len(),
            Io::Plain(_) => 0,
            Io::Tls(_) => body
                .parts()
                .iter()
                .filter(|p| p.len() <= FLATTEN_UP_TO)
                .map(|p| p.len())
                .sum(),
        }
    }

    /// Sends a request: `head` (a buffer from [`crate::runtime::buffers::take`]) then
    /// `body`, copied behind the head as [`Self::copied_len`] says, else uncopied: with one
    /// `writev` per round trip on a plain connection, one write per large piece over TLS.
    /// An upstream that takes nothing for `idle` (per write) fails it with `TimedOut`, and
    /// the connection must then be dropped.
    pub async fn send_request(
        &mut self,
        mut head: Vec<u8>,
        body: &Pieces,
        idle: Duration,
    ) -> io::Result<()> {
        let timed_out = |_| io::Error::from(io::ErrorKind::TimedOut);
        self.space.max = READ_BUF_MAX;
        match &mut self.io {
            Io::Plain(s) if body.len() <= FLATTEN_UP_TO => {
                for p in body.parts() {
                    head.extend_from_slice(p);
                }
                write_flat(s, head, idle).await
            }
            Io::Plain(s) => {
                let mut parts = IoVecs::with_capacity(1 + body.parts().len());
                parts.push(Bytes::from(head));
                for p in body.parts() {
                    parts.push(p.clone());
                }
                while !parts.is_empty() {
                    let (res, back) = crate::runtime::deadline::timeout(idle, s.writev(parts))
                        .await
                        .map_err(timed_out)?;
                    parts = back;
                    match res {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => parts.advance(n),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Io::Tls(s) => {
                let mut flat = head;
                for p in body.parts() {
                    if p.len() <= FLATTEN_UP_TO {
                        flat.extend_from_slice(p);
                        continue;
                    }
                    write_flat(&mut **s, flat, idle).await?;
                    flat = crate::runtime::buffers::take();
                    let (res, _) = crate::runtime::deadline::timeout(idle, s.write_all(p.clone()))
                        .await
                        .map_err(timed_out)?;
                    res?;
                }
                if flat.is_empty() {
                    crate::runtime::buffers::give(flat);
                } else {
                    write_flat(&mut **s, flat, idle).await?;
                }
                crate::runtime::deadline::timeout(idle, s.flush())
                    .await
                    .map_err(timed_out)?
            }
        }
    }

    /// Bounds the reads of the rest of this response (the next request lifts the bound) to
    /// `max` bytes, giving back read space above it: what a stream whose client stopped
    /// reading holds stays small however fast the provider writes.
    pub fn bound_reads(&mut self, max: usize) {
        self.space.bound(max, &mut self.buf);
    }

    /// One read into the free space of `self.buf`, bounded by `timeout`. After a timeout the
    /// connection must be dropped (the cancelled read may still complete).
    pub async fn read(&mut self, timeout: Duration) -> Read {
        self.space.prepare(&mut self.buf);
        let owned = std::mem::take(&mut self.buf);
        let len = owned.len();
        let cap = owned.capacity();
        let offered = cap - len;
        let slice = owned.slice_mut(len..cap);
        let result = match &mut self.io {
            Io::Plain(s) => crate::runtime::deadline::timeout(timeout, s.read(slice)).await,
            Io::Tls(s) => crate::runtime::deadline::timeout(timeout, s.read(slice)).await,
        };
        match result {
            Ok((res, slice)) => {
                self.buf = slice.into_inner();
                match res {
                    Ok(0) => Read::Eof,
                    Ok(n) => {
                        self.space.read(n, offered);
                        Read::Data
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Read::Data,
                    Err(e) => Read::Failed(e),
                }
            }
            Err(_) => Read::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use monoio::io::AsyncReadRentExt;
    use monoio::net::TcpListener;

    /// Reads as a provider that outruns its reader would fill them: every read fills its
    /// space; what is read is consumed (relayed) before the next read, but `left` bytes of
    /// a partial event stay behind.
    fn fill(space: &mut ReadSpace, buf: &mut BytesMut, reads: usize, left: usize) -> usize {
        let mut most = 0;
        for _ in 0..reads {
            space.prepare(buf);
            let offered = buf.capacity() - buf.len();
            buf.resize(buf.capacity(), b'x');
            space.read(offered, offered);
            most = most.max(buf.capacity());
            let keep = left.min(buf.len());
            buf.advance(buf.len() - keep);
        }
        most
    }

    #[test]
    fn read_space_doubles_to_its_bound_and_a_stream_bound_gives_space_back() {
        let mut space = ReadSpace::new();
        let mut buf = BytesMut::with_capacity(READ_BUF_MIN);
        let most = fill(&mut space, &mut buf, 20, 0);
        assert_eq!(
            space.size, READ_BUF_MAX,
            "reads that fill grow to the bound"
        );
        assert!(most <= 2 * READ_BUF_MAX, "{most}");
        assert!(most >= READ_BUF_MAX, "{most}");

        // An event stream's response: 100 bytes of a partial event wait for more.
        buf.extend_from_slice(&[b'e'; 100]);
        space.bound(STREAM_READ_MAX, &mut buf);
        assert!(buf.capacity() <= STREAM_READ_MAX, "{}", buf.capacity());
        assert_eq!(&buf[..], &[b'e'; 100][..], "the pending bytes are kept");
        let most = fill(&mut space, &mut buf, 50, 300);
        assert!(
            most <= 2 * STREAM_READ_MAX,
            "stream reads stay bounded: {most}"
        );
        assert_eq!(space.size, STREAM_READ_MAX);
    }

    #[test]
    fn the_send_buffer_goes_back_to_the_spares_after_the_write() {
        let mut rt = crate::runtime::for_tests();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut client = TcpStream::connect_addr(addr).await.expect("connect");
            let (mut server, _) = listener.accept().await.expect("accept");
            let idle = Duration::from_secs(5);

            let mut flat = crate::runtime::buffers::take();
            flat.extend_from_slice(&[b'x'; 1000]);
            let lent = flat.as_ptr();
            let read = async {
                let (res, got) = server.read_exact(vec![0u8; 1000]).await;
                res.expect("read");
                got
            };
            let (sent, got) = monoio::join!(write_flat(&mut client, flat, idle), read);
            sent.expect("write");
            assert_eq!(got, vec![b'x'; 1000], "the whole request arrived");
            let next = crate::runtime::buffers::take();
            assert!(next.is_empty());
            assert_eq!(next.as_ptr(), lent, "the next request reuses the buffer");
        });
    }
}
