//! Harness for tests that run a control plane with data-plane nodes: the admin API over a
//! real socket (TLS 1.3, verified against the control plane's CA), nodes linked to it, and
//! waiting for revisions to reach every worker.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dataplane::config::{Config, ControlPlaneConfig, DriverChoice};
use serde_json::{json, Value};

use crate::mock::MockProvider;
use crate::{admin_get, exchange, test_config, wait_until, Gateway, Resp};

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
    call(cp, &cp.admin_token, method, path, body)
}

/// A request to `cp`'s admin API presenting `token` (any token, to test refusals).
pub fn call(
    cp: &controlplane::Running,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let headers = format!(
        "Authorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    );
    admin_exchange(cp, &crate::request(method, path, &headers, &body))
}

/// Sends `raw` to `cp`'s admin API on a new connection and reads one response: over TLS
/// 1.3, the server verified against the control plane's CA as `localhost`, as a client
/// must.
pub fn admin_exchange(cp: &controlplane::Running, raw: &[u8]) -> Resp {
    let ca = std::fs::read(&cp.ca_file).unwrap();
    crate::exchange_tls(&ca, "localhost", cp.addr, raw)
}

/// Runs one operator CLI command against the control plane at `url` whose certificate
/// `ca_file` verifies (`controlplane <args> --url <url> --ca-file <ca_file>`, the admin
/// token and `env` in its environment only); its JSON output.
pub fn cli(url: &str, token: &str, ca_file: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = std::process::Command::new(crate::bin_path("controlplane"))
        .args(args)
        .args(["--url", url])
        .arg("--ca-file")
        .arg(ca_file)
        .env("AIGW_ADMIN_TOKEN", token)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "controlplane {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "controlplane {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// [`cli`] against `cp`.
pub fn cli_of(cp: &controlplane::Running, args: &[&str]) -> Value {
    cli(&cp.api_url(), &cp.admin_token, &cp.ca_file, args, &[])
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

/// A node's place on a control plane's link: where the link is, the CA to trust, the
/// directory of its identity, and the variable holding its enrolment token (set until it
/// has enrolled). Clone it to restart the same node.
#[derive(Debug, Clone)]
pub struct NodeLink {
    pub node_id: String,
    pub push: SocketAddr,
    pub ca_file: std::path::PathBuf,
    pub identity_dir: std::path::PathBuf,
    /// The secret file holding its enrolment token.
    pub token_file: std::path::PathBuf,
    /// The private directory holding `identity_dir` (the node's private key), removed when
    /// the last clone of this link, and every gateway started from it, is gone.
    pub dir: std::sync::Arc<tempfile::TempDir>,
}

impl NodeLink {
    /// The same node, linking to `push` (a control plane restarted elsewhere, a fake one).
    pub fn at(&self, push: SocketAddr) -> Self {
        Self {
            push,
            ..self.clone()
        }
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Registers a node of every environment and tenant on `cp` (`POST /v1/nodes`), with its
/// enrolment token in a variable of its own: the node enrols when it starts.
pub fn register(cp: &controlplane::Running) -> NodeLink {
    register_scoped(cp, json!({}))
}

/// [`register`], with `scope` (`environments`, `tenants`).
pub fn register_scoped(cp: &controlplane::Running, scope: Value) -> NodeLink {
    let n = unique();
    let node_id = format!("node-{}-{n}", std::process::id());
    let mut body = scope;
    body["id"] = json!(node_id);
    let r = api(cp, "POST", "/v1/nodes", Some(body));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["enrollment_token"].as_str().unwrap().to_string();
    let token_file = crate::secret_file(&format!("enrollment-{n}"), &token);
    let dir = tempfile::Builder::new()
        .prefix("aigw-e2e-identity-")
        .tempdir()
        .unwrap();
    let identity_dir = dir.path().join("identity");
    NodeLink {
        node_id,
        push: cp.push_addr,
        ca_file: cp.ca_file.clone(),
        identity_dir,
        token_file,
        dir: std::sync::Arc::new(dir),
    }
}

/// [`register`], then enrols the node at once, as a node would at its first start: its
/// identity is on disk before any node runs (for a node linking to a fake control plane).
pub fn enrolled(cp: &controlplane::Running) -> NodeLink {
    let link = register(cp);
    let token = std::fs::read_to_string(&link.token_file).unwrap();
    let mut stream = link_client(cp);
    dataplane::config::identity::enroll(
        &mut stream,
        &dataplane::config::identity::IdentityFiles::new(&link.identity_dir),
        &token,
    )
    .expect("enrolled");
    link
}

/// A node of `cp`, its link settings adjusted by `tweak`.
pub fn node(
    driver: DriverChoice,
    cp: &controlplane::Running,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Gateway {
    gateway_with(driver, &register(cp), tweak)
}

pub fn gateway_with(
    driver: DriverChoice,
    link: &NodeLink,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Gateway {
    Gateway::start_with(node_config(driver, link, tweak)).holding(link.dir.clone())
}

/// The node `link` describes, its configuration (beyond the link) adjusted by `tweak`.
pub fn node_with(
    driver: DriverChoice,
    link: &NodeLink,
    tweak: impl FnOnce(&mut Config),
) -> Gateway {
    let mut c = node_config(driver, link, |_| {});
    tweak(&mut c);
    Gateway::start_with(c).holding(link.dir.clone())
}

/// The configuration of the node `link` describes.
pub fn node_config(
    driver: DriverChoice,
    link: &NodeLink,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Config {
    let mut c = test_config(driver);
    let mut cp_config = ControlPlaneConfig {
        address: link.push.to_string(),
        server_name: Some("localhost".into()),
        ca_file: link.ca_file.clone(),
        identity_dir: link.identity_dir.clone(),
        enrollment_token_env: "AIGW_E2E_UNUSED_ENROLLMENT_TOKEN".into(),
        enrollment_token_file: Some(link.token_file.clone()),
        retired_token_env: false,
        retired_node_id: false,
        environments: vec!["production".into(), "staging".into(), "development".into()],
        max_stale: Duration::ZERO,
        snapshot_file: None,
        seal_key_env: "AIGW_E2E_UNUSED_SEAL_KEY".into(),
        seal_key_file: None,
        body_log_queue_bytes: dataplane::config::bodies::DEFAULT_QUEUE_BYTES,
    };
    tweak(&mut cp_config);
    c.control_plane = Some(cp_config);
    c
}

/// A chat request for `model` to the gateway at `gw`, presenting `key` if any.
pub fn chat_with_key(gw: SocketAddr, key: Option<&str>, model: &str) -> Resp {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let headers = key.map(crate::key_headers).unwrap_or_default();
    exchange(gw, &crate::post("/v1/chat/completions", &headers, &body))
}

/// Waits until every worker of `gw` reports it applied at least `revision`: the one wait
/// for a change to reach a node.
pub fn wait_workers(gw: &Gateway, revision: i64) {
    let reached = || {
        crate::workers(gw.admin_addr())
            .iter()
            .all(|w| w["config_revision"].as_i64().unwrap_or(0) >= revision)
    };
    assert!(
        wait_until(Duration::from_secs(20), reached),
        "workers never reached revision {revision}: {}",
        admin_get(gw.admin_addr(), "/workers").json()
    );
}

pub fn revision(cp: &controlplane::Running) -> i64 {
    api(cp, "GET", "/v1/revision", None).json()["revision"]
        .as_i64()
        .unwrap()
}

/// A TLS client on the control plane's node link, trusting its CA (as a node does), not
/// having sent anything yet, presenting no certificate (a node before enrolment).
pub fn link_client(
    cp: &controlplane::Running,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    link_client_as(cp, None)
}

/// [`link_client`], presenting the certificate of the enrolled node `link` when given.
pub fn link_client_as(
    cp: &controlplane::Running,
    link: Option<&NodeLink>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let identity = link.map(|l| {
        dataplane::config::identity::IdentityFiles::new(&l.identity_dir)
            .load()
            .unwrap()
            .expect("the node has enrolled")
    });
    let ca = std::fs::read(&cp.ca_file).unwrap();
    crate::tls_connect(&ca, "localhost", cp.push_addr, identity.as_ref())
}
