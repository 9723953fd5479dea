//! `controlplane up`: a whole local stack in one command — this control plane, the demo
//! provider (a stand-in for OpenAI and Anthropic that echoes the last message), and one
//! data-plane node enrolled with it — set up so that a key works at once: a `demo` tenant
//! whose production environment routes every model to the demo provider, and a new key of
//! it. Everything lives under one data directory; stopping the stack stops every process
//! it started (they are also told to stop should this process die).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::{start, Options, Running};

/// Where and how the local stack runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub link_listen: SocketAddr,
    /// The gateway's client-facing listener.
    pub gateway_listen: SocketAddr,
    /// The gateway's admin listener (`/readyz`, `/workers`).
    pub gateway_admin: SocketAddr,
    /// The `dataplane` binary; default: beside this one, else on `PATH`.
    pub dataplane: Option<PathBuf>,
}

/// A running local stack. Dropping it stops the node and the demo provider (SIGTERM, then
/// SIGKILL after 10 s), then the control plane.
#[derive(Debug)]
pub struct Stack {
    pub admin_token: String,
    /// The admin API (HTTPS).
    pub api: SocketAddr,
    /// The CA its certificate, and the node link's, chain to.
    pub ca_file: PathBuf,
    /// A key of tenant `demo`'s production environment, shown once.
    pub key: String,
    pub gateway: SocketAddr,
    pub gateway_admin: SocketAddr,
    pub data_dir: PathBuf,
    children: Vec<(&'static str, Child)>,
    cp: Option<Running>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The node first: it drains its requests while the control plane is still there.
        for (name, child) in self.children.iter_mut().rev() {
            stop_child(name, child);
        }
        if let Some(cp) = self.cp.take() {
            cp.stop();
        }
    }
}

fn stop_child(name: &str, child: &mut Child) {
    let pid = child.id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(process = name, pid, "did not stop in 10 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// The `dataplane` binary: beside the running executable (a build's `target/<profile>/`,
/// or an install's `bin/`), else whatever `PATH` finds.
fn dataplane_binary(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("dataplane")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("dataplane"))
}

/// A command whose process gets SIGTERM should this one die, so nothing outlives the stack.
fn child_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    #[allow(unsafe_code)]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe, the only call made between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} was not ready after {timeout:?}")
}

/// Calls the admin API; `Ok((status, body))` for any status.
fn admin(
    client: &crate::client::Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let (status, text) = client
        .call(method, path, body.as_ref())
        .with_context(|| format!("{method} {path}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn must(what: &str, (status, body): (u16, Value), ok: &[u16]) -> anyhow::Result<Value> {
    if ok.contains(&status) {
        Ok(body)
    } else {
        bail!(
            "{what}: {status} {}",
            body["error"]["message"].as_str().unwrap_or("")
        )
    }
}

/// Starts the local stack and waits until a request with its key is answered.
pub fn up(opts: &UpOptions) -> anyhow::Result<Stack> {
    let cp_dir = opts.data_dir.join("controlplane");
    let node_dir = opts.data_dir.join("node");
    aigw_seal::files::private_dir(&opts.data_dir)
        .with_context(|| format!("data directory {}", opts.data_dir.display()))?;
    aigw_seal::files::private_dir(&node_dir)
        .with_context(|| format!("node directory {}", node_dir.display()))?;
    let dataplane = dataplane_binary(opts.dataplane.as_deref());
    let mut stack = Stack {
        admin_token: String::new(),
        api: opts.api_listen,
        ca_file: PathBuf::new(),
        key: String::new(),
        gateway: opts.gateway_listen,
        gateway_admin: opts.gateway_admin,
        data_dir: opts.data_dir.clone(),
        children: Vec::new(),
        cp: None,
    };
    let cp = start(Options {
        data_dir: cp_dir,
        api_listen: opts.api_listen,
        push_listen: opts.link_listen,
        tls_names: Vec::new(),
        // The stack's own key, in its data directory: never an AIGW_SEAL_KEY of the shell.
        seal_key: None,
        ..Options::default()
    })?;
    let (api, token, ca_file, link) = (
        cp.addr,
        cp.admin_token.clone(),
        cp.ca_file.clone(),
        cp.push_addr,
    );
    stack.api = api;
    stack.admin_token = token.clone();
    stack.ca_file = ca_file.clone();
    let client = crate::client::Client::new(&cp.api_url(), &token, Some(&ca_file))?
        .with_timeout(Duration::from_secs(10));
    stack.cp = Some(cp);

    // The demo provider, on a port of its own.
    let provider = free_port()?;
    let log = std::fs::File::create(node_dir.join("demo-provider.log"))?;
    let child = child_command(&dataplane)
        .arg("--demo-provider")
        .arg(provider.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it: cargo build --release)",
                dataplane.display()
            )
        })?;
    stack.children.push(("demo provider", child));
    wait_for("the demo provider", Duration::from_secs(10), || {
        std::net::TcpStream::connect(provider).is_ok()
    })?;

    // Tenant `demo`: production routes every model to the demo provider.
    let call = |method: &str, path: &str, body: Option<Value>| admin(&client, method, path, body);
    must(
        "creating tenant demo",
        call(
            "POST",
            "/v1/tenants",
            Some(json!({"id": "demo", "name": "Demo", "tier": "pro"})),
        )?,
        &[201, 409],
    )?;
    let env = "/v1/tenants/demo/environments/production";
    for (name, provider_kind) in [("demo-openai", "openai"), ("demo-anthropic", "anthropic")] {
        must(
            "the demo upstreams",
            call(
                "PUT",
                &format!("{env}/upstreams/{name}"),
                Some(json!({
                    "provider": provider_kind,
                    "base_url": format!("http://{provider}"),
                    "non_retention": {"mode": "account_agreement"},
                    "stream_options": provider_kind == "openai",
                    "region": "local",
                })),
            )?,
            &[200],
        )?;
    }
    must(
        "the demo route",
        call(
            "PUT",
            &format!("{env}/routes/all"),
            Some(
                json!({"prefix": "", "targets": [{"upstream": "demo-openai"}, {"upstream": "demo-anthropic"}]}),
            ),
        )?,
        &[200],
    )?;

    // The node: enrolled once; later runs reuse its identity.
    let identity = node_dir.join("identity");
    let mut enrollment = None;
    if !identity.join("node.pem").exists() {
        let (status, body) = call("POST", "/v1/nodes", Some(json!({"id": "local"})))?;
        let body = if status == 409 {
            // Enrolled before, its identity since lost: enrol it again.
            must(
                "re-enrolling node local",
                call("POST", "/v1/nodes/local/enrollment", None)?,
                &[200],
            )?
        } else {
            must("adding node local", (status, body), &[201])?
        };
        enrollment = body["enrollment_token"].as_str().map(str::to_string);
    }
    let seal_key = node_dir.join("seal.key");
    if !seal_key.exists() {
        let kek = aigw_seal::Kek::generate().map_err(|e| anyhow!("seal key: {e}"))?;
        aigw_seal::files::write_private(&seal_key, format!("{}\n", kek.to_hex()).as_bytes())?;
    }
    let config = node_dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `controlplane up`.\n[server]\nlisten = \"{}\"\n\n[admin]\nlisten = \"{}\"\n\n[control_plane]\naddress = \"{link}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nsnapshot_file = \"{}\"\nseal_key_file = \"{}\"\n",
            opts.gateway_listen,
            opts.gateway_admin,
            ca_file.display(),
            identity.display(),
            node_dir.join("config.sealed").display(),
            seal_key.display(),
        ),
    )?;
    let log = std::fs::File::create(node_dir.join("dataplane.log"))?;
    let mut node = child_command(&dataplane);
    node.arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env_remove("AIGW_ENROLLMENT_TOKEN");
    if let Some(t) = &enrollment {
        node.env("AIGW_ENROLLMENT_TOKEN", t);
    }
    stack
        .children
        .push(("node", node.spawn().context("starting the node")?));
    let gateway_admin = opts.gateway_admin;
    wait_for("the node", Duration::from_secs(30), || {
        ureq::get(&format!("http://{gateway_admin}/readyz"))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok()
    })
    .with_context(|| format!("see {}", node_dir.join("dataplane.log").display()))?;

    // A key, and proof that it works.
    let created = must(
        "creating a key",
        call(
            "POST",
            "/v1/tenants/demo/keys",
            Some(json!({"environment": "production", "name": "controlplane up"})),
        )?,
        &[201],
    )?;
    stack.key = created["key"]
        .as_str()
        .ok_or_else(|| anyhow!("no key in the answer"))?
        .to_string();
    let gateway = opts.gateway_listen;
    let key = stack.key.clone();
    wait_for("the first request", Duration::from_secs(10), || {
        ureq::post(&format!("http://{gateway}/v1/chat/completions"))
            .set("authorization", &format!("Bearer {key}"))
            .timeout(Duration::from_secs(5))
            .send_json(json!({"model": "demo", "messages": [{"role": "user", "content": "ping"}]}))
            .is_ok()
    })?;
    Ok(stack)
}

impl Stack {
    /// What to print once the stack is up: where everything is, and requests that work.
    pub fn banner(&self) -> String {
        let gw = self.gateway;
        let key = &self.key;
        format!(
            "\
aigateway is up.

  gateway         http://{gw}        (admin: http://{admin})
  control plane   https://{api}      admin token: {token}
                  its CA: {ca}
  data            {data}

A key of tenant `demo` (production), shown once:

  {key}

Try it:

  curl -s http://{gw}/v1/chat/completions \\
    -H 'authorization: Bearer {key}' -H 'content-type: application/json' \\
    -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'

  python3 -c 'from openai import OpenAI
print(OpenAI(base_url=\"http://{gw}/v1\", api_key=\"{key}\").chat.completions.create(
    model=\"demo\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)'

Operate it (in another shell):

  export AIGW_ADMIN_TOKEN={token} AIGW_CONTROLPLANE_URL=https://{api}
  export AIGW_CONTROLPLANE_CA={ca}
  controlplane key-create --tenant demo --environment production
  controlplane nodes

Ctrl-C stops everything; the data directory keeps the state for the next `up`.
",
            admin = self.gateway_admin,
            api = self.api,
            ca = self.ca_file.display(),
            token = self.admin_token,
            data = self.data_dir.display(),
        )
    }
}
