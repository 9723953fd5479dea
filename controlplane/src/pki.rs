//! The link's certificates and the node token, generated at first start when none are
//! configured, so the quick start needs no setup: a CA, a server certificate it signs for
//! `localhost` / `127.0.0.1` (and any names given), and a random node token. Nodes trust
//! `<data>/pki/ca.pem` and present the token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Paths of the link's PKI under the data directory.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("pki");
        Self {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// Generates the CA and the server certificate unless they exist.
    pub fn ensure(&self, names: &[String]) -> anyhow::Result<()> {
        if self.server_cert.exists() && self.server_key.exists() && self.ca_cert.exists() {
            return Ok(());
        }
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = self
            .ca_cert
            .parent()
            .ok_or_else(|| anyhow!("pki path has no parent"))?;
        aigw_seal::files::private_dir(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "aigateway control plane CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(names.iter().cloned());
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "aigateway control plane");
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        aigw_seal::files::write_private(&self.server_key, key.serialize_pem().as_bytes())?;
        aigw_seal::files::write_public(&self.server_cert, cert.pem().as_bytes())?;
        aigw_seal::files::write_public(&self.ca_cert, ca_cert.pem().as_bytes())?;
        tracing::warn!(ca = %self.ca_cert.display(), "generated the control-plane link's CA and certificate");
        Ok(())
    }

    /// A TLS 1.3-only server config for the link.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.server_cert)
            .with_context(|| self.server_cert.display().to_string())?
            .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.server_key)
            .with_context(|| self.server_key.display().to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
    }
}

/// The node token: `AIGW_NODE_TOKEN`, else `<data>/node-token`, created at first start.
pub fn node_token(data_dir: &Path) -> anyhow::Result<String> {
    crate::token(
        "AIGW_NODE_TOKEN",
        &data_dir.join("node-token"),
        "aigw_node_",
        "node token",
    )
}
