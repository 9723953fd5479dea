//! Noticing a client that went away while its request waits on an upstream.
//!
//! While nothing is being sent to a client, its close is invisible: a non-streamed request to
//! a reasoning model may wait minutes for the upstream's first byte, holding an upstream
//! connection and, at the provider, generating (and billing) an answer nobody will read.
//! Once a request has waited a while, its client's socket is polled once a second for a
//! hang-up (`POLLRDHUP`: the peer's FIN, seen even behind pipelined bytes not yet read, or
//! a reset). nginx likewise stops the upstream request when its client closes
//! (`proxy_ignore_client_abort off`).

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::server::stream::ClientStream;

/// How often a waiting request's client is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether the peer of `fd` has closed (or reset) its connection. One non-blocking `poll`.
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call, and `fd` is the open
    // socket of a `ClientStream` the caller borrows; a timeout of 0 never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Resolves once the client has closed or reset its connection, looking `after` from now
/// (requests answered sooner cost one coarse deadline) and then every second.
pub(crate) async fn closed(stream: &ClientStream, after: Duration) {
    let mut wait = after;
    loop {
        crate::runtime::deadline::sleep(wait).await;
        if hung_up(stream.as_raw_fd()) {
            return;
        }
        wait = CHECK_EVERY;
    }
}
