//! `aigw-bench run`: wrk against the provider directly, nginx `proxy_pass` and the data
//! plane, CPU time per request of each proxy (see the crate docs).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::harness::{
    bench_dir, cpu_seconds, cpu_split, free_addr, median, round_order, run_dir, sibling_binary,
    spread, start_dataplane, start_mock, start_nginx, wait_port, write_ratio, DataPlane,
};

/// Options of `aigw-bench run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunOpts {
    #[arg(long, default_value_t = 12)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 4)]
    duration: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Core the proxy under test runs on.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core wrk and the mock provider share.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// Also write the raw figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Another data plane binary, measured as one more target ("baseline") with the same
    /// configuration, to compare two builds in one run.
    #[arg(long)]
    baseline_dataplane: Option<PathBuf>,
}

/// One request with the wrk body, to check a target answers correctly before loading it.
fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    probe_with_key(addr, "sk-bench")
}

/// [`probe`], presenting `key`.
pub(crate) fn probe_with_key(addr: SocketAddr, key: &str) -> anyhow::Result<()> {
    let body = r#"{"model":"bench-model","messages":[{"role":"user","content":"probe"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") || !out.contains("You said: probe") {
        bail!("{addr} answered the probe wrongly: {out}");
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
struct Sample {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    proxy_cpu_us_per_req: Option<f64>,
    /// The user-space part of it.
    proxy_user_us_per_req: Option<f64>,
    mock_cpu_us_per_req: f64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * mult)
}

fn run_wrk(opts: &RunOpts, target: SocketAddr) -> anyhow::Result<(u64, f64, f64, f64)> {
    let script = bench_dir().join("chat.lua");
    wrk(
        opts.load_core,
        opts.connections,
        opts.duration,
        &script,
        target,
    )
}

/// wrk on `load_core` with the Lua `script` against `target`'s chat completions for
/// `duration` seconds: (requests, requests per second, p50 µs, p99 µs). Fails on any
/// non-2xx answer or socket error.
pub(crate) fn wrk(
    load_core: usize,
    connections: usize,
    duration: u64,
    script: &Path,
    target: SocketAddr,
) -> anyhow::Result<(u64, f64, f64, f64)> {
    wrk_url(
        load_core,
        connections,
        duration,
        script,
        &format!("http://{target}/v1/chat/completions"),
    )
}

/// [`wrk`] against `url` (an `https://` one over TLS).
pub(crate) fn wrk_url(
    load_core: usize,
    connections: usize,
    duration: u64,
    script: &Path,
    url: &str,
) -> anyhow::Result<(u64, f64, f64, f64)> {
    let out = Command::new("taskset")
        .args(["-c", &load_core.to_string(), "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration}s"))
        .arg("-s")
        .arg(script)
        .arg("--latency")
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("errors under load against {url}:\n{text}");
    }
    let mut requests = 0;
    let mut rps = 0.0;
    let mut p50 = 0.0;
    let mut p99 = 0.0;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_duration_us(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_duration_us(v).unwrap_or(0.0);
        } else if t.contains(" requests in ") {
            requests = t
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    if requests == 0 {
        bail!("could not read wrk's output:\n{text}");
    }
    Ok((requests, rps, p50, p99))
}

pub(crate) fn run(opts: &RunOpts) -> anyhow::Result<()> {
    let dir = run_dir("")?;
    let nginx_addr = free_addr()?;
    let (mock, mock_addr) = start_mock(opts.load_core)?;
    let nginx = start_nginx(
        "nginx.conf.in",
        opts.proxy_core,
        &dir,
        nginx_addr,
        mock_addr,
        &[],
    )?;
    let dp_binary = sibling_binary("dataplane")?;
    let mut planes = vec![("dataplane", dp_binary)];
    if let Some(b) = &opts.baseline_dataplane {
        planes.push(("baseline", b.clone()));
    }
    let mut targets: Vec<(&str, SocketAddr, Option<u32>)> = vec![
        ("direct", mock_addr, None),
        ("nginx", nginx_addr, Some(nginx.id())),
    ];
    let mut dps = Vec::new();
    for (name, binary) in &planes {
        let addr = free_addr()?;
        let dp = DataPlane {
            name,
            binary,
            upstream_extra: "",
            env: &[],
            sections: "",
        };
        let p = start_dataplane(&dp, opts.proxy_core, &dir, addr, mock_addr)?;
        targets.push((name, addr, Some(p.id())));
        dps.push(p);
    }
    for (_, addr, _) in &targets[1..] {
        wait_port(*addr)?;
    }
    for (_, addr, _) in &targets {
        probe(*addr)?;
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    eprintln!(
        "aigw-bench: {} rounds × {} targets × {}s, {} connections; proxy on core {}, wrk + mock on core {}",
        opts.rounds,
        targets.len(),
        opts.duration,
        opts.connections,
        opts.proxy_core,
        opts.load_core
    );
    for round in 0..opts.rounds {
        // The proxies change places every round, so none always runs right after another
        // (or always first after the direct run).
        for i in round_order(round, targets.len()) {
            let (name, addr, pid) = &targets[i];
            // One read of the proxy's /proc stat on each side of the run: (user, system).
            let proxy_before = pid.map(cpu_split).transpose()?;
            let mock_before = cpu_seconds(mock.id())?;
            let (requests, rps, p50, p99) = run_wrk(opts, *addr)?;
            let proxy_after = pid.map(cpu_split).transpose()?;
            let mock_after = cpu_seconds(mock.id())?;
            let per_req = |a: f64, b: f64| (b - a) * 1e6 / requests as f64;
            let s = Sample {
                requests,
                rps,
                p50_us: p50,
                p99_us: p99,
                proxy_cpu_us_per_req: proxy_before
                    .zip(proxy_after)
                    .map(|(a, b)| per_req(a.0 + a.1, b.0 + b.1)),
                proxy_user_us_per_req: proxy_before
                    .zip(proxy_after)
                    .map(|(a, b)| per_req(a.0, b.0)),
                mock_cpu_us_per_req: per_req(mock_before, mock_after),
            };
            eprintln!(
                "round {} {:>9}: {:>9.0} req/s  p50 {:>7.0}µs  p99 {:>7.0}µs  proxy CPU/req {} (user {})",
                round + 1,
                name,
                s.rps,
                s.p50_us,
                s.p99_us,
                s.proxy_cpu_us_per_req.map_or("-".into(), |v| format!("{v:.1}µs")),
                s.proxy_user_us_per_req.map_or("-".into(), |v| format!("{v:.1}µs"))
            );
            samples[i].push(s);
        }
    }

    println!("{}", report(&targets, &samples));
    if let Some(path) = &opts.json {
        write_json(path, &targets, &samples)?;
    }
    drop(dps);
    drop(nginx);
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn report(targets: &[(&str, SocketAddr, Option<u32>)], samples: &[Vec<Sample>]) -> String {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| target | CPU µs/request (median [min–max]) | req/s (median [min–max]) | p50 µs | p99 µs |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|");
    for (i, (name, _, _)) in targets.iter().enumerate() {
        let s = &samples[i];
        let mut cpu: Vec<f64> = s.iter().filter_map(|x| x.proxy_cpu_us_per_req).collect();
        let mut rps: Vec<f64> = s.iter().map(|x| x.rps).collect();
        let mut p50: Vec<f64> = s.iter().map(|x| x.p50_us).collect();
        let mut p99: Vec<f64> = s.iter().map(|x| x.p99_us).collect();
        let (cmin, cmax) = spread(&cpu);
        let (rmin, rmax) = spread(&rps);
        let cpu_med = median(&mut cpu);
        let cpu_cell = if cpu.is_empty() {
            "–".to_string()
        } else {
            format!("{cpu_med:.1} [{cmin:.1}–{cmax:.1}]")
        };
        let _ = writeln!(
            report,
            "| {name} | {cpu_cell} | {:.0} [{rmin:.0}–{rmax:.0}] | {:.0} | {:.0} |",
            median(&mut rps),
            median(&mut p50),
            median(&mut p99)
        );
    }
    let cpu = |name: &str| -> Vec<Option<f64>> {
        targets
            .iter()
            .position(|(n, _, _)| *n == name)
            .map(|i| samples[i].iter().map(|s| s.proxy_cpu_us_per_req).collect())
            .unwrap_or_default()
    };
    write_ratio(
        &mut report,
        "dataplane / nginx CPU per request",
        &cpu("dataplane"),
        &cpu("nginx"),
    );
    write_ratio(
        &mut report,
        "dataplane / baseline CPU per request",
        &cpu("dataplane"),
        &cpu("baseline"),
    );
    report
}

fn write_json(
    path: &Path,
    targets: &[(&str, SocketAddr, Option<u32>)],
    samples: &[Vec<Sample>],
) -> anyhow::Result<()> {
    let mut out = String::from("{");
    for (i, (name, _, _)) in targets.iter().enumerate() {
        let rows: Vec<String> = samples[i]
            .iter()
            .map(|s| {
                format!(
                    "{{\"requests\":{},\"rps\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"proxy_cpu_us_per_req\":{},\"mock_cpu_us_per_req\":{:.2}}}",
                    s.requests,
                    s.rps,
                    s.p50_us,
                    s.p99_us,
                    s.proxy_cpu_us_per_req.map_or("null".into(), |v| format!("{v:.2}")),
                    s.mock_cpu_us_per_req
                )
            })
            .collect();
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{name}\":[{}]", rows.join(","));
    }
    out.push('}');
    std::fs::write(path, out)?;
    Ok(())
}
