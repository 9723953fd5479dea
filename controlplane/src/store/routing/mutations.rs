//! Writing routing records: each mutation checks the record with the rules every node
//! applies, then writes it, its changelog entry and its audit record in one transaction.

use aigw_wire::keys::Environment;
use rusqlite::params;

use super::rows::{as_i64, policy_of, route_by_id, routes_of, upstream_by_id};
use super::seal::seal_credential;
use super::types::{
    Deleted, Policy, PolicySpec, Route, RouteSpec, Upstream, UpstreamSpec, Written,
};
use super::{check, invalid, policy_id, record_id};
use crate::store::{audit, change, now, tenant_exists, Actor, Store, StoreError};

impl Store {
    /// Creates or replaces an upstream. Without `credential` the stored one is kept; an empty
    /// one removes it.
    pub fn put_upstream(
        &self,
        actor: &Actor,
        tenant_id: &str,
        environment: Environment,
        name: &str,
        spec: &UpstreamSpec,
    ) -> Result<Written<Upstream>, StoreError> {
        check::upstream(tenant_id, environment, name, spec)?;
        let id = record_id(tenant_id, environment, name);
        // Sealed before the transaction: the store's lock is not held over the encryption
        // (nor over a call to the tenant's KMS).
        let sealed_new = match spec.credential.as_deref() {
            Some(c) if !c.is_empty() => {
                let cmk = self.read(|c| super::rows::tenant_kms(c, tenant_id))?;
                Some(seal_credential(
                    &self.kek,
                    cmk.as_ref().map(|k| (&*self.kms, k)),
                    &id,
                    c,
                )?)
            }
            _ => None,
        };
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            let existing = upstream_by_id(tx, &id)?;
            let (sealed, credential_change) = match (spec.credential.as_deref(), existing) {
                (Some(""), Some((_, Some(_)))) => (None, "removed"),
                (Some(""), _) => (None, "none"),
                (Some(_), _) => (sealed_new, "set"),
                (None, Some((_, Some(kept)))) => (Some(kept), "kept"),
                (None, _) => (None, "none"),
            };
            let nr = serde_json::to_string(&spec.non_retention()).map_err(|e| invalid(format!("non_retention: {e}")))?;
            let values = params![
                id,
                tenant_id,
                environment.name(),
                name,
                spec.provider,
                spec.base_url,
                sealed,
                nr,
                i64::from(spec.stream_options),
                spec.region,
                i64::from(spec.baa),
                as_i64(spec.max_connections),
                as_i64(spec.connect_timeout_ms),
                as_i64(spec.first_byte_timeout_ms),
                as_i64(spec.read_idle_timeout_ms),
                now(),
                i64::from(spec.pass_organization_headers),
            ];
            let updated = tx.execute(
                "UPDATE upstreams SET tenant_id = ?2, environment = ?3, name = ?4, provider = ?5, base_url = ?6,
                    credential_sealed = ?7, non_retention = ?8, stream_options = ?9, region = ?10, baa = ?11,
                    max_connections = ?12, connect_timeout_ms = ?13, first_byte_timeout_ms = ?14,
                    read_idle_timeout_ms = ?15, updated_at = ?16, pass_organization_headers = ?17
                 WHERE id = ?1",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO upstreams (id, tenant_id, environment, name, provider, base_url, credential_sealed,
                        non_retention, stream_options, region, baa, max_connections, connect_timeout_ms,
                        first_byte_timeout_ms, read_idle_timeout_ms, updated_at, pass_organization_headers)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                    values,
                )?;
            }
            let revision = change(tx, "upstream", &id, "upsert")?;
            audit(
                tx,
                actor,
                "upstream.put",
                &id,
                serde_json::json!({
                    "tenant_id": tenant_id,
                    "environment": environment.name(),
                    "name": name,
                    "provider": spec.provider,
                    "base_url": spec.base_url,
                    "credential": credential_change,
                    "non_retention": spec.non_retention().mode(),
                    "region": spec.region,
                    "baa": spec.baa,
                    "created": updated == 0,
                }),
            )?;
            let (record, _) = upstream_by_id(tx, &id)?.ok_or(StoreError::NotFound("upstream"))?;
            Ok(Written { record, revision })
        })
    }

    /// Deletes an upstream no route of its environment names.
    pub fn delete_upstream(
        &self,
        actor: &Actor,
        tenant_id: &str,
        environment: Environment,
        name: &str,
    ) -> Result<Deleted, StoreError> {
        let id = record_id(tenant_id, environment, name);
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            if upstream_by_id(tx, &id)?.is_none() {
                return Err(StoreError::NotFound("upstream"));
            }
            let users: Vec<String> = routes_of(tx, tenant_id, environment)?
                .into_iter()
                .filter(|r| r.targets.iter().any(|t| t.upstream == name))
                .map(|r| r.name)
                .collect();
            if !users.is_empty() {
                return Err(StoreError::Conflict(format!(
                    "upstream {name} is a target of route(s) {}; change or delete them first",
                    users.join(", ")
                )));
            }
            tx.execute("DELETE FROM upstreams WHERE id = ?1", params![id])?;
            let revision = change(tx, "upstream", &id, "delete")?;
            audit(
                tx,
                actor,
                "upstream.delete",
                &id,
                serde_json::json!({"tenant_id": tenant_id, "environment": environment.name(), "name": name}),
            )?;
            Ok(Deleted { deleted: id.clone(), revision })
        })
    }

    /// Creates or replaces a route. Every target must name an upstream of the same
    /// environment; no other route of the environment may route the same model or prefix.
    pub fn put_route(
        &self,
        actor: &Actor,
        tenant_id: &str,
        environment: Environment,
        name: &str,
        spec: &RouteSpec,
    ) -> Result<Written<Route>, StoreError> {
        check::route(tenant_id, environment, name, spec)?;
        let id = record_id(tenant_id, environment, name);
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            for (i, t) in spec.targets.iter().enumerate() {
                if upstream_by_id(tx, &record_id(tenant_id, environment, &t.upstream))?.is_none() {
                    return Err(invalid(format!(
                        "targets[{i}].upstream: no upstream named {:?} in {}/{}",
                        t.upstream,
                        tenant_id,
                        environment.name()
                    )));
                }
            }
            for other in routes_of(tx, tenant_id, environment)? {
                if other.id == id {
                    continue;
                }
                if spec.model.is_some() && other.model == spec.model {
                    return Err(StoreError::Conflict(format!(
                        "model: route {} already routes {:?}",
                        other.name,
                        spec.model.as_deref().unwrap_or_default()
                    )));
                }
                if spec.prefix.is_some() && other.prefix == spec.prefix {
                    return Err(StoreError::Conflict(format!(
                        "prefix: route {} already routes the prefix {:?}",
                        other.name,
                        spec.prefix.as_deref().unwrap_or_default()
                    )));
                }
            }
            let targets = serde_json::to_string(&spec.targets).map_err(|e| invalid(format!("targets: {e}")))?;
            let values = params![
                id,
                tenant_id,
                environment.name(),
                name,
                spec.model,
                spec.prefix,
                targets,
                now()
            ];
            let updated = tx.execute(
                "UPDATE routes SET tenant_id = ?2, environment = ?3, name = ?4, model = ?5, prefix = ?6,
                    targets = ?7, updated_at = ?8
                 WHERE id = ?1",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO routes (id, tenant_id, environment, name, model, prefix, targets, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    values,
                )?;
            }
            let revision = change(tx, "route", &id, "upsert")?;
            audit(
                tx,
                actor,
                "route.put",
                &id,
                serde_json::json!({
                    "tenant_id": tenant_id,
                    "environment": environment.name(),
                    "name": name,
                    "model": spec.model,
                    "prefix": spec.prefix,
                    "targets": spec.targets,
                    "created": updated == 0,
                }),
            )?;
            let record = route_by_id(tx, &id)?.ok_or(StoreError::NotFound("route"))?;
            Ok(Written { record, revision })
        })
    }

    pub fn delete_route(
        &self,
        actor: &Actor,
        tenant_id: &str,
        environment: Environment,
        name: &str,
    ) -> Result<Deleted, StoreError> {
        let id = record_id(tenant_id, environment, name);
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            if tx.execute("DELETE FROM routes WHERE id = ?1", params![id])? == 0 {
                return Err(StoreError::NotFound("route"));
            }
            let revision = change(tx, "route", &id, "delete")?;
            audit(
                tx,
                actor,
                "route.delete",
                &id,
                serde_json::json!({"tenant_id": tenant_id, "environment": environment.name(), "name": name}),
            )?;
            Ok(Deleted { deleted: id.clone(), revision })
        })
    }

    /// Sets an environment's policy (every field replaced).
    pub fn put_policy(
        &self,
        actor: &Actor,
        tenant_id: &str,
        environment: Environment,
        spec: &PolicySpec,
    ) -> Result<Written<Policy>, StoreError> {
        check::policy(tenant_id, environment, spec)?;
        let guardrails =
            super::types::guardrail_views(&spec.guardrails).map_err(StoreError::Invalid)?;
        let guardrails_json = serde_json::to_string(&guardrails).unwrap_or_else(|_| "{}".into());
        let id = policy_id(tenant_id, environment);
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            let before = policy_of(tx, tenant_id, environment)?;
            let values = params![
                id,
                tenant_id,
                environment.name(),
                i64::from(spec.zero_retention),
                spec.region,
                i64::from(spec.hipaa),
                now(),
                guardrails_json,
                i64::from(spec.revoke_leaked_keys),
                i64::from(spec.guardrails_fail_open),
                serde_json::to_string(&spec.patterns).unwrap_or_else(|_| "[]".into())
            ];
            let updated = tx.execute(
                "UPDATE policies SET tenant_id = ?2, environment = ?3, zero_retention = ?4, region = ?5,
                    hipaa = ?6, updated_at = ?7, guardrails = ?8, revoke_leaked_keys = ?9,
                    guardrails_fail_open = ?10, patterns = ?11
                 WHERE id = ?1",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO policies (id, tenant_id, environment, zero_retention, region, hipaa, updated_at, guardrails, revoke_leaked_keys, guardrails_fail_open, patterns)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    values,
                )?;
            }
            let revision = change(tx, "policy", &id, "upsert")?;
            audit(
                tx,
                actor,
                "policy.put",
                &id,
                serde_json::json!({
                    "tenant_id": tenant_id,
                    "environment": environment.name(),
                    "zero_retention": spec.zero_retention,
                    "region": spec.region,
                    "hipaa": spec.hipaa,
                    "guardrails": guardrails,
                    "revoke_leaked_keys": spec.revoke_leaked_keys,
                    "guardrails_fail_open": spec.guardrails_fail_open,
                    "patterns": spec.patterns,
                }),
            )?;
            if before.zero_retention && !spec.zero_retention {
                // The opt-out from zero retention, on its own line of the audit log.
                audit(
                    tx,
                    actor,
                    "policy.zero_retention_opt_out",
                    &id,
                    serde_json::json!({
                        "tenant_id": tenant_id,
                        "environment": environment.name(),
                    }),
                )?;
            }
            let record = policy_of(tx, tenant_id, environment)?;
            Ok(Written { record, revision })
        })
    }
}
