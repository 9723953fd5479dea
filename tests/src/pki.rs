//! A throwaway certificate authority for tests of TLS listeners: it issues server
//! certificates (ECDSA P-256) written as PEM files, the way an operator would give them.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub struct TestCa {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { key, cert }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA's certificate to `dir/ca.pem`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).expect("write CA");
        path
    }

    /// A server certificate for `names`, as (chain PEM: leaf then CA, key PEM, leaf DER).
    pub fn issue(&self, names: &[&str]) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("server params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign server cert");
        (
            format!("{}{}", cert.pem(), self.cert.pem()),
            key.serialize_pem(),
            cert.der().to_vec(),
        )
    }

    /// Issues a certificate for `names` into `dir/cert.pem` and `dir/key.pem` (replacing
    /// what is there); returns their paths and the leaf's DER.
    pub fn issue_files(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
        let (chain, key, der) = self.issue(names);
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        // Written aside then renamed, as a certificate manager does: a reload never sees
        // half a file.
        std::fs::write(dir.join("cert.pem.new"), chain).expect("write cert");
        std::fs::write(dir.join("key.pem.new"), key).expect("write key");
        std::fs::rename(dir.join("key.pem.new"), &k).expect("rename key");
        std::fs::rename(dir.join("cert.pem.new"), &c).expect("rename cert");
        (c, k, der)
    }
}

/// A TLS client config trusting `ca_pem`, offering only `versions`, and ALPN `h2` then
/// `http/1.1` (a server that speaks only HTTP/1.1 must pick it).
pub fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA cert");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    std::sync::Arc::new(c)
}
