//! The rules both planes apply to routing records, written once.
//!
//! The control plane checks an upstream, route or policy with these functions before it
//! commits it; a node checks every record it receives with the same functions before it
//! applies it, and checks its static configuration file with them too. So the control plane
//! never accepts a record that a node would refuse: a base URL whose host is not a valid TLS
//! server name, a non-retention header the gateway drops, a field larger than a node takes.
//!
//! No I/O here: a rule looks only at the record.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::keys::Environment;
use crate::routing::{PolicyRecord, RouteRecord, UpstreamRecord};

/// Upstreams one route may fail over between.
pub const MAX_TARGETS: usize = 16;
/// Connections per worker one upstream may be given.
pub const MAX_CONNECTIONS: u64 = 100_000;
/// Longest configurable upstream timeout: a day, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Largest provider credential, in bytes.
pub const MAX_CREDENTIAL: usize = 16 * 1024;
/// Longest model name or prefix, in bytes.
pub const MAX_MODEL: usize = 256;
/// Longest base URL, in bytes.
pub const MAX_BASE_URL: usize = 2048;
/// Longest tenant id, in bytes.
pub const MAX_TENANT_ID: usize = 128;
/// Largest JSON value of a non-retention body field, in bytes.
pub const MAX_BODY_FIELD_VALUE: usize = 4096;
/// Most models one key may be limited to.
pub const MAX_ALLOWED_MODELS: usize = 256;
/// Longest key or sub-account name, in bytes.
pub const MAX_LABEL: usize = 128;

/// What upstream and route names must look like.
pub const NAME_RULE: &str =
    "1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit";

/// Which API family an upstream speaks. There is no translation between families: a
/// request goes only to upstreams of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`,
    /// `/v1/models`; key in `Authorization: Bearer`.
    Openai,
    /// `/v1/messages`; key in `x-api-key`, `anthropic-version` required.
    Anthropic,
}

impl ProviderKind {
    pub const ALL: [Self; 2] = [Self::Openai, Self::Anthropic];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// How a provider is told not to retain (or train on) a request. The same form everywhere:
/// the admin API's JSON, the node's TOML file and, field by field, the wire record.
/// The field-less modes are empty struct variants so that stray fields beside them are
/// refused too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NonRetention {
    /// The provider offers no way.
    None {},
    /// A request header, e.g. `{ mode = "header", name = "x-no-retain", value = "1" }`.
    Header { name: String, value: String },
    /// A top-level field of the JSON request body with any JSON value, e.g. OpenAI's
    /// `{ mode = "body_field", name = "store", value = false }`.
    BodyField { name: String, value: JsonText },
    /// An account-level zero-retention agreement covers every request.
    AccountAgreement {},
}

impl Default for NonRetention {
    fn default() -> Self {
        Self::None {}
    }
}

impl NonRetention {
    /// The mode an upstream of `kind` gets when none is given: OpenAI's `store: false`
    /// (sent on the endpoints that take it: chat completions and responses); none for
    /// Anthropic, which offers no per-request flag (its zero data retention is an agreement
    /// with the account: say so with `account_agreement`).
    pub fn default_for(kind: ProviderKind) -> Self {
        match kind {
            ProviderKind::Openai => Self::BodyField {
                name: "store".into(),
                value: JsonText("false".into()),
            },
            ProviderKind::Anthropic => Self::None {},
        }
    }

    /// The mode's name, as the `mode` field spells it.
    pub const fn mode(&self) -> &'static str {
        match self {
            Self::None {} => "none",
            Self::Header { .. } => "header",
            Self::BodyField { .. } => "body_field",
            Self::AccountAgreement {} => "account_agreement",
        }
    }

    /// Whether a provider reached through this mode can be relied on not to retain.
    pub const fn is_guaranteed(&self) -> bool {
        !matches!(self, Self::None {})
    }
}

/// The text of one JSON value. It is written as the value itself in JSON and TOML (so
/// `value = false` reads as `false`), and travels as text on the wire;
/// [`check_non_retention`] checks that the text is one valid JSON value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonText(pub String);

impl JsonText {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<serde_json::Value>(&self.0) {
            Ok(v) => v.serialize(s),
            Err(e) => Err(serde::ser::Error::custom(format!("not a JSON value: {e}"))),
        }
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Self(v.to_string()))
    }
}

/// `scheme://host[:port][/prefix]`, checked: what a node connects to and verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// A DNS name that is a valid TLS server name, or an IP address (without brackets).
    pub host: String,
    pub port: u16,
    /// Prepended to every request path; empty or `/...` without a trailing slash.
    pub path_prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self, RuleError> {
        let bad = |m: String| RuleError::new("base_url", m);
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad(format!(
                "must start with http:// or https:// (got {:?})",
                clip(url)
            )));
        };
        if url.len() > MAX_BASE_URL {
            return Err(bad(format!("at most {MAX_BASE_URL} bytes")));
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("must not contain spaces or control characters".into()));
        }
        if url.contains(['?', '#']) {
            return Err(bad("must not have a query or a fragment".into()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad(
                "must not carry user info (the credential goes in credential)".into(),
            ));
        }
        let (host, port) = split_host_port(authority).map_err(bad)?;
        if !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(bad("the path must be printable ASCII".into()));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
                _ => return Err(bad(format!("port {:?} is not 1 to 65535", clip(p)))),
            },
        };
        Ok(Self {
            tls,
            host,
            port,
            path_prefix: path.to_string(),
        })
    }

    /// The Host header value: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// The host (checked) and the port text of an authority.
fn split_host_port(authority: &str) -> Result<(String, Option<&str>), String> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in the host".to_string())?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "{:?} between '[' and ']' is not an IPv6 address",
                clip(host)
            ));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "only a port may follow the host".to_string())?,
            ),
        };
        return Ok((host.to_string(), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("must have a host".into());
    }
    // The node verifies an https upstream's certificate against this name, so it must be
    // what rustls takes as a server name (a DNS name or an IP address); plain http is held
    // to the same rule so a URL does not become invalid by switching scheme.
    let is_ip = host.parse::<IpAddr>().is_ok();
    if !is_ip && rustls_pki_types::DnsName::try_from(host).is_err() {
        return Err(format!(
            "{:?} is not a valid host name (it cannot be a TLS server name)",
            clip(host)
        ));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Request headers the gateway never forwards as the client sent them: hop-by-hop fields
/// (RFC 9110 §7.6.1), framing it recomputes, every family's client credential, cookies, and
/// `accept-encoding` (it reads response bodies, so it asks for them uncompressed). A
/// non-retention header may not be one of them. Lowercase.
pub const RESERVED_REQUEST_HEADERS: &[&str] = &[
    "te",
    "host",
    "cookie",
    "expect",
    "api-key",
    "trailer",
    "upgrade",
    "x-api-key",
    "connection",
    "keep-alive",
    "authorization",
    "x-aigw-no-log",
    "content-length",
    "accept-encoding",
    "proxy-connection",
    "transfer-encoding",
    "proxy-authorization",
];

/// Request headers that carry a client's key in either family (a subset of
/// [`RESERVED_REQUEST_HEADERS`]).
pub const CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
    "cookie",
];

/// Whether `name` (any case) is in [`RESERVED_REQUEST_HEADERS`]. Asked for every header of
/// every request: lengths are compared before bytes.
pub fn is_reserved_request_header(name: &[u8]) -> bool {
    RESERVED_REQUEST_HEADERS
        .iter()
        .any(|r| r.len() == name.len() && r.as_bytes().eq_ignore_ascii_case(name))
}

/// Top-level request body fields the gateway reads or sets itself; a non-retention body
/// field may not be one of them.
pub const RESERVED_BODY_FIELDS: &[&str] = &[
    "messages",
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
];

/// A record (or file entry) that breaks a rule: the field and what is wrong with it.
/// Never carries a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: Cow<'static, str>,
    pub message: String,
}

impl RuleError {
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl RuleError {
    /// The same error for a field inside `outer` (e.g. `targets[2]` + `model`).
    pub fn within(self, outer: impl fmt::Display) -> Self {
        Self {
            field: Cow::Owned(format!("{outer}.{}", self.field)),
            message: self.message,
        }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for RuleError {}

/// At most 64 characters of an offending value, for an error message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// An upstream or route name.
pub fn check_name(field: impl Into<Cow<'static, str>>, name: &str) -> Result<(), RuleError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RuleError::new(
            field,
            format!("must be {NAME_RULE} (got {:?})", clip(name)),
        ))
    }
}

/// A region: empty (unknown), or up to 32 of a-z, 0-9 and '-'.
pub fn check_region(field: impl Into<Cow<'static, str>>, region: &str) -> Result<(), RuleError> {
    let b = region.as_bytes();
    let ok = region.is_empty()
        || (b.len() <= 32
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuleError::new(
            field,
            format!(
                "at most 32 of a-z, 0-9 and '-', or empty for none (got {:?})",
                clip(region)
            ),
        ))
    }
}

/// A model name, a model prefix (`allow_empty`: the empty prefix matches every model).
pub fn check_model(
    field: impl Into<Cow<'static, str>>,
    model: &str,
    allow_empty: bool,
) -> Result<(), RuleError> {
    if model.is_empty() && !allow_empty {
        return Err(RuleError::new(field, "must not be empty"));
    }
    if model.len() > MAX_MODEL {
        return Err(RuleError::new(field, format!("at most {MAX_MODEL} bytes")));
    }
    if model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(RuleError::new(
            field,
            "must not contain spaces or control characters",
        ));
    }
    Ok(())
}

/// A provider credential: printable ASCII without spaces (it goes in a header). The
/// message never repeats it.
pub fn check_credential(credential: &str) -> Result<(), RuleError> {
    if credential.is_empty() {
        return Err(RuleError::new("credential", "must not be empty"));
    }
    if credential.len() > MAX_CREDENTIAL {
        return Err(RuleError::new(
            "credential",
            format!("at most {MAX_CREDENTIAL} bytes"),
        ));
    }
    if !credential.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(RuleError::new(
            "credential",
            "printable ASCII only, without spaces or line breaks",
        ));
    }
    Ok(())
}

pub fn check_non_retention(nr: &NonRetention) -> Result<(), RuleError> {
    match nr {
        NonRetention::None {} | NonRetention::AccountAgreement {} => Ok(()),
        NonRetention::Header { name, value } => {
            let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
            if name.is_empty() || name.len() > 128 || !name.bytes().all(token) {
                return Err(RuleError::new(
                    "non_retention.name",
                    format!("not an HTTP header name (got {:?})", clip(name)),
                ));
            }
            if is_reserved_request_header(name.as_bytes()) {
                return Err(RuleError::new(
                    "non_retention.name",
                    format!("{name} is a header the gateway sets or drops itself"),
                ));
            }
            if value.len() > 1024
                || !value
                    .bytes()
                    .all(|c| c == b'\t' || (0x20..0x7f).contains(&c))
            {
                return Err(RuleError::new(
                    "non_retention.value",
                    "at most 1024 printable ASCII characters",
                ));
            }
            Ok(())
        }
        NonRetention::BodyField { name, value } => {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(RuleError::new(
                    "non_retention.name",
                    format!(
                        "1 to 128 characters, no control characters (got {:?})",
                        clip(name)
                    ),
                ));
            }
            if RESERVED_BODY_FIELDS.contains(&name.as_str()) {
                return Err(RuleError::new(
                    "non_retention.name",
                    format!("{name} is a body field the gateway reads or sets itself"),
                ));
            }
            if value.0.len() > MAX_BODY_FIELD_VALUE {
                return Err(RuleError::new(
                    "non_retention.value",
                    format!("at most {MAX_BODY_FIELD_VALUE} bytes of JSON"),
                ));
            }
            if serde_json::from_str::<serde_json::Value>(&value.0).is_err() {
                return Err(RuleError::new(
                    "non_retention.value",
                    "must be one JSON value",
                ));
            }
            Ok(())
        }
    }
}

/// A key's operator-given fields: its name and the models it is limited to (every key
/// record goes to every node, so their size is bounded).
pub fn check_key_fields(name: &str, allowed_models: &[String]) -> Result<(), RuleError> {
    if name.len() > MAX_LABEL || name.chars().any(char::is_control) {
        return Err(RuleError::new(
            "name",
            format!("at most {MAX_LABEL} bytes, no control characters"),
        ));
    }
    if allowed_models.len() > MAX_ALLOWED_MODELS {
        return Err(RuleError::new(
            "allowed_models",
            format!("at most {MAX_ALLOWED_MODELS} models"),
        ));
    }
    for (i, m) in allowed_models.iter().enumerate() {
        check_model("model", m, false).map_err(|e| e.within(format!("allowed_models[{i}]")))?;
    }
    Ok(())
}

/// An upstream as a node builds it: the fields a rule had to parse, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUpstream {
    pub kind: ProviderKind,
    pub url: BaseUrl,
    pub environment: Environment,
}

fn check_owner(tenant_id: &str, environment: &str) -> Result<Environment, RuleError> {
    if tenant_id.is_empty()
        || tenant_id.len() > MAX_TENANT_ID
        || tenant_id.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(RuleError::new(
            "tenant_id",
            format!("1 to {MAX_TENANT_ID} characters, no '/' or control characters"),
        ));
    }
    Environment::from_name(environment).ok_or_else(|| {
        RuleError::new(
            "environment",
            format!(
                "must be production, staging or development (got {:?})",
                clip(environment)
            ),
        )
    })
}

/// The fields of an upstream that both a pushed record and a static file entry have.
pub fn check_upstream_fields(
    provider: &str,
    base_url: &str,
    non_retention: &NonRetention,
    region: &str,
) -> Result<(ProviderKind, BaseUrl), RuleError> {
    let kind = ProviderKind::from_name(provider).ok_or_else(|| {
        RuleError::new(
            "provider",
            format!("must be openai or anthropic (got {:?})", clip(provider)),
        )
    })?;
    let url = BaseUrl::parse(base_url)?;
    check_non_retention(non_retention)?;
    check_region("region", region)?;
    Ok((kind, url))
}

/// Every rule on one upstream record.
pub fn check_upstream(r: &UpstreamRecord) -> Result<CheckedUpstream, RuleError> {
    let environment = check_owner(&r.tenant_id, &r.environment)?;
    check_name("name", &r.name)?;
    let (kind, url) = check_upstream_fields(&r.provider, &r.base_url, &r.non_retention, &r.region)?;
    if let Some(c) = &r.credential {
        check_credential(c)?;
    }
    if r.max_connections > MAX_CONNECTIONS {
        return Err(RuleError::new(
            "max_connections",
            format!("at most {MAX_CONNECTIONS}"),
        ));
    }
    for (field, v) in [
        ("connect_timeout_ms", r.connect_timeout_ms),
        ("first_byte_timeout_ms", r.first_byte_timeout_ms),
        ("read_idle_timeout_ms", r.read_idle_timeout_ms),
    ] {
        if v > MAX_TIMEOUT_MS {
            return Err(RuleError::new(
                field,
                format!("at most {MAX_TIMEOUT_MS} (a day)"),
            ));
        }
    }
    Ok(CheckedUpstream {
        kind,
        url,
        environment,
    })
}

/// A route's own fields (that its targets name upstreams of its environment is checked
/// against the environment, by each plane).
pub fn check_route_fields(
    model: Option<&str>,
    prefix: Option<&str>,
    targets: &[(&str, Option<&str>)],
) -> Result<(), RuleError> {
    match (model, prefix) {
        (Some(m), None) => check_model("model", m, false)?,
        (None, Some(p)) => check_model("prefix", p, true)?,
        _ => {
            return Err(RuleError::new(
                "model",
                "set exactly one of model and prefix",
            ))
        }
    }
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(RuleError::new(
            "targets",
            format!("1 to {MAX_TARGETS} upstreams"),
        ));
    }
    for (i, (upstream, model)) in targets.iter().enumerate() {
        check_name("upstream", upstream).map_err(|e| e.within(format!("targets[{i}]")))?;
        if let Some(m) = model {
            check_model("model", m, false).map_err(|e| e.within(format!("targets[{i}]")))?;
        }
    }
    Ok(())
}

/// Every rule on one route record that can be checked without its environment.
pub fn check_route(r: &RouteRecord) -> Result<Environment, RuleError> {
    let environment = check_owner(&r.tenant_id, &r.environment)?;
    let targets: Vec<(&str, Option<&str>)> = r
        .targets
        .iter()
        .map(|t| (t.upstream.as_str(), t.model.as_deref()))
        .collect();
    check_route_fields(r.model.as_deref(), r.prefix.as_deref(), &targets)?;
    Ok(environment)
}

/// Every rule on one policy record.
/// Most patterns of a tenant's own in one policy.
pub const MAX_POLICY_PATTERNS: usize = 64;
/// Longest such pattern, bytes.
pub const MAX_POLICY_PATTERN_LEN: usize = 256;

pub fn check_policy(r: &PolicyRecord) -> Result<Environment, RuleError> {
    let environment = check_owner(&r.tenant_id, &r.environment)?;
    if r.patterns.len() > MAX_POLICY_PATTERNS {
        return Err(RuleError::new(
            "patterns",
            format!("at most {MAX_POLICY_PATTERNS}"),
        ));
    }
    for (i, p) in r.patterns.iter().enumerate() {
        if p.is_empty() || p.len() > MAX_POLICY_PATTERN_LEN {
            return Err(RuleError::new(
                format!("patterns[{i}]"),
                format!("1 to {MAX_POLICY_PATTERN_LEN} bytes"),
            ));
        }
    }
    check_region("region", &r.region)?;
    for (i, g) in r.guardrails.iter().enumerate() {
        if !crate::routing::GUARDRAIL_ENTITIES.contains(&g.entity.as_str()) {
            return Err(RuleError::new(
                format!("guardrails.{}", g.entity),
                format!(
                    "unknown entity (one of {})",
                    crate::routing::GUARDRAIL_ENTITIES.join(", ")
                ),
            ));
        }
        if r.guardrails[..i].iter().any(|o| o.entity == g.entity) {
            return Err(RuleError::new(
                format!("guardrails.{}", g.entity),
                "given twice",
            ));
        }
    }
    Ok(environment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("https://api.openai.com").expect("valid");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_prefix.as_str()),
            (true, "api.openai.com", 443, "")
        );
        assert_eq!(u.host_header(), "api.openai.com");
        let u = BaseUrl::parse("http://127.0.0.1:9000/openai/").expect("valid");
        assert_eq!((u.port, u.path_prefix.as_str()), (9000, "/openai"));
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = BaseUrl::parse("http://[::1]:81").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        assert_eq!(u.host_header(), "[::1]:81");
        for bad in [
            "ftp://x",
            "http://",
            "http://u:p@x",
            "http://x:notaport",
            "http://x:0",
            "http://x:+80",
            "https://api..openai.com",
            "https://-bad.example",
            "https://bad-.example",
            "https://a b",
            "https://x?q=1",
            "https://x#f",
            "http://[::1",
            "http://[zz]:1",
            "http://[::1]x",
            "https://ex ample.com",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad} accepted");
        }
        let e = BaseUrl::parse("https://api..openai.com").expect_err("empty label");
        assert_eq!(e.field, "base_url");
        assert!(e.message.contains("TLS server name"), "{e}");
    }

    #[test]
    fn every_host_that_passes_is_a_tls_server_name() {
        for host in [
            "api.openai.com",
            "127.0.0.1",
            "::1",
            "my_host.internal",
            "x",
        ] {
            let url = if host.contains(':') {
                format!("https://[{host}]")
            } else {
                format!("https://{host}")
            };
            let u = BaseUrl::parse(&url).expect("valid");
            assert!(
                rustls_pki_types::ServerName::try_from(u.host.as_str()).is_ok(),
                "{host}"
            );
        }
    }

    #[test]
    fn reserved_headers_in_any_case() {
        for h in RESERVED_REQUEST_HEADERS {
            assert!(is_reserved_request_header(h.as_bytes()), "{h}");
            assert!(is_reserved_request_header(
                h.to_ascii_uppercase().as_bytes()
            ));
        }
        for h in CLIENT_CREDENTIAL_HEADERS {
            assert!(is_reserved_request_header(h.as_bytes()), "{h}");
        }
        for h in [
            "traceparent",
            "user-agent",
            "anthropic-version",
            "hosts",
            "",
        ] {
            assert!(!is_reserved_request_header(h.as_bytes()), "{h}");
        }
        assert!(RESERVED_REQUEST_HEADERS
            .iter()
            .all(|h| h.bytes().all(|b| !b.is_ascii_uppercase())));
    }

    #[test]
    fn non_retention_reads_the_same_in_json_and_toml_form() {
        let v: NonRetention =
            serde_json::from_str(r#"{"mode":"body_field","name":"store","value":false}"#)
                .expect("json");
        assert_eq!(
            v,
            NonRetention::BodyField {
                name: "store".into(),
                value: JsonText("false".into())
            }
        );
        assert_eq!(
            serde_json::to_string(&v).expect("serialises"),
            r#"{"mode":"body_field","name":"store","value":false}"#
        );
        assert!(check_non_retention(&v).is_ok());
        assert!(serde_json::from_str::<NonRetention>(r#"{"mode":"none","x":1}"#).is_err());
        for bad in [
            NonRetention::Header {
                name: "Authorization".into(),
                value: "x".into(),
            },
            NonRetention::Header {
                name: "bad name".into(),
                value: "x".into(),
            },
            NonRetention::Header {
                name: "x-ok".into(),
                value: "line\nbreak".into(),
            },
            NonRetention::BodyField {
                name: "model".into(),
                value: JsonText("1".into()),
            },
            NonRetention::BodyField {
                name: "store".into(),
                value: JsonText("{not json".into()),
            },
        ] {
            assert!(check_non_retention(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upstream_records_are_checked_field_by_field() {
        let ok = UpstreamRecord {
            id: "t/production/a".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            name: "a".into(),
            provider: "openai".into(),
            base_url: "https://api.openai.com/v1x".into(),
            credential: Some("sk-1".into()),
            ..Default::default()
        };
        let c = check_upstream(&ok).expect("valid");
        assert_eq!(c.kind, ProviderKind::Openai);
        assert_eq!(c.url.path_prefix, "/v1x");
        let field = |f: &dyn Fn(&mut UpstreamRecord)| {
            let mut r = ok.clone();
            f(&mut r);
            check_upstream(&r).expect_err("invalid").field
        };
        assert_eq!(field(&|r| r.provider = "azure".into()), "provider");
        assert_eq!(
            field(&|r| r.base_url = "https://api..openai.com".into()),
            "base_url"
        );
        assert_eq!(field(&|r| r.name = "Bad".into()), "name");
        assert_eq!(field(&|r| r.environment = "qa".into()), "environment");
        assert_eq!(field(&|r| r.tenant_id = String::new()), "tenant_id");
        assert_eq!(field(&|r| r.credential = Some("a b".into())), "credential");
        assert_eq!(field(&|r| r.region = "EU".into()), "region");
        assert_eq!(
            field(&|r| r.max_connections = MAX_CONNECTIONS + 1),
            "max_connections"
        );
        assert_eq!(
            field(&|r| r.first_byte_timeout_ms = MAX_TIMEOUT_MS + 1),
            "first_byte_timeout_ms"
        );
        let secret = "sk-secret secret";
        let e = check_upstream(&UpstreamRecord {
            credential: Some(secret.into()),
            ..ok
        })
        .expect_err("space");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn route_fields() {
        assert!(check_route_fields(Some("gpt-4o"), None, &[("a", None)]).is_ok());
        assert!(check_route_fields(None, Some(""), &[("a", Some("m"))]).is_ok());
        assert!(check_route_fields(None, None, &[("a", None)]).is_err());
        assert!(check_route_fields(Some("a"), Some("b"), &[("a", None)]).is_err());
        assert!(check_route_fields(Some("a"), None, &[]).is_err());
        assert!(check_route_fields(Some("a b"), None, &[("a", None)]).is_err());
        assert!(check_route_fields(Some(""), None, &[("a", None)]).is_err());
        let many: Vec<(&str, Option<&str>)> = (0..=MAX_TARGETS).map(|_| ("a", None)).collect();
        assert!(check_route_fields(Some("m"), None, &many).is_err());
    }
}
