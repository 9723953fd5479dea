//! What each environment of a tenant routes: its upstreams (with their provider credentials,
//! sealed at rest), its routes, and its policy. Record ids are `{tenant}/{environment}/{name}`
//! for upstreams and routes and `{tenant}/{environment}` for policies.
//!
//! A credential is sealed with AES-256-GCM under the store's key-encryption key, together with
//! the id of its upstream: a sealed value copied onto another row does not open. It leaves the
//! store only in the records pushed to nodes (over TLS), never in what the admin API returns,
//! never in audit records, never in logs.

use aigw_seal::Kek;
use aigw_wire::keys::Environment;
use aigw_wire::{NonRetentionRecord, PolicyRecord, RouteRecord, RouteTargetRecord, UpstreamRecord};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{audit, change, now, tenant_exists, Actor, Store, StoreError};

/// The sealing purpose of provider credentials.
const CREDENTIAL_PURPOSE: &str = "upstream-credential";
/// Upstreams a route fails over between.
const MAX_TARGETS: usize = 16;
const MAX_CONNECTIONS: u64 = 100_000;
/// A day, in milliseconds.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
const MAX_CREDENTIAL: usize = 16 * 1024;
const MAX_MODEL: usize = 256;

/// What upstream and route names must look like.
pub const NAME_RULE: &str =
    "1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit";

/// How a provider is told not to retain a request. (The field-less modes are empty struct
/// variants so that stray fields beside them are refused too.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NonRetention {
    /// The provider offers no way.
    None {},
    /// A request header.
    Header { name: String, value: String },
    /// A top-level field of the JSON request body, with any JSON value.
    BodyField {
        name: String,
        value: serde_json::Value,
    },
    /// An account-level zero-retention agreement covers every request.
    AccountAgreement {},
}

impl Default for NonRetention {
    fn default() -> Self {
        Self::None {}
    }
}

impl NonRetention {
    fn mode(&self) -> &'static str {
        match self {
            Self::None {} => "none",
            Self::Header { .. } => "header",
            Self::BodyField { .. } => "body_field",
            Self::AccountAgreement {} => "account_agreement",
        }
    }

    fn to_record(&self) -> NonRetentionRecord {
        match self {
            Self::None {} => NonRetentionRecord::None,
            Self::Header { name, value } => NonRetentionRecord::Header {
                name: name.clone(),
                value: value.clone(),
            },
            Self::BodyField { name, value } => NonRetentionRecord::BodyField {
                name: name.clone(),
                value_json: value.to_string(),
            },
            Self::AccountAgreement {} => NonRetentionRecord::AccountAgreement,
        }
    }
}

/// An upstream as an operator writes it (the body of a PUT).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// `openai` or `anthropic`.
    pub provider: String,
    /// `http://` or `https://`, a host, an optional port and path; no query, fragment or
    /// user info.
    pub base_url: String,
    /// The provider credential. Absent (or null): keep the one stored; empty: remove it.
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub non_retention: NonRetention,
    #[serde(default)]
    pub stream_options: bool,
    /// Where the provider processes data; empty when unknown.
    #[serde(default)]
    pub region: String,
    /// A business associate agreement covers it.
    #[serde(default)]
    pub baa: bool,
    /// Connections per worker; 0 = the node's default.
    #[serde(default)]
    pub max_connections: u64,
    /// Milliseconds; 0 = the node's default.
    #[serde(default)]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub first_byte_timeout_ms: u64,
    #[serde(default)]
    pub read_idle_timeout_ms: u64,
}

impl std::fmt::Debug for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSpec")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field(
                "credential",
                &self.credential.as_ref().map(|c| {
                    if c.is_empty() {
                        "(remove)"
                    } else {
                        "(redacted)"
                    }
                }),
            )
            .field("non_retention", &self.non_retention)
            .field("stream_options", &self.stream_options)
            .field("region", &self.region)
            .field("baa", &self.baa)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("first_byte_timeout_ms", &self.first_byte_timeout_ms)
            .field("read_idle_timeout_ms", &self.read_idle_timeout_ms)
            .finish()
    }
}

/// An upstream as operators see it: whether it has a credential, never the credential.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Upstream {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    pub name: String,
    pub provider: String,
    pub base_url: String,
    pub has_credential: bool,
    pub non_retention: NonRetention,
    pub stream_options: bool,
    pub region: String,
    pub baa: bool,
    pub max_connections: u64,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub read_idle_timeout_ms: u64,
    /// Unix seconds UTC.
    pub updated_at: i64,
}

/// Where a route sends a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    /// An upstream's name in the same environment.
    pub upstream: String,
    /// The model name to send instead of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A route as an operator writes it: exactly one of `model` and `prefix`, and the upstreams
/// to try in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    pub targets: Vec<RouteTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    pub name: String,
    pub model: Option<String>,
    pub prefix: Option<String>,
    pub targets: Vec<RouteTarget>,
    /// Unix seconds UTC.
    pub updated_at: i64,
}

/// An environment's policy as an operator writes it; every field defaults to off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Never route to an upstream that cannot be told not to retain.
    #[serde(default)]
    pub zero_retention: bool,
    /// Only upstreams in this region; empty = any.
    #[serde(default)]
    pub region: String,
    /// Only upstreams under a business associate agreement.
    #[serde(default)]
    pub hipaa: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    pub zero_retention: bool,
    pub region: String,
    pub hipaa: bool,
    /// Unix seconds UTC; 0 = never set (every field off).
    pub updated_at: i64,
}

/// A record as written, and the revision that wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct Written<T> {
    #[serde(flatten)]
    pub record: T,
    pub revision: i64,
}

/// A deleted record's id, and the revision that deleted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deleted {
    pub deleted: String,
    pub revision: i64,
}

fn invalid(m: impl Into<String>) -> StoreError {
    StoreError::Invalid(m.into())
}

fn record_id(tenant_id: &str, environment: Environment, name: &str) -> String {
    format!("{tenant_id}/{}/{name}", environment.name())
}

fn policy_id(tenant_id: &str, environment: Environment) -> String {
    format!("{tenant_id}/{}", environment.name())
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

fn check_name(field: &str, name: &str) -> Result<(), StoreError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field}: must be {NAME_RULE} (got {name:?})"
        )))
    }
}

fn check_region(field: &str, region: &str) -> Result<(), StoreError> {
    let b = region.as_bytes();
    let ok = region.is_empty()
        || (b.len() <= 32
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field}: at most 32 of a-z, 0-9 and '-', or empty for none (got {region:?})"
        )))
    }
}

/// A model name or prefix: printable, no spaces.
fn check_model(field: &str, model: &str) -> Result<(), StoreError> {
    if model.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if model.len() > MAX_MODEL {
        return Err(invalid(format!("{field}: at most {MAX_MODEL} bytes")));
    }
    if model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(format!(
            "{field}: must not contain spaces or control characters"
        )));
    }
    Ok(())
}

fn check_base_url(url: &str) -> Result<(), StoreError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(format!(
                "base_url: must start with http:// or https:// (got {url:?})"
            ))
        })?;
    if url.len() > 2048 {
        return Err(invalid("base_url: at most 2048 bytes"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            "base_url: must not contain spaces or control characters",
        ));
    }
    if url.contains('?') || url.contains('#') {
        return Err(invalid("base_url: must not have a query or a fragment"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid(
            "base_url: must not carry user info (the credential goes in credential)",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid("base_url: unclosed '[' in the host"))?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return Err(invalid("base_url: not an IPv6 address between '[' and ']'"));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| invalid("base_url: only a port may follow the host"))?,
            ),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("base_url: must have a host"));
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
    {
        return Err(invalid(format!(
            "base_url: {host:?} is not a host name or address"
        )));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => {}
            _ => return Err(invalid(format!("base_url: port {p:?} is not 1 to 65535"))),
        }
    }
    Ok(())
}

/// Request header names the gateway sets itself.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "x-api-key",
];

/// Request body fields the gateway sets itself.
const RESERVED_BODY_FIELDS: &[&str] = &["messages", "model", "stream", "stream_options"];

fn check_non_retention(nr: &NonRetention) -> Result<(), StoreError> {
    match nr {
        NonRetention::None {} | NonRetention::AccountAgreement {} => Ok(()),
        NonRetention::Header { name, value } => {
            let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
            if name.is_empty() || name.len() > 128 || !name.bytes().all(token) {
                return Err(invalid(format!(
                    "non_retention.name: not an HTTP header name (got {name:?})"
                )));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(invalid(format!(
                    "non_retention.name: {name} is set by the gateway itself"
                )));
            }
            if value.len() > 1024
                || !value
                    .bytes()
                    .all(|c| c == b'\t' || (0x20..0x7f).contains(&c))
            {
                return Err(invalid(
                    "non_retention.value: at most 1024 printable ASCII characters",
                ));
            }
            Ok(())
        }
        NonRetention::BodyField { name, value } => {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "non_retention.name: 1 to 128 characters, no control characters (got {name:?})"
                )));
            }
            if RESERVED_BODY_FIELDS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "non_retention.name: {name} is set by the gateway itself"
                )));
            }
            if value.to_string().len() > 4096 {
                return Err(invalid("non_retention.value: at most 4096 bytes of JSON"));
            }
            Ok(())
        }
    }
}

fn check_upstream(spec: &UpstreamSpec) -> Result<(), StoreError> {
    if !matches!(spec.provider.as_str(), "openai" | "anthropic") {
        return Err(invalid(format!(
            "provider: must be openai or anthropic (got {:?})",
            spec.provider
        )));
    }
    check_base_url(&spec.base_url)?;
    if let Some(c) = &spec.credential {
        // Never echo the credential back, not even in an error.
        if c.len() > MAX_CREDENTIAL {
            return Err(invalid(format!(
                "credential: at most {MAX_CREDENTIAL} bytes"
            )));
        }
        if !c.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(invalid(
                "credential: printable ASCII only, without spaces or line breaks",
            ));
        }
    }
    check_non_retention(&spec.non_retention)?;
    check_region("region", &spec.region)?;
    if spec.max_connections > MAX_CONNECTIONS {
        return Err(invalid(format!(
            "max_connections: at most {MAX_CONNECTIONS}"
        )));
    }
    for (field, v) in [
        ("connect_timeout_ms", spec.connect_timeout_ms),
        ("first_byte_timeout_ms", spec.first_byte_timeout_ms),
        ("read_idle_timeout_ms", spec.read_idle_timeout_ms),
    ] {
        if v > MAX_TIMEOUT_MS {
            return Err(invalid(format!(
                "{field}: at most {MAX_TIMEOUT_MS} (a day)"
            )));
        }
    }
    Ok(())
}

fn seal_credential(kek: &Kek, id: &str, credential: &str) -> Result<Vec<u8>, StoreError> {
    aigw_seal::seal(
        kek,
        CREDENTIAL_PURPOSE,
        format!("{id}\n{credential}").as_bytes(),
    )
    .map_err(|e| StoreError::Seal(format!("sealing the credential of {id}: {e}")))
}

fn open_credential(kek: &Kek, id: &str, sealed: &[u8]) -> Result<String, StoreError> {
    let plain = aigw_seal::open(kek, CREDENTIAL_PURPOSE, sealed)
        .map_err(|e| StoreError::Seal(format!("the credential of {id}: {e}")))?;
    let plain = String::from_utf8(plain)
        .map_err(|_| StoreError::Seal(format!("the credential of {id} is damaged")))?;
    plain
        .strip_prefix(id)
        .and_then(|p| p.strip_prefix('\n'))
        .map(str::to_string)
        .ok_or_else(|| {
            StoreError::Seal(format!(
                "the credential of {id} was sealed for another upstream"
            ))
        })
}

/// Fails when `kek` does not open the credentials already stored.
pub(super) fn check_seal_key(c: &Connection, kek: &Kek) -> Result<(), StoreError> {
    let stored: Option<(String, Vec<u8>)> = c
        .query_row(
            "SELECT id, credential_sealed FROM upstreams WHERE credential_sealed IS NOT NULL ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((id, sealed)) = stored {
        open_credential(kek, &id, &sealed).map_err(|e| {
            StoreError::Seal(format!(
                "the seal key does not open the stored credentials (a wrong seal key?): {e}"
            ))
        })?;
    }
    Ok(())
}

fn conversion(col: usize, e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

const UPSTREAM_SELECT: &str = "SELECT id, tenant_id, environment, name, provider, base_url, credential_sealed, non_retention, stream_options, region, baa, max_connections, connect_timeout_ms, first_byte_timeout_ms, read_idle_timeout_ms, updated_at FROM upstreams";

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
    };
    Ok((u, sealed))
}

fn upstream_by_id(c: &Connection, id: &str) -> Result<Option<StoredUpstream>, StoreError> {
    Ok(c.query_row(
        &format!("{UPSTREAM_SELECT} WHERE id = ?1"),
        params![id],
        upstream_row,
    )
    .optional()?)
}

/// Upstream records as nodes hold them (credential opened): every one, or the one with `id`.
pub(super) fn upstream_records(
    c: &Connection,
    kek: &Kek,
    id: Option<&str>,
) -> Result<Vec<UpstreamRecord>, StoreError> {
    let rows: Vec<StoredUpstream> = match id {
        Some(id) => upstream_by_id(c, id)?.into_iter().collect(),
        None => {
            let mut st = c.prepare(&format!("{UPSTREAM_SELECT} ORDER BY id"))?;
            let rows = st.query_map([], upstream_row)?;
            rows.collect::<Result<_, _>>()?
        }
    };
    rows.into_iter()
        .map(|(u, sealed)| {
            let credential = match sealed {
                Some(s) => Some(open_credential(kek, &u.id, &s)?),
                None => None,
            };
            Ok(UpstreamRecord {
                non_retention: u.non_retention.to_record(),
                id: u.id,
                tenant_id: u.tenant_id,
                environment: u.environment,
                name: u.name,
                provider: u.provider,
                base_url: u.base_url,
                credential,
                stream_options: u.stream_options,
                region: u.region,
                baa: u.baa,
                max_connections: u.max_connections,
                connect_timeout_ms: u.connect_timeout_ms,
                first_byte_timeout_ms: u.first_byte_timeout_ms,
                read_idle_timeout_ms: u.read_idle_timeout_ms,
            })
        })
        .collect()
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

fn route_by_id(c: &Connection, id: &str) -> Result<Option<Route>, StoreError> {
    Ok(c.query_row(
        &format!("{ROUTE_SELECT} WHERE id = ?1"),
        params![id],
        route_row,
    )
    .optional()?)
}

fn routes_of(
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
pub(super) fn route_records(
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
    "SELECT id, tenant_id, environment, zero_retention, region, hipaa, updated_at FROM policies";

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Policy> {
    Ok(Policy {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        environment: r.get(2)?,
        zero_retention: r.get::<_, i64>(3)? != 0,
        region: r.get(4)?,
        hipaa: r.get::<_, i64>(5)? != 0,
        updated_at: r.get(6)?,
    })
}

/// Policy records as nodes hold them: every one set, or the one with `id`.
pub(super) fn policy_records(
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
        })
        .collect())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

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
        check_name("name", name)?;
        check_upstream(spec)?;
        let id = record_id(tenant_id, environment, name);
        // Sealed before the transaction: the store's lock is not held over the encryption.
        let sealed_new = match spec.credential.as_deref() {
            Some(c) if !c.is_empty() => Some(seal_credential(&self.kek, &id, c)?),
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
            let nr = serde_json::to_string(&spec.non_retention).map_err(|e| invalid(format!("non_retention: {e}")))?;
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
            ];
            let updated = tx.execute(
                "UPDATE upstreams SET tenant_id = ?2, environment = ?3, name = ?4, provider = ?5, base_url = ?6,
                    credential_sealed = ?7, non_retention = ?8, stream_options = ?9, region = ?10, baa = ?11,
                    max_connections = ?12, connect_timeout_ms = ?13, first_byte_timeout_ms = ?14,
                    read_idle_timeout_ms = ?15, updated_at = ?16
                 WHERE id = ?1",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO upstreams (id, tenant_id, environment, name, provider, base_url, credential_sealed,
                        non_retention, stream_options, region, baa, max_connections, connect_timeout_ms,
                        first_byte_timeout_ms, read_idle_timeout_ms, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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
                    "non_retention": spec.non_retention.mode(),
                    "region": spec.region,
                    "baa": spec.baa,
                    "created": updated == 0,
                }),
            )?;
            let (record, _) = upstream_by_id(tx, &id)?.ok_or(StoreError::NotFound("upstream"))?;
            Ok(Written { record, revision })
        })
    }

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
        check_name("name", name)?;
        match (&spec.model, &spec.prefix) {
            (Some(m), None) => check_model("model", m)?,
            // An empty prefix routes every model.
            (None, Some(p)) if p.is_empty() => {}
            (None, Some(p)) => check_model("prefix", p)?,
            _ => return Err(invalid("model, prefix: exactly one of them must be set")),
        }
        if spec.targets.is_empty() {
            return Err(invalid("targets: must name at least one upstream"));
        }
        if spec.targets.len() > MAX_TARGETS {
            return Err(invalid(format!("targets: at most {MAX_TARGETS}")));
        }
        for (i, t) in spec.targets.iter().enumerate() {
            check_name(&format!("targets[{i}].upstream"), &t.upstream)?;
            if let Some(m) = &t.model {
                check_model(&format!("targets[{i}].model"), m)?;
            }
        }
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
        check_region("region", &spec.region)?;
        let id = policy_id(tenant_id, environment);
        self.with_tx(|tx| {
            tenant_exists(tx, tenant_id)?;
            let values = params![
                id,
                tenant_id,
                environment.name(),
                i64::from(spec.zero_retention),
                spec.region,
                i64::from(spec.hipaa),
                now()
            ];
            let updated = tx.execute(
                "UPDATE policies SET tenant_id = ?2, environment = ?3, zero_retention = ?4, region = ?5,
                    hipaa = ?6, updated_at = ?7
                 WHERE id = ?1",
                values,
            )?;
            if updated == 0 {
                tx.execute(
                    "INSERT INTO policies (id, tenant_id, environment, zero_retention, region, hipaa, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
                }),
            )?;
            let record = policy_of(tx, tenant_id, environment)?;
            Ok(Written { record, revision })
        })
    }

    /// An environment's policy; every field off when it was never set.
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

fn policy_of(
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
        zero_retention: false,
        region: String::new(),
        hipaa: false,
        updated_at: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{actor, kek, temp};
    use aigw_wire::messages::kinds;
    use aigw_wire::{Change, Record, Tombstone};

    const SECRET: &str = "sk-test-PLAINTEXT-credential-0123456789";
    const PROD: Environment = Environment::Production;

    fn upstream(credential: Option<&str>) -> UpstreamSpec {
        UpstreamSpec {
            provider: "openai".into(),
            base_url: "http://127.0.0.1:9000/v1".into(),
            credential: credential.map(Into::into),
            non_retention: NonRetention::Header {
                name: "x-no-retain".into(),
                value: "1".into(),
            },
            stream_options: true,
            region: "eu".into(),
            baa: false,
            max_connections: 8,
            connect_timeout_ms: 1000,
            first_byte_timeout_ms: 0,
            read_idle_timeout_ms: 0,
        }
    }

    fn route(model: &str, targets: &[&str]) -> RouteSpec {
        RouteSpec {
            model: Some(model.into()),
            prefix: None,
            targets: targets
                .iter()
                .map(|t| RouteTarget {
                    upstream: (*t).into(),
                    model: None,
                })
                .collect(),
        }
    }

    /// A store with tenant `t`.
    fn store() -> (Store, std::path::PathBuf) {
        let dir = temp();
        let s = Store::open(&dir, kek()).expect("opens");
        s.create_tenant(&actor(), "t", "T", "pro").expect("tenant");
        (s, dir)
    }

    fn snapshot_upstream(s: &Store, id: &str) -> UpstreamRecord {
        let (records, _) = s.snapshot().expect("snapshot");
        records
            .into_iter()
            .find_map(|r| match r {
                Record::Upstream(u) if u.id == id => Some(u),
                _ => None,
            })
            .expect("upstream in the snapshot")
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn error_of<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
        match r {
            Err(StoreError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn credentials_are_sealed_at_rest_and_open_only_with_the_key() {
        let (s, dir) = store();
        let w = s
            .put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
            .expect("put");
        assert_eq!(w.record.id, "t/production/oa");
        assert!(w.record.has_credential);
        let json = serde_json::to_string(&w).expect("json");
        assert!(
            !json.contains(SECRET),
            "the API view has no credential: {json}"
        );
        assert!(json.contains("\"has_credential\":true"));
        assert!(!format!("{:?}", upstream(Some(SECRET))).contains(SECRET));

        // Not in the column, not anywhere in the database files.
        {
            let c = Connection::open(dir.join("controlplane.db")).expect("raw");
            let sealed: Vec<u8> = c
                .query_row(
                    "SELECT credential_sealed FROM upstreams WHERE id = 't/production/oa'",
                    [],
                    |r| r.get(0),
                )
                .expect("column");
            assert!(!sealed.is_empty() && !contains(&sealed, SECRET));
        }
        for f in ["controlplane.db", "controlplane.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.join(f)) {
                assert!(!contains(&bytes, SECRET), "{f} holds the plaintext");
            }
        }
        // Nodes get the plaintext.
        assert_eq!(
            snapshot_upstream(&s, "t/production/oa")
                .credential
                .as_deref(),
            Some(SECRET)
        );

        // Omitted: kept. Empty: removed.
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
            .expect("put without credential");
        assert_eq!(
            snapshot_upstream(&s, "t/production/oa")
                .credential
                .as_deref(),
            Some(SECRET)
        );
        drop(s);

        // The right key opens it after a restart; a wrong key is refused at open.
        let s = Store::open(&dir, kek()).expect("reopens");
        assert_eq!(
            snapshot_upstream(&s, "t/production/oa")
                .credential
                .as_deref(),
            Some(SECRET)
        );
        drop(s);
        let wrong = Kek::from_hex(&"cd".repeat(32)).expect("hex");
        match Store::open(&dir, wrong) {
            Err(StoreError::Seal(m)) => assert!(m.contains("seal key"), "{m}"),
            other => panic!("a wrong key must be refused, got {other:?}"),
        }

        let s = Store::open(&dir, kek()).expect("reopens");
        let w = s
            .put_upstream(&actor(), "t", PROD, "oa", &upstream(Some("")))
            .expect("remove");
        assert!(!w.record.has_credential);
        assert_eq!(snapshot_upstream(&s, "t/production/oa").credential, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sealed_credential_moved_to_another_upstream_does_not_open() {
        let (s, dir) = store();
        s.put_upstream(&actor(), "t", PROD, "a", &upstream(Some(SECRET)))
            .expect("a");
        s.put_upstream(&actor(), "t", PROD, "b", &upstream(None))
            .expect("b");
        drop(s);
        {
            let c = Connection::open(dir.join("controlplane.db")).expect("raw");
            c.execute(
                "UPDATE upstreams SET credential_sealed = (SELECT credential_sealed FROM upstreams WHERE id = 't/production/a') WHERE id = 't/production/b'",
                [],
            )
            .expect("copy");
        }
        let s = Store::open(&dir, kek()).expect("opens (a's credential is intact)");
        match s.snapshot() {
            Err(StoreError::Seal(m)) => assert!(m.contains("another upstream"), "{m}"),
            other => panic!("expected a seal error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn changes_since_sends_current_records_and_tombstones() {
        let (s, dir) = store();
        let r_tenant = s.revision().expect("rev");
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
            .expect("upstream");
        let r_upstream = s.revision().expect("rev");
        let w = s
            .put_route(&actor(), "t", PROD, "gpt", &route("gpt-4o", &["oa"]))
            .expect("route");
        assert_eq!(w.revision, r_upstream + 1);

        let (changes, newest) = s.changes_since(r_upstream).expect("read").expect("kept");
        assert_eq!(newest, w.revision);
        assert_eq!(changes.len(), 1);
        match &changes[0] {
            Change::Upsert(Record::Route(r)) => {
                assert_eq!(r.id, "t/production/gpt");
                assert_eq!(r.model.as_deref(), Some("gpt-4o"));
                assert_eq!(r.targets[0].upstream, "oa");
            }
            other => panic!("expected the route, got {other:?}"),
        }

        let d = s.delete_route(&actor(), "t", PROD, "gpt").expect("delete");
        assert_eq!(d.deleted, "t/production/gpt");
        let (changes, newest) = s.changes_since(r_upstream).expect("read").expect("kept");
        assert_eq!(newest, d.revision);
        assert_eq!(
            changes,
            vec![Change::Delete(Tombstone {
                kind: kinds::ROUTE,
                id: "t/production/gpt".into()
            })]
        );

        // From before the upstream: the upstream (with its credential) and the tombstone; the
        // tenant itself is not something nodes hold.
        s.put_policy(
            &actor(),
            "t",
            PROD,
            &PolicySpec {
                zero_retention: true,
                region: "eu".into(),
                hipaa: false,
            },
        )
        .expect("policy");
        let (changes, _) = s.changes_since(r_tenant - 1).expect("read").expect("kept");
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(
            matches!(&changes[0], Change::Upsert(Record::Upstream(u)) if u.credential.as_deref() == Some(SECRET))
        );
        assert!(
            matches!(&changes[1], Change::Upsert(Record::Policy(p)) if p.zero_retention && p.region == "eu")
        );
        assert!(matches!(&changes[2], Change::Delete(t) if t.kind == kinds::ROUTE));

        // Bounded: more records changed than asked for is a snapshot's job.
        assert!(s
            .changes_since_at_most(r_tenant - 1, 2)
            .expect("read")
            .is_none());
        assert_eq!(
            s.changes_since_at_most(r_tenant - 1, 3)
                .expect("read")
                .map(|(c, _)| c.len()),
            Some(3)
        );

        // Nothing after the newest.
        let newest = s.revision().expect("rev");
        let (changes, n) = s.changes_since(newest).expect("read").expect("kept");
        assert!(changes.is_empty());
        assert_eq!(n, newest);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn change_sets_order_upstreams_before_the_routes_that_name_them() {
        let (s, dir) = store();
        let from = s.revision().expect("rev");
        s.put_upstream(&actor(), "t", PROD, "old", &upstream(None))
            .expect("old");
        s.put_route(&actor(), "t", PROD, "r", &route("m", &["old"]))
            .expect("route");
        // The route moves to a new upstream created after it; the old upstream goes.
        s.put_upstream(&actor(), "t", PROD, "new", &upstream(None))
            .expect("new");
        s.put_route(&actor(), "t", PROD, "r", &route("m", &["new"]))
            .expect("move");
        s.delete_upstream(&actor(), "t", PROD, "old")
            .expect("delete");
        // Touch the new upstream again so its last change comes after the route's.
        s.put_upstream(&actor(), "t", PROD, "new", &upstream(None))
            .expect("new again");
        let (changes, _) = s.changes_since(from).expect("read").expect("kept");
        let order: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::Upsert(r) => format!("upsert {}", record_id_of(r)),
                Change::Delete(t) => format!("delete {}", t.id),
            })
            .collect();
        assert_eq!(
            order,
            [
                "upsert t/production/new",
                "upsert t/production/r",
                "delete t/production/old"
            ]
        );
        let (records, _) = s.snapshot().expect("snapshot");
        let kinds: Vec<u64> = records.iter().map(Record::kind).collect();
        let mut sorted = kinds.clone();
        sorted.sort_unstable();
        assert_eq!(kinds, sorted, "snapshot: keys, upstreams, routes, policies");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn record_id_of(r: &Record) -> String {
        match r {
            Record::Key(k) => k.key_id.clone(),
            Record::Upstream(u) => u.id.clone(),
            Record::Route(r) => r.id.clone(),
            Record::Policy(p) => p.id.clone(),
            Record::Unknown { .. } => String::new(),
        }
    }

    #[test]
    fn compaction_forgets_old_revisions_but_never_reuses_one() {
        let (s, dir) = store();
        for i in 0..5 {
            s.put_upstream(&actor(), "t", PROD, &format!("u{i}"), &upstream(None))
                .expect("upstream");
        }
        let newest = s.revision().expect("rev");
        assert_eq!(newest, 6);
        let c = s.compact(&actor(), 2).expect("compact");
        assert_eq!(
            c,
            crate::store::Compaction {
                compacted_through: 4,
                revision: 6,
                deleted: 4
            }
        );
        assert!(s.changes_since(1).expect("read").is_none());
        assert!(s.changes_since(3).expect("read").is_none());
        let (changes, n) = s.changes_since(4).expect("read").expect("kept");
        assert_eq!((changes.len(), n), (2, 6));
        assert_eq!(
            s.compact(&actor(), 2).expect("again").deleted,
            0,
            "nothing more to delete"
        );

        // Everything compacted: the revision still only moves forward, across restarts.
        let c = s.compact(&actor(), 0).expect("all");
        assert_eq!((c.compacted_through, c.revision), (6, 6));
        assert_eq!(s.revision().expect("rev"), 6);
        assert!(s.changes_since(5).expect("read").is_none());
        let (changes, n) = s.changes_since(6).expect("read").expect("kept");
        assert!(changes.is_empty());
        assert_eq!(n, 6);
        drop(s);
        let s = Store::open(&dir, kek()).expect("reopens");
        assert_eq!(s.revision().expect("rev"), 6);
        let w = s
            .put_route(&actor(), "t", PROD, "r", &route("m", &["u0"]))
            .expect("route");
        assert_eq!(w.revision, 7);
        let (changes, _) = s.changes_since(6).expect("read").expect("kept");
        assert_eq!(changes.len(), 1);

        let e = s.compact(&actor(), -1).expect_err("negative");
        assert!(e.to_string().starts_with("keep:"), "{e}");
        // Operator compactions are audited; periodic ones only when they delete something.
        let audited = |s: &Store| {
            s.audit(0, 10_000)
                .expect("audit")
                .iter()
                .filter(|a| a.action == "changelog.compact")
                .count()
        };
        assert_eq!(audited(&s), 3);
        s.compact_periodic(10).expect("periodic");
        assert_eq!(audited(&s), 3);
        s.compact_periodic(0).expect("periodic");
        assert_eq!(audited(&s), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upstream_a_route_names_cannot_be_deleted() {
        let (s, dir) = store();
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
            .expect("upstream");
        s.put_upstream(&actor(), "t", Environment::Staging, "oa", &upstream(None))
            .expect("staging upstream");
        s.put_route(&actor(), "t", PROD, "gpt", &route("gpt-4o", &["oa"]))
            .expect("route");
        match s.delete_upstream(&actor(), "t", PROD, "oa") {
            Err(StoreError::Conflict(m)) => assert!(m.contains("gpt"), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Another environment's upstream of the same name is free to go.
        s.delete_upstream(&actor(), "t", Environment::Staging, "oa")
            .expect("staging");
        s.delete_route(&actor(), "t", PROD, "gpt").expect("route");
        s.delete_upstream(&actor(), "t", PROD, "oa").expect("now");
        assert!(matches!(
            s.delete_upstream(&actor(), "t", PROD, "oa"),
            Err(StoreError::NotFound("upstream"))
        ));
        assert!(matches!(
            s.delete_route(&actor(), "t", PROD, "gpt"),
            Err(StoreError::NotFound("route"))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn routes_name_existing_upstreams_of_their_environment() {
        let (s, dir) = store();
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
            .expect("upstream");
        s.put_upstream(
            &actor(),
            "t",
            Environment::Development,
            "dev",
            &upstream(None),
        )
        .expect("dev upstream");
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &["nope"])));
        assert!(m.starts_with("targets[0].upstream:"), "{m}");
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &["oa", "dev"])));
        assert!(m.starts_with("targets[1].upstream:"), "{m}");
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("m", &[])));
        assert!(m.starts_with("targets:"), "{m}");
        let both = RouteSpec {
            prefix: Some("gpt-".into()),
            ..route("gpt-4o", &["oa"])
        };
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &both));
        assert!(m.contains("exactly one"), "{m}");
        let neither = RouteSpec {
            model: None,
            ..route("x", &["oa"])
        };
        assert!(error_of(s.put_route(&actor(), "t", PROD, "r", &neither)).contains("exactly one"));
        let m = error_of(s.put_route(&actor(), "t", PROD, "Bad Name", &route("m", &["oa"])));
        assert!(m.starts_with("name:"), "{m}");
        let renamed = RouteSpec {
            targets: vec![RouteTarget {
                upstream: "oa".into(),
                model: Some(String::new()),
            }],
            ..route("m", &[])
        };
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &renamed));
        assert!(m.starts_with("targets[0].model:"), "{m}");

        // An empty prefix routes every model; an empty model routes none and is refused.
        let every = RouteSpec {
            model: None,
            prefix: Some(String::new()),
            ..route("x", &["oa"])
        };
        s.put_route(&actor(), "t", PROD, "all", &every)
            .expect("catch-all");
        assert!(matches!(
            s.put_route(&actor(), "t", PROD, "all2", &every),
            Err(StoreError::Conflict(m)) if m.starts_with("prefix:")
        ));
        let m = error_of(s.put_route(&actor(), "t", PROD, "r", &route("", &["oa"])));
        assert!(m.starts_with("model:"), "{m}");

        // Two routes may not claim the same model (or prefix); replacing one's own is fine.
        s.put_route(&actor(), "t", PROD, "a", &route("gpt-4o", &["oa"]))
            .expect("a");
        s.put_route(&actor(), "t", PROD, "a", &route("gpt-4o", &["oa"]))
            .expect("a again");
        assert!(matches!(
            s.put_route(&actor(), "t", PROD, "b", &route("gpt-4o", &["oa"])),
            Err(StoreError::Conflict(m)) if m.starts_with("model:")
        ));
        assert!(matches!(
            s.put_route(&actor(), "nobody", PROD, "b", &route("x", &["oa"])),
            Err(StoreError::NotFound("tenant"))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn upstream_fields_are_validated_by_name() {
        let (s, dir) = store();
        let put = |spec: UpstreamSpec| error_of(s.put_upstream(&actor(), "t", PROD, "oa", &spec));
        let with = |f: &dyn Fn(&mut UpstreamSpec)| {
            let mut u = upstream(None);
            f(&mut u);
            u
        };
        assert!(put(with(&|u| u.provider = "azure".into())).starts_with("provider:"));
        for bad in [
            "ftp://x",
            "http://",
            "http:///path",
            "http://user:pw@host",
            "http://host/?q=1",
            "http://host/#f",
            "http://host:0",
            "http://host:99999",
            "http://ho st",
            "http://[::1",
        ] {
            let m = put(with(&|u| u.base_url = bad.into()));
            assert!(m.starts_with("base_url:"), "{bad}: {m}");
        }
        for good in [
            "https://api.openai.com/v1",
            "http://[::1]:9000",
            "http://localhost:8080",
        ] {
            s.put_upstream(
                &actor(),
                "t",
                PROD,
                "ok",
                &with(&|u| u.base_url = good.into()),
            )
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let m = put(with(&|u| u.credential = Some("sk-\r\nx-evil: 1".into())));
        assert!(m.starts_with("credential:") && !m.contains("evil"), "{m}");
        let m = put(with(&|u| {
            u.non_retention = NonRetention::Header {
                name: "x-no-retain".into(),
                value: "1\r\nx-evil: 1".into(),
            }
        }));
        assert!(m.starts_with("non_retention.value:"), "{m}");
        let m = put(with(&|u| {
            u.non_retention = NonRetention::Header {
                name: "Authorization".into(),
                value: "x".into(),
            }
        }));
        assert!(m.starts_with("non_retention.name:"), "{m}");
        let m = put(with(&|u| {
            u.non_retention = NonRetention::BodyField {
                name: String::new(),
                value: serde_json::json!(false),
            }
        }));
        assert!(m.starts_with("non_retention.name:"), "{m}");
        assert!(put(with(&|u| u.region = "EU West".into())).starts_with("region:"));
        assert!(put(with(&|u| u.max_connections = 1 << 40)).starts_with("max_connections:"));
        assert!(
            put(with(&|u| u.read_idle_timeout_ms = u64::MAX)).starts_with("read_idle_timeout_ms:")
        );
        let m = error_of(s.put_upstream(&actor(), "t", PROD, "-x", &upstream(None)));
        assert!(m.starts_with("name:"), "{m}");
        assert!(matches!(
            s.put_upstream(&actor(), "nobody", PROD, "oa", &upstream(None)),
            Err(StoreError::NotFound("tenant"))
        ));
        // Body fields carry any JSON value to the nodes as JSON text.
        s.put_upstream(
            &actor(),
            "t",
            PROD,
            "bf",
            &with(&|u| {
                u.non_retention = NonRetention::BodyField {
                    name: "store".into(),
                    value: serde_json::json!(false),
                }
            }),
        )
        .expect("body field");
        assert_eq!(
            snapshot_upstream(&s, "t/production/bf").non_retention,
            NonRetentionRecord::BodyField {
                name: "store".into(),
                value_json: "false".into()
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn policies_default_to_off_and_are_replaced_whole() {
        let (s, dir) = store();
        let p = s.get_policy("t", Environment::Staging).expect("default");
        assert_eq!(
            (
                p.id.as_str(),
                p.zero_retention,
                p.region.as_str(),
                p.hipaa,
                p.updated_at
            ),
            ("t/staging", false, "", false, 0)
        );
        assert!(matches!(
            s.get_policy("nobody", PROD),
            Err(StoreError::NotFound("tenant"))
        ));
        let spec = PolicySpec {
            zero_retention: true,
            region: "eu".into(),
            hipaa: true,
        };
        let w = s
            .put_policy(&actor(), "t", Environment::Staging, &spec)
            .expect("put");
        assert!(w.record.zero_retention && w.record.hipaa && w.record.updated_at > 0);
        let w = s
            .put_policy(&actor(), "t", Environment::Staging, &PolicySpec::default())
            .expect("replace");
        assert!(!w.record.zero_retention && !w.record.hipaa && w.record.region.is_empty());
        let m = error_of(s.put_policy(
            &actor(),
            "t",
            PROD,
            &PolicySpec {
                region: "Nowhere!".into(),
                ..PolicySpec::default()
            },
        ));
        assert!(m.starts_with("region:"), "{m}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_mutation_writes_one_audit_record_without_the_credential() {
        let (s, dir) = store();
        let mut seen = s.audit(0, 10_000).expect("audit").len();
        let mut expect_one = |s: &Store, action: &str, target: &str| {
            let all = s.audit(0, 10_000).expect("audit");
            assert_eq!(all.len(), seen + 1, "one record for {action}");
            seen = all.len();
            let last = &all[all.len() - 1];
            assert_eq!(
                (last.action.as_str(), last.target.as_str()),
                (action, target)
            );
            assert_eq!(last.actor, "admin");
            assert_eq!(last.source, "127.0.0.1");
            assert!(!last.detail.to_string().contains(SECRET), "{}", last.detail);
        };
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(Some(SECRET)))
            .expect("put");
        expect_one(&s, "upstream.put", "t/production/oa");
        s.put_upstream(&actor(), "t", PROD, "oa", &upstream(None))
            .expect("put");
        expect_one(&s, "upstream.put", "t/production/oa");
        s.put_route(&actor(), "t", PROD, "r", &route("m", &["oa"]))
            .expect("route");
        expect_one(&s, "route.put", "t/production/r");
        s.put_policy(&actor(), "t", PROD, &PolicySpec::default())
            .expect("policy");
        expect_one(&s, "policy.put", "t/production");
        s.delete_route(&actor(), "t", PROD, "r").expect("delete");
        expect_one(&s, "route.delete", "t/production/r");
        s.delete_upstream(&actor(), "t", PROD, "oa")
            .expect("delete");
        expect_one(&s, "upstream.delete", "t/production/oa");
        s.compact(&actor(), 1).expect("compact");
        expect_one(&s, "changelog.compact", "changelog");

        // A refused mutation writes nothing, not even a revision.
        let before = s.revision().expect("rev");
        assert!(s
            .put_route(&actor(), "t", PROD, "r", &route("m", &["gone"]))
            .is_err());
        assert_eq!(s.revision().expect("rev"), before);
        assert_eq!(s.audit(0, 10_000).expect("audit").len(), seen);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
