//! Upstreams: where requests go. Built once from configuration into [`Upstream`]s that every
//! worker shares read-only; connections to them are per worker ([`pool`]).

pub mod conn;
pub mod dns;
pub mod iovec;
pub mod pool;
pub mod tls;

use std::fmt;
use std::time::Duration;

use aigw_wire::{NonRetention, ProviderKind};

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
    pub pass_organization_headers: bool,
    pub region: String,
    pub baa: bool,
}

impl Upstream {
    /// A new id, never given to another upstream in this process.
    pub fn next_uid() -> u64 {
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}
