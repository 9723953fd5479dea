//! The load harness: one run measures the provider directly, nginx `proxy_pass` (one
//! worker, upstream keepalive) and the data plane (one worker), with the same mock provider
//! and the same load generator (wrk), interleaved over several rounds.
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

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};

mod keys_bench;

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
    /// Revocation propagation: from the admin call's return to every worker having applied
    /// it, over many revocations with a large key table loaded.
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
    Run {
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
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Mock { listen } => {
            dataplane::node::run_demo_provider(listen, dataplane::config::DriverChoice::Auto)
        }
        Cmd::Revocation { keys, revocations } => keys_bench::revocation(keys, revocations),
        Cmd::Snapshot { keys } => keys_bench::snapshot(keys),
        Cmd::Run {
            rounds,
            duration,
            connections,
            proxy_core,
            load_core,
            json,
        } => run(&RunOpts {
            rounds,
            duration,
            connections,
            proxy_core,
            load_core,
            json,
        }),
    }
}

#[derive(Debug)]
struct RunOpts {
    rounds: usize,
    duration: u64,
    connections: usize,
    proxy_core: usize,
    load_core: usize,
    json: Option<PathBuf>,
}

/// A process stopped when dropped: SIGTERM first (nginx's master then stops its workers;
/// a SIGKILLed master would leave them running), SIGKILL if it lingers.
#[derive(Debug)]
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .ok_or_else(|| anyhow!("no exe dir"))?
        .join(name);
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build --release -p dataplane -p bench` first",
            p.display()
        );
    }
    Ok(p)
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr} never accepted connections")
}

/// One request with the wrk body, to check a target answers correctly before loading it.
fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let body = r#"{"model":"bench-model","messages":[{"role":"user","content":"probe"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-bench\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

/// User + system CPU seconds of a process and its direct children.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// (user, system) CPU seconds of a process and its direct children.
fn cpu_split(pid: u32) -> anyhow::Result<(f64, f64)> {
    // USER_HZ: the unit of utime/stime in /proc, 100 on every Linux architecture we run on.
    const CLK_TCK: f64 = 100.0;
    let (mut user, mut system) = (0u64, 0u64);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid ... utime(14) stime(15).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if p == pid || ppid == pid {
            let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            user += utime;
            system += stime;
        }
    }
    Ok((user as f64 / CLK_TCK, system as f64 / CLK_TCK))
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
    let out = Command::new("taskset")
        .args(["-c", &opts.load_core.to_string(), "wrk", "-t1"])
        .arg(format!("-c{}", opts.connections))
        .arg(format!("-d{}s", opts.duration))
        .arg("-s")
        .arg(bench_dir().join("chat.lua"))
        .arg("--latency")
        .arg(format!("http://{target}/v1/chat/completions"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("errors under load against {target}:\n{text}");
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

fn start_nginx(
    opts: &RunOpts,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Proc> {
    let template = std::fs::read_to_string(bench_dir().join("nginx.conf.in"))?;
    let conf = template
        .replace("@PREFIX@", &dir.display().to_string())
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM@", &upstream.to_string());
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("nginx not found (apt-get install nginx-light)"))?;
    let child = Command::new("taskset")
        .args(["-c", &opts.proxy_core.to_string(), nginx, "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Proc(child))
}

fn start_dataplane(
    opts: &RunOpts,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Proc> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let conf = format!(
        r#"
[server]
listen = "{listen}"
workers = 1
pin_workers = false
[admin]
listen = "{admin}"
[log]
level = "warn"
access = false
[[upstreams]]
name = "provider"
kind = "openai"
base_url = "http://{upstream}"
credential_env = "AIGW_BENCH_PROVIDER_KEY"
[[routes]]
prefix = ""
targets = [{{ upstream = "provider" }}]
"#
    );
    let path = dir.join("dataplane.toml");
    std::fs::write(&path, conf)?;
    let child = Command::new("taskset")
        .args(["-c", &opts.proxy_core.to_string()])
        .arg(sibling_binary("dataplane")?)
        .arg("--config")
        .arg(&path)
        .env("AIGW_BENCH_PROVIDER_KEY", "sk-provider-credential")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dataplane.log"))?)
        .spawn()
        .context("starting the data plane")?;
    Ok(Proc(child))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn run(opts: &RunOpts) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("aigw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mock_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let dp_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));

    let mock = Proc(
        Command::new("taskset")
            .args(["-c", &opts.load_core.to_string()])
            .arg(std::env::current_exe()?)
            .args(["mock", "--listen", &mock_addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the mock provider")?,
    );
    wait_port(mock_addr)?;
    let nginx = start_nginx(opts, &dir, nginx_addr, mock_addr)?;
    let dp = start_dataplane(opts, &dir, dp_addr, mock_addr)?;
    wait_port(nginx_addr)?;
    wait_port(dp_addr)?;
    for a in [mock_addr, nginx_addr, dp_addr] {
        probe(a)?;
    }

    let targets: [(&str, SocketAddr, Option<u32>); 3] = [
        ("direct", mock_addr, None),
        ("nginx", nginx_addr, Some(nginx.0.id())),
        ("dataplane", dp_addr, Some(dp.0.id())),
    ];
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
        // The proxies swap places every round, so neither always runs right after the other
        // (or always first after the direct run).
        let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [0, 2, 1] };
        for i in order {
            let (name, addr, pid) = &targets[i];
            // One read of the proxy's /proc stat on each side of the run: (user, system).
            let proxy_before = pid.map(cpu_split).transpose()?;
            let mock_before = cpu_seconds(mock.0.id())?;
            let (requests, rps, p50, p99) = run_wrk(opts, *addr)?;
            let proxy_after = pid.map(cpu_split).transpose()?;
            let mock_after = cpu_seconds(mock.0.id())?;
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

    let mut report = String::new();
    let _ = writeln!(
        report,
        "| target | CPU µs/request (median [min–max]) | req/s (median [min–max]) | p50 µs | p99 µs |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (i, (name, _, _)) in targets.iter().enumerate() {
        let s = &samples[i];
        let mut cpu: Vec<f64> = s.iter().filter_map(|x| x.proxy_cpu_us_per_req).collect();
        let mut rps: Vec<f64> = s.iter().map(|x| x.rps).collect();
        let mut p50: Vec<f64> = s.iter().map(|x| x.p50_us).collect();
        let mut p99: Vec<f64> = s.iter().map(|x| x.p99_us).collect();
        let (cmin, cmax) = spread(&cpu);
        let (rmin, rmax) = spread(&rps);
        let cpu_med = median(&mut cpu);
        medians.push(cpu_med);
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
    if medians[1] > 0.0 {
        let _ = writeln!(
            report,
            "\ndataplane / nginx CPU per request: {:.2}",
            medians[2] / medians[1]
        );
        // The same ratio taken within each round, where both proxies ran seconds apart: a
        // shared machine drifts between slower and faster phases, and a round's pair mostly
        // sees the same phase.
        let mut paired: Vec<f64> = samples[1]
            .iter()
            .zip(&samples[2])
            .filter_map(|(n, d)| Some(d.proxy_cpu_us_per_req? / n.proxy_cpu_us_per_req?))
            .collect();
        if !paired.is_empty() {
            let listed: Vec<String> = paired.iter().map(|r| format!("{r:.2}")).collect();
            let (lo, hi) = spread(&paired);
            let _ = writeln!(
                report,
                "within each round: median {:.2} [{lo:.2}–{hi:.2}] ({})",
                median(&mut paired),
                listed.join(", ")
            );
        }
    }
    println!("{report}");
    if let Some(path) = &opts.json {
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
    }
    drop(dp);
    drop(nginx);
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
