//! A client of the admin API, for the CLI and `up`: TLS 1.3 to an `https://` URL, the server
//! verified against the control plane's CA (never the system's roots: the admin API's
//! certificate comes from that CA, or from one the operator names); `http://` only to a
//! loopback address, so the admin token never travels in clear off this machine.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// The variable naming the CA file, as `--ca-file` does.
pub const CA_FILE_VAR: &str = "AIGW_CONTROLPLANE_CA";

/// The CA files of control planes on this machine, where `serve` and `up` keep them by
/// default (`<data-dir>/pki/ca.pem`): what a client trusts when no CA file is named.
pub fn local_ca_files() -> Vec<PathBuf> {
    vec![
        crate::default_data_dir("controlplane").join("pki/ca.pem"),
        crate::default_data_dir("local").join("controlplane/pki/ca.pem"),
    ]
}

/// Whether `host` (a URL's host, IPv6 in brackets or not) is this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A TLS 1.3 client config (ALPN `http/1.1`) trusting only the certificates of `ca_pem`.
fn tls_config(ca_pem: &[u8], source: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| anyhow!("{source}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("{source}: not a CA certificate rustls accepts: {e}"))?;
    }
    if roots.is_empty() {
        bail!("{source}: no certificate in it (PEM, -----BEGIN CERTIFICATE-----)");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS connector handed to `ureq`: the handshake completes before the request is
/// written, so a server the CA does not verify never sees the admin token.
pub(crate) struct Tls(pub(crate) Arc<rustls::ClientConfig>);

impl ureq::TlsConnector for Tls {
    fn connect(
        &self,
        dns_name: &str,
        mut io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let host = dns_name.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut conn = rustls::ClientConnection::new(Arc::clone(&self.0), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut io)?;
        }
        Ok(Box::new(TlsStream(rustls::StreamOwned::new(conn, io))))
    }
}

struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.sock.socket()
    }
}

/// The admin API at one URL, with the admin token.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
    /// The CA files trusted (for messages).
    trusted: Vec<PathBuf>,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the admin API at `url` presenting `token`. For `https://`, the server is
    /// verified against `ca_file` when given (`--ca-file`), else against the CA files of
    /// [`local_ca_files`] that exist; `http://` is refused unless the host is loopback.
    pub fn new(url: &str, token: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow!("--url {url}: {e}"))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow!("--url {url}: no host"))?
            .to_string();
        let builder = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(10));
        let (agent, trusted) = match parsed.scheme() {
            "https" => {
                let (pem, source, trusted) = match ca_file {
                    Some(p) => (
                        std::fs::read(p).map_err(|e| anyhow!("--ca-file {}: {e}", p.display()))?,
                        format!("--ca-file {}", p.display()),
                        vec![p.to_path_buf()],
                    ),
                    None => {
                        let candidates = local_ca_files();
                        let mut pem = Vec::new();
                        let mut trusted = Vec::new();
                        for c in &candidates {
                            if let Ok(bytes) = std::fs::read(c) {
                                pem.extend_from_slice(&bytes);
                                pem.push(b'\n');
                                trusted.push(c.clone());
                            }
                        }
                        if trusted.is_empty() {
                            bail!(
                                "no CA to verify the control plane at {url} with: pass --ca-file (or set {CA_FILE_VAR}) naming the CA certificate that issued its certificate (`<data-dir>/pki/ca.pem` where it runs); there is none at {}",
                                candidates
                                    .iter()
                                    .map(|c| c.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(" or ")
                            );
                        }
                        let source = trusted
                            .iter()
                            .map(|c| c.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ");
                        (pem, source, trusted)
                    }
                };
                let config = tls_config(&pem, &source)?;
                (
                    builder.tls_connector(Arc::new(Tls(config))).build(),
                    trusted,
                )
            }
            "http" if is_loopback_host(&host) => (builder.build(), Vec::new()),
            "http" => bail!(
                "--url {url}: refusing to send the admin token in clear to {host}, off this machine; use https:// (the admin API serves TLS 1.3)"
            ),
            other => bail!("--url {url}: {other}:// is not served; use https://"),
        };
        Ok(Self {
            agent,
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            trusted,
            timeout: None,
        })
    }

    /// Each call given up after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// `method path` with `body` as JSON: the status and the body, whatever the status.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, String)> {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("authorization", &format!("Bearer {}", self.token));
        if let Some(t) = self.timeout {
            req = req.timeout(t);
        }
        let resp = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match resp {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(self.transport_error(&e)),
        };
        let status = resp.status();
        let text = resp
            .into_string()
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        Ok((status, text))
    }

    /// What went wrong reaching the server, said so that it points at the fix.
    fn transport_error(&self, e: &ureq::Error) -> anyhow::Error {
        let tls = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let trusted = self
            .trusted
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match tls {
            Some(why @ rustls::Error::InvalidCertificate(_)) => anyhow!(
                "the control plane at {} presented a certificate the CA in {trusted} does not verify ({why}); pass --ca-file (or set {CA_FILE_VAR}) naming the CA that issued it",
                self.base
            ),
            Some(other) => anyhow!(
                "TLS with the control plane at {} failed ({other}); it serves TLS 1.3 unless started with --insecure-plain-http",
                self.base
            ),
            None if self.base.starts_with("http://") => anyhow!(
                "cannot reach the control plane at {} ({e}); is `controlplane serve` running there, with --insecure-plain-http (else it serves https://)? pass --url or set AIGW_CONTROLPLANE_URL",
                self.base
            ),
            None => anyhow!(
                "cannot reach the control plane at {} ({e}); is `controlplane serve` running there? pass --url or set AIGW_CONTROLPLANE_URL",
                self.base
            ),
        }
    }
}
