//! The data plane's configuration file (TOML), parsed and validated once.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and every
//! semantic error names the key it is about, e.g. `limits.max_headers: must be between 1 and
//! 256 (got 0)`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::h1::limits::{Limits, MAX_HEADERS_CEILING};

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub log: LogConfig,
    /// Providers the gateway forwards to. None configured: the built-in demo provider.
    pub upstreams: Vec<UpstreamConfig>,
    /// Model → upstreams. Exact names win, then the longest matching prefix.
    pub routes: Vec<RouteConfig>,
    /// Per-worker memory for request bodies being processed (over → 503).
    pub body_budget_bytes: u64,
    /// Where keys (and later routes and policies) come from. Without it the node serves
    /// unauthenticated (quick start and tests only; a warning says so).
    pub control_plane: Option<ControlPlaneConfig>,
    /// TLS on the client-facing listener. Set: `server.listen` speaks TLS 1.3 only, every
    /// response carries HSTS, and plain HTTP is off unless `plain_listen` is set.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first. Read again when it changes (checked every few
    /// seconds): new connections get the new certificate, open ones keep theirs.
    pub cert_file: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: std::path::PathBuf,
    /// Also listen for plain HTTP here. Every request on it is refused (403
    /// `https_required`) with a message telling the client to use https: no redirect (a
    /// POST's body has already been sent in clear) and no HSTS.
    #[serde(default)]
    pub plain_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `host:port` of the control plane's node link.
    pub address: String,
    /// Name to verify in its certificate (default: the host part of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The CA that signed the link's certificate (the control plane writes it to
    /// `<data>/pki/ca.pem` at first start).
    pub ca_file: std::path::PathBuf,
    /// Where this node keeps its identity on the link: its private key (`node.key`, mode
    /// 0600) and the client certificate the control plane issued it at enrolment.
    pub identity_dir: std::path::PathBuf,
    /// Environment variable holding a one-time enrolment token (from `controlplane
    /// node-add`): read when the node has no identity yet, or to enrol it again.
    #[serde(default = "default_enrollment_token_env")]
    pub enrollment_token_env: String,
    /// Or a secret file holding the enrolment token (this user's, mode 0600); read instead
    /// of the variable when given.
    #[serde(default)]
    pub enrollment_token_file: Option<std::path::PathBuf>,
    /// Replaced by enrolment; read only to say so.
    #[serde(default, deserialize_with = "present", rename = "token_env")]
    pub retired_token_env: bool,
    /// Replaced by the id in the node's certificate; read only to say so.
    #[serde(default, deserialize_with = "present", rename = "node_id")]
    pub retired_node_id: bool,
    /// Environments whose keys this node accepts (default: all three).
    #[serde(default = "default_environments")]
    pub environments: Vec<String>,
    /// How long the node keeps serving without hearing from the control plane; 0 = forever
    /// (the config's age is exported either way).
    #[serde(default, with = "humantime_serde")]
    pub max_stale: Duration,
    /// Where the last applied key table is kept, sealed with AES-256-GCM, so the node can
    /// restart while the control plane is down. Unset: nothing is written.
    #[serde(default)]
    pub snapshot_file: Option<std::path::PathBuf>,
    /// The key-encryption key (64 hex digits) for the sealed snapshot: this environment
    /// variable, or `seal_key_file`.
    #[serde(default = "default_seal_key_env")]
    pub seal_key_env: String,
    #[serde(default)]
    pub seal_key_file: Option<std::path::PathBuf>,
    /// The most body bytes held for the control plane's body log (queued, or sent and not
    /// yet acknowledged); beyond it a request's bodies are dropped, or the request is
    /// refused when its tenant asked for that.
    #[serde(default = "default_body_log_queue_bytes")]
    pub body_log_queue_bytes: usize,
}

fn default_body_log_queue_bytes() -> usize {
    crate::config::bodies::DEFAULT_QUEUE_BYTES
}

fn default_seal_key_env() -> String {
    "AIGW_NODE_SEAL_KEY".into()
}

impl ControlPlaneConfig {
    /// The enrolment token: from `enrollment_token_file` when given, else from
    /// `enrollment_token_env`; `None` when neither holds one.
    pub fn enrollment_token(&self) -> Result<Option<String>, String> {
        let token = match &self.enrollment_token_file {
            Some(f) => crate::seal::files::read_private(f)
                .map_err(|e| format!("control_plane.enrollment_token_file: {e}"))?,
            None => std::env::var(&self.enrollment_token_env).unwrap_or_default(),
        };
        let token = token.trim().to_string();
        Ok((!token.is_empty()).then_some(token))
    }

    /// Where the snapshot's key is read from, as messages name it.
    pub fn seal_key_source(&self) -> String {
        match &self.seal_key_file {
            Some(f) => format!("seal_key_file {}", f.display()),
            None => format!("environment variable {}", self.seal_key_env),
        }
    }

    /// Where the keyring of `snapshot_file` is kept: the data key sealing the snapshot and
    /// the usage spill file, wrapped by the seal key (`<snapshot_file>.keyring`).
    pub fn keyring_file(&self) -> Option<std::path::PathBuf> {
        self.snapshot_file.as_ref().map(|p| {
            let mut k = p.clone().into_os_string();
            k.push(".keyring");
            k.into()
        })
    }

    /// The data key the snapshot and the usage spill are sealed with, from the keyring the
    /// seal key opens (created at first use; a node from before keyrings, whose files were
    /// sealed with the seal key itself, adopts that key).
    pub fn data_key(&self) -> Result<crate::seal::Kek, String> {
        let master = self.seal_key()?;
        let (Some(ring), Some(snapshot)) = (self.keyring_file(), &self.snapshot_file) else {
            return Ok(master);
        };
        let mut spill = snapshot.clone().into_os_string();
        spill.push(".usage");
        let sealed_before = snapshot.exists() || std::path::Path::new(&spill).exists();
        crate::seal::keyring::unlock(&ring, &master, sealed_before.then_some(&master))
            .map_err(|e| format!("{e} ({})", self.seal_key_source()))
    }

    /// Replaces the seal key with `new`: only the keyring is rewritten. The node must then
    /// start with the new key.
    pub fn rotate_seal_key(&self, new: &crate::seal::Kek) -> Result<std::path::PathBuf, String> {
        let ring = self.keyring_file().ok_or(
            "control_plane.snapshot_file is not set: nothing is sealed, nothing to rotate",
        )?;
        let old = self.seal_key()?;
        self.data_key()?;
        crate::seal::keyring::begin_rotation(&ring, &old, new).map_err(|e| e.to_string())?;
        crate::seal::keyring::finish_rotation(&ring, new).map_err(|e| e.to_string())?;
        Ok(ring)
    }

    /// The key-encryption key, from `seal_key_file` (a secret file: owned by this user, mode
    /// 0600) or `seal_key_env`; a wrong one is reported with where it came from.
    pub fn seal_key(&self) -> Result<crate::seal::Kek, String> {
        match &self.seal_key_file {
            Some(f) => {
                let text = crate::seal::files::read_private(f).map_err(|e| e.to_string())?;
                crate::seal::Kek::from_hex(&text)
                    .map_err(|e| format!("{} (seal_key_file): {e}", f.display()))
            }
            None => {
                let text = std::env::var(&self.seal_key_env).map_err(|_| {
                    format!("environment variable {} is not set", self.seal_key_env)
                })?;
                crate::seal::Kek::from_hex(&text).map_err(|e| {
                    format!(
                        "environment variable {} (seal_key_env): {e}",
                        self.seal_key_env
                    )
                })
            }
        }
    }
}

/// Whether the node can identify itself: an identity in `identity_dir` (its key a private
/// file), or a usable enrolment token to get one.
fn check_identity(cp: &ControlPlaneConfig) -> Result<(), (&'static str, String)> {
    let dir = &cp.identity_dir;
    if let Ok(m) = std::fs::metadata(dir) {
        if !m.is_dir() {
            return Err((
                "control_plane.identity_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
    } else if !dir
        .parent()
        .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir())
    {
        return Err((
            "control_plane.identity_dir",
            format!(
                "neither {} nor its parent directory exists; create it (mode 0700)",
                dir.display()
            ),
        ));
    }
    let files = crate::config::identity::IdentityFiles::new(dir);
    let token = match cp.enrollment_token() {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => return Err(("control_plane.enrollment_token_file", e)),
    };
    let token = token.as_str();
    if !token.is_empty() && !aigw_wire::keys::token_is_acceptable(token) {
        return Err((
            "control_plane.enrollment_token_env",
            format!(
                "environment variable {} holds {} characters; an enrolment token has at least {}",
                cp.enrollment_token_env,
                token.len(),
                aigw_wire::keys::MIN_TOKEN_LEN
            ),
        ));
    }
    if files.exists() {
        if let Err(e) = files.load() {
            return Err(("control_plane.identity_dir", e.to_string()));
        }
    } else if token.is_empty() {
        return Err((
            "control_plane.enrollment_token_env",
            format!(
                "this node has no identity in {} yet: set {} to an enrolment token (on the control plane: controlplane node-add <node id>)",
                dir.display(),
                cp.enrollment_token_env
            ),
        ));
    }
    Ok(())
}

/// Whether the directory of the sealed snapshot exists as a directory, or can be created
/// (its parent exists); a node creates it with mode 0700 at start.
fn check_snapshot_dir(snapshot: &Path) -> Result<(), String> {
    let dir = match snapshot.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(_) => match dir.parent().map(std::fs::metadata) {
            Some(Ok(m)) if m.is_dir() => Ok(()),
            _ => Err(format!(
                "neither {} nor its parent directory exists; create it (mode 0700) for the sealed snapshot",
                dir.display()
            )),
        },
    }
}

/// True for a field that is there, whatever it holds.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

fn default_enrollment_token_env() -> String {
    "AIGW_ENROLLMENT_TOKEN".into()
}

fn default_environments() -> Vec<String> {
    vec!["production".into(), "staging".into(), "development".into()]
}

pub use crate::runtime::DriverChoice;
pub use aigw_wire::{NonRetention, ProviderKind};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name routes refer to.
    pub name: String,
    pub kind: ProviderKind,
    /// `https://api.openai.com` or `http://127.0.0.1:9000`; a path is a prefix for every
    /// request path (e.g. `https://host/openai` sends `/openai/v1/chat/completions`).
    pub base_url: String,
    /// Environment variable holding the provider credential (never the credential itself).
    #[serde(default)]
    pub credential_env: Option<String>,
    /// Or a secret file holding it (this user's, mode 0600): a mounted secret, say.
    #[serde(default)]
    pub credential_file: Option<std::path::PathBuf>,
    /// PEM bundle of CAs to trust instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate. Tests only: this removes the protection TLS gives.
    #[serde(default)]
    pub danger_accept_invalid_certs: bool,
    /// Connections per worker to this upstream (in use plus idle). A stream holds its
    /// connection for its whole life, so this must fit the streams a core serves at once;
    /// past it a request waits up to `connect_timeout` for a connection to come free, then
    /// gets 503 `upstream_busy` with `Retry-After`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From the request's last byte to the response's first. Non-streamed reasoning models
    /// think for minutes before the first byte.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest the upstream may stall: between two reads of a response body (streams
    /// included), or while taking none of a request being sent.
    #[serde(default = "default_read_idle_timeout", with = "humantime_serde")]
    pub read_idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Absent: the provider's default (OpenAI's `store: false`; none for Anthropic).
    #[serde(default)]
    pub non_retention: Option<NonRetention>,
    /// Whether the upstream accepts OpenAI's `stream_options`.
    #[serde(default)]
    pub stream_options: bool,
    /// Forward the client's `OpenAI-Organization` and `OpenAI-Project` headers (dropped by
    /// default: the gateway's credential decides which provider account is used).
    #[serde(default)]
    pub pass_organization_headers: bool,
    /// Where the provider processes data (e.g. `us`, `eu`); empty when unknown.
    #[serde(default)]
    pub region: String,
    /// A business associate agreement covers this upstream (PHI allowed).
    #[serde(default)]
    pub baa: bool,
}

pub(crate) fn default_max_connections() -> usize {
    10_000
}
pub(crate) fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(600)
}
pub(crate) fn default_read_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
impl UpstreamConfig {
    /// The non-retention mode given, or the provider's default.
    pub fn non_retention(&self) -> NonRetention {
        self.non_retention
            .clone()
            .unwrap_or_else(|| NonRetention::default_for(self.kind))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact model name.
    #[serde(default)]
    pub model: Option<String>,
    /// Model name prefix (`""` matches every model).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Upstreams in failover order. Only those speaking the request's API are used.
    pub targets: Vec<RouteTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    pub upstream: String,
    /// Model name to send instead of the client's (e.g. a deployment name).
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where clients connect. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    /// Pin worker N to core N.
    pub pin_workers: bool,
    /// `auto` probes io_uring (with COOP_TASKRUN | SINGLE_ISSUER, then plain) and falls back
    /// to epoll; `io_uring` and `epoll` force one. The environment variable
    /// `MONOIO_FORCE_LEGACY_DRIVER=1` also forces epoll.
    pub driver: DriverChoice,
    /// Listen backlog per worker socket.
    pub backlog: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Health, readiness and worker state. Keep it off public interfaces.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_request_line_bytes: usize,
    pub max_chunk_ext_bytes: usize,
    pub max_trailer_bytes: usize,
    pub max_body_bytes: u64,
    /// Request bodies a worker waits for at once (each holds memory and a connection);
    /// past it, 503 `server_busy`.
    pub max_body_reads: usize,
    /// Of those, how many one client address may have (so one client cannot hold them all).
    pub max_body_reads_per_client: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// From the first byte of a request head to its last (slowloris bound; 408 after).
    #[serde(with = "humantime_serde")]
    pub head_read: Duration,
    /// How long an idle keep-alive connection is kept open.
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    /// Longest silence while a request body is arriving.
    #[serde(with = "humantime_serde")]
    pub body_read_idle: Duration,
    /// Longest a whole request body may take to arrive, however steadily it trickles in.
    #[serde(with = "humantime_serde")]
    pub body_read_total: Duration,
    /// Longest a single write to a client may block.
    #[serde(with = "humantime_serde")]
    pub write: Duration,
    /// On SIGTERM/SIGINT: how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `dataplane=debug`. `RUST_LOG` overrides it.
    pub level: String,
    /// One line per request (method, path without query, status, bytes, latency, id).
    pub access: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            log: LogConfig::default(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            body_budget_bytes: 256 * 1024 * 1024,
            control_plane: None,
            tls: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            pin_workers: true,
            driver: DriverChoice::Auto,
            backlog: 4096,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_head_bytes: l.max_head_bytes,
            max_headers: l.max_headers,
            max_request_line_bytes: l.max_request_line_bytes,
            max_chunk_ext_bytes: l.max_chunk_ext_bytes,
            max_trailer_bytes: l.max_trailer_bytes,
            max_body_bytes: l.max_body_bytes,
            max_body_reads: 1024,
            max_body_reads_per_client: 64,
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            head_read: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(60),
            body_read_idle: Duration::from_secs(30),
            body_read_total: Duration::from_secs(120),
            write: Duration::from_secs(30),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            access: true,
        }
    }
}

/// A configuration that could not be loaded. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates; `origin` only labels error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_string(),
                key,
                message,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        fn range<T: PartialOrd + std::fmt::Display + Copy>(
            key: &'static str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), (&'static str, String)> {
            if v < lo || v > hi {
                return Err((key, format!("must be between {lo} and {hi} (got {v})")));
            }
            Ok(())
        }
        let l = &self.limits;
        range("limits.max_head_bytes", l.max_head_bytes, 1024, 1 << 20)?;
        range("limits.max_headers", l.max_headers, 1, MAX_HEADERS_CEILING)?;
        range(
            "limits.max_request_line_bytes",
            l.max_request_line_bytes,
            64,
            l.max_head_bytes,
        )?;
        range(
            "limits.max_chunk_ext_bytes",
            l.max_chunk_ext_bytes,
            0,
            64 * 1024,
        )?;
        range("limits.max_trailer_bytes", l.max_trailer_bytes, 0, 1 << 20)?;
        range("limits.max_body_bytes", l.max_body_bytes, 0, 1 << 30)?;
        range("limits.max_body_reads", l.max_body_reads, 1, 1 << 20)?;
        range(
            "limits.max_body_reads_per_client",
            l.max_body_reads_per_client,
            1,
            l.max_body_reads,
        )?;
        range("server.workers", self.server.workers, 0, 1024)?;
        range("server.backlog", self.server.backlog, 1, 65535)?;
        let t = &self.timeouts;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        range("timeouts.head_read", ms(t.head_read), 1, 3_600_000)?;
        range(
            "timeouts.keepalive_idle",
            ms(t.keepalive_idle),
            1,
            86_400_000,
        )?;
        range(
            "timeouts.body_read_idle",
            ms(t.body_read_idle),
            1,
            3_600_000,
        )?;
        range(
            "timeouts.body_read_total",
            ms(t.body_read_total),
            ms(t.body_read_idle),
            3_600_000,
        )?;
        range("timeouts.write", ms(t.write), 1, 3_600_000)?;
        range(
            "timeouts.shutdown_drain",
            ms(t.shutdown_drain),
            0,
            3_600_000,
        )?;
        if self.admin.listen == self.server.listen && self.server.listen.port() != 0 {
            return Err(("admin.listen", "must differ from server.listen".into()));
        }
        range(
            "body_budget_bytes",
            self.body_budget_bytes,
            l.max_body_bytes.max(1),
            1 << 40,
        )?;
        self.validate_upstreams()?;
        if let Some(cp) = &self.control_plane {
            if !self.upstreams.is_empty() || !self.routes.is_empty() {
                return Err((
                    "upstreams",
                    "upstreams and routes come from the control plane when [control_plane] is set; remove them from this file".into(),
                ));
            }
            if !cp.address.contains(':') {
                return Err((
                    "control_plane.address",
                    format!("must be host:port (got {:?})", cp.address),
                ));
            }
            if let Err(e) = std::fs::metadata(&cp.ca_file) {
                return Err((
                    "control_plane.ca_file",
                    format!("{}: {e}", cp.ca_file.display()),
                ));
            }
            if cp.retired_token_env {
                return Err((
                    "control_plane.token_env",
                    "node tokens are replaced by enrolment: remove token_env, set identity_dir, and give the node an enrolment token from `controlplane node-add` in AIGW_ENROLLMENT_TOKEN".into(),
                ));
            }
            if cp.retired_node_id {
                return Err((
                    "control_plane.node_id",
                    "a node's id is the one it was registered with (`controlplane node-add <id>`); remove node_id".into(),
                ));
            }
            check_identity(cp)?;
            if let Some(snapshot) = &cp.snapshot_file {
                if let Err(e) = cp.seal_key() {
                    return Err(("control_plane.seal_key_env", e));
                }
                if let Err(e) = check_snapshot_dir(snapshot) {
                    return Err(("control_plane.snapshot_file", e));
                }
            }
            for e in &cp.environments {
                if aigw_wire::keys::Environment::from_name(e).is_none() {
                    return Err((
                        "control_plane.environments",
                        format!("unknown environment {e:?}"),
                    ));
                }
            }
        }
        if let Some(tls) = &self.tls {
            if let Err((bad, e)) = crate::config::tls::load(&tls.cert_file, &tls.key_file) {
                let key = match bad {
                    crate::config::tls::Bad::Cert => "tls.cert_file",
                    crate::config::tls::Bad::Key => "tls.key_file",
                };
                return Err((key, e));
            }
            if let Some(plain) = tls.plain_listen {
                if plain == self.server.listen || plain == self.admin.listen {
                    return Err((
                        "tls.plain_listen",
                        "must differ from server.listen and admin.listen".into(),
                    ));
                }
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                "log.level",
                format!("not a valid filter: {:?}", self.log.level),
            ));
        }
        Ok(())
    }

    fn validate_upstreams(&self) -> Result<(), (&'static str, String)> {
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = |what: &str| format!("upstreams[{i}] ({}): {what}", u.name);
            if u.name.is_empty() || !names.insert(u.name.as_str()) {
                return Err((
                    "upstreams.name",
                    format!(
                        "upstreams[{i}]: name must be non-empty and unique (got {:?})",
                        u.name
                    ),
                ));
            }
            if let Err(e) = aigw_wire::rules::check_upstream_fields(
                u.kind.name(),
                &u.base_url,
                &u.non_retention(),
                &u.region,
            ) {
                return Err(("upstreams", at(&e.to_string())));
            }
            if let Some(var) = &u.credential_env {
                if u.credential_file.is_some() {
                    return Err((
                        "upstreams.credential_file",
                        at("give credential_env or credential_file, not both"),
                    ));
                }
                if std::env::var(var).map_or(true, |v| v.is_empty()) {
                    return Err((
                        "upstreams.credential_env",
                        at(&format!("environment variable {var} is not set")),
                    ));
                }
            }
            if let Some(f) = &u.credential_file {
                if let Err(e) = crate::seal::files::read_private(f) {
                    return Err(("upstreams.credential_file", at(&e.to_string())));
                }
            }
            if let Some(f) = &u.ca_file {
                if let Err(e) = std::fs::metadata(f) {
                    return Err(("upstreams.ca_file", at(&format!("{}: {e}", f.display()))));
                }
            }
            if u.max_connections == 0 {
                return Err(("upstreams.max_connections", at("must be at least 1")));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.model.is_some() == r.prefix.is_some() {
                return Err((
                    "routes",
                    format!("routes[{i}]: set exactly one of `model` or `prefix`"),
                ));
            }
            if r.targets.is_empty() {
                return Err((
                    "routes.targets",
                    format!("routes[{i}]: needs at least one target"),
                ));
            }
            for t in &r.targets {
                if !names.contains(t.upstream.as_str()) {
                    return Err((
                        "routes.targets",
                        format!("routes[{i}]: unknown upstream {:?}", t.upstream),
                    ));
                }
            }
        }
        if !self.upstreams.is_empty() && self.routes.is_empty() {
            return Err((
                "routes",
                "upstreams are configured but no route leads to them".into(),
            ));
        }
        Ok(())
    }

    pub fn h1_limits(&self) -> Limits {
        let l = &self.limits;
        Limits {
            max_head_bytes: l.max_head_bytes,
            max_headers: l.max_headers,
            max_request_line_bytes: l.max_request_line_bytes,
            max_chunk_ext_bytes: l.max_chunk_ext_bytes,
            max_trailer_bytes: l.max_trailer_bytes,
            max_body_bytes: l.max_body_bytes,
        }
    }

    /// Settings that a running node cannot change without a restart, as (key, old, new).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<(&'static str, String, String)> {
        let mut v = Vec::new();
        let mut cmp = |key, a: String, b: String| {
            if a != b {
                v.push((key, a, b));
            }
        };
        cmp(
            "server.listen",
            self.server.listen.to_string(),
            new.server.listen.to_string(),
        );
        cmp(
            "server.workers",
            self.server.workers.to_string(),
            new.server.workers.to_string(),
        );
        cmp(
            "server.pin_workers",
            self.server.pin_workers.to_string(),
            new.server.pin_workers.to_string(),
        );
        cmp(
            "server.driver",
            format!("{:?}", self.server.driver),
            format!("{:?}", new.server.driver),
        );
        cmp(
            "server.backlog",
            self.server.backlog.to_string(),
            new.server.backlog.to_string(),
        );
        cmp(
            "admin.listen",
            self.admin.listen.to_string(),
            new.admin.listen.to_string(),
        );
        // The certificate files' contents reload by themselves; where they are does not.
        cmp("tls", format!("{:?}", self.tls), format!("{:?}", new.tls));
        cmp("log.level", self.log.level.clone(), new.log.level.clone());
        cmp(
            "body_budget_bytes",
            self.body_budget_bytes.to_string(),
            new.body_budget_bytes.to_string(),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_checked_and_named() {
        let dir = tempfile::tempdir().expect("dir");
        let c = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).expect("cert");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, c.cert.pem()).expect("write");
        std::fs::write(&key, c.key_pair.serialize_pem()).expect("write");
        let toml = |cert: &Path, key: &Path| {
            format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\nplain_listen = \"127.0.0.1:8081\"\n",
                cert.display().to_string(),
                key.display().to_string()
            )
        };
        let ok = Config::parse(&toml(&cert, &key), "t").expect("valid");
        assert!(ok.tls.is_some());
        let e = Config::parse(&toml(&dir.path().join("none.pem"), &key), "t")
            .expect_err("missing")
            .to_string();
        assert!(e.contains("tls.cert_file") && e.contains("none.pem"), "{e}");
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&key, other.serialize_pem()).expect("write");
        let e = Config::parse(&toml(&cert, &key), "t")
            .expect_err("mismatched")
            .to_string();
        assert!(e.contains("tls.key_file") && e.contains("k.pem"), "{e}");
        let e = Config::parse("[tls]\ncert_file = \"a\"\n", "t")
            .expect_err("no key")
            .to_string();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("", "t").expect("valid"), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            [server]
            listen = "0.0.0.0:8443"
            workers = 2
            driver = "epoll"
            [limits]
            max_body_bytes = 1048576
            [timeouts]
            head_read = "5s"
            keepalive_idle = "2m"
            [log]
            access = false
            "#,
            "t",
        )
        .expect("valid");
        assert_eq!(c.server.workers, 2);
        assert_eq!(c.server.driver, DriverChoice::Epoll);
        assert_eq!(c.timeouts.head_read, Duration::from_secs(5));
        assert_eq!(c.timeouts.keepalive_idle, Duration::from_secs(120));
        assert_eq!(c.h1_limits().max_body_bytes, 1 << 20);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[limits]\nmax_head_byte = 10\n", "gw.toml").expect_err("typo");
        let msg = e.to_string();
        assert!(
            msg.contains("gw.toml") && msg.contains("max_head_byte"),
            "{msg}"
        );
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = Config::parse("[limits]\nmax_headers = 0\n", "gw.toml").expect_err("zero");
        assert_eq!(
            e.to_string(),
            "gw.toml: limits.max_headers: must be between 1 and 256 (got 0)"
        );
        let e = Config::parse("[timeouts]\nhead_read = \"soon\"\n", "gw.toml").expect_err("dur");
        assert!(e.to_string().contains("head_read"), "{e}");
        let e = Config::parse("[server]\ndriver = \"kqueue\"\n", "gw.toml").expect_err("drv");
        assert!(e.to_string().contains("kqueue"), "{e}");
    }

    #[test]
    fn upstreams_and_routes_are_checked() {
        let base = r#"
            [[upstreams]]
            name = "a"
            kind = "openai"
            base_url = "http://127.0.0.1:9000"
            non_retention = { mode = "body_field", name = "store", value = false }
        "#;
        let ok = format!("{base}\n[[routes]]\nprefix = \"\"\ntargets = [{{ upstream = \"a\", model = \"m\" }}]\n");
        let c = Config::parse(&ok, "t").expect("valid");
        assert_eq!(c.upstreams[0].kind, ProviderKind::Openai);
        assert_eq!(c.routes[0].targets[0].model.as_deref(), Some("m"));
        let e = Config::parse(base, "t").expect_err("no route");
        assert!(e.to_string().contains("routes"), "{e}");
        let bad =
            format!("{base}\n[[routes]]\nmodel = \"x\"\ntargets = [{{ upstream = \"b\" }}]\n");
        let e = Config::parse(&bad, "t").expect_err("unknown upstream");
        assert!(e.to_string().contains("unknown upstream \"b\""), "{e}");
        let bad = ok.replace("http://127.0.0.1:9000", "ftp://x");
        let e = Config::parse(&bad, "t").expect_err("scheme");
        assert!(e.to_string().contains("upstreams[0] (a)"), "{e}");
        let bad = ok.replace(
            "non_retention",
            "credential_env = \"AIGW_TEST_SURELY_UNSET\"\nnon_retention",
        );
        let e = Config::parse(&bad, "t").expect_err("env");
        assert!(
            e.to_string().contains("AIGW_TEST_SURELY_UNSET is not set"),
            "{e}"
        );
        // With a control plane, routing comes from it: a static table is refused.
        let ca = std::env::temp_dir().join(format!("aigw-config-ca-{}", std::process::id()));
        std::fs::write(&ca, "").expect("write");
        let with_cp = format!(
            "{ok}\n[control_plane]\naddress = \"127.0.0.1:1\"\nca_file = \"{}\"\nidentity_dir = \"/tmp\"\n",
            ca.display()
        );
        let e = Config::parse(&with_cp, "t").expect_err("static routes with a control plane");
        assert!(e.to_string().contains("come from the control plane"), "{e}");
        let _ = std::fs::remove_file(&ca);
    }

    /// A sealed snapshot in a directory that cannot be made (its parent missing too) is
    /// refused at --check, naming the setting; one whose directory can be made passes.
    #[test]
    fn the_snapshot_directory_is_checked() {
        let dir = std::env::temp_dir().join(format!("aigw-config-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "").expect("write");
        let key = dir.join("seal.key");
        crate::seal::files::write_private(&key, "ab".repeat(32).as_bytes()).expect("key");
        let token = dir.join("token");
        crate::seal::files::write_private(
            &token,
            b"aigw_enroll_0123456789abcdefghijklmnopqrstuvwxyzABCD",
        )
        .expect("token");
        let config = |snapshot: &std::path::Path| {
            format!(
                "[control_plane]\naddress = \"127.0.0.1:1\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nenrollment_token_file = \"{}\"\nsnapshot_file = \"{}\"\nseal_key_file = \"{}\"\n",
                ca.display(),
                dir.join("identity").display(),
                token.display(),
                snapshot.display(),
                key.display()
            )
        };
        let e = Config::parse(&config(&dir.join("a/b/config.sealed")), "t").expect_err("no parent");
        assert!(
            e.to_string().contains("control_plane.snapshot_file")
                && e.to_string().contains("neither"),
            "{e}"
        );
        Config::parse(&config(&dir.join("a/config.sealed")), "t")
            .expect("its directory can be made");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node needs an identity or an enrolment token to get one; the retired node-token
    /// settings are refused with what replaced them.
    #[test]
    fn a_node_without_identity_needs_an_enrolment_token() {
        let dir = std::env::temp_dir().join(format!("aigw-config-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "").expect("write");
        let config = |extra: &str| {
            format!(
                "[control_plane]\naddress = \"127.0.0.1:1\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nenrollment_token_env = \"AIGW_TEST_ENROLL_{}\"\n{extra}",
                ca.display(),
                dir.join("identity").display(),
                std::process::id()
            )
        };
        let var = format!("AIGW_TEST_ENROLL_{}", std::process::id());
        std::env::remove_var(&var);
        let e = Config::parse(&config(""), "t").expect_err("no identity, no token");
        assert!(
            e.to_string().contains("control_plane.enrollment_token_env")
                && e.to_string().contains("no identity"),
            "{e}"
        );
        std::env::set_var(&var, "short");
        let e = Config::parse(&config(""), "t").expect_err("a short token");
        assert!(e.to_string().contains("at least 32"), "{e}");
        std::env::set_var(&var, "aigw_enroll_0123456789abcdefghijklmnopqrstuvwxyzABCD");
        Config::parse(&config(""), "t").expect("a token to enrol with");
        let e = Config::parse(&config("token_env = \"X\"\n"), "t").expect_err("retired");
        assert!(
            e.to_string().contains("control_plane.token_env")
                && e.to_string().contains("replaced by enrolment"),
            "{e}"
        );
        let e = Config::parse(&config("node_id = \"n\"\n"), "t").expect_err("retired");
        assert!(e.to_string().contains("control_plane.node_id"), "{e}");
        std::env::remove_var(&var);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn restart_only_changes_are_listed() {
        let a = Config::default();
        let mut b = a.clone();
        b.server.workers = 3;
        b.limits.max_headers = 50;
        let changes = a.restart_only_changes(&b);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, "server.workers");
    }
}

#[cfg(test)]
mod keyring_tests {
    use super::*;

    fn node(dir: &Path, key_file: &Path) -> ControlPlaneConfig {
        ControlPlaneConfig {
            address: "cp:9443".into(),
            server_name: None,
            ca_file: dir.join("ca.pem"),
            identity_dir: dir.join("identity"),
            enrollment_token_env: default_enrollment_token_env(),
            enrollment_token_file: None,
            retired_token_env: false,
            retired_node_id: false,
            environments: default_environments(),
            max_stale: Duration::ZERO,
            snapshot_file: Some(dir.join("config.sealed")),
            seal_key_env: default_seal_key_env(),
            seal_key_file: Some(key_file.to_path_buf()),
            body_log_queue_bytes: default_body_log_queue_bytes(),
        }
    }

    #[test]
    fn a_nodes_seal_key_is_replaced_by_rewriting_its_keyring_only() {
        let dir = tempfile::tempdir().expect("dir");
        let key_file = dir.path().join("seal.key");
        let old = crate::seal::Kek::generate().expect("key");
        crate::seal::files::write_private(&key_file, old.to_hex().as_bytes()).expect("write");
        // A snapshot sealed before keyrings existed: with the seal key itself.
        let snapshot = dir.path().join("config.sealed");
        let sealed = crate::seal::seal(&old, "snapshot", b"table").expect("seal");
        std::fs::write(&snapshot, &sealed).expect("write");
        let cp = node(dir.path(), &key_file);
        let data = cp.data_key().expect("adopted");
        assert_eq!(
            crate::seal::open(&data, "snapshot", &sealed).expect("opens"),
            b"table"
        );

        let new = crate::seal::Kek::generate().expect("key");
        let ring = cp.rotate_seal_key(&new).expect("rotated");
        assert_eq!(ring, dir.path().join("config.sealed.keyring"));
        assert_eq!(
            std::fs::read(&snapshot).expect("read"),
            sealed,
            "the snapshot is untouched"
        );
        // Until the node is given the new key, it is refused with where the key came from.
        let e = cp.data_key().expect_err("the old key");
        assert!(
            e.contains("does not open") && e.contains("seal_key_file"),
            "{e}"
        );
        crate::seal::files::write_private(&key_file, new.to_hex().as_bytes()).expect("write");
        let data = cp.data_key().expect("the new key");
        assert_eq!(
            crate::seal::open(&data, "snapshot", &sealed).expect("opens"),
            b"table"
        );
    }
}
