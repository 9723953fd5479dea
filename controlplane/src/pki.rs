//! The control plane's certificates, generated at first start so the quick start needs no
//! setup: a CA, a server certificate it signs for `localhost` / `127.0.0.1` (and any names
//! given) that the link and the admin API serve, and, for every node that enrols, a client
//! certificate naming it. Nodes and admin clients trust `<data>/pki/ca.pem`; the control
//! plane trusts the nodes' certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Paths of the link's PKI under the data directory.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    /// The CA's key, kept (mode 0600) to sign the nodes' client certificates.
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// How long a node's client certificate is valid: renewed by enrolling again.
const NODE_CERT_DAYS: i64 = 825;

/// The CA's parameters, the same every time: a CA rebuilt from them and its kept key signs
/// certificates that chain to the `ca.pem` written at first start.
fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "aigateway control plane CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// A node's public key as it arrives in its enrolment: an uncompressed P-256 point.
struct NodePublicKey<'a>(&'a [u8]);

impl rcgen::PublicKeyData for NodePublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl Pki {
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("pki");
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    /// Generates the CA and the server certificate unless they exist; issues the server
    /// certificate again, from the same CA, when it does not verify for every name of
    /// `localhost`, `127.0.0.1` and `names` (a name added since, say).
    pub fn ensure(&self, names: &[String]) -> anyhow::Result<()> {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        for name in names {
            rustls_pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| anyhow!("--tls-name {name}: not a DNS name or an IP address"))?;
            if !sans.contains(name) {
                sans.push(name.clone());
            }
        }
        let all = [
            &self.server_cert,
            &self.server_key,
            &self.ca_cert,
            &self.ca_key,
        ];
        if all.iter().all(|p| p.exists()) {
            return match self.uncovered(&sans)? {
                None => Ok(()),
                Some(why) => {
                    let (ca_cert, ca_key) = self.ca()?;
                    self.issue_server_certificate(&sans, &ca_cert, &ca_key)?;
                    tracing::warn!(cert = %self.server_cert.display(), names = ?sans, reason = %why, "issued the control plane's certificate again");
                    Ok(())
                }
            };
        }
        if self.ca_cert.exists() {
            tracing::warn!(ca = %self.ca_cert.display(), "the link's CA key was not kept; generating a new CA (nodes need the new ca.pem)");
        }
        use rcgen::KeyPair;
        let dir = self
            .ca_cert
            .parent()
            .ok_or_else(|| anyhow!("pki path has no parent"))?;
        aigw_seal::files::private_dir(dir)?;
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params()?.self_signed(&ca_key)?;
        aigw_seal::files::write_private(&self.ca_key, ca_key.serialize_pem().as_bytes())?;
        self.issue_server_certificate(&sans, &ca_cert, &ca_key)?;
        aigw_seal::files::write_public(&self.ca_cert, ca_cert.pem().as_bytes())?;
        tracing::warn!(ca = %self.ca_cert.display(), "generated the control plane's CA and certificate");
        Ok(())
    }

    /// Why the server certificate does not serve `names` under the CA (a name it does not
    /// carry, another issuer), or `None` when it does.
    fn uncovered(&self, names: &[String]) -> anyhow::Result<Option<String>> {
        let cert = CertificateDer::from_pem_file(&self.server_cert)
            .with_context(|| self.server_cert.display().to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca_cert)
            .with_context(|| self.ca_cert.display().to_string())?
        {
            roots.add(c?)?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()?;
        use rustls::client::danger::ServerCertVerifier as _;
        let now = rustls_pki_types::UnixTime::now();
        for name in names {
            let server_name = rustls_pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| anyhow!("{name}: not a DNS name or an IP address"))?;
            if let Err(e) = verifier.verify_server_cert(&cert, &[], &server_name, &[], now) {
                return Ok(Some(format!("{name}: {e}")));
            }
        }
        Ok(None)
    }

    /// The CA, rebuilt from its parameters and its kept key.
    fn ca(&self) -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
        let pem = aigw_seal::files::read_private(&self.ca_key).map_err(|e| anyhow!("{e}"))?;
        let key = rcgen::KeyPair::from_pem(&pem)?;
        let cert = ca_params()?.self_signed(&key)?;
        Ok((cert, key))
    }

    /// A new key and a certificate for `sans` signed by the CA, written in place of the
    /// server's.
    fn issue_server_certificate(
        &self,
        sans: &[String],
        ca_cert: &rcgen::Certificate,
        ca_key: &rcgen::KeyPair,
    ) -> anyhow::Result<()> {
        use rcgen::{CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "aigateway control plane");
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, ca_cert, ca_key)?;
        aigw_seal::files::write_private(&self.server_key, key.serialize_pem().as_bytes())?;
        aigw_seal::files::write_public(&self.server_cert, cert.pem().as_bytes())?;
        Ok(())
    }

    /// A client certificate for node `node_id` (its common name) over `public_key` (an
    /// uncompressed P-256 point), signed by the link's CA; DER.
    pub fn issue_node_certificate(
        &self,
        node_id: &str,
        public_key: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
        if public_key.len() != 65 || public_key[0] != 4 {
            anyhow::bail!("the node's public key is not an uncompressed P-256 point");
        }
        let (ca_cert, ca_key) = self.ca()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        let cert = params.signed_by(&NodePublicKey(public_key), &ca_cert, &ca_key)?;
        Ok(cert.der().to_vec())
    }

    /// A TLS 1.3-only server config for the link. A client certificate signed by the link's
    /// CA is verified when presented (an enrolled node); connections without one may only
    /// enrol.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.server_cert)
            .with_context(|| self.server_cert.display().to_string())?
            .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.server_key)
            .with_context(|| self.server_key.display().to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca_cert)
            .with_context(|| self.ca_cert.display().to_string())?
        {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
    }
}
