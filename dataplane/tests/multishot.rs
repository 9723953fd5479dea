//! The multishot receive of the vendored monoio (`TcpStream::enable_multishot_recv`, see
//! `vendor/monoio/PATCHED.md`), over real sockets on an io_uring runtime: bytes arrive
//! whole and in order however they are read, a reader that stops reading still stops its
//! peer, an exhausted buffer ring falls back to single receives without losing a byte, a
//! dropped stream is really closed, and the epoll driver ignores the switch.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Socket options the standard library does not set (SO_LINGER, SO_RCVBUF, SO_SNDBUF).
#![allow(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncReadRentExt};
use monoio::net::{TcpListener, TcpStream};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

/// Byte `i` of every test stream: a pattern that shows a lost, repeated or reordered byte.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

fn uring<F: std::future::Future>(f: F) -> F::Output {
    RuntimeBuilder::<IoUringDriver>::new()
        .enable_timer()
        .build()
        .unwrap_or_else(|e| panic!("io_uring runtime (this suite needs io_uring): {e}"))
        .block_on(f)
}

/// Accepts one connection on `listener` with multishot receiving on.
async fn accept_multishot(listener: &TcpListener) -> TcpStream {
    let (mut s, _) = listener.accept().await.expect("accept");
    s.enable_multishot_recv();
    s
}

/// Waits for a peer thread while the runtime keeps running (a close, like every operation,
/// is submitted when the runtime next enters the kernel).
async fn join<T>(peer: std::thread::JoinHandle<T>) -> T {
    while !peer.is_finished() {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    peer.join().expect("peer")
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

/// Reads until EOF with reads of at most `chunk` bytes.
async fn read_to_end(s: &mut TcpStream, chunk: usize) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        let (res, buf) = s.read(Vec::with_capacity(chunk)).await;
        match res.expect("read") {
            0 => return all,
            n => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn small_reads_take_every_byte_in_order() {
    const LEN: usize = 300 * 1024;
    uring(async {
        let (l, addr) = listener();
        let peer = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            // Uneven writes, so received buffers split anywhere.
            let data = pattern_bytes(LEN);
            for piece in data.chunks(7001) {
                c.write_all(piece).expect("write");
            }
        });
        let mut s = accept_multishot(&l).await;
        // Reads smaller than a received buffer: each buffer is handed out in pieces.
        let got = read_to_end(&mut s, 1000).await;
        join(peer).await;
        assert_eq!(got.len(), LEN);
        assert!(
            got == pattern_bytes(LEN),
            "bytes lost, repeated or reordered"
        );
    });
}

#[test]
fn eof_and_a_reset_are_reported() {
    uring(async {
        let (l, addr) = listener();
        let peer = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.write_all(b"last words").expect("write");
            c.shutdown(Shutdown::Write).expect("shutdown");
            // Wait for the gateway side to close.
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let mut s = accept_multishot(&l).await;
        assert_eq!(read_to_end(&mut s, 4096).await, b"last words");
        // A read after EOF arms again and sees EOF again.
        let (res, _) = s.read(Vec::with_capacity(16)).await;
        assert_eq!(res.expect("read"), 0);
        drop(s);
        join(peer).await;

        // A reset peer: the read fails instead of hanging or reading as EOF.
        let peer = std::thread::spawn(move || {
            let c = std::net::TcpStream::connect(addr).expect("connect");
            std::thread::sleep(Duration::from_millis(100));
            // SO_LINGER 0: close sends RST.
            let c = socket_with_linger_zero(c);
            drop(c);
        });
        let mut s = accept_multishot(&l).await;
        let (res, _) = s.read(Vec::with_capacity(16)).await;
        join(peer).await;
        let e = res.expect_err("a reset is an error");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    });
}

fn set_buf(fd: std::os::fd::RawFd, opt: libc::c_int, bytes: libc::c_int) {
    // SAFETY: a valid socket and a correctly sized, initialised option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {opt}");
}

fn socket_with_linger_zero(c: std::net::TcpStream) -> std::net::TcpStream {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized, initialised option value.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    c
}

/// A reader that stops reading must still stop its peer: the armed receive takes only a few
/// buffers ahead, then TCP flow control holds the peer back.
#[test]
fn a_reader_that_stops_reading_stops_its_peer() {
    const LEN: usize = 8 * 1024 * 1024;
    uring(async {
        let (l, addr) = listener();
        let (tx, rx) = std::sync::mpsc::channel();
        let peer = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            set_buf(c.as_raw_fd(), libc::SO_SNDBUF, 64 * 1024);
            c.set_nonblocking(true).expect("nonblocking");
            let data = pattern_bytes(LEN);
            let mut sent = 0;
            let mut last_progress = Instant::now();
            // Write until the peer has been blocked for a while.
            while sent < LEN && last_progress.elapsed() < Duration::from_millis(300) {
                match c.write(&data[sent..]) {
                    Ok(n) => {
                        sent += n;
                        last_progress = Instant::now();
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
            tx.send(sent).expect("report");
            c.set_nonblocking(false).expect("blocking");
            c.write_all(&data[sent..]).expect("write the rest");
        });
        let mut s = accept_multishot(&l).await;
        // Fixed, small socket buffers (no autotuning), so that the bound is visible: what the
        // peer can write is the two socket buffers plus the few provided buffers the armed
        // receive may fill (4 × 16 KiB), not the whole ring (4 MiB).
        set_buf(s.as_raw_fd(), libc::SO_RCVBUF, 64 * 1024);
        // One read arms the receive; then nothing is read while the peer writes.
        let (res, first) = s.read(Vec::with_capacity(100)).await;
        let n = res.expect("first read");
        let blocked_at = loop {
            if let Ok(sent) = rx.try_recv() {
                break sent;
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        };
        // 64 KiB socket buffers count double in the kernel (bookkeeping): 256 KiB, plus
        // what the receive took ahead.
        assert!(
            blocked_at < 512 * 1024,
            "the peer wrote {blocked_at} bytes to a reader that did not read"
        );
        let mut got = first[..n].to_vec();
        got.extend(read_to_end(&mut s, 64 * 1024).await);
        join(peer).await;
        assert_eq!(got.len(), LEN);
        assert!(got == pattern_bytes(LEN), "bytes lost across the pause");
    });
}

/// More streams receive at once than the buffer ring holds: the ones left without a buffer
/// fall back to single receives, and every stream still reads exactly what was sent.
#[test]
fn an_exhausted_buffer_ring_loses_nothing() {
    const STREAMS: usize = 120;
    const LEN: usize = 256 * 1024;
    uring(async {
        let (l, addr) = listener();
        let peers: Vec<_> = (0..STREAMS)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = std::net::TcpStream::connect(addr).expect("connect");
                    c.write_all(&pattern_bytes(LEN)).expect("write");
                })
            })
            .collect();
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            let mut s = accept_multishot(&l).await;
            // Arm every stream's receive, then let data pile up in the ring.
            let (res, buf) = s.read(Vec::with_capacity(1)).await;
            assert_eq!(res.expect("first read"), 1);
            assert_eq!(buf[0], pattern(0));
            streams.push(s);
        }
        monoio::time::sleep(Duration::from_millis(200)).await;
        let mut reads = Vec::new();
        for mut s in streams {
            reads.push(monoio::spawn(async move {
                let rest = read_to_end(&mut s, 16 * 1024).await;
                (rest.len(), rest == pattern_bytes(LEN)[1..])
            }));
        }
        for r in reads {
            let (len, same) = r.await;
            assert_eq!(len, LEN - 1);
            assert!(same, "a stream's bytes were lost or reordered");
        }
        for p in peers {
            join(p).await;
        }
    });
}

/// Dropping a stream with an armed receive closes the socket (the peer sees EOF), and the
/// receive's buffers go back to the ring (later streams still receive).
#[test]
fn a_dropped_stream_is_closed() {
    uring(async {
        let (l, addr) = listener();
        for round in 0..300 {
            let peer = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                c.write_all(&pattern_bytes(40 * 1024)).expect("write");
                let mut rest = Vec::new();
                // EOF, not a timeout: the gateway side really closed.
                c.read_to_end(&mut rest)
                    .expect("EOF from the dropped stream");
            });
            let mut s = accept_multishot(&l).await;
            let (res, _) = s.read_exact(vec![0u8; 10]).await;
            res.unwrap_or_else(|e| panic!("round {round}: {e}"));
            // Unread buffers are queued on the armed receive when it is dropped.
            monoio::time::sleep(Duration::from_millis(1)).await;
            drop(s);
            join(peer).await;
        }
    });
}

#[test]
fn readv_is_refused_rather_than_reading_around_the_armed_receive() {
    uring(async {
        let (l, addr) = listener();
        let peer = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.write_all(b"abc").expect("write");
        });
        let mut s = accept_multishot(&l).await;
        let bufs = vec![vec![0u8; 8]];
        let (res, _) = s.readv(monoio::buf::VecBuf::from(bufs)).await;
        assert_eq!(res.expect_err("refused").kind(), ErrorKind::Unsupported);
        let (res, buf) = s.read(Vec::with_capacity(8)).await;
        assert_eq!(&buf[..res.expect("read")], b"abc");
        join(peer).await;
    });
}

#[test]
fn the_epoll_driver_ignores_the_switch() {
    RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("epoll runtime")
        .block_on(async {
            let (l, addr) = listener();
            let peer = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.write_all(&pattern_bytes(100_000)).expect("write");
            });
            let mut s = accept_multishot(&l).await;
            let got = read_to_end(&mut s, 3000).await;
            join(peer).await;
            assert!(got == pattern_bytes(100_000));
        });
}
