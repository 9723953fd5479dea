//! One worker per core: its own pinned thread, runtime, SO_REUSEPORT listener and state.
//! A connection never leaves the worker that accepted it, so nothing on the request path
//! is shared between cores except read-mostly settings.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::settings::{LocalSettings, SharedSettings};
use crate::config::DriverChoice;
use crate::runtime::shutdown::{LocalShutdown, Shutdown};
use crate::runtime::{self, DriverKind};
use crate::server::date::DateCache;
use crate::server::request_id::{RequestId, RequestIdGen};
use crate::server::service::Service;
use crate::server::stream::ClientStream;

/// A worker's state as the admin listener sees it. Written only by its worker.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    driver: AtomicU8,
    running: AtomicBool,
    requests: AtomicU64,
    connections: AtomicU64,
    settings_generation: AtomicU64,
    config_revision: AtomicU64,
    body_bytes: AtomicU64,
    usage_reported: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    tls_handshakes_failed: AtomicU64,
    /// What the worker's service counted, published about once a second; read by the
    /// admin listener's `/metrics`.
    pub metrics: std::sync::Mutex<crate::metrics::WorkerMetrics>,
}

impl WorkerStatus {
    pub fn driver(&self) -> Option<DriverKind> {
        match self.driver.load(Ordering::Acquire) {
            1 => Some(DriverKind::IoUringTuned),
            2 => Some(DriverKind::IoUring),
            3 => Some(DriverKind::Epoll),
            _ => None,
        }
    }

    fn set_driver(&self, d: DriverKind) {
        let v = match d {
            DriverKind::IoUringTuned => 1,
            DriverKind::IoUring => 2,
            DriverKind::Epoll => 3,
        };
        self.driver.store(v, Ordering::Release);
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The revision of the pushed configuration this worker has applied.
    pub fn config_revision(&self) -> u64 {
        self.config_revision.load(Ordering::Acquire)
    }

    /// Bytes of request bodies the worker's requests hold against its budget.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }

    /// Counts one request's tokens, as its provider reported them.
    pub fn add_usage(&self, input_tokens: u64, output_tokens: u64) {
        self.usage_reported.fetch_add(1, Ordering::Relaxed);
        self.input_tokens.fetch_add(input_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(output_tokens, Ordering::Relaxed);
    }

    /// Requests whose provider reported usage, and their input and output tokens, since
    /// the worker started.
    pub fn usage(&self) -> (u64, u64, u64) {
        (
            self.usage_reported.load(Ordering::Relaxed),
            self.input_tokens.load(Ordering::Relaxed),
            self.output_tokens.load(Ordering::Relaxed),
        )
    }

    /// TLS handshakes that failed or timed out since the worker started.
    pub fn tls_handshakes_failed(&self) -> u64 {
        self.tls_handshakes_failed.load(Ordering::Relaxed)
    }

    fn tls_handshake_failed(&self) {
        self.tls_handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_config_revision(&self, revision: u64) {
        self.config_revision.store(revision, Ordering::Release);
    }

    /// The settings generation this worker served its latest request under.
    pub fn settings_generation(&self) -> u64 {
        self.settings_generation.load(Ordering::Relaxed)
    }
}

/// What a connection reaches through its worker.
#[derive(Debug)]
pub struct WorkerCtx {
    pub index: usize,
    pub settings: LocalSettings,
    pub shutdown: LocalShutdown,
    pub status: Arc<WorkerStatus>,
    ids: RefCell<RequestIdGen>,
    date: RefCell<DateCache>,
    open: Cell<u64>,
    body_in_use: Rc<BudgetUse>,
    body_reads: Rc<BodyReads>,
}

/// Request bodies being waited for, in all and per client address.
#[derive(Debug, Default)]
struct BodyReads {
    total: Cell<usize>,
    by_client: RefCell<rustc_hash::FxHashMap<std::net::IpAddr, usize>>,
}

/// A worker's body bytes in use, mirrored to its status for the admin listener.
#[derive(Debug)]
struct BudgetUse {
    bytes: Cell<u64>,
    status: Arc<WorkerStatus>,
}

impl BudgetUse {
    fn set(&self, n: u64) {
        self.bytes.set(n);
        self.status.body_bytes.store(n, Ordering::Relaxed);
    }
}

impl WorkerCtx {
    pub fn new(
        index: usize,
        settings: Arc<SharedSettings>,
        shutdown: Arc<Shutdown>,
        status: Arc<WorkerStatus>,
    ) -> Self {
        let body_status = Arc::clone(&status);
        Self {
            index,
            settings: LocalSettings::new(settings),
            shutdown: LocalShutdown::new(shutdown),
            status,
            ids: RefCell::new(RequestIdGen::new()),
            date: RefCell::new(DateCache::new()),
            open: Cell::new(0),
            body_reads: Rc::new(BodyReads::default()),
            body_in_use: Rc::new(BudgetUse {
                bytes: Cell::new(0),
                status: Arc::clone(&body_status),
            }),
        }
    }

    pub fn next_request_id(&self) -> RequestId {
        self.ids.borrow_mut().next_id()
    }

    pub fn date(&self) -> [u8; 29] {
        let mut d = [0u8; 29];
        d.copy_from_slice(self.date.borrow_mut().get());
        d
    }

    /// Counts a finished request served under settings `generation`.
    pub(crate) fn finish_request(&self, generation: u64) {
        self.status.requests.fetch_add(1, Ordering::Relaxed);
        self.status
            .settings_generation
            .store(generation, Ordering::Relaxed);
    }

    fn conn_opened(&self) {
        self.open.set(self.open.get() + 1);
        self.status
            .connections
            .store(self.open.get(), Ordering::Relaxed);
    }

    fn conn_closed(&self) {
        self.open.set(self.open.get().saturating_sub(1));
        self.status
            .connections
            .store(self.open.get(), Ordering::Relaxed);
    }

    /// A reservation against this worker's memory budget for request bodies, empty so far.
    pub fn body_budget(&self, limit: u64) -> BodyBudget {
        BodyBudget {
            in_use: Rc::clone(&self.body_in_use),
            held: 0,
            limit,
        }
    }

    /// A place among the request bodies this worker waits for, if one is free for `client`
    /// (`max` in all, `per_client` for one address); given back on drop.
    pub(crate) fn body_read_slot(
        &self,
        client: std::net::IpAddr,
        max: usize,
        per_client: usize,
    ) -> Option<BodyReadSlot> {
        let reads = &self.body_reads;
        if reads.total.get() >= max {
            return None;
        }
        let mut by_client = reads.by_client.borrow_mut();
        let n = by_client.entry(client).or_insert(0);
        if *n >= per_client {
            return None;
        }
        *n += 1;
        reads.total.set(reads.total.get() + 1);
        Some(BodyReadSlot {
            reads: Rc::clone(reads),
            client,
        })
    }

    /// Bytes of request bodies held by this worker's requests.
    pub fn body_bytes_in_use(&self) -> u64 {
        self.body_in_use.bytes.get()
    }
}

/// One request body being waited for (see [`WorkerCtx::body_read_slot`]).
#[derive(Debug)]
pub(crate) struct BodyReadSlot {
    reads: Rc<BodyReads>,
    client: std::net::IpAddr,
}

impl Drop for BodyReadSlot {
    fn drop(&mut self) {
        self.reads
            .total
            .set(self.reads.total.get().saturating_sub(1));
        let mut by_client = self.reads.by_client.borrow_mut();
        if let Some(n) = by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

/// Bytes of request bodies a request holds against its worker's budget; given back on drop.
/// Bounds what concurrent large uploads can make one core buffer: past the budget a request
/// gets 503 instead of the process growing until the OOM killer picks it.
#[derive(Debug)]
pub struct BodyBudget {
    in_use: Rc<BudgetUse>,
    held: u64,
    limit: u64,
}

impl BodyBudget {
    /// Takes `n` more bytes; false (and nothing taken) when that would pass the budget.
    pub fn grow(&mut self, n: u64) -> bool {
        let in_use = self.in_use.bytes.get();
        if in_use.saturating_add(n) > self.limit {
            return false;
        }
        self.in_use.set(in_use + n);
        self.held += n;
        true
    }

    /// Grows the reservation to `total` bytes.
    pub fn grow_to(&mut self, total: u64) -> bool {
        total <= self.held || self.grow(total - self.held)
    }

    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for BodyBudget {
    fn drop(&mut self) {
        self.in_use
            .set(self.in_use.bytes.get().saturating_sub(self.held));
    }
}

/// The index of a side worker (the admin listener, the demo provider): it serves off the
/// worker cores.
pub const SIDE_WORKER: usize = usize::MAX;

/// A worker's index as logs and errors show it: its number, or `side` for a side worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerName(pub usize);

impl std::fmt::Display for WorkerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == SIDE_WORKER {
            f.write_str("side")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Everything a worker thread needs; built on the main thread, moved into the worker.
#[derive(Debug)]
pub struct WorkerSpec {
    pub index: usize,
    pub core: Option<core_affinity::CoreId>,
    pub listener: std::net::TcpListener,
    pub driver: DriverChoice,
    pub settings: Arc<SharedSettings>,
    pub shutdown: Arc<Shutdown>,
    pub status: Arc<WorkerStatus>,
    pub drain: Duration,
    /// `listener` speaks TLS with this config.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A plain-HTTP listener whose requests are refused (`https_required`), beside a TLS one.
    pub plain_refused: Option<std::net::TcpListener>,
}

/// Runs a worker on the calling thread until shutdown has drained. `started` receives the
/// driver it got, or why it could not start.
pub fn run<S, F>(
    spec: WorkerSpec,
    make_service: F,
    started: std::sync::mpsc::Sender<Result<DriverKind, String>>,
) where
    S: Service + 'static,
    F: FnOnce(&Rc<WorkerCtx>) -> S,
{
    if let Some(core) = spec.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                worker = %WorkerName(spec.index),
                core = core.id,
                "could not pin worker to its core"
            );
        }
    }
    let (mut rt, driver) = match runtime::build(spec.driver) {
        Ok(v) => v,
        Err(e) => {
            let _ = started.send(Err(format!(
                "worker {}: cannot build runtime: {e}",
                WorkerName(spec.index)
            )));
            return;
        }
    };
    spec.status.set_driver(driver);
    tracing::info!(worker = %WorkerName(spec.index), driver = %driver, core = spec.core.map(|c| c.id), "worker started");
    let ctx = Rc::new(WorkerCtx::new(
        spec.index,
        Arc::clone(&spec.settings),
        Arc::clone(&spec.shutdown),
        Arc::clone(&spec.status),
    ));
    let service = Rc::new(make_service(&ctx));
    let drain = spec.drain;
    let index = WorkerName(spec.index);
    rt.block_on(async move {
        crate::runtime::deadline::start();
        let listener = match monoio::net::TcpListener::from_std(spec.listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = started.send(Err(format!(
                    "worker {index}: cannot register listener: {e}"
                )));
                return;
            }
        };
        let plain = match spec.plain_refused.map(monoio::net::TcpListener::from_std) {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(e)) => {
                let _ = started.send(Err(format!(
                    "worker {index}: cannot register the plain-HTTP listener: {e}"
                )));
                return;
            }
        };
        let tls_port = listener.local_addr().map_or(443, |a| a.port());
        let listeners = Listeners {
            tls_port,
            main: listener,
            tls: spec.tls.map(monoio_rustls::TlsAcceptor::from),
            plain,
        };
        ctx.status.running.store(true, Ordering::Release);
        service.start();
        let housekeeping = Rc::clone(&ctx);
        monoio::spawn(async move {
            crate::runtime::alloc::collect_every_second(&housekeeping.shutdown).await;
        });
        let _ = started.send(Ok(driver));
        accept_loop(&listeners, &ctx, &service).await;
        drop(listeners);
        drain_connections(&ctx, drain).await;
        service.stopped();
        ctx.status.running.store(false, Ordering::Release);
    });
    tracing::info!(worker = %index, "worker stopped");
}

/// What a worker accepts connections from.
struct Listeners {
    main: monoio::net::TcpListener,
    /// The port of `main`, named to clients that came over plain HTTP.
    tls_port: u16,
    /// `main` speaks TLS.
    tls: Option<monoio_rustls::TlsAcceptor>,
    /// Plain HTTP beside TLS: every request on it is refused.
    plain: Option<monoio::net::TcpListener>,
}

async fn accept_plain(
    plain: Option<&monoio::net::TcpListener>,
) -> std::io::Result<(monoio::net::TcpStream, std::net::SocketAddr)> {
    match plain {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_loop<S: Service + 'static>(
    listeners: &Listeners,
    ctx: &Rc<WorkerCtx>,
    service: &Rc<S>,
) {
    loop {
        let (accepted, plain_refused) = monoio::select! {
            accepted = listeners.main.accept() => (accepted, None),
            accepted = accept_plain(listeners.plain.as_ref()) => (accepted, Some(listeners.tls_port)),
            _ = ctx.shutdown.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                ctx.conn_opened();
                let ctx = Rc::clone(ctx);
                let service = Rc::clone(service);
                let tls = listeners.tls.clone().filter(|_| plain_refused.is_none());
                monoio::spawn(async move {
                    if let Some(stream) = handshake(stream, tls, &ctx).await {
                        crate::server::conn::serve(
                            stream,
                            peer,
                            Rc::clone(&ctx),
                            service,
                            plain_refused,
                        )
                        .await;
                    }
                    ctx.conn_closed();
                });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(worker = %WorkerName(ctx.index), error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The client's stream: TLS once its handshake is done (within the head read timeout;
/// `None` when it fails or takes longer), or plain.
async fn handshake(
    stream: monoio::net::TcpStream,
    tls: Option<monoio_rustls::TlsAcceptor>,
    ctx: &WorkerCtx,
) -> Option<ClientStream> {
    let Some(acceptor) = tls else {
        return Some(ClientStream::Plain(stream));
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let timeout = ctx.settings.current().head_read_timeout;
    // Boxed: a handshake in progress holds a whole TLS session, and every connection's task
    // (plain ones included) would otherwise be as large as that.
    let accepting = Box::pin(acceptor.accept(stream));
    match crate::runtime::deadline::timeout(timeout, accepting).await {
        Ok(Ok(s)) => Some(ClientStream::Tls(Box::new(s), fd)),
        Ok(Err(e)) => {
            ctx.status.tls_handshake_failed();
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            ctx.status.tls_handshake_failed();
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// Waits for open connections to finish, up to `drain`. Idle connections close as soon as
/// they see the shutdown; busy ones finish their request and close.
async fn drain_connections(ctx: &WorkerCtx, drain: Duration) {
    let deadline = Instant::now() + drain;
    while ctx.open.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    if ctx.open.get() > 0 {
        tracing::warn!(
            worker = %WorkerName(ctx.index),
            open = ctx.open.get(),
            "drain deadline passed with connections open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_workers_are_named_side_in_logs() {
        assert_eq!(WorkerName(0).to_string(), "0");
        assert_eq!(WorkerName(17).to_string(), "17");
        assert_eq!(WorkerName(SIDE_WORKER).to_string(), "side");
    }
}
