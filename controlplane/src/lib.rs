//! aigateway control plane: where operators manage tenants, sub-accounts, keys, routes and
//! policies, with every change audited and versioned for the data-plane nodes.

pub mod api;
pub mod keys;
pub mod pki;
pub mod push;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// Where a control plane keeps its data and listens.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Admin REST API.
    pub api_listen: SocketAddr,
    /// The wire-protocol link data-plane nodes connect to (TLS).
    pub push_listen: SocketAddr,
    /// Extra names for the generated server certificate.
    pub tls_names: Vec<String>,
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub push_addr: SocketAddr,
    pub admin_token: String,
    pub node_token: String,
    /// The CA nodes must trust for the link.
    pub ca_file: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The admin token: `AIGW_ADMIN_TOKEN`, else `<data_dir>/admin-token`, created (random,
/// mode 0600) at first start so the quick start needs no setup.
pub fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("AIGW_ADMIN_TOKEN") {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let path = data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    std::fs::create_dir_all(data_dir)?;
    let token = format!(
        "aigw_admin_{}",
        keys::random_id(40).map_err(|e| anyhow::anyhow!("{e}"))?
    );
    write_private(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    tracing::warn!(path = %path.display(), "generated an admin token; keep it secret");
    Ok(token)
}

pub(crate) fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// Opens the store and serves the admin API and the node link from a thread of its own.
pub fn start(opts: Options) -> anyhow::Result<Running> {
    let store = Arc::new(store::Store::open(&opts.data_dir)?);
    let token = admin_token(&opts.data_dir)?;
    let node_token = pki::node_token(&opts.data_dir)?;
    let pki = pki::Pki::under(&opts.data_dir);
    pki.ensure(&opts.tls_names)?;
    let tls = pki.server_config()?;
    let (revision_tx, _) = tokio::sync::watch::channel(store.revision()?);
    let push = Arc::new(push::PushState {
        store: Arc::clone(&store),
        revision: revision_tx,
        nodes: std::sync::Mutex::new(Default::default()),
        node_token: node_token.clone(),
    });
    let state = Arc::new(api::AppState {
        store,
        admin_token: token.clone(),
        push: Arc::clone(&push),
    });
    let api_listener = std::net::TcpListener::bind(opts.api_listen)
        .with_context(|| format!("binding {}", opts.api_listen))?;
    api_listener.set_nonblocking(true)?;
    let addr = api_listener.local_addr()?;
    let push_listener = std::net::TcpListener::bind(opts.push_listen)
        .with_context(|| format!("binding {}", opts.push_listen))?;
    push_listener.set_nonblocking(true)?;
    let push_addr = push_listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("aigw-cp".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let (api, link) = match (
                    tokio::net::TcpListener::from_std(api_listener),
                    tokio::net::TcpListener::from_std(push_listener),
                ) {
                    (Ok(a), Ok(l)) => (a, l),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("listener: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let link_task = tokio::spawn(push::serve(link, tls, push));
                let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
                let served = axum::serve(api, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "admin API stopped");
                }
                link_task.abort();
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("control plane thread exited"))??;
    tracing::info!(api = %addr, link = %push_addr, data_dir = %opts.data_dir.display(), "control plane listening");
    Ok(Running {
        addr,
        push_addr,
        admin_token: token,
        node_token,
        ca_file: pki.ca_cert,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}
