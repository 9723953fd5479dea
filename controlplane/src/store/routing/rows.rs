//! The SQL side: rows to the operators' view, and rows to the records nodes hold.

use aigw_seal::Kek;
use aigw_wire::keys::Environment;
use aigw_wire::{PolicyRecord, RouteRecord, RouteTargetRecord, UpstreamRecord};
use rusqlite::{params, Connection, OptionalExtension};

use super::seal::open_credential;
use super::types::{Policy, Route, Upstream};
use super::{policy_id, record_id};
use crate::store::{tenant_exists, Store, StoreError};

fn conversion(col: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

const UPSTREAM_SELECT: &str = "SELECT id, tenant_id, environment, name, provider, base_url, credential_sealed, non_retention, stream_options, region, baa, max_connections, connect_timeout_ms, first_byte_timeout_ms, read_idle_timeout_ms, updated_at, pass_organization_headers FROM upstreams";

/// An upstream as stored: the operators' view, and the credential still sealed.
type StoredUpstream = (Upstream, Option<Vec<u8>>);

fn upstream_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredUpstream> {
    let nr: String = r.get(7)?;
    let sealed: Option<Vec<u8>> = r.get(6)?;
    let u = Upstream {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        environment: r.get(2)?,
        name: r.get(3)?,
        provider: r.get(4)?,
        base_url: r.get(5)?,
        has_credential: sealed.is_some(),
        non_retention: serde_json::from_str(&nr).map_err(|e| conversion(7, e))?,
        stream_options: r.get::<_, i64>(8)? != 0,
        region: r.get(9)?,
        baa: r.get::<_, i64>(10)? != 0,
        max_connections: r.get::<_, i64>(11)?.max(0) as u64,
        connect_timeout_ms: r.get::<_, i64>(12)?.max(0) as u64,
        first_byte_timeout_ms: r.get::<_, i64>(13)?.max(0) as u64,
        read_idle_timeout_ms: r.get::<_, i64>(14)?.max(0) as u64,
        updated_at: r.get(15)?,
        pass_organization_headers: r.get::<_, i64>(16)? != 0,
    };
    Ok((u, sealed))
}

pub(super) fn upstream_by_id(
    c: &Connection,
    id: &str,
) -> Result<Option<StoredUpstream>, StoreError> {
    Ok(c.query_row(
        &format!("{UPSTREAM_SELECT} WHERE id = ?1"),
        params![id],
        upstream_row,
    )
    .optional()?)
}

/// Upstream records as nodes hold them (credential opened): every one, or the one with `id`.
/// The KMS key a tenant seals under, if it has one.
pub(in crate::store) fn tenant_kms(
    c: &Connection,
    tenant_id: &str,
) -> Result<Option<crate::kms::KmsKey>, StoreError> {
    Ok(c.query_row(
        "SELECT key_id, region, endpoint FROM tenant_kms WHERE tenant_id = ?1",
        params![tenant_id],
        |r| {
            Ok(crate::kms::KmsKey {
                key_id: r.get(0)?,
                region: r.get(1)?,
                endpoint: r.get(2)?,
            })
        },
    )
    .optional()?)
}

/// An upstream record as read in the store's transaction, its credential still sealed.
/// Opening one sealed under its tenant's own KMS key may call that KMS (seconds, ten to
/// time out, at an endpoint the tenant chose), so it is opened only once the transaction
/// is over and the store's connection is free ([`Self::open`]): no other tenant's work
/// waits on one tenant's KMS.
pub(in crate::store) struct Unopened {
    record: UpstreamRecord,
    sealed: Option<Vec<u8>>,
    /// The tenant's own KMS key, read with the row, for a credential sealed under it.
    cmk: Option<crate::kms::KmsKey>,
}

impl Unopened {
    /// The record with its credential opened; `None` when it is sealed under its tenant's
    /// KMS key and that key does not answer (disabled, say): it is left out of what nodes
    /// hold, with a warning — that tenant's routes to it stop, and no other record waits.
    pub(in crate::store) fn open(
        self,
        kek: &Kek,
        kms: &crate::kms::Kms,
    ) -> Result<Option<UpstreamRecord>, StoreError> {
        let Self {
            mut record,
            sealed,
            cmk,
        } = self;
        record.credential = match sealed {
            Some(s) if super::seal::is_kms_sealed(&s) => {
                match open_credential(kek, cmk.as_ref().map(|k| (kms, k)), &record.id, &s) {
                    Ok(c) => Some(c),
                    Err(e @ StoreError::Kms(_)) => {
                        tracing::warn!(upstream = %record.id, error = %e, "left out of what nodes hold: its tenant's key does not open its credential");
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(s) => Some(open_credential(kek, None, &record.id, &s)?),
            None => None,
        };
        Ok(Some(record))
    }
}

/// Upstream records, their credentials still sealed (see [`Unopened`]).
pub(in crate::store) fn upstream_records(
    c: &Connection,
    id: Option<&str>,
) -> Result<Vec<Unopened>, StoreError> {
    let rows: Vec<StoredUpstream> = match id {
        Some(id) => upstream_by_id(c, id)?.into_iter().collect(),
        None => {
            let mut st = c.prepare(&format!("{UPSTREAM_SELECT} ORDER BY id"))?;
            let rows = st.query_map([], upstream_row)?;
            rows.collect::<Result<_, _>>()?
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for (u, sealed) in rows {
        let cmk = match &sealed {
            Some(s) if super::seal::is_kms_sealed(s) => tenant_kms(c, &u.tenant_id)?,
            _ => None,
        };
        out.push(Unopened {
            record: UpstreamRecord {
                non_retention: u.non_retention,
                id: u.id,
                tenant_id: u.tenant_id,
                environment: u.environment,
                name: u.name,
                provider: u.provider,
                base_url: u.base_url,
                credential: None,
                stream_options: u.stream_options,
                region: u.region,
                baa: u.baa,
                pass_organization_headers: u.pass_organization_headers,
                max_connections: u.max_connections,
                connect_timeout_ms: u.connect_timeout_ms,
                first_byte_timeout_ms: u.first_byte_timeout_ms,
                read_idle_timeout_ms: u.read_idle_timeout_ms,
            },
            sealed,
            cmk,
        });
    }
    Ok(out)
}

const ROUTE_SELECT: &str =
    "SELECT id, tenant_id, environment, name, model, prefix, targets, updated_at FROM routes";

fn route_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Route> {
    let targets: String = r.get(6)?;
    Ok(Route {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        environment: r.get(2)?,
        name: r.get(3)?,
        model: r.get(4)?,
        prefix: r.get(5)?,
        targets: serde_json::from_str(&targets).map_err(|e| conversion(6, e))?,
        updated_at: r.get(7)?,
    })
}

pub(super) fn route_by_id(c: &Connection, id: &str) -> Result<Option<Route>, StoreError> {
    Ok(c.query_row(
        &format!("{ROUTE_SELECT} WHERE id = ?1"),
        params![id],
        route_row,
    )
    .optional()?)
}

pub(super) fn routes_of(
    c: &Connection,
    tenant_id: &str,
    environment: Environment,
) -> Result<Vec<Route>, StoreError> {
    let mut st = c.prepare(&format!(
        "{ROUTE_SELECT} WHERE tenant_id = ?1 AND environment = ?2 ORDER BY name"
    ))?;
    let rows = st.query_map(params![tenant_id, environment.name()], route_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Route records as nodes hold them: every one, or the one with `id`.
pub(in crate::store) fn route_records(
    c: &Connection,
    id: Option<&str>,
) -> Result<Vec<RouteRecord>, StoreError> {
    let routes: Vec<Route> = match id {
        Some(id) => route_by_id(c, id)?.into_iter().collect(),
        None => {
            let mut st = c.prepare(&format!("{ROUTE_SELECT} ORDER BY id"))?;
            let rows = st.query_map([], route_row)?;
            rows.collect::<Result<_, _>>()?
        }
    };
    Ok(routes
        .into_iter()
        .map(|r| RouteRecord {
            id: r.id,
            tenant_id: r.tenant_id,
            environment: r.environment,
            model: r.model,
            prefix: r.prefix,
            targets: r
                .targets
                .into_iter()
                .map(|t| RouteTargetRecord {
                    upstream: t.upstream,
                    model: t.model,
                })
                .collect(),
        })
        .collect())
}

const POLICY_SELECT: &str =
    "SELECT id, tenant_id, environment, zero_retention, region, hipaa, updated_at, guardrails, revoke_leaked_keys, guardrails_fail_open, patterns FROM policies";

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Policy> {
    Ok(Policy {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        environment: r.get(2)?,
        zero_retention: r.get::<_, i64>(3)? != 0,
        region: r.get(4)?,
        hipaa: r.get::<_, i64>(5)? != 0,
        updated_at: r.get(6)?,
        // Written by this store from a checked spec; unreadable only if edited by hand, and
        // then no guardrail is better shown than a made-up one: the node is sent none.
        guardrails: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
        revoke_leaked_keys: r.get::<_, i64>(8)? != 0,
        guardrails_fail_open: r.get::<_, i64>(9)? != 0,
        // Written by this store from a checked spec (as `guardrails` above).
        patterns: serde_json::from_str(&r.get::<_, String>(10)?).unwrap_or_default(),
    })
}

/// Policy records as nodes hold them: every one set, or the one with `id`.
pub(in crate::store) fn policy_records(
    c: &Connection,
    id: Option<&str>,
) -> Result<Vec<PolicyRecord>, StoreError> {
    let policies: Vec<Policy> = match id {
        Some(id) => c
            .query_row(
                &format!("{POLICY_SELECT} WHERE id = ?1"),
                params![id],
                policy_row,
            )
            .optional()?
            .into_iter()
            .collect(),
        None => {
            let mut st = c.prepare(&format!("{POLICY_SELECT} ORDER BY id"))?;
            let rows = st.query_map([], policy_row)?;
            rows.collect::<Result<_, _>>()?
        }
    };
    Ok(policies
        .into_iter()
        .map(|p| PolicyRecord {
            id: p.id,
            tenant_id: p.tenant_id,
            environment: p.environment,
            zero_retention: p.zero_retention,
            region: p.region,
            hipaa: p.hipaa,
            guardrails: super::types::guardrail_records(&p.guardrails),
            guardrails_fail_open: p.guardrails_fail_open,
            patterns: p.patterns,
        })
        .collect())
}

pub(super) fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn policy_of(
    c: &Connection,
    tenant_id: &str,
    environment: Environment,
) -> Result<Policy, StoreError> {
    let id = policy_id(tenant_id, environment);
    Ok(c.query_row(
        &format!("{POLICY_SELECT} WHERE id = ?1"),
        params![id],
        policy_row,
    )
    .optional()?
    .unwrap_or(Policy {
        id,
        tenant_id: tenant_id.into(),
        environment: environment.name().into(),
        // Never set: zero retention, as nodes apply it.
        zero_retention: true,
        region: String::new(),
        hipaa: false,
        guardrails: Default::default(),
        revoke_leaked_keys: false,
        guardrails_fail_open: false,
        patterns: Vec::new(),
        updated_at: 0,
    }))
}

/// Reads for the admin API.
impl Store {
    pub fn upstream(
        &self,
        tenant_id: &str,
        environment: Environment,
        name: &str,
    ) -> Result<Upstream, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            Ok(upstream_by_id(c, &record_id(tenant_id, environment, name))?
                .ok_or(StoreError::NotFound("upstream"))?
                .0)
        })
    }

    /// An environment's upstreams, by name.
    pub fn upstreams(
        &self,
        tenant_id: &str,
        environment: Environment,
    ) -> Result<Vec<Upstream>, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            let mut st = c.prepare(&format!(
                "{UPSTREAM_SELECT} WHERE tenant_id = ?1 AND environment = ?2 ORDER BY name"
            ))?;
            let rows = st.query_map(params![tenant_id, environment.name()], upstream_row)?;
            Ok(rows.map(|r| r.map(|(u, _)| u)).collect::<Result<_, _>>()?)
        })
    }

    pub fn route(
        &self,
        tenant_id: &str,
        environment: Environment,
        name: &str,
    ) -> Result<Route, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            route_by_id(c, &record_id(tenant_id, environment, name))?
                .ok_or(StoreError::NotFound("route"))
        })
    }

    /// An environment's routes, by name.
    pub fn routes(
        &self,
        tenant_id: &str,
        environment: Environment,
    ) -> Result<Vec<Route>, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            routes_of(c, tenant_id, environment)
        })
    }

    /// An environment's policy; when it was never set, zero retention and every other field
    /// off.
    pub fn get_policy(
        &self,
        tenant_id: &str,
        environment: Environment,
    ) -> Result<Policy, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            policy_of(c, tenant_id, environment)
        })
    }
}
