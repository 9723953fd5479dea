//! Starting and stopping a node: bind, spawn one worker per core and the admin thread,
//! apply reloads, drain on shutdown. `main` and the end-to-end tests both drive it.

pub mod admin;
pub mod demo;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::config::settings::SharedSettings;
use crate::config::{Config, DriverChoice};
use crate::gateway::{Gateway, Pushed};
use crate::node::admin::{AdminService, AdminState};
use crate::node::demo::DemoService;
use crate::runtime::shutdown::Shutdown;
use crate::runtime::DriverKind;
use crate::server::listener;
use crate::server::service::{Head, Verdict};
use crate::server::worker::WorkerCtx;
use crate::server::worker::{self, WorkerSpec, WorkerStatus};

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
    demo: Option<JoinHandle<()>>,
    control: Option<JoinHandle<()>>,
    /// Looks at the TLS certificate files for changes.
    tls_reload: Option<JoinHandle<()>>,
    demo_addr: Option<SocketAddr>,
    /// The plain-HTTP listener beside TLS, when enabled.
    plain_addr: Option<SocketAddr>,
    statuses: Arc<[Arc<WorkerStatus>]>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where plain HTTP is refused beside TLS (`tls.plain_listen`), when set.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
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
    pub fn reload(&self, new: Config) -> Result<u64, String> {
        let new = match self.demo_addr {
            Some(addr) if new.upstreams.is_empty() => with_demo_upstreams(new, addr),
            _ => new,
        };
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        for (key, old, wanted) in current.restart_only_changes(&new) {
            tracing::warn!(key, old = %old, new = %wanted, "setting needs a restart; keeping the running value");
        }
        let generation = self.settings.publish(&new)?;
        *current = new;
        tracing::info!(generation, "configuration reloaded");
        Ok(generation)
    }

    /// Where the built-in demo provider listens, when it runs.
    pub fn demo_addr(&self) -> Option<SocketAddr> {
        self.demo_addr
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
        if let Some(d) = self.demo.take() {
            let _ = d.join();
        }
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        if let Some(t) = self.tls_reload.take() {
            let _ = t.join();
        }
    }
}

/// Binds and starts a node. Returns once every worker is accepting, or with the first
/// worker's error.
pub fn start(config: Config) -> anyhow::Result<ServerHandle> {
    let started = std::time::Instant::now();
    raise_fd_limit();
    let admin_stop = Arc::new(Shutdown::default());
    // No provider configured: start the built-in demo provider and route everything there,
    // through the same proxy path real providers take.
    // (With a control plane, routing comes from it instead.)
    let (config, demo, demo_addr) = if config.upstreams.is_empty() && config.control_plane.is_none()
    {
        let (handle, addr) = start_demo(&config, &admin_stop)?;
        (with_demo_upstreams(config, addr), Some(handle), Some(addr))
    } else {
        (config, None, None)
    };
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = listener::bind_reuseport(config.server.listen, workers, config.server.backlog)
        .with_context(|| format!("server.listen = {}", config.server.listen))?;
    let addr = listeners[0].local_addr()?;
    let tls = match &config.tls {
        Some(t) => Some(
            crate::config::tls::ServerTls::new(&t.cert_file, &t.key_file)
                .map_err(|e| anyhow!("tls: {e}"))?,
        ),
        None => None,
    };
    let mut plain_listeners = match config.tls.as_ref().and_then(|t| t.plain_listen) {
        Some(plain) => listener::bind_reuseport(plain, workers, config.server.backlog)
            .with_context(|| format!("tls.plain_listen = {plain}"))?,
        None => Vec::new(),
    };
    let plain_addr = match plain_listeners.first() {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    plain_listeners.reverse();
    let admin_listener = listener::bind_single(config.admin.listen, 128)
        .with_context(|| format!("admin.listen = {}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;

    let settings = Arc::new(SharedSettings::new(&config).map_err(|e| anyhow!(e))?);
    let shutdown = Arc::new(Shutdown::default());
    let statuses: Arc<[Arc<WorkerStatus>]> = (0..workers)
        .map(|_| Arc::new(WorkerStatus::default()))
        .collect();
    let cores = if config.server.pin_workers {
        core_affinity::get_core_ids()
    } else {
        None
    };
    let drain = config.timeouts.shutdown_drain;
    let mut control = None;

    let keys = match &config.control_plane {
        Some(cp) => {
            let shared = Arc::new(crate::config::pushed::SharedConfig::default());
            shared.bodies.set_limit(cp.body_log_queue_bytes);
            let served: Vec<_> = cp
                .environments
                .iter()
                .filter_map(|e| aigw_wire::keys::Environment::from_name(e))
                .collect();
            let persist = match &cp.snapshot_file {
                Some(path) => {
                    let dir = match path.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d,
                        _ => std::path::Path::new("."),
                    };
                    if crate::seal::files::private_dir(dir).with_context(|| {
                        format!("control_plane.snapshot_file: directory {}", dir.display())
                    })? {
                        tracing::warn!(dir = %dir.display(), "narrowed the sealed snapshot's directory to mode 0700");
                    }
                    match cp.data_key() {
                        Ok(kek) => Some(crate::config::link::Persist {
                            path: path.clone(),
                            kek,
                            key_source: cp.seal_key_source(),
                        }),
                        // Fail closed for what is sealed, not for the node: it neither reads
                        // nor overwrites the sealed files (the right key still opens them),
                        // and serves once its control plane sends a configuration.
                        Err(e) => {
                            tracing::error!(error = %e, "the sealed snapshot and usage spill cannot be used: nothing is read from or written to them until the node starts with the right seal key");
                            None
                        }
                    }
                }
                None => None,
            };
            if let Some(p) = &persist {
                crate::config::link::boot_from_disk(p, &shared);
            }
            control = Some(crate::config::link::spawn(
                cp.clone(),
                Arc::clone(&shared),
                Arc::clone(&admin_stop),
                persist,
            )?);
            // Guardrails come with the pushed policies: the scanner is built once, here,
            // and shared by every worker (each with its own scratch).
            let compiling = std::time::Instant::now();
            let scanner = match crate::gateway::guard::scanner() {
                Ok(s) => {
                    tracing::debug!(
                        ms = compiling.elapsed().as_millis() as u64,
                        "guardrail scanner built"
                    );
                    Some(s)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the guardrail scanner cannot be built; requests of environments with guardrails are refused");
                    None
                }
            };
            Some(Pushed {
                config: shared,
                served,
                max_stale: cp.max_stale,
                scanner,
            })
        }
        None => {
            tracing::warn!("no control plane configured: requests are NOT authenticated (quick start and tests only)");
            None
        }
    };
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
            tls: tls.as_ref().map(|t| Arc::clone(&t.config)),
            plain_refused: plain_listeners.pop(),
        };
        let tx = tx.clone();
        let pushed = keys.clone();
        let h = std::thread::Builder::new()
            .name(format!("aigw-worker-{index}"))
            .spawn(move || worker::run(spec, |w| Gateway::new(w, pushed), tx))
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
        admin_stop.trigger();
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }

    let admin_state = AdminState {
        workers: Arc::clone(&statuses),
        shutdown: Arc::clone(&shutdown),
        settings: Arc::clone(&settings),
        keys: keys.as_ref().map(|p| (Arc::clone(&p.config), p.max_stale)),
        started,
    };
    let mut admin_spec = side_worker(
        admin_listener,
        DriverChoice::Epoll,
        Arc::clone(&settings),
        Arc::clone(&admin_stop),
    );
    // A node that serves TLS serves its admin listener over TLS too, with the same
    // certificate (reloaded with it) and HSTS.
    admin_spec.tls = tls.as_ref().map(|t| Arc::clone(&t.config));
    let admin = spawn_side_worker("aigw-admin", admin_spec, move |w| {
        AdminService::new(w, admin_state)
    })?;
    let drivers: Vec<DriverKind> = statuses.iter().filter_map(|s| s.driver()).collect();
    tracing::info!(
        addr = %addr,
        admin = %admin_addr,
        workers,
        drivers = ?drivers.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "listening"
    );
    if demo_addr.is_some() {
        tracing::info!(
            "serving the built-in demo provider; try: curl -s http://{addr}/v1/chat/completions \
         -H 'content-type: application/json' \
         -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
        );
    }
    let tls_reload = match tls {
        Some(t) => {
            let stop = Arc::clone(&admin_stop);
            Some(
                std::thread::Builder::new()
                    .name("aigw-tls-reload".into())
                    .spawn(move || {
                        while !stop.sleep(crate::config::tls::RELOAD_EVERY) {
                            t.certificate.reload_if_changed();
                        }
                    })
                    .context("spawning the TLS certificate watcher")?,
            )
        }
        None => None,
    };
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(addr = %addr, "serving plain HTTP off loopback: API keys and prompts cross the network in clear unless TLS is terminated in front of this node; configure [tls] to serve TLS 1.3 here");
    }
    if let Some(plain) = plain_addr {
        tracing::info!(addr = %plain, "plain HTTP beside TLS: every request there is refused with https_required");
    }
    Ok(ServerHandle {
        tls_reload,
        plain_addr,
        addr,
        admin_addr,
        drivers,
        config: Mutex::new(config),
        settings,
        shutdown,
        admin_stop,
        workers: handles,
        admin: Some(admin),
        demo,
        control,
        demo_addr,
        statuses,
    })
}

/// A worker that serves one side job (admin listener, demo provider) off the worker cores.
fn side_worker(
    listener: std::net::TcpListener,
    driver: DriverChoice,
    settings: Arc<SharedSettings>,
    shutdown: Arc<Shutdown>,
) -> WorkerSpec {
    WorkerSpec {
        index: crate::server::worker::SIDE_WORKER,
        core: None,
        listener,
        driver,
        settings,
        shutdown,
        status: Arc::new(WorkerStatus::default()),
        drain: Duration::from_millis(200),
        tls: None,
        plain_refused: None,
    }
}

/// Runs `spec` on a thread named `name`; returns once it is accepting, or with its error.
fn spawn_side_worker<S, F>(
    name: &str,
    spec: WorkerSpec,
    make_service: F,
) -> anyhow::Result<JoinHandle<()>>
where
    S: crate::server::service::Service + 'static,
    F: FnOnce(&std::rc::Rc<crate::server::worker::WorkerCtx>) -> S + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || worker::run(spec, make_service, tx))
        .with_context(|| format!("spawning {name}"))?;
    match rx.recv() {
        Ok(Ok(_)) => Ok(handle),
        Ok(Err(e)) => Err(anyhow!(e)),
        Err(_) => Err(anyhow!("{name} exited during start")),
    }
}

/// Settings for the demo provider: the node's, without its upstreams and access log.
fn demo_settings(config: &Config) -> anyhow::Result<Arc<SharedSettings>> {
    let mut demo = Config {
        upstreams: Vec::new(),
        routes: Vec::new(),
        ..config.clone()
    };
    demo.log.access = false;
    Ok(Arc::new(
        SharedSettings::new(&demo).map_err(|e| anyhow!(e))?,
    ))
}

/// Runs the demo provider on its own thread, on a loopback port of its own.
pub(crate) fn start_demo(
    config: &Config,
    stop: &Arc<Shutdown>,
) -> anyhow::Result<(JoinHandle<()>, SocketAddr)> {
    let listener = listener::bind_single(SocketAddr::from(([127, 0, 0, 1], 0)), 1024)
        .context("binding the demo provider")?;
    let addr = listener.local_addr()?;
    let spec = side_worker(
        listener,
        DriverChoice::Epoll,
        demo_settings(config)?,
        Arc::clone(stop),
    );
    Ok((
        spawn_side_worker("aigw-demo", spec, DemoService::new)?,
        addr,
    ))
}

/// Runs only the demo provider (no gateway) on `listen`, on the calling thread, until the
/// process ends: the mock provider of the load harness.
pub fn run_demo_provider(listen: SocketAddr, driver: DriverChoice) -> anyhow::Result<()> {
    let listener =
        listener::bind_single(listen, 4096).with_context(|| format!("binding {listen}"))?;
    let spec = side_worker(
        listener,
        driver,
        demo_settings(&Config::default())?,
        Arc::new(Shutdown::default()),
    );
    let _ = spawn_side_worker("aigw-demo", spec, DemoService::new)?.join();
    Ok(())
}

/// The config with two upstreams on the demo provider (one per API family) and a catch-all
/// route to them.
fn with_demo_upstreams(mut config: Config, addr: SocketAddr) -> Config {
    use crate::config::{NonRetention, ProviderKind, RouteConfig, RouteTarget, UpstreamConfig};
    let upstream = |name: &str, kind| UpstreamConfig {
        name: name.to_string(),
        kind,
        base_url: format!("http://{addr}"),
        credential_env: None,
        credential_file: None,
        ca_file: None,
        danger_accept_invalid_certs: false,
        max_connections: crate::config::default_max_connections(),
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(60),
        read_idle_timeout: Duration::from_secs(60),
        pool_idle_timeout: Duration::from_secs(60),
        non_retention: Some(NonRetention::AccountAgreement {}),
        stream_options: true,
        pass_organization_headers: false,
        region: "local".into(),
        baa: false,
    };
    config.upstreams = vec![
        upstream("demo-openai", ProviderKind::Openai),
        upstream("demo-anthropic", ProviderKind::Anthropic),
    ];
    let targets = vec![
        RouteTarget {
            upstream: "demo-openai".into(),
            model: None,
        },
        RouteTarget {
            upstream: "demo-anthropic".into(),
            model: None,
        },
    ];
    config.routes = vec![
        RouteConfig {
            model: Some(crate::node::demo::DEMO_MODEL.into()),
            prefix: None,
            targets: targets.clone(),
        },
        RouteConfig {
            model: None,
            prefix: Some(String::new()),
            targets,
        },
    ];
    config
}

/// The head step of the side services (admin listener, demo provider): every request may
/// send its body, within the worker's budget.
fn whole_request(worker: &WorkerCtx, head: &Head<'_>) -> Verdict<()> {
    let mut budget = worker.body_budget(worker.settings.current().body_budget_bytes);
    if head.content_length().is_some_and(|n| !budget.grow(n)) {
        let err = crate::errors::ApiError::from(crate::errors::Code::ServerBusy);
        let family = crate::errors::family_for_path(head.path_only());
        return Verdict::Answer((), crate::server::service::Response::error(&err, family));
    }
    Verdict::Proceed((), budget)
}

/// Every client connection and every upstream connection is a descriptor, and a node serves
/// thousands of streams per core: the soft limit is raised to the hard one, as nginx's
/// `worker_rlimit_nofile` does.
#[allow(unsafe_code)]
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit struct that lives on this
    // stack frame for the duration of the calls.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        soft < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
    };
    if raised {
        tracing::debug!(limit = limit.rlim_cur, "raised the open file limit");
    }
    if limit.rlim_cur < 65_536 {
        tracing::warn!(
            limit = limit.rlim_cur,
            "the open file limit is low for a gateway (each client and upstream connection takes one); raise it (ulimit -n, LimitNOFILE=)"
        );
    }
}
