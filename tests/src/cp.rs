//! Harness for tests that run a control plane with data-plane nodes: the admin API over a
//! real socket, nodes linked to it, and waiting for revisions to reach every worker.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dataplane::config::{Config, ControlPlaneConfig, DriverChoice};
use serde_json::{json, Value};

use crate::mock::MockProvider;
use crate::{admin_get, exchange, test_config, wait_until, Gateway, Resp};

pub const NODE_TOKEN_ENV: &str = "AIGW_E2E_NODE_TOKEN";

pub fn cp_start(dir: std::path::PathBuf, push: &str) -> controlplane::Running {
    controlplane::start(controlplane::Options {
        data_dir: dir,
        api_listen: "127.0.0.1:0".parse().unwrap(),
        push_listen: push.parse().unwrap(),
        tls_names: vec![],
        ..Default::default()
    })
    .unwrap()
}

pub fn api(cp: &controlplane::Running, method: &str, path: &str, body: Option<Value>) -> Resp {
    call(cp.addr, &cp.admin_token, method, path, body)
}

/// A request to the admin API at `addr` presenting `token` (any token, to test refusals).
pub fn call(addr: SocketAddr, token: &str, method: &str, path: &str, body: Option<Value>) -> Resp {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, raw.as_bytes())
}

/// Creates tenant `id` (asserting 201).
pub fn tenant(cp: &controlplane::Running, id: &str, tier: &str) {
    let r = api(
        cp,
        "POST",
        "/v1/tenants",
        Some(json!({"id": id, "name": id, "tier": tier})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

/// Creates a key of `tenant` from `body` (asserting 201); returns the answer (`key`, `info`).
pub fn create_key(cp: &controlplane::Running, tenant: &str, body: Value) -> Value {
    let r = api(
        cp,
        "POST",
        &format!("/v1/tenants/{tenant}/keys"),
        Some(body),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// A new key of `tenant`'s `env`, in full.
pub fn key(cp: &controlplane::Running, tenant: &str, env: &str) -> String {
    create_key(cp, tenant, json!({"environment": env}))["key"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A PUT to the admin API that must succeed.
pub fn put(cp: &controlplane::Running, path: &str, body: Value) -> Resp {
    let r = api(cp, "PUT", path, Some(body));
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r
}

/// Gives `tenant`'s `env` an upstream on the mock provider and a route of every model to it.
pub fn route_env(cp: &controlplane::Running, tenant: &str, env: &str, mock: &MockProvider) {
    let base = format!("/v1/tenants/{tenant}/environments/{env}");
    put(
        cp,
        &format!("{base}/upstreams/oa"),
        json!({"provider": "openai", "base_url": mock.base_url()}),
    );
    put(
        cp,
        &format!("{base}/routes/all"),
        json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
    );
}

pub fn gateway(driver: DriverChoice, cp: &controlplane::Running) -> Gateway {
    node(driver, cp, |_| {})
}

/// A node of `cp`, its link settings adjusted by `tweak`.
pub fn node(
    driver: DriverChoice,
    cp: &controlplane::Running,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Gateway {
    gateway_with(driver, cp.push_addr, &cp.node_token, &cp.ca_file, tweak)
}

pub fn gateway_with(
    driver: DriverChoice,
    push: SocketAddr,
    node_token: &str,
    ca_file: &std::path::Path,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Gateway {
    Gateway::start_with(node_config(driver, push, node_token, ca_file, tweak))
}

/// The configuration of a node linked to the control plane at `push`.
pub fn node_config(
    driver: DriverChoice,
    push: SocketAddr,
    node_token: &str,
    ca_file: &std::path::Path,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Config {
    // One variable per control plane: tests run in parallel, each with its own.
    let token_env = format!("{NODE_TOKEN_ENV}_{}", push.port());
    std::env::set_var(&token_env, node_token);
    let mut c = test_config(driver);
    let mut cp_config = ControlPlaneConfig {
        address: push.to_string(),
        server_name: Some("localhost".into()),
        ca_file: ca_file.to_path_buf(),
        token_env,
        node_id: Some(format!("node-{driver:?}")),
        environments: vec!["production".into(), "staging".into(), "development".into()],
        max_stale: Duration::ZERO,
        snapshot_file: None,
        seal_key_env: "AIGW_SEAL_KEY".into(),
        seal_key_file: None,
    };
    tweak(&mut cp_config);
    c.control_plane = Some(cp_config);
    c
}

pub fn chat_with_key(gw: SocketAddr, key: Option<&str>, model: &str) -> Resp {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(gw, raw.as_bytes())
}

/// Waits until every worker reports at least `revision`.
pub fn wait_workers(gw: &Gateway, revision: i64) -> Duration {
    let start = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = admin_get(gw.admin_addr(), "/workers").json();
            v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["config_revision"].as_i64().unwrap_or(0) >= revision)
        }),
        "workers never reached revision {revision}: {}",
        admin_get(gw.admin_addr(), "/workers").json()
    );
    start.elapsed()
}

pub fn revision(cp: &controlplane::Running) -> i64 {
    api(cp, "GET", "/v1/revision", None).json()["revision"]
        .as_i64()
        .unwrap()
}

/// A TLS client on the control plane's node link, trusting its CA (as a node does), not
/// having sent anything yet.
pub fn link_client(
    cp: &controlplane::Running,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cp.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = std::net::TcpStream::connect(cp.push_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}
