//! Spend caps and model prices as the control plane pushes them, indexed for the request
//! path ([`Spend`]), and the budget this node was leased for each cap ([`Leases`]).
//!
//! A capped request reserves its maximum cost from the node's lease of every cap covering
//! it before it is forwarded, and settles to its real cost when it ends. A lease running
//! low is topped up from the control plane in the background (the control thread asks);
//! a request that does not fit waits briefly for a top-up, and is refused once the control
//! plane says the period's budget is gone. Reservations are atomic additions checked
//! against what was granted, so workers share a lease without locks, and the node never
//! spends more than it was granted.

use std::collections::BTreeMap;

// Keyed by configuration (tenant, sub-account, key and cap ids) and looked up on every
// capped request: a fast hash, as nothing a client sends is inserted.
use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aigw_wire::{CapPeriod, CapRecord, CapScope, LimitRecord, PriceRecord, RateLimits};
use event_listener::Event;

/// Prices in millionths of a US dollar per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
}

impl Rates {
    /// The cost of tokens, in millionths of a dollar, rounded up (a reservation must not
    /// fall short). Input counts include the cached and cache-written parts.
    pub fn cost_micros(&self, input: u64, cached_input: u64, cache_write: u64, output: u64) -> u64 {
        let plain = input
            .saturating_sub(cached_input)
            .saturating_sub(cache_write);
        let total = u128::from(plain) * u128::from(self.input)
            + u128::from(cached_input) * u128::from(self.cached_input)
            + u128::from(cache_write) * u128::from(self.cache_write)
            + u128::from(output) * u128::from(self.output);
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    /// The most `input` prompt tokens and `output` completion tokens can cost: every input
    /// token at the dearest input rate (a cache write may cost more than a plain read).
    pub fn max_cost_micros(&self, input: u64, output: u64) -> u64 {
        let dearest = self.input.max(self.cached_input).max(self.cache_write);
        let total =
            u128::from(input) * u128::from(dearest) + u128::from(output) * u128::from(self.output);
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// One cap as the request path needs it.
#[derive(Debug, PartialEq, Eq)]
pub struct Cap {
    pub id: Arc<str>,
    pub period: CapPeriod,
    pub limit_micros: u64,
}

/// Caps, prices and sub-accounts' rate limits at one revision.
#[derive(Debug, Default)]
pub struct Spend {
    caps: BTreeMap<String, CapRecord>,
    prices: BTreeMap<String, PriceRecord>,
    limits: BTreeMap<String, LimitRecord>,
    /// Sub-account id → its rate limits (as `Arc<str>`, the limiter's name).
    sub_limits: HashMap<String, (Arc<str>, RateLimits)>,
    by_tenant: HashMap<String, Vec<Arc<Cap>>>,
    by_sub_account: HashMap<String, Vec<Arc<Cap>>>,
    by_key: HashMap<String, Vec<Arc<Cap>>>,
    /// tenant → model → rates; the global prices are under tenant "" (looked up by `&str`,
    /// without allocating, on every capped request).
    rates: HashMap<String, HashMap<String, Rates>>,
}

impl Spend {
    pub fn new(
        caps: BTreeMap<String, CapRecord>,
        prices: BTreeMap<String, PriceRecord>,
        limits: BTreeMap<String, LimitRecord>,
    ) -> Self {
        let mut s = Spend::default();
        for l in limits.values() {
            s.sub_limits.insert(
                l.id.clone(),
                (
                    Arc::from(format!("sub_account/{}", l.id)),
                    RateLimits {
                        requests_per_minute: l.requests_per_minute,
                        tokens_per_minute: l.tokens_per_minute,
                    },
                ),
            );
        }
        s.limits = limits;
        for c in caps.values() {
            let cap = Arc::new(Cap {
                id: Arc::from(c.id.as_str()),
                period: c.period,
                limit_micros: c.limit_micros,
            });
            let index = match c.scope {
                CapScope::Tenant => &mut s.by_tenant,
                CapScope::SubAccount => &mut s.by_sub_account,
                CapScope::Key => &mut s.by_key,
            };
            index.entry(c.scope_id.clone()).or_default().push(cap);
        }
        for p in prices.values() {
            s.rates.entry(p.tenant_id.clone()).or_default().insert(
                p.model.clone(),
                Rates {
                    input: p.input,
                    output: p.output,
                    cached_input: p.cached_input,
                    cache_write: p.cache_write,
                },
            );
        }
        s.caps = caps;
        s.prices = prices;
        s
    }

    /// Whether any cap exists (most nodes: none, and requests skip the spend phase).
    pub fn has_caps(&self) -> bool {
        !self.caps.is_empty()
    }

    /// The caps covering a key: its own, its sub-account's and every sub-account's above
    /// it, and its tenant's.
    pub fn caps_for(
        &self,
        tenant: &str,
        sub_account: Option<&str>,
        parents: &[Arc<str>],
        key_id: &str,
    ) -> Vec<Arc<Cap>> {
        let mut out = Vec::new();
        if !self.has_caps() {
            return out;
        }
        let mut add = |index: &HashMap<String, Vec<Arc<Cap>>>, id: &str| {
            if let Some(caps) = index.get(id) {
                out.extend(caps.iter().cloned());
            }
        };
        add(&self.by_key, key_id);
        if let Some(s) = sub_account {
            add(&self.by_sub_account, s);
        }
        for p in parents {
            add(&self.by_sub_account, p);
        }
        add(&self.by_tenant, tenant);
        out
    }

    /// The rate limits of a key's sub-account and of every sub-account above it (each
    /// with its limiter's name), empty for most keys.
    pub fn sub_account_limits(
        &self,
        sub_account: Option<&str>,
        parents: &[Arc<str>],
    ) -> Vec<(Arc<str>, RateLimits)> {
        if self.sub_limits.is_empty() {
            return Vec::new();
        }
        sub_account
            .into_iter()
            .chain(parents.iter().map(|p| &**p))
            .filter_map(|id| self.sub_limits.get(id).cloned())
            .collect()
    }

    /// `tenant`'s price of `model`: its own, else the global one.
    pub fn rates(&self, tenant: &str, model: &str) -> Option<Rates> {
        let of = |t: &str| self.rates.get(t).and_then(|m| m.get(model));
        of(tenant).or_else(|| of("")).copied()
    }

    /// Every record held, for sealing to disk.
    pub fn records(&self) -> impl Iterator<Item = aigw_wire::Record> + '_ {
        self.caps
            .values()
            .cloned()
            .map(aigw_wire::Record::Cap)
            .chain(self.prices.values().cloned().map(aigw_wire::Record::Price))
            .chain(self.limits.values().cloned().map(aigw_wire::Record::Limit))
    }

    pub fn limit_records(&self) -> &BTreeMap<String, LimitRecord> {
        &self.limits
    }

    pub fn cap_records(&self) -> &BTreeMap<String, CapRecord> {
        &self.caps
    }

    pub fn price_records(&self) -> &BTreeMap<String, PriceRecord> {
        &self.prices
    }
}

/// This node's lease of one cap's budget for one period.
#[derive(Debug, Default)]
pub struct Lease {
    /// Granted by the control plane, in millionths of a dollar.
    granted: AtomicU64,
    /// Reserved by requests in flight plus settled by requests that ended.
    used: AtomicU64,
    /// More wanted: the control thread asks for it (0 = nothing wanted).
    want: AtomicU64,
    /// A request for more is on its way to the control plane.
    asked: AtomicBool,
    /// The control plane said nothing more is left this period.
    exhausted: AtomicBool,
    /// Woken when a grant arrives (or the link goes down).
    pub changed: Event,
}

impl Lease {
    /// Reserves `micros` if the lease holds that much unreserved.
    pub fn try_reserve(&self, micros: u64) -> bool {
        let granted = self.granted.load(Ordering::Acquire);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let next = used.checked_add(micros)?;
                (next <= granted).then_some(next)
            })
            .is_ok()
    }

    /// Unreserved budget.
    pub fn available(&self) -> u64 {
        self.granted
            .load(Ordering::Acquire)
            .saturating_sub(self.used.load(Ordering::Acquire))
    }

    /// A request that reserved `reserved` cost `actual`: the difference goes back (or, if
    /// it cost more, is taken too: the lease then shows the overshoot as used).
    pub fn settle(&self, reserved: u64, actual: u64) {
        if actual <= reserved {
            self.used.fetch_sub(reserved - actual, Ordering::AcqRel);
        } else {
            self.used.fetch_add(actual - reserved, Ordering::AcqRel);
        }
    }

    /// Asks the control thread for at least `micros` more.
    pub fn want_more(&self, micros: u64) {
        self.want.fetch_max(micros, Ordering::AcqRel);
    }

    pub fn is_exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn grant_for_test(&self, micros: u64) {
        self.granted.fetch_add(micros, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }
}

/// A lease request the control thread is to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub cap_id: String,
    pub period: u64,
    pub want_micros: u64,
}

/// Leases by (cap id, period index).
type LeaseMap = HashMap<(Arc<str>, u64), Arc<Lease>>;

/// Every lease this node holds, shared by the workers and the control thread.
#[derive(Debug, Default)]
pub struct Leases {
    map: Mutex<LeaseMap>,
    /// Rung when a worker wants more budget: the control thread looks at once.
    pub wanted: Event,
    /// Set when a worker wants more, cleared by the control thread when it collects.
    any_wanted: AtomicBool,
}

impl Leases {
    /// The lease of `cap`'s `period` (created empty on first use).
    pub fn lease(&self, cap: &Arc<str>, period: u64) -> Arc<Lease> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry((Arc::clone(cap), period)).or_default())
    }

    /// Marks that some lease wants more (the control thread collects with [`Self::asks`]).
    pub fn notify_wanted(&self) {
        self.any_wanted.store(true, Ordering::Release);
        self.wanted.notify(usize::MAX);
    }

    /// The requests to send now: leases that want more and have no request on its way.
    pub fn asks(&self) -> Vec<Ask> {
        if !self.any_wanted.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((cap, period), lease) in map.iter() {
            if lease.asked.load(Ordering::Acquire) || lease.is_exhausted() {
                continue;
            }
            let want = lease.want.swap(0, Ordering::AcqRel);
            if want > 0 {
                lease.asked.store(true, Ordering::Release);
                out.push(Ask {
                    cap_id: cap.to_string(),
                    period: *period,
                    want_micros: want,
                });
            }
        }
        out
    }

    /// A grant arrived.
    pub fn granted(&self, cap_id: &str, period: u64, micros: u64, exhausted: bool) {
        let lease = self.lease(&Arc::from(cap_id), period);
        lease.granted.fetch_add(micros, Ordering::AcqRel);
        if exhausted {
            lease.exhausted.store(true, Ordering::Release);
        }
        lease.asked.store(false, Ordering::Release);
        if lease.want.load(Ordering::Acquire) > 0 {
            self.any_wanted.store(true, Ordering::Release);
        }
        lease.changed.notify(usize::MAX);
    }

    /// The link went down: requests on their way are forgotten (waiting requests ask again)
    /// and waiters are told.
    pub fn link_down(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for lease in map.values() {
            lease.asked.store(false, Ordering::Release);
            lease.changed.notify(usize::MAX);
        }
        self.any_wanted.store(true, Ordering::Release);
    }

    /// Caps changed (a limit may have been raised): leases the control plane called
    /// exhausted may ask again.
    pub fn reopen(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for lease in map.values() {
            lease.exhausted.store(false, Ordering::Release);
            lease.changed.notify(usize::MAX);
        }
    }

    /// What this node holds unspent, to give back at an orderly stop (every request has
    /// ended by then): (cap, period, micros), and each lease emptied.
    pub fn take_unspent(&self) -> Vec<Ask> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((cap, period), lease) in map.iter() {
            let left = lease.available();
            if left > 0 {
                lease.granted.fetch_sub(left, Ordering::AcqRel);
                out.push(Ask {
                    cap_id: cap.to_string(),
                    period: *period,
                    want_micros: left,
                });
            }
        }
        out
    }

    /// Forgets leases of periods that ended (`current` gives a cap's current period).
    pub fn prune(&self, current: impl Fn(&str) -> Option<u64>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(cap, period), _| match current(cap) {
            Some(now) => *period + 1 >= now,
            None => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_grant_across_threads() {
        let lease = Arc::new(Lease::default());
        lease.grant_for_test(1_000);
        let ok: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let lease = Arc::clone(&lease);
                    s.spawn(move || (0..100).filter(|_| lease.try_reserve(7)).count() as u64)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(ok, 1_000 / 7, "exactly what fits was reserved");
        assert!(lease.used() <= lease.granted());
        lease.settle(7, 3);
        assert_eq!(lease.used(), ok * 7 - 4);
    }

    #[test]
    fn asks_are_sent_once_until_granted() {
        let leases = Leases::default();
        let cap: Arc<str> = Arc::from("key:k:day");
        let lease = leases.lease(&cap, 5);
        lease.want_more(100);
        lease.want_more(50);
        leases.notify_wanted();
        assert_eq!(
            leases.asks(),
            vec![Ask {
                cap_id: "key:k:day".into(),
                period: 5,
                want_micros: 100
            }]
        );
        lease.want_more(10);
        leases.notify_wanted();
        assert!(leases.asks().is_empty(), "one request on its way at a time");
        leases.granted("key:k:day", 5, 100, false);
        assert!(lease.try_reserve(100));
        assert!(!lease.try_reserve(1));
        leases.notify_wanted();
        assert_eq!(
            leases.asks().len(),
            1,
            "the later want is asked once granted"
        );
        leases.granted("key:k:day", 5, 0, true);
        assert!(lease.is_exhausted());
        lease.settle(100, 60);
        let back = leases.take_unspent();
        assert_eq!(back[0].want_micros, 40);
        assert_eq!(lease.available(), 0);
    }

    #[test]
    fn prices_round_up_and_the_dearest_input_rate_bounds() {
        let r = Rates {
            input: 2_500_000,
            output: 10_000_000,
            cached_input: 1_250_000,
            cache_write: 3_125_000,
        };
        assert_eq!(r.cost_micros(1, 0, 0, 0), 3, "2.5 micro-dollars round up");
        assert_eq!(
            r.cost_micros(1_000_000, 400_000, 100_000, 200_000),
            4_062_500
        );
        assert_eq!(r.max_cost_micros(1_000_000, 200_000), 3_125_000 + 2_000_000);
    }
}
