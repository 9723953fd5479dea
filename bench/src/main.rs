//! The load harness (`aigw-bench`):
//!
//! - `run`: requests per second and CPU per request through nginx and the data plane,
//!   with wrk (below);
//! - `stream`: server-sent event streams through both, CPU per event, memory per open
//!   stream, time to first byte, and stalled readers (see `stream_bench.rs`);
//! - `stream-mock`: the streaming provider `stream` runs (see `sse_mock.rs`); `mock`: the
//!   data plane's demo provider, which `run` uses;
//! - `revocation` and `snapshot`: key propagation against a real control plane
//!   (`keys_bench.rs`);
//! - `controls`: the CPU per request metering, spend caps and rate limits add to the data
//!   plane, against a real control plane (`controls_bench.rs`);
//! - `tls`: client TLS against nginx's, handshakes and keep-alive requests
//!   (`tls_bench.rs`).
//!
//! `run` measures the provider directly, nginx `proxy_pass` (one worker, upstream
//! keepalive) and the data plane (one worker), with the same mock provider and the same
//! load generator (wrk), interleaved over several rounds.
//!
//! On two cores the load generator saturates its core first, so requests per second stop
//! telling proxies apart; the CPU time each proxy process spends per request still does.
//! The proxy under test gets one core to itself (`taskset`); wrk and the mock provider share
//! the other.
//!
//! ```sh
//! cargo build --release -p dataplane -p bench
//! target/release/aigw-bench run
//! ```
//!
//! The defaults (12 rounds of 4 s per target) favour many short rounds over few long ones:
//! this kind of shared machine drifts between faster and slower phases lasting tens of
//! seconds, and with five rounds a phase that caught three runs of one proxy moved its
//! median by a fifth.
//!
//! `--baseline-dataplane PATH` adds another data plane binary, with the same configuration,
//! as one more interleaved target, and reports the ratio of the two builds' CPU per request
//! (of the medians, and within each round), so a change can be measured against the build
//! before it in one run.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

mod attribute;
mod controls_bench;
mod harness;
mod keys_bench;
mod netio;
mod sse_client;
mod sse_mock;
mod stream_bench;
mod tls_bench;
mod wrk_run;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "aigw-bench", about = "aigateway load harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the mock provider (the data plane's demo provider) on one thread.
    Mock {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// SSE streams through nginx and the data plane: CPU per event, memory per stream, time
    /// to first byte; optionally stalled readers.
    Stream(stream_bench::StreamOpts),
    /// Serve the streaming mock provider (SSE chat completions, paced) on one thread.
    StreamMock(sse_mock::MockOpts),
    /// Revocation propagation: from the admin call's return to a 401 from every worker
    /// (and to every worker showing the revision), over many revocations with a large key
    /// table loaded.
    Revocation {
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        #[arg(long, default_value_t = 1000)]
        revocations: usize,
    },
    /// Full snapshot: time for a fresh node to apply it and the node's peak memory.
    Snapshot {
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
    },
    /// Run the comparison and print a report.
    Run(wrk_run::RunOpts),
    /// CPU per request of the data plane with a plain metered key, with a key under a spend
    /// cap and rate limits, and with no keys (static configuration), interleaved.
    Controls(controls_bench::ControlsOpts),
    /// Client TLS against nginx's: handshakes per second and CPU per handshake, CPU per
    /// request over keep-alive TLS (same certificate, TLS 1.3, X25519, no resumption).
    Tls(tls_bench::TlsOpts),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Mock { listen } => {
            dataplane::node::run_demo_provider(listen, dataplane::config::DriverChoice::Auto)
        }
        Cmd::Stream(opts) => stream_bench::stream(&opts),
        Cmd::StreamMock(opts) => sse_mock::serve(&opts),
        Cmd::Revocation { keys, revocations } => keys_bench::revocation(keys, revocations),
        Cmd::Snapshot { keys } => keys_bench::snapshot(keys),
        Cmd::Run(opts) => wrk_run::run(&opts),
        Cmd::Controls(opts) => controls_bench::controls(&opts),
        Cmd::Tls(opts) => tls_bench::tls(&opts),
    }
}
