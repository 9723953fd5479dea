//! `aigw-bench stream`: server-sent event streams through nginx (`proxy_buffering off`) and
//! the data plane, against the provider directly as the baseline.
//!
//! Chat completions are streams above all: a client holds its connection for seconds
//! while a model produces a few hundred small events. What a proxy costs there is not
//! requests per second but CPU time per relayed event and memory per open stream, and both
//! decide how many concurrent streams a core can carry. The harness measures:
//!
//! - **events/s** delivered to the clients, and **CPU µs per event** of the proxy: user +
//!   system time from `/proc/<pid>/stat` over the measurement window, of the proxy process
//!   and of the kernel's softirq thread on its core (`ksoftirqd/N`: network work the kernel
//!   defers there is the proxy's traffic; the per-round lines show its share), divided by
//!   the `data:` events the clients received in the window, `[DONE]` included;
//! - **KiB per open stream**: the proxy's VmRSS sampled through the window (all streams
//!   open; the median of the samples) minus its VmRSS just before the load started,
//!   divided by the number of streams. Resident memory, not bytes allocated: a heap backed
//!   by transparent huge pages (mimalloc's, in the data plane) grows in 2 MiB steps, so
//!   with few streams the figure moves in steps of 2 MiB divided by their number
//!   (`--dp-env MIMALLOC_ALLOW_THP=0` shows the data plane without them);
//! - **time to first byte** (from the request's last byte written to the first byte of the
//!   response body), p50 and p99 over the streams started in the window, and how much the
//!   proxy adds to the direct figure;
//! - **errors**: any status but 200, a reset, a stream cut short or without `[DONE]`; the
//!   first few are printed with their status and body;
//! - **proxy core busy**: the proxy's CPU time (softirq thread included) over the window as
//!   a share of it, and the busy time of its core (`/proc/stat`, whoever used it). Near
//!   100% the proxy is saturated: events queue up, are read and written several at a time
//!   (so CPU per event drops) and first bytes wait;
//! - **load core busy**: the busy time of the core the client and the mock provider share.
//!   Near 100% the load side, not the proxy, sets the pace; the `direct` row shows what the
//!   load side alone costs.
//!
//! On a shared machine other processes land on the cores. Each measurement first waits,
//! `--quiet-wait` seconds at most, for both cores to be quiet; one during which other
//! processes used more than 5% of a core (its busy time in `/proc/stat` beyond what the
//! proxy, respectively the client, the mock and the softirq thread, used) is taken again,
//! up to `--retries` times, and one kept anyway is counted under the report.
//!
//! Layout as in `aigw-bench run`: the proxy under test alone on `--proxy-core` (nginx with
//! one worker, `bench/nginx-stream.conf.in`; the data plane with one worker and its default
//! upstream settings unless `--dp-max-connections` is given); the mock provider
//! (`aigw-bench stream-mock`) and the client (a thread of this process, one monoio runtime
//! for all connections) on `--load-core`. Targets are interleaved over rounds. Every
//! measurement starts a fresh mock provider and a fresh proxy (memory freed in one round
//! and kept by an allocator would otherwise hide what the next round needs), checks with
//! one whole stream that the proxy relays it (which also makes the first-use allocations
//! before the memory baseline is read), ramps the streams up over one stream's length (so
//! their events are spread in time), waits until every connection has had a response,
//! measures for `--duration` seconds, then lets the streams in flight end. Medians and
//! spreads over rounds are reported, with the data plane / nginx ratios both of the
//! medians and within each round.
//!
//! The stalled-reader scenario (`--stalled N`): N clients each send a large prompt
//! (`--prompt-bytes`, 400 KB by default) to a model the mock answers in echo mode (the
//! prompt back, 64 bytes per event, unpaced: about 6,000 events), read the response head
//! and the first bytes, then stop reading with the connection open for `--stall-secs`. The
//! figures are the RSS growth per stalled stream: the peak VmRSS over the stall minus VmRSS
//! before, divided by N, and the same at the end of the stall (memory the streams' start
//! needed, such as the prompts on their way upstream, given back: what the stalled streams
//! themselves hold). A proxy that relays with backpressure holds a bounded amount per
//! stream; one that buffers what the provider sends grows with the response. For `direct`
//! the figure is the mock provider's own (which keeps the request while it answers), for
//! reference only.
//!
//! ```sh
//! cargo build --release -p dataplane -p bench
//! target/release/aigw-bench stream                       # 2000 streams, 100 events 20 ms apart
//! target/release/aigw-bench stream --dp-max-connections 4096
//! target/release/aigw-bench stream --streams 0 --stalled 200   # the stalled readers only
//! target/release/aigw-bench stream --baseline-dataplane /path/to/older/dataplane
//! ```

mod stalled;
mod streaming;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::harness::{
    core_busy_seconds, free_addr, median, pin_current_thread, raise_nofile_limit, run_dir,
    sibling_binary, spawn_self_on, spread, start_dataplane, start_nginx, wait_port, DataPlane,
    Proc,
};
use crate::sse_client::LoadReport;

/// Options of `aigw-bench stream`.
#[derive(Debug, clap::Args)]
pub(crate) struct StreamOpts {
    /// Concurrent streams (one client connection each); 0 skips the streaming scenario.
    #[arg(long, default_value_t = 2000)]
    streams: usize,
    /// Content events per stream.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Milliseconds between a stream's events.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds measured per target and round, once every stream is open.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Core the proxy under test runs on.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core the client and the mock provider share.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// The data plane's `max_connections` to the provider (per worker); its default when
    /// not given.
    #[arg(long)]
    dp_max_connections: Option<usize>,
    /// Another data plane binary, measured as one more target ("baseline") with the same
    /// configuration, to compare two builds.
    #[arg(long)]
    baseline_dataplane: Option<PathBuf>,
    /// An environment variable for the data plane processes, `NAME=VALUE` (repeatable): to
    /// compare allocator or I/O driver settings, such as `MIMALLOC_ALLOW_THP=0` or
    /// `MONOIO_FORCE_LEGACY_DRIVER=1`.
    #[arg(long, value_parser = parse_env)]
    dp_env: Vec<(String, String)>,
    /// Requests without `stream_options.include_usage` (no usage chunk, no `"usage":null`).
    #[arg(long)]
    no_usage: bool,
    /// Stalled readers: this many clients send a large prompt in echo mode and stop
    /// reading; 0 skips the scenario.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// Prompt size of the stalled readers' requests.
    #[arg(long, default_value_t = 409_600)]
    prompt_bytes: usize,
    /// Seconds the stalled readers hold their streams.
    #[arg(long, default_value_t = 5)]
    stall_secs: u64,
    /// How many times a measurement is taken again when other processes used more than
    /// 5% of the proxy core during it.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Longest wait, in seconds, for both cores to be quiet before each measurement.
    #[arg(long, default_value_t = 120)]
    quiet_wait: u64,
    /// Also write the raw figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}`: expected NAME=VALUE"))
}

impl StreamOpts {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// How long one stream lasts at the provider.
    fn stream_len(&self) -> Duration {
        self.interval() * (self.events + 1) as u32
    }

    /// `data:` events per stream: role, content, stop, usage if asked, `[DONE]`.
    fn events_per_stream(&self) -> usize {
        self.events + 3 + usize::from(!self.no_usage)
    }
}

/// What a target is: the provider directly, or a proxy in front of it.
#[derive(Debug)]
enum Kind {
    Direct,
    Nginx,
    DataPlane(PathBuf),
}

/// One target the clients connect to.
#[derive(Debug)]
struct Target {
    name: String,
    kind: Kind,
}

fn targets(opts: &StreamOpts) -> anyhow::Result<Vec<Target>> {
    let mut t = vec![
        Target {
            name: "direct".into(),
            kind: Kind::Direct,
        },
        Target {
            name: "nginx".into(),
            kind: Kind::Nginx,
        },
        Target {
            name: "dataplane".into(),
            kind: Kind::DataPlane(sibling_binary("dataplane")?),
        },
    ];
    if let Some(b) = &opts.baseline_dataplane {
        t.push(Target {
            name: "baseline".into(),
            kind: Kind::DataPlane(b.clone()),
        });
    }
    Ok(t)
}

/// The processes behind one measurement: a fresh mock provider and, unless the target is
/// the provider itself, a fresh proxy in front of it. Every measurement starts its own, so
/// memory one round freed (and an allocator kept) does not hide what the next one needs.
#[derive(Debug)]
struct Running {
    /// Stopped before the mock provider.
    proxy: Option<Proc>,
    mock: Proc,
    /// Where the clients connect.
    addr: SocketAddr,
}

impl Running {
    fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(Proc::id)
    }

    /// Whose memory the stalled-reader scenario reports: the proxy, or for `direct` the
    /// mock provider.
    fn rss_pid(&self) -> u32 {
        self.proxy_pid().unwrap_or_else(|| self.mock.id())
    }
}

/// Starts the target's processes and checks, with one whole stream, that they relay.
fn launch(opts: &StreamOpts, dir: &Path, t: &Target) -> anyhow::Result<Running> {
    let mock_addr = free_addr()?;
    let mock = spawn_self_on(
        opts.load_core,
        &[
            "stream-mock",
            "--listen",
            &mock_addr.to_string(),
            "--events",
            &opts.events.to_string(),
            "--interval-ms",
            &opts.interval_ms.to_string(),
        ],
    )?;
    wait_port(mock_addr)?;
    let (proxy, addr) = match &t.kind {
        Kind::Direct => (None, mock_addr),
        Kind::Nginx => {
            let addr = free_addr()?;
            // Each stream is a client and an upstream connection, plus idle upstream ones.
            let conns = 3 * (opts.streams + opts.stalled) + 64;
            let p = start_nginx(
                "nginx-stream.conf.in",
                opts.proxy_core,
                dir,
                addr,
                mock_addr,
                &[
                    ("@WORKER_CONNECTIONS@", conns.to_string()),
                    (
                        "@KEEPALIVE@",
                        (opts.streams + opts.stalled + 64).to_string(),
                    ),
                ],
            )?;
            (Some(p), addr)
        }
        Kind::DataPlane(binary) => {
            let addr = free_addr()?;
            let mut upstream_extra = String::from("stream_options = true\n");
            if let Some(n) = opts.dp_max_connections {
                let _ = writeln!(upstream_extra, "max_connections = {n}");
            }
            let dp = DataPlane {
                name: &t.name,
                binary,
                upstream_extra: &upstream_extra,
                env: &opts.dp_env,
                sections: "",
            };
            let p = start_dataplane(&dp, opts.proxy_core, dir, addr, mock_addr)?;
            (Some(p), addr)
        }
    };
    let running = Running { proxy, mock, addr };
    wait_port(addr).with_context(|| format!("{} did not start", t.name))?;
    probe(&t.name, addr, opts)?;
    Ok(running)
}

/// A streaming chat request as an SDK sends it, head and body.
fn chat_request(model: &str, prompt: &str, include_usage: bool, close: bool) -> Vec<u8> {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt}
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": true,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    let body = body.to_string();
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut out = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nAuthorization: Bearer sk-bench-client-key\r\nUser-Agent: OpenAI/Python 1.54.0\r\n{connection}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// About `bytes` of English text.
fn prose(bytes: usize) -> String {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog. ";
    let mut s = SENTENCE.repeat(bytes / SENTENCE.len() + 1);
    s.truncate(bytes);
    s
}

/// One stream through `addr`, read to its end, to check the target relays streams before
/// loading it.
fn probe(name: &str, addr: SocketAddr, opts: &StreamOpts) -> anyhow::Result<()> {
    let req = chat_request("bench-model", "probe", !opts.no_usage, true);
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(&req)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head_lc = head.to_ascii_lowercase();
    if !head.starts_with("HTTP/1.1 200")
        || !head_lc.contains("text/event-stream")
        || !head_lc.contains("transfer-encoding: chunked")
    {
        bail!("{name} answered the probe wrongly:\n{text}");
    }
    let mut decoder = crate::sse_client::ChunkedDecoder::default();
    let mut sse = crate::sse_client::SseCounter::default();
    decoder
        .decode(body.as_bytes(), |d| sse.feed(d))
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let want = opts.events_per_stream() as u64;
    if !decoder.is_done() || !sse.done || sse.events != want {
        bail!(
            "{name} relayed {} of {want} events (complete: {}, [DONE]: {}):\n{text}",
            sse.events,
            decoder.is_done(),
            sse.done
        );
    }
    Ok(())
}

/// Waits until `done` holds or `deadline` passes; whether it held.
fn wait_for(deadline: Instant, done: impl Fn() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn print_errors(name: &str, report: &LoadReport) {
    for e in &report.error_samples {
        let one_line: String = e.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        eprintln!("    {name} error: {one_line}");
    }
}

/// Busy share under which both cores count as quiet before a measurement.
const QUIET: f64 = 0.10;

/// Waits until both cores have been quiet for half a second: on a shared machine another
/// process's build or test run would otherwise land in the measurement.
fn wait_quiet(opts: &StreamOpts) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(opts.quiet_wait);
    let mut said = false;
    loop {
        let step = Duration::from_millis(500);
        let (p0, l0) = (
            core_busy_seconds(opts.proxy_core)?,
            core_busy_seconds(opts.load_core)?,
        );
        std::thread::sleep(step);
        let p = (core_busy_seconds(opts.proxy_core)? - p0) / step.as_secs_f64();
        let l = (core_busy_seconds(opts.load_core)? - l0) / step.as_secs_f64();
        if p < QUIET && l < QUIET {
            return Ok(());
        }
        if Instant::now() >= give_up {
            eprintln!(
                "    the cores are still busy ({:.0}% / {:.0}%); measuring anyway",
                p * 100.0,
                l * 100.0
            );
            return Ok(());
        }
        if !said {
            eprintln!(
                "    waiting for quiet cores (proxy core {:.0}%, load core {:.0}% busy)",
                p * 100.0,
                l * 100.0
            );
            said = true;
        }
    }
}

fn opt_fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// `median [min–max]` of the figures, `–` without any.
fn cell(values: impl Iterator<Item = f64>, digits: usize) -> String {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return "–".into();
    }
    let (lo, hi) = spread(&v);
    let m = median(&mut v);
    format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
}

pub(crate) fn stream(opts: &StreamOpts) -> anyhow::Result<()> {
    let nofile = raise_nofile_limit()?;
    let needed = (opts.streams.max(opts.stalled) * 3 + 256) as u64;
    if nofile < needed {
        eprintln!("aigw-bench stream: the open-file limit is {nofile}, about {needed} are needed: raise `ulimit -Hn`");
    }
    pin_current_thread(opts.load_core)?;
    let dir = run_dir("stream-")?;
    let targets = targets(opts)?;
    let mut out = serde_json::Map::new();
    if opts.streams > 0 {
        let (report, json) = streaming::run(opts, &dir, &targets)?;
        println!("{report}");
        out.insert("stream".into(), json);
    }
    if opts.stalled > 0 {
        let (report, json) = stalled::run(opts, &dir, &targets)?;
        println!("{report}");
        out.insert("stalled".into(), json);
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, Value::Object(out).to_string())?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
