//! The control plane's store: SQLite by default, under the data directory.
//!
//! Every mutation runs in one transaction that also appends its changelog entry (the global,
//! monotonically increasing revision nodes sync from) and its audit record (who, what, when,
//! from where). Either all three are written or none is. The SQL is kept portable (no
//! SQLite-only features beyond `INSERT OR IGNORE`-free plain statements) so a PostgreSQL
//! store can share it.
//!
//! The revision is a counter of its own (in `meta`), not the changelog's largest entry, so it
//! keeps increasing after old changelog entries are compacted away. `compacted_through` is the
//! newest revision deleted by compaction: a node holding an older revision cannot be caught up
//! from the changelog and gets a snapshot instead.

mod bodies;
mod caps;
mod nodes;
mod prices;
mod routing;
mod tenant_keys;
mod usage;

use std::path::Path;
use std::sync::{Arc, Mutex};

use aigw_seal::Kek;
use aigw_wire::keys::Environment;
use aigw_wire::messages::kinds;
use aigw_wire::{Change, KeyRecord, KeyStatus, Record, Tombstone};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

pub use bodies::{
    BodyLogChecks, BodyLogSettings, BodyLogSpec, IndexRow, RecordPlace, SegmentRow, WhenBehind,
};

pub use caps::{cap_id, Cap, CapSpec};
pub use nodes::{fingerprint, NodeInfo, NodeScope, ENROLLMENT_TTL};
pub use prices::{Price, PriceSpec};
pub use routing::{
    Deleted, NonRetention, Policy, PolicySpec, Route, RouteSpec, RouteTarget, Upstream,
    UpstreamSpec, Written, NAME_RULE,
};
pub use usage::{
    day_name, parse_day, Dim, UsageQuery, UsageRow, MAX_QUERY_DAYS, REPORT_MEMORY_DAYS,
};

/// Migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE sub_accounts (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    parent_id TEXT REFERENCES sub_accounts(id),
    name TEXT NOT NULL,
    depth INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    sub_account_id TEXT REFERENCES sub_accounts(id),
    name TEXT NOT NULL,
    hash_version INTEGER NOT NULL,
    hash BLOB NOT NULL,
    status TEXT NOT NULL,
    allowed_models TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    grace_ends_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL,
    replaced_by TEXT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);
CREATE TABLE changelog (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    record_id TEXT NOT NULL,
    op TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) SELECT 'revision', COALESCE(MAX(revision), 0) FROM changelog;
INSERT INTO meta (name, value) VALUES ('compacted_through', 0);
CREATE TABLE upstreams (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    base_url TEXT NOT NULL,
    credential_sealed BLOB,
    non_retention TEXT NOT NULL,
    stream_options INTEGER NOT NULL,
    region TEXT NOT NULL,
    baa INTEGER NOT NULL,
    max_connections INTEGER NOT NULL,
    connect_timeout_ms INTEGER NOT NULL,
    first_byte_timeout_ms INTEGER NOT NULL,
    read_idle_timeout_ms INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX upstreams_environment ON upstreams(tenant_id, environment);
CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    name TEXT NOT NULL,
    model TEXT,
    prefix TEXT,
    targets TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX routes_environment ON routes(tenant_id, environment);
CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment TEXT NOT NULL,
    zero_retention INTEGER NOT NULL,
    region TEXT NOT NULL,
    hipaa INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE upstreams ADD COLUMN pass_organization_headers INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE changelog ADD COLUMN revision_id INTEGER NOT NULL DEFAULT 0;
INSERT INTO meta (name, value) VALUES ('revision_id', 0);
"#,
    r#"
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    environments TEXT NOT NULL,
    tenants TEXT NOT NULL,
    revoked INTEGER NOT NULL,
    cert_sha256 TEXT,
    created_at INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL
);
CREATE INDEX nodes_cert ON nodes(cert_sha256);
CREATE TABLE node_enrollments (
    token_hash BLOB PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(id),
    expires_at INTEGER NOT NULL,
    used_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE usage_reports (
    node_id TEXT NOT NULL,
    boot_epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (node_id, boot_epoch, seq)
) WITHOUT ROWID;
CREATE INDEX usage_reports_received ON usage_reports(received_at);
CREATE TABLE usage_daily (
    day INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    sub_account_id TEXT,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    estimated_requests INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    latency BLOB NOT NULL,
    ttfb BLOB NOT NULL,
    PRIMARY KEY (day, key_id, model)
);
CREATE INDEX usage_daily_tenant ON usage_daily(tenant_id, day);
"#,
    r#"
CREATE TABLE prices (
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    input INTEGER NOT NULL,
    output INTEGER NOT NULL,
    cached_input INTEGER NOT NULL,
    cache_write INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, model)
);
ALTER TABLE usage_daily ADD COLUMN unpriced_requests INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE policies ADD COLUMN guardrails TEXT NOT NULL DEFAULT '{}';
"#,
    r#"
ALTER TABLE api_keys ADD COLUMN requests_per_minute INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN tokens_per_minute INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE api_keys ADD COLUMN leaked_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE policies ADD COLUMN revoke_leaked_keys INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
CREATE TABLE spend_caps (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    period TEXT NOT NULL,
    limit_micros INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX spend_caps_tenant ON spend_caps(tenant_id);
CREATE TABLE cap_leases (
    cap_id TEXT NOT NULL,
    period INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    granted INTEGER NOT NULL,
    PRIMARY KEY (cap_id, period, node_id)
) WITHOUT ROWID;
CREATE INDEX usage_daily_key ON usage_daily(key_id, day);
CREATE INDEX usage_daily_sub_account ON usage_daily(sub_account_id, day);
"#,
    r#"
ALTER TABLE sub_accounts ADD COLUMN requests_per_minute INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sub_accounts ADD COLUMN tokens_per_minute INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE tenants ADD COLUMN usage_dropped INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE policies ADD COLUMN guardrails_fail_open INTEGER NOT NULL DEFAULT 0;
ALTER TABLE policies ADD COLUMN patterns TEXT NOT NULL DEFAULT '[]';
"#,
    r#"
CREATE TABLE tenant_kms (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    key_id TEXT NOT NULL,
    region TEXT NOT NULL,
    endpoint TEXT,
    updated_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE body_log_settings (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    enabled INTEGER NOT NULL,
    retention_days INTEGER NOT NULL,
    when_behind TEXT NOT NULL
);
CREATE TABLE body_log_segments (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    state TEXT NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, day, segment_id)
);
CREATE TABLE body_log_records (
    tenant_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    day TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    record_index INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    boot_epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, request_id)
);
CREATE UNIQUE INDEX body_log_records_sent ON body_log_records(node_id, boot_epoch, seq);
CREATE INDEX body_log_records_segment ON body_log_records(tenant_id, day, segment_id);
"#,
    r#"
CREATE TABLE body_log_segment_keys (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    PRIMARY KEY (tenant_id, day, segment_id)
);
"#,
];

/// `meta` rows.
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted_through";
/// The random id of the newest revision (see [`aigw_wire::Message::Changes`]).
const META_REVISION_ID: &str = "revision_id";

/// Longest chain of nested sub-accounts.
pub const MAX_SUB_ACCOUNT_DEPTH: i64 = 8;

/// Who did something, and from where; recorded with every mutation.
#[derive(Debug, Clone)]
pub struct Actor {
    pub principal: String,
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Sealing or opening a stored secret failed (a wrong seal key, a damaged value).
    #[error("seal: {0}")]
    Seal(String),
    /// A tenant's own KMS key could not be used.
    #[error("customer-managed key: {0}")]
    Kms(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub tier: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubAccount {
    pub id: String,
    pub tenant_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub depth: i64,
}

/// A key as operators see it: never the key, never its hash.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub tenant_id: String,
    pub environment: String,
    pub sub_account_id: Option<String>,
    pub name: String,
    pub status: String,
    pub allowed_models: Vec<String>,
    /// Unix seconds UTC; 0 = never.
    pub expires_at: i64,
    /// Unix seconds UTC; 0 = none. Set on the old key of a rotation.
    pub grace_ends_at: i64,
    pub created_at: i64,
    pub replaced_by: Option<String>,
    /// Enforced by each node on its own traffic; 0 = no limit.
    pub rate_limits: RateLimitsView,
    /// Unix seconds UTC when a node first saw the key in traffic; 0 = never.
    pub leaked_at: i64,
}

/// A key's rate limits as the API shows and takes them; 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsView {
    #[serde(default)]
    pub requests_per_minute: u64,
    #[serde(default)]
    pub tokens_per_minute: u64,
}

impl RateLimitsView {
    /// Refuses a limit beyond what the nodes' cells can hold, naming the field.
    fn check(&self) -> Result<(), StoreError> {
        const MAX: u64 = 1 << 40;
        if self.requests_per_minute > MAX || self.tokens_per_minute > MAX {
            return Err(StoreError::Invalid(format!(
                "rate_limits: at most {MAX} per minute"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// A key to insert (the hash of a freshly minted key).
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key_id: String,
    pub tenant_id: String,
    pub environment: Environment,
    pub sub_account_id: Option<String>,
    pub name: String,
    pub hash: [u8; 32],
    pub allowed_models: Vec<String>,
    pub expires_at: i64,
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Compaction {
    /// The newest revision no longer in the changelog (0 = nothing was ever compacted).
    pub compacted_through: i64,
    /// The newest revision.
    pub revision: i64,
    /// Changelog entries deleted by this compaction.
    pub deleted: i64,
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// Seals provider credentials at rest.
    kek: Kek,
    /// Tenants' own keys, for what is sealed under them (shared with the body log's
    /// connection, so both see the same unwrapped keys).
    kms: Arc<crate::kms::Kms>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/controlplane.db` and migrates it. `kek` seals
    /// provider credentials; a key that does not open the credentials already stored is
    /// refused here rather than at the first snapshot.
    pub fn open(data_dir: &Path, kek: Kek) -> Result<Self, StoreError> {
        aigw_seal::files::private_dir(data_dir).map_err(|e| {
            StoreError::Invalid(format!("data directory {}: {e}", data_dir.display()))
        })?;
        // The database holds sealed credentials and the audit log: mode 0600, and SQLite
        // gives its WAL and shared-memory files the database file's mode.
        let db = data_dir.join("controlplane.db");
        let created = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&db)
        };
        if created.is_err() {
            aigw_seal::files::private_file_mode(&db)
                .map_err(|e| StoreError::Invalid(format!("database {}: {e}", db.display())))?;
        }
        let conn = Connection::open(&db)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The body log's writer has a connection of its own (see [`Self::open_body_index`]):
        // a write waits for its transaction rather than failing.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
            [],
        )?;
        let version: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let mut conn = conn;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                params![i as i64 + 1],
            )?;
            tx.commit()?;
        }
        routing::check_seal_key(&conn, &kek)?;
        Ok(Self {
            conn: Mutex::new(conn),
            kek,
            kms: Arc::default(),
        })
    }

    /// The tenants' keys this store uses, to share with [`Self::open_body_index`].
    pub fn kms_handle(&self) -> Arc<crate::kms::Kms> {
        Arc::clone(&self.kms)
    }

    /// A second connection to the database [`Self::open`] opened and migrated, for the
    /// body log's writer: its index writes, one transaction per batch, never queue the
    /// admin API and the node link behind them. Its commits are durable against a crash
    /// of the process, not of the machine (`synchronous = NORMAL`): a power loss can lose
    /// the last batches indexed, as it can the segment bytes the page cache still held.
    pub fn open_body_index(
        data_dir: &Path,
        kek: Kek,
        kms: Arc<crate::kms::Kms>,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open(data_dir.join("controlplane.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self {
            conn: Mutex::new(conn),
            kek,
            kms,
        })
    }

    fn with_tx<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // IMMEDIATE: the write lock is taken (waiting up to the busy timeout) when the
        // transaction begins. A deferred one that read first could not upgrade once the body
        // log's connection had committed in between, and would fail at once.
        let tx = Tx {
            tx: conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?,
            kek: &self.kek,
        };
        let out = f(&tx)?;
        tx.tx.commit()?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// The newest revision (0 when nothing was ever changed).
    pub fn revision(&self) -> Result<i64, StoreError> {
        self.read(|c| meta(c, META_REVISION))
    }

    /// The newest revision compaction deleted from the changelog (0 = none): a node holding
    /// an older revision must be sent a snapshot.
    pub fn compacted_through(&self) -> Result<i64, StoreError> {
        self.read(|c| meta(c, META_COMPACTED))
    }

    pub fn create_tenant(
        &self,
        actor: &Actor,
        id: &str,
        name: &str,
        tier: &str,
    ) -> Result<Tenant, StoreError> {
        if !matches!(tier, "free" | "pro" | "enterprise") {
            return Err(StoreError::Invalid(format!(
                "tier: must be free, pro or enterprise (got {tier:?})"
            )));
        }
        if name.trim().is_empty() {
            return Err(StoreError::Invalid("name: must not be empty".into()));
        }
        let t = Tenant {
            id: id.into(),
            name: name.into(),
            tier: tier.into(),
            created_at: now(),
        };
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO tenants (id, name, tier, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.id, t.name, t.tier, t.created_at],
            )?;
            change(tx, "tenant", &t.id, "upsert")?;
            audit(
                tx,
                actor,
                "tenant.create",
                &t.id,
                serde_json::json!({"name": t.name, "tier": t.tier}),
            )?;
            Ok(t.clone())
        })
    }

    pub fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, name, tier, created_at FROM tenants ORDER BY created_at, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Tenant {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    tier: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn create_sub_account(
        &self,
        actor: &Actor,
        id: &str,
        tenant_id: &str,
        parent_id: Option<&str>,
        name: &str,
    ) -> Result<SubAccount, StoreError> {
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            let depth = match parent_id {
                None => 1,
                Some(p) => {
                    let (ptenant, pdepth): (String, i64) = tx
                        .query_row("SELECT tenant_id, depth FROM sub_accounts WHERE id = ?1", params![p], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?
                        .ok_or(StoreError::NotFound("parent sub-account"))?;
                    if ptenant != tenant_id {
                        return Err(StoreError::Invalid("parent_id: belongs to another tenant".into()));
                    }
                    pdepth + 1
                }
            };
            if depth > MAX_SUB_ACCOUNT_DEPTH {
                return Err(StoreError::Invalid(format!("parent_id: sub-accounts nest at most {MAX_SUB_ACCOUNT_DEPTH} deep")));
            }
            tx.execute(
                "INSERT INTO sub_accounts (id, tenant_id, parent_id, name, depth, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, tenant_id, parent_id, name, depth, now()],
            )?;
            change(tx, "sub_account", id, "upsert")?;
            audit(tx, actor, "sub_account.create", id, serde_json::json!({"tenant_id": tenant_id, "parent_id": parent_id, "name": name}))?;
            Ok(SubAccount { id: id.into(), tenant_id: tenant_id.into(), parent_id: parent_id.map(Into::into), name: name.into(), depth })
        })
    }

    pub fn insert_key(&self, actor: &Actor, k: &NewKey) -> Result<KeyInfo, StoreError> {
        self.with_tx(|tx| {
            insert_key_tx(tx, k)?;
            change(tx, "key", &k.key_id, "upsert")?;
            audit(
                tx,
                actor,
                "key.create",
                &k.key_id,
                serde_json::json!({"tenant_id": k.tenant_id, "environment": k.environment.name(), "sub_account_id": k.sub_account_id}),
            )?;
            key_info(tx, &k.key_id)
        })
    }

    /// Revokes a key at once; every node drops it at the next revision it applies.
    pub fn revoke_key(&self, actor: &Actor, key_id: &str) -> Result<KeyInfo, StoreError> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE api_keys SET status = 'revoked', revoked_at = ?2 WHERE key_id = ?1 AND status = 'active'",
                params![key_id, now()],
            )?;
            if n == 0 {
                key_info(tx, key_id)?; // NotFound if absent
                return Err(StoreError::Conflict(format!("key {key_id} is already revoked")));
            }
            change(tx, "key", key_id, "upsert")?;
            audit(tx, actor, "key.revoke", key_id, serde_json::json!({}))?;
            key_info(tx, key_id)
        })
    }

    /// Sets a key's rate limits (audited; pushed to every node).
    pub fn set_rate_limits(
        &self,
        actor: &Actor,
        key_id: &str,
        limits: RateLimitsView,
    ) -> Result<KeyInfo, StoreError> {
        limits.check()?;
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE api_keys SET requests_per_minute = ?2, tokens_per_minute = ?3 WHERE key_id = ?1",
                params![
                    key_id,
                    limits.requests_per_minute as i64,
                    limits.tokens_per_minute as i64
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("key"));
            }
            change(tx, "key", key_id, "upsert")?;
            audit(
                tx,
                actor,
                "key.rate_limits",
                key_id,
                serde_json::json!({
                    "requests_per_minute": limits.requests_per_minute,
                    "tokens_per_minute": limits.tokens_per_minute,
                }),
            )?;
            key_info(tx, key_id)
        })
    }

    /// Inserts the replacement and gives the old key a grace end, in one transaction.
    pub fn rotate_key(
        &self,
        actor: &Actor,
        old_id: &str,
        new: &NewKey,
        grace_ends_at: i64,
    ) -> Result<(KeyInfo, KeyInfo), StoreError> {
        self.with_tx(|tx| {
            let old = key_info(tx, old_id)?;
            if old.status != "active" {
                return Err(StoreError::Conflict(format!("key {old_id} is revoked")));
            }
            if old.replaced_by.is_some() {
                return Err(StoreError::Conflict(format!(
                    "key {old_id} was already rotated"
                )));
            }
            insert_key_tx(tx, new)?;
            // The replacement keeps the old key's limits.
            tx.execute(
                "UPDATE api_keys SET requests_per_minute = ?2, tokens_per_minute = ?3 WHERE key_id = ?1",
                params![
                    new.key_id,
                    i64::try_from(old.rate_limits.requests_per_minute).unwrap_or(i64::MAX),
                    i64::try_from(old.rate_limits.tokens_per_minute).unwrap_or(i64::MAX)
                ],
            )?;
            tx.execute(
                "UPDATE api_keys SET grace_ends_at = ?2, replaced_by = ?3 WHERE key_id = ?1",
                params![old_id, grace_ends_at, new.key_id],
            )?;
            change(tx, "key", &new.key_id, "upsert")?;
            change(tx, "key", old_id, "upsert")?;
            audit(
                tx,
                actor,
                "key.rotate",
                old_id,
                serde_json::json!({"new_key_id": new.key_id, "grace_ends_at": grace_ends_at}),
            )?;
            Ok((key_info(tx, old_id)?, key_info(tx, &new.key_id)?))
        })
    }

    pub fn key(&self, key_id: &str) -> Result<KeyInfo, StoreError> {
        self.read(|c| key_info(c, key_id))
    }

    pub fn keys(&self, tenant_id: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "{KEY_SELECT} WHERE tenant_id = ?1 ORDER BY created_at, key_id"
            ))?;
            let rows = st.query_map(params![tenant_id], key_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Key records as nodes hold them, for every key or the given ids.
    pub fn key_records(&self, ids: Option<&[String]>) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|c| key_records(c, ids))
    }

    /// What changed after `revision`, as nodes apply it, and the newest revision — read
    /// together, so the records are exactly those of the newest revision. `None` when entries
    /// after `revision` were compacted away: the caller sends a snapshot instead.
    ///
    /// Every record changed since is sent once: its current state if it exists, a tombstone
    /// if it does not. Changes to what nodes do not hold (tenants, sub-accounts) send nothing
    /// but still move the revision. The changes are ordered so a node applying them one by
    /// one never holds a route naming an upstream it lacks: upserts of everything but routes
    /// first, then routes, then deletions of everything but routes.
    pub fn changes_since(&self, revision: i64) -> Result<Option<(Vec<Change>, i64)>, StoreError> {
        Ok(self
            .changes_since_at_most(revision, usize::MAX)?
            .map(|(c, newest, _)| (c, newest)))
    }

    /// The id of `revision`: `None` when this store never issued it or no longer knows it
    /// (compacted away). A node holding `revision` with another id holds another history.
    pub fn revision_id(&self, revision: i64) -> Result<Option<u64>, StoreError> {
        self.read(|c| revision_id_of(c, revision))
    }

    /// [`Store::changes_since`], but `None` also when more than `max` records changed: a
    /// snapshot (sent in parts) is then the smaller message. Counted while the changelog is
    /// read, before any record is.
    pub fn changes_since_at_most(
        &self,
        revision: i64,
        max: usize,
    ) -> Result<Option<(Vec<Change>, i64, u64)>, StoreError> {
        let read = self.with_tx(|tx| {
            if revision < meta(tx, META_COMPACTED)? {
                return Ok(None);
            }
            let newest = meta(tx, META_REVISION)?;
            // A range scan of the primary key (bounded by what the node lacks), deduplicated
            // here: each record once, in the order of its latest change.
            let mut changed: Vec<(String, String)> = Vec::new();
            {
                let mut latest: std::collections::HashMap<(String, String), usize> =
                    std::collections::HashMap::new();
                let mut st = tx.prepare(
                    "SELECT kind, record_id FROM changelog WHERE revision > ?1 ORDER BY revision",
                )?;
                let mut rows = st.query(params![revision])?;
                let mut order: Vec<Option<(String, String)>> = Vec::new();
                while let Some(r) = rows.next()? {
                    let kind: String = r.get(0)?;
                    if wire_kind(&kind).is_none() {
                        continue;
                    }
                    let entry = (kind, r.get::<_, String>(1)?);
                    if let Some(prev) = latest.insert(entry.clone(), order.len()) {
                        order[prev] = None;
                    }
                    order.push(Some(entry));
                    if latest.len() > max {
                        return Ok(None);
                    }
                }
                changed.extend(order.into_iter().flatten());
            }
            let mut read = Vec::with_capacity(changed.len());
            for (kind, id) in changed {
                let Some(code) = wire_kind(&kind) else {
                    continue;
                };
                let current = current_record(tx, code, &id)?;
                read.push((code, id, current));
            }
            let newest_id = revision_id_of(tx, newest)?.unwrap_or(0);
            Ok(Some((read, newest, newest_id)))
        })?;
        let Some((read, newest, newest_id)) = read else {
            return Ok(None);
        };
        // Credentials are opened now, the transaction over (see `routing::Unopened`).
        let mut changes = Vec::with_capacity(read.len());
        for (code, id, current) in read {
            let record = match current {
                Some(Current::Record(r)) => Some(r),
                Some(Current::Upstream(u)) => u.open(&self.kek, &self.kms)?.map(Record::Upstream),
                None => None,
            };
            changes.push(match record {
                Some(record) => Change::Upsert(record),
                None => Change::Delete(Tombstone { kind: code, id }),
            });
        }
        changes.sort_by_key(apply_phase);
        Ok(Some((changes, newest, newest_id)))
    }

    /// Every record nodes hold (credentials opened), and the revision they are at, read
    /// together. Upstreams come before the routes that name them.
    pub fn snapshot(&self) -> Result<(Vec<Record>, i64, u64), StoreError> {
        let (keys, upstreams, rest, revision, id) = self.with_tx(|tx| {
            let keys = key_records(tx, None)?;
            let upstreams = routing::upstream_records(tx, None)?;
            let mut records: Vec<Record> = Vec::new();
            records.extend(
                routing::route_records(tx, None)?
                    .into_iter()
                    .map(Record::Route),
            );
            records.extend(
                routing::policy_records(tx, None)?
                    .into_iter()
                    .map(Record::Policy),
            );
            records.extend(caps::cap_records(tx, None)?.into_iter().map(Record::Cap));
            records.extend(
                caps::price_records(tx, None)?
                    .into_iter()
                    .map(Record::Price),
            );
            records.extend(
                caps::limit_records(tx, None)?
                    .into_iter()
                    .map(Record::Limit),
            );
            let revision = meta(tx, META_REVISION)?;
            let id = revision_id_of(tx, revision)?.unwrap_or(0);
            Ok((keys, upstreams, records, revision, id))
        })?;
        // Credentials are opened now, the transaction over (see `routing::Unopened`).
        let mut records: Vec<Record> = keys.into_iter().map(Record::Key).collect();
        for u in upstreams {
            if let Some(r) = u.open(&self.kek, &self.kms)? {
                records.push(Record::Upstream(r));
            }
        }
        records.extend(rest);
        Ok((records, revision, id))
    }

    /// Deletes every changelog entry but the newest `keep`, as an operator asked (always
    /// audited as `changelog.compact`).
    pub fn compact(&self, actor: &Actor, keep: i64) -> Result<Compaction, StoreError> {
        self.compact_as(actor, keep, true)
    }

    /// The control plane's own periodic compaction: audited only when it deleted entries.
    pub fn compact_periodic(&self, keep: i64) -> Result<Compaction, StoreError> {
        let actor = Actor {
            principal: "control-plane".into(),
            source: "periodic compaction".into(),
        };
        self.compact_as(&actor, keep, false)
    }

    fn compact_as(
        &self,
        actor: &Actor,
        keep: i64,
        always_audit: bool,
    ) -> Result<Compaction, StoreError> {
        if keep < 0 {
            return Err(StoreError::Invalid("keep: must be 0 or more".into()));
        }
        self.with_tx(|tx| {
            // The newest entry to delete: the one just older than the `keep` newest.
            let cut: Option<i64> = tx
                .query_row(
                    "SELECT revision FROM changelog ORDER BY revision DESC LIMIT 1 OFFSET ?1",
                    params![keep],
                    |r| r.get(0),
                )
                .optional()?;
            let mut through = meta(tx, META_COMPACTED)?;
            let mut deleted = 0;
            if let Some(cut) = cut {
                deleted = tx.execute("DELETE FROM changelog WHERE revision <= ?1", params![cut])? as i64;
                through = through.max(cut);
                set_meta(tx, META_COMPACTED, through)?;
            }
            if always_audit || deleted > 0 {
                audit(
                    tx,
                    actor,
                    "changelog.compact",
                    "changelog",
                    serde_json::json!({"keep": keep, "deleted": deleted, "compacted_through": through}),
                )?;
            }
            Ok(Compaction {
                compacted_through: through,
                revision: meta(tx, META_REVISION)?,
                deleted,
            })
        })
    }

    /// Inserts many keys in one transaction with one changelog entry each and a single
    /// audit record (bulk import).
    pub fn import_keys(&self, actor: &Actor, keys: &[NewKey]) -> Result<i64, StoreError> {
        self.with_tx(|tx| {
            let mut last = 0;
            for k in keys {
                insert_key_tx(tx, k)?;
                last = change(tx, "key", &k.key_id, "upsert")?;
            }
            audit(
                tx,
                actor,
                "key.import",
                &format!("{} keys", keys.len()),
                serde_json::json!({"count": keys.len()}),
            )?;
            Ok(last)
        })
    }

    /// Audit records, newest last, after `after_id`.
    pub fn audit(&self, after_id: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, at, actor, source, action, target, detail FROM audit_log WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = st.query_map(params![after_id, limit], |r| {
                let action: String = r.get(4)?;
                let target: String = r.get(5)?;
                let detail = audit_detail(&self.kek, &action, &target, r.get(6)?);
                Ok(AuditRecord {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    source: r.get(3)?,
                    action,
                    target,
                    detail,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

fn key_records(c: &Connection, ids: Option<&[String]>) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = "SELECT key_id, tenant_id, environment, sub_account_id, hash_version, hash, status, expires_at, grace_ends_at, allowed_models, requests_per_minute, tokens_per_minute FROM api_keys";
    let mut out = Vec::new();
    let mut push_row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        let hash: Vec<u8> = r.get(5)?;
        let status: String = r.get(6)?;
        let models: String = r.get(9)?;
        out.push(KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: r.get(0)?,
            tenant_id: r.get(1)?,
            environment: r.get(2)?,
            sub_account_id: r.get(3)?,
            hash_version: r.get::<_, i64>(4)? as u64,
            hash: <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0; 32]),
            status: if status == "active" {
                KeyStatus::Active
            } else {
                KeyStatus::Revoked
            },
            expires_at: r.get::<_, i64>(7)?.max(0) as u64,
            grace_ends_at: r.get::<_, i64>(8)?.max(0) as u64,
            allowed_models: serde_json::from_str(&models).unwrap_or_default(),
            rate_limits: aigw_wire::RateLimits {
                requests_per_minute: r.get::<_, i64>(10)?.max(0) as u64,
                tokens_per_minute: r.get::<_, i64>(11)?.max(0) as u64,
            },
        });
        Ok(())
    };
    match ids {
        None => {
            let mut st = c.prepare(sql)?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                push_row(r)?;
            }
        }
        Some(ids) => {
            let mut st = c.prepare(&format!("{sql} WHERE key_id = ?1"))?;
            for id in ids {
                let mut rows = st.query(params![id])?;
                while let Some(r) = rows.next()? {
                    push_row(r)?;
                }
            }
        }
    }
    // The sub-accounts above each key's (sub-accounts are never moved, so this is fixed).
    let mut known: std::collections::HashMap<String, Vec<String>> = Default::default();
    for k in &mut out {
        if let Some(sub) = &k.sub_account_id {
            if !known.contains_key(sub) {
                known.insert(sub.clone(), caps::parents(c, sub)?);
            }
            k.sub_account_parents = known[sub].clone();
        }
    }
    Ok(out)
}

/// The wire kind of a changelog kind; `None` for what nodes do not hold. (The count in
/// `changes_since_at_most` lists the same kinds.)
fn wire_kind(kind: &str) -> Option<u64> {
    match kind {
        "key" => Some(kinds::KEY),
        "upstream" => Some(kinds::UPSTREAM),
        "route" => Some(kinds::ROUTE),
        "policy" => Some(kinds::POLICY),
        "cap" => Some(kinds::CAP),
        "price" => Some(kinds::PRICE),
        "limit" => Some(kinds::LIMIT),
        _ => None,
    }
}

/// A record as read in a transaction: whole, or an upstream whose credential is opened
/// after it.
enum Current {
    Record(Record),
    Upstream(routing::Unopened),
}

/// A record as it is now, by wire kind and id; `None` when it no longer exists.
fn current_record(c: &Connection, kind: u64, id: &str) -> Result<Option<Current>, StoreError> {
    let ids = [id.to_string()];
    let record = match kind {
        kinds::KEY => key_records(c, Some(&ids))?.pop().map(Record::Key),
        kinds::UPSTREAM => {
            return Ok(routing::upstream_records(c, Some(id))?
                .pop()
                .map(Current::Upstream))
        }
        kinds::ROUTE => routing::route_records(c, Some(id))?
            .pop()
            .map(Record::Route),
        kinds::POLICY => routing::policy_records(c, Some(id))?
            .pop()
            .map(Record::Policy),
        kinds::CAP => caps::cap_records(c, Some(id))?.pop().map(Record::Cap),
        kinds::PRICE => caps::price_records(c, Some(id))?.pop().map(Record::Price),
        kinds::LIMIT => caps::limit_records(c, Some(id))?.pop().map(Record::Limit),
        _ => None,
    };
    Ok(record.map(Current::Record))
}

/// Where a change goes in a change set: upserts (routes excepted), routes, deletions.
fn apply_phase(c: &Change) -> u8 {
    match c {
        Change::Upsert(Record::Route(_)) => 1,
        Change::Delete(t) if t.kind == kinds::ROUTE => 1,
        Change::Upsert(_) => 0,
        Change::Delete(_) => 2,
    }
}

fn meta(c: &Connection, name: &str) -> Result<i64, StoreError> {
    Ok(c.query_row(
        "SELECT value FROM meta WHERE name = ?1",
        params![name],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

fn set_meta(c: &Connection, name: &str, value: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE meta SET value = ?2 WHERE name = ?1",
        params![name, value],
    )?;
    Ok(())
}

const KEY_SELECT: &str = "SELECT key_id, tenant_id, environment, sub_account_id, name, status, allowed_models, expires_at, grace_ends_at, created_at, replaced_by, requests_per_minute, tokens_per_minute, leaked_at FROM api_keys";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    let models: String = r.get(6)?;
    Ok(KeyInfo {
        key_id: r.get(0)?,
        tenant_id: r.get(1)?,
        environment: r.get(2)?,
        sub_account_id: r.get(3)?,
        name: r.get(4)?,
        status: r.get(5)?,
        allowed_models: serde_json::from_str(&models).unwrap_or_default(),
        expires_at: r.get(7)?,
        grace_ends_at: r.get(8)?,
        created_at: r.get(9)?,
        replaced_by: r.get(10)?,
        rate_limits: RateLimitsView {
            requests_per_minute: r.get::<_, i64>(11)?.max(0) as u64,
            tokens_per_minute: r.get::<_, i64>(12)?.max(0) as u64,
        },
        leaked_at: r.get(13)?,
    })
}

fn key_info(c: &Connection, key_id: &str) -> Result<KeyInfo, StoreError> {
    c.query_row(
        &format!("{KEY_SELECT} WHERE key_id = ?1"),
        params![key_id],
        key_row,
    )
    .optional()?
    .ok_or(StoreError::NotFound("key"))
}

fn tenant_exists(c: &Connection, tenant_id: &str) -> Result<(), StoreError> {
    let n: i64 = c.query_row(
        "SELECT COUNT(*) FROM tenants WHERE id = ?1",
        params![tenant_id],
        |r| r.get(0),
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("tenant"));
    }
    Ok(())
}

fn insert_key_tx(tx: &Transaction<'_>, k: &NewKey) -> Result<(), StoreError> {
    aigw_wire::rules::check_key_fields(&k.name, &k.allowed_models)?;
    tenant_exists(tx, &k.tenant_id)?;
    if let Some(s) = &k.sub_account_id {
        let owner: Option<String> = tx
            .query_row(
                "SELECT tenant_id FROM sub_accounts WHERE id = ?1",
                params![s],
                |r| r.get(0),
            )
            .optional()?;
        if owner.as_deref() != Some(k.tenant_id.as_str()) {
            return Err(StoreError::Invalid(
                "sub_account_id: no such sub-account in this tenant".into(),
            ));
        }
    }
    tx.execute(
        "INSERT INTO api_keys (key_id, tenant_id, environment, sub_account_id, name, hash_version, hash, status, allowed_models, expires_at, grace_ends_at, created_at, revoked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?9, 0, ?10, 0)",
        params![
            k.key_id,
            k.tenant_id,
            k.environment.name(),
            k.sub_account_id,
            k.name,
            aigw_wire::keys::HASH_VERSION as i64,
            &k.hash[..],
            serde_json::to_string(&k.allowed_models).unwrap_or_else(|_| "[]".into()),
            k.expires_at,
            now(),
        ],
    )?;
    Ok(())
}

/// Appends a changelog entry (`op` is `upsert` or `delete`); returns the new revision,
/// issued from the counter in `meta` so it never repeats one compaction deleted.
fn change(tx: &Transaction<'_>, kind: &str, id: &str, op: &str) -> Result<i64, StoreError> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE name = ?1",
        params![META_REVISION],
    )?;
    let revision = meta(tx, META_REVISION)?;
    let revision_id = random_revision_id()?;
    tx.execute(
        "INSERT INTO changelog (revision, kind, record_id, op, at, revision_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![revision, kind, id, op, now(), revision_id],
    )?;
    set_meta(tx, META_REVISION_ID, revision_id)?;
    Ok(revision)
}

/// A random, positive, non-zero id for a new revision.
fn random_revision_id() -> Result<i64, StoreError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| StoreError::Invalid(format!("random: {e}")))?;
    Ok((u64::from_le_bytes(b) >> 1).max(1) as i64)
}

/// The id of `revision`, if this store issued it and still knows it (0: issued before
/// revisions had ids).
fn revision_id_of(c: &Connection, revision: i64) -> Result<Option<u64>, StoreError> {
    if revision == meta(c, META_REVISION)? {
        return Ok(Some(meta(c, META_REVISION_ID)?.max(0) as u64));
    }
    let id: Option<i64> = c
        .query_row(
            "SELECT revision_id FROM changelog WHERE revision = ?1",
            params![revision],
            |r| r.get(0),
        )
        .optional()?;
    Ok(id.map(|i| i.max(0) as u64))
}

/// A write transaction, with the key that seals what it writes.
pub(crate) struct Tx<'c> {
    tx: Transaction<'c>,
    kek: &'c Kek,
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Transaction<'c>;

    fn deref(&self) -> &Transaction<'c> {
        &self.tx
    }
}

/// The sealing purpose of audit records' details.
const AUDIT_PURPOSE: &str = "audit-detail";

/// Records an administrative action. Its detail (names, addresses, patterns, settings — what
/// an operator wrote) is sealed with the store's key and bound to its action and target, so
/// it reads only through the API and cannot be moved onto another record.
fn audit(
    tx: &Tx<'_>,
    actor: &Actor,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<(), StoreError> {
    let sealed = aigw_seal::seal(
        tx.kek,
        AUDIT_PURPOSE,
        format!("{action}\n{target}\n{detail}").as_bytes(),
    )
    .map_err(|e| StoreError::Seal(format!("sealing an audit record: {e}")))?;
    tx.execute(
        "INSERT INTO audit_log (at, actor, source, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now(), actor.principal, actor.source, action, target, sealed],
    )?;
    Ok(())
}

/// An audit record's detail: opened when sealed (records from before sealing are JSON
/// text), `null` when it does not open or does not belong to the record.
fn audit_detail(
    kek: &Kek,
    action: &str,
    target: &str,
    stored: rusqlite::types::Value,
) -> serde_json::Value {
    let text = match stored {
        rusqlite::types::Value::Text(t) => t,
        rusqlite::types::Value::Blob(b) => {
            let Ok(plain) = aigw_seal::open(kek, AUDIT_PURPOSE, &b) else {
                return serde_json::Value::Null;
            };
            let Ok(plain) = String::from_utf8(plain) else {
                return serde_json::Value::Null;
            };
            match plain
                .strip_prefix(action)
                .and_then(|p| p.strip_prefix('\n'))
                .and_then(|p| p.strip_prefix(target))
                .and_then(|p| p.strip_prefix('\n'))
            {
                Some(d) => d.to_string(),
                None => return serde_json::Value::Null,
            }
        }
        _ => return serde_json::Value::Null,
    };
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn actor() -> Actor {
        Actor {
            principal: "admin".into(),
            source: "127.0.0.1".into(),
        }
    }

    /// A fixed key, so a store can be reopened with it.
    pub(crate) fn kek() -> Kek {
        Kek::from_hex(&"ab".repeat(32)).expect("hex")
    }

    pub(crate) fn temp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "aigw-store-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn audit_details_are_sealed_and_bound_to_their_record() {
        let dir = temp();
        let s = Store::open(&dir, kek()).expect("opens");
        s.create_tenant(&actor(), "t1", "Acme Marker Corp 5521", "pro")
            .expect("tenant");
        s.create_tenant(&actor(), "t2", "Other", "pro")
            .expect("tenant");
        let records = s.audit(0, 10).expect("audit");
        assert_eq!(records[0].detail["name"], "Acme Marker Corp 5521");
        drop(s);
        let c = Connection::open(dir.join("controlplane.db")).expect("open");
        let stored: Vec<u8> = c
            .query_row(
                "SELECT detail FROM audit_log WHERE target = 't1'",
                [],
                |r| r.get(0),
            )
            .expect("stored");
        assert!(
            !stored.windows(21).any(|w| w == b"Acme Marker Corp 5521"),
            "an audit detail in clear"
        );
        // A detail moved onto another record does not read; one from before sealing does.
        c.execute(
            "UPDATE audit_log SET detail = (SELECT detail FROM audit_log WHERE target = 't1') WHERE target = 't2'",
            [],
        )
        .expect("swap");
        c.execute(
            "INSERT INTO audit_log (at, actor, source, action, target, detail) VALUES (1, 'a', 's', 'old.action', 'x', '{\"k\":1}')",
            [],
        )
        .expect("legacy");
        drop(c);
        let s = Store::open(&dir, kek()).expect("reopens");
        let records = s.audit(0, 10).expect("audit");
        assert_eq!(records[0].detail["name"], "Acme Marker Corp 5521");
        assert_eq!(records[1].detail, serde_json::Value::Null);
        assert_eq!(records[2].detail["k"], 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mutations_write_changelog_and_audit_together() {
        let dir = temp();
        let s = Store::open(&dir, kek()).expect("opens");
        assert_eq!(s.revision().expect("rev"), 0);
        s.create_tenant(&actor(), "t1", "Acme", "pro")
            .expect("tenant");
        assert_eq!(s.revision().expect("rev"), 1);
        let err = s
            .create_tenant(&actor(), "t2", "Bad", "gold")
            .expect_err("tier");
        assert!(err.to_string().contains("tier"));
        assert_eq!(
            s.revision().expect("rev"),
            1,
            "a refused mutation changes nothing"
        );
        let audit = s.audit(0, 100).expect("audit");
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].action, "tenant.create");
        assert_eq!(audit[0].actor, "admin");
        // Reopening keeps everything (and does not re-run migrations).
        drop(s);
        let s = Store::open(&dir, kek()).expect("reopens");
        assert_eq!(s.tenants().expect("list").len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sub_accounts_nest_to_a_bounded_depth() {
        let dir = temp();
        let s = Store::open(&dir, kek()).expect("opens");
        s.create_tenant(&actor(), "t", "T", "enterprise")
            .expect("tenant");
        let mut parent: Option<String> = None;
        for i in 1..=MAX_SUB_ACCOUNT_DEPTH {
            let id = format!("s{i}");
            let sa = s
                .create_sub_account(&actor(), &id, "t", parent.as_deref(), "x")
                .expect("nests");
            assert_eq!(sa.depth, i);
            parent = Some(id);
        }
        let e = s
            .create_sub_account(&actor(), "too-deep", "t", parent.as_deref(), "x")
            .expect_err("depth");
        assert!(e.to_string().contains("at most 8"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_of_the_first_schema_keeps_its_revision_when_migrated() {
        let dir = temp();
        std::fs::create_dir_all(&dir).expect("dir");
        {
            let c = Connection::open(dir.join("controlplane.db")).expect("db");
            c.execute_batch(MIGRATIONS[0]).expect("first schema");
            c.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version (version) VALUES (1);
                 INSERT INTO changelog (revision, kind, record_id, op, at) VALUES (1, 'tenant', 't', 'upsert', 0);
                 INSERT INTO changelog (revision, kind, record_id, op, at) VALUES (7, 'tenant', 't', 'upsert', 0);",
            )
            .expect("rows");
        }
        let s = Store::open(&dir, kek()).expect("migrates");
        assert_eq!(s.revision().expect("rev"), 7);
        assert_eq!(s.compacted_through().expect("compacted"), 0);
        s.create_tenant(&actor(), "t2", "T", "free")
            .expect("tenant");
        assert_eq!(s.revision().expect("rev"), 8);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
