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
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub log: LogConfig,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    Auto,
    IoUring,
    Epoll,
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
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            head_read: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(60),
            body_read_idle: Duration::from_secs(30),
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
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                "log.level",
                format!("not a valid filter: {:?}", self.log.level),
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
        cmp("log.level", self.log.level.clone(), new.log.level.clone());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
