//! The operator CLI: every command is one call to the admin API. Tenants and environments
//! are always `--tenant` and `--environment` (production unless given); the record a command
//! acts on (a name, a key id, a node id) is its positional argument. Durations are written
//! as in the node's TOML (`5s`, `10m`). Output is the API's JSON, or `--output id` (one id
//! per line, for scripts), `--output table`, or `--field PATH` (one value per line).

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

// Where the admin API is and how to present oneself to it. (Not a doc comment: clap would
// make it the about text of every command it is added to.)
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Admin API address: https:// (http:// only to a loopback address, to a control plane
    /// started with --insecure-plain-http).
    #[arg(
        long,
        env = "AIGW_CONTROLPLANE_URL",
        default_value = "https://127.0.0.1:9900"
    )]
    pub url: String,
    /// The CA certificate (PEM) the admin API's certificate is verified against. Default:
    /// the CA of a control plane on this machine (`pki/ca.pem` in the data directory of
    /// `serve`, and of `up`).
    #[arg(long, env = "AIGW_CONTROLPLANE_CA", value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Admin token (`serve` keeps it in `<data-dir>/admin-token`).
    #[arg(long, env = "AIGW_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How to print the answer.
    #[arg(short, long, value_enum, default_value_t = Output::Json)]
    pub output: Output,
    /// Print only this field of the answer (a dot path, e.g. `key` or `info.key_id`), one
    /// line per item of a list.
    #[arg(long, value_name = "PATH")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The API's JSON, pretty-printed.
    Json,
    /// The id of what was made or listed, one per line.
    Id,
    /// A table of a list's scalar fields.
    Table,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Tier {
    Free,
    Pro,
    Enterprise,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Openai,
    Anthropic,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EnvironmentName {
    Production,
    Staging,
    Development,
}

impl EnvironmentName {
    fn name(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Staging => "staging",
            Self::Development => "development",
        }
    }
}

// A tenant's environment (not a doc comment, as above).
#[derive(Debug, Clone, Args)]
pub struct Place {
    #[arg(long)]
    pub tenant: String,
    #[arg(long, value_enum, default_value_t = EnvironmentName::Production)]
    pub environment: EnvironmentName,
}

impl Place {
    fn path(&self) -> String {
        format!(
            "/v1/tenants/{}/environments/{}",
            self.tenant,
            self.environment.name()
        )
    }
}

fn duration_ms(name: &str, d: Option<Duration>) -> anyhow::Result<u64> {
    match d {
        None => Ok(0),
        Some(d) => {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 {
                bail!("--{name}: at least 1ms (leave it out for the node's default)");
            }
            Ok(ms)
        }
    }
}

/// A Unix time, or an RFC 3339 date-time (`2027-01-01T00:00:00Z`).
fn unix_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{e}: a Unix time or an RFC 3339 date-time"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .map_err(|_| "before 1970".to_string())
        })
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a tenant.
    TenantCreate {
        /// Its display name.
        name: String,
        /// Its id (letters, digits, - and _); default: generated.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, value_enum, default_value_t = Tier::Free)]
        tier: Tier,
    },
    /// List tenants.
    TenantList,
    /// Create a sub-account of a tenant (nested up to 8 deep).
    SubAccountCreate {
        name: String,
        #[arg(long)]
        tenant: String,
        /// The sub-account it belongs to; default: the tenant itself.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Create a key; the key is printed once (`--field key` prints only it).
    KeyCreate {
        #[command(flatten)]
        place: Place,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        sub_account: Option<String>,
        /// A model the key may use (repeat); default: every model its environment routes.
        #[arg(long = "allowed-model", value_name = "MODEL")]
        allowed_models: Vec<String>,
        /// When it stops working: a Unix time or an RFC 3339 date-time.
        #[arg(long, value_parser = unix_time)]
        expires_at: Option<i64>,
    },
    /// List a tenant's keys (never the keys themselves).
    KeyList {
        #[arg(long)]
        tenant: String,
    },
    /// Show a key's metadata.
    KeyGet { key_id: String },
    /// Revoke a key, on every node at once.
    KeyRevoke { key_id: String },
    /// Issue a replacement; the old key keeps working for --grace.
    KeyRotate {
        key_id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        grace: Duration,
    },
    /// Mint many keys of an environment in one transaction (seeding, migrations).
    KeyImport {
        #[command(flatten)]
        place: Place,
        #[arg(long)]
        count: usize,
        /// How many of them to print (at most 1,000); the rest are only stored.
        #[arg(long, default_value_t = 0)]
        return_keys: usize,
    },
    /// Create or replace an upstream of an environment.
    ///
    /// The credential is read from the environment variable named by --credential-env (never
    /// from the command line); without it the stored credential is kept.
    UpstreamPut {
        name: String,
        #[command(flatten)]
        place: Place,
        /// The API family it speaks.
        #[arg(long, alias = "provider", value_enum)]
        kind: Kind,
        /// http:// or https://, host, optional port and path.
        #[arg(long)]
        base_url: String,
        /// Name of the environment variable holding the provider credential.
        #[arg(long, value_name = "VAR", conflicts_with = "remove_credential")]
        credential_env: Option<String>,
        /// Remove the stored credential.
        #[arg(long)]
        remove_credential: bool,
        /// Where the provider processes data.
        #[arg(long, default_value = "")]
        region: String,
        /// A business associate agreement covers this upstream.
        #[arg(long)]
        baa: bool,
        /// Tell the provider not to retain with this request header.
        #[arg(long, value_name = "NAME=VALUE", conflicts_with_all = ["non_retention_body_field", "non_retention_agreement"])]
        non_retention_header: Option<String>,
        /// Tell the provider not to retain with this JSON body field.
        #[arg(
            long,
            value_name = "NAME=JSON",
            conflicts_with = "non_retention_agreement"
        )]
        non_retention_body_field: Option<String>,
        /// An account-level zero-retention agreement covers every request.
        #[arg(long)]
        non_retention_agreement: bool,
        /// The provider is not told anything (none of the three above, nor the provider's
        /// default: OpenAI's `store: false`). A zero-retention policy then refuses it.
        #[arg(long, conflicts_with_all = ["non_retention_header", "non_retention_body_field", "non_retention_agreement"])]
        no_non_retention: bool,
        /// Ask the provider for usage in streamed responses (OpenAI's stream_options).
        #[arg(long)]
        stream_options: bool,
        /// Forward the client's OpenAI-Organization and OpenAI-Project headers.
        #[arg(long)]
        pass_organization_headers: bool,
        /// Connections per worker; default: the node's.
        #[arg(long)]
        max_connections: Option<u64>,
        /// Default: the node's.
        #[arg(long, value_parser = humantime::parse_duration)]
        connect_timeout: Option<Duration>,
        /// Default: the node's.
        #[arg(long, value_parser = humantime::parse_duration)]
        first_byte_timeout: Option<Duration>,
        /// Default: the node's.
        #[arg(long, value_parser = humantime::parse_duration)]
        read_idle_timeout: Option<Duration>,
    },
    /// List an environment's upstreams (never their credentials).
    UpstreamList {
        #[command(flatten)]
        place: Place,
    },
    /// Show an upstream (`has_credential`, never the credential).
    UpstreamGet {
        name: String,
        #[command(flatten)]
        place: Place,
    },
    /// Delete an upstream; refused while a route names it.
    UpstreamDelete {
        name: String,
        #[command(flatten)]
        place: Place,
    },
    /// Create or replace a route: an exact --model or a --prefix, to upstreams in order.
    ///
    /// Repeat --target UPSTREAM (or UPSTREAM=MODEL, to send another model name) in failover
    /// order. An empty --prefix "" routes every model.
    #[command(group(clap::ArgGroup::new("matches").required(true).args(["model", "prefix"])))]
    RoutePut {
        name: String,
        #[command(flatten)]
        place: Place,
        /// Route this model name exactly.
        #[arg(long)]
        model: Option<String>,
        /// Route every model starting with this ("" = every model).
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long = "target", value_name = "UPSTREAM[=MODEL]", required = true)]
        targets: Vec<String>,
    },
    /// List an environment's routes.
    RouteList {
        #[command(flatten)]
        place: Place,
    },
    /// Show a route.
    RouteGet {
        name: String,
        #[command(flatten)]
        place: Place,
    },
    /// Delete a route.
    RouteDelete {
        name: String,
        #[command(flatten)]
        place: Place,
    },
    /// Set an environment's policy. Zero retention is on unless `--allow-retention` is given
    /// (an opt-out the audit log records); the other flags not given are off.
    PolicyPut {
        #[command(flatten)]
        place: Place,
        /// Only upstreams that can be told not to retain (the default).
        #[arg(long, conflicts_with = "allow_retention")]
        zero_retention: bool,
        /// Opt out of zero retention: upstreams that may retain requests can be used.
        #[arg(long)]
        allow_retention: bool,
        /// Only upstreams in this region.
        #[arg(long, default_value = "")]
        region: String,
        /// Only upstreams under a business associate agreement.
        #[arg(long)]
        hipaa: bool,
    },
    /// Show an environment's policy.
    PolicyGet {
        #[command(flatten)]
        place: Place,
    },
    /// Nodes: scope, enrolment, connection, and the revision each has applied.
    Nodes,
    /// Show a node.
    NodeGet { id: String },
    /// Register a node; prints its one-time enrolment token (`--field enrollment_token`).
    NodeAdd {
        id: String,
        /// Environments whose keys and routing it receives (repeat; default all three).
        #[arg(long = "environment", value_enum)]
        environments: Vec<EnvironmentName>,
        /// Tenants whose keys and routing it receives (repeat; default every tenant).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// How long the enrolment token is valid.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        expires_in: Duration,
    },
    /// A new enrolment token for a node (lost or replaced identity, a certificate nearing its
    /// end); its current certificate is refused once the node enrols with the new one.
    NodeEnroll {
        id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        expires_in: Duration,
    },
    /// Revoke a node: its link closes now and its certificate is refused from then on.
    NodeRevoke { id: String },
    /// Set what a node receives; it is sent a snapshot of the new scope at once.
    NodeScope {
        id: String,
        #[arg(long = "environment", value_enum)]
        environments: Vec<EnvironmentName>,
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Audit records in order.
    Audit {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// A tenant's usage over whole UTC days: requests, errors, tokens, cost, latency and
    /// time-to-first-byte percentiles.
    Usage {
        #[arg(long)]
        tenant: String,
        /// First UTC day, YYYY-MM-DD (default: today).
        #[arg(long)]
        from: Option<String>,
        /// Last UTC day, YYYY-MM-DD (default: today).
        #[arg(long)]
        to: Option<String>,
        /// Group by: day, key, model, sub_account (comma-separated, or repeated).
        #[arg(long = "group-by", value_delimiter = ',')]
        group_by: Vec<UsageDim>,
        /// Only this sub-account and those under it.
        #[arg(long)]
        sub_account: Option<String>,
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Name an enterprise tenant's own AWS KMS key: its provider credentials are sealed
    /// under data keys it generates from then on (the control plane's AWS credentials come
    /// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY where it runs).
    TenantKmsSet {
        tenant: String,
        /// Key id, ARN or alias/NAME.
        #[arg(long)]
        key_id: String,
        #[arg(long)]
        region: String,
        /// Default: https://kms.<region>.amazonaws.com.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Set a tenant's body log: on or off (opting out deletes what was logged), its
    /// retention in days (at most 7 on free, 30 on pro), and what a node does while its body
    /// queue is full (drop or refuse). An option not given keeps its value.
    BodyLogSet {
        tenant: String,
        #[arg(long)]
        enabled: Option<bool>,
        #[arg(long)]
        retention_days: Option<u32>,
        /// drop or refuse.
        #[arg(long)]
        when_behind: Option<String>,
    },
    /// A tenant's body log settings.
    BodyLogGet { tenant: String },
    /// A logged request's bodies, by its request id (x-request-id), while retained.
    BodyGet { tenant: String, request_id: String },
    /// Drop usage fields before a tenant's usage is stored (none given: keep every field).
    UsageDrop {
        tenant: String,
        /// Comma-separated: key_id, model, sub_account_id, latency, ttfb,
        /// cached_input_tokens, cache_write_tokens, reasoning_tokens.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
    },
    /// Set a sub-account's rate limits, covering every key in its subtree together,
    /// enforced by each node on its own traffic (0 = no limit).
    SubAccountRateLimits {
        tenant: String,
        sub_account_id: String,
        #[arg(long, default_value_t = 0)]
        requests_per_minute: u64,
        #[arg(long, default_value_t = 0)]
        tokens_per_minute: u64,
    },
    /// Set a key's rate limits, enforced by each node on its own traffic (0 = no limit).
    KeyRateLimits {
        key_id: String,
        #[arg(long, default_value_t = 0)]
        requests_per_minute: u64,
        #[arg(long, default_value_t = 0)]
        tokens_per_minute: u64,
    },
    /// Set a spend cap in USD per period on a tenant, one of its sub-accounts (covering its
    /// subtree) or one of its keys; requests that could exceed it get 429 insufficient_quota.
    SpendCapSet {
        tenant: String,
        /// A sub-account's id (the cap covers it and every sub-account under it).
        #[arg(long, conflicts_with = "key")]
        sub_account: Option<String>,
        /// A key's id.
        #[arg(long)]
        key: Option<String>,
        /// day (UTC), month (UTC) or lifetime.
        #[arg(long)]
        period: String,
        /// US dollars per period.
        #[arg(long)]
        limit_usd: f64,
    },
    /// A tenant's spend caps, with their current period's spend and leases.
    SpendCapList { tenant: String },
    /// Remove a spend cap by its id (as listed).
    SpendCapDelete { tenant: String, id: String },
    /// Set a model's price, in USD per million tokens: global, or for one --tenant.
    PriceSet {
        model: String,
        #[arg(long)]
        tenant: Option<String>,
        /// USD per million input tokens.
        #[arg(long)]
        input_price: f64,
        /// USD per million output tokens.
        #[arg(long)]
        output_price: f64,
        /// Input read from the provider's prompt cache (default: the input price).
        #[arg(long)]
        cached_input_price: Option<f64>,
        /// Input written to the provider's prompt cache (default: the input price).
        #[arg(long)]
        cache_write_price: Option<f64>,
    },
    /// The global prices, and a --tenant's own.
    PriceList {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a price (a --tenant's own, or the global one).
    PriceDelete {
        model: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The newest configuration revision.
    Revision,
    /// Delete all but the newest --keep changelog entries (nodes further behind get a
    /// snapshot).
    Compact {
        #[arg(long)]
        keep: u64,
    },
}

/// What usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageDim {
    Day,
    Key,
    Model,
    SubAccount,
}

impl UsageDim {
    fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Key => "key",
            Self::Model => "model",
            Self::SubAccount => "sub_account",
        }
    }
}

/// A query-string value, percent-encoded (model names hold `/` and `:`).
fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The API call a command makes.
pub fn request(cmd: Command) -> anyhow::Result<(&'static str, String, Option<Value>)> {
    Ok(match cmd {
        Command::TenantCreate { name, id, tier } => {
            let tier = format!("{tier:?}").to_lowercase();
            let mut body = json!({"name": name, "tier": tier});
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            ("POST", "/v1/tenants".into(), Some(body))
        }
        Command::TenantList => ("GET", "/v1/tenants".into(), None),
        Command::SubAccountCreate {
            name,
            tenant,
            parent,
        } => (
            "POST",
            format!("/v1/tenants/{tenant}/sub-accounts"),
            Some(json!({"name": name, "parent_id": parent})),
        ),
        Command::KeyCreate {
            place,
            name,
            sub_account,
            allowed_models,
            expires_at,
        } => (
            "POST",
            format!("/v1/tenants/{}/keys", place.tenant),
            Some(json!({
                "environment": place.environment.name(),
                "sub_account_id": sub_account,
                "name": name,
                "allowed_models": allowed_models,
                "expires_at": expires_at,
            })),
        ),
        Command::KeyList { tenant } => ("GET", format!("/v1/tenants/{tenant}/keys"), None),
        Command::KeyGet { key_id } => ("GET", format!("/v1/keys/{key_id}"), None),
        Command::KeyRevoke { key_id } => ("POST", format!("/v1/keys/{key_id}/revoke"), None),
        Command::KeyRotate { key_id, grace } => (
            "POST",
            format!("/v1/keys/{key_id}/rotate"),
            Some(json!({"grace_seconds": grace.as_secs()})),
        ),
        Command::KeyImport {
            place,
            count,
            return_keys,
        } => (
            "POST",
            format!("/v1/tenants/{}/keys/import", place.tenant),
            Some(
                json!({"environment": place.environment.name(), "count": count, "return_keys": return_keys}),
            ),
        ),
        Command::UpstreamPut {
            name,
            place,
            kind,
            base_url,
            credential_env,
            remove_credential,
            region,
            baa,
            non_retention_header,
            non_retention_body_field,
            non_retention_agreement,
            no_non_retention,
            stream_options,
            pass_organization_headers,
            max_connections,
            connect_timeout,
            first_byte_timeout,
            read_idle_timeout,
        } => {
            let non_retention = if let Some(h) = non_retention_header {
                let (n, v) = h
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--non-retention-header: expected NAME=VALUE"))?;
                json!({"mode": "header", "name": n, "value": v})
            } else if let Some(f) = non_retention_body_field {
                let (n, v) = f
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--non-retention-body-field: expected NAME=JSON"))?;
                let v: Value = serde_json::from_str(v).map_err(|e| {
                    anyhow!("--non-retention-body-field: the value is not JSON: {e}")
                })?;
                json!({"mode": "body_field", "name": n, "value": v})
            } else if non_retention_agreement {
                json!({"mode": "account_agreement"})
            } else if no_non_retention {
                json!({"mode": "none"})
            } else {
                // The provider's default.
                Value::Null
            };
            let mut body = json!({
                "provider": format!("{kind:?}").to_lowercase(),
                "base_url": base_url,
                "non_retention": non_retention,
                "stream_options": stream_options,
                "pass_organization_headers": pass_organization_headers,
                "region": region,
                "baa": baa,
                "max_connections": max_connections.unwrap_or(0),
                "connect_timeout_ms": duration_ms("connect-timeout", connect_timeout)?,
                "first_byte_timeout_ms": duration_ms("first-byte-timeout", first_byte_timeout)?,
                "read_idle_timeout_ms": duration_ms("read-idle-timeout", read_idle_timeout)?,
            });
            if let Some(var) = credential_env {
                let credential = std::env::var(&var).map_err(|_| {
                    anyhow!("--credential-env: the environment variable {var} is not set")
                })?;
                if credential.is_empty() {
                    bail!("--credential-env: the environment variable {var} is empty");
                }
                body["credential"] = json!(credential);
            } else if remove_credential {
                body["credential"] = json!("");
            }
            (
                "PUT",
                format!("{}/upstreams/{name}", place.path()),
                Some(body),
            )
        }
        Command::UpstreamList { place } => ("GET", format!("{}/upstreams", place.path()), None),
        Command::UpstreamGet { name, place } => {
            ("GET", format!("{}/upstreams/{name}", place.path()), None)
        }
        Command::UpstreamDelete { name, place } => {
            ("DELETE", format!("{}/upstreams/{name}", place.path()), None)
        }
        Command::RoutePut {
            name,
            place,
            model,
            prefix,
            targets,
        } => {
            let targets: Vec<Value> = targets
                .iter()
                .map(|t| match t.split_once('=') {
                    Some((upstream, model)) => json!({"upstream": upstream, "model": model}),
                    None => json!({"upstream": t}),
                })
                .collect();
            let mut body = json!({"targets": targets});
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            if let Some(p) = prefix {
                body["prefix"] = json!(p);
            }
            ("PUT", format!("{}/routes/{name}", place.path()), Some(body))
        }
        Command::RouteList { place } => ("GET", format!("{}/routes", place.path()), None),
        Command::RouteGet { name, place } => {
            ("GET", format!("{}/routes/{name}", place.path()), None)
        }
        Command::RouteDelete { name, place } => {
            ("DELETE", format!("{}/routes/{name}", place.path()), None)
        }
        Command::PolicyPut {
            place,
            zero_retention: _,
            allow_retention,
            region,
            hipaa,
        } => (
            "PUT",
            format!("{}/policy", place.path()),
            Some(json!({"zero_retention": !allow_retention, "region": region, "hipaa": hipaa})),
        ),
        Command::PolicyGet { place } => ("GET", format!("{}/policy", place.path()), None),
        Command::Nodes => ("GET", "/v1/nodes".into(), None),
        Command::NodeGet { id } => ("GET", format!("/v1/nodes/{id}"), None),
        Command::NodeAdd {
            id,
            environments,
            tenants,
            expires_in,
        } => (
            "POST",
            "/v1/nodes".into(),
            Some(json!({
                "id": id,
                "environments": environments.iter().map(|e| e.name()).collect::<Vec<_>>(),
                "tenants": tenants,
                "expires_in_seconds": expires_in.as_secs(),
            })),
        ),
        Command::NodeEnroll { id, expires_in } => (
            "POST",
            format!("/v1/nodes/{id}/enrollment"),
            Some(json!({"expires_in_seconds": expires_in.as_secs()})),
        ),
        Command::NodeRevoke { id } => ("POST", format!("/v1/nodes/{id}/revoke"), None),
        Command::NodeScope {
            id,
            environments,
            tenants,
        } => (
            "PUT",
            format!("/v1/nodes/{id}/scope"),
            Some(json!({
                "environments": environments.iter().map(|e| e.name()).collect::<Vec<_>>(),
                "tenants": tenants,
            })),
        ),
        Command::Audit { after, limit } => (
            "GET",
            format!("/v1/audit?after={after}&limit={limit}"),
            None,
        ),
        Command::Usage {
            tenant,
            from,
            to,
            group_by,
            sub_account,
            key_id,
            model,
        } => {
            let mut query = Vec::new();
            let group_by: Vec<&str> = group_by.iter().map(|d| d.name()).collect();
            if !group_by.is_empty() {
                query.push(format!("group_by={}", group_by.join(",")));
            }
            for (name, v) in [
                ("from", from),
                ("to", to),
                ("sub_account", sub_account),
                ("key_id", key_id),
                ("model", model),
            ] {
                if let Some(v) = v {
                    query.push(format!("{name}={}", query_value(&v)));
                }
            }
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            ("GET", format!("/v1/tenants/{tenant}/usage{q}"), None)
        }
        Command::TenantKmsSet {
            tenant,
            key_id,
            region,
            endpoint,
        } => (
            "PUT",
            format!("/v1/tenants/{}/kms", query_value(&tenant)),
            Some(json!({"key_id": key_id, "region": region, "endpoint": endpoint})),
        ),
        Command::BodyLogSet {
            tenant,
            enabled,
            retention_days,
            when_behind,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(v) = enabled {
                body.insert("enabled".into(), json!(v));
            }
            if let Some(v) = retention_days {
                body.insert("retention_days".into(), json!(v));
            }
            if let Some(v) = when_behind {
                body.insert("when_behind".into(), json!(v));
            }
            (
                "PUT",
                format!("/v1/tenants/{}/body-log", query_value(&tenant)),
                Some(serde_json::Value::Object(body)),
            )
        }
        Command::BodyLogGet { tenant } => (
            "GET",
            format!("/v1/tenants/{}/body-log", query_value(&tenant)),
            None,
        ),
        Command::BodyGet { tenant, request_id } => (
            "GET",
            format!(
                "/v1/tenants/{}/bodies/{}",
                query_value(&tenant),
                query_value(&request_id)
            ),
            None,
        ),
        Command::UsageDrop { tenant, fields } => (
            "PUT",
            format!("/v1/tenants/{}/usage-settings", query_value(&tenant)),
            Some(json!({ "drop": fields })),
        ),
        Command::SubAccountRateLimits {
            tenant,
            sub_account_id,
            requests_per_minute,
            tokens_per_minute,
        } => (
            "PUT",
            format!(
                "/v1/tenants/{}/sub-accounts/{}/rate-limits",
                query_value(&tenant),
                query_value(&sub_account_id)
            ),
            Some(json!({
                "requests_per_minute": requests_per_minute,
                "tokens_per_minute": tokens_per_minute,
            })),
        ),
        Command::KeyRateLimits {
            key_id,
            requests_per_minute,
            tokens_per_minute,
        } => (
            "PUT",
            format!("/v1/keys/{key_id}/rate-limits"),
            Some(json!({
                "requests_per_minute": requests_per_minute,
                "tokens_per_minute": tokens_per_minute,
            })),
        ),
        Command::PriceSet {
            model,
            tenant,
            input_price,
            output_price,
            cached_input_price,
            cache_write_price,
        } => (
            "PUT",
            "/v1/prices".into(),
            Some(json!({
                "model": model,
                "tenant_id": tenant,
                "input_per_mtok": input_price,
                "output_per_mtok": output_price,
                "cached_input_per_mtok": cached_input_price,
                "cache_write_per_mtok": cache_write_price,
            })),
        ),
        Command::SpendCapSet {
            tenant,
            sub_account,
            key,
            period,
            limit_usd,
        } => {
            let (scope, id) = match (sub_account, key) {
                (Some(s), _) => ("sub_account", Some(s)),
                (None, Some(k)) => ("key", Some(k)),
                (None, None) => ("tenant", None),
            };
            (
                "PUT",
                format!("/v1/tenants/{}/spend-caps", query_value(&tenant)),
                Some(json!({"scope": scope, "id": id, "period": period, "limit_usd": limit_usd})),
            )
        }
        Command::SpendCapList { tenant } => (
            "GET",
            format!("/v1/tenants/{}/spend-caps", query_value(&tenant)),
            None,
        ),
        Command::SpendCapDelete { tenant, id } => (
            "DELETE",
            format!(
                "/v1/tenants/{}/spend-caps/{}",
                query_value(&tenant),
                query_value(&id)
            ),
            None,
        ),
        Command::PriceList { tenant } => (
            "GET",
            match tenant {
                Some(t) => format!("/v1/prices?tenant_id={}", query_value(&t)),
                None => "/v1/prices".into(),
            },
            None,
        ),
        Command::PriceDelete { model, tenant } => (
            "DELETE",
            format!(
                "/v1/prices?model={}{}",
                query_value(&model),
                tenant.map_or(String::new(), |t| format!("&tenant_id={}", query_value(&t)))
            ),
            None,
        ),
        Command::Revision => ("GET", "/v1/revision".into(), None),
        Command::Compact { keep } => (
            "POST",
            "/v1/admin/compact".into(),
            Some(json!({"keep": keep})),
        ),
    })
}

/// Runs a command against the admin API and prints its answer as asked.
pub fn run(conn: &Connection, cmd: Command) -> anyhow::Result<()> {
    let token = conn
        .token
        .clone()
        .ok_or_else(|| anyhow!("--token or AIGW_ADMIN_TOKEN is required"))?;
    let (method, path, body) = request(cmd)?;
    let client = crate::client::Client::new(&conn.url, &token, conn.ca_file.as_deref())?;
    let (status, text) = client.call(method, &path, body.as_ref())?;
    if !(200..300).contains(&status) {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        bail!(
            "{status}: {}",
            v["error"]["message"].as_str().unwrap_or("error")
        )
    }
    let answer: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{method} {path}: the answer is not JSON ({e})"))?;
    print!("{}", render(&answer, conn.output, conn.field.as_deref()));
    Ok(())
}

/// The items of an answer: a list's, or the answer itself.
fn items(answer: &Value) -> Vec<&Value> {
    match answer.get("data").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![answer],
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(v, |v, p| v.get(p))
}

/// An item's id, wherever the API keeps it.
fn id_of(v: &Value) -> Option<&Value> {
    [
        "id",
        "key_id",
        "node_id",
        "info.key_id",
        "node.node_id",
        "revision",
    ]
    .iter()
    .find_map(|p| at(v, p))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An answer as `output` or `field` asks.
pub fn render(answer: &Value, output: Output, field: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(path) = field {
        for item in items(answer) {
            if let Some(v) = at(item, path) {
                out.push_str(&scalar(v));
                out.push('\n');
            }
        }
        return out;
    }
    match output {
        Output::Json => {
            out = serde_json::to_string_pretty(answer).unwrap_or_default();
            out.push('\n');
        }
        Output::Id => {
            for item in items(answer) {
                if let Some(id) = id_of(item) {
                    out.push_str(&scalar(id));
                    out.push('\n');
                }
            }
        }
        Output::Table => {
            let rows = items(answer);
            // Columns: the scalar fields, in the first item's order.
            let columns: Vec<String> = rows
                .first()
                .and_then(|r| r.as_object())
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| !v.is_object() && !v.is_array())
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    columns
                        .iter()
                        .map(|c| r.get(c).map(scalar).unwrap_or_default())
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |values: &[String]| {
                let mut l = values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ");
                l.truncate(l.trim_end().len());
                l.push('\n');
                l
            };
            out.push_str(&line(&columns));
            for r in &cells {
                out.push_str(&line(r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_render_as_ids_fields_and_tables() {
        let list = json!({"data": [
            {"id": "t1", "name": "Acme", "tier": "pro", "meta": {"x": 1}},
            {"id": "t2", "name": "Globex Corp", "tier": "free", "meta": {}}
        ]});
        assert_eq!(render(&list, Output::Id, None), "t1\nt2\n");
        assert_eq!(
            render(&list, Output::Json, Some("name")),
            "Acme\nGlobex Corp\n"
        );
        assert_eq!(
            render(&list, Output::Table, None),
            "id  name         tier\nt1  Acme         pro\nt2  Globex Corp  free\n"
        );
        let created = json!({"key": "aigw_prod_x", "info": {"key_id": "k1"}});
        assert_eq!(render(&created, Output::Id, None), "k1\n");
        assert_eq!(render(&created, Output::Json, Some("key")), "aigw_prod_x\n");
        let added = json!({"node": {"node_id": "edge-1"}, "enrollment_token": "tok"});
        assert_eq!(render(&added, Output::Id, None), "edge-1\n");
    }

    #[test]
    fn times_are_unix_or_rfc3339() {
        assert_eq!(unix_time("1800000000"), Ok(1_800_000_000));
        assert_eq!(unix_time("2027-01-01T00:00:00Z"), Ok(1_798_761_600));
        assert!(unix_time("next tuesday").is_err());
    }
}
