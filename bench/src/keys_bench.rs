//! Key benchmarks: revocation propagation and full-snapshot apply, against a real control
//! plane (SQLite, TLS link) and a real data plane.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// A minimal HTTP/1.1 exchange (Connection: close) returning status and JSON body.
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, _, json) = http_with_head(addr, method, path, token, &body)?;
    Ok((status, json))
}

/// [`http`] with the response head, and the request body as text.
fn http_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, String, Value)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("status")?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Content-Length bodies only (what both servers send for these endpoints).
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((status, head.to_string(), json))
}

/// A call to the control plane's admin API (HTTPS, verified against its CA) presenting
/// its admin token: status and JSON body.
pub(crate) fn cp_api(
    cp: &controlplane::Running,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let client =
        controlplane::client::Client::new(&cp.api_url(), &cp.admin_token, Some(&cp.ca_file))?;
    let (status, text) = client.call(method, path, body)?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("aigw-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub(crate) fn start_cp(dir: &std::path::Path) -> anyhow::Result<controlplane::Running> {
    controlplane::start(controlplane::Options {
        data_dir: dir.to_path_buf(),
        api_listen: "127.0.0.1:0".parse()?,
        push_listen: "127.0.0.1:0".parse()?,
        tls_names: vec![],
        ..Default::default()
    })
}

fn seed(
    cp: &controlplane::Running,
    keys: usize,
    return_keys: usize,
) -> anyhow::Result<Vec<String>> {
    let (s, _) = cp_api(
        cp,
        "POST",
        "/v1/tenants",
        Some(&json!({"id": "bench", "name": "bench", "tier": "enterprise"})),
    )?;
    if s != 201 {
        bail!("creating the tenant: {s}");
    }
    let started = Instant::now();
    let mut plaintexts = Vec::new();
    let mut left = keys;
    while left > 0 {
        let n = left.min(250_000);
        let want = return_keys
            .saturating_sub(plaintexts.len())
            .min(1000)
            .min(n);
        let (s, v) = cp_api(
            cp,
            "POST",
            "/v1/tenants/bench/keys/import",
            Some(&json!({"environment": "production", "count": n, "return_keys": want})),
        )?;
        if s != 201 {
            bail!("importing keys: {s} {v}");
        }
        plaintexts.extend(
            v["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(String::from)),
        );
        left -= n;
    }
    eprintln!(
        "seeded {keys} keys in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(plaintexts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Workers of the node `revocation` measures.
const WORKERS: usize = 2;

/// A chat request presenting `key` on a new connection: the status, the error code if any,
/// and the answering worker (the first half of the request id, which each worker draws at
/// its start).
fn chat(gw: SocketAddr, key: &str) -> anyhow::Result<(u16, String, String)> {
    let body = r#"{"model":"m","messages":[]}"#;
    let (status, head, v) = http_with_head(gw, "POST", "/v1/chat/completions", Some(key), body)?;
    let worker = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .and_then(|id| id.get(..16))
        .context("x-request-id")?
        .to_string();
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    Ok((status, code, worker))
}

pub(crate) fn revocation(keys: usize, revocations: usize) -> anyhow::Result<()> {
    let dir = temp_dir("revocation");
    let cp = start_cp(&dir)?;
    let plaintexts = seed(&cp, keys, revocations)?;
    if plaintexts.len() < revocations {
        bail!("only {} keys to revoke", plaintexts.len());
    }
    let token = cp.add_node("bench", &Default::default())?;
    std::env::set_var("AIGW_BENCH_ENROLLMENT_TOKEN", &token);
    let mut c = dataplane::config::Config::default();
    c.server.listen = "127.0.0.1:0".parse()?;
    c.admin.listen = "127.0.0.1:0".parse()?;
    c.server.workers = WORKERS;
    c.server.pin_workers = false;
    c.log.access = false;
    c.control_plane = Some(dataplane::config::ControlPlaneConfig {
        address: cp.push_addr.to_string(),
        server_name: Some("localhost".into()),
        ca_file: cp.ca_file.clone(),
        identity_dir: dir.join("identity"),
        enrollment_token_env: "AIGW_BENCH_ENROLLMENT_TOKEN".into(),
        enrollment_token_file: None,
        retired_token_env: false,
        retired_node_id: false,
        environments: vec!["production".into()],
        max_stale: Duration::ZERO,
        snapshot_file: None,
        seal_key_env: "AIGW_NODE_SEAL_KEY".into(),
        seal_key_file: None,
        body_log_queue_bytes: dataplane::config::bodies::DEFAULT_QUEUE_BYTES,
    });
    let gw = dataplane::node::start(c)?;
    let admin = gw.admin_addr();
    let ready = Instant::now();
    while http(admin, "GET", "/readyz", None, None)?.0 != 200 {
        if ready.elapsed() > Duration::from_secs(120) {
            bail!("node never became ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Which worker answered is told by the request id's first half, drawn by each worker
    // at its start; learn them all before measuring.
    let mut worker_ids = std::collections::BTreeSet::new();
    let probe = Instant::now();
    while worker_ids.len() < WORKERS {
        worker_ids.insert(chat(gw.addr(), "sk-none")?.2);
        if probe.elapsed() > Duration::from_secs(30) {
            bail!("only {} workers answered", worker_ids.len());
        }
    }
    let (_, rev) = cp_api(&cp, "GET", "/v1/revision", None)?;
    let mut expected = rev["revision"].as_i64().unwrap_or(0);
    let mut refused = Vec::with_capacity(revocations);
    let mut applied = Vec::with_capacity(revocations);
    for key in plaintexts.iter().take(revocations) {
        let key_id = aigw_wire::keys::parse(key)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .key_id
            .to_string();
        let (s, _) = cp_api(&cp, "POST", &format!("/v1/keys/{key_id}/revoke"), None)?;
        let returned = Instant::now();
        if s != 200 {
            bail!("revoke {key_id}: {s}");
        }
        expected += 1;
        // Requests with the key, each on a new connection, until every worker has refused
        // it once.
        let mut refusing = std::collections::BTreeSet::new();
        while refusing.len() < WORKERS {
            let (status, code, worker) = chat(gw.addr(), key)?;
            if status == 401 && code == "revoked_api_key" {
                refusing.insert(worker);
            }
            if returned.elapsed() > Duration::from_secs(10) {
                bail!("revocation {expected} not refused by every worker after 10 s");
            }
        }
        refused.push(returned.elapsed());
        loop {
            let (_, w) = http(admin, "GET", "/workers", None, None)?;
            let all = w["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .all(|x| x["config_revision"].as_i64().unwrap_or(0) >= expected)
            });
            if all {
                break;
            }
            if returned.elapsed() > Duration::from_secs(10) {
                bail!("revision {expected} not applied after 10 s");
            }
        }
        applied.push(returned.elapsed());
    }
    let report = |what: &str, samples: &mut Vec<Duration>| {
        samples.sort();
        println!(
            "revocation, {keys} keys loaded, {revocations} revocations, {WORKERS} workers, {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(samples, 0.5).as_secs_f64() * 1e3,
            percentile(samples, 0.99).as_secs_f64() * 1e3,
            samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
        );
    };
    report(
        "from the admin call's return to a 401 from every worker",
        &mut refused,
    );
    report(
        "to every worker showing the revision on /workers (after those 401s)",
        &mut applied,
    );
    gw.shutdown();
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn snapshot(keys: usize) -> anyhow::Result<()> {
    let dir = temp_dir("snapshot");
    let cp = start_cp(&dir)?;
    seed(&cp, keys, 0)?;
    let node_dir = dir.join("node");
    std::fs::create_dir_all(&node_dir)?;
    let admin: SocketAddr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    )
    .parse()?;
    let token = cp.add_node("bench", &Default::default())?;
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n[admin]\nlisten = \"{admin}\"\n[log]\nlevel = \"info\"\naccess = false\n[control_plane]\naddress = \"{}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nenrollment_token_env = \"AIGW_BENCH_ENROLLMENT_TOKEN\"\n",
        cp.push_addr,
        cp.ca_file.display(),
        node_dir.join("identity").display()
    );
    let path = node_dir.join("dataplane.toml");
    std::fs::write(&path, conf)?;
    let exe = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("dataplane");
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(&path)
        .env("AIGW_BENCH_ENROLLMENT_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(node_dir.join("dataplane.log"))?)
        .spawn()
        .context("starting the data plane (build it with --release first)")?;
    let ready = loop {
        if let Ok((200, _)) = http(admin, "GET", "/readyz", None, None) {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("node never became ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let hwm = vm_hwm_kib(child.id()).unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    println!(
        "full snapshot, {keys} keys: node ready (connect, receive, validate, build, publish) in {:.2} s; peak resident memory {:.1} MiB",
        ready.as_secs_f64(),
        hwm as f64 / 1024.0
    );
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
