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

/// `scheme://host[:port][/prefix]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Prepended to every request path; empty or `/...` without a trailing slash.
    pub path_prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "base_url must start with http:// or https:// (got {url:?})"
            ));
        };
        if rest.contains(['?', '#', '@', ' ']) {
            return Err(format!(
                "base_url must not contain a query, fragment or credentials (got {url:?})"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("bad port in base_url {url:?}"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(format!("base_url has no host or a bad path (got {url:?})"));
        }
        Ok(Self {
            tls,
            host: host.to_string(),
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
        let url = BaseUrl::parse(&c.base_url)?;
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
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://").is_err());
        assert!(BaseUrl::parse("http://u:p@x").is_err());
        assert!(BaseUrl::parse("http://x:notaport").is_err());
    }
}
