//! Rate limits shared between nodes: for every UTC minute, the control plane leases parts of
//! a limiter's requests and tokens to the nodes that ask, and never more of a minute than
//! the limit to all of them together.
//!
//! The book is held in memory: a minute's leases matter for a minute. A control plane that
//! restarts forgets what it leased in the minute it restarted in, so in that one minute a
//! limit can admit up to twice its rate across nodes; no other minute is affected.

use std::collections::HashMap;
use std::sync::Mutex;

use aigw_wire::spend::rate_lease::{self, Unit};

use crate::store::{NodeScope, Store, StoreError};

/// What has been leased of one limit in one minute.
#[derive(Debug, Default)]
struct Minute {
    total: u64,
    by_node: HashMap<String, u64>,
}

/// Every rate lease of the current and the previous minute.
#[derive(Debug, Default)]
pub struct RateLeases {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    minutes: HashMap<(String, u64), Minute>,
    /// The minute the book was last pruned in.
    pruned: u64,
}

fn current_minute() -> u64 {
    rate_lease::minute(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

impl RateLeases {
    /// Leases up to `want` of the limit `lease_id` names for `minute` to `node`: what is
    /// left of the limit after every lease of that minute, at most. Returns what was granted
    /// and whether nothing is left. A limiter out of the node's scope, one without that
    /// limit, or a minute other than the current one (give or take one, for clocks near a
    /// boundary) gets nothing.
    pub fn lease(
        &self,
        store: &Store,
        node: &str,
        scope: &NodeScope,
        lease_id: &str,
        minute: u64,
        want: u64,
    ) -> Result<(u64, bool), StoreError> {
        let Some((unit, limiter)) = rate_lease::parse(lease_id) else {
            return Ok((0, true));
        };
        let Some((tenant, limits)) = store.limiter_limits(limiter)? else {
            return Ok((0, true));
        };
        let limit = match unit {
            Unit::Requests => limits.requests_per_minute,
            Unit::Tokens => limits.tokens_per_minute,
        };
        if !scope.covers_tenant(&tenant) || limit == 0 {
            return Ok((0, true));
        }
        Ok(self.grant(node, lease_id, minute, current_minute(), limit, want))
    }

    fn grant(
        &self,
        node: &str,
        lease_id: &str,
        minute: u64,
        now: u64,
        limit: u64,
        want: u64,
    ) -> (u64, bool) {
        if minute + 1 < now || minute > now + 1 {
            return (0, true);
        }
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if book.pruned != now {
            book.minutes.retain(|(_, m), _| *m + 1 >= now);
            book.pruned = now;
        }
        let m = book
            .minutes
            .entry((lease_id.to_string(), minute))
            .or_default();
        let left = limit.saturating_sub(m.total);
        let granted = want.min(left);
        if granted > 0 {
            m.total += granted;
            *m.by_node.entry(node.to_string()).or_default() += granted;
        }
        (granted, left == granted)
    }

    /// Takes back what `node` gives back of its lease (never more than it holds).
    pub fn give_back(&self, node: &str, lease_id: &str, minute: u64, amount: u64) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = book.minutes.get_mut(&(lease_id.to_string(), minute)) {
            if let Some(held) = m.by_node.get_mut(node) {
                let back = amount.min(*held);
                *held -= back;
                m.total -= back;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_is_never_leased_beyond_its_limit() {
        let b = RateLeases::default();
        let now = 1_000;
        assert_eq!(b.grant("a", "rpm/k", now, now, 10, 6), (6, false));
        assert_eq!(b.grant("b", "rpm/k", now, now, 10, 6), (4, true));
        assert_eq!(b.grant("a", "rpm/k", now, now, 10, 1), (0, true));
        // The next minute is a fresh limit; another limiter is apart.
        assert_eq!(b.grant("a", "rpm/k", now + 1, now, 10, 10), (10, true));
        assert_eq!(b.grant("a", "tpm/k", now, now, 10, 3), (3, false));
        // Given back, it can be leased again, to anyone; a node gives back what it holds only.
        b.give_back("a", "rpm/k", now, 100);
        assert_eq!(b.grant("b", "rpm/k", now, now, 10, 10), (6, true));
        // Minutes long gone, or far ahead, get nothing.
        assert_eq!(b.grant("a", "rpm/k", now - 2, now, 10, 1), (0, true));
        assert_eq!(b.grant("a", "rpm/k", now + 2, now, 10, 1), (0, true));
        // Pruned as time passes.
        assert_eq!(b.grant("a", "rpm/x", now + 5, now + 5, 10, 1), (1, false));
        assert_eq!(
            b.book.lock().unwrap().minutes.len(),
            1,
            "old minutes are dropped"
        );
    }
}
