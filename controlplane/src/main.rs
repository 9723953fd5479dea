//! The `controlplane` binary: `serve` runs the control plane; the other subcommands are the
//! operator CLI, a thin client of the same admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "controlplane",
    version,
    about = "aigateway control plane and its operator CLI"
)]
struct Cli {
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
        /// Admin REST API, over TLS 1.3 (HTTPS).
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: SocketAddr,
        /// The admin API's certificate chain (PEM) instead of the one the control plane's CA
        /// issues (`<data-dir>/pki/server.pem`).
        #[arg(long, value_name = "PATH", requires = "api_key_file")]
        api_cert_file: Option<PathBuf>,
        /// The private key (PEM) of --api-cert-file's certificate.
        #[arg(long, value_name = "PATH", requires = "api_cert_file")]
        api_key_file: Option<PathBuf>,
        /// Serve the admin API over plain HTTP instead of TLS: only on a loopback --listen
        /// address (the admin token must not travel in clear off the machine).
        #[arg(long, conflicts_with_all = ["api_cert_file", "api_key_file"])]
        insecure_plain_http: bool,
        /// The TLS link data-plane nodes connect to.
        #[arg(long, default_value = "127.0.0.1:9443")]
        link_listen: SocketAddr,
        /// Extra DNS names or addresses for the generated certificate (the link's and the
        /// admin API's); `localhost` and `127.0.0.1` are always in it.
        #[arg(long)]
        tls_name: Vec<String>,
        /// Changelog entries kept by compaction; a node further behind gets a snapshot.
        #[arg(long, default_value_t = controlplane::DEFAULT_CHANGELOG_KEEP)]
        changelog_keep: u64,
        /// Seconds between checks of each tenant's own KMS key: when one is disabled (or
        /// enabled again), connected nodes drop (or get back) its upstreams within this.
        #[arg(long, default_value_t = controlplane::DEFAULT_KMS_CHECK_EVERY.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
        kms_check_secs: u64,
        /// The seal key from this secret file (yours, mode 0600 or 0400; a systemd
        /// credential, say) instead of AIGW_SEAL_KEY or `<data-dir>/seal.key`.
        #[arg(long, value_name = "PATH")]
        seal_key_file: Option<PathBuf>,
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
    /// Replace the key-encryption key (the seal key): only `<data-dir>/keyring`, which wraps
    /// the key everything is sealed with, is rewritten, and a running control plane keeps
    /// running. With `<data-dir>/seal.key` (the default), that file gets the new key too;
    /// with AIGW_SEAL_KEY or --seal-key-file, start the control plane with the new key.
    SealKeyRotate {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The current seal key's secret file, when it is not AIGW_SEAL_KEY or
        /// `<data-dir>/seal.key`.
        #[arg(long, value_name = "PATH")]
        seal_key_file: Option<PathBuf>,
        /// The new seal key: a secret file (mode 0600) holding 64 hex digits
        /// (`openssl rand -hex 32`).
        #[arg(long, value_name = "PATH")]
        new_key_file: PathBuf,
    },
    #[command(flatten)]
    Client(controlplane::cli::Command),
}

/// The command line: every command but `serve` and `up` (which run a control plane rather
/// than call one) takes the admin API's flags (`--url`, `--token`, `--output`, `--field`).
fn command() -> clap::Command {
    use clap::{Args, CommandFactory};
    let mut cmd = Cli::command();
    let clients: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .filter(|n| n != "serve" && n != "up" && n != "seal-key-rotate" && n != "help")
        .collect();
    for name in clients {
        cmd = cmd.mut_subcommand(name, controlplane::cli::Connection::augment_args);
    }
    cmd
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    let parsed = Cli::from_arg_matches(&matches).and_then(|cli| {
        let conn = match matches.subcommand() {
            Some((name, sub)) if name != "serve" && name != "up" && name != "seal-key-rotate" => {
                Some(controlplane::cli::Connection::from_arg_matches(sub)?)
            }
            _ => None,
        };
        Ok((cli, conn))
    });
    let (cli, conn) = match parsed {
        Ok(v) => v,
        Err(e) => e.exit(),
    };
    match run(cli, conn) {
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

/// Ctrl-C and SIGTERM, caught from its creation on (so a signal that arrives while the
/// banner is printed is not the default action, which would skip the orderly stop).
struct StopSignals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (int, term) = rt.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })?;
        Ok(Self { rt, int, term })
    }

    fn wait(mut self) {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.int.recv() => {}
                _ = self.term.recv() => {}
            }
        });
    }
}

fn run(cli: Cli, conn: Option<controlplane::cli::Connection>) -> anyhow::Result<()> {
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
        let stop = StopSignals::install()?;
        let stack = controlplane::local::up(&controlplane::local::UpOptions {
            data_dir: data_dir.unwrap_or_else(|| controlplane::default_data_dir("local")),
            api_listen: listen,
            link_listen,
            gateway_listen,
            gateway_admin,
            dataplane,
        })?;
        {
            use std::io::Write as _;
            // A reader that went away is no reason to stop the stack.
            let _ = writeln!(std::io::stdout(), "{}", stack.banner());
        }
        stop.wait();
        eprintln!("stopping the local stack");
        drop(stack);
        return Ok(());
    }
    if let Cmd::Serve {
        data_dir,
        listen,
        api_cert_file,
        api_key_file,
        insecure_plain_http,
        link_listen,
        tls_name,
        changelog_keep,
        kms_check_secs,
        seal_key_file,
    } = cli.cmd
    {
        init_logging();
        let stop = StopSignals::install()?;
        let data_dir = data_dir.unwrap_or_else(|| controlplane::default_data_dir("controlplane"));
        let api_tls = match (api_cert_file, api_key_file, insecure_plain_http) {
            (_, _, true) => controlplane::api::transport::ApiTls::InsecurePlainHttp,
            (Some(cert), Some(key), false) => {
                controlplane::api::transport::ApiTls::Files { cert, key }
            }
            _ => controlplane::api::transport::ApiTls::Generated,
        };
        let running = controlplane::start(controlplane::Options {
            data_dir: data_dir.clone(),
            api_listen: listen,
            api_tls,
            push_listen: link_listen,
            tls_names: tls_name,
            seal_key: configured_seal_key(seal_key_file)?,
            changelog_keep,
            kms_check_every: std::time::Duration::from_secs(kms_check_secs),
        })?;
        println!(
            "control plane: admin API {}, node link {} (CA {}); data in {}, the admin token in {}; register a node with node-add",
            running.api_url(),
            running.push_addr,
            running.ca_file.display(),
            data_dir.display(),
            data_dir.join("admin-token").display(),
        );
        stop.wait();
        running.stop();
        return Ok(());
    }
    if let Cmd::SealKeyRotate {
        data_dir,
        seal_key_file,
        new_key_file,
    } = cli.cmd
    {
        let data_dir = data_dir.unwrap_or_else(|| controlplane::default_data_dir("controlplane"));
        let configured = configured_seal_key(seal_key_file)?;
        let new = aigw_seal::files::read_private(&new_key_file)
            .map_err(|e| anyhow::anyhow!("--new-key-file: {e}"))
            .and_then(|t| {
                aigw_seal::Kek::from_hex(&t).map_err(|e| anyhow::anyhow!("--new-key-file: {e}"))
            })?;
        println!(
            "{}",
            controlplane::rotate_seal_key(&data_dir, configured.as_deref(), &new)?
        );
        return Ok(());
    }
    let (Cmd::Client(cmd), Some(conn)) = (cli.cmd, conn) else {
        unreachable_serve()
    };
    controlplane::cli::run(&conn, cmd)
}

/// The seal key given to this process: from `--seal-key-file`, else `AIGW_SEAL_KEY` —
/// never the command line, where every user sees it. `None`: `<data-dir>/seal.key`.
fn configured_seal_key(file: Option<PathBuf>) -> anyhow::Result<Option<String>> {
    Ok(match file {
        Some(f) => Some(
            aigw_seal::files::read_private(&f)
                .map_err(|e| anyhow::anyhow!("--seal-key-file: {e}"))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("AIGW_SEAL_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
    })
}

fn unreachable_serve() -> ! {
    // `serve` returned above.
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    /// Every subcommand's flags are well formed, the admin API's flags added to the client
    /// commands included (clap checks a command only when it is built).
    #[test]
    fn the_command_line_is_well_formed() {
        super::command().debug_assert();
    }
}
