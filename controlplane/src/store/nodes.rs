//! Data-plane nodes as the control plane knows them: each has an id (its client
//! certificate's common name), a scope (the environments, and optionally tenants, whose keys
//! and routing it receives) and, once enrolled, the SHA-256 fingerprint of its certificate.
//! A node enrols once with a one-time enrolment token (kept only as a hash, valid for a
//! limited time); it can be revoked on its own. Every change is audited.

use aigw_wire::keys::Environment;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{audit, now, Actor, Store, StoreError};

/// How long an enrolment token is valid by default, in seconds.
pub const ENROLLMENT_TTL: i64 = 3600;
/// Longest an enrolment token may be made valid for, in seconds.
pub(super) const MAX_ENROLLMENT_TTL: i64 = 7 * 86_400;

/// What a node receives: the keys, upstreams, routes and policies of these environments
/// (all three when empty) and tenants (every tenant when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeScope {
    #[serde(default)]
    pub environments: Vec<String>,
    #[serde(default)]
    pub tenants: Vec<String>,
}

impl NodeScope {
    fn check(&self) -> Result<(), StoreError> {
        for e in &self.environments {
            if Environment::from_name(e).is_none() {
                return Err(StoreError::Invalid(format!(
                    "environments: unknown environment {e:?}"
                )));
            }
        }
        if self.tenants.len() > 1000 || self.tenants.iter().any(|t| t.is_empty() || t.len() > 128) {
            return Err(StoreError::Invalid(
                "tenants: at most 1000 tenant ids of 1 to 128 characters".into(),
            ));
        }
        Ok(())
    }

    /// Whether a record of `tenant`'s `environment` is in this scope.
    /// Whether the node serves some environment of `tenant`.
    pub fn covers_tenant(&self, tenant: &str) -> bool {
        self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant)
    }

    pub fn covers(&self, tenant: &str, environment: &str) -> bool {
        (self.environments.is_empty() || self.environments.iter().any(|e| e == environment))
            && (self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant))
    }
}

/// A node as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub scope: NodeScope,
    pub revoked: bool,
    /// SHA-256 of its client certificate (hex), once enrolled.
    pub cert_sha256: Option<String>,
    pub created_at: i64,
    /// Unix seconds UTC; 0 before enrolment.
    pub enrolled_at: i64,
}

/// SHA-256 of a certificate (DER), as the store keeps it.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeInfo> {
    let envs: String = r.get(1)?;
    let tenants: String = r.get(2)?;
    Ok(NodeInfo {
        id: r.get(0)?,
        scope: NodeScope {
            environments: serde_json::from_str(&envs).unwrap_or_default(),
            tenants: serde_json::from_str(&tenants).unwrap_or_default(),
        },
        revoked: r.get::<_, i64>(3)? != 0,
        cert_sha256: r.get(4)?,
        created_at: r.get(5)?,
        enrolled_at: r.get(6)?,
    })
}

const NODE_SELECT: &str =
    "SELECT id, environments, tenants, revoked, cert_sha256, created_at, enrolled_at FROM nodes";

fn node_by_id(c: &Connection, id: &str) -> Result<Option<NodeInfo>, StoreError> {
    Ok(c.query_row(
        &format!("{NODE_SELECT} WHERE id = ?1"),
        params![id],
        node_row,
    )
    .optional()?)
}

/// A new enrolment token: shown once, stored as its hash.
fn new_token(c: &Connection, node_id: &str, ttl: i64) -> Result<String, StoreError> {
    let token = format!(
        "aigw_enroll_{}",
        crate::keys::random_id(40).map_err(|e| StoreError::Invalid(format!("random: {e}")))?
    );
    c.execute(
        "INSERT INTO node_enrollments (token_hash, node_id, expires_at, used_at) VALUES (?1, ?2, ?3, 0)",
        params![token_hash(&token), node_id, now() + ttl],
    )?;
    Ok(token)
}

impl Store {
    /// Registers a node (or, for one not yet enrolled or revoked, replaces its scope) and
    /// issues an enrolment token valid for `ttl` seconds.
    pub fn add_node(
        &self,
        actor: &Actor,
        id: &str,
        scope: &NodeScope,
        ttl: Option<i64>,
    ) -> Result<(NodeInfo, String), StoreError> {
        aigw_wire::rules::check_name("id", id)?;
        scope.check()?;
        let ttl = ttl.unwrap_or(ENROLLMENT_TTL);
        if !(1..=MAX_ENROLLMENT_TTL).contains(&ttl) {
            return Err(StoreError::Invalid(format!(
                "expires_in_seconds: 1 to {MAX_ENROLLMENT_TTL}"
            )));
        }
        self.with_tx(|tx| {
            if let Some(n) = node_by_id(tx, id)? {
                if n.cert_sha256.is_some() && !n.revoked {
                    return Err(StoreError::Conflict(format!(
                        "node {id} is enrolled; revoke it first, or re-enrol it with POST /v1/nodes/{id}/enrollment"
                    )));
                }
                // Tokens issued for it before are void: only the new one enrols it.
                tx.execute(
                    "UPDATE node_enrollments SET used_at = ?2 WHERE node_id = ?1 AND used_at = 0",
                    params![id, now()],
                )?;
            }
            tx.execute(
                "INSERT INTO nodes (id, environments, tenants, revoked, cert_sha256, created_at, enrolled_at) VALUES (?1, ?2, ?3, 0, NULL, ?4, 0)
                 ON CONFLICT (id) DO UPDATE SET environments = ?2, tenants = ?3, revoked = 0, cert_sha256 = NULL, created_at = ?4, enrolled_at = 0",
                params![
                    id,
                    serde_json::to_string(&scope.environments).unwrap_or_else(|_| "[]".into()),
                    serde_json::to_string(&scope.tenants).unwrap_or_else(|_| "[]".into()),
                    now()
                ],
            )?;
            let token = new_token(tx, id, ttl)?;
            audit(
                tx,
                actor,
                "node.add",
                id,
                serde_json::json!({"scope": scope, "enrollment_expires_in": ttl}),
            )?;
            let info = node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))?;
            Ok((info, token))
        })
    }

    /// A new enrolment token for an existing node (a lost or replaced certificate): its
    /// current certificate stays valid until the node enrols with the new one.
    pub fn reenroll_node(
        &self,
        actor: &Actor,
        id: &str,
        ttl: Option<i64>,
    ) -> Result<String, StoreError> {
        let ttl = ttl.unwrap_or(ENROLLMENT_TTL);
        if !(1..=MAX_ENROLLMENT_TTL).contains(&ttl) {
            return Err(StoreError::Invalid(format!(
                "expires_in_seconds: 1 to {MAX_ENROLLMENT_TTL}"
            )));
        }
        self.with_tx(|tx| {
            let n = node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))?;
            if n.revoked {
                return Err(StoreError::Conflict(format!(
                    "node {id} is revoked; add it again to enrol it anew"
                )));
            }
            let token = new_token(tx, id, ttl)?;
            audit(
                tx,
                actor,
                "node.enrollment",
                id,
                serde_json::json!({"expires_in": ttl}),
            )?;
            Ok(token)
        })
    }

    /// The node an enrolment token was issued for, if it is valid (unused, unexpired, the
    /// node not revoked). Read only: [`Store::complete_enrollment`] consumes it.
    pub fn enrollment(&self, token: &str) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            let id: Option<String> = c
                .query_row(
                    "SELECT e.node_id FROM node_enrollments e JOIN nodes n ON n.id = e.node_id
                     WHERE e.token_hash = ?1 AND e.used_at = 0 AND e.expires_at > ?2 AND n.revoked = 0",
                    params![token_hash(token), now()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(id)
        })
    }

    /// Consumes an enrolment token and records the certificate issued with it; the
    /// node's previous certificate, if any, is no longer accepted.
    pub fn complete_enrollment(
        &self,
        token: &str,
        cert_sha256: &str,
        source: &str,
    ) -> Result<NodeInfo, StoreError> {
        self.with_tx(|tx| {
            let hash = token_hash(token);
            let id: Option<String> = tx
                .query_row(
                    "SELECT node_id FROM node_enrollments WHERE token_hash = ?1 AND used_at = 0 AND expires_at > ?2",
                    params![hash, now()],
                    |r| r.get(0),
                )
                .optional()?;
            let id = id.ok_or_else(|| {
                StoreError::Invalid("the enrolment token is not valid (used, expired or unknown)".into())
            })?;
            let node = node_by_id(tx, &id)?.ok_or(StoreError::NotFound("node"))?;
            if node.revoked {
                return Err(StoreError::Invalid(format!("node {id} is revoked")));
            }
            tx.execute(
                "UPDATE node_enrollments SET used_at = ?2 WHERE token_hash = ?1",
                params![hash, now()],
            )?;
            tx.execute(
                "UPDATE nodes SET cert_sha256 = ?2, enrolled_at = ?3 WHERE id = ?1",
                params![id, cert_sha256, now()],
            )?;
            audit(
                tx,
                &Actor {
                    principal: format!("node:{id}"),
                    source: source.to_string(),
                },
                "node.enrolled",
                &id,
                serde_json::json!({"cert_sha256": cert_sha256}),
            )?;
            node_by_id(tx, &id)?.ok_or(StoreError::NotFound("node"))
        })
    }

    /// Records a certificate issued to a node directly (provisioned without the network
    /// enrolment), replacing the previous one.
    pub fn set_node_certificate(
        &self,
        actor: &Actor,
        id: &str,
        cert_sha256: &str,
    ) -> Result<NodeInfo, StoreError> {
        self.with_tx(|tx| {
            let n = node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))?;
            if n.revoked {
                return Err(StoreError::Conflict(format!("node {id} is revoked")));
            }
            tx.execute(
                "UPDATE nodes SET cert_sha256 = ?2, enrolled_at = ?3 WHERE id = ?1",
                params![id, cert_sha256, now()],
            )?;
            audit(
                tx,
                actor,
                "node.certificate",
                id,
                serde_json::json!({"cert_sha256": cert_sha256}),
            )?;
            node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))
        })
    }

    /// The enrolled, unrevoked node whose certificate has this fingerprint.
    pub fn node_by_certificate(&self, cert_sha256: &str) -> Result<Option<NodeInfo>, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                &format!("{NODE_SELECT} WHERE cert_sha256 = ?1 AND revoked = 0"),
                params![cert_sha256],
                node_row,
            )
            .optional()?)
        })
    }

    /// Revokes a node: its certificate is no longer accepted, its pending enrolments void.
    pub fn revoke_node(&self, actor: &Actor, id: &str) -> Result<NodeInfo, StoreError> {
        self.with_tx(|tx| {
            if node_by_id(tx, id)?.is_none() {
                return Err(StoreError::NotFound("node"));
            }
            tx.execute("UPDATE nodes SET revoked = 1 WHERE id = ?1", params![id])?;
            tx.execute(
                "UPDATE node_enrollments SET used_at = ?2 WHERE node_id = ?1 AND used_at = 0",
                params![id, now()],
            )?;
            audit(tx, actor, "node.revoke", id, serde_json::json!({}))?;
            node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))
        })
    }

    /// Replaces a node's scope; its next sync sends it a snapshot of the new scope.
    pub fn set_node_scope(
        &self,
        actor: &Actor,
        id: &str,
        scope: &NodeScope,
    ) -> Result<NodeInfo, StoreError> {
        scope.check()?;
        self.with_tx(|tx| {
            if node_by_id(tx, id)?.is_none() {
                return Err(StoreError::NotFound("node"));
            }
            tx.execute(
                "UPDATE nodes SET environments = ?2, tenants = ?3 WHERE id = ?1",
                params![
                    id,
                    serde_json::to_string(&scope.environments).unwrap_or_else(|_| "[]".into()),
                    serde_json::to_string(&scope.tenants).unwrap_or_else(|_| "[]".into()),
                ],
            )?;
            audit(
                tx,
                actor,
                "node.scope",
                id,
                serde_json::json!({"scope": scope}),
            )?;
            node_by_id(tx, id)?.ok_or(StoreError::NotFound("node"))
        })
    }

    /// Every registered node, by id.
    pub fn registered_nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(&format!("{NODE_SELECT} ORDER BY id"))?;
            let rows = st.query_map([], node_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn node(&self, id: &str) -> Result<NodeInfo, StoreError> {
        self.read(|c| node_by_id(c, id)?.ok_or(StoreError::NotFound("node")))
    }
}
