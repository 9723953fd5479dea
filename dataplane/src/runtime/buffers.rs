//! Write buffers lent for one write instead of owned by a connection.
//!
//! An open stream spends nearly all its life waiting for its next event; a buffer it owned
//! for its response's writes, or its upstream connection owned for the request, would sit
//! idle all that time — kilobytes per open stream, thousands of streams per worker. Instead
//! a write takes a buffer from its worker's spares and gives it back once the kernel is done
//! with it, so a worker's buffers number its writes in flight, not its connections, and a
//! hot buffer is reused by the next write (last in, first out).
//!
//! Bounded: at most [`KEEP`] spares per worker thread, [`KEEP_BYTES`] in all, none larger
//! than [`KEEP_UP_TO`] (a buffer grown by one large write is freed).

use std::cell::RefCell;

/// Spare buffers a worker keeps.
const KEEP: usize = 32;
/// A buffer grown beyond this is not kept.
const KEEP_UP_TO: usize = 64 * 1024;
/// The spares' capacity in all.
const KEEP_BYTES: usize = 256 * 1024;
/// The capacity of a buffer made when no spare is left: a response head or a stream's
/// event fits, and so does a small request.
const FRESH: usize = 2 * 1024;

/// A thread's spare buffers and their capacity in all.
struct Spares {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

thread_local! {
    static SPARE: RefCell<Spares> = const {
        RefCell::new(Spares {
            bufs: Vec::new(),
            bytes: 0,
        })
    };
}

/// An empty buffer: a spare if this thread has one, else a new one.
pub fn take() -> Vec<u8> {
    SPARE
        .with(|s| {
            let mut s = s.borrow_mut();
            let buf = s.bufs.pop()?;
            s.bytes -= buf.capacity();
            Some(buf)
        })
        .unwrap_or_else(|| Vec::with_capacity(FRESH))
}

/// Gives `buf` back for the next write (cleared), unless it is large or enough are kept.
pub fn give(mut buf: Vec<u8>) {
    let cap = buf.capacity();
    if cap == 0 || cap > KEEP_UP_TO {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.bufs.len() < KEEP && s.bytes + cap <= KEEP_BYTES {
            s.bytes += cap;
            s.bufs.push(buf);
        }
    });
}

/// Makes `buf` a lent buffer if it holds none (capacity 0), so bytes can be added to it.
pub fn ensure(buf: &mut Vec<u8>) {
    if buf.capacity() == 0 {
        *buf = take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares() -> usize {
        SPARE.with(|s| s.borrow().bufs.len())
    }

    fn spare_bytes() -> usize {
        SPARE.with(|s| s.borrow().bytes)
    }

    #[test]
    fn buffers_come_back_cleared_and_the_spares_are_bounded() {
        while spares() > 0 {
            take();
        }
        let mut a = take();
        assert_eq!(a.capacity(), FRESH);
        a.extend_from_slice(b"abc");
        let ptr = a.as_ptr();
        give(a);
        assert_eq!(spares(), 1);
        let b = take();
        assert!(b.is_empty(), "a lent buffer comes back empty");
        assert_eq!(
            b.as_ptr(),
            ptr,
            "the last buffer given back is the next one lent"
        );
        assert_eq!(spares(), 0);

        give(Vec::with_capacity(KEEP_UP_TO + 1));
        give(Vec::new());
        assert_eq!(spares(), 0, "large and capacity-less buffers are not kept");

        for _ in 0..KEEP + 10 {
            give(Vec::with_capacity(16));
        }
        assert_eq!(spares(), KEEP, "no more than KEEP buffers");
        while spares() > 0 {
            take();
        }
        assert_eq!(spare_bytes(), 0);

        for _ in 0..KEEP {
            give(Vec::with_capacity(KEEP_UP_TO));
        }
        assert_eq!(spare_bytes(), KEEP_BYTES, "no more than KEEP_BYTES in all");
        assert_eq!(spares(), KEEP_BYTES / KEEP_UP_TO);
    }

    #[test]
    fn ensure_takes_a_buffer_only_when_it_has_none() {
        let mut buf = Vec::new();
        ensure(&mut buf);
        assert!(buf.capacity() >= FRESH);
        buf.extend_from_slice(b"xyz");
        let ptr = buf.as_ptr();
        ensure(&mut buf);
        assert_eq!(buf, b"xyz", "a buffer already held is kept as it is");
        give(std::mem::take(&mut buf));
        let again = take();
        assert_eq!(again.as_ptr(), ptr, "the buffer released is lent again");
    }
}
