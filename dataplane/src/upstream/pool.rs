//! Per-worker keep-alive pools, one per upstream, with a cap on connections per upstream.
//!
//! Each worker owns its pools outright (no locks): connections are reused LIFO so the
//! warmest one goes first, dropped after the upstream's idle timeout, and never more than
//! `max_connections` exist (in use plus idle) per upstream per worker; a request that finds
//! the cap reached waits, up to the connect timeout, for one to come back.

use std::cell::RefCell;
use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use super::conn::{ConnectError, UpConn};
use super::dns::DnsCache;
use super::Upstream;

#[derive(Default)]
struct Slot {
    idle: Vec<UpConn>,
    in_use: usize,
    waiters: VecDeque<Waker>,
}

#[derive(Default)]
struct Inner {
    /// Keyed by [`Upstream::uid`]: a reload builds new upstreams, so connections made under
    /// an old configuration are never handed out under a new one. The ids are the process's
    /// own, so a fast non-keyed hash is enough.
    slots: FxHashMap<u64, Slot>,
}

/// A worker's pools.
#[derive(Default)]
pub struct Pool {
    inner: Rc<RefCell<Inner>>,
    pub dns: DnsCache,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("upstreams", &self.inner.borrow().slots.len())
            .finish()
    }
}

/// A connection lent out by the pool. Return it with [`Pool::checkin`] when it may carry
/// another request; dropping it closes it and frees its place.
#[derive(Debug)]
pub struct Lease {
    pub conn: UpConn,
    /// Taken from the idle list (it may turn out stale) rather than freshly connected.
    pub reused: bool,
    permit: Permit,
}

struct Permit {
    inner: Rc<RefCell<Inner>>,
    key: u64,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.inner.borrow_mut();
        if let Some(slot) = inner.slots.get_mut(&self.key) {
            slot.in_use = slot.in_use.saturating_sub(1);
            if let Some(w) = slot.waiters.pop_front() {
                w.wake();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}: connection limit reached and none freed in time")]
    Exhausted(String),
}

fn key(up: &Upstream) -> u64 {
    up.uid
}

impl Pool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A pooled connection if a fresh-enough one is idle, else a new one.
    pub async fn checkout(&self, up: &Arc<Upstream>) -> Result<Lease, CheckoutError> {
        let k = key(up);
        let wait = async {
            poll_fn(|cx| {
                let mut inner = self.inner.borrow_mut();
                let slot = inner.slots.entry(k).or_default();
                while let Some(conn) = slot.idle.pop() {
                    let idle_ms = crate::runtime::deadline::coarse_now_ms()
                        .saturating_sub(conn.idle_since_ms);
                    if u128::from(idle_ms) < up.pool_idle_timeout.as_millis() {
                        slot.in_use += 1;
                        return Poll::Ready(Some(conn));
                    }
                }
                if slot.in_use < up.max_connections {
                    slot.in_use += 1;
                    return Poll::Ready(None);
                }
                slot.waiters.push_back(cx.waker().clone());
                Poll::Pending
            })
            .await
        };
        let got = crate::runtime::deadline::timeout(up.connect_timeout, wait)
            .await
            .map_err(|_| CheckoutError::Exhausted(up.name.clone()))?;
        let permit = Permit {
            inner: Rc::clone(&self.inner),
            key: k,
        };
        match got {
            Some(conn) => Ok(Lease {
                conn,
                reused: true,
                permit,
            }),
            None => {
                // On failure the permit drops here and frees the place. Connecting is the
                // rare path and its future is large (resolve, connect, TLS handshake): boxed,
                // it does not grow the checkout future that every request moves.
                let conn = Box::pin(UpConn::connect(up, &self.dns)).await?;
                Ok(Lease {
                    conn,
                    reused: false,
                    permit,
                })
            }
        }
    }

    /// Returns a connection that finished a response cleanly and may be reused.
    pub fn checkin(&self, up: &Arc<Upstream>, mut lease: Lease) {
        lease.conn.idle_since_ms = crate::runtime::deadline::coarse_now_ms();
        let mut inner = self.inner.borrow_mut();
        if let Some(slot) = inner.slots.get_mut(&key(up)) {
            slot.idle.push(lease.conn);
        }
        // (A slot kept only for accounting after a reload is cleared by the next `retain`.)
        drop(inner);
        // The permit's drop decrements `in_use` and wakes a waiter, who finds the idle one.
        drop(lease.permit);
    }

    /// Closes the idle connections of upstreams that are no longer configured; their slots
    /// go once the last connection in use comes back.
    pub fn retain<'a>(&self, live: impl IntoIterator<Item = &'a Arc<Upstream>>) {
        let keep: std::collections::HashSet<u64> = live.into_iter().map(|u| key(u)).collect();
        let mut inner = self.inner.borrow_mut();
        inner.slots.retain(|k, slot| {
            if keep.contains(k) {
                return true;
            }
            slot.idle.clear();
            slot.in_use > 0
        });
    }
}
