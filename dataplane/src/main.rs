//! The `dataplane` binary: load and validate the config, start the workers, then wait for
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit, a second one exits at once).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use dataplane::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "dataplane", version, about = "aigateway data plane")]
struct Cli {
    /// TOML configuration file. Without one, every setting has its default.
    #[arg(short, long, env = "AIGW_DATAPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Run only the built-in demo provider on this address (a stand-in for OpenAI and
    /// Anthropic that echoes the last message): an upstream for trying keys and routes
    /// without a provider account. No gateway runs.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["config", "check"])]
    demo_provider: Option<std::net::SocketAddr>,
    /// Replace the seal key with the one in this secret file (64 hex digits, mode 0600):
    /// only the keyring beside the sealed snapshot is rewritten, a running node keeps
    /// running, and the node must then start with the new key. Exits when done.
    #[arg(
        long,
        value_name = "PATH",
        requires = "config",
        conflicts_with = "check"
    )]
    rotate_seal_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    Ok(match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(listen) = cli.demo_provider {
        let _log_guard = init_logging("info");
        tracing::info!(%listen, "serving the demo provider only");
        return dataplane::node::run_demo_provider(listen, dataplane::config::DriverChoice::Epoll);
    }
    let config = load(&cli)?;
    if let Some(new) = &cli.rotate_seal_key {
        let cp = config
            .control_plane
            .as_ref()
            .context("--rotate-seal-key: the configuration has no [control_plane]")?;
        let new = dataplane::seal::files::read_private(new)
            .map_err(|e| anyhow::anyhow!("--rotate-seal-key: {e}"))
            .and_then(|t| {
                dataplane::seal::Kek::from_hex(&t)
                    .map_err(|e| anyhow::anyhow!("--rotate-seal-key: {e}"))
            })?;
        let ring = cp
            .rotate_seal_key(&new)
            .map_err(|e| anyhow::anyhow!("--rotate-seal-key: {e}"))?;
        println!(
            "{} opens with the new seal key only: start the node with it ({})",
            ring.display(),
            cp.seal_key_source()
        );
        return Ok(());
    }
    if cli.check {
        println!("configuration ok");
        return Ok(());
    }
    let _log_guard = init_logging(&config.log.level);
    // Register before starting so a signal that arrives during start is not lost.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let server = dataplane::node::start(config)?;
    for signal in signals.forever() {
        match signal {
            SIGHUP => match load(&cli) {
                Ok(new) => {
                    if let Err(e) = server.reload(new) {
                        tracing::error!(error = %e, "reload refused; keeping the running configuration");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; keeping the running configuration")
                }
            },
            _ => break,
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("dataplane: second signal, exiting without waiting for the drain");
            std::process::exit(130);
        }
    });
    server.shutdown();
    handle.close();
    tracing::info!("stopped");
    Ok(())
}

/// Logs go to stderr through a background writer so a slow terminal or pipe never blocks a
/// worker. `RUST_LOG` overrides `log.level`.
fn init_logging(level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true)
        .with_ansi(false)
        .init();
    guard
}
