//! The per-request context: created when the head is parsed, carried by every phase, read
//! once by the log phase. A phase records here what a later one needs; phases do not pass
//! values to each other positionally.

use std::sync::Arc;
use std::time::Instant;

use aigw_wire::keys::Environment;

use crate::adapters::{Endpoint, Usage};
use crate::config::routing::EnvRoutes;
use crate::errors::{Code, Family};
use crate::server::request_id::RequestId;
use crate::upstream::Upstream;

/// Who a request is, once authenticated. Never key material: the public key id only.
#[derive(Debug, Clone)]
pub struct Identity {
    pub tenant_id: Arc<str>,
    pub environment: Environment,
    pub sub_account_id: Option<Arc<str>>,
    /// The key's public id (the part of the key that is not secret).
    pub key_id: Box<str>,
    /// `None`: every model (cloning it costs nothing for unrestricted keys).
    pub allowed_models: Option<Arc<[Box<str>]>>,
    /// The routing of the key's environment; `None` when it has none.
    pub routes: Option<Arc<EnvRoutes>>,
    /// The key's rate limits (0 = none).
    pub rate_limits: aigw_wire::RateLimits,
    /// The rate limits of the key's sub-account and those above it, each with its
    /// limiter's name (empty for most keys).
    pub sub_account_limits: Vec<(Arc<str>, aigw_wire::RateLimits)>,
    /// The spend caps covering the key (empty for most keys).
    pub caps: Vec<Arc<crate::config::spend::Cap>>,
    /// Caps and prices, when `caps` is not empty.
    pub spend: Option<Arc<crate::config::spend::Spend>>,
}

/// When things happened to the request.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// The head's first byte arrived.
    pub head_received: Instant,
    /// A connection to the upstream that answered was ready (pooled or new).
    pub upstream_connected: Option<Instant>,
    /// The upstream's response head arrived.
    pub first_byte: Option<Instant>,
    /// The response's last byte was written to the client.
    pub last_byte: Option<Instant>,
}

/// The upstream a request went to, and what was asked of it.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub upstream: Arc<Upstream>,
    /// The gateway asked the upstream for a stream's usage the client did not ask for, and
    /// takes it out again before the client sees it.
    pub stream_usage_added: bool,
}

/// Everything the phases of one request share.
#[derive(Debug)]
pub struct RequestCtx {
    pub id: RequestId,
    /// The error shape and stream grammar the client expects: the endpoint's family, or
    /// by path for endpoints the gateway does not serve.
    pub family: Family,
    pub endpoint: Option<Endpoint>,
    /// Shared with the worker's cache of verified keys: one count per request, no copy.
    pub identity: Option<Arc<Identity>>,
    /// The model the client asked for.
    pub model: Option<Box<str>>,
    /// The client asked for a streamed response.
    pub stream: bool,
    /// The upstream of the last attempt.
    pub chosen: Option<Chosen>,
    /// Attempts made (each upstream tried, fresh retries on stale connections included).
    pub attempts: u32,
    pub timings: Timings,
    /// Token counts the provider reported, read by the response transforms.
    pub usage: Usage,
    /// Why the request failed, when a phase ended it (or a stream was cut short).
    pub error: Option<Code>,
    /// What the request took from its key's rate limits.
    pub rate_limited: Option<crate::gateway::limit::Taken>,
    /// Keys of ours seen in the request or its answer, reported when it ends.
    pub leaks: Vec<crate::gateway::leak::Sighting>,
    /// Spans the request guardrail replaced by placeholders.
    pub redacted: usize,
    /// The entity a guardrail refused the request (or its response) for, and which.
    pub guardrail_blocked: Option<(crate::pii::Entity, &'static str)>,
    /// Relayed unscanned because the scanner could not run and the policy fails open
    /// (`request` or `response`), for the audit log.
    pub guardrail_unscanned: Option<&'static str>,
    /// What the request reserved of its spend caps, settled when it ends.
    pub spend: Option<crate::gateway::spend::Reservation>,
    /// The output limit the request transform adds (a capped request that set none).
    pub inject_limit: Option<crate::gateway::spend::InjectLimit>,
    /// The request's bodies for the body log, when they are logged.
    pub body_log: Option<crate::gateway::bodylog::Capture>,
}

impl RequestCtx {
    pub fn new(id: RequestId, family: Family, head_received: Instant) -> Self {
        Self {
            id,
            family,
            endpoint: None,
            identity: None,
            model: None,
            stream: false,
            chosen: None,
            attempts: 0,
            timings: Timings {
                head_received,
                upstream_connected: None,
                first_byte: None,
                last_byte: None,
            },
            usage: Usage::default(),
            error: None,
            rate_limited: None,
            leaks: Vec::new(),
            redacted: 0,
            guardrail_blocked: None,
            guardrail_unscanned: None,
            spend: None,
            inject_limit: None,
            body_log: None,
        }
    }
}
