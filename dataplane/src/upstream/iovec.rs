//! Owned buffers for vectored writes.
//!
//! io_uring needs the memory of a write to stay put and alive until the kernel is done with
//! it, so a write takes its buffers by value. [`IoVecs`] owns the pieces of a message as
//! `Bytes` (for a large request: the built head, and the body as the client sent it or as
//! re-serialised), keeps the `iovec` table that points into them, and is handed to
//! `writev` whole: a large body goes upstream without being copied.

#![allow(unsafe_code)]

use bytes::Bytes;
use monoio::buf::IoVecBuf;

#[derive(Debug, Default)]
pub struct IoVecs {
    parts: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    first: usize,
}

impl IoVecs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` pieces before any reallocation.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            parts: Vec::with_capacity(n),
            iov: Vec::with_capacity(n),
            first: 0,
        }
    }

    /// Appends a piece. Empty pieces are skipped.
    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.iov.push(libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        });
        self.parts.push(b);
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.iov[self.first..].iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// Marks `n` more bytes as written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                v.iov_len = 0;
                self.first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same `Bytes`.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

// SAFETY: the iovecs point into `Bytes` owned by `self.parts`; `Bytes` never moves or frees
// its memory while a handle to it exists, and `parts` is not touched while the runtime owns
// the value (the write takes `self` by value). The pointer and length describe
// `self.iov[self.first..]`, all initialised entries.
unsafe impl IoVecBuf for IoVecs {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_through_pieces() {
        let mut v = IoVecs::new();
        v.push(Bytes::from_static(b"hello "));
        v.push(Bytes::new());
        v.push(Bytes::from_static(b"wide "));
        v.push(Bytes::from_static(b"world"));
        assert_eq!(v.remaining(), 16);
        v.advance(8);
        assert_eq!(v.remaining(), 8);
        assert_eq!(v.read_iovec_len(), 2);
        // SAFETY: the first iovec points into a live piece of `v`.
        let first = unsafe {
            let iov = &*v.read_iovec_ptr();
            std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
        };
        assert_eq!(first, b"de ");
        v.advance(8);
        assert!(v.is_empty());
    }
}
