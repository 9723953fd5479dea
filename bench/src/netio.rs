//! Socket helpers shared by the streaming mock provider and the streaming load client, both
//! single-threaded monoio runtimes built the way the data plane builds its workers'.

use std::io;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use dataplane::config::DriverChoice;
use dataplane::runtime::{DriverKind, WorkerRuntime};

/// A runtime for the calling thread: io_uring where the kernel allows it, else epoll.
pub(crate) fn runtime() -> anyhow::Result<(WorkerRuntime, DriverKind)> {
    Ok(dataplane::runtime::build(DriverChoice::Auto)?)
}

/// One socket and the bytes read from it but not consumed yet.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, capacity: usize) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            buf: Vec::with_capacity(capacity),
        }
    }

    /// Reads once, appending to `buf` (with at least `min_free` bytes of room); `Ok(0)` at
    /// end of stream.
    pub(crate) async fn fill(&mut self, min_free: usize) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() - buf.len() < min_free {
            buf.reserve(min_free);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Writes all of `out` and hands the buffer back for reuse.
    pub(crate) async fn write<B: monoio::buf::IoBuf + 'static>(&mut self, out: B) -> io::Result<B> {
        let (res, out) = self.stream.write_all(out).await;
        res.map(|_| out)
    }
}
