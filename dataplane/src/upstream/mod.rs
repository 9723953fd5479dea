//! Upstreams: where requests go. Parsed once from config into [`Upstream`]s that every
//! worker shares read-only; connections to them are per worker ([`pool`]).

pub mod conn;
pub mod dns;
pub mod pool;
pub mod tls;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{NonRetention, ProviderKind, UpstreamConfig};

pub use aigw_wire::rules::BaseUrl;

/// A secret that never reaches a log line or a Debug dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An upstream ready for use.
#[derive(Debug)]
pub struct Upstream {
    /// Unique for the life of the process: per-worker pools key on it, so connections made
    /// to one upstream are never handed out for another built later.
    pub uid: u64,
    pub name: String,
    pub kind: ProviderKind,
    pub url: BaseUrl,
    pub host_header: String,
    pub credential: Option<Secret>,
    pub tls: Option<tls::TlsClient>,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub read_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub non_retention: NonRetention,
    pub stream_options: bool,
    pub region: String,
    pub baa: bool,
}

impl Upstream {
    /// Builds from a validated config entry (its credential read from its variable).
    pub fn build(c: &UpstreamConfig) -> Result<Arc<Self>, String> {
        let credential = match &c.credential_env {
            Some(var) => {
                Some(Secret(std::env::var(var).map_err(|_| {
                    format!("environment variable {var} is not set")
                })?))
            }
            None => None,
        };
        Self::build_with(c, credential)
    }

    /// Builds from a config entry with the credential given (pushed by the control plane).
    pub fn build_with(c: &UpstreamConfig, credential: Option<Secret>) -> Result<Arc<Self>, String> {
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let url = BaseUrl::parse(&c.base_url).map_err(|e| e.to_string())?;
        let tls = if url.tls {
            Some(tls::TlsClient::new(
                &url.host,
                c.ca_file.as_deref(),
                c.danger_accept_invalid_certs,
            )?)
        } else {
            None
        };
        Ok(Arc::new(Self {
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            name: c.name.clone(),
            kind: c.kind,
            host_header: url.host_header(),
            url,
            credential,
            tls,
            max_connections: c.max_connections,
            connect_timeout: c.connect_timeout,
            first_byte_timeout: c.first_byte_timeout,
            read_idle_timeout: c.read_idle_timeout,
            pool_idle_timeout: c.pool_idle_timeout,
            non_retention: c.non_retention.clone(),
            stream_options: c.stream_options,
            region: c.region.clone(),
            baa: c.baa,
        }))
    }
}
