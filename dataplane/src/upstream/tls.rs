//! TLS to upstreams: rustls (ring provider), TLS 1.2+ with certificate verification against
//! the system roots or a configured CA bundle.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// A client config plus the name to verify, shared by every worker.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: monoio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trust anchors, loaded once per process.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let loaded = rustls_native_certs::load_native_certs();
        for cert in loaded.certs {
            let _ = store.add(cert);
        }
        if store.is_empty() {
            tracing::warn!("no system CA certificates found; https upstreams need ca_file");
        }
        Arc::new(store)
    }))
}

impl TlsClient {
    pub fn new(host: &str, ca_file: Option<&Path>, accept_invalid: bool) -> Result<Self, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let mut config = if accept_invalid {
            tracing::warn!(
                host,
                "danger_accept_invalid_certs: upstream certificates are NOT verified"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider())))
                .with_no_client_auth()
        } else {
            let roots = match ca_file {
                Some(path) => {
                    let mut store = RootCertStore::empty();
                    let certs = CertificateDer::pem_file_iter(path)
                        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                    for cert in certs {
                        let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                        store
                            .add(cert)
                            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                    }
                    if store.is_empty() {
                        return Err(format!("ca_file {}: no certificates", path.display()));
                    }
                    Arc::new(store)
                }
                None => system_roots(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("invalid TLS server name {host:?}: {e}"))?;
        Ok(Self {
            connector: monoio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// Accepts every certificate. Only reachable through `danger_accept_invalid_certs`.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
