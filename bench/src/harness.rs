//! What every scenario of the harness shares: the processes it starts (and stops), free
//! ports, the per-process figures read from /proc, and the statistics over rounds.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// A process stopped when dropped: SIGTERM first (nginx's master then stops its workers;
/// a SIGKILLed master would leave them running), SIGKILL if it lingers.
#[derive(Debug)]
pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }
}

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

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A loopback address on a free port.
pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

pub(crate) fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory for one run's configuration files, logs and nginx's temp files.
pub(crate) fn run_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("aigw-bench-{name}{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub(crate) fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
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

pub(crate) fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr} never accepted connections")
}

/// This harness binary run with `args` on `core`, its output discarded.
pub(crate) fn spawn_self_on(core: usize, args: &[&str]) -> anyhow::Result<Proc> {
    let child = Command::new("taskset")
        .args(["-c", &core.to_string()])
        .arg(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting aigw-bench {}", args.join(" ")))?;
    Ok(Proc(child))
}

/// The mock provider (the data plane's demo provider) on `core`, answering: the process and
/// its address.
pub(crate) fn start_mock(core: usize) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let mock = spawn_self_on(core, &["mock", "--listen", &addr.to_string()])?;
    wait_port(addr)?;
    Ok((mock, addr))
}

/// User + system CPU seconds of a process and its direct children.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// The numeric fields after the parenthesised command of each process that is `pid` or a
/// direct child of it.
fn family_stats(pid: u32) -> anyhow::Result<Vec<(u32, Vec<u64>)>> {
    let mut out = Vec::new();
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
        // The state (a letter) reads as 0; every other field is numeric.
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let ppid = f.get(1).copied().unwrap_or(0);
        if p == pid || ppid == u64::from(pid) {
            out.push((p, f));
        }
    }
    Ok(out)
}

/// (user, system) CPU seconds of a process and its direct children.
pub(crate) fn cpu_split(pid: u32) -> anyhow::Result<(f64, f64)> {
    // USER_HZ: the unit of utime/stime in /proc, 100 on every Linux architecture we run on.
    const CLK_TCK: f64 = 100.0;
    let (mut user, mut system) = (0u64, 0u64);
    for (_, f) in family_stats(pid)? {
        user += f.get(11).copied().unwrap_or(0);
        system += f.get(12).copied().unwrap_or(0);
    }
    Ok((user as f64 / CLK_TCK, system as f64 / CLK_TCK))
}

/// User + system CPU seconds of one process (all its threads), without its children.
pub(crate) fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    const CLK_TCK: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((field(11) + field(12)) as f64 / CLK_TCK)
}

/// Seconds core `core` has been busy since boot (user, nice, system, irq and softirq time
/// in `/proc/stat`; idle, iowait and steal left out), whichever process it ran.
pub(crate) fn core_busy_seconds(core: usize) -> anyhow::Result<f64> {
    const CLK_TCK: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .ok_or_else(|| anyhow!("no {name} in /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum();
    Ok(busy as f64 / CLK_TCK)
}

/// The process id of the kernel thread named `name` (such as `ksoftirqd/0`), if any.
pub(crate) fn kernel_thread(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim_end() == name).then_some(pid)
    })
}

/// Resident memory (VmRSS) of a process and its direct children, in KiB.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for (p, _) in family_stats(pid)? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

pub(crate) fn nginx_binary() -> anyhow::Result<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("nginx not found (apt-get install nginx-light)"))
}

/// nginx on `core` with the configuration `template` (a file in `bench/`), its
/// `@PREFIX@`, `@LISTEN@` and `@UPSTREAM@` filled in, then each `(placeholder, value)` of
/// `extra`.
pub(crate) fn start_nginx(
    template: &str,
    core: usize,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    extra: &[(&str, String)],
) -> anyhow::Result<Proc> {
    let mut conf = std::fs::read_to_string(bench_dir().join(template))
        .with_context(|| format!("reading bench/{template}"))?
        .replace("@PREFIX@", &dir.display().to_string())
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM@", &upstream.to_string());
    for (placeholder, value) in extra {
        conf = conf.replace(placeholder, value);
    }
    let path = dir.join(template.trim_end_matches(".in"));
    std::fs::write(&path, conf)?;
    let child = Command::new("taskset")
        .args(["-c", &core.to_string(), nginx_binary()?, "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Proc(child))
}

/// A data plane to start: which binary, under which name (its config and log files in the
/// run directory are named after it), and what else its upstream entry says.
#[derive(Debug)]
pub(crate) struct DataPlane<'a> {
    pub(crate) name: &'a str,
    pub(crate) binary: &'a Path,
    /// Extra `key = value` lines for the provider's `[[upstreams]]` entry.
    pub(crate) upstream_extra: &'a str,
    /// Extra environment variables for the process.
    pub(crate) env: &'a [(String, String)],
    /// Extra sections appended to its configuration (e.g. `[tls]`).
    pub(crate) sections: &'a str,
}

/// A data plane on `core` with one worker, the provider at `upstream` as its only upstream
/// (OpenAI-style) and a catch-all route to it.
pub(crate) fn start_dataplane(
    dp: &DataPlane<'_>,
    core: usize,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Proc> {
    let admin = free_addr()?;
    let extra = dp.upstream_extra;
    let sections = dp.sections;
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
{extra}
[[routes]]
prefix = ""
targets = [{{ upstream = "provider" }}]
{sections}
"#
    );
    let path = dir.join(format!("{}.toml", dp.name));
    std::fs::write(&path, conf)?;
    let child = Command::new("taskset")
        .args(["-c", &core.to_string()])
        .arg(dp.binary)
        .arg("--config")
        .arg(&path)
        .env("AIGW_BENCH_PROVIDER_KEY", "sk-provider-credential")
        .envs(dp.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{}.log", dp.name)))?)
        .spawn()
        .with_context(|| format!("starting {}", dp.binary.display()))?;
    Ok(Proc(child))
}

/// Raises this process's soft limit on open files to its hard limit (the processes it
/// starts inherit it) and returns the limit now in force.
#[allow(unsafe_code)]
pub(crate) fn raise_nofile_limit() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) only writes the struct passed, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit(2) only reads the struct passed, which lives on this stack frame.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Pins the calling thread (and the threads it starts later) to `core`.
pub(crate) fn pin_current_thread(core: usize) -> anyhow::Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        bail!("could not pin the harness to core {core}");
    }
    Ok(())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
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

pub(crate) fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// The nearest-rank percentile `q` (0–1) of sorted values.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Appends the ratio `num / den` of two targets' figures to a report: of their medians, then
/// taken within each round, where both ran seconds apart (a shared machine drifts between
/// slower and faster phases, and a round's pair mostly sees the same phase). Nothing when
/// `den` has no figures.
pub(crate) fn write_ratio(
    report: &mut String,
    label: &str,
    num: &[Option<f64>],
    den: &[Option<f64>],
) {
    use std::fmt::Write as _;
    let mut n: Vec<f64> = num.iter().flatten().copied().collect();
    let mut d: Vec<f64> = den.iter().flatten().copied().collect();
    let (mn, md) = (median(&mut n), median(&mut d));
    if md <= 0.0 {
        return;
    }
    let _ = writeln!(report, "\n{label}: {:.2}", mn / md);
    let mut paired: Vec<f64> = num
        .iter()
        .zip(den)
        .filter_map(|(a, b)| Some(a.as_ref()? / b.as_ref()?))
        .filter(|r| r.is_finite())
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

/// Where the targets go in round `round` of `n`: the first (the provider directly) first,
/// then the proxies rotated one place per round so none always runs right after another;
/// with more than two, every other round also reverses them.
pub(crate) fn round_order(round: usize, n: usize) -> Vec<usize> {
    let proxies = n.saturating_sub(1);
    let mut rest: Vec<usize> = (0..proxies).map(|i| 1 + (i + round) % proxies).collect();
    if proxies > 2 && round % 2 == 1 {
        rest.reverse();
    }
    let mut order = vec![0];
    order.extend(rest);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_proxies_alternate_as_before() {
        assert_eq!(round_order(0, 3), vec![0, 1, 2]);
        assert_eq!(round_order(1, 3), vec![0, 2, 1]);
        assert_eq!(round_order(2, 3), vec![0, 1, 2]);
    }

    #[test]
    fn every_order_is_a_permutation_with_direct_first() {
        for n in 1..6 {
            for round in 0..8 {
                let mut o = round_order(round, n);
                assert_eq!(o[0], 0);
                o.sort_unstable();
                assert_eq!(o, (0..n).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn three_proxies_each_take_each_place() {
        let firsts: std::collections::HashSet<usize> =
            (0..6).map(|r| round_order(r, 4)[1]).collect();
        assert_eq!(firsts.len(), 3);
    }
}
