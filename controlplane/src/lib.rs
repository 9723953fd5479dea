//! aigateway control plane: where operators manage tenants, sub-accounts, keys, routes and
//! policies, with every change audited and versioned for the data-plane nodes.

pub mod api;
pub mod keys;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_token: String,
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

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// Opens the store and serves the admin API on `listen` from a thread of its own.
pub fn start(data_dir: PathBuf, listen: SocketAddr) -> anyhow::Result<Running> {
    let store = store::Store::open(&data_dir)?;
    let token = admin_token(&data_dir)?;
    let state = Arc::new(api::AppState {
        store,
        admin_token: token.clone(),
    });
    let std_listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
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
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("listener: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
                let served = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("control plane thread exited"))??;
    tracing::info!(addr = %addr, data_dir = %data_dir.display(), "control plane listening");
    Ok(Running {
        addr,
        admin_token: token,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}
