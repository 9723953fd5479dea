//! The rate-limit phase, after authentication: a key with limits takes one request from its
//! requests-per-minute cell, and needs room for a token in its tokens-per-minute cell; the
//! tokens a response used are charged when it ends ([`settle`]). Over a limit: 429
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

/// What the request took, for its response headers and for charging its tokens.
#[derive(Debug, Clone)]
pub struct Taken {
    pub limiter: Arc<KeyLimiter>,
    pub requests: Option<Room>,
    pub tokens: Option<Room>,
    /// The response's tokens were charged (once, as soon as they were known).
    pub charged: bool,
}

fn seconds(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

/// Admits the request under its key's limits, or answers 429.
pub(crate) fn run(local: &Local, shared: &Limiters, ctx: &mut RequestCtx) -> Result<(), Response> {
    let Some(id) = &ctx.identity else {
        return Ok(());
    };
    let limits = id.rate_limits;
    if limits.requests_per_minute == 0 && limits.tokens_per_minute == 0 {
        return Ok(());
    }
    let limiter = local.get(shared, &id.key_id);
    let now = now_ns();
    let family = ctx.family;
    let refuse = |which: &str, full: Full| {
        let retry = seconds(full.retry_after_ns);
        let err = Code::RateLimitExceeded.with(format!(
            "this API key's limit of {} {which} per minute is reached; retry in {retry} s",
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
    };
    // Tokens first: a request refused for its tokens takes no request.
    let tokens = match limits.tokens_per_minute {
        0 => None,
        n => Some(
            limiter
                .tokens
                .peek(n, now)
                .map_err(|f| refuse("tokens", f))?,
        ),
    };
    let requests = match limits.requests_per_minute {
        0 => None,
        n => Some(
            limiter
                .requests
                .take(n, 1, now)
                .map_err(|f| refuse("requests", f))?,
        ),
    };
    ctx.rate_limited = Some(Taken {
        limiter,
        requests,
        tokens,
        charged: false,
    });
    Ok(())
}

/// Charges the tokens the response used to the key's token limit, once: when the body's
/// last piece has been read (before the client has all of it, so the client's next request
/// sees the charge), or when the request ends.
pub(crate) fn settle(ctx: &mut RequestCtx) {
    let used = ctx.usage.input_tokens + ctx.usage.output_tokens;
    let (Some(taken), Some(id)) = (&mut ctx.rate_limited, &ctx.identity) else {
        return;
    };
    if std::mem::replace(&mut taken.charged, true) {
        return;
    }
    let per_minute = id.rate_limits.tokens_per_minute;
    if per_minute != 0 && used != 0 {
        taken.limiter.tokens.charge(per_minute, used, now_ns());
    }
}
