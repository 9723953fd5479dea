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
//! figure is the RSS growth per stalled stream: the peak VmRSS over the stall minus VmRSS
//! before, divided by N. A proxy that relays with backpressure holds a bounded amount per
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

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::harness::{
    core_busy_seconds, cpu_seconds, free_addr, kernel_thread, median, percentile,
    pin_current_thread, process_cpu_seconds, raise_nofile_limit, round_order, rss_kib, run_dir,
    sibling_binary, spawn_self_on, spread, start_dataplane, start_nginx, wait_port, write_ratio,
    DataPlane, Proc,
};
use crate::sse_client::{Counters, Load, LoadReport, LoadSpec, Mode};
use crate::sse_mock::ECHO_MODEL_PREFIX;

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

/// The counters and CPU times at one edge of a measurement window.
#[derive(Debug, Clone, Copy)]
struct Snap {
    at: Instant,
    events: u64,
    streams_ok: u64,
    errors: u64,
    proxy_cpu: Option<f64>,
    /// The kernel's softirq thread on the proxy core.
    softirqd_cpu: f64,
    mock_cpu: f64,
    /// The load side: this process (the client), the mock provider and the kernel's softirq
    /// thread on the load core.
    load_cpu: f64,
    /// Busy time of the two cores, whoever used it.
    proxy_core: f64,
    load_core: f64,
}

impl Snap {
    fn take(
        c: &Counters,
        opts: &StreamOpts,
        proxy: Option<u32>,
        softirqd: [Option<u32>; 2],
        mock: u32,
    ) -> anyhow::Result<Self> {
        let thread_cpu = |pid: Option<u32>| -> anyhow::Result<f64> {
            Ok(pid.map(cpu_seconds).transpose()?.unwrap_or(0.0))
        };
        let mock_cpu = cpu_seconds(mock)?;
        Ok(Self {
            at: Instant::now(),
            events: c.events.load(Ordering::Relaxed),
            streams_ok: c.streams_ok.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            proxy_cpu: proxy.map(cpu_seconds).transpose()?,
            softirqd_cpu: thread_cpu(softirqd[0])?,
            mock_cpu,
            load_cpu: process_cpu_seconds(std::process::id())?
                + mock_cpu
                + thread_cpu(softirqd[1])?,
            proxy_core: core_busy_seconds(opts.proxy_core)?,
            load_core: core_busy_seconds(opts.load_core)?,
        })
    }
}

/// One target's figures in one round of the streaming scenario.
#[derive(Debug, Clone)]
struct StreamSample {
    events: u64,
    events_per_s: f64,
    cpu_us_per_event: Option<f64>,
    kib_per_stream: Option<f64>,
    rss_before_kib: Option<u64>,
    rss_loaded_kib: Option<f64>,
    open_mean: f64,
    ttfb_p50_us: f64,
    ttfb_p99_us: f64,
    ttfb_count: usize,
    streams_ok: u64,
    errors: u64,
    /// The proxy process's CPU time over the window, as a share of it.
    proxy_share: Option<f64>,
    /// The same for the kernel's softirq thread on the proxy core.
    softirqd_share: f64,
    /// The proxy process's own CPU per event, without the softirq thread's.
    process_us_per_event: Option<f64>,
    /// The busy time of the proxy's core over the window (the proxy's and anyone else's),
    /// as a share of it.
    proxy_core_busy: f64,
    /// The same for the load core.
    load_core_busy: f64,
    /// The load side's CPU time over the window (client, mock provider, softirq thread on
    /// the load core), as a share of it.
    load_share: f64,
    mock_cpu_us_per_event: f64,
    /// Other processes used the proxy core during the window, in every attempt.
    disturbed: bool,
}

impl StreamSample {
    /// The larger share of a core that processes other than the proxy (on its core) or the
    /// load side (on the load core) used in the window. The provider directly leaves the
    /// proxy core idle: whoever used it then did not disturb.
    fn others(&self) -> f64 {
        let load = self.load_core_busy - self.load_share;
        match self.proxy_share {
            Some(p) => load.max(self.proxy_core_busy - p - self.softirqd_share),
            None => load,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "events": self.events,
            "events_per_s": self.events_per_s,
            "proxy_cpu_us_per_event": self.cpu_us_per_event,
            "kib_per_stream": self.kib_per_stream,
            "rss_before_kib": self.rss_before_kib,
            "rss_loaded_kib": self.rss_loaded_kib,
            "open_streams_mean": self.open_mean,
            "ttfb_p50_us": self.ttfb_p50_us,
            "ttfb_p99_us": self.ttfb_p99_us,
            "ttfb_count": self.ttfb_count,
            "streams_ok": self.streams_ok,
            "errors": self.errors,
            "proxy_share": self.proxy_share,
            "softirqd_share": self.softirqd_share,
            "proxy_process_cpu_us_per_event": self.process_us_per_event,
            "proxy_core_busy": self.proxy_core_busy,
            "load_core_busy": self.load_core_busy,
            "load_share": self.load_share,
            "mock_cpu_us_per_event": self.mock_cpu_us_per_event,
            "disturbed": self.disturbed,
        })
    }
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

fn measure_stream(
    opts: &StreamOpts,
    name: &str,
    run: &Running,
    request: &Arc<Vec<u8>>,
) -> anyhow::Result<(StreamSample, LoadReport)> {
    let (proxy, mock) = (run.proxy_pid(), run.mock.id());
    wait_quiet(opts)?;
    let rss_before = proxy.map(rss_kib).transpose()?;
    let load = Load::start(
        LoadSpec {
            target: run.addr,
            connections: opts.streams,
            request: request.clone(),
            ramp: opts.stream_len(),
            mode: Mode::Stream,
            read_timeout: Duration::from_secs(60).max(opts.interval() * 4),
            error_pause: Duration::from_millis(100),
            stop_grace: opts.stream_len() + Duration::from_secs(5),
        },
        opts.load_core,
    )?;
    let c = load.counters.clone();
    let want = opts.streams as u64;
    if !wait_for(
        Instant::now() + opts.stream_len() + Duration::from_secs(15),
        || c.responses.load(Ordering::Relaxed) >= want,
    ) {
        eprintln!(
            "  {name}: only {} of {want} connections had a response before the window",
            c.responses.load(Ordering::Relaxed)
        );
    }
    let softirqd =
        [opts.proxy_core, opts.load_core].map(|c| kernel_thread(&format!("ksoftirqd/{c}")));
    let start = Snap::take(&c, opts, proxy, softirqd, mock)?;
    let end_at = start.at + Duration::from_secs(opts.duration);
    let (mut rss, mut open) = (Vec::new(), Vec::new());
    loop {
        let now = Instant::now();
        if now >= end_at {
            break;
        }
        std::thread::sleep((end_at - now).min(Duration::from_millis(250)));
        if let Some(pid) = proxy {
            rss.push(rss_kib(pid)? as f64);
        }
        open.push(c.open.load(Ordering::Relaxed) as f64);
    }
    let end = Snap::take(&c, opts, proxy, softirqd, mock)?;
    let report = load.stop()?;

    let secs = (end.at - start.at).as_secs_f64();
    let events = end.events - start.events;
    let per_event = |a: f64, b: f64| (events > 0).then(|| (b - a) * 1e6 / events as f64);
    let rss_loaded = (!rss.is_empty()).then(|| median(&mut rss));
    let mut ttfb: Vec<f64> = report
        .ttfb
        .iter()
        .filter(|x| x.sent >= start.at && x.sent <= end.at)
        .map(|x| x.ttfb.as_secs_f64() * 1e6)
        .collect();
    ttfb.sort_by(f64::total_cmp);
    let sample = StreamSample {
        events,
        events_per_s: events as f64 / secs,
        cpu_us_per_event: start
            .proxy_cpu
            .zip(end.proxy_cpu)
            .and_then(|(a, b)| per_event(a + start.softirqd_cpu, b + end.softirqd_cpu)),
        process_us_per_event: start
            .proxy_cpu
            .zip(end.proxy_cpu)
            .and_then(|(a, b)| per_event(a, b)),
        kib_per_stream: rss_before
            .zip(rss_loaded)
            .map(|(b, l)| (l - b as f64) / opts.streams as f64),
        rss_before_kib: rss_before,
        rss_loaded_kib: rss_loaded,
        open_mean: open.iter().sum::<f64>() / open.len().max(1) as f64,
        ttfb_p50_us: percentile(&ttfb, 0.50),
        ttfb_p99_us: percentile(&ttfb, 0.99),
        ttfb_count: ttfb.len(),
        streams_ok: end.streams_ok - start.streams_ok,
        errors: end.errors - start.errors,
        proxy_share: start
            .proxy_cpu
            .zip(end.proxy_cpu)
            .map(|(a, b)| (b - a) / secs),
        softirqd_share: (end.softirqd_cpu - start.softirqd_cpu) / secs,
        proxy_core_busy: (end.proxy_core - start.proxy_core) / secs,
        load_core_busy: (end.load_core - start.load_core) / secs,
        load_share: (end.load_cpu - start.load_cpu) / secs,
        mock_cpu_us_per_event: per_event(start.mock_cpu, end.mock_cpu).unwrap_or(0.0),
        disturbed: false,
    };
    Ok((sample, report))
}

fn print_errors(name: &str, report: &LoadReport) {
    for e in &report.error_samples {
        let one_line: String = e.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        eprintln!("    {name} error: {one_line}");
    }
}

/// A share of the proxy core used by other processes above which a round says so.
const OTHERS_NOTED: f64 = 0.05;

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

fn run_stream_rounds(
    opts: &StreamOpts,
    dir: &Path,
    targets: &[Target],
) -> anyhow::Result<Vec<Vec<StreamSample>>> {
    let request = Arc::new(chat_request(
        "bench-model",
        &prose(850),
        !opts.no_usage,
        false,
    ));
    let stream_len = opts.stream_len().as_secs_f64();
    eprintln!(
        "aigw-bench stream: {} rounds × {} targets × {}s; {} streams of {} events {} ms apart \
         (request {} bytes; expected ≈ {:.0} events/s); proxy on core {}, client + mock on core {}",
        opts.rounds,
        targets.len(),
        opts.duration,
        opts.streams,
        opts.events_per_stream(),
        opts.interval_ms,
        request.len(),
        (opts.streams * opts.events_per_stream()) as f64 / stream_len,
        opts.proxy_core,
        opts.load_core
    );
    let mut samples = vec![Vec::new(); targets.len()];
    for round in 0..opts.rounds {
        for i in round_order(round, targets.len()) {
            samples[i].push(stream_round(opts, dir, &targets[i], round, &request)?);
        }
    }
    Ok(samples)
}

/// One target's measurement in one round, taken again (up to `--retries` times) when
/// other processes used the proxy core during it.
fn stream_round(
    opts: &StreamOpts,
    dir: &Path,
    t: &Target,
    round: usize,
    request: &Arc<Vec<u8>>,
) -> anyhow::Result<StreamSample> {
    let mut repeats = 0;
    loop {
        let run = launch(opts, dir, t)?;
        let (mut s, report) = measure_stream(opts, &t.name, &run, request)?;
        drop(run);
        eprintln!(
            "round {} {:>9}: {:>8.0} events/s  CPU/event {}µs  {} KiB/stream  TTFB p50 {:.0}µs p99 {:.0}µs  ok {} errors {}  open {:.0}  proxy core {:.0}% (proxy {}%, softirq thread {:.0}%)  load core {:.0}%",
            round + 1,
            t.name,
            s.events_per_s,
            opt_fmt(s.cpu_us_per_event, 2),
            opt_fmt(s.kib_per_stream, 1),
            s.ttfb_p50_us,
            s.ttfb_p99_us,
            s.streams_ok,
            s.errors,
            s.open_mean,
            s.proxy_core_busy * 100.0,
            opt_fmt(s.proxy_share.map(|b| b * 100.0), 0),
            s.softirqd_share * 100.0,
            s.load_core_busy * 100.0
        );
        print_errors(&t.name, &report);
        let others = s.others();
        if others <= OTHERS_NOTED {
            return Ok(s);
        }
        if repeats >= opts.retries {
            eprintln!(
                "    note: other processes used {:.0}% of a core in this window (kept)",
                others * 100.0
            );
            s.disturbed = true;
            return Ok(s);
        }
        eprintln!(
            "    other processes used {:.0}% of a core in this window: measuring again",
            others * 100.0
        );
        repeats += 1;
    }
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

fn stream_report(opts: &StreamOpts, targets: &[Target], samples: &[Vec<StreamSample>]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "{} streams × {} events, {} ms apart; medians [min–max] over {} rounds of {}s\n",
        opts.streams,
        opts.events_per_stream(),
        opts.interval_ms,
        opts.rounds,
        opts.duration
    );
    let _ = writeln!(
        r,
        "| target | events/s | CPU µs/event | KiB/stream | TTFB p50 µs | TTFB p99 µs | TTFB over direct p50 / p99 µs | streams ok | errors | proxy core busy: proxy / all | load core busy |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|");
    let med = |s: &[StreamSample], f: fn(&StreamSample) -> f64| {
        median(&mut s.iter().map(f).collect::<Vec<_>>())
    };
    let direct_p50 = med(&samples[0], |x| x.ttfb_p50_us);
    let direct_p99 = med(&samples[0], |x| x.ttfb_p99_us);
    for (t, s) in targets.iter().zip(samples) {
        let rate = cell(s.iter().map(|x| x.events_per_s), 0);
        let cpu = cell(s.iter().filter_map(|x| x.cpu_us_per_event), 2);
        let mem = cell(s.iter().filter_map(|x| x.kib_per_stream), 1);
        let p50 = med(s, |x| x.ttfb_p50_us);
        let p99 = med(s, |x| x.ttfb_p99_us);
        let over = if !matches!(t.kind, Kind::Direct) {
            format!("{:+.0} / {:+.0}", p50 - direct_p50, p99 - direct_p99)
        } else {
            "–".into()
        };
        let mut proxy_share: Vec<f64> = s
            .iter()
            .filter_map(|x| Some(x.proxy_share? + x.softirqd_share))
            .collect();
        let proxy_share = if proxy_share.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0}%", median(&mut proxy_share) * 100.0)
        };
        let core_busy = med(s, |x| x.proxy_core_busy * 100.0);
        let load_busy = med(s, |x| x.load_core_busy * 100.0);
        let _ = writeln!(
            r,
            "| {} | {rate} | {cpu} | {mem} | {p50:.0} | {p99:.0} | {over} | {} | {} | {proxy_share} / {core_busy:.0}% | {load_busy:.0}% |",
            t.name,
            s.iter().map(|x| x.streams_ok).sum::<u64>(),
            s.iter().map(|x| x.errors).sum::<u64>(),
        );
    }
    let disturbed: usize = samples.iter().flatten().filter(|x| x.disturbed).count();
    if disturbed > 0 {
        let _ = writeln!(
            r,
            "\n{disturbed} measurement(s) kept although other processes used the proxy core during them"
        );
    }
    let figure = |name: &str, f: fn(&StreamSample) -> Option<f64>| -> Vec<Option<f64>> {
        targets
            .iter()
            .position(|t| t.name == name)
            .map(|i| samples[i].iter().map(f).collect())
            .unwrap_or_default()
    };
    let cpu = |n: &str| figure(n, |x| x.cpu_us_per_event);
    let mem = |n: &str| figure(n, |x| x.kib_per_stream);
    write_ratio(
        &mut r,
        "dataplane / nginx CPU per event",
        &cpu("dataplane"),
        &cpu("nginx"),
    );
    write_ratio(
        &mut r,
        "dataplane / nginx memory per stream",
        &mem("dataplane"),
        &mem("nginx"),
    );
    write_ratio(
        &mut r,
        "dataplane / baseline CPU per event",
        &cpu("dataplane"),
        &cpu("baseline"),
    );
    write_ratio(
        &mut r,
        "dataplane / baseline memory per stream",
        &mem("dataplane"),
        &mem("baseline"),
    );
    r
}

/// One target's figures in one round of the stalled-reader scenario.
#[derive(Debug, Clone)]
struct StallSample {
    held: u64,
    errors: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    kib_per_stalled: f64,
}

fn measure_stall(
    opts: &StreamOpts,
    run: &Running,
    request: &Arc<Vec<u8>>,
) -> anyhow::Result<(StallSample, LoadReport)> {
    let pid = run.rss_pid();
    wait_quiet(opts)?;
    let before = rss_kib(pid)?;
    let load = Load::start(
        LoadSpec {
            target: run.addr,
            connections: opts.stalled,
            request: request.clone(),
            ramp: Duration::ZERO,
            mode: Mode::Stall,
            read_timeout: Duration::from_secs(30),
            error_pause: Duration::from_millis(100),
            stop_grace: Duration::from_secs(1),
        },
        opts.load_core,
    )?;
    let c = load.counters.clone();
    let want = opts.stalled as u64;
    wait_for(Instant::now() + Duration::from_secs(60), || {
        c.stalled.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed) >= want
    });
    let held = c.stalled.load(Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(opts.stall_secs);
    let mut peak = rss_kib(pid)?;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(rss_kib(pid)?);
    }
    let errors = c.errors.load(Ordering::Relaxed);
    let report = load.stop()?;
    let sample = StallSample {
        held,
        errors,
        rss_before_kib: before,
        rss_peak_kib: peak,
        kib_per_stalled: (peak as f64 - before as f64) / opts.stalled as f64,
    };
    Ok((sample, report))
}

fn run_stall_rounds(
    opts: &StreamOpts,
    dir: &Path,
    targets: &[Target],
) -> anyhow::Result<Vec<Vec<StallSample>>> {
    let model = format!("{ECHO_MODEL_PREFIX}-model");
    let request = Arc::new(chat_request(
        &model,
        &prose(opts.prompt_bytes),
        !opts.no_usage,
        false,
    ));
    eprintln!(
        "aigw-bench stream: stalled readers: {} rounds × {} targets, {} clients with a {}-byte request, holding {}s",
        opts.rounds,
        targets.len(),
        opts.stalled,
        request.len(),
        opts.stall_secs
    );
    let mut samples = vec![Vec::new(); targets.len()];
    for round in 0..opts.rounds {
        for i in round_order(round, targets.len()) {
            let t = &targets[i];
            let run = launch(opts, dir, t)?;
            let (s, report) = measure_stall(opts, &run, &request)?;
            drop(run);
            eprintln!(
                "round {} {:>9}: {} stalled, {} errors; RSS {} → {} KiB: {:.1} KiB per stalled stream{}",
                round + 1,
                t.name,
                s.held,
                s.errors,
                s.rss_before_kib,
                s.rss_peak_kib,
                s.kib_per_stalled,
                if matches!(t.kind, Kind::Direct) { " (the mock's)" } else { "" }
            );
            print_errors(&t.name, &report);
            samples[i].push(s);
        }
    }
    Ok(samples)
}

fn stall_report(opts: &StreamOpts, targets: &[Target], samples: &[Vec<StallSample>]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "{} stalled readers, {}-byte prompts answered in echo mode, held {}s; medians [min–max] over {} rounds\n",
        opts.stalled, opts.prompt_bytes, opts.stall_secs, opts.rounds
    );
    let _ = writeln!(
        r,
        "| target | RSS growth KiB per stalled stream | streams stalled (median) | errors |"
    );
    let _ = writeln!(r, "|---|---|---|---|");
    for (t, s) in targets.iter().zip(samples) {
        let growth = cell(s.iter().map(|x| x.kib_per_stalled), 1);
        let held = median(&mut s.iter().map(|x| x.held as f64).collect::<Vec<_>>());
        let name = if matches!(t.kind, Kind::Direct) {
            format!("{} (the mock provider's, for reference)", t.name)
        } else {
            t.name.clone()
        };
        let _ = writeln!(
            r,
            "| {name} | {growth} | {held:.0} | {} |",
            s.iter().map(|x| x.errors).sum::<u64>()
        );
    }
    r
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
        let samples = run_stream_rounds(opts, &dir, &targets)?;
        println!("{}", stream_report(opts, &targets, &samples));
        let rows = targets.iter().zip(&samples).map(|(t, s)| {
            let rows: Vec<Value> = s.iter().map(StreamSample::to_json).collect();
            (t.name.clone(), Value::Array(rows))
        });
        out.insert("stream".into(), Value::Object(rows.collect()));
    }
    if opts.stalled > 0 {
        let samples = run_stall_rounds(opts, &dir, &targets)?;
        println!("{}", stall_report(opts, &targets, &samples));
        let rows = targets.iter().zip(&samples).map(|(t, s)| {
            let rows: Vec<Value> = s
                .iter()
                .map(|x| {
                    json!({"held": x.held, "errors": x.errors, "rss_before_kib": x.rss_before_kib,
                           "rss_peak_kib": x.rss_peak_kib, "kib_per_stalled": x.kib_per_stalled})
                })
                .collect();
            (t.name.clone(), Value::Array(rows))
        });
        out.insert("stalled".into(), Value::Object(rows.collect()));
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, Value::Object(out).to_string())?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
