//! An environment's routing: its table, and the policy that filters it.

use std::sync::Arc;

use crate::config::routing::{RouteTable, Targets};
use crate::config::ProviderKind;
use crate::upstream::Upstream;

/// What an environment's requests must never do.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Only upstreams that can be told not to retain (or have an agreement).
    pub zero_retention: bool,
    /// Only upstreams in this region; empty = any.
    pub region: String,
    /// Only upstreams under a business associate agreement.
    pub hipaa: bool,
    pub guardrails: Guardrails,
    /// The tenant's own patterns (the `custom` entity), compiled off the workers.
    pub patterns: Option<crate::pii::TenantPatterns>,
}

/// PII and secret guardrails: what is done with each entity found in a request before it
/// leaves, and in a response before it reaches the client. `None`: nothing is looked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guardrails {
    pub requests: Option<crate::pii::Policy>,
    pub responses: Option<crate::pii::Policy>,
    /// When the scanner cannot run or fails, relay unscanned (reported) instead of
    /// refusing.
    pub fail_open: bool,
}

impl Guardrails {
    /// The same guardrails, failing open or closed.
    pub fn fail_open(self, fail_open: bool) -> Self {
        Self { fail_open, ..self }
    }

    /// From the pushed record (entities already checked; an unknown one is ignored).
    pub fn from_records(records: &[aigw_wire::GuardrailRecord]) -> Self {
        use crate::pii::{Action, Entity, Policy};
        let action = |a: aigw_wire::GuardrailAction| match a {
            aigw_wire::GuardrailAction::Allow => Action::Allow,
            aigw_wire::GuardrailAction::Redact => Action::Redact,
            aigw_wire::GuardrailAction::Block => Action::Block,
        };
        let none = Entity::ALL
            .iter()
            .fold(Policy::default(), |p, e| p.with(*e, Action::Allow));
        let (mut requests, mut responses) = (none, none);
        for r in records {
            let Some(e) = Entity::from_name(&r.entity) else {
                continue;
            };
            requests = requests.with(e, action(r.requests));
            responses = responses.with(e, action(r.responses));
        }
        let active = |p: Policy| (p != none).then_some(p);
        Self {
            requests: active(requests),
            responses: active(responses),
            fail_open: false,
        }
    }
}

impl Policy {
    /// The policy of an environment its tenant set none for: zero retention (a tenant opts
    /// out explicitly, and the control plane audits it), nothing else.
    pub fn unset() -> Self {
        Self {
            zero_retention: true,
            ..Self::default()
        }
    }

    /// Why `up` may not serve this environment, if it may not.
    pub fn refuses(&self, up: &Upstream) -> Option<&'static str> {
        if self.zero_retention && !up.non_retention.is_guaranteed() {
            return Some("zero retention");
        }
        if !self.region.is_empty() && up.region != self.region {
            return Some("region");
        }
        if self.hipaa && !up.baa {
            return Some("HIPAA");
        }
        None
    }
}

/// One environment's routing: its table and its policy.
#[derive(Debug, Default)]
pub struct EnvRoutes {
    pub table: RouteTable,
    pub policy: Policy,
    /// The environment's policy record could not be applied: nothing is routed (a policy
    /// is never ignored).
    pub broken_policy: Option<Arc<str>>,
}

/// Why a model has no target in an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTarget {
    /// No route matches the model (for this API).
    NoRoute,
    /// Routes match, but the policy refuses every upstream they name.
    Policy(&'static str),
    /// The route, or the environment's policy, is a record this node could not apply.
    Unusable(Arc<str>),
}

impl EnvRoutes {
    /// Targets for `model` on `kind` that the policy allows, in failover order.
    pub fn lookup(&self, model: &str, kind: ProviderKind) -> Result<Targets<'_>, NoTarget> {
        if let Some(why) = &self.broken_policy {
            return Err(NoTarget::Unusable(Arc::clone(why)));
        }
        let all = self.table.lookup(model, kind)?;
        let mut refused = None;
        let allowed: Targets<'_> = all
            .into_iter()
            .filter(|t| match self.policy.refuses(&t.upstream) {
                None => true,
                Some(why) => {
                    refused = Some(why);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), refused) {
            (true, Some(why)) => Err(NoTarget::Policy(why)),
            (true, None) => Err(NoTarget::NoRoute),
            (false, _) => Ok(allowed),
        }
    }
}
