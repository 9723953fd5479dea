//! The routing records as operators write them (the bodies of PUTs) and read them back:
//! never a credential, only whether one is set.

use std::collections::BTreeMap;

use aigw_wire::NonRetention;
use serde::{Deserialize, Serialize};

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
    /// Absent: the provider's default ([`NonRetention::default_for`]).
    #[serde(default)]
    pub non_retention: Option<NonRetention>,
    #[serde(default)]
    pub stream_options: bool,
    /// Where the provider processes data; empty when unknown.
    #[serde(default)]
    pub region: String,
    /// A business associate agreement covers it.
    #[serde(default)]
    pub baa: bool,
    /// Forward the client's `OpenAI-Organization` and `OpenAI-Project` headers.
    #[serde(default)]
    pub pass_organization_headers: bool,
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

fn yes() -> bool {
    true
}

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            zero_retention: true,
            region: String::new(),
            hipaa: false,
            guardrails: BTreeMap::new(),
            revoke_leaked_keys: false,
            guardrails_fail_open: false,
            patterns: Vec::new(),
        }
    }
}

impl UpstreamSpec {
    /// The non-retention mode given, or the provider's default.
    pub fn non_retention(&self) -> NonRetention {
        match (
            &self.non_retention,
            aigw_wire::ProviderKind::from_name(&self.provider),
        ) {
            (Some(nr), _) => nr.clone(),
            (None, Some(kind)) => NonRetention::default_for(kind),
            (None, None) => NonRetention::None {},
        }
    }
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
            .field("pass_organization_headers", &self.pass_organization_headers)
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
    pub pass_organization_headers: bool,
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

/// An environment's policy as an operator writes it: zero retention unless opted out
/// (`"zero_retention": false`), every other field off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Never route to an upstream that cannot be told not to retain.
    #[serde(default = "yes")]
    pub zero_retention: bool,
    /// Only upstreams in this region; empty = any.
    #[serde(default)]
    pub region: String,
    /// Only upstreams under a business associate agreement.
    #[serde(default)]
    pub hipaa: bool,
    /// PII and secret guardrails by entity (`email`, `phone`, `card`, `ssn`, `iban`, `ip`,
    /// `secret`): an action (`allow`, `redact`, `block`) for both directions, or
    /// `{"requests": …, "responses": …}`. An entity not listed is allowed.
    #[serde(default)]
    pub guardrails: BTreeMap<String, GuardrailSpec>,
    /// Revoke a key of this environment at once when a node sees it in traffic (it is
    /// marked leaked and audited either way).
    #[serde(default)]
    pub revoke_leaked_keys: bool,
    /// When the guardrail scanner cannot run or fails, relay unscanned (audited as
    /// `guardrail.unscanned`) instead of refusing with `guardrail_unavailable`.
    #[serde(default)]
    pub guardrails_fail_open: bool,
    /// The tenant's own patterns (Hyperscan syntax, each match at most 512 bytes wide),
    /// found as the `custom` entity; at most 64 of at most 256 bytes. Each node compiles
    /// them off its request path; one it cannot compile leaves the environment routing
    /// nothing (listed with the node's problems), never unguarded.
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// One entity's guardrail as an operator writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GuardrailSpec {
    Both(String),
    Each(GuardrailView),
}

/// One entity's guardrail, each direction spelled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailView {
    #[serde(default = "allow")]
    pub requests: String,
    #[serde(default = "allow")]
    pub responses: String,
}

fn allow() -> String {
    "allow".into()
}

/// The spec's guardrails, each direction spelled out, or the field that is wrong.
pub(crate) fn guardrail_views(
    spec: &BTreeMap<String, GuardrailSpec>,
) -> Result<BTreeMap<String, GuardrailView>, String> {
    let mut out = BTreeMap::new();
    for (entity, g) in spec {
        let view = match g {
            GuardrailSpec::Both(a) => GuardrailView {
                requests: a.clone(),
                responses: a.clone(),
            },
            GuardrailSpec::Each(v) => v.clone(),
        };
        for (dir, a) in [("requests", &view.requests), ("responses", &view.responses)] {
            if aigw_wire::GuardrailAction::from_name(a).is_none() {
                return Err(format!(
                    "guardrails.{entity}.{dir}: {a:?} is not allow, redact or block"
                ));
            }
        }
        out.insert(entity.clone(), view);
    }
    Ok(out)
}

/// Guardrails as nodes receive them.
pub(crate) fn guardrail_records(
    views: &BTreeMap<String, GuardrailView>,
) -> Vec<aigw_wire::GuardrailRecord> {
    let action = |a: &str| aigw_wire::GuardrailAction::from_name(a).unwrap_or_default();
    views
        .iter()
        .map(|(entity, v)| aigw_wire::GuardrailRecord {
            entity: entity.clone(),
            requests: action(&v.requests),
            responses: action(&v.responses),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    pub zero_retention: bool,
    pub region: String,
    pub hipaa: bool,
    pub guardrails: BTreeMap<String, GuardrailView>,
    pub revoke_leaked_keys: bool,
    pub guardrails_fail_open: bool,
    pub patterns: Vec<String>,
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
