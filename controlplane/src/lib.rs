//! aigateway control plane: where operators manage tenants, sub-accounts, keys, routes and
//! policies, with every change audited and versioned for the data-plane nodes.

pub mod api;
pub mod bodylog;
pub mod cli;
pub mod client;
pub mod keys;
pub mod kms;
pub mod local;
pub mod pki;
pub mod push;
pub mod rate_leases;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// Changelog entries kept by default; a node further behind gets a snapshot.
pub const DEFAULT_CHANGELOG_KEEP: u64 = 100_000;

/// How often each tenant's own KMS key is asked for its state by default.
pub const DEFAULT_KMS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a KMS that did not answer is asked again (at most).
const KMS_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the changelog is compacted (and once at start).
const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a control plane keeps its data and listens.
#[derive(Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Admin REST API.
    pub api_listen: SocketAddr,
    /// How the admin API is served: TLS 1.3 by default.
    pub api_tls: api::transport::ApiTls,
    /// The wire-protocol link data-plane nodes connect to (TLS).
    pub push_listen: SocketAddr,
    /// Extra names for the generated server certificate (the link's and the admin API's).
    pub tls_names: Vec<String>,
    /// The key sealing provider credentials at rest: 64 hex digits. `None`: the key in
    /// `<data_dir>/seal.key`, generated (mode 0600) at first start.
    pub seal_key: Option<String>,
    /// Changelog entries kept by compaction (at start, then every minute).
    pub changelog_keep: u64,
    /// How often each tenant's own KMS key is asked for its state (see [`watch_kms`]).
    pub kms_check_every: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./aigw-data"),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 9900)),
            api_tls: api::transport::ApiTls::default(),
            push_listen: SocketAddr::from(([127, 0, 0, 1], 9443)),
            tls_names: Vec::new(),
            seal_key: None,
            changelog_keep: DEFAULT_CHANGELOG_KEEP,
            kms_check_every: DEFAULT_KMS_CHECK_EVERY,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("data_dir", &self.data_dir)
            .field("api_listen", &self.api_listen)
            .field("api_tls", &self.api_tls)
            .field("push_listen", &self.push_listen)
            .field("tls_names", &self.tls_names)
            .field("seal_key", &self.seal_key.as_ref().map(|_| "(redacted)"))
            .field("changelog_keep", &self.changelog_keep)
            .field("kms_check_every", &self.kms_check_every)
            .finish()
    }
}

/// Where state lives unless a directory is given: `$AIGW_DATA_DIR`, else
/// `$XDG_STATE_HOME/aigateway`, else `~/.local/state/aigateway` — outside any source tree —
/// then `sub` under it.
pub fn default_data_dir(sub: &str) -> PathBuf {
    let base = std::env::var_os("AIGW_DATA_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .filter(|v| !v.is_empty())
                .map(|d| PathBuf::from(d).join("aigateway"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state/aigateway"))
        })
        .unwrap_or_else(|| PathBuf::from("aigateway-state"));
    base.join(sub)
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    /// The admin API's address.
    pub addr: SocketAddr,
    pub push_addr: SocketAddr,
    pub admin_token: String,
    /// The CA nodes must trust for the link, and clients for the admin API unless it has
    /// the operator's certificate.
    pub ca_file: PathBuf,
    plain_http: bool,
    push: Arc<push::PushState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The body log's writer.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// The store it serves (for embedding it, and for tests).
    pub fn store(&self) -> &Arc<store::Store> {
        &self.push.store
    }

    /// The admin API's URL: `https://<addr>`, or `http://<addr>` when it serves plain HTTP.
    pub fn api_url(&self) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// Registers node `id` with `scope` (as `POST /v1/nodes` does, audited as the embedding
    /// program) and returns its one-time enrolment token, valid for an hour.
    pub fn add_node(&self, id: &str, scope: &store::NodeScope) -> anyhow::Result<String> {
        let actor = store::Actor {
            principal: "control-plane".into(),
            source: "embedded".into(),
        };
        let (_, token) = self.push.store.add_node(&actor, id, scope, None)?;
        self.push.registry_changed();
        Ok(token)
    }

    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            // Nothing writes any more: every open body log segment gets its final record,
            // and the writer is gone (with its hold on the database) before stop returns.
            if let Some(log) = self.push.bodylog.get() {
                log.close();
            }
            if let Some(w) = self.writer.take() {
                let _ = w.join();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// A token from `var` when set, else from the secret file `path`, else a new one written
/// there (atomically, mode 0600). A short token, from either, is refused: it is not a
/// credential.
pub(crate) fn token(var: &str, path: &Path, prefix: &str, what: &str) -> anyhow::Result<String> {
    use aigw_seal::files::{read_private, write_private, SecretFileError};
    use aigw_wire::keys::{token_is_acceptable, MIN_TOKEN_LEN};
    if let Ok(t) = std::env::var(var) {
        let t = t.trim().to_string();
        if !token_is_acceptable(&t) {
            anyhow::bail!(
                "{var} holds a {what} of {} characters; it must be at least {MIN_TOKEN_LEN} printable characters",
                t.len()
            );
        }
        return Ok(t);
    }
    match read_private(path) {
        Ok(t) if token_is_acceptable(&t) => return Ok(t),
        Ok(t) => anyhow::bail!(
            "{} holds a {what} of {} characters (at least {MIN_TOKEN_LEN} are needed); remove the file to have one generated",
            path.display(),
            t.len()
        ),
        Err(SecretFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("{e}"),
    }
    let token = format!(
        "{prefix}{}",
        keys::random_id(40).map_err(|e| anyhow::anyhow!("{e}"))?
    );
    write_private(path, token.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    tracing::warn!(path = %path.display(), "generated the {what}; keep it secret");
    Ok(token)
}

/// The admin token: `AIGW_ADMIN_TOKEN`, else `<data_dir>/admin-token`, created (random,
/// mode 0600) at first start so the quick start needs no setup.
pub fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    aigw_seal::files::private_dir(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    token(
        "AIGW_ADMIN_TOKEN",
        &data_dir.join("admin-token"),
        "aigw_admin_",
        "admin token",
    )
}

/// The key sealing provider credentials: `configured` (64 hex digits) when given, else
/// `<data_dir>/seal.key`, generated (random, mode 0600) at first start. Losing that file
/// loses the stored credentials: back it up with the database, or pass the key in.
pub fn seal_key(data_dir: &Path, configured: Option<&str>) -> anyhow::Result<aigw_seal::Kek> {
    use aigw_seal::files::{read_private, write_private, SecretFileError};
    if let Some(hex) = configured {
        return aigw_seal::Kek::from_hex(hex).map_err(|e| anyhow::anyhow!("seal_key: {e}"));
    }
    aigw_seal::files::private_dir(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    let path = data_dir.join("seal.key");
    match read_private(&path) {
        Ok(hex) => {
            return aigw_seal::Kek::from_hex(&hex)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(SecretFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("{e}")),
    }
    let kek = aigw_seal::Kek::generate().map_err(|e| anyhow::anyhow!("seal key: {e}"))?;
    write_private(&path, format!("{}\n", kek.to_hex()).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::warn!(path = %path.display(), "generated the key sealing provider credentials; back it up with the database");
    Ok(kek)
}

/// The data key of `data_dir`'s keyring, opened with the key-encryption key `master`:
/// what seals credentials and files there. A store from before keyrings (sealed with the
/// key-encryption key itself) adopts that key as its data key.
pub fn data_key(data_dir: &Path, master: &aigw_seal::Kek) -> anyhow::Result<aigw_seal::Kek> {
    aigw_seal::files::private_dir(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    let existing = data_dir.join("controlplane.db").exists();
    aigw_seal::keyring::unlock(
        &data_dir.join("keyring"),
        master,
        existing.then_some(master),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Replaces the key-encryption key of `data_dir` (`configured`, else `<data_dir>/seal.key`)
/// with `new`: only the keyring is rewritten, and a control plane running on it keeps
/// running. When the key was `<data_dir>/seal.key`, that file gets the new key too (the
/// keyring opens with both keys until it has). Returns what the operator must do next.
pub fn rotate_seal_key(
    data_dir: &Path,
    configured: Option<&str>,
    new: &aigw_seal::Kek,
) -> anyhow::Result<String> {
    use aigw_seal::keyring;
    let key_file = data_dir.join("seal.key");
    let old = match configured {
        Some(hex) => aigw_seal::Kek::from_hex(hex).map_err(|e| anyhow::anyhow!("seal key: {e}"))?,
        None => {
            let text = aigw_seal::files::read_private(&key_file)
                .map_err(|e| anyhow::anyhow!("the current seal key: {e}"))?;
            aigw_seal::Kek::from_hex(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?
        }
    };
    data_key(data_dir, &old).context("opening the keyring with the current seal key")?;
    let ring = data_dir.join("keyring");
    keyring::begin_rotation(&ring, &old, new).map_err(|e| anyhow::anyhow!("{e}"))?;
    if configured.is_none() {
        aigw_seal::files::write_private(&key_file, format!("{}\n", new.to_hex()).as_bytes())
            .with_context(|| format!("writing {}", key_file.display()))?;
    }
    keyring::finish_rotation(&ring, new).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(match configured {
        None => format!(
            "the seal key is replaced: {} holds the new one and {} opens with it only",
            key_file.display(),
            ring.display()
        ),
        Some(_) => format!(
            "{} opens with the new seal key only: start the control plane with it (AIGW_SEAL_KEY or --seal-key-file)",
            ring.display()
        ),
    })
}

/// Opens the store and serves the admin API and the node link from a thread of its own.
pub fn start(opts: Options) -> anyhow::Result<Running> {
    // What cannot serve is refused first, then the addresses: a busy port fails the start
    // before anything is written.
    api::transport::check(&opts.api_tls, opts.api_listen)?;
    let operator_tls = api::transport::operator_config(&opts.api_tls)?;
    let api_listener = std::net::TcpListener::bind(opts.api_listen)
        .with_context(|| format!("binding {}", opts.api_listen))?;
    api_listener.set_nonblocking(true)?;
    let addr = api_listener.local_addr()?;
    let push_listener = std::net::TcpListener::bind(opts.push_listen)
        .with_context(|| format!("binding {}", opts.push_listen))?;
    push_listener.set_nonblocking(true)?;
    let push_addr = push_listener.local_addr()?;
    let master = seal_key(&opts.data_dir, opts.seal_key.as_deref())?;
    let kek = data_key(&opts.data_dir, &master)?;
    let store = Arc::new(
        store::Store::open(&opts.data_dir, kek.clone()).with_context(|| match opts.seal_key {
            Some(_) => "with the seal key passed in (AIGW_SEAL_KEY overrides <data-dir>/seal.key)"
                .to_string(),
            None => format!(
                "with the seal key in {}",
                opts.data_dir.join("seal.key").display()
            ),
        })?,
    );
    let keep = i64::try_from(opts.changelog_keep).unwrap_or(i64::MAX);
    let token = admin_token(&opts.data_dir)?;
    let pki = pki::Pki::under(&opts.data_dir);
    pki.ensure(&opts.tls_names)?;
    let tls = pki.server_config()?;
    let api_tls = match (&opts.api_tls, operator_tls) {
        (api::transport::ApiTls::InsecurePlainHttp, _) => None,
        (_, Some(operator)) => Some(operator),
        (_, None) => Some(api::transport::generated_config(&pki)?),
    };
    let plain_http = api_tls.is_none();
    let ca_file = pki.ca_cert.clone();
    let push = Arc::new(push::PushState::new(Arc::clone(&store), pki)?);
    let bodies_dir = opts.data_dir.join("bodies");
    aigw_seal::files::private_dir(&bodies_dir)
        .with_context(|| format!("body log directory {}", bodies_dir.display()))?;
    let body_index = Arc::new(store::Store::open_body_index(
        &opts.data_dir,
        kek.clone(),
        store.kms_handle(),
    )?);
    let (bodylog, writer) = bodylog::BodyLog::start(
        kek,
        body_index,
        Arc::new(bodylog::DirStore::new(bodies_dir)),
    )?;
    let sweeper = bodylog.clone();
    let _ = push.bodylog.set(bodylog);
    let compact_store = Arc::clone(&store);
    let kms_watch = (Arc::clone(&store), Arc::clone(&push), opts.kms_check_every);
    let push_state = Arc::clone(&push);
    let state = Arc::new(api::AppState {
        store,
        admin_token: token.clone(),
        push: Arc::clone(&push),
    });
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
                    tokio::net::TcpListener::from_std(api_listener)
                        .and_then(|l| api::transport::AdminListener::new(l, api_tls)),
                    tokio::net::TcpListener::from_std(push_listener),
                ) {
                    (Ok(a), Ok(l)) => (a, l),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("listener: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let link_task = tokio::spawn(push::serve(link, tls, push_state));
                let compact_task = tokio::spawn(compact_periodically(compact_store, keep));
                let sweep_task = tokio::spawn(sweep_periodically(sweeper));
                let kms_task = tokio::spawn(watch_kms(kms_watch.0, kms_watch.1, kms_watch.2));
                let router = api::router(state);
                let router = if plain_http {
                    router
                } else {
                    api::with_hsts(router)
                };
                let app = router.into_make_service_with_connect_info::<api::transport::Peer>();
                let served = axum::serve(api, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "admin API stopped");
                }
                link_task.abort();
                compact_task.abort();
                sweep_task.abort();
                kms_task.abort();
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("control plane thread exited"))??;
    tracing::info!(api = %addr, tls = !plain_http, link = %push_addr, data_dir = %opts.data_dir.display(), "control plane listening");
    Ok(Running {
        addr,
        push_addr,
        admin_token: token,
        ca_file,
        plain_http,
        push,
        shutdown: Some(tx),
        thread: Some(thread),
        writer: Some(writer),
    })
}

/// Asks each tenant's own KMS key for its state, at start and every `every` (a KMS that did
/// not answer every [`KMS_RETRY`]), each tenant's apart so a silent KMS holds up no other.
///
/// Two things follow. A KMS that does not answer is marked so ([`kms::Kms::check`]):
/// opening what its key sealed fails at once instead of waiting on it (pushes to nodes, the
/// body log's writer, the API), until it answers again. And when a key's state changes —
/// enabled, or refused (disabled, pending deletion) — the tenant's upstreams sealed under it
/// are offered to nodes again ([`store::Store::resend_kms_sealed`]), so nodes already
/// connected drop them when the key stops opening them and get them back when it opens them
/// again. A KMS that merely stops answering changes nothing nodes hold.
async fn watch_kms(
    store: Arc<store::Store>,
    push: Arc<push::PushState>,
    every: std::time::Duration,
) {
    use kms::KeyState;
    use std::collections::HashMap;
    let kms = store.kms_handle();
    let mut known: HashMap<String, (KeyState, std::time::Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(KMS_RETRY.min(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = Arc::clone(&store);
        let tenants = match tokio::task::spawn_blocking(move || st.tenants_with_kms()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the tenants' KMS keys");
                continue;
            }
            Err(_) => continue,
        };
        known.retain(|t, _| tenants.iter().any(|(x, _)| x == t));
        let mut checks = tokio::task::JoinSet::new();
        for (tenant, key) in tenants {
            let due = match known.get(&tenant) {
                None => true,
                Some((KeyState::Unreachable(_), at)) => at.elapsed() >= KMS_RETRY.min(every),
                Some((_, at)) => at.elapsed() >= every,
            };
            if due {
                let kms = Arc::clone(&kms);
                checks.spawn_blocking(move || {
                    let state = kms.check(&key);
                    (tenant, state)
                });
            }
        }
        while let Some(done) = checks.join_next().await {
            let Ok((tenant, state)) = done else { continue };
            let before = known
                .insert(tenant.clone(), (state.clone(), std::time::Instant::now()))
                .map(|(s, _)| s);
            if !kms_state_changed(before.as_ref(), &state) {
                continue;
            }
            match &state {
                KeyState::Refused(why) => {
                    tracing::warn!(tenant, reason = %why, "a tenant's KMS key no longer opens its credentials: its upstreams are withdrawn from nodes");
                }
                _ => tracing::info!(tenant, "a tenant's KMS key opens its credentials"),
            }
            let st = Arc::clone(&store);
            let t = tenant.clone();
            match tokio::task::spawn_blocking(move || st.resend_kms_sealed(&t)).await {
                Ok(Ok(n)) if n > 0 => push.notify(),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(tenant, error = %e, "cannot offer a tenant's upstreams to nodes again")
                }
                Err(_) => {}
            }
        }
    }
}

/// Whether what a tenant's key opens changed: it became enabled or refused (first seen,
/// or after the other, or after not answering). Not answering changes nothing nodes hold.
fn kms_state_changed(before: Option<&kms::KeyState>, now: &kms::KeyState) -> bool {
    use kms::KeyState::{Enabled, Refused, Unreachable};
    !matches!(
        (before, now),
        (_, Unreachable(_)) | (Some(Enabled), Enabled) | (Some(Refused(_)), Refused(_))
    )
}

/// How often the body log sweeper runs (and once at start).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes body log segments past their retention, at start and every [`SWEEP_EVERY`].
async fn sweep_periodically(log: bodylog::BodyLog) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        log.sweep_soon();
    }
}

/// Compacts the changelog at start and then every [`COMPACT_EVERY`], keeping `keep` entries.
async fn compact_periodically(store: Arc<store::Store>, keep: i64) {
    let mut tick = tokio::time::interval(COMPACT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || store.compact_periodic(keep)).await {
            Ok(Ok(c)) if c.deleted > 0 => tracing::info!(
                deleted = c.deleted,
                compacted_through = c.compacted_through,
                revision = c.revision,
                "changelog compacted"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "changelog compaction failed"),
            Err(e) => tracing::warn!(error = %e, "changelog compaction task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kms::KeyState::{Enabled, Refused, Unreachable};
    use super::kms_state_changed;

    #[test]
    fn nodes_are_offered_a_tenants_upstreams_again_when_its_key_opens_or_stops_opening() {
        let refused = || Refused("disabled".into());
        let silent = || Unreachable("timed out".into());
        // First seen (a start, a key just named): what nodes hold is made to follow it.
        assert!(kms_state_changed(None, &Enabled));
        assert!(kms_state_changed(None, &refused()));
        assert!(kms_state_changed(Some(&Enabled), &refused()));
        assert!(kms_state_changed(Some(&refused()), &Enabled));
        // Back after a silence: records left out meanwhile are offered again.
        assert!(kms_state_changed(Some(&silent()), &Enabled));
        assert!(kms_state_changed(Some(&silent()), &refused()));
        // No news, or only a silence: nothing changes for nodes.
        assert!(!kms_state_changed(Some(&Enabled), &Enabled));
        assert!(!kms_state_changed(
            Some(&refused()),
            &Refused("pending deletion".into())
        ));
        assert!(!kms_state_changed(Some(&Enabled), &silent()));
        assert!(!kms_state_changed(None, &silent()));
    }
}
