//! Per-key rate limits, exact within a node and without locks on the request path: each
//! limited key has a pair of GCRA cells (the generic cell rate algorithm: one atomic
//! "theoretical arrival time" each) shared by every worker, updated by compare-and-swap.
//!
//! A limit of N per minute admits a burst of N, then one every 60/N seconds. Requests are
//! counted when admitted; tokens when the response ends (a request is admitted while the
//! key has room for at least one token, and its tokens are then charged in full, so a key
//! over its token budget waits until the budget has refilled).
//!
//! A sub-account's limits have cells of their own, shared by every key below it.
//!
//! Between nodes, each minute of a limit is leased by the control plane (see the gateway's
//! rate-limit phase).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use rustc_hash::FxHashMap;

const MINUTE_NS: u64 = 60_000_000_000;

/// Nanoseconds on a clock that starts with the process (never 0).
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `t` on [`now_ns`]'s clock (an instant before the clock's start counts as its start).
pub fn ns_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(*epoch).as_nanos()).unwrap_or(u64::MAX) + 1
}

/// One GCRA cell.
#[derive(Debug, Default)]
pub struct Cell {
    tat: AtomicU64,
}

/// An admission: what is left of the limit, and when it is whole again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub limit: u64,
    pub remaining: u64,
    /// Nanoseconds until the limit is whole again.
    pub reset_ns: u64,
}

/// A refusal: how long until there is room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub limit: u64,
    pub retry_after_ns: u64,
}

impl Cell {
    fn interval(per_minute: u64) -> u64 {
        (MINUTE_NS / per_minute.max(1)).max(1)
    }

    /// Takes `cost` units at `per_minute` if they fit now.
    pub fn take(&self, per_minute: u64, cost: u64, now: u64) -> Result<Room, Full> {
        let t = Self::interval(per_minute);
        let mut old = self.tat.load(Ordering::Acquire);
        loop {
            let new = old.max(now).saturating_add(t.saturating_mul(cost));
            let ahead = new - now;
            if ahead > MINUTE_NS {
                return Err(Full {
                    limit: per_minute,
                    retry_after_ns: ahead - MINUTE_NS,
                });
            }
            match self
                .tat
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Room {
                        limit: per_minute,
                        remaining: (MINUTE_NS - ahead) / t,
                        reset_ns: ahead,
                    })
                }
                Err(actual) => old = actual,
            }
        }
    }

    /// Whether one unit would fit now (nothing taken).
    pub fn peek(&self, per_minute: u64, now: u64) -> Result<Room, Full> {
        let t = Self::interval(per_minute);
        let ahead = self.tat.load(Ordering::Acquire).max(now) - now;
        if ahead + t > MINUTE_NS {
            return Err(Full {
                limit: per_minute,
                retry_after_ns: ahead + t - MINUTE_NS,
            });
        }
        Ok(Room {
            limit: per_minute,
            remaining: (MINUTE_NS - ahead) / t,
            reset_ns: ahead,
        })
    }

    /// Gives back `cost` units taken (a request refused at another level).
    pub fn give_back(&self, per_minute: u64, cost: u64) {
        let t = Self::interval(per_minute);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(old.saturating_sub(t.saturating_mul(cost)))
            });
    }

    /// Charges `cost` units, whether or not they fit.
    pub fn charge(&self, per_minute: u64, cost: u64, now: u64) {
        let t = Self::interval(per_minute);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(old.max(now).saturating_add(t.saturating_mul(cost)))
            });
    }
}

/// A key's cells.
#[derive(Debug, Default)]
pub struct KeyLimiter {
    pub requests: Cell,
    pub tokens: Cell,
}

/// Every limited key's cells on this node (workers cache what they use).
#[derive(Debug, Default)]
pub struct Limiters {
    map: RwLock<FxHashMap<Box<str>, Arc<KeyLimiter>>>,
}

impl Limiters {
    pub fn get(&self, key_id: &str) -> Arc<KeyLimiter> {
        if let Some(l) = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
        {
            return Arc::clone(l);
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(key_id.into()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_the_limit_then_one_per_interval() {
        let c = Cell::default();
        let now = 1_000;
        for i in 0..3 {
            let room = c.take(3, 1, now).expect("within the burst");
            assert_eq!(room.remaining, 2 - i);
        }
        let full = c.take(3, 1, now).expect_err("over");
        assert_eq!(full.retry_after_ns, 20_000_000_000);
        assert!(c.take(3, 1, now + 19_999_999_999).is_err());
        assert!(c.take(3, 1, now + 20_000_000_000).is_ok());
        // Tokens: admitted while one fits, then charged in full.
        let t = Cell::default();
        assert!(t.peek(100, now).is_ok());
        t.charge(100, 250, now);
        let full = t.peek(100, now).expect_err("over budget");
        assert_eq!(full.retry_after_ns, 151 * 600_000_000);
    }

    #[test]
    fn what_is_given_back_can_be_taken_again() {
        let c = Cell::default();
        let now = 1_000;
        for _ in 0..3 {
            c.take(3, 1, now).expect("within the burst");
        }
        assert!(c.take(3, 1, now).is_err());
        c.give_back(3, 1);
        assert_eq!(c.take(3, 1, now).expect("given back").remaining, 0);
        assert!(c.take(3, 1, now).is_err());
    }

    #[test]
    fn concurrent_takes_admit_exactly_the_limit() {
        let c = Arc::new(Cell::default());
        let now = 5;
        let admitted: u64 = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    (0..1000).filter(|_| c.take(1000, 1, now).is_ok()).count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .sum();
        assert_eq!(admitted, 1000);
    }
}
