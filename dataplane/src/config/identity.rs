//! The node's identity on the control-plane link: a P-256 key it generated itself and the
//! client certificate the control plane's CA issued for it at enrolment, kept in
//! `control_plane.identity_dir`:
//!
//! - `node.key`: the private key (PEM, mode 0600; it never leaves the node);
//! - `node.pem`: the certificate, naming the node;
//! - `node.id`: the node's id, as the control plane registered it;
//! - `enrolled-with`: the SHA-256 of the enrolment token last used, so a token is used once.
//!
//! A node enrols when it has no identity, or when it is given an enrolment token it has not
//! used yet (an operator re-enrolling it: a lost key, a certificate about to expire). Files
//! are written atomically, the key first: a crash during enrolment loses at most the
//! enrolment token, which the control plane spent (an operator issues another).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aigw_wire::{decode_frame, encode_frame, Frame, Message, DEFAULT_MAX_FRAME};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use sha2::Digest;

/// A node's enrolled identity.
#[derive(Debug)]
pub struct Identity {
    pub node_id: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// The identity files under a directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub dir: PathBuf,
}

impl IdentityFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    fn id(&self) -> PathBuf {
        self.dir.join("node.id")
    }

    fn token_mark(&self) -> PathBuf {
        self.dir.join("enrolled-with")
    }

    /// Whether the node holds a certificate.
    pub fn exists(&self) -> bool {
        self.cert().exists()
    }

    /// The identity, `None` when the node has not enrolled. The key must be a private file
    /// (this user's, mode 0600).
    pub fn load(&self) -> anyhow::Result<Option<Identity>> {
        if !self.exists() {
            return Ok(None);
        }
        let key_pem =
            crate::seal::files::read_private(&self.key()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.key().display()))?;
        let cert = CertificateDer::from_pem_file(self.cert())
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.cert().display()))?;
        let node_id = std::fs::read_to_string(self.id())
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Some(Identity { node_id, cert, key }))
    }

    /// Whether `token` is one this node has already enrolled with.
    pub fn used(&self, token: &str) -> bool {
        std::fs::read_to_string(self.token_mark())
            .is_ok_and(|mark| mark.trim() == hex_digest(token))
    }

    /// Keeps an identity just issued: key, certificate, id, then the token's mark.
    fn save(
        &self,
        key: &rcgen::KeyPair,
        cert_der: &[u8],
        node_id: &str,
        token: &str,
    ) -> anyhow::Result<()> {
        crate::seal::files::private_dir(&self.dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.dir.display()))?;
        crate::seal::files::write_private(&self.key(), key.serialize_pem().as_bytes())?;
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.to_vec()));
        crate::seal::files::write_public(&self.cert(), pem.as_bytes())?;
        crate::seal::files::write_public(&self.id(), format!("{node_id}\n").as_bytes())?;
        crate::seal::files::write_public(
            &self.token_mark(),
            format!("{}\n", hex_digest(token)).as_bytes(),
        )?;
        Ok(())
    }
}

fn hex_digest(token: &str) -> String {
    sha2::Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why an enrolment failed: refused by the control plane (the token is spent, expired or
/// revoked — retrying with it cannot help), or the link failed (worth retrying).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the control plane refused the enrolment: {0}")]
    Refused(String),
    #[error(transparent)]
    Link(#[from] anyhow::Error),
}

/// Enrols this node with `token`: generates its key, sends the public half with the token
/// over `stream` (a TLS connection to the control plane, no client certificate), and keeps
/// the certificate it is sent. Returns the new identity.
pub fn enroll<S: Read + Write>(
    stream: &mut S,
    files: &IdentityFiles,
    token: &str,
) -> Result<Identity, EnrollError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow::anyhow!("generating the node's key: {e}"))?;
    let mut out = Vec::new();
    encode_frame(
        &Message::Enroll {
            token: token.trim().to_string(),
            public_key: key.public_key_raw().to_vec(),
        },
        &mut out,
    );
    stream.write_all(&out).map_err(anyhow::Error::from)?;
    stream.flush().map_err(anyhow::Error::from)?;
    let mut buf = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        if std::time::Instant::now() > deadline {
            return Err(
                anyhow::anyhow!("the control plane did not answer the enrolment in 30 s").into(),
            );
        }
        if let Some((frame, used)) =
            decode_frame(&buf, DEFAULT_MAX_FRAME).map_err(anyhow::Error::from)?
        {
            buf.drain(..used);
            match frame {
                Frame::Message(m) => break m,
                Frame::Unknown(_) => continue,
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(
                    anyhow::anyhow!("the control plane closed the link during enrolment").into(),
                )
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(anyhow::Error::from(e).into()),
        }
    };
    match answer {
        Message::Enrolled { node_id, cert_der } => {
            files.save(&key, &cert_der, &node_id, token)?;
            let key = PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|e| anyhow::anyhow!("the node's key: {e}"))?;
            Ok(Identity {
                node_id,
                cert: CertificateDer::from(cert_der),
                key,
            })
        }
        Message::Refused { reason } => Err(EnrollError::Refused(reason)),
        other => Err(anyhow::anyhow!("unexpected answer to an enrolment: {other:?}").into()),
    }
}

/// The link's TLS 1.3 client config trusting `roots`, presenting `identity` when there is
/// one.
pub fn client_config(
    roots: &rustls::RootCertStore,
    identity: Option<&Identity>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone());
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
