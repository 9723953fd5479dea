//! The admin API over TLS 1.3 only, every answer carrying HSTS; its certificate from the
//! control plane's CA, or the operator's; plain HTTP only when asked for and only on
//! loopback; the CLI verifying the server against the CA and never sending the admin token
//! in clear off loopback. Real sockets, real TLS, the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use controlplane::api::transport::{ApiTls, HSTS};
use e2e::cp::{admin_exchange, call, cli, cli_of, cp_start};
use e2e::*;
use serde_json::json;

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A control plane on loopback, its admin API served as `api_tls`.
fn start(dir: &Path, api_tls: ApiTls) -> Result<controlplane::Running, String> {
    controlplane::start(controlplane::Options {
        data_dir: dir.to_path_buf(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        api_tls,
        push_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .map_err(|e| format!("{e:#}"))
}

/// `controlplane <args>` with `env`, none of the CLI's settings inherited from this process.
fn controlplane(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin_path("controlplane"))
        .args(args)
        .env_remove("AIGW_CONTROLPLANE_URL")
        .env_remove("AIGW_CONTROLPLANE_CA")
        .env_remove("AIGW_ADMIN_TOKEN")
        .env_remove("AIGW_DATA_DIR")
        .env_remove("XDG_STATE_HOME")
        .env_remove("AIGW_SEAL_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_admin_api_answers_over_tls13_only_with_hsts_on_every_answer() {
    let cp = cp_start(scratch_dir("admin-tls"), "127.0.0.1:0");
    let ca = std::fs::read(&cp.ca_file).unwrap();

    // TLS 1.3 and HTTP/1.1 by ALPN; the certificate verifies against the control plane's
    // CA under both names it is issued for.
    for name in ["localhost", "127.0.0.1"] {
        let config = https_client_config(&ca, &[&rustls::version::TLS13]);
        let mut s = tls_connect_with(config, name, cp.addr);
        s.write_all(&get("/healthz")).unwrap();
        let r = read_response(&mut s, &mut Vec::new()).expect("an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            s.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    }
    assert_eq!(HSTS, "max-age=63072000; includeSubDomains");

    // HSTS on errors too: a wrong token, an unknown path, a bad body.
    let r = call(&cp, "wrong", "GET", "/v1/tenants", None);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    let r = admin_exchange(&cp, &get("/no-such-path"));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    let r = call(
        &cp,
        &cp.admin_token,
        "POST",
        "/v1/tenants",
        Some(json!({"name": "x", "tier": "gold"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));

    // A client offering TLS 1.2 only is refused in the handshake.
    let config = https_client_config(&ca, &[&rustls::version::TLS12]);
    let mut s = tls_connect_with(config, "localhost", cp.addr);
    let mut byte = [0u8; 1];
    let refused = s
        .write_all(&get("/healthz"))
        .and_then(|()| s.read(&mut byte))
        .expect_err("a TLS 1.2 handshake fails");
    assert!(
        refused.to_string().contains("ProtocolVersion"),
        "refused with a protocol_version alert: {refused}"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = connect(cp.addr);
    plain.write_all(&get("/healthz")).unwrap();
    let answer = read_until(&mut plain, "");
    assert!(!answer.contains("HTTP/1.1"), "{answer:?}");
}

#[test]
fn the_cli_verifies_the_admin_api_against_the_ca() {
    let root = scratch_dir("admin-tls-cli");
    let cp = cp_start(root.join("controlplane"), "127.0.0.1:0");
    let other = cp_start(scratch_dir("admin-tls-cli-other"), "127.0.0.1:0");
    let url = cp.api_url();
    assert!(url.starts_with("https://"), "{url}");

    // With the control plane's CA it works.
    let created = cli_of(&cp, &["tenant-create", "Acme", "--id", "acme"]);
    assert_eq!(created["id"], "acme");

    // With another CA it stops before the request is sent, and says why.
    let out = controlplane(
        &[
            "tenant-create",
            "Beta",
            "--id",
            "beta",
            "--url",
            &url,
            "--ca-file",
            &other.ca_file.display().to_string(),
        ],
        &[("AIGW_ADMIN_TOKEN", &cp.admin_token)],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("does not verify")
            && err.contains(&other.ca_file.display().to_string())
            && err.contains("--ca-file"),
        "{err}"
    );
    let tenants = call(&cp, &cp.admin_token, "GET", "/v1/tenants", None).json();
    assert_eq!(
        tenants["data"].as_array().unwrap().len(),
        1,
        "nothing created: {tenants}"
    );

    // The CA from AIGW_CONTROLPLANE_CA.
    let out = controlplane(
        &["tenant-list", "--url", &url, "-o", "id"],
        &[
            ("AIGW_ADMIN_TOKEN", &cp.admin_token),
            ("AIGW_CONTROLPLANE_CA", &cp.ca_file.display().to_string()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "acme\n");

    // Without either: the CA of a control plane on this machine, in the data directory
    // `serve` uses by default.
    let data = root.display().to_string();
    let out = controlplane(
        &["tenant-list", "--url", &url, "-o", "id"],
        &[
            ("AIGW_ADMIN_TOKEN", &cp.admin_token),
            ("AIGW_DATA_DIR", &data),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "acme\n");

    // None there: it says what to pass.
    let empty = scratch_dir("admin-tls-cli-empty").display().to_string();
    let out = controlplane(
        &["tenant-list", "--url", &url],
        &[
            ("AIGW_ADMIN_TOKEN", &cp.admin_token),
            ("AIGW_DATA_DIR", &empty),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no CA to verify") && err.contains("--ca-file"),
        "{err}"
    );

    // A CA file that is not there is named.
    let out = controlplane(
        &[
            "tenant-list",
            "--url",
            &url,
            "--ca-file",
            "/nonexistent/ca.pem",
        ],
        &[("AIGW_ADMIN_TOKEN", &cp.admin_token)],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--ca-file /nonexistent/ca.pem"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plain_http_is_served_only_when_asked_and_only_on_loopback() {
    // Off loopback: refused before anything is bound, naming the option.
    let err = controlplane::start(controlplane::Options {
        data_dir: scratch_dir("admin-plain-refused"),
        api_listen: "0.0.0.0:0".parse().unwrap(),
        api_tls: ApiTls::InsecurePlainHttp,
        push_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .expect_err("plain HTTP off loopback");
    let err = format!("{err:#}");
    assert!(
        err.contains("--insecure-plain-http") && err.contains("loopback"),
        "{err}"
    );
    // The binary says so and exits.
    let dir = scratch_dir("admin-plain-serve");
    let out = controlplane(
        &[
            "serve",
            "--data-dir",
            &dir.display().to_string(),
            "--listen",
            "0.0.0.0:0",
            "--link-listen",
            "127.0.0.1:0",
            "--insecure-plain-http",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "--insecure-plain-http: the admin API serves plain HTTP on a loopback address only"
        ),
        "{}",
        stderr(&out)
    );

    // On loopback: plain HTTP, never HSTS (RFC 6797 §7.2).
    let cp = start(
        &scratch_dir("admin-plain-loopback"),
        ApiTls::InsecurePlainHttp,
    )
    .unwrap();
    assert_eq!(cp.api_url(), format!("http://{}", cp.addr));
    for (path, status) in [("/healthz", 200), ("/no-such-path", 404)] {
        let r = exchange(cp.addr, &get(path));
        assert_eq!(r.status, status);
        assert_eq!(r.header("strict-transport-security"), None, "{path}");
    }
    // The CLI sends the token over loopback.
    let created = cli_of(&cp, &["tenant-create", "Acme", "--id", "acme"]);
    assert_eq!(created["id"], "acme");

    // Never in clear off loopback: refused before any connection is made.
    for url in ["http://192.0.2.1:9900", "http://cp.example:9900"] {
        let out = controlplane(
            &["tenant-list", "--url", url],
            &[("AIGW_ADMIN_TOKEN", &cp.admin_token)],
        );
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("refusing to send the admin token in clear"),
            "{url}: {}",
            stderr(&out)
        );
    }
}

/// The operator's CA, and a certificate it issued for `localhost` and `admin.example`:
/// (CA PEM, certificate PEM, key PEM).
fn operator_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "operator test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into(), "admin.example".into()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

#[test]
fn an_operators_certificate_is_served_when_configured() {
    let dir = scratch_dir("admin-operator-cert");
    let (ca, cert, key) = operator_pki();
    let (ca_file, cert_file, key_file) = (
        dir.join("operator-ca.pem"),
        dir.join("admin.pem"),
        dir.join("admin.key"),
    );
    std::fs::write(&ca_file, &ca).unwrap();
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let cp = start(
        &dir.join("cp"),
        ApiTls::Files {
            cert: cert_file.clone(),
            key: key_file.clone(),
        },
    )
    .unwrap();

    // Verified against the operator's CA, under its certificate's names.
    let r = exchange_tls(ca.as_bytes(), "admin.example", cp.addr, &get("/healthz"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("strict-transport-security"), Some(HSTS));
    // Not the control plane's own certificate: a client trusting only its CA refuses it.
    let own_ca = std::fs::read(&cp.ca_file).unwrap();
    let config = https_client_config(&own_ca, &[&rustls::version::TLS13]);
    let mut s = tls_connect_with(config, "localhost", cp.addr);
    let refused = s
        .write_all(&get("/healthz"))
        .expect_err("the operator's certificate is not the control plane CA's");
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    // The CLI, given the operator's CA.
    let url = format!("https://localhost:{}", cp.addr.port());
    let created = cli(
        &url,
        &cp.admin_token,
        &ca_file,
        &["tenant-create", "Acme", "--id", "acme"],
        &[],
    );
    assert_eq!(created["id"], "acme");
    drop(cp);

    // Files that cannot serve are refused, naming the option.
    let refused = |cert: &Path, key: &Path| {
        start(
            &dir.join("cp"),
            ApiTls::Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
        )
        .expect_err("refused")
    };
    let missing = dir.join("missing.pem");
    let err = refused(&missing, &key_file);
    assert!(
        err.contains(&format!("--api-cert-file {}", missing.display())),
        "{err}"
    );
    let err = refused(&cert_file, &missing);
    assert!(
        err.contains(&format!("--api-key-file {}", missing.display())),
        "{err}"
    );
    let err = refused(&key_file, &key_file);
    assert!(
        err.contains("--api-cert-file") && err.contains("no certificate"),
        "{err}"
    );
    let (_, _, another_key) = operator_pki();
    let another = dir.join("another.key");
    std::fs::write(&another, another_key).unwrap();
    let err = refused(&cert_file, &another);
    assert!(
        err.contains(&format!(
            "--api-key-file {} is not the private key of the certificate in --api-cert-file",
            another.display()
        )),
        "{err}"
    );
}

#[test]
fn a_name_added_later_is_in_a_certificate_from_the_same_ca() {
    let dir = scratch_dir("admin-tls-names");
    let with_names = |names: &[&str]| {
        controlplane::start(controlplane::Options {
            data_dir: dir.clone(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            push_listen: "127.0.0.1:0".parse().unwrap(),
            tls_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .map_err(|e| format!("{e:#}"))
    };
    let cp = with_names(&[]).unwrap();
    let ca = std::fs::read(&cp.ca_file).unwrap();
    let config = https_client_config(&ca, &[&rustls::version::TLS13]);
    let mut s = tls_connect_with(config, "cp.example", cp.addr);
    let refused = s
        .write_all(&get("/healthz"))
        .expect_err("cp.example is not in the first certificate");
    assert!(
        refused
            .to_string()
            .to_lowercase()
            .contains("not valid for name"),
        "{refused}"
    );
    drop(cp);

    // Started again with the name: the certificate carries it, issued by the same CA (the
    // nodes' and clients' ca.pem still verifies it), and still carries the defaults.
    let cp = with_names(&["cp.example"]).unwrap();
    assert_eq!(std::fs::read(&cp.ca_file).unwrap(), ca, "the same CA");
    for name in ["cp.example", "localhost", "127.0.0.1"] {
        let r = exchange_tls(&ca, name, cp.addr, &get("/healthz"));
        assert_eq!(r.status, 200, "{name}");
    }
    drop(cp);

    // A name that is neither a DNS name nor an address is refused, named.
    let err = with_names(&["not a name"]).expect_err("refused");
    assert!(err.contains("--tls-name not a name"), "{err}");
}

#[test]
fn testssl_finds_only_tls_1_3_offered_and_hsts_on_the_admin_api() {
    let cp = cp_start(scratch_dir("admin-testssl"), "127.0.0.1:0");
    let port = cp.api_url().rsplit(':').next().unwrap().to_string();
    let findings = testssl(&format!("https://127.0.0.1:{port}/healthz"));
    findings.assert_tls13_only_with_hsts();
}
