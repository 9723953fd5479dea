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
    Serve {
        #[arg(long, default_value = "./aigw-data")]
        data_dir: PathBuf,
        /// Admin REST API.
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: SocketAddr,
        /// The TLS link data-plane nodes connect to.
        #[arg(long, default_value = "127.0.0.1:9443")]
        link_listen: SocketAddr,
        /// Extra DNS names or addresses for the generated link certificate.
        #[arg(long)]
        tls_name: Vec<String>,
    },
    /// Nodes and the revision each has applied.
    Nodes,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Serve {
        data_dir,
        listen,
        link_listen,
        tls_name,
    } = cli.cmd
    {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_ansi(false)
            .init();
        let running = controlplane::start(controlplane::Options {
            data_dir,
            api_listen: listen,
            push_listen: link_listen,
            tls_names: tls_name,
        })?;
        println!(
            "control plane: admin API http://{}, node link {} (CA {}); tokens in the data directory",
            running.addr,
            running.push_addr,
            running.ca_file.display()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok::<_, std::io::Error>(())
        })?;
        running.stop();
        return Ok(());
    }
    let token = cli
        .token
        .ok_or_else(|| anyhow::anyhow!("--token or AIGW_ADMIN_TOKEN is required"))?;
    let (method, path, body): (&str, String, Option<Value>) = match cli.cmd {
        Cmd::Serve { .. } => unreachable_serve(),
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
        Err(e) => Err(e.into()),
    }
}

fn unreachable_serve() -> ! {
    // `serve` returned above.
    std::process::exit(2)
}
