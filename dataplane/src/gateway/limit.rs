//! The rate-limit phase, after authentication: a key with limits takes one request from its
//! requests-per-minute cell, and needs room for a token in its tokens-per-minute cell; so
//! does each sub-account with limits at or above the key's (one sub-account's cells are
//! shared by every key in its subtree). The tokens a response used are charged to each
//! level when they are known ([`settle`]). Over a limit: 429
//! `rate_limit_exceeded` with `Retry-After` and `x-ratelimit-*` headers saying which limit
//! and when it has room. See [`crate::config::limits`].

use std::cell::RefCell;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::config::limits::{now_ns, Full, KeyLimiter, Limiters, Room};
use crate::errors::Code;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Response;

/// A worker's cache of the shared limiters it has used.
#[derive(Debug, Default)]
pub(crate) struct Local {
    cache: RefCell<FxHashMap<Box<str>, Arc<KeyLimiter>>>,
}

impl Local {
    fn get(&self, shared: &Limiters, key_id: &str) -> Arc<KeyLimiter> {
        if let Some(l) = self.cache.borrow().get(key_id) {
            return Arc::clone(l);
        }
        let l = shared.get(key_id);
        self.cache
            .borrow_mut()
            .insert(key_id.into(), Arc::clone(&l));
        l
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
}

/// What the request took, for charging its tokens.
#[derive(Debug, Clone)]
pub struct Taken {
    pub levels: Vec<Level>,
    /// The response's tokens were charged (once, as soon as they were known).
    pub charged: bool,
}

fn seconds(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

/// 429 for the limit `which` ("requests" or "tokens") of `level`.
fn refuse(family: crate::errors::Family, level: &Level, which: &str, full: Full) -> Response {
    let retry = seconds(full.retry_after_ns);
    let whose = match &level.sub_account {
        None => "this API key's".to_string(),
        Some(name) => format!(
            "sub-account {}'s",
            name.strip_prefix("sub_account/").unwrap_or(name)
        ),
    };
    let err = Code::RateLimitExceeded.with(format!(
        "{whose} limit of {} {which} per minute is reached; retry in {retry} s",
        full.limit
    ));
    let (limit, remaining, reset) = if which == "requests" {
        (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        )
    } else {
        (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        )
    };
    Response::error(&err, family)
        .with_header("retry-after", retry.to_string())
        .with_header(limit, full.limit.to_string())
        .with_header(remaining, "0")
        .with_header(reset, format!("{retry}s"))
}

/// Admits the request under its key's limits and those of its sub-accounts, or answers
/// 429. A request refused at one level takes nothing at any.
pub(crate) fn run(local: &Local, shared: &Limiters, ctx: &mut RequestCtx) -> Result<(), Response> {
    let Some(id) = &ctx.identity else {
        return Ok(());
    };
    let key = id.rate_limits;
    let key_limited = key.requests_per_minute != 0 || key.tokens_per_minute != 0;
    if !key_limited && id.sub_account_limits.is_empty() {
        return Ok(());
    }
    let mut levels = Vec::with_capacity(usize::from(key_limited) + id.sub_account_limits.len());
    if key_limited {
        levels.push(Level {
            limiter: local.get(shared, &id.key_id),
            limits: key,
            sub_account: None,
            requests: None,
            tokens: None,
        });
    }
    for (name, limits) in &id.sub_account_limits {
        levels.push(Level {
            limiter: local.get(shared, name),
            limits: *limits,
            sub_account: Some(Arc::clone(name)),
            requests: None,
            tokens: None,
        });
    }
    let now = now_ns();
    let family = ctx.family;
    // Tokens first: a request refused for its tokens takes no request.
    for level in &mut levels {
        let n = level.limits.tokens_per_minute;
        if n != 0 {
            match level.limiter.tokens.peek(n, now) {
                Ok(room) => level.tokens = Some(room),
                Err(full) => return Err(refuse(family, level, "tokens", full)),
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
                for taken in &levels[..i] {
                    if taken.requests.is_some() {
                        taken
                            .limiter
                            .requests
                            .give_back(taken.limits.requests_per_minute, 1);
                    }
                }
                return Err(refuse(family, &levels[i], "requests", full));
            }
        }
    }
    ctx.rate_limited = Some(Taken {
        levels,
        charged: false,
    });
    Ok(())
}

/// Charges the tokens the response used to the key's token limit, once: when the body's
/// last piece has been read (before the client has all of it, so the client's next request
/// sees the charge), or when the request ends.
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
    }
}
