//! TLS on the client-facing listener: TLS 1.3 only, ALPN `http/1.1`, the certificate and
//! key read from PEM files and read again when the files change (new handshakes get the new
//! certificate; connections already open keep theirs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;

/// The `Strict-Transport-Security` value every TLS response carries (two years, every
/// subdomain). Never sent over plain HTTP (RFC 6797 §7.2).
pub const HSTS: &[u8] = b"max-age=63072000; includeSubDomains";

/// How often the certificate files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Which file a certificate pair failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Cert,
    Key,
}

/// Reads a certificate chain (leaf first) and its private key, and checks that they belong
/// together. The error says which file is at fault and names it.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, (Bad, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| (Bad::Cert, format!("{}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err((
            Bad::Cert,
            format!("{}: no certificate in it", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| (Bad::Key, format!("{}: {e}", key_file.display())))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        (
            Bad::Key,
            format!(
                "{} is not the key of {}: {e}",
                key_file.display(),
                cert_file.display()
            ),
        )
    })
}

/// The files' identity: a change of either is a change of certificate.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificate handshakes present, swapped when its files change.
#[derive(Debug)]
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    seen: std::sync::Mutex<[Option<(SystemTime, u64)>; 2]>,
}

impl Certificate {
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let seen = [stamp(cert_file), stamp(key_file)];
        let ck = load(cert_file, key_file).map_err(|(_, e)| e)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// Reads the files again if they changed. A pair that does not load (half written, or
    /// a key that does not match) is logged and the certificate in use kept; it is tried
    /// again at the next change. Returns whether a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = [stamp(&self.cert_file), stamp(&self.key_file)];
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        match load(&self.cert_file, &self.key_file) {
            Ok(ck) => {
                self.current.store(Arc::new(ck));
                tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err((_, e)) => {
                tracing::error!(error = %e, "the changed TLS certificate cannot be used; keeping the one in use");
                false
            }
        }
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS: one config for every worker, its certificate reloadable.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub certificate: Arc<Certificate>,
}

impl ServerTls {
    pub fn new(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let certificate = Arc::new(Certificate::open(cert_file, key_file)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            certificate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, c.cert.pem()).expect("write cert");
        std::fs::write(&key, c.key_pair.serialize_pem()).expect("write key");
        (cert, key)
    }

    #[test]
    fn a_changed_pair_is_used_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = write_pair(dir.path(), "one.test");
        let c = Certificate::open(&cert, &key).expect("loads");
        let first = c.current.load_full();
        assert!(!c.reload_if_changed(), "nothing changed");
        // A key that does not match the certificate: refused, the old pair kept.
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&key, other.serialize_pem()).expect("write");
        assert!(!c.reload_if_changed());
        assert!(Arc::ptr_eq(&first, &c.current.load_full()));
        let (bad, e) = load(&cert, &key).expect_err("mismatched");
        assert_eq!(bad, Bad::Key);
        assert!(e.contains("key.pem"), "{e}");
        // A good new pair is taken.
        write_pair(dir.path(), "two.test");
        assert!(c.reload_if_changed());
        assert!(!Arc::ptr_eq(&first, &c.current.load_full()));
        // No certificate at all: named.
        std::fs::write(&cert, "").expect("write");
        let (bad, e) = load(&cert, &key).expect_err("empty");
        assert_eq!(bad, Bad::Cert);
        assert!(e.contains("no certificate"), "{e}");
    }
}
