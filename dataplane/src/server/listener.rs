//! Listening sockets: one per worker on the same address with SO_REUSEPORT, so the kernel
//! spreads connections over the cores without a shared accept queue.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `count` sockets to `addr`. When `addr` has port 0 the first socket picks the port
/// and the others join it, so every worker serves the same port. An address another process
/// already listens on is refused, SO_REUSEPORT or not: two gateways never share a port
/// (the kernel would spread connections over both).
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> io::Result<Vec<TcpListener>> {
    if addr.port() != 0 {
        // A plain bind fails while anything listens there, a SO_REUSEPORT group included.
        // Released at once, before the workers bind: what remains is a start racing ours.
        drop(probe(addr)?);
    }
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let l = bind_one(addr, backlog, true)?;
        if addr.port() == 0 {
            addr = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

/// One plain listening socket (the admin listener).
pub fn bind_single(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    bind_one(addr, backlog, false)
}

fn probe(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!("bind {addr}: another process already listens on this address (another gateway?); stop it or choose another server.listen"),
            )
        } else {
            io::Error::new(e.kind(), format!("bind {addr}: {e}"))
        }
    })?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Dual-stack where the system allows it; an IPv6-only system keeps v6 only.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second gateway on an address one already serves is refused, though both would
    /// bind with SO_REUSEPORT.
    #[test]
    fn an_address_already_served_is_refused() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap(), 2, 16).expect("first");
        let addr = first[0].local_addr().unwrap();
        let e = bind_reuseport(addr, 2, 16).expect_err("a second group on the same port");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains("another process already listens"),
            "{e}"
        );
        drop(first);
        // Free again: it binds.
        bind_reuseport(addr, 2, 16).expect("the address is free");
    }
}
