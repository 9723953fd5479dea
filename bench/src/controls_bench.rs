//! `aigw-bench controls`: what metering, spend caps and rate limits add to the data plane's
//! CPU time per request.
//!
//! One control plane runs in this process (SQLite, TLS link, as in `keys_bench.rs`), with a
//! tenant whose production and staging environments route every model to the mock
//! provider, a global price for the bench model, and three keys: A, plain; B, under a
//! lifetime key-scope spend cap and per-key rate limits all far too high ever to refuse; and
//! G, of staging, whose policy redacts every entity in requests and answers. All are
//! metered, as every keyed request is, and their bodies logged unless the request says not. One data plane process (one worker) links to it; the static-config data
//! plane of `aigw-bench run` (no control plane, no keys, no metering) is the reference.
//!
//! Each round runs wrk, with `bench/chat.lua`'s request, against the static node and the
//! linked node with key A; and, each sending `x-aigw-no-log: 1`, with key A, key B and key G.
//! Key A with and without the body log gives the body log's cost; keys B and G, without it,
//! what caps and limits, and guardrails, add over metering, measured apart from the body
//! log's shipping (its control-plane writer shares the load core). The order changes every
//! round. The figure is the CPU time of the data plane process (every thread: worker,
//! control thread) per request, and, beside it, this process's (the control plane: the
//! link, the body log's writer), counted until both are quiet again after wrk stops, so
//! work a target's requests leave queued (bodies still to ship) is charged to that target.
//! The data planes run on the proxy core; wrk, the mock provider and this process (with the
//! control plane) on the other.
//!
//! With `--attribute`, the linked node is then profiled with `perf` under key A's and key
//! B's load (no-log) and the share of its CPU time in each request phase is reported
//! ([`crate::attribute`]): metering, caps and limits measured inside one run of one
//! process, where the comparison of runs above carries the machine's noise.
//!
//! ```sh
//! cargo build --release -p dataplane -p bench
//! target/release/aigw-bench controls [--attribute]
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::attribute;
use crate::harness::{
    bench_dir, cpu_split, free_addr, median, pin_current_thread, process_cpu_seconds, round_order,
    run_dir, sibling_binary, spread, start_dataplane, start_mock, wait_port, write_ratio,
    DataPlane, Proc,
};
use crate::keys_bench::{cp_api, http, start_cp};
use crate::wrk_run::{probe_with_key, wrk};

/// Options of `aigw-bench controls`.
#[derive(Debug, clap::Args)]
pub(crate) struct ControlsOpts {
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 4)]
    duration: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Core the data planes run on.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core wrk, the mock provider and the control plane share.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// After the rounds, profile the linked node (`perf`) under key A's and key B's load,
    /// no-log, and report the share of its CPU time in each request phase.
    #[arg(long)]
    attribute: bool,
}

const TENANT: &str = "bench";
/// The model `bench/chat.lua` asks for.
const MODEL: &str = "bench-model";

/// One wrk run's figures.
#[derive(Debug, Clone, Default)]
struct Sample {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
    user_us_per_req: f64,
    /// CPU of this process (the control plane: link, body log writer) per request.
    cp_us_per_req: f64,
}

/// The header that keeps a request's bodies out of the body log.
const NO_LOG: &str = "wrk.headers[\"x-aigw-no-log\"] = \"1\"\n";

/// A target: its name, where wrk sends to, the process measured, and the wrk script.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    script: std::path::PathBuf,
}

/// An admin API call on the control plane that must answer `want`; its JSON body.
fn api(
    cp: &controlplane::Running,
    method: &str,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> anyhow::Result<Value> {
    let (status, v) = cp_api(cp, method, path, body)?;
    if status != want {
        bail!("{method} {path}: {status} {v}");
    }
    Ok(v)
}

/// A key: its plaintext and its id.
struct Key {
    plaintext: String,
    id: String,
}

/// What [`seed`] made: key A (plain), key B (capped and rate-limited), B's cap, key G
/// (in an environment whose guardrails redact every entity both ways).
struct Seeded {
    a: Key,
    b: Key,
    cap_id: String,
    g: Key,
}

/// A key of one of the tenant's environments.
fn create_key(cp: &controlplane::Running, environment: &str) -> anyhow::Result<Key> {
    let v = api(
        cp,
        "POST",
        &format!("/v1/tenants/{TENANT}/keys"),
        Some(&json!({ "environment": environment })),
        201,
    )?;
    Ok(Key {
        plaintext: v["key"].as_str().context("key")?.to_string(),
        id: v["info"]["key_id"].as_str().context("key_id")?.to_string(),
    })
}

/// The tenant, its route to the mock provider, the bench model's price, and the keys.
fn seed(cp: &controlplane::Running, mock: SocketAddr) -> anyhow::Result<Seeded> {
    api(
        cp,
        "POST",
        "/v1/tenants",
        Some(&json!({"id": TENANT, "name": TENANT, "tier": "enterprise"})),
        201,
    )?;
    for name in ["production", "staging"] {
        let env = format!("/v1/tenants/{TENANT}/environments/{name}");
        api(
            cp,
            "PUT",
            &format!("{env}/upstreams/mock"),
            Some(&json!({"provider": "openai", "base_url": format!("http://{mock}")})),
            200,
        )?;
        api(
            cp,
            "PUT",
            &format!("{env}/routes/all"),
            Some(&json!({"prefix": "", "targets": [{"upstream": "mock"}]})),
            200,
        )?;
    }
    // Staging redacts every entity in requests and in answers.
    let every: serde_json::Map<String, Value> =
        ["email", "phone", "card", "ssn", "iban", "ip", "secret"]
            .iter()
            .map(|e| ((*e).to_string(), json!("redact")))
            .collect();
    api(
        cp,
        "PUT",
        &format!("/v1/tenants/{TENANT}/environments/staging/policy"),
        Some(&json!({ "guardrails": every })),
        200,
    )?;
    api(
        cp,
        "PUT",
        "/v1/prices",
        Some(&json!({"model": MODEL, "input_per_mtok": 1.0, "output_per_mtok": 1.0})),
        200,
    )?;
    let a = create_key(cp, "production")?;
    let b = create_key(cp, "production")?;
    let g = create_key(cp, "staging")?;
    let cap = api(
        cp,
        "PUT",
        &format!("/v1/tenants/{TENANT}/spend-caps"),
        Some(&json!({"scope": "key", "id": b.id, "period": "lifetime", "limit_usd": 1_000_000})),
        200,
    )?;
    let cap_id = cap["id"].as_str().context("cap id")?.to_string();
    api(
        cp,
        "PUT",
        &format!("/v1/keys/{}/rate-limits", b.id),
        Some(
            &json!({"requests_per_minute": 100_000_000u64, "tokens_per_minute": 100_000_000_000u64}),
        ),
        200,
    )?;
    Ok(Seeded { a, b, cap_id, g })
}

/// The data plane `binary` on `core`, linked to `cp` (one worker, production keys), its
/// admin API at `admin`.
fn start_linked_node(
    binary: &Path,
    cp: &controlplane::Running,
    core: usize,
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<Proc> {
    let token = cp.add_node("controls", &Default::default())?;
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
[control_plane]
address = "{}"
server_name = "localhost"
ca_file = "{}"
identity_dir = "{}"
enrollment_token_env = "AIGW_BENCH_ENROLLMENT_TOKEN"
environments = ["production", "staging"]
"#,
        cp.push_addr,
        cp.ca_file.display(),
        dir.join("identity").display()
    );
    let path = dir.join("linked.toml");
    std::fs::write(&path, conf)?;
    let child = Command::new("taskset")
        .args(["-c", &core.to_string()])
        .arg(binary)
        .arg("--config")
        .arg(&path)
        .env("AIGW_BENCH_ENROLLMENT_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("linked.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(Proc(child))
}

/// Waits until the node at `admin` is ready and every worker has applied the control
/// plane's newest revision.
fn wait_applied(cp: &controlplane::Running, admin: SocketAddr) -> anyhow::Result<()> {
    let start = Instant::now();
    let rev = api(cp, "GET", "/v1/revision", None, 200)?["revision"]
        .as_i64()
        .context("revision")?;
    loop {
        if let Ok((200, _)) = http(admin, "GET", "/readyz", None, None) {
            if let Ok((200, w)) = http(admin, "GET", "/workers", None, None) {
                let applied = w["workers"].as_array().is_some_and(|ws| {
                    !ws.is_empty()
                        && ws
                            .iter()
                            .all(|x| x["config_revision"].as_i64().unwrap_or(0) >= rev)
                });
                if applied {
                    return Ok(());
                }
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the linked node never applied revision {rev}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bench/chat.lua` with `key` in the Authorization header, written to `dir`.
fn keyed_script(dir: &Path, name: &str, key: &str) -> anyhow::Result<std::path::PathBuf> {
    keyed_script_with(dir, name, key, "")
}

/// [`keyed_script`], with more Lua after it.
fn keyed_script_with(
    dir: &Path,
    name: &str,
    key: &str,
    more: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let base = std::fs::read_to_string(bench_dir().join("chat.lua")).context("bench/chat.lua")?;
    let path = dir.join(format!("chat-{name}.lua"));
    std::fs::write(
        &path,
        format!("{base}\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n{more}"),
    )?;
    Ok(path)
}

/// Today's number (UTC days since 1970-01-01).
fn utc_day() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 86_400)
}

/// Requests the control plane counted for `key_id` from UTC day `since` to today.
fn metered_requests(cp: &controlplane::Running, key_id: &str, since: u64) -> anyhow::Result<u64> {
    let from = controlplane::store::day_name(since);
    let v = api(
        cp,
        "GET",
        &format!("/v1/tenants/{TENANT}/usage?from={from}&key_id={key_id}"),
        None,
        200,
    )?;
    Ok(v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["requests"].as_u64())
        .sum())
}

pub(crate) fn controls(opts: &ControlsOpts) -> anyhow::Result<()> {
    // This thread and every thread it starts (the control plane's) share the load core.
    pin_current_thread(opts.load_core)?;
    let dir = run_dir("controls-")?;
    let first_day = utc_day()?;
    let dp_binary = sibling_binary("dataplane")?;

    let (mock, mock_addr) = start_mock(opts.load_core)?;

    let static_addr = free_addr()?;
    let static_node = start_dataplane(
        &DataPlane {
            name: "static",
            binary: &dp_binary,
            upstream_extra: "",
            env: &[],
            sections: "",
        },
        opts.proxy_core,
        &dir,
        static_addr,
        mock_addr,
    )?;

    let cp = start_cp(&dir.join("cp"))?;
    let Seeded {
        a: key_a,
        b: key_b,
        cap_id,
        g: key_g,
    } = seed(&cp, mock_addr)?;
    let linked_addr = free_addr()?;
    let linked_admin = free_addr()?;
    let linked = start_linked_node(
        &dp_binary,
        &cp,
        opts.proxy_core,
        &dir,
        linked_addr,
        linked_admin,
    )?;
    wait_port(static_addr)?;
    wait_applied(&cp, linked_admin)?;

    // Each target answers the mock's content; the linked node refuses a key it does not
    // know (so the keys are really checked).
    probe_with_key(static_addr, "sk-bench").context("static node")?;
    probe_with_key(linked_addr, &key_a.plaintext).context("linked node, key A")?;
    probe_with_key(linked_addr, &key_b.plaintext).context("linked node, key B")?;
    probe_with_key(linked_addr, &key_g.plaintext).context("linked node, key G")?;
    let (status, v) = http(
        linked_addr,
        "POST",
        "/v1/chat/completions",
        Some("sk-bench-unknown"),
        Some(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})),
    )?;
    if status != 401 {
        bail!("the linked node answered an unknown key with {status}: {v}");
    }

    let targets = [
        Target {
            name: "static",
            addr: static_addr,
            pid: static_node.id(),
            script: bench_dir().join("chat.lua"),
        },
        Target {
            name: "key A",
            addr: linked_addr,
            pid: linked.id(),
            script: keyed_script(&dir, "a", &key_a.plaintext)?,
        },
        Target {
            name: "key A no-log",
            addr: linked_addr,
            pid: linked.id(),
            script: keyed_script_with(&dir, "a-nolog", &key_a.plaintext, NO_LOG)?,
        },
        Target {
            name: "key B no-log",
            addr: linked_addr,
            pid: linked.id(),
            script: keyed_script_with(&dir, "b-nolog", &key_b.plaintext, NO_LOG)?,
        },
        Target {
            name: "key G no-log",
            addr: linked_addr,
            pid: linked.id(),
            script: keyed_script_with(&dir, "g-nolog", &key_g.plaintext, NO_LOG)?,
        },
    ];

    eprintln!(
        "aigw-bench controls: {} rounds × {} targets × {}s, {} connections; data planes on core {}, wrk + mock + control plane on core {}",
        opts.rounds,
        targets.len(),
        opts.duration,
        opts.connections,
        opts.proxy_core,
        opts.load_core
    );
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for round in 0..opts.rounds {
        // round_order keeps its first index first; with one placeholder in front, the
        // targets rotate every round and reverse every other one.
        for i in round_order(round, targets.len() + 1)
            .into_iter()
            .skip(1)
            .map(|i| i - 1)
        {
            let t = &targets[i];
            let before = cpu_split(t.pid)?;
            let cp_before = process_cpu_seconds(std::process::id())?;
            let (requests, rps, p50, p99) = wrk(
                opts.load_core,
                opts.connections,
                opts.duration,
                &t.script,
                t.addr,
            )
            .with_context(|| format!("round {}, {}", round + 1, t.name))?;
            // Work the requests left queued (bodies still to ship) is theirs: count it, and
            // start the next target on quiet processes.
            settle(t.pid)?;
            let after = cpu_split(t.pid)?;
            let cp_after = process_cpu_seconds(std::process::id())?;
            let per_req = |a: f64, b: f64| (b - a) * 1e6 / requests as f64;
            let s = Sample {
                requests,
                rps,
                p50_us: p50,
                p99_us: p99,
                cpu_us_per_req: per_req(before.0 + before.1, after.0 + after.1),
                user_us_per_req: per_req(before.0, after.0),
                cp_us_per_req: per_req(cp_before, cp_after),
            };
            eprintln!(
                "round {} {:>12}: {:>7.0} req/s  p50 {:>6.0}µs  p99 {:>6.0}µs  CPU/req {:.1}µs (user {:.1}µs)  control plane {:.1}µs",
                round + 1,
                t.name,
                s.rps,
                s.p50_us,
                s.p99_us,
                s.cpu_us_per_req,
                s.user_us_per_req,
                s.cp_us_per_req
            );
            samples[i].push(s);
        }
    }

    // The node reports usage about once a second: let the last reports arrive.
    std::thread::sleep(Duration::from_secs(3));
    let sent = |i: usize| samples[i].iter().map(|s| s.requests).sum::<u64>();
    let metered_a = metered_requests(&cp, &key_a.id, first_day)?;
    let metered_b = metered_requests(&cp, &key_b.id, first_day)?;
    let caps = api(
        &cp,
        "GET",
        &format!("/v1/tenants/{TENANT}/spend-caps"),
        None,
        200,
    )?;
    let cap = caps["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["id"] == cap_id.as_str())
        .cloned()
        .unwrap_or(Value::Null);

    let mut out = report(&targets, &samples);
    if opts.attribute {
        // Targets 2 and 3: key A no-log, key B no-log.
        let mut profiles = Vec::new();
        for t in &targets[2..4] {
            let data = dir.join(format!("perf-{}.data", t.name.replace(' ', "-")));
            let perf = attribute::start(t.pid, &data)?;
            let run = wrk(
                opts.load_core,
                opts.connections,
                opts.duration,
                &t.script,
                t.addr,
            );
            attribute::stop(perf)?;
            let (requests, ..) = run.with_context(|| format!("profiling {}", t.name))?;
            eprintln!("profiled {}: {requests} requests", t.name);
            profiles.push((t.name, attribute::shares(&data)?));
            let _ = std::fs::remove_file(&data);
        }
        write_attribution(&mut out, &profiles);
    }
    let _ = writeln!(
        out,
        "\nmetered by the control plane (wrk's completed answers; in-flight ones at each run's end and probes also count): key A {metered_a} ({}), key B {metered_b} ({})",
        sent(1) + sent(2),
        sent(3)
    );
    let _ = writeln!(
        out,
        "key B's cap: spent ${:.2}, leased ${:.2} of ${:.0}",
        cap["spent_usd"].as_f64().unwrap_or(0.0),
        cap["leased_usd"].as_f64().unwrap_or(0.0),
        cap["limit_usd"].as_f64().unwrap_or(0.0)
    );
    let dropped = http(linked_admin, "GET", "/readyz", None, None)
        .ok()
        .and_then(|(_, v)| v["body_log_dropped"].as_u64());
    let _ = writeln!(
        out,
        "body log: requests whose bodies the node's queue dropped: {}",
        dropped.map_or("unknown".to_string(), |d| d.to_string())
    );
    println!("{out}");

    drop(linked);
    drop(static_node);
    drop(mock);
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn report(targets: &[Target], samples: &[Vec<Sample>]) -> String {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| target | CPU µs/request (median [min–max]) | user µs/request | control plane µs/request | req/s (median [min–max]) | p50 µs | p99 µs |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|");
    for (t, s) in targets.iter().zip(samples) {
        let mut cpu: Vec<f64> = s.iter().map(|x| x.cpu_us_per_req).collect();
        let mut user: Vec<f64> = s.iter().map(|x| x.user_us_per_req).collect();
        let mut cp: Vec<f64> = s.iter().map(|x| x.cp_us_per_req).collect();
        let mut rps: Vec<f64> = s.iter().map(|x| x.rps).collect();
        let mut p50: Vec<f64> = s.iter().map(|x| x.p50_us).collect();
        let mut p99: Vec<f64> = s.iter().map(|x| x.p99_us).collect();
        let (cmin, cmax) = spread(&cpu);
        let (rmin, rmax) = spread(&rps);
        let _ = writeln!(
            report,
            "| {} | {:.1} [{cmin:.1}–{cmax:.1}] | {:.1} | {:.1} | {:.0} [{rmin:.0}–{rmax:.0}] | {:.0} | {:.0} |",
            t.name,
            median(&mut cpu),
            median(&mut user),
            median(&mut cp),
            median(&mut rps),
            median(&mut p50),
            median(&mut p99)
        );
    }
    let cpu = |i: usize| -> Vec<Option<f64>> {
        samples[i].iter().map(|s| Some(s.cpu_us_per_req)).collect()
    };
    // Targets: 0 static, 1 key A, 2 key A no-log, 3 key B no-log, 4 key G no-log.
    write_ratio(
        &mut report,
        "key B (spend cap + rate limits) / key A (plain key), both no-log, CPU per request",
        &cpu(3),
        &cpu(2),
    );
    write_difference(&mut report, "key B − key A, no-log", &cpu(3), &cpu(2));
    write_ratio(
        &mut report,
        "key A no-log (key, metering, linked node) / static (no keys) CPU per request",
        &cpu(2),
        &cpu(0),
    );
    write_difference(&mut report, "key A no-log − static", &cpu(2), &cpu(0));
    write_ratio(
        &mut report,
        "key B no-log (key, metering, spend cap, rate limits) / static (no keys) CPU per request",
        &cpu(3),
        &cpu(0),
    );
    write_difference(&mut report, "key B no-log − static", &cpu(3), &cpu(0));
    write_ratio(
        &mut report,
        "guardrails: key G no-log (redacting every entity, requests and answers) / key A no-log CPU per request",
        &cpu(4),
        &cpu(2),
    );
    write_difference(
        &mut report,
        "guardrails: key G no-log − key A no-log",
        &cpu(4),
        &cpu(2),
    );
    write_ratio(
        &mut report,
        "key A (body log) / key A no-log (x-aigw-no-log: 1) CPU per request",
        &cpu(1),
        &cpu(2),
    );
    write_difference(
        &mut report,
        "body log: key A − key A no-log",
        &cpu(1),
        &cpu(2),
    );
    let cp = |i: usize| -> Vec<Option<f64>> {
        samples[i].iter().map(|s| Some(s.cp_us_per_req)).collect()
    };
    write_difference(
        &mut report,
        "body log, control plane CPU: key A − key A no-log",
        &cp(1),
        &cp(2),
    );
    report
}

/// The share of the linked node's CPU samples in each phase, per profiled target.
fn write_attribution(out: &mut String, profiles: &[(&str, attribute::Shares)]) {
    let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    let _ = writeln!(
        out,
        "\nshare of the linked node's CPU samples whose stack passes through each phase (perf, inlined frames included; one run):"
    );
    let _ = write!(out, "\n| phase |");
    for (name, _) in profiles {
        let _ = write!(out, " {name} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in profiles {
        let _ = write!(out, "---|");
    }
    for (i, phase) in attribute::PHASES.iter().enumerate() {
        let _ = write!(out, "\n| {} |", phase.name);
        for (_, s) in profiles {
            let _ = write!(out, " {:.2} % |", pct(s.phase[i], s.samples));
        }
    }
    let _ = write!(out, "\n| **metering, caps and limits together** |");
    for (_, s) in profiles {
        let share = s.controls as f64 / s.samples.max(1) as f64;
        // What they add over the same requests without them: share / (1 − share).
        let _ = write!(
            out,
            " **{:.2} %** (adds {:.2} %) |",
            100.0 * share,
            100.0 * share / (1.0 - share).max(f64::EPSILON)
        );
    }
    let _ = write!(out, "\n| samples (stacks unwound to the thread's start) |");
    for (_, s) in profiles {
        let _ = write!(
            out,
            " {} ({:.0} %) |",
            s.samples,
            pct(s.complete, s.samples)
        );
    }
    let _ = writeln!(out);
}

/// Waits (at most 20 s) until the data plane `pid` and this process (the control plane) each
/// use under 5 % of a core over a quarter of a second.
fn settle(pid: u32) -> anyhow::Result<()> {
    let quiet = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let before = (
            process_cpu_seconds(pid)?,
            process_cpu_seconds(std::process::id())?,
        );
        std::thread::sleep(quiet);
        let after = (
            process_cpu_seconds(pid)?,
            process_cpu_seconds(std::process::id())?,
        );
        let limit = quiet.as_secs_f64() * 0.05;
        if after.0 - before.0 < limit && after.1 - before.1 < limit {
            return Ok(());
        }
    }
    Ok(())
}

/// The difference `a − b` in CPU µs per request within each round: median [min–max].
fn write_difference(report: &mut String, label: &str, a: &[Option<f64>], b: &[Option<f64>]) {
    let mut d: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some(x.as_ref()? - y.as_ref()?))
        .collect();
    if d.is_empty() {
        return;
    }
    let (lo, hi) = spread(&d);
    let _ = writeln!(
        report,
        "{label} within each round: median {:+.1} µs/request [{lo:+.1}–{hi:+.1}]",
        median(&mut d)
    );
}
