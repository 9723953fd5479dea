//! How the admin API is served: TLS 1.3 (HTTP/1.1 inside, every answer carrying HSTS) with
//! a certificate from the control plane's CA or the operator's; plain HTTP only when asked
//! for, and only on a loopback address, so the admin token never travels in clear off the
//! machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::pki::Pki;

/// `Strict-Transport-Security` on every answer over TLS (two years, subdomains included).
/// Never over plain HTTP, where a browser must ignore it (RFC 6797 §7.2).
pub const HSTS: &str = "max-age=63072000; includeSubDomains";

/// A TLS handshake not done by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// How the admin API is served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ApiTls {
    /// TLS 1.3 with the certificate the control plane's CA issued at first start
    /// (`<data-dir>/pki/server.pem`, for `localhost`, `127.0.0.1` and the names configured):
    /// clients verify it against `<data-dir>/pki/ca.pem`.
    #[default]
    Generated,
    /// TLS 1.3 with the operator's certificate chain and its private key (PEM files,
    /// `--api-cert-file` and `--api-key-file`).
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP (`--insecure-plain-http`), on a loopback address only.
    InsecurePlainHttp,
}

/// A TLS 1.3-only server config offering HTTP/1.1, asking no client certificate.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Refuses what must not start: plain HTTP on an address other machines reach.
pub(crate) fn check(tls: &ApiTls, listen: SocketAddr) -> anyhow::Result<()> {
    if *tls == ApiTls::InsecurePlainHttp && !listen.ip().is_loopback() {
        bail!(
            "--insecure-plain-http: the admin API serves plain HTTP on a loopback address only (127.0.0.1, ::1), and {listen} is not one; leave the option out to serve TLS 1.3"
        );
    }
    Ok(())
}

/// The operator's certificate and key, read and checked against each other; errors name
/// the option that gave the file.
pub(crate) fn operator_config(tls: &ApiTls) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let ApiTls::Files { cert, key } = tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("--api-cert-file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "--api-cert-file {}: no certificate in it (PEM, -----BEGIN CERTIFICATE-----)",
            cert.display()
        );
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("--api-key-file {}: {e}", key.display()))?;
    match server_config(certs, private) {
        Ok(c) => Ok(Some(c)),
        Err(rustls::Error::InconsistentKeys(_)) => bail!(
            "--api-key-file {} is not the private key of the certificate in --api-cert-file {}",
            key.display(),
            cert.display()
        ),
        Err(e) => bail!(
            "--api-cert-file {} with --api-key-file {}: {e}",
            cert.display(),
            key.display()
        ),
    }
}

/// The config for the certificate the control plane's CA issued (`Pki::ensure` made it).
pub(crate) fn generated_config(pki: &Pki) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(&pki.server_cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("{}: {e}", pki.server_cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&pki.server_key)
        .map_err(|e| anyhow!("{}: {e}", pki.server_key.display()))?;
    server_config(certs, key).map_err(|e| {
        anyhow!(
            "{} with {}: {e}",
            pki.server_cert.display(),
            pki.server_key.display()
        )
    })
}

/// A connection, TLS or plain.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The admin API's listener: connections whose TLS handshake is done (each in a task of its
/// own, so a slow client holds up no other), or plain ones.
pub(crate) struct AdminListener {
    accepted: mpsc::Receiver<(Box<dyn Io>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl AdminListener {
    /// Serves TLS with `tls`, plain HTTP without.
    pub(crate) fn new(
        tcp: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept(tcp, tls.map(tokio_rustls::TlsAcceptor::from), tx));
        Ok(Self {
            accepted,
            local,
            acceptor,
        })
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept(
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<(Box<dyn Io>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "admin API: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &tls else {
            if tx.send((Box::new(stream), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(s)) => {
                    let _ = tx.send((Box::new(s), peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "admin API: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = Box<dyn Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The acceptor only ends with the listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client's address, as the audit log records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, AdminListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        Self(*stream.remote_addr())
    }
}
