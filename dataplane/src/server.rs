//! Starting and stopping a node: bind, spawn one worker per core and the admin thread,
//! apply reloads, drain on shutdown. `main` and the end-to-end tests both drive it.

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::admin::{AdminService, AdminState};
use crate::config::{Config, DriverChoice};
use crate::demo::DemoService;
use crate::listener;
use crate::runtime::DriverKind;
use crate::settings::SharedSettings;
use crate::shutdown::Shutdown;
use crate::worker::{self, WorkerSpec, WorkerStatus};

/// A running node.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    drivers: Vec<DriverKind>,
    config: Mutex<Config>,
    settings: Arc<SharedSettings>,
    shutdown: Arc<Shutdown>,
    admin_stop: Arc<Shutdown>,
    workers: Vec<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
    statuses: Arc<[Arc<WorkerStatus>]>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The driver each worker got, in worker order.
    pub fn drivers(&self) -> &[DriverKind] {
        &self.drivers
    }

    pub fn workers(&self) -> &[Arc<WorkerStatus>] {
        &self.statuses
    }

    /// Applies a new, already validated configuration: limits, timeouts and logging switches
    /// take effect on each worker's next request. Settings that need a restart are reported
    /// and kept. Returns the new settings generation.
    pub fn reload(&self, new: Config) -> u64 {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        for (key, old, wanted) in current.restart_only_changes(&new) {
            tracing::warn!(key, old = %old, new = %wanted, "setting needs a restart; keeping the running value");
        }
        let generation = self.settings.publish(&new);
        *current = new;
        tracing::info!(generation, "configuration reloaded");
        generation
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Stops accepting, lets in-flight requests finish (bounded by `timeouts.shutdown_drain`),
    /// and joins every thread.
    pub fn shutdown(mut self) {
        self.shutdown.trigger();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.admin_stop.trigger();
        if let Some(a) = self.admin.take() {
            let _ = a.join();
        }
    }
}

/// Binds and starts a node. Returns once every worker is accepting, or with the first
/// worker's error.
pub fn start(config: Config) -> anyhow::Result<ServerHandle> {
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = listener::bind_reuseport(config.server.listen, workers, config.server.backlog)
        .with_context(|| format!("server.listen = {}", config.server.listen))?;
    let addr = listeners[0].local_addr()?;
    let admin_listener = listener::bind_single(config.admin.listen, 128)
        .with_context(|| format!("admin.listen = {}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;

    let settings = Arc::new(SharedSettings::new(&config));
    let shutdown = Arc::new(Shutdown::default());
    let admin_stop = Arc::new(Shutdown::default());
    let statuses: Arc<[Arc<WorkerStatus>]> = (0..workers)
        .map(|_| Arc::new(WorkerStatus::default()))
        .collect();
    let cores = if config.server.pin_workers {
        core_affinity::get_core_ids()
    } else {
        None
    };
    let drain = config.timeouts.shutdown_drain;

    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(workers);
    for (index, l) in listeners.into_iter().enumerate() {
        let spec = WorkerSpec {
            index,
            core: cores
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| c[index % c.len()]),
            listener: l,
            driver: config.server.driver,
            settings: Arc::clone(&settings),
            shutdown: Arc::clone(&shutdown),
            status: Arc::clone(&statuses[index]),
            drain,
        };
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("aigw-worker-{index}"))
            .spawn(move || worker::run(spec, |_| DemoService, tx))
            .context("spawning a worker thread")?;
        handles.push(h);
    }
    drop(tx);
    let mut failure = None;
    for _ in 0..workers {
        match rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failure = Some(anyhow!(e)),
            Err(_) => failure = Some(anyhow!("a worker exited during start")),
        }
    }
    if let Some(e) = failure {
        shutdown.trigger();
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }

    let admin_state = AdminState {
        workers: Arc::clone(&statuses),
        shutdown: Arc::clone(&shutdown),
        settings: Arc::clone(&settings),
    };
    let (atx, arx) = mpsc::channel();
    let admin_spec = WorkerSpec {
        index: usize::MAX,
        core: None,
        listener: admin_listener,
        driver: DriverChoice::Epoll,
        settings: Arc::clone(&settings),
        shutdown: Arc::clone(&admin_stop),
        status: Arc::new(WorkerStatus::default()),
        drain: Duration::from_millis(200),
    };
    let admin = std::thread::Builder::new()
        .name("aigw-admin".into())
        .spawn(move || worker::run(admin_spec, move |_| AdminService::new(admin_state), atx))
        .context("spawning the admin thread")?;
    match arx.recv() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(anyhow!(e)),
        Err(_) => return Err(anyhow!("the admin thread exited during start")),
    }
    let drivers: Vec<DriverKind> = statuses.iter().filter_map(|s| s.driver()).collect();
    tracing::info!(
        addr = %addr,
        admin = %admin_addr,
        workers,
        drivers = ?drivers.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "listening"
    );
    tracing::info!(
        "serving the built-in demo provider; try: curl -s http://{addr}/v1/chat/completions \
         -H 'content-type: application/json' \
         -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
    );
    Ok(ServerHandle {
        addr,
        admin_addr,
        drivers,
        config: Mutex::new(config),
        settings,
        shutdown,
        admin_stop,
        workers: handles,
        admin: Some(admin),
        statuses,
    })
}
