//! The spend phase: a request covered by spend caps reserves its maximum cost from this
//! node's lease of every one of them before anything is sent, and settles to its real cost
//! when it ends.
//!
//! The maximum is a true upper bound for what the request itself carries: its prompt cannot
//! be more tokens than the body has bytes (a token is at least one byte of text), priced at
//! the dearest input rate, and its output is bounded by the request's own limit
//! (`max_completion_tokens` or `max_tokens`, `max_output_tokens` for the Responses API,
//! times `n` or `best_of` choices). When the client set none, the gateway sets one
//! ([`DEFAULT_MAX_OUTPUT`]) so the bound holds. What a request can pull in from elsewhere
//! (an image by URL, a stored conversation named by `previous_response_id`) is not in its
//! bytes: such a request settles at its real cost, which may exceed what it reserved.

use std::sync::Arc;
use std::time::Duration;

use crate::adapters::Endpoint;
use crate::body::JsonBody;
use crate::config::spend::{Cap, Lease, Leases, Rates};
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Finished;

/// The output limit set on a capped request that has none.
pub const DEFAULT_MAX_OUTPUT: u64 = 4096;
/// How long a request waits for more budget from the control plane.
const LEASE_WAIT: Duration = Duration::from_secs(3);
/// Each top-up asks for this share of the cap (or the request's cost, if more).
const LEASE_SHARE: u64 = 20;

/// A worker's cache of the leases it has used, so a capped request takes no lock: valid
/// for one set of caps (a change of caps, or a cap deleted and set again, starts it afresh)
/// and bounded.
#[derive(Debug, Default)]
pub(crate) struct Local {
    cache: std::cell::RefCell<LocalLeases>,
}

#[derive(Debug, Default)]
struct LocalLeases {
    /// The caps the cache is for (compared by address).
    spend: Option<Arc<crate::config::spend::Spend>>,
    map: rustc_hash::FxHashMap<(Arc<str>, u64), Arc<Lease>>,
}

/// Most leases a worker keeps at hand.
const LOCAL_LEASES: usize = 4096;

impl Local {
    fn lease(
        &self,
        shared: &Leases,
        spend: &Arc<crate::config::spend::Spend>,
        cap: &Arc<str>,
        period: u64,
    ) -> Arc<Lease> {
        let mut c = self.cache.borrow_mut();
        if !c.spend.as_ref().is_some_and(|s| Arc::ptr_eq(s, spend)) || c.map.len() >= LOCAL_LEASES {
            c.map.clear();
            c.spend = Some(Arc::clone(spend));
        }
        if let Some(l) = c.map.get(&(Arc::clone(cap), period)) {
            return Arc::clone(l);
        }
        let l = shared.lease(cap, period);
        c.map.insert((Arc::clone(cap), period), Arc::clone(&l));
        l
    }
}

/// What a request reserved.
#[derive(Debug)]
pub struct Reservation {
    /// Inline up to a key's own cap, its sub-account's, one above and its tenant's.
    leases: smallvec::SmallVec<[Arc<Lease>; 4]>,
    reserved: u64,
    rates: Rates,
}

/// An output limit the request transform adds (the client set none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectLimit {
    pub field: &'static str,
    pub tokens: u64,
}

/// The field naming the output limit on `endpoint`, and the older one OpenAI still reads.
fn limit_fields(endpoint: Endpoint) -> (&'static str, Option<&'static str>) {
    match endpoint {
        Endpoint::ChatCompletions => ("max_completion_tokens", Some("max_tokens")),
        Endpoint::Responses => ("max_output_tokens", None),
        Endpoint::Completions | Endpoint::Messages => ("max_tokens", None),
        Endpoint::Embeddings | Endpoint::Models => ("", None),
    }
}

/// A non-negative integer field, `None` when absent or null.
fn count(parsed: &JsonBody<'_>, field: &str) -> Result<Option<u64>, ApiError> {
    match parsed.get(field).map(str::trim) {
        None | Some("null") => Ok(None),
        Some(raw) => raw.parse::<u64>().map(Some).map_err(|_| {
            Code::InvalidRequest.with(format!("`{field}` must be a non-negative integer"))
        }),
    }
}

/// The most output tokens the request can produce, and the limit to add when it set none.
fn output_bound(
    endpoint: Endpoint,
    parsed: &JsonBody<'_>,
) -> Result<(u64, Option<InjectLimit>), ApiError> {
    let (field, older) = limit_fields(endpoint);
    if field.is_empty() {
        return Ok((0, None));
    }
    let mut limit = count(parsed, field)?;
    if let Some(o) = older {
        if let Some(v) = count(parsed, o)? {
            limit = Some(limit.map_or(v, |l| l.min(v)));
        }
    }
    let choices = match endpoint {
        Endpoint::ChatCompletions => count(parsed, "n")?.unwrap_or(1),
        Endpoint::Completions => count(parsed, "n")?
            .unwrap_or(1)
            .max(count(parsed, "best_of")?.unwrap_or(1)),
        _ => 1,
    }
    .max(1);
    Ok(match limit {
        Some(l) => (l.saturating_mul(choices), None),
        None => (
            DEFAULT_MAX_OUTPUT.saturating_mul(choices),
            Some(InjectLimit {
                field,
                tokens: DEFAULT_MAX_OUTPUT,
            }),
        ),
    })
}

fn usd(micros: u64) -> String {
    format!("${:.6}", micros as f64 / 1e6)
}

/// Reserves the request's maximum cost from every cap covering it; sets the output limit
/// to add when the client set none.
pub(crate) async fn run(
    ctx: &mut RequestCtx,
    parsed: &JsonBody<'_>,
    body_len: usize,
    local: &Local,
    leases: &Leases,
) -> Result<(), ApiError> {
    let Some(id) = &ctx.identity else {
        return Ok(());
    };
    let (Some(spend), false) = (&id.spend, id.caps.is_empty()) else {
        return Ok(());
    };
    let model = ctx.model.as_deref().unwrap_or_default();
    let rates = spend.rates(&id.tenant_id, model).ok_or_else(|| {
        Code::ModelNotPriced.with(format!(
            "a spend cap covers this API key and the model `{model}` has no price, so its cost cannot be bounded; an operator must set one"
        ))
    })?;
    let endpoint = ctx.endpoint.unwrap_or(Endpoint::ChatCompletions);
    let (output, inject) = output_bound(endpoint, parsed)?;
    let cost = rates.max_cost_micros(body_len as u64, output);
    let now = crate::runtime::unix_seconds();
    let mut taken = smallvec::SmallVec::<[Arc<Lease>; 4]>::new();
    for cap in &id.caps {
        let period = cap.period.index(now);
        let lease = local.lease(leases, spend, &cap.id, period);
        match reserve(lease, leases, cap, cost).await {
            Ok(lease) => taken.push(lease),
            Err(e) => {
                for l in &taken {
                    l.settle(cost, 0);
                }
                return Err(e);
            }
        }
    }
    ctx.spend = Some(Reservation {
        leases: taken,
        reserved: cost,
        rates,
    });
    ctx.inject_limit = inject;
    Ok(())
}

/// Reserves `cost` from this node's lease of `cap`, asking for more and waiting for it
/// when the lease is short.
async fn reserve(
    lease: Arc<Lease>,
    leases: &Leases,
    cap: &Cap,
    cost: u64,
) -> Result<Arc<Lease>, ApiError> {
    let spent = |why: &str| {
        Code::InsufficientQuota.with(format!(
            "the spend cap {} ({} per {}) {why}",
            cap.id,
            usd(cap.limit_micros),
            cap.period.name()
        ))
    };
    if cost > cap.limit_micros {
        return Err(spent(&format!(
            "is less than this request may cost ({}); lower its output limit",
            usd(cost)
        )));
    }
    let share = (cap.limit_micros / LEASE_SHARE).max(cost);
    // Read from the clock only once the lease is short.
    let mut give_up = None;
    loop {
        if lease.try_reserve(cost) {
            break;
        }
        let give_up = *give_up.get_or_insert_with(|| std::time::Instant::now() + LEASE_WAIT);
        // Listening before looking again: a grant landing in between is not missed.
        let changed = lease.changed.listen();
        if lease.try_reserve(cost) {
            break;
        }
        if lease.is_exhausted() {
            return Err(spent("is reached for this period"));
        }
        lease.want_more(share.max(cost - lease.available().min(cost)));
        leases.notify_wanted();
        let left = give_up.saturating_duration_since(std::time::Instant::now());
        if left.is_zero()
            || crate::runtime::deadline::timeout(left, changed)
                .await
                .is_err()
        {
            return Err(Code::SpendCapUnavailable.into());
        }
    }
    if lease.available() < share / 2 && !lease.is_exhausted() {
        // Topped up before it runs out, off the path of later requests.
        lease.want_more(share);
        leases.notify_wanted();
    }
    Ok(lease)
}

/// Settles the request's reservation at the provider's reported cost as soon as the body's
/// last piece has been read (before the client has all of it, so its next request sees
/// what is left); without reported usage, [`settle`] does it when the request ends.
pub fn settle_reported(ctx: &mut RequestCtx) {
    if ctx.usage.reported {
        if let Some(r) = ctx.spend.take() {
            let u = &ctx.usage;
            r.settle(r.rates.cost_micros(
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_tokens,
                u.output_tokens,
            ));
        }
    }
}

/// Settles what is still reserved when the request ends: what it cost (from the provider's
/// usage, else the same estimate the meter records for an answer that never said), the
/// rest given back.
pub fn settle(ctx: &mut RequestCtx, done: &Finished) {
    settle_reported(ctx);
    let Some(r) = ctx.spend.take() else { return };
    let actual = if ctx.chosen.is_some() && (200..300).contains(&done.status) {
        let (input, output) = crate::gateway::meter::estimate(done);
        r.rates.cost_micros(input, 0, 0, output)
    } else {
        0
    };
    r.settle(actual);
}

impl Reservation {
    fn settle(&self, actual: u64) {
        for l in &self.leases {
            l.settle(self.reserved, actual);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(endpoint: Endpoint, body: &str) -> Result<(u64, Option<InjectLimit>), ApiError> {
        let parsed = JsonBody::parse(body.as_bytes()).expect("json");
        output_bound(endpoint, &parsed)
    }

    #[test]
    fn the_output_bound_is_the_request_limit_times_its_choices() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(
            bound(chat, r#"{"max_completion_tokens":100}"#).unwrap(),
            (100, None)
        );
        assert_eq!(
            bound(chat, r#"{"max_tokens":50,"max_completion_tokens":100}"#)
                .unwrap()
                .0,
            50
        );
        assert_eq!(bound(chat, r#"{"max_tokens":50,"n":3}"#).unwrap().0, 150);
        assert_eq!(
            bound(
                Endpoint::Completions,
                r#"{"max_tokens":10,"n":2,"best_of":5}"#
            )
            .unwrap()
            .0,
            50
        );
        assert_eq!(
            bound(Endpoint::Responses, r#"{"max_output_tokens":7}"#)
                .unwrap()
                .0,
            7
        );
        assert_eq!(
            bound(Endpoint::Messages, r#"{"max_tokens":9}"#).unwrap().0,
            9
        );
        assert_eq!(
            bound(Endpoint::Embeddings, r#"{"input":"x"}"#).unwrap(),
            (0, None)
        );
        let (n, inject) = bound(chat, r#"{"max_tokens":null,"n":2}"#).unwrap();
        assert_eq!(n, 2 * DEFAULT_MAX_OUTPUT);
        assert_eq!(
            inject,
            Some(InjectLimit {
                field: "max_completion_tokens",
                tokens: DEFAULT_MAX_OUTPUT
            })
        );
        let err = bound(chat, r#"{"max_tokens":-1}"#).unwrap_err();
        assert_eq!(err.code, Code::InvalidRequest);
        assert!(err.message.contains("max_tokens"), "{}", err.message);
    }
}
