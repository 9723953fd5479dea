//! Name resolution off the worker threads.
//!
//! `getaddrinfo` blocks; a worker that called it would stall every connection on its core.
//! Lookups go to a small pool of resolver threads and come back over a oneshot channel;
//! each worker caches answers for a short time, so the pool sees roughly one lookup per
//! upstream host per worker per TTL.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const RESOLVER_THREADS: usize = 2;
/// How long a worker reuses an answer. The system resolver does not report TTLs.
const CACHE_TTL: Duration = Duration::from_secs(30);

struct Job {
    host: String,
    port: u16,
    reply: futures_channel::oneshot::Sender<io::Result<Vec<SocketAddr>>>,
}

fn pool() -> &'static Mutex<mpsc::Sender<Job>> {
    static POOL: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..RESOLVER_THREADS {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("aigw-dns-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let result = (job.host.as_str(), job.port)
                        .to_socket_addrs()
                        .map(|a| a.collect());
                    let _ = job.reply.send(result);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a resolver thread");
            }
        }
        Mutex::new(tx)
    })
}

/// Resolves on the resolver pool.
async fn resolve_blocking(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let (reply, rx) = futures_channel::oneshot::channel();
    let job = Job {
        host: host.to_string(),
        port,
        reply,
    };
    pool()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("resolver pool stopped"))?;
    rx.await
        .map_err(|_| io::Error::other("resolver dropped the lookup"))?
}

/// Addresses for a (host, port), and when they were looked up.
type Answers = HashMap<(String, u16), (Vec<SocketAddr>, Instant)>;

/// A worker's cache of answers.
#[derive(Debug, Default)]
pub struct DnsCache {
    entries: RefCell<Answers>,
}

impl DnsCache {
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_string(), port);
        if let Some((addrs, at)) = self.entries.borrow().get(&key) {
            if at.elapsed() < CACHE_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = resolve_blocking(host, port).await?;
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ));
        }
        self.entries
            .borrow_mut()
            .insert(key, (addrs.clone(), Instant::now()));
        Ok(addrs)
    }
}
