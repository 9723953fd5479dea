//! `aigw-bench tls`: the data plane's client TLS against nginx's, on the same ECDSA P-256
//! certificate, TLS 1.3 only, X25519, without session resumption, one worker each on the
//! same core, interleaved over rounds:
//!
//! - **handshakes**: every connection a full handshake and one request answered by the
//!   proxy itself (`GET /v1/models`), then closed: handshakes per second and the proxy's CPU
//!   per connection. The client (rustls, resumption off, X25519 only) runs on the load core.
//! - **requests**: wrk over keep-alive TLS connections, chat completions proxied to the mock
//!   provider: the proxy's CPU per request.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::harness::{
    bench_dir, cpu_seconds, free_addr, median, pin_current_thread, round_order, run_dir,
    sibling_binary, spread, start_dataplane, start_mock, start_nginx, wait_port, write_ratio,
    DataPlane,
};

/// Options of `aigw-bench tls`.
#[derive(Debug, clap::Args)]
pub(crate) struct TlsOpts {
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds per run (each scenario, each target).
    #[arg(long, default_value_t = 4)]
    duration: u64,
    /// Keep-alive connections of the requests scenario.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Client threads of the handshakes scenario.
    #[arg(long, default_value_t = 8)]
    handshakers: usize,
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    #[arg(long, default_value_t = 1)]
    load_core: usize,
}

/// A CA and a server certificate for `localhost` signed by it (ECDSA P-256, rcgen's
/// default), written as `chain.pem` (leaf, then CA) and `key.pem` in `dir`; returns the
/// CA's PEM.
fn certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
    let (chain, key_file) = (dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem()))?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok((chain, key_file, ca.pem()))
}

/// The handshake client's TLS: TLS 1.3, X25519 only, no resumption, trusting `ca_pem`.
fn client_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// One connection: a full handshake, `GET /v1/models`, the answer read to its end.
fn one_connection(tls: &Arc<rustls::ClientConfig>, addr: SocketAddr) -> anyhow::Result<()> {
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(Arc::clone(tls), name)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sk-bench\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::with_capacity(1024);
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    if !out.starts_with(b"HTTP/1.1 200") {
        bail!(
            "{addr} answered wrongly: {}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    }
    Ok(())
}

/// `threads` clients on `core` opening connections to `addr` for `duration`: connections
/// completed.
fn handshakes(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    core: usize,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + duration;
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (done, failed, tls) = (Arc::clone(&done), Arc::clone(&failed), Arc::clone(tls));
            s.spawn(move || {
                let _ = pin_current_thread(core);
                while Instant::now() < end && !failed.load(Ordering::Relaxed) {
                    match one_connection(&tls, addr) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("aigw-bench tls: {e:#}");
                            failed.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        bail!("connections to {addr} failed");
    }
    Ok(done.load(Ordering::Relaxed))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    handshakes_per_s: f64,
    cpu_us_per_handshake: f64,
    requests_per_s: f64,
    cpu_us_per_request: f64,
}

pub(crate) fn tls(opts: &TlsOpts) -> anyhow::Result<()> {
    let dir = run_dir("tls")?;
    let (chain, key, ca_pem) = certificate(&dir)?;
    let client = client_config(&ca_pem)?;
    let (mock, mock_addr) = start_mock(opts.load_core)?;
    let nginx_addr = free_addr()?;
    let nginx = start_nginx(
        "nginx-tls.conf.in",
        opts.proxy_core,
        &dir,
        nginx_addr,
        mock_addr,
        &[
            ("@CERT@", chain.display().to_string()),
            ("@KEY@", key.display().to_string()),
        ],
    )?;
    let dp_binary = sibling_binary("dataplane")?;
    let dp_addr = free_addr()?;
    let sections = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        chain.display().to_string(),
        key.display().to_string()
    );
    let dp = start_dataplane(
        &DataPlane {
            name: "dataplane",
            binary: &dp_binary,
            upstream_extra: "",
            env: &[],
            sections: &sections,
        },
        opts.proxy_core,
        &dir,
        dp_addr,
        mock_addr,
    )?;
    let targets = [
        ("nginx", nginx_addr, nginx.id()),
        ("dataplane", dp_addr, dp.id()),
    ];
    for (_, addr, _) in &targets {
        wait_port(*addr)?;
        one_connection(&client, *addr).with_context(|| format!("probing {addr}"))?;
    }
    // wrk (OpenSSL) does not verify the certificate; it negotiates TLS 1.3 with X25519 here
    // because both servers offer nothing else.
    let script = bench_dir().join("chat.lua");
    eprintln!(
        "aigw-bench tls: {} rounds × 2 targets × 2 scenarios × {}s; proxy on core {}, clients + mock on core {}",
        opts.rounds, opts.duration, opts.proxy_core, opts.load_core
    );
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    let duration = Duration::from_secs(opts.duration);
    for round in 0..opts.rounds {
        for i in round_order(round, targets.len()) {
            let (name, addr, pid) = targets[i];
            let before = cpu_seconds(pid)?;
            let started = Instant::now();
            let n = handshakes(&client, addr, opts.load_core, opts.handshakers, duration)?;
            let elapsed = started.elapsed().as_secs_f64();
            let after = cpu_seconds(pid)?;
            let per_handshake = (after - before) * 1e6 / n.max(1) as f64;
            let before = cpu_seconds(pid)?;
            let (requests, rps, _, _) = crate::wrk_run::wrk_url(
                opts.load_core,
                opts.connections,
                opts.duration,
                &script,
                &format!("https://localhost:{}/v1/chat/completions", addr.port()),
            )?;
            let after = cpu_seconds(pid)?;
            let s = Sample {
                handshakes_per_s: n as f64 / elapsed,
                cpu_us_per_handshake: per_handshake,
                requests_per_s: rps,
                cpu_us_per_request: (after - before) * 1e6 / requests.max(1) as f64,
            };
            eprintln!(
                "round {} {:>9}: {:>7.0} handshakes/s  CPU/handshake {:>6.1}µs  |  {:>7.0} req/s  CPU/request {:>5.1}µs",
                round + 1,
                name,
                s.handshakes_per_s,
                s.cpu_us_per_handshake,
                s.requests_per_s,
                s.cpu_us_per_request
            );
            samples[i].push(s);
        }
    }
    println!("{}", report(&targets, &samples));
    drop(dp);
    drop(nginx);
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn report(targets: &[(&str, SocketAddr, u32)], samples: &[Vec<Sample>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| target | handshakes/s | CPU µs per handshake (+1 local answer) | req/s (keep-alive) | CPU µs per TLS request |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let cell = |v: Vec<f64>, digits: usize| {
        let (lo, hi) = spread(&v);
        let mut v = v;
        let m = median(&mut v);
        format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
    };
    for (i, (name, _, _)) in targets.iter().enumerate() {
        let s = &samples[i];
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            cell(s.iter().map(|x| x.handshakes_per_s).collect(), 0),
            cell(s.iter().map(|x| x.cpu_us_per_handshake).collect(), 1),
            cell(s.iter().map(|x| x.requests_per_s).collect(), 0),
            cell(s.iter().map(|x| x.cpu_us_per_request).collect(), 1),
        );
    }
    let of = |name: &str, f: fn(&Sample) -> f64| -> Vec<Option<f64>> {
        targets
            .iter()
            .position(|(n, _, _)| *n == name)
            .map(|i| samples[i].iter().map(|s| Some(f(s))).collect())
            .unwrap_or_default()
    };
    write_ratio(
        &mut out,
        "dataplane / nginx CPU per handshake",
        &of("dataplane", |s| s.cpu_us_per_handshake),
        &of("nginx", |s| s.cpu_us_per_handshake),
    );
    write_ratio(
        &mut out,
        "dataplane / nginx CPU per TLS request",
        &of("dataplane", |s| s.cpu_us_per_request),
        &of("nginx", |s| s.cpu_us_per_request),
    );
    out
}
