//! The `controlplane` binary: `serve` runs the control plane; the other subcommands are the
//! operator CLI, a thin client of the same admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "controlplane", version, about = "aigateway control plane")]
struct Cli {
    /// Admin API address (CLI commands).
    #[arg(
        long,
        global = true,
        env = "AIGW_CONTROLPLANE_URL",
        default_value = "http://127.0.0.1:9900"
    )]
    url: String,
    /// Admin token (CLI commands); `serve` prints where it keeps its own.
    #[arg(long, global = true, env = "AIGW_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the control plane.
    ///
    /// Provider credentials are sealed at rest with the key in AIGW_SEAL_KEY (64 hex digits),
    /// else with `<data-dir>/seal.key`, generated at first start.
    Serve {
        /// Default: $AIGW_DATA_DIR/controlplane, else $XDG_STATE_HOME/aigateway/controlplane,
        /// else ~/.local/state/aigateway/controlplane.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Admin REST API.
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: SocketAddr,
        /// The TLS link data-plane nodes connect to.
        #[arg(long, default_value = "127.0.0.1:9443")]
        link_listen: SocketAddr,
        /// Extra DNS names or addresses for the generated link certificate.
        #[arg(long)]
        tls_name: Vec<String>,
        /// Changelog entries kept by compaction; a node further behind gets a snapshot.
        #[arg(long, default_value_t = controlplane::DEFAULT_CHANGELOG_KEEP)]
        changelog_keep: u64,
    },
    /// Run a whole local stack: this control plane, a demo provider, and one node enrolled
    /// with it, set up so that the key it prints works at once. Ctrl-C stops all of it.
    Up {
        /// Default: $AIGW_DATA_DIR/local, else $XDG_STATE_HOME/aigateway/local, else
        /// ~/.local/state/aigateway/local.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9443")]
        link_listen: SocketAddr,
        /// The gateway's listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        gateway_listen: SocketAddr,
        /// The gateway's admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        gateway_admin: SocketAddr,
        /// The dataplane binary (default: beside this one, else on PATH).
        #[arg(long)]
        dataplane: Option<PathBuf>,
    },
    /// Nodes: scope, enrolment, and the revision each has applied.
    Nodes,
    /// Register a node; prints its one-time enrolment token (give it to the node in
    /// AIGW_ENROLLMENT_TOKEN).
    NodeAdd {
        id: String,
        /// Environments whose keys and routing it receives (repeat; default all three).
        #[arg(long = "environment")]
        environments: Vec<String>,
        /// Tenants whose keys and routing it receives (repeat; default every tenant).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// How long the enrolment token is valid, in seconds (default an hour).
        #[arg(long)]
        expires_in_seconds: Option<i64>,
    },
    /// A new enrolment token for a node (lost or replaced identity); its current
    /// certificate is refused once the node enrols with the new one.
    NodeEnroll {
        id: String,
        #[arg(long)]
        expires_in_seconds: Option<i64>,
    },
    /// Revoke a node: its link closes now and its certificate is refused from then on.
    NodeRevoke {
        id: String,
    },
    /// Set what a node receives; it is sent a snapshot of the new scope at once.
    NodeScope {
        id: String,
        #[arg(long = "environment")]
        environments: Vec<String>,
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Create a tenant: --name NAME --tier free|pro|enterprise.
    TenantCreate {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "free")]
        tier: String,
    },
    TenantList,
    /// Create a key; prints it once.
    KeyCreate {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "production")]
        environment: String,
        #[arg(long)]
        sub_account: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
    },
    KeyList {
        #[arg(long)]
        tenant: String,
    },
    KeyRevoke {
        key_id: String,
    },
    /// Rotate a key; the old one keeps working for --grace-seconds (default 24 h).
    KeyRotate {
        key_id: String,
        #[arg(long, default_value_t = 86_400)]
        grace_seconds: i64,
    },
    Audit {
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Create or replace an upstream of an environment.
    ///
    /// The credential is read from the environment variable named by --credential-env (never
    /// from the command line); without it the stored credential is kept.
    UpstreamPut {
        tenant: String,
        /// production, staging or development.
        env: String,
        name: String,
        /// openai or anthropic.
        #[arg(long)]
        provider: String,
        /// http:// or https://, host, optional port and path.
        #[arg(long)]
        base_url: String,
        /// Name of the environment variable holding the provider credential.
        #[arg(long, value_name = "VAR", conflicts_with = "remove_credential")]
        credential_env: Option<String>,
        /// Remove the stored credential.
        #[arg(long)]
        remove_credential: bool,
        /// Where the provider processes data.
        #[arg(long, default_value = "")]
        region: String,
        /// A business associate agreement covers this upstream.
        #[arg(long)]
        baa: bool,
        /// Tell the provider not to retain with this request header.
        #[arg(long, value_name = "NAME=VALUE", conflicts_with_all = ["non_retention_body_field", "non_retention_agreement"])]
        non_retention_header: Option<String>,
        /// Tell the provider not to retain with this JSON body field.
        #[arg(
            long,
            value_name = "NAME=JSON",
            conflicts_with = "non_retention_agreement"
        )]
        non_retention_body_field: Option<String>,
        /// An account-level zero-retention agreement covers every request.
        #[arg(long)]
        non_retention_agreement: bool,
        /// Ask the provider for usage in streamed responses.
        #[arg(long)]
        stream_options: bool,
        /// Forward the client's OpenAI-Organization and OpenAI-Project headers.
        #[arg(long)]
        pass_organization_headers: bool,
        /// Connections per worker; 0 = the node's default.
        #[arg(long, default_value_t = 0)]
        max_connections: u64,
        /// Milliseconds; 0 = the node's default.
        #[arg(long, default_value_t = 0)]
        connect_timeout_ms: u64,
        #[arg(long, default_value_t = 0)]
        first_byte_timeout_ms: u64,
        #[arg(long, default_value_t = 0)]
        read_idle_timeout_ms: u64,
    },
    UpstreamList {
        tenant: String,
        env: String,
    },
    UpstreamDelete {
        tenant: String,
        env: String,
        name: String,
    },
    /// Create or replace a route: an exact --model or a --prefix, to upstreams in order.
    ///
    /// Repeat --target UPSTREAM (or UPSTREAM=MODEL, to send another model name) in failover
    /// order. An empty --prefix "" routes every model.
    RoutePut {
        tenant: String,
        env: String,
        name: String,
        #[arg(long, required_unless_present = "prefix", conflicts_with = "prefix")]
        model: Option<String>,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long = "target", value_name = "UPSTREAM[=MODEL]", required = true)]
        targets: Vec<String>,
    },
    RouteList {
        tenant: String,
        env: String,
    },
    RouteDelete {
        tenant: String,
        env: String,
        name: String,
    },
    /// Set an environment's policy (every flag not given is off).
    PolicyPut {
        tenant: String,
        env: String,
        /// Only upstreams that can be told not to retain.
        #[arg(long)]
        zero_retention: bool,
        /// Only upstreams in this region.
        #[arg(long, default_value = "")]
        region: String,
        /// Only upstreams under a business associate agreement.
        #[arg(long)]
        hipaa: bool,
    },
    PolicyGet {
        tenant: String,
        env: String,
    },
    /// Delete all but the newest --keep changelog entries.
    Compact {
        #[arg(long)]
        keep: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("controlplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
}

/// Waits for Ctrl-C or SIGTERM.
fn wait_for_stop() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Up {
        data_dir,
        listen,
        link_listen,
        gateway_listen,
        gateway_admin,
        dataplane,
    } = cli.cmd
    {
        init_logging();
        let stack = controlplane::local::up(&controlplane::local::UpOptions {
            data_dir: data_dir.unwrap_or_else(|| controlplane::default_data_dir("local")),
            api_listen: listen,
            link_listen,
            gateway_listen,
            gateway_admin,
            dataplane,
        })?;
        println!("{}", stack.banner());
        wait_for_stop()?;
        eprintln!("stopping the local stack");
        drop(stack);
        return Ok(());
    }
    if let Cmd::Serve {
        data_dir,
        listen,
        link_listen,
        tls_name,
        changelog_keep,
    } = cli.cmd
    {
        init_logging();
        let data_dir = data_dir.unwrap_or_else(|| controlplane::default_data_dir("controlplane"));
        let running = controlplane::start(controlplane::Options {
            data_dir: data_dir.clone(),
            api_listen: listen,
            push_listen: link_listen,
            tls_names: tls_name,
            // From the environment only: a key on the command line is visible to every user.
            seal_key: std::env::var("AIGW_SEAL_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            changelog_keep,
        })?;
        println!(
            "control plane: admin API http://{}, node link {} (CA {}); data in {}, the admin token in {}; register a node with node-add",
            running.addr,
            running.push_addr,
            running.ca_file.display(),
            data_dir.display(),
            data_dir.join("admin-token").display(),
        );
        wait_for_stop()?;
        running.stop();
        return Ok(());
    }
    let token = cli
        .token
        .ok_or_else(|| anyhow::anyhow!("--token or AIGW_ADMIN_TOKEN is required"))?;
    let (method, path, body): (&str, String, Option<Value>) = match cli.cmd {
        Cmd::Serve { .. } | Cmd::Up { .. } => unreachable_serve(),
        Cmd::TenantCreate { name, tier } => (
            "POST",
            "/v1/tenants".into(),
            Some(json!({"name": name, "tier": tier})),
        ),
        Cmd::TenantList => ("GET", "/v1/tenants".into(), None),
        Cmd::KeyCreate {
            tenant,
            environment,
            sub_account,
            name,
        } => (
            "POST",
            format!("/v1/tenants/{tenant}/keys"),
            Some(json!({"environment": environment, "sub_account_id": sub_account, "name": name})),
        ),
        Cmd::KeyList { tenant } => ("GET", format!("/v1/tenants/{tenant}/keys"), None),
        Cmd::KeyRevoke { key_id } => ("POST", format!("/v1/keys/{key_id}/revoke"), None),
        Cmd::KeyRotate {
            key_id,
            grace_seconds,
        } => (
            "POST",
            format!("/v1/keys/{key_id}/rotate"),
            Some(json!({"grace_seconds": grace_seconds})),
        ),
        Cmd::Audit { after } => ("GET", format!("/v1/audit?after={after}"), None),
        Cmd::Nodes => ("GET", "/v1/nodes".into(), None),
        Cmd::NodeAdd {
            id,
            environments,
            tenants,
            expires_in_seconds,
        } => (
            "POST",
            "/v1/nodes".into(),
            Some(
                json!({"id": id, "environments": environments, "tenants": tenants, "expires_in_seconds": expires_in_seconds}),
            ),
        ),
        Cmd::NodeEnroll {
            id,
            expires_in_seconds,
        } => (
            "POST",
            format!("/v1/nodes/{id}/enrollment"),
            Some(json!({"expires_in_seconds": expires_in_seconds})),
        ),
        Cmd::NodeRevoke { id } => ("POST", format!("/v1/nodes/{id}/revoke"), None),
        Cmd::NodeScope {
            id,
            environments,
            tenants,
        } => (
            "PUT",
            format!("/v1/nodes/{id}/scope"),
            Some(json!({"environments": environments, "tenants": tenants})),
        ),
        Cmd::UpstreamPut {
            tenant,
            env,
            name,
            provider,
            base_url,
            credential_env,
            remove_credential,
            region,
            baa,
            non_retention_header,
            non_retention_body_field,
            non_retention_agreement,
            stream_options,
            pass_organization_headers,
            max_connections,
            connect_timeout_ms,
            first_byte_timeout_ms,
            read_idle_timeout_ms,
        } => {
            let non_retention = if let Some(h) = non_retention_header {
                let (n, v) = h.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--non-retention-header: expected NAME=VALUE")
                })?;
                json!({"mode": "header", "name": n, "value": v})
            } else if let Some(f) = non_retention_body_field {
                let (n, v) = f.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--non-retention-body-field: expected NAME=JSON")
                })?;
                let v: Value = serde_json::from_str(v).map_err(|e| {
                    anyhow::anyhow!("--non-retention-body-field: the value is not JSON: {e}")
                })?;
                json!({"mode": "body_field", "name": n, "value": v})
            } else if non_retention_agreement {
                json!({"mode": "account_agreement"})
            } else {
                json!({"mode": "none"})
            };
            let mut body = json!({
                "provider": provider,
                "base_url": base_url,
                "non_retention": non_retention,
                "stream_options": stream_options,
                "pass_organization_headers": pass_organization_headers,
                "region": region,
                "baa": baa,
                "max_connections": max_connections,
                "connect_timeout_ms": connect_timeout_ms,
                "first_byte_timeout_ms": first_byte_timeout_ms,
                "read_idle_timeout_ms": read_idle_timeout_ms,
            });
            if let Some(var) = credential_env {
                let credential = std::env::var(&var).map_err(|_| {
                    anyhow::anyhow!("--credential-env: the environment variable {var} is not set")
                })?;
                if credential.is_empty() {
                    anyhow::bail!("--credential-env: the environment variable {var} is empty");
                }
                body["credential"] = json!(credential);
            } else if remove_credential {
                body["credential"] = json!("");
            }
            (
                "PUT",
                format!("{}/upstreams/{name}", env_path(&tenant, &env)),
                Some(body),
            )
        }
        Cmd::UpstreamList { tenant, env } => (
            "GET",
            format!("{}/upstreams", env_path(&tenant, &env)),
            None,
        ),
        Cmd::UpstreamDelete { tenant, env, name } => (
            "DELETE",
            format!("{}/upstreams/{name}", env_path(&tenant, &env)),
            None,
        ),
        Cmd::RoutePut {
            tenant,
            env,
            name,
            model,
            prefix,
            targets,
        } => {
            let targets: Vec<Value> = targets
                .iter()
                .map(|t| match t.split_once('=') {
                    Some((upstream, model)) => json!({"upstream": upstream, "model": model}),
                    None => json!({"upstream": t}),
                })
                .collect();
            let mut body = json!({"targets": targets});
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            if let Some(p) = prefix {
                body["prefix"] = json!(p);
            }
            (
                "PUT",
                format!("{}/routes/{name}", env_path(&tenant, &env)),
                Some(body),
            )
        }
        Cmd::RouteList { tenant, env } => {
            ("GET", format!("{}/routes", env_path(&tenant, &env)), None)
        }
        Cmd::RouteDelete { tenant, env, name } => (
            "DELETE",
            format!("{}/routes/{name}", env_path(&tenant, &env)),
            None,
        ),
        Cmd::PolicyPut {
            tenant,
            env,
            zero_retention,
            region,
            hipaa,
        } => (
            "PUT",
            format!("{}/policy", env_path(&tenant, &env)),
            Some(json!({"zero_retention": zero_retention, "region": region, "hipaa": hipaa})),
        ),
        Cmd::PolicyGet { tenant, env } => {
            ("GET", format!("{}/policy", env_path(&tenant, &env)), None)
        }
        Cmd::Compact { keep } => (
            "POST",
            "/v1/admin/compact".into(),
            Some(json!({"keep": keep})),
        ),
    };
    let url = format!("{}{path}", cli.url.trim_end_matches('/'));
    let req = ureq::request(method, &url).set("authorization", &format!("Bearer {token}"));
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match resp {
        Ok(r) => {
            let v: Value = r.into_json()?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            anyhow::bail!(
                "{code}: {}",
                v["error"]["message"].as_str().unwrap_or("error")
            )
        }
        Err(ureq::Error::Transport(t)) => anyhow::bail!(
            "cannot reach the control plane ({t}); is `controlplane serve` running there? pass --url or set AIGW_CONTROLPLANE_URL"
        ),
    }
}

/// The API path of a tenant's environment.
fn env_path(tenant: &str, env: &str) -> String {
    format!("/v1/tenants/{tenant}/environments/{env}")
}

fn unreachable_serve() -> ! {
    // `serve` returned above.
    std::process::exit(2)
}
