//! One connection to an upstream, plain or TLS, with the read buffer that belongs to it.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::dns::DnsCache;
use super::Upstream;
use crate::iovec::IoVecs;

const READ_BUF: usize = 16 * 1024;

enum Io {
    Plain(TcpStream),
    Tls(Box<monoio_rustls::ClientTlsStream<TcpStream>>),
}

/// Requests up to this size are sent from one buffer (see `write_all`); larger ones, such as
/// bodies with base64 media, go out with `writev` without being copied.
const FLATTEN_UP_TO: usize = 16 * 1024;

/// Copies `parts` into `scratch` and writes it whole, bounded by `idle` for the whole write
/// (`TimedOut` past it); `scratch` keeps its capacity for the next request.
async fn write_flat<S: AsyncWriteRent>(
    s: &mut S,
    scratch: &mut Vec<u8>,
    parts: &IoVecs,
    idle: Duration,
) -> io::Result<()> {
    let mut flat = std::mem::take(scratch);
    flat.clear();
    parts.flatten_into(&mut flat);
    let write = async {
        let (res, mut back) = s.write_all(flat).await;
        back.clear();
        (res, back)
    };
    let (res, back) = crate::deadline::timeout(idle, write)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
    *scratch = back;
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
    scratch: Vec<u8>,
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
            buf: BytesMut::with_capacity(READ_BUF),
            idle_since_ms: crate::deadline::coarse_now_ms(),
            uses: 0,
            scratch: Vec::new(),
        })
    }

    /// Writes all of `parts`: flattened into one buffer for a request of at most
    /// [`FLATTEN_UP_TO`] bytes and for TLS (which encrypts into its own buffer anyway), else
    /// one `writev` per round trip. An upstream that takes nothing for `idle` (per `writev`;
    /// for a flattened request, for the whole of it) fails it with `TimedOut`, and the
    /// connection must then be dropped.
    pub async fn write_all(&mut self, mut parts: IoVecs, idle: Duration) -> io::Result<()> {
        let timed_out = |_| io::Error::from(io::ErrorKind::TimedOut);
        match &mut self.io {
            // A small request is copied into one buffer and sent with `send`: cheaper in the
            // kernel than importing an iovec for `writev`.
            Io::Plain(s) if parts.remaining() <= FLATTEN_UP_TO => {
                write_flat(s, &mut self.scratch, &parts, idle).await
            }
            Io::Plain(s) => {
                while !parts.is_empty() {
                    let (res, back) = crate::deadline::timeout(idle, s.writev(parts))
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
                write_flat(&mut **s, &mut self.scratch, &parts, idle).await?;
                crate::deadline::timeout(idle, s.flush())
                    .await
                    .map_err(timed_out)?
            }
        }
    }

    /// One read into the free space of `self.buf`, bounded by `timeout`. After a timeout the
    /// connection must be dropped (the cancelled read may still complete).
    pub async fn read(&mut self, timeout: Duration) -> Read {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(READ_BUF);
        }
        let owned = std::mem::take(&mut self.buf);
        let len = owned.len();
        let cap = owned.capacity();
        let slice = owned.slice_mut(len..cap);
        let result = match &mut self.io {
            Io::Plain(s) => crate::deadline::timeout(timeout, s.read(slice)).await,
            Io::Tls(s) => crate::deadline::timeout(timeout, s.read(slice)).await,
        };
        match result {
            Ok((res, slice)) => {
                self.buf = slice.into_inner();
                match res {
                    Ok(0) => Read::Eof,
                    Ok(_) => Read::Data,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Read::Data,
                    Err(e) => Read::Failed(e),
                }
            }
            Err(_) => Read::TimedOut,
        }
    }
}
