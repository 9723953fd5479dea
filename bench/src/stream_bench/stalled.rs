//! The stalled-reader scenario: clients that stop reading a large echoed stream, and the
//! memory each leaves the proxy holding (see the parent module).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    cell, chat_request, launch, print_errors, prose, wait_for, wait_quiet, Kind, Running,
    StreamOpts, Target,
};
use crate::harness::{median, round_order, rss_kib};
use crate::sse_client::{Load, LoadReport, LoadSpec, Mode};
use crate::sse_mock::ECHO_MODEL_PREFIX;

/// Runs the rounds; the report as Markdown and the raw figures as JSON.
pub(super) fn run(
    opts: &StreamOpts,
    dir: &Path,
    targets: &[Target],
) -> anyhow::Result<(String, Value)> {
    let samples = run_rounds(opts, dir, targets)?;
    let rows = targets.iter().zip(&samples).map(|(t, s)| {
        let rows: Vec<Value> = s
            .iter()
            .map(|x| {
                json!({"held": x.held, "errors": x.errors, "rss_before_kib": x.rss_before_kib,
                       "rss_peak_kib": x.rss_peak_kib, "kib_per_stalled": x.kib_per_stalled,
                       "rss_end_kib": x.rss_end_kib, "kib_per_stalled_end": x.kib_per_stalled_end})
            })
            .collect();
        (t.name.clone(), Value::Array(rows))
    });
    Ok((
        report(opts, targets, &samples),
        Value::Object(rows.collect()),
    ))
}

/// One target's figures in one round of the stalled-reader scenario.
#[derive(Debug, Clone)]
struct StallSample {
    held: u64,
    errors: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    kib_per_stalled: f64,
    /// At the end of the stall, once what the streams' start needed was given back: what
    /// the stalled streams themselves hold.
    rss_end_kib: u64,
    kib_per_stalled_end: f64,
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
    let mut last = peak;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        last = rss_kib(pid)?;
        peak = peak.max(last);
    }
    let errors = c.errors.load(Ordering::Relaxed);
    let report = load.stop()?;
    let sample = StallSample {
        held,
        errors,
        rss_before_kib: before,
        rss_peak_kib: peak,
        kib_per_stalled: (peak as f64 - before as f64) / opts.stalled as f64,
        rss_end_kib: last,
        kib_per_stalled_end: (last as f64 - before as f64) / opts.stalled as f64,
    };
    Ok((sample, report))
}

fn run_rounds(
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
                "round {} {:>9}: {} stalled, {} errors; RSS {} → {} KiB peak, {} KiB at the end: {:.1} / {:.1} KiB per stalled stream{}",
                round + 1,
                t.name,
                s.held,
                s.errors,
                s.rss_before_kib,
                s.rss_peak_kib,
                s.rss_end_kib,
                s.kib_per_stalled,
                s.kib_per_stalled_end,
                if matches!(t.kind, Kind::Direct) { " (the mock's)" } else { "" }
            );
            print_errors(&t.name, &report);
            samples[i].push(s);
        }
    }
    Ok(samples)
}

fn report(opts: &StreamOpts, targets: &[Target], samples: &[Vec<StallSample>]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "{} stalled readers, {}-byte prompts answered in echo mode, held {}s; medians [min–max] over {} rounds\n",
        opts.stalled, opts.prompt_bytes, opts.stall_secs, opts.rounds
    );
    let _ = writeln!(
        r,
        "| target | RSS growth KiB per stalled stream: peak | at the end of the stall | streams stalled (median) | errors |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|");
    for (t, s) in targets.iter().zip(samples) {
        let growth = cell(s.iter().map(|x| x.kib_per_stalled), 1);
        let end = cell(s.iter().map(|x| x.kib_per_stalled_end), 1);
        let held = median(&mut s.iter().map(|x| x.held as f64).collect::<Vec<_>>());
        let name = if matches!(t.kind, Kind::Direct) {
            format!("{} (the mock provider's, for reference)", t.name)
        } else {
            t.name.clone()
        };
        let _ = writeln!(
            r,
            "| {name} | {growth} | {end} | {held:.0} | {} |",
            s.iter().map(|x| x.errors).sum::<u64>()
        );
    }
    r
}
