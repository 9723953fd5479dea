//! The guardrail phase for requests: before any byte leaves for an upstream, and once per
//! request (not once per failover target), the body's string values are scanned for the
//! PII and secrets the environment's policy names; each is replaced by a typed placeholder
//! (`[EMAIL_1]`, the same value getting the same one) or the request is refused with a code
//! naming the guardrail. The JSON stays valid: only string values change, escapes decoded
//! before matching.
//!
//! It fails closed: a scanner that cannot run refuses the request (503) rather than let it
//! leave unscanned.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::config::routing::EnvRoutes;
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::pii::{Entity, RedactError, Redactor, Scanner, Scratch};

/// The built-in detectors, compiled once per process and shared by every node and worker
/// in it (they are the same for everyone; tenants' own patterns are compiled apart).
pub(crate) fn scanner() -> Result<&'static Scanner, String> {
    static SCANNER: OnceLock<Result<Scanner, String>> = OnceLock::new();
    SCANNER
        .get_or_init(|| Scanner::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// A worker's guardrail engine: the process's scanner and this worker's scratch (shared
/// by the worker's requests and responses; never held across an await).
#[derive(Debug)]
pub struct Guard {
    pub(crate) scanner: &'static Scanner,
    pub(crate) scratch: Rc<RefCell<Scratch>>,
}

impl Guard {
    /// `None` when the scanner cannot give this worker a scratch (requests that need a
    /// guardrail are then refused).
    pub(crate) fn new(scanner: &'static Scanner) -> Option<Self> {
        match scanner.scratch() {
            Ok(s) => Some(Self {
                scanner,
                scratch: Rc::new(RefCell::new(s)),
            }),
            Err(e) => {
                tracing::error!(error = %e, "no guardrail scratch for this worker; requests that need a guardrail are refused");
                None
            }
        }
    }
}

/// The code a blocked entity is refused with.
pub(crate) fn code(entity: Entity) -> Code {
    match entity {
        Entity::Email => Code::GuardrailEmail,
        Entity::Phone => Code::GuardrailPhone,
        Entity::Card => Code::GuardrailCard,
        Entity::Ssn => Code::GuardrailSsn,
        Entity::Iban => Code::GuardrailIban,
        Entity::Ip => Code::GuardrailIp,
        Entity::Secret => Code::GuardrailSecret,
        Entity::Custom => Code::GuardrailCustom,
    }
}

/// The request body as it may leave: `None` when nothing changed (the original bytes go),
/// or the redacted body.
pub(crate) fn requests(
    guard: Option<&Guard>,
    ctx: &mut RequestCtx,
    routes: Option<&EnvRoutes>,
    body: &Bytes,
) -> Result<Option<Bytes>, ApiError> {
    let Some(routes) = routes else {
        return Ok(None);
    };
    let guardrails = routes.policy.guardrails;
    let Some(policy) = guardrails.requests else {
        return Ok(None);
    };
    // The scanner cannot run: refused, or sent unscanned (and reported) where the policy
    // fails open.
    let unscanned = |ctx: &mut RequestCtx| {
        if guardrails.fail_open {
            tracing::warn!(id = %ctx.id, "the guardrail scanner could not run; the request was sent unscanned (the policy fails open)");
            ctx.guardrail_unscanned = Some("request");
            Ok(None)
        } else {
            Err(Code::GuardrailUnavailable.into())
        }
    };
    let Some(guard) = guard else {
        return unscanned(ctx);
    };
    let mut redactor = Redactor::new(guard.scanner, routes.policy.patterns.clone(), policy);
    let result = redactor.redact_json(&mut guard.scratch.borrow_mut(), body);
    match result {
        Ok(out) => {
            ctx.redacted = redactor.redacted();
            Ok((redactor.redacted() > 0).then(|| Bytes::from(out)))
        }
        Err(RedactError::Blocked { entity, .. }) => {
            ctx.guardrail_blocked = Some((entity, "request"));
            Err(code(entity).into())
        }
        Err(RedactError::Json(_)) => Err(Code::InvalidJson.into()),
        Err(RedactError::Scan(e)) => {
            tracing::error!(error = %e, "the guardrail scanner failed on a request");
            unscanned(ctx)
        }
    }
}
