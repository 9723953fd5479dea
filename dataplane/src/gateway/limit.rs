//! The rate-limit phase, after authentication: a key with limits takes one request from its
//! requests-per-minute cell, and needs room for a token in its tokens-per-minute cell; so
//! does each sub-account with limits at or above the key's (one sub-account's cells are
//! shared by every key in its subtree). The tokens a response used are charged to each
//! level when they are known ([`settle`]). Over a limit: 429
//! `rate_limit_exceeded` with `Retry-After` and `x-ratelimit-*` headers saying which limit
//! and when it has room. See [`crate::config::limits`].

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::spend::rate_lease::{self, Unit};
use rustc_hash::FxHashMap;

use crate::config::limits::{now_ns, ns_at, Full, KeyLimiter, Limiters, Room};
use crate::config::pushed::SharedConfig;
use crate::config::spend::{Lease, Leases};
use crate::errors::Code;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Response;

/// How long a request waits for the control plane to lease more of a limit before it is
/// admitted under this node's limits alone.
const LEASE_WAIT: Duration = Duration::from_secs(1);
/// Each lease request asks for this share of a limit (at least one unit).
const LEASE_SHARE: u64 = 20;
/// Most limiters a worker keeps at hand.
const LOCAL_LIMITERS: usize = 4096;

/// What a worker keeps of one limiter: its cells, its lease ids, and its leases of the
/// current minute.
#[derive(Debug)]
struct Entry {
    limiter: Arc<KeyLimiter>,
    ids: [Arc<str>; 2],
    minute: u64,
    leases: [Option<Arc<Lease>>; 2],
}

/// A worker's cache of the shared limiters and minute leases it has used.
#[derive(Debug, Default)]
pub(crate) struct Local {
    cache: RefCell<FxHashMap<Box<str>, Entry>>,
}

impl Local {
    fn with<R>(&self, shared: &Limiters, name: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut cache = self.cache.borrow_mut();
        if let Some(e) = cache.get_mut(name) {
            return f(e);
        }
        if cache.len() >= LOCAL_LIMITERS {
            cache.clear();
        }
        let e = cache.entry(name.into()).or_insert_with(|| Entry {
            limiter: shared.get(name),
            ids: [
                Arc::from(rate_lease::id(Unit::Requests, name)),
                Arc::from(rate_lease::id(Unit::Tokens, name)),
            ],
            minute: u64::MAX,
            leases: [None, None],
        });
        f(e)
    }

    fn get(&self, shared: &Limiters, name: &str) -> Arc<KeyLimiter> {
        self.with(shared, name, |e| Arc::clone(&e.limiter))
    }

    /// This node's lease of `name`'s limit of `unit` for `minute`.
    fn lease(
        &self,
        shared: &Limiters,
        leases: &Leases,
        name: &str,
        unit: Unit,
        minute: u64,
    ) -> Arc<Lease> {
        self.with(shared, name, |e| {
            if e.minute != minute {
                e.minute = minute;
                e.leases = [None, None];
            }
            let i = unit as usize;
            Arc::clone(e.leases[i].get_or_insert_with(|| leases.lease(&e.ids[i], minute)))
        })
    }
}

/// One limited level a request is counted at: its key, or a sub-account at or above it.
#[derive(Debug, Clone)]
pub struct Level {
    pub limiter: Arc<KeyLimiter>,
    pub limits: aigw_wire::RateLimits,
    /// `None` for the key; the sub-account's limiter name (`sub_account/<id>`) otherwise.
    pub sub_account: Option<Arc<str>>,
    pub requests: Option<Room>,
    pub tokens: Option<Room>,
    /// This node's leases of the minute the request came in, by [`Unit`]: the request took
    /// one from the first; its tokens are charged to the second.
    leases: [Option<Arc<Lease>>; 2],
    /// Leases that were short when the request came in: [`wait`] waits for more.
    short: [Option<Arc<Lease>>; 2],
}

/// What the request took, for charging its tokens.
#[derive(Debug, Clone)]
pub struct Taken {
    /// Inline for a key limited by itself or by one sub-account.
    pub levels: smallvec::SmallVec<[Level; 1]>,
    /// The response's tokens were charged (once, as soon as they were known).
    pub charged: bool,
    /// Some lease was short: [`wait`] has more to do before the request goes on.
    waiting: bool,
}

fn seconds(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

/// 429 for the limit of `unit` of `level`; `across` when it is the limit shared by every node
/// that was reached.
fn refuse(
    family: crate::errors::Family,
    level: &Level,
    unit: Unit,
    full: Full,
    across: bool,
) -> Response {
    let retry = seconds(full.retry_after_ns);
    let whose = match &level.sub_account {
        None => "this API key's".to_string(),
        Some(name) => format!(
            "sub-account {}'s",
            name.strip_prefix("sub_account/").unwrap_or(name)
        ),
    };
    let which = match unit {
        Unit::Requests => "requests",
        Unit::Tokens => "tokens",
    };
    let err = Code::RateLimitExceeded.with(format!(
        "{whose} limit of {} {which} per minute is reached{}; retry in {retry} s",
        full.limit,
        if across { " for this minute" } else { "" }
    ));
    let (limit, remaining, reset) = match unit {
        Unit::Requests => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        Unit::Tokens => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    };
    Response::error(&err, family)
        .with_header("retry-after", retry.to_string())
        .with_header(limit, full.limit.to_string())
        .with_header(remaining, "0")
        .with_header(reset, format!("{retry}s"))
}

fn per_minute(limits: aigw_wire::RateLimits, unit: Unit) -> u64 {
    match unit {
        Unit::Requests => limits.requests_per_minute,
        Unit::Tokens => limits.tokens_per_minute,
    }
}

/// Takes what the request needs from `lease` (one request; room for a token), asking for
/// more ahead of need: false when the lease is short.
fn take_from(lease: &Lease, leases: &Leases, unit: Unit, limit: u64) -> bool {
    let share = (limit / LEASE_SHARE).max(1);
    let ok = match unit {
        Unit::Requests => lease.try_reserve(1),
        Unit::Tokens => lease.available() > 0,
    };
    if lease.available() < share.div_ceil(2) && !lease.is_exhausted() {
        // Tokens charged beyond the lease are owed: asked for on top of the share.
        let owed = lease.used().saturating_sub(lease.granted());
        lease.want_more(share + owed);
        leases.notify_wanted();
    }
    ok
}

/// Gives back what `levels` took (the request is refused).
fn give_back(levels: &[Level]) {
    for level in levels {
        if level.requests.is_some() {
            level
                .limiter
                .requests
                .give_back(level.limits.requests_per_minute, 1);
        }
        if let Some(l) = &level.leases[Unit::Requests as usize] {
            l.settle(1, 0);
        }
    }
}

/// Admits the request under its key's limits and those of its sub-accounts, or answers
/// 429. A request refused at one level takes nothing at any.
///
/// Each limit is exact on this node (GCRA cells). With a control plane linked, the node
/// also holds a lease of each limit for the current minute, and the control plane never
/// leases more of a minute than the limit to all nodes together: when this node's lease is
/// short, the request waits in [`wait`] for more.
pub(crate) fn run(
    local: &Local,
    shared: &SharedConfig,
    ctx: &mut RequestCtx,
) -> Result<(), Response> {
    let Some(id) = &ctx.identity else {
        return Ok(());
    };
    let key = id.rate_limits;
    let key_limited = key.requests_per_minute != 0 || key.tokens_per_minute != 0;
    if !key_limited && id.sub_account_limits.is_empty() {
        return Ok(());
    }
    let level = |name: &str, limits, sub_account| Level {
        limiter: local.get(&shared.limiters, name),
        limits,
        sub_account,
        requests: None,
        tokens: None,
        leases: [None, None],
        short: [None, None],
    };
    let mut levels = smallvec::SmallVec::<[Level; 1]>::new();
    if key_limited {
        levels.push(level(&id.key_id, key, None));
    }
    for (name, limits) in &id.sub_account_limits {
        levels.push(level(name, *limits, Some(Arc::clone(name))));
    }
    // The head's arrival, read once for every phase that needs the time.
    let now = ns_at(ctx.timings.head_received);
    let family = ctx.family;
    // Tokens first: a request refused for its tokens takes no request.
    for level in &mut levels {
        let n = level.limits.tokens_per_minute;
        if n != 0 {
            match level.limiter.tokens.peek(n, now) {
                Ok(room) => level.tokens = Some(room),
                Err(full) => return Err(refuse(family, level, Unit::Tokens, full, false)),
            }
        }
    }
    for i in 0..levels.len() {
        let n = levels[i].limits.requests_per_minute;
        if n == 0 {
            continue;
        }
        match levels[i].limiter.requests.take(n, 1, now) {
            Ok(room) => levels[i].requests = Some(room),
            Err(full) => {
                // Refused here: what the levels below took goes back.
                give_back(&levels[..i]);
                return Err(refuse(family, &levels[i], Unit::Requests, full, false));
            }
        }
    }
    let mut waiting = false;
    if shared.connected() {
        let minute = rate_lease::minute(crate::runtime::unix_seconds());
        for level in &mut levels {
            let name = level.sub_account.as_deref().unwrap_or(&id.key_id);
            for unit in [Unit::Requests, Unit::Tokens] {
                let limit = per_minute(level.limits, unit);
                if limit == 0 {
                    continue;
                }
                let lease = local.lease(&shared.limiters, &shared.leases, name, unit, minute);
                if take_from(&lease, &shared.leases, unit, limit) {
                    level.leases[unit as usize] = Some(lease);
                } else {
                    level.short[unit as usize] = Some(lease);
                    waiting = true;
                }
            }
        }
    }
    ctx.rate_limited = Some(Taken {
        levels,
        charged: false,
        waiting,
    });
    Ok(())
}

/// Waits for the leases a request found short when it came in: admitted once every one
/// has room; 429 when the control plane says a limit's minute is used up across the nodes.
/// When the control plane does not answer within [`LEASE_WAIT`] (or the link is down) the
/// request goes on under this node's limits alone.
pub(crate) async fn wait(shared: &SharedConfig, ctx: &mut RequestCtx) -> Result<(), Response> {
    let family = ctx.family;
    let Some(taken) = ctx.rate_limited.as_mut().filter(|t| t.waiting) else {
        return Ok(());
    };
    taken.waiting = false;
    let deadline = std::time::Instant::now() + LEASE_WAIT;
    for i in 0..taken.levels.len() {
        for unit in [Unit::Requests, Unit::Tokens] {
            let Some(lease) = taken.levels[i].short[unit as usize].take() else {
                continue;
            };
            let limit = per_minute(taken.levels[i].limits, unit);
            loop {
                let changed = lease.changed.listen();
                if take_from(&lease, &shared.leases, unit, limit) {
                    taken.levels[i].leases[unit as usize] = Some(lease);
                    break;
                }
                if lease.is_exhausted() {
                    give_back(&taken.levels);
                    let now = crate::runtime::unix_seconds();
                    let full = Full {
                        limit,
                        retry_after_ns: (60 - now % 60) * 1_000_000_000,
                    };
                    let level = taken.levels[i].clone();
                    ctx.rate_limited = None;
                    return Err(refuse(family, &level, unit, full, true));
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if !shared.connected()
                    || left.is_zero()
                    || crate::runtime::deadline::timeout(left, changed)
                        .await
                        .is_err()
                {
                    tracing::debug!(
                        lease = ?lease.granted(),
                        "no rate-limit lease from the control plane in time; admitted under this node's limits"
                    );
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Charges the tokens the response used to the key's token limit, once: when the body's
/// last piece has been read (before the client has all of it, so the client's next request
/// sees the charge), or when the request ends. Leased tokens count in the minute the
/// request came in.
pub(crate) fn settle(ctx: &mut RequestCtx) {
    let used = ctx.usage.input_tokens + ctx.usage.output_tokens;
    let Some(taken) = &mut ctx.rate_limited else {
        return;
    };
    if std::mem::replace(&mut taken.charged, true) || used == 0 {
        return;
    }
    let now = now_ns();
    for level in &taken.levels {
        let per_minute = level.limits.tokens_per_minute;
        if per_minute != 0 {
            level.limiter.tokens.charge(per_minute, used, now);
        }
        if let Some(l) = &level.leases[Unit::Tokens as usize] {
            l.settle(0, used);
        }
    }
}
