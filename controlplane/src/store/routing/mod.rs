//! What each environment of a tenant routes: its upstreams (with their provider credentials,
//! sealed at rest), its routes, and its policy. Record ids are `{tenant}/{environment}/{name}`
//! for upstreams and routes and `{tenant}/{environment}` for policies.
//!
//! - [`types`]: the records as the admin API reads and writes them;
//! - [`check`] (here): every record is checked with the rules nodes apply
//!   ([`aigw_wire::rules`]) before it is written, so a node never refuses what was committed;
//! - [`seal`]: credentials sealed with AES-256-GCM, bound to their upstream's id;
//! - [`rows`]: the SQL, and the records pushed to nodes;
//! - [`mutations`]: puts and deletes, each with its changelog entry and audit record in one
//!   transaction.
//!
//! A credential leaves the store only in the records pushed to nodes (over TLS), never in
//! what the admin API returns, never in audit records, never in logs.

mod mutations;
mod rows;
mod seal;
mod types;

#[cfg(test)]
mod tests;

use aigw_wire::keys::Environment;
use aigw_wire::rules::{self, RuleError};
use aigw_wire::{PolicyRecord, RouteRecord, RouteTargetRecord, UpstreamRecord};

pub(super) use rows::{policy_records, route_records, tenant_kms, upstream_records, Unopened};
pub(super) use seal::{check_seal_key, is_kms_sealed};
pub use types::{
    Deleted, Policy, PolicySpec, Route, RouteSpec, RouteTarget, Upstream, UpstreamSpec, Written,
};

pub use aigw_wire::rules::NAME_RULE;
pub use aigw_wire::NonRetention;

use super::StoreError;

fn invalid(m: impl Into<String>) -> StoreError {
    StoreError::Invalid(m.into())
}

impl From<RuleError> for StoreError {
    fn from(e: RuleError) -> Self {
        StoreError::Invalid(e.to_string())
    }
}

fn record_id(tenant_id: &str, environment: Environment, name: &str) -> String {
    format!("{tenant_id}/{}/{name}", environment.name())
}

fn policy_id(tenant_id: &str, environment: Environment) -> String {
    format!("{tenant_id}/{}", environment.name())
}

/// The records a PUT would push, checked with the rules every node applies to them.
mod check {
    use super::*;

    /// The upstream record `spec` becomes (with the credential it carries, if any).
    pub(super) fn upstream(
        tenant_id: &str,
        environment: Environment,
        name: &str,
        spec: &UpstreamSpec,
    ) -> Result<(), StoreError> {
        let record = UpstreamRecord {
            id: record_id(tenant_id, environment, name),
            tenant_id: tenant_id.to_string(),
            environment: environment.name().to_string(),
            name: name.to_string(),
            provider: spec.provider.clone(),
            base_url: spec.base_url.clone(),
            // Empty removes the stored credential; absent keeps it (checked when it was set).
            credential: spec.credential.clone().filter(|c| !c.is_empty()),
            non_retention: spec.non_retention(),
            stream_options: spec.stream_options,
            region: spec.region.clone(),
            baa: spec.baa,
            pass_organization_headers: spec.pass_organization_headers,
            max_connections: spec.max_connections,
            connect_timeout_ms: spec.connect_timeout_ms,
            first_byte_timeout_ms: spec.first_byte_timeout_ms,
            read_idle_timeout_ms: spec.read_idle_timeout_ms,
        };
        rules::check_upstream(&record)?;
        Ok(())
    }

    pub(super) fn route(
        tenant_id: &str,
        environment: Environment,
        name: &str,
        spec: &RouteSpec,
    ) -> Result<(), StoreError> {
        rules::check_name("name", name)?;
        rules::check_route(&RouteRecord {
            id: record_id(tenant_id, environment, name),
            tenant_id: tenant_id.to_string(),
            environment: environment.name().to_string(),
            model: spec.model.clone(),
            prefix: spec.prefix.clone(),
            targets: spec
                .targets
                .iter()
                .map(|t| RouteTargetRecord {
                    upstream: t.upstream.clone(),
                    model: t.model.clone(),
                })
                .collect(),
        })?;
        Ok(())
    }

    pub(super) fn policy(
        tenant_id: &str,
        environment: Environment,
        spec: &PolicySpec,
    ) -> Result<(), StoreError> {
        rules::check_policy(&PolicyRecord {
            id: policy_id(tenant_id, environment),
            tenant_id: tenant_id.to_string(),
            environment: environment.name().to_string(),
            zero_retention: spec.zero_retention,
            region: spec.region.clone(),
            hipaa: spec.hipaa,
            guardrails: types::guardrail_records(
                &types::guardrail_views(&spec.guardrails).map_err(StoreError::Invalid)?,
            ),
            guardrails_fail_open: spec.guardrails_fail_open,
            patterns: spec.patterns.clone(),
        })?;
        // Nodes compile the patterns with Hyperscan; what no regular-expression parser
        // reads is refused here, naming it, rather than left for every node to refuse.
        for (i, p) in spec.patterns.iter().enumerate() {
            if let Err(e) = regex_syntax::Parser::new().parse(p) {
                return Err(StoreError::Invalid(format!("patterns[{i}]: {e}")));
            }
        }
        Ok(())
    }
}
