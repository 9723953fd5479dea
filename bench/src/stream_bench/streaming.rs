//! The streaming scenario: many concurrent streams, CPU per event, memory per stream, time
//! to first byte (see the parent module).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    cell, chat_request, launch, opt_fmt, print_errors, prose, wait_for, wait_quiet, Kind, Running,
    StreamOpts, Target,
};
use crate::harness::{
    core_busy_seconds, cpu_seconds, kernel_thread, median, percentile, process_cpu_seconds,
    round_order, rss_kib, write_ratio,
};
use crate::sse_client::{Counters, Load, LoadReport, LoadSpec, Mode};

/// Runs the rounds; the report as Markdown and the raw figures as JSON.
pub(super) fn run(
    opts: &StreamOpts,
    dir: &Path,
    targets: &[Target],
) -> anyhow::Result<(String, Value)> {
    let samples = run_rounds(opts, dir, targets)?;
    let rows = targets.iter().zip(&samples).map(|(t, s)| {
        let rows: Vec<Value> = s.iter().map(StreamSample::to_json).collect();
        (t.name.clone(), Value::Array(rows))
    });
    Ok((
        report(opts, targets, &samples),
        Value::Object(rows.collect()),
    ))
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

/// The share of a core other processes may use during a measurement before it is taken
/// again.
const MAX_OTHERS: f64 = 0.05;

fn run_rounds(
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
/// other processes used either core during it.
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
        if others <= MAX_OTHERS {
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

fn report(opts: &StreamOpts, targets: &[Target], samples: &[Vec<StreamSample>]) -> String {
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
            "\n{disturbed} measurement(s) kept although other processes used a core during them"
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
