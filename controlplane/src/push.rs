//! Pushing configuration to data-plane nodes over the wire protocol, on TLS 1.3.
//!
//! A node says which revision it holds; it gets the changes since then — every record changed
//! since, as it is now, or a tombstone when it was deleted — or a full snapshot (keys,
//! upstreams, routes and policies) when it holds nothing, a revision this control plane never
//! issued, or one older than what compaction kept of the changelog. After that every
//! committed mutation is pushed the moment it commits — revocations reach nodes in
//! milliseconds, not at the next poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aigw_wire::{
    decode_frame, encode_frame, Change, Frame, Message, Record, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::store::{fingerprint, NodeInfo, NodeScope, Store, StoreError};

/// Records per snapshot part, at most. A change set larger than this is sent as a snapshot
/// instead, which is split into parts, so no frame grows with the size of the change.
const SNAPSHOT_PART: usize = 20_000;
/// Encoded bytes per snapshot part or change set, at most: records are bounded in size by
/// the admin API, so a part never nears the link's frame limit (16 MiB) whatever the
/// records hold.
const MAX_PART_BYTES: usize = 4 << 20;
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node not heard from for this long (three heartbeats) is gone: its session ends.
const SILENT: Duration = Duration::from_secs(16);

/// What the control plane knows of a node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub boot_epoch: u64,
    pub connected: bool,
    /// The newest revision the node acknowledged as applied on every worker.
    pub applied_revision: u64,
    pub last_error: Option<String>,
    /// Records the node holds and cannot apply (each unusable there until fixed), as its
    /// latest Ack listed them, and how many there are in all.
    pub problems: Vec<Problem>,
    pub problem_count: usize,
    /// Full snapshots and change sets sent over the node's current connection.
    pub snapshots_sent: u64,
    pub changes_sent: u64,
    /// The session that last connected: an older one ending does not mark it gone.
    #[serde(skip)]
    session: u64,
}

/// A record a node could not apply.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: &'static str,
    pub id: String,
    pub error: String,
}

impl Problem {
    fn from_wire(p: aigw_wire::RecordProblem) -> Self {
        use aigw_wire::messages::kinds;
        let kind = match p.kind {
            kinds::KEY => "key",
            kinds::UPSTREAM => "upstream",
            kinds::ROUTE => "route",
            kinds::POLICY => "policy",
            kinds::CAP => "spend_cap",
            kinds::PRICE => "price",
            kinds::LIMIT => "sub_account_rate_limits",
            _ => "unknown",
        };
        Self {
            kind,
            id: p.id,
            error: p.error,
        }
    }
}

#[derive(Debug)]
pub struct PushState {
    pub store: Arc<Store>,
    pub revision: watch::Sender<i64>,
    pub nodes: Mutex<HashMap<String, NodeStatus>>,
    /// Signs the certificates of enrolling nodes.
    pub pki: crate::pki::Pki,
    /// Moves whenever a node is revoked, enrols again or changes scope: every session then
    /// reads its node again, ends if it was revoked or replaced, and resyncs a new scope.
    registry: watch::Sender<u64>,
    sessions: AtomicU64,
    /// For `/metrics`.
    pub counters: Counters,
    /// The rate limits leased to nodes, minute by minute.
    pub rate_leases: crate::rate_leases::RateLeases,
    /// Where nodes' bodies are written; unset, bodies are acknowledged and not kept.
    pub bodylog: std::sync::OnceLock<crate::bodylog::BodyLog>,
    /// Moves whenever a tenant's body log settings change: every session sends its node
    /// the tenants' settings again.
    body_settings: watch::Sender<u64>,
}

/// Totals since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub snapshots_sent: AtomicU64,
    pub changes_sent: AtomicU64,
    pub usage_reports_applied: AtomicU64,
    pub usage_reports_duplicate: AtomicU64,
    pub usage_reports_failed: AtomicU64,
}

/// A registered node with what its session reports.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub status: NodeStatus,
    pub scope: NodeScope,
    pub revoked: bool,
    /// Whether it has completed an enrolment (holds a certificate this control plane issued).
    pub enrolled: bool,
    pub enrolled_at: i64,
    pub cert_sha256: Option<String>,
}

impl PushState {
    pub fn new(store: Arc<Store>, pki: crate::pki::Pki) -> Result<Self, StoreError> {
        let (revision, _) = watch::channel(store.revision()?);
        Ok(Self {
            store,
            revision,
            nodes: Mutex::new(HashMap::new()),
            pki,
            registry: watch::channel(0).0,
            sessions: AtomicU64::new(0),
            counters: Counters::default(),
            rate_leases: Default::default(),
            bodylog: std::sync::OnceLock::new(),
            body_settings: watch::channel(0).0,
        })
    }

    /// A tenant's body log settings changed: every node hears of it now.
    pub fn body_settings_changed(&self) {
        self.body_settings.send_modify(|g| *g += 1);
    }

    /// Tells every session that a node was revoked, enrolled again or rescoped.
    pub fn registry_changed(&self) {
        self.registry.send_modify(|g| *g += 1);
    }

    /// Every registered node, with its session's status (never connected: all zero).
    pub fn node_views(&self) -> Result<Vec<NodeView>, StoreError> {
        let registered = self.store.registered_nodes()?;
        let status = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        Ok(registered
            .into_iter()
            .map(|n| NodeView {
                status: status
                    .get(&n.id)
                    .cloned()
                    .unwrap_or_else(|| NodeStatus::new(&n.id)),
                enrolled: n.cert_sha256.is_some(),
                scope: n.scope,
                revoked: n.revoked,
                enrolled_at: n.enrolled_at,
                cert_sha256: n.cert_sha256,
            })
            .collect())
    }

    pub fn node_view(&self, id: &str) -> Result<NodeView, StoreError> {
        let n = self.store.node(id)?;
        let status = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| NodeStatus::new(id));
        Ok(NodeView {
            status,
            enrolled: n.cert_sha256.is_some(),
            scope: n.scope,
            revoked: n.revoked,
            enrolled_at: n.enrolled_at,
            cert_sha256: n.cert_sha256,
        })
    }
    /// Tells every session that the store moved on.
    pub fn notify(&self) {
        if let Ok(r) = self.store.revision() {
            // Only forwards: a notification read late never takes the watch back.
            self.revision.send_if_modified(|v| {
                let moved = r > *v;
                if moved {
                    *v = r;
                }
                moved
            });
        }
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        let mut v: Vec<_> = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let entry = nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeStatus::new(node));
        f(entry);
    }
}

impl NodeStatus {
    fn new(node: &str) -> Self {
        Self {
            node_id: node.to_string(),
            boot_epoch: 0,
            connected: false,
            applied_revision: 0,
            last_error: None,
            problems: Vec::new(),
            problem_count: 0,
            snapshots_sent: 0,
            changes_sent: 0,
            session: 0,
        }
    }
}

/// Connections that have not authenticated yet, at most; more are closed at once.
const MAX_PENDING: usize = 64;
/// Authenticated node sessions, at most.
const MAX_SESSIONS: usize = 4096;
/// From accepting a connection to its Hello checked: TLS handshake included.
const HANDSHAKE: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, state: Arc<PushState>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "push listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Nothing is spent on a connection beyond its place among the pending ones.
        let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
            tracing::warn!(peer = %peer, "too many unauthenticated connections on the node link; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        let sessions = Arc::clone(&sessions);
        tokio::spawn(async move {
            let handshake = async {
                let tls = acceptor.accept(tcp).await?;
                // Verified by the TLS layer against the link's CA when presented.
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                open(tls, cert, &state, &peer.to_string()).await
            };
            let (mut conn, hello) = match tokio::time::timeout(HANDSHAKE, handshake).await {
                Ok(Ok(Opening::Session(conn, hello))) => (conn, hello),
                Ok(Ok(Opening::Enrolled(node))) => {
                    tracing::info!(peer = %peer, node = %node, "node enrolled");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "node refused before authentication");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %peer, "node did not complete its handshake in time");
                    return;
                }
            };
            drop(permit);
            let Ok(_session) = sessions.try_acquire_owned() else {
                conn.refuse("this control plane serves as many nodes as it may")
                    .await;
                return;
            };
            if let Err(e) = session(&mut conn, &state, hello).await {
                tracing::info!(peer = %peer, error = %e, "node session ended");
            }
        });
    }
}

struct Conn<S> {
    stream: S,
    /// Read from the link; `buf[at..]` is not decoded yet.
    buf: Vec<u8>,
    at: usize,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Conn<S> {
    /// Reads the next known message (unknown types are skipped). Cancel-safe: bytes read
    /// stay in `buf`.
    async fn next(&mut self) -> anyhow::Result<Message> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf[self.at..], DEFAULT_MAX_FRAME)? {
                self.at += used;
                match frame {
                    Frame::Message(m) => return Ok(m),
                    Frame::Unknown(code) => {
                        tracing::debug!(code, "skipping an unknown message type")
                    }
                }
                continue;
            }
            // Frames decoded are dropped from the front once per read, not one by one.
            self.buf.drain(..self.at);
            self.at = 0;
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                anyhow::bail!("node closed the link");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Tells the peer why it is not served and closes the link.
    async fn refuse(&mut self, reason: &str) {
        let _ = self
            .send(&Message::Refused {
                reason: reason.into(),
            })
            .await;
        self.close().await;
    }

    /// Closes the link cleanly (TLS close_notify, then FIN), and lets what the peer sent
    /// meanwhile drain a moment, so the closing does not reset the connection and destroy
    /// the last message before the peer reads it.
    async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        let drain = async {
            while let Ok(n) = self.stream.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    }

    async fn send(&mut self, m: &Message) -> anyhow::Result<()> {
        self.send_all(std::slice::from_ref(m)).await
    }

    /// Messages in order, in one write.
    async fn send_all(&mut self, ms: &[Message]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for m in ms {
            encode_frame(m, &mut out);
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// An authenticated node's Hello.
#[derive(Debug)]
struct Hello {
    /// The node its certificate names, as registered.
    node: NodeInfo,
    boot_epoch: u64,
    revision_held: u64,
    revision_id: u64,
}

/// How a connection's first message ended.
enum Opening<S> {
    /// A node presenting its certificate: its session follows.
    Session(Conn<S>, Hello),
    /// A node enrolled (this node id) and was sent its certificate; the link is closed.
    Enrolled(String),
}

/// Reads and checks the first message of a connection, `cert` being the client certificate
/// the TLS layer verified, if one was presented. Before it is authenticated a peer gets
/// nothing but this: one frame of at most [`aigw_wire::frame::MAX_HELLO_FRAME`] bytes,
/// which must be a Hello (from a node presenting the certificate of an enrolled, unrevoked
/// node) or an Enroll (with a valid enrolment token); its body is not decoded before its
/// size and type are checked. A peer refused here is told why before the link closes.
async fn open<S>(
    stream: S,
    cert: Option<Vec<u8>>,
    state: &Arc<PushState>,
    peer: &str,
) -> anyhow::Result<Opening<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use aigw_wire::messages::types;
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        at: 0,
    };
    let first = loop {
        if let Some(t) = aigw_wire::frame::peek_type(&conn.buf) {
            if t != types::HELLO && t != types::ENROLL {
                anyhow::bail!("first message (type {t}) was neither Hello nor Enroll");
            }
        }
        match decode_frame(&conn.buf, aigw_wire::frame::MAX_HELLO_FRAME)? {
            Some((Frame::Message(m), used)) => {
                conn.buf.drain(..used);
                break m;
            }
            Some((Frame::Unknown(t), _)) => {
                anyhow::bail!("first message (type {t}) was neither Hello nor Enroll")
            }
            None => {}
        }
        let mut chunk = [0u8; 4096];
        let n = conn.stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("node closed the link before its Hello");
        }
        conn.buf.extend_from_slice(&chunk[..n]);
    };
    match first {
        Message::Enroll { token, public_key } => {
            let node = enroll(&mut conn, state, &token, &public_key, peer).await?;
            Ok(Opening::Enrolled(node))
        }
        Message::Hello {
            protocol_version,
            node_id,
            boot_epoch,
            revision_held,
            revision_id,
            ..
        } => {
            let Some(cert) = cert else {
                conn.refuse("this node has no certificate: enrol it with an enrolment token (control plane: node-add; node: control_plane.enrollment_token_env)").await;
                anyhow::bail!("node {node_id:?} presented no certificate");
            };
            let node = match state.store.node_by_certificate(&fingerprint(&cert)) {
                Ok(Some(node)) => node,
                Ok(None) => {
                    conn.refuse(
                        "this node's certificate was revoked or replaced; enrol the node again",
                    )
                    .await;
                    anyhow::bail!("node {node_id:?} presented a certificate no node holds");
                }
                Err(e) => {
                    conn.refuse("the control plane cannot read its node registry")
                        .await;
                    return Err(e.into());
                }
            };
            if node_id != node.id {
                tracing::debug!(said = %node_id, certificate = %node.id, "a node named itself other than its certificate does; its certificate's name counts");
            }
            if protocol_version != PROTOCOL_VERSION {
                // One version apart still works: unknown fields and messages are skipped.
                tracing::info!(node = %node.id, protocol_version, "node speaks another protocol version");
            }
            Ok(Opening::Session(
                conn,
                Hello {
                    node,
                    boot_epoch,
                    revision_held,
                    revision_id,
                },
            ))
        }
        _ => anyhow::bail!("first message was neither Hello nor Enroll"),
    }
}

/// Enrols a node: checks its one-time token, signs a client certificate naming the node
/// over the public key it sent, records the certificate's fingerprint (consuming the token)
/// and sends the certificate back. The node's previous certificate, if any, is no longer
/// accepted from then on. Returns the node's id.
async fn enroll<S>(
    conn: &mut Conn<S>,
    state: &Arc<PushState>,
    token: &str,
    public_key: &[u8],
    peer: &str,
) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let invalid = "the enrolment token is not valid (used, expired, revoked or unknown): issue a new one with node-add or node-enroll";
    let node = if aigw_wire::keys::token_is_acceptable(token) {
        state.store.enrollment(token)?
    } else {
        None
    };
    let Some(node) = node else {
        conn.refuse(invalid).await;
        anyhow::bail!("an enrolment with an invalid token");
    };
    let cert = match state.pki.issue_node_certificate(&node, public_key) {
        Ok(c) => c,
        Err(e) => {
            conn.refuse(&format!("public_key: {e}")).await;
            anyhow::bail!("node {node}: {e}");
        }
    };
    let source = format!("node link {peer}");
    if let Err(e) = state
        .store
        .complete_enrollment(token, &fingerprint(&cert), &source)
    {
        // Another connection consumed the token first.
        conn.refuse(invalid).await;
        return Err(e.into());
    }
    state.registry_changed();
    conn.send(&Message::Enrolled {
        node_id: node.clone(),
        cert_der: cert,
    })
    .await?;
    conn.close().await;
    Ok(node)
}

async fn session<S>(conn: &mut Conn<S>, state: &Arc<PushState>, hello: Hello) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Hello {
        node,
        boot_epoch,
        revision_held,
        revision_id,
    } = hello;
    let held = Held {
        revision: i64::try_from(revision_held).unwrap_or(i64::MAX),
        id: revision_id,
    };
    let same_history = revision_id == 0
        || state.store.revision_id(held.revision).ok().flatten() == Some(revision_id);
    let newest = state.store.revision().unwrap_or(0);
    let id = state.sessions.fetch_add(1, Ordering::Relaxed) + 1;
    state.update(&node.id, |n| {
        n.session = id;
        n.connected = true;
        n.boot_epoch = boot_epoch;
        n.snapshots_sent = 0;
        n.changes_sent = 0;
        // What it holds, unless it holds a revision this control plane never issued.
        n.applied_revision = if held.revision <= newest && same_history {
            revision_held
        } else {
            0
        };
    });
    let result = run_session(conn, state, &node, held).await;
    state.update(&node.id, |n| {
        if n.session == id {
            n.connected = false;
        }
    });
    result
}

async fn run_session<S>(
    conn: &mut Conn<S>,
    state: &Arc<PushState>,
    registered: &NodeInfo,
    held: Held,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let node = registered.id.as_str();
    let mut scope = registered.scope.clone();
    let mut rx = state.revision.subscribe();
    let mut registry = state.registry.subscribe();
    let store = Arc::clone(&state.store);
    // What the node holds for certain: its revision at hello, then what it acknowledged.
    let mut acked = held;
    let mut sent = sync(conn, state, &store, node, held, &scope).await?;
    // The newest revision ever offered on this link (a refusal does not lower it).
    let mut offered = sent.revision;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut heard = tokio::time::Instant::now();
    let mut body_settings = state.body_settings.subscribe();
    send_body_tenants(conn, &store).await?;
    let (body_acks_tx, mut body_acks) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    loop {
        tokio::select! {
            Some((boot_epoch, seq)) = body_acks.recv() => {
                // With those already waiting, in one write.
                let mut acks = vec![Message::BodyLogAck { boot_epoch, seq }];
                while let Ok((boot_epoch, seq)) = body_acks.try_recv() {
                    acks.push(Message::BodyLogAck { boot_epoch, seq });
                }
                conn.send_all(&acks).await?;
            }
            changed = body_settings.changed() => {
                changed?;
                body_settings.borrow_and_update();
                send_body_tenants(conn, &store).await?;
            }
            _ = tokio::time::sleep_until(heard + SILENT) => {
                anyhow::bail!("node {node} silent for {SILENT:?}");
            }
            changed = registry.changed() => {
                changed?;
                registry.borrow_and_update();
                let now = match store.node(node) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(node, error = %e, "cannot read the node registry");
                        continue;
                    }
                };
                if now.revoked || now.cert_sha256 != registered.cert_sha256 {
                    let why = if now.revoked { "this node was revoked" } else { "this node enrolled again with another certificate" };
                    conn.refuse(why).await;
                    anyhow::bail!("node {node}: {why}");
                }
                if now.scope != scope {
                    // Another scope: a snapshot of it replaces what the node holds, and
                    // until it is acknowledged nothing older counts as held.
                    scope = now.scope;
                    acked = Held { revision: 0, id: 0 };
                    sent = sync(conn, state, &store, node, acked, &scope).await?;
                    offered = offered.max(sent.revision);
                }
            }
            changed = rx.changed() => {
                changed?;
                let newest = *rx.borrow_and_update();
                if newest > sent.revision {
                    sent = sync(conn, state, &store, node, sent, &scope).await?;
                    offered = offered.max(sent.revision);
                }
            }
            msg = conn.next() => {
                heard = tokio::time::Instant::now();
                match msg? {
                Message::Ack { revision, problems, problems_total } => {
                    // The node applied what it was sent up to `revision`.
                    if i64::try_from(revision).is_ok_and(|r| r == sent.revision) {
                        acked = sent;
                    }
                    if !problems.is_empty() {
                        tracing::warn!(node, revision, problems = problems.len(), "node cannot apply some records");
                    }
                    state.update(node, |n| {
                        n.applied_revision = n.applied_revision.max(revision);
                        n.last_error = None;
                        n.problem_count = usize::try_from(problems_total).unwrap_or(usize::MAX).max(problems.len());
                        n.problems = problems.into_iter().map(Problem::from_wire).collect();
                    });
                }
                Message::Nack { revision, error } => {
                    tracing::warn!(node, revision, error = %error, "node refused a revision");
                    state.update(node, |n| n.last_error = Some(format!("revision {revision}: {error}")));
                    // The node kept its previous configuration: the next push starts from
                    // what it holds, so the link stays up and it catches up once the
                    // control plane's state is acceptable again.
                    sent = acked;
                }
                Message::Heartbeat { .. } => {}
                Message::UsageReport { boot_epoch, seq, entries, .. } => {
                    // Counted under the node this link authenticated, whatever the report
                    // says; acknowledged once stored (or recognised as stored before).
                    let store = Arc::clone(&store);
                    let (id, report_scope) = (node.to_string(), scope.clone());
                    let stored = tokio::task::spawn_blocking(move || {
                        store.record_usage(&id, &report_scope, boot_epoch, seq, &entries)
                    })
                    .await;
                    match stored {
                        Ok(Ok(fresh)) => {
                            let c = &state.counters;
                            if fresh {
                                c.usage_reports_applied.fetch_add(1, Ordering::Relaxed);
                            } else {
                                c.usage_reports_duplicate.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(node, boot_epoch, seq, "usage report already stored");
                            }
                            conn.send(&Message::UsageAck { boot_epoch, seq }).await?;
                        }
                        Ok(Err(e)) => {
                            state.counters.usage_reports_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(node, boot_epoch, seq, error = %e, "cannot store a usage report; the node keeps it");
                        }
                        Err(e) => {
                            state.counters.usage_reports_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(node, boot_epoch, seq, error = %e, "storing a usage report failed; the node keeps it");
                        }
                    }
                }
                Message::Event { boot_epoch, seq, kind, detail, .. } => {
                    let store = Arc::clone(&store);
                    let (id, event_scope) = (node.to_string(), scope.clone());
                    let stored = tokio::task::spawn_blocking(move || {
                        store.record_event(&id, &event_scope, boot_epoch, seq, &kind, &detail)
                    })
                    .await;
                    match stored {
                        Ok(Ok(fresh)) => {
                            if fresh {
                                // An event can revoke a key (a confirmed leak): every node
                                // hears of it now.
                                state.notify();
                            }
                            conn.send(&Message::EventAck { boot_epoch, seq }).await?;
                        }
                        // Malformed or out of scope: resending will not change that.
                        Ok(Err(StoreError::Invalid(e))) => {
                            tracing::warn!(node, boot_epoch, seq, error = %e, "refused an event from the node");
                            conn.send(&Message::EventAck { boot_epoch, seq }).await?;
                        }
                        Ok(Err(e)) => tracing::error!(node, boot_epoch, seq, error = %e, "cannot store an event; the node keeps it"),
                        Err(e) => tracing::error!(node, boot_epoch, seq, error = %e, "storing an event failed; the node keeps it"),
                    }
                }
                Message::BodyLog { boot_epoch, seq, tenant_id, request_id, meta, request, response, .. } => {
                    // Not waited for here: the link reads on while the writer works, and
                    // the acknowledgement follows once the record is written.
                    match body_logged(state, node, &scope, boot_epoch, seq, tenant_id, request_id, meta, request, response) {
                        Logged::Ready => conn.send(&Message::BodyLogAck { boot_epoch, seq }).await?,
                        Logged::Wait(answer) => {
                            let acks = body_acks_tx.clone();
                            let node = node.to_string();
                            tokio::spawn(async move {
                                match answer.await {
                                    Ok(Ok(())) => {
                                        let _ = acks.send((boot_epoch, seq));
                                    }
                                    Ok(Err(e)) => tracing::error!(node, error = %e, "cannot write a body log record; the node keeps it"),
                                    Err(_) => {}
                                }
                            });
                        }
                        Logged::Keep => {}
                    }
                }
                Message::LeaseRequest { cap_id, period, want_micros } => {
                    let store = Arc::clone(&store);
                    let (id, lease_scope, cap) = (node.to_string(), scope.clone(), cap_id.clone());
                    let book = Arc::clone(state);
                    let leased = tokio::task::spawn_blocking(move || {
                        if aigw_wire::spend::rate_lease::parse(&cap).is_some() {
                            book.rate_leases.lease(&store, &id, &lease_scope, &cap, period, want_micros)
                        } else {
                            store.lease(&id, &lease_scope, &cap, period, want_micros)
                        }
                    })
                    .await;
                    let (granted_micros, exhausted) = match leased {
                        Ok(Ok(v)) => v,
                        // Nothing granted, nothing said exhausted: the node asks again.
                        Ok(Err(e)) => {
                            tracing::error!(node, cap_id, error = %e, "cannot lease spend cap budget");
                            (0, false)
                        }
                        Err(e) => {
                            tracing::error!(node, cap_id, error = %e, "leasing spend cap budget failed");
                            (0, false)
                        }
                    };
                    conn.send(&Message::LeaseGrant { cap_id, period, granted_micros, exhausted }).await?;
                }
                Message::LeaseReturn { cap_id, period, micros } if aigw_wire::spend::rate_lease::parse(&cap_id).is_some() => {
                    state.rate_leases.give_back(node, &cap_id, period, micros);
                }
                Message::LeaseReturn { cap_id, period, micros } => {
                    let store = Arc::clone(&store);
                    let id = node.to_string();
                    let returned = tokio::task::spawn_blocking(move || {
                        store.return_lease(&id, &cap_id, period, micros)
                    })
                    .await;
                    if !matches!(returned, Ok(Ok(()))) {
                        // Kept as leased: under-use until the period ends, never overshoot.
                        tracing::warn!(node, "cannot take back a returned spend cap lease");
                    }
                }
                other => tracing::debug!(node, ?other, "ignoring message"),
            }
            }
            _ = heartbeat.tick() => {
                let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                conn.send(&Message::Heartbeat { unix_ms }).await?;
                // A change whose notification was missed is still sent (one refused is
                // offered again only with the next change).
                if store.revision().is_ok_and(|newest| newest > offered) {
                    sent = sync(conn, state, &store, node, sent, &scope).await?;
                    offered = offered.max(sent.revision);
                }
            }
        }
    }
}

/// Tells the node which tenants opted out of the body log and which refuse when behind.
async fn send_body_tenants<S>(conn: &mut Conn<S>, store: &Arc<Store>) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let st = Arc::clone(store);
    match tokio::task::spawn_blocking(move || st.body_log_exceptions()).await {
        Ok(Ok((off, refuse))) => conn.send(&Message::BodyLogTenants { off, refuse }).await,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the body log settings");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the body log settings failed");
            Ok(())
        }
    }
}

/// Hands a node's record to the body log's writer. `Ready`: acknowledge now (it will never
/// be written: outside the node's scope, no body log). `Wait`: acknowledge once the writer
/// answers Ok (it also answers Ok for a tenant that opted out: nothing is written). `Keep`:
/// not acknowledged; the node sends it again.
enum Logged {
    Ready,
    Wait(tokio::sync::oneshot::Receiver<Result<(), String>>),
    Keep,
}

#[allow(clippy::too_many_arguments)]
fn body_logged(
    state: &Arc<PushState>,
    node: &str,
    scope: &NodeScope,
    boot_epoch: u64,
    seq: u64,
    tenant_id: String,
    request_id: String,
    meta: String,
    request: Vec<u8>,
    response: Vec<u8>,
) -> Logged {
    if !scope.covers_tenant(&tenant_id) {
        tracing::warn!(
            node,
            tenant_id,
            "refused a body log record outside the node's scope"
        );
        return Logged::Ready;
    }
    let Some(log) = state.bodylog.get() else {
        return Logged::Ready;
    };
    let mut fields = match serde_json::from_str::<serde_json::Value>(&meta) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    fields.insert("request_id".into(), request_id.clone().into());
    fields.insert("tenant_id".into(), tenant_id.clone().into());
    fields.insert("node_id".into(), node.into());
    fields.insert("logged_at".into(), crate::store::now().into());
    let (done, answer) = tokio::sync::oneshot::channel();
    let job = crate::bodylog::Job::Append {
        node_id: node.to_string(),
        boot_epoch,
        seq,
        tenant_id,
        request_id,
        day: crate::bodylog::today(),
        record: crate::bodylog::BodyRecord {
            meta: serde_json::Value::Object(fields).to_string(),
            request,
            response,
        },
        done,
    };
    if log.submit(job) {
        Logged::Wait(answer)
    } else {
        tracing::warn!(
            node,
            "the body log writer is behind; the node keeps the record"
        );
        Logged::Keep
    }
}

/// What a node holding some revision needs.
enum Update {
    Snapshot(Vec<Record>, i64, u64),
    Changes(Vec<Change>, i64, u64),
    UpToDate,
}

/// What a node holds: a revision and its id (0 from a node that predates revision ids, or
/// for what this session sent it, whose history is known).
#[derive(Debug, Clone, Copy)]
struct Held {
    revision: i64,
    id: u64,
}

/// Decides, in one read of the store, whether a node holding `held` gets the changes since or
/// a snapshot: a snapshot when it holds nothing (0), a revision never issued (newer than the
/// newest), a revision of another history (its id differs from the one this store gave
/// it: a database restored from a backup and changed since), one compaction overtook, or so
/// many changes that one frame would not hold them. Either holds only the records in the
/// node's `scope`.
fn plan(store: &Store, held: Held, scope: &NodeScope) -> Result<Update, StoreError> {
    let same_history = held.id == 0 || store.revision_id(held.revision)? == Some(held.id);
    if held.revision > 0 && same_history {
        if let Some((mut changes, newest, newest_id)) =
            store.changes_since_at_most(held.revision, SNAPSHOT_PART)?
        {
            if held.revision == newest {
                return Ok(Update::UpToDate);
            }
            changes.retain(|c| change_in_scope(scope, c));
            let bytes: usize = changes.iter().map(encoded_len).sum();
            if held.revision < newest && bytes <= MAX_PART_BYTES {
                return Ok(Update::Changes(changes, newest, newest_id));
            }
        }
    }
    let (mut records, revision, id) = store.snapshot()?;
    records.retain(|r| record_in_scope(scope, r));
    Ok(Update::Snapshot(records, revision, id))
}

/// Whether a node of `scope` holds `record`: every record belongs to one tenant's
/// environment, which never changes.
fn record_in_scope(scope: &NodeScope, record: &Record) -> bool {
    match record {
        Record::Key(k) => scope.covers(&k.tenant_id, &k.environment),
        Record::Upstream(u) => scope.covers(&u.tenant_id, &u.environment),
        Record::Route(r) => scope.covers(&r.tenant_id, &r.environment),
        Record::Policy(p) => scope.covers(&p.tenant_id, &p.environment),
        Record::Cap(c) => scope.covers_tenant(&c.tenant_id),
        Record::Price(p) => p.tenant_id.is_empty() || scope.covers_tenant(&p.tenant_id),
        Record::Limit(l) => scope.covers_tenant(&l.tenant_id),
        Record::Unknown { .. } => false,
    }
}

fn change_in_scope(scope: &NodeScope, change: &Change) -> bool {
    match change {
        Change::Upsert(r) => record_in_scope(scope, r),
        // Routing ids start with `{tenant}/{environment}`; a key id names neither, and a key
        // a node does not hold is no harm to delete.
        // Caps, prices, limits: deleting one a node does not hold is no harm either.
        Change::Delete(t)
            if t.kind == aigw_wire::messages::kinds::CAP
                || t.kind == aigw_wire::messages::kinds::PRICE
                || t.kind == aigw_wire::messages::kinds::LIMIT =>
        {
            true
        }
        Change::Delete(t) => match t.id.split('/').collect::<Vec<_>>()[..] {
            [tenant, environment, ..] => scope.covers(tenant, environment),
            _ => true,
        },
    }
}

/// Brings a node holding `held` to the newest revision; returns what it was sent.
async fn sync<S>(
    conn: &mut Conn<S>,
    state: &PushState,
    store: &Arc<Store>,
    node: &str,
    held: Held,
    scope: &NodeScope,
) -> anyhow::Result<Held>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let update = tokio::task::spawn_blocking({
        let store = Arc::clone(store);
        let scope = scope.clone();
        move || plan(&store, held, &scope)
    })
    .await??;
    match update {
        Update::UpToDate => Ok(Held { id: 0, ..held }),
        Update::Changes(changes, to, id) => {
            conn.send(&Message::Changes {
                from_revision: held.revision as u64,
                to_revision: to as u64,
                changes,
                revision_id: id,
            })
            .await?;
            state.update(node, |n| n.changes_sent += 1);
            state.counters.changes_sent.fetch_add(1, Ordering::Relaxed);
            // Sent on this link: its history is this store's, no need to check it again.
            Ok(Held {
                revision: to,
                id: 0,
            })
        }
        Update::Snapshot(records, revision, id) => {
            send_snapshot(conn, records, revision, id).await?;
            state.update(node, |n| n.snapshots_sent += 1);
            state
                .counters
                .snapshots_sent
                .fetch_add(1, Ordering::Relaxed);
            Ok(Held { revision, id: 0 })
        }
    }
}

/// Bytes `c` takes in a frame.
fn encoded_len<C: aigw_wire::Codec>(c: &C) -> usize {
    let mut out = Vec::new();
    c.encode(&mut out);
    out.len() + 8
}

/// Sends `records` as a snapshot in parts of at most [`SNAPSHOT_PART`] records and
/// [`MAX_PART_BYTES`] encoded bytes.
async fn send_snapshot<S>(
    conn: &mut Conn<S>,
    records: Vec<Record>,
    revision: i64,
    revision_id: u64,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut sizes = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    for r in &records {
        let n = encoded_len(r);
        if count > 0 && (count == SNAPSHOT_PART || bytes + n > MAX_PART_BYTES) {
            sizes.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += n;
    }
    sizes.push(count);
    let parts = sizes.len();
    let mut it = records.into_iter();
    for (part, size) in sizes.into_iter().enumerate() {
        let chunk: Vec<Record> = it.by_ref().take(size).collect();
        conn.send(&Message::Snapshot {
            revision: revision as u64,
            part: part as u64,
            parts: parts as u64,
            records: chunk,
            revision_id,
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Actor, RouteSpec, RouteTarget, UpstreamSpec};
    use aigw_wire::keys::Environment;
    use aigw_wire::messages::kinds;
    use aigw_wire::Tombstone;
    use tokio::io::DuplexStream;

    const SECRET: &str = "sk-push-PLAINTEXT";

    fn actor() -> Actor {
        Actor {
            principal: "admin".into(),
            source: "test".into(),
        }
    }

    /// A store in a directory of its own, removed when the returned guard drops (the
    /// test's end, passed or failed).
    fn store() -> (Arc<Store>, tempfile::TempDir) {
        let dir = tempfile::Builder::new()
            .prefix("aigw-push-")
            .tempdir()
            .expect("temporary directory");
        let kek = aigw_seal::Kek::generate().expect("key");
        let s = Store::open(dir.path(), kek).expect("store");
        s.create_tenant(&actor(), "t", "T", "pro").expect("tenant");
        let up = UpstreamSpec {
            provider: "openai".into(),
            base_url: "http://127.0.0.1:9000".into(),
            credential: Some(SECRET.into()),
            non_retention: Default::default(),
            stream_options: false,
            region: String::new(),
            baa: false,
            pass_organization_headers: false,
            max_connections: 0,
            connect_timeout_ms: 0,
            first_byte_timeout_ms: 0,
            read_idle_timeout_ms: 0,
        };
        s.put_upstream(&actor(), "t", Environment::Production, "oa", &up)
            .expect("upstream");
        s.put_route(&actor(), "t", Environment::Production, "r", &route("m"))
            .expect("route");
        (Arc::new(s), dir)
    }

    fn route(model: &str) -> RouteSpec {
        RouteSpec {
            model: Some(model.into()),
            prefix: None,
            targets: vec![RouteTarget {
                upstream: "oa".into(),
                model: None,
            }],
        }
    }

    /// The push state of `store`, its CA and keys under `dir` (the store's directory).
    fn push_state(store: &Arc<Store>, dir: &tempfile::TempDir) -> Arc<PushState> {
        let pki_dir = dir.path().join("pki");
        let pki = crate::pki::Pki::under(&pki_dir);
        pki.ensure(&[]).expect("pki");
        Arc::new(PushState::new(Arc::clone(store), pki).expect("state"))
    }

    /// Registers node `id` of `scope` as enrolled with a certificate whose bytes are
    /// `cert` (the TLS layer, not here, checks a certificate's signature).
    fn register(state: &PushState, id: &str, scope: &NodeScope, cert: &[u8]) {
        state
            .store
            .add_node(&actor(), id, scope, None)
            .expect("add node");
        state
            .store
            .set_node_certificate(&actor(), id, &fingerprint(cert))
            .expect("certificate");
    }

    fn hello_message(id: &str, held: u64) -> Message {
        Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.into(),
            boot_epoch: 1,
            revision_held: held,
            token: String::new(),
            revision_id: 0,
        }
    }

    struct Node {
        conn: Conn<DuplexStream>,
    }

    impl Node {
        /// Node `id`, registered with every tenant and environment in scope, connecting
        /// holding `held`.
        async fn connect(state: &Arc<PushState>, id: &str, held: u64) -> Self {
            register(state, id, &NodeScope::default(), id.as_bytes());
            Self::connect_as(state, id.as_bytes().to_vec(), held).await
        }

        /// A node presenting certificate `cert`, connecting holding `held`.
        async fn connect_as(state: &Arc<PushState>, cert: Vec<u8>, held: u64) -> Self {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let state = Arc::clone(state);
            tokio::spawn(async move {
                if let Ok(Opening::Session(mut conn, hello)) =
                    open(theirs, Some(cert), &state, "test").await
                {
                    let _ = session(&mut conn, &state, hello).await;
                }
            });
            let mut conn = Conn {
                stream: ours,
                buf: Vec::new(),
                at: 0,
            };
            conn.send(&hello_message("ignored", held))
                .await
                .expect("hello");
            Self { conn }
        }

        /// The next message that is not a heartbeat.
        async fn next(&mut self) -> Message {
            loop {
                let m = tokio::time::timeout(Duration::from_secs(10), self.conn.next())
                    .await
                    .expect("a message in time")
                    .expect("a message");
                if !matches!(
                    m,
                    Message::Heartbeat { .. } | Message::BodyLogTenants { .. }
                ) {
                    return m;
                }
            }
        }
    }

    fn credential_of(records: &[Record]) -> Option<String> {
        records.iter().find_map(|r| match r {
            Record::Upstream(u) => u.credential.clone(),
            _ => None,
        })
    }

    #[tokio::test]
    async fn nodes_get_snapshots_changes_and_tombstones() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        let newest = store.revision().expect("rev");

        // Holding nothing: a snapshot of every kind, the credential in the clear (the link is TLS).
        let mut fresh = Node::connect(&state, "fresh", 0).await;
        match fresh.next().await {
            Message::Snapshot {
                revision,
                part,
                parts,
                records,
                ..
            } => {
                assert_eq!((revision, part, parts), (newest as u64, 0, 1));
                assert_eq!(credential_of(&records).as_deref(), Some(SECRET));
                assert!(records.iter().any(|r| r.kind() == kinds::ROUTE));
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }

        // Up to date: nothing until the next commit, which arrives as changes.
        let mut current = Node::connect(&state, "current", newest as u64).await;
        // A node behind: the changes since its revision.
        let mut behind = Node::connect(&state, "behind", (newest - 1) as u64).await;
        match behind.next().await {
            Message::Changes {
                from_revision,
                to_revision,
                changes,
                ..
            } => {
                assert_eq!(
                    (from_revision, to_revision),
                    ((newest - 1) as u64, newest as u64)
                );
                assert!(matches!(&changes[..], [Change::Upsert(Record::Route(_))]));
            }
            other => panic!("expected changes, got {other:?}"),
        }
        let d = store
            .delete_route(&actor(), "t", Environment::Production, "r")
            .expect("delete");
        state.notify();
        let tombstone = Change::Delete(Tombstone {
            kind: kinds::ROUTE,
            id: "t/production/r".into(),
        });
        for node in [&mut fresh, &mut current, &mut behind] {
            match node.next().await {
                Message::Changes {
                    from_revision,
                    to_revision,
                    changes,
                    ..
                } => {
                    assert_eq!(
                        (from_revision, to_revision),
                        (newest as u64, d.revision as u64)
                    );
                    assert_eq!(changes, vec![tombstone.clone()]);
                }
                other => panic!("expected the tombstone, got {other:?}"),
            }
        }

        // Compaction overtakes a node that was away: it gets a snapshot; so does one holding a
        // revision never issued.
        store.compact(&actor(), 0).expect("compact");
        for held in [1, 9_999] {
            let mut node = Node::connect(&state, &format!("held-{held}"), held).await;
            match node.next().await {
                Message::Snapshot {
                    revision, records, ..
                } => {
                    assert_eq!(revision, d.revision as u64);
                    assert!(!records.iter().any(|r| r.kind() == kinds::ROUTE));
                }
                other => panic!("held {held}: expected a snapshot, got {other:?}"),
            }
        }
        // Connected nodes keep getting changes after compaction.
        let w = store
            .put_route(&actor(), "t", Environment::Production, "r2", &route("m2"))
            .expect("route");
        state.notify();
        match current.next().await {
            Message::Changes {
                from_revision,
                changes,
                ..
            } => {
                assert_eq!(from_revision, d.revision as u64);
                assert!(
                    matches!(&changes[..], [Change::Upsert(Record::Route(r))] if r.id == "t/production/r2")
                );
            }
            other => panic!("expected changes, got {other:?}"),
        }
        assert!(w.revision > d.revision);

        // Counters move just after each send: wait for them to settle. (`held-1` hung up.)
        let counts = |id: &str| {
            state
                .nodes()
                .into_iter()
                .find(|n| n.node_id == id)
                .map(|n| (n.snapshots_sent, n.changes_sent))
        };
        let expected = [
            ("fresh", (1, 2)),
            ("current", (0, 2)),
            ("behind", (0, 3)),
            ("held-1", (1, 0)),
        ];
        for _ in 0..200 {
            if expected.iter().all(|(id, c)| counts(id) == Some(*c)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (id, c) in expected {
            assert_eq!(counts(id), Some(c), "{id}: (snapshots, changes) sent");
        }
    }

    #[tokio::test]
    async fn after_a_nack_the_next_push_starts_from_what_the_node_holds() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        let held = store.revision().expect("rev");
        let mut node = Node::connect(&state, "picky", held as u64).await;
        let first = store
            .put_route(&actor(), "t", Environment::Production, "r2", &route("m2"))
            .expect("route");
        state.notify();
        match node.next().await {
            Message::Changes { from_revision, .. } => assert_eq!(from_revision, held as u64),
            other => panic!("expected changes, got {other:?}"),
        }
        node.conn
            .send(&Message::Nack {
                revision: first.revision as u64,
                error: "refused".into(),
            })
            .await
            .expect("nack");
        // Let the session take the NACK in before the next commit.
        for _ in 0..100 {
            let seen = state
                .nodes()
                .into_iter()
                .any(|n| n.node_id == "picky" && n.last_error.is_some());
            if seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let second = store
            .put_route(&actor(), "t", Environment::Production, "r3", &route("m3"))
            .expect("route");
        state.notify();
        match node.next().await {
            Message::Changes {
                from_revision,
                to_revision,
                changes,
                ..
            } => {
                assert_eq!(
                    (from_revision, to_revision),
                    (held as u64, second.revision as u64),
                    "resent from the node's own revision, the refused change included"
                );
                assert_eq!(changes.len(), 2);
            }
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_records_a_node_cannot_apply_are_shown_with_it() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        let held = store.revision().expect("rev");
        let mut node = Node::connect(&state, "partial", held as u64).await;
        let problem = |id: &str| aigw_wire::RecordProblem {
            kind: aigw_wire::messages::kinds::UPSTREAM,
            id: id.into(),
            error: "provider: must be openai or anthropic (got \"gemini\")".into(),
        };
        node.conn
            .send(&Message::Ack {
                revision: held as u64,
                problems: vec![problem("t/production/a"), problem("t/production/b")],
                problems_total: 3,
            })
            .await
            .expect("ack");
        let shown = |state: &PushState| {
            state
                .nodes()
                .into_iter()
                .find(|n| n.node_id == "partial")
                .map(|n| (n.problems.len(), n.problem_count))
        };
        for _ in 0..200 {
            if shown(&state) == Some((2, 3)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shown(&state), Some((2, 3)));
        let json = serde_json::to_value(state.node_views().expect("nodes")).expect("json");
        let listed = json
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == "partial"))
            .expect("listed");
        assert_eq!(listed["problems"][0]["kind"], "upstream");
        assert_eq!(listed["problems"][1]["id"], "t/production/b");
        // A later Ack without problems clears them.
        node.conn
            .send(&Message::Ack {
                revision: held as u64,
                problems: vec![],
                problems_total: 0,
            })
            .await
            .expect("ack");
        for _ in 0..200 {
            if shown(&state) == Some((0, 0)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shown(&state), Some((0, 0)));
    }

    /// The first message of a connection, and what it came to: a session (node id), an
    /// enrolment (node id), or a refusal (the error), with what the peer was sent.
    async fn handshake(
        state: &Arc<PushState>,
        cert: Option<Vec<u8>>,
        bytes: Vec<u8>,
    ) -> (anyhow::Result<String>, Vec<u8>) {
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let state = Arc::clone(state);
        let task = tokio::spawn(async move {
            open(theirs, cert, &state, "test").await.map(|o| match o {
                Opening::Session(_, hello) => hello.node.id,
                Opening::Enrolled(node) => node,
            })
        });
        // Only what fits the pipe is written; the rest is never asked for.
        let _ = tokio::time::timeout(Duration::from_millis(200), ours.write_all(&bytes)).await;
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("decided at once")
            .expect("task");
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(200), ours.read_to_end(&mut answer)).await;
        (result, answer)
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(m, &mut out);
        out
    }

    fn refusal(answer: &[u8]) -> String {
        match decode_frame(answer, DEFAULT_MAX_FRAME).expect("a frame") {
            Some((Frame::Message(Message::Refused { reason }), _)) => reason,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    /// Before it is authenticated a peer can make the control plane read one small Hello or
    /// Enroll and nothing else: a large first frame is refused from its header, another
    /// message type from its header; a Hello is served only with the certificate of an
    /// enrolled node that is not revoked, and is told why otherwise.
    #[tokio::test]
    async fn an_unauthenticated_peer_gets_one_small_hello_and_nothing_else() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        // A first frame announcing 16 MiB: refused from its header, before any body.
        let mut huge = ((16u32 << 20) + 2).to_be_bytes().to_vec();
        huge.extend_from_slice(&aigw_wire::messages::types::HELLO.to_be_bytes());
        huge.extend(std::iter::repeat_n(0u8, 8192));
        let (r, _) = handshake(&state, None, huge).await;
        assert!(r.expect_err("too large").to_string().contains("exceeds"));
        // Another message first: refused from its type.
        let snapshot = frame(&Message::Snapshot {
            revision: 1,
            part: 0,
            parts: 1,
            records: vec![],
            revision_id: 0,
        });
        let (r, _) = handshake(&state, Some(b"n".to_vec()), snapshot).await;
        assert!(r
            .expect_err("not a Hello")
            .to_string()
            .contains("neither Hello nor Enroll"));
        let hello = frame(&hello_message("n", 0));
        // No certificate: told to enrol.
        let (r, answer) = handshake(&state, None, hello.clone()).await;
        assert!(r.is_err());
        assert!(
            refusal(&answer).contains("enrol it"),
            "{}",
            refusal(&answer)
        );
        // A certificate no node holds (the CA signed it, say, for a node since re-enrolled).
        let (r, answer) = handshake(&state, Some(b"stranger".to_vec()), hello.clone()).await;
        assert!(r.is_err());
        assert!(refusal(&answer).contains("revoked or replaced"));
        // An enrolled node's certificate passes, whatever name its Hello gives.
        register(&state, "n", &NodeScope::default(), b"n-cert");
        let (r, _) = handshake(&state, Some(b"n-cert".to_vec()), hello.clone()).await;
        assert_eq!(r.expect("served"), "n");
        // Revoked: refused.
        store.revoke_node(&actor(), "n").expect("revoke");
        let (r, answer) = handshake(&state, Some(b"n-cert".to_vec()), hello).await;
        assert!(r.is_err());
        assert!(refusal(&answer).contains("revoked or replaced"));
    }

    /// A P-256 public key as a node sends it.
    fn node_public_key() -> Vec<u8> {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("key")
            .public_key_raw()
            .to_vec()
    }

    /// A node enrols once with its token: it is sent a certificate naming it, whose
    /// fingerprint the registry keeps; the token is then spent. Bad tokens and keys are
    /// refused with the reason.
    #[tokio::test]
    async fn a_node_enrols_once_with_its_token() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        let (_, token) = store
            .add_node(&actor(), "edge-1", &NodeScope::default(), None)
            .expect("add");
        let enroll = |token: &str, public_key: Vec<u8>| {
            frame(&Message::Enroll {
                token: token.into(),
                public_key,
            })
        };
        for bad in [
            "",
            "short",
            "aigw_enroll_0123456789abcdefghijklmnopqrstuvwxyzABCD",
        ] {
            let (r, answer) = handshake(&state, None, enroll(bad, node_public_key())).await;
            assert!(r.is_err(), "{bad:?}");
            assert!(refusal(&answer).contains("enrolment token is not valid"));
        }
        let (r, answer) = handshake(&state, None, enroll(&token, vec![4; 10])).await;
        assert!(r.is_err());
        assert!(refusal(&answer).starts_with("public_key:"));
        // The token survived the refused key.
        let (r, answer) = handshake(&state, None, enroll(&token, node_public_key())).await;
        assert_eq!(r.expect("enrolled"), "edge-1");
        let cert = match decode_frame(&answer, DEFAULT_MAX_FRAME).expect("frame") {
            Some((Frame::Message(Message::Enrolled { node_id, cert_der }), _)) => {
                assert_eq!(node_id, "edge-1");
                cert_der
            }
            other => panic!("{other:?}"),
        };
        let node = store
            .node_by_certificate(&fingerprint(&cert))
            .expect("read")
            .expect("the certificate names the node");
        assert_eq!(node.id, "edge-1");
        assert!(node.enrolled_at > 0);
        // Spent.
        let (r, answer) = handshake(&state, None, enroll(&token, node_public_key())).await;
        assert!(r.is_err());
        assert!(refusal(&answer).contains("enrolment token is not valid"));
    }

    /// A node receives only the keys and routing of its scope; a change elsewhere reaches
    /// it as an empty change set (its revision still moves); a new scope reaches it at once
    /// as a snapshot of that scope; revoked, its link is closed with the reason.
    #[tokio::test]
    async fn a_node_gets_its_scope_only_and_is_cut_off_when_revoked() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        store
            .create_tenant(&actor(), "u", "U", "pro")
            .expect("tenant");
        store
            .insert_key(
                &actor(),
                &crate::store::NewKey {
                    key_id: "kstaging0000".into(),
                    tenant_id: "t".into(),
                    environment: Environment::Staging,
                    sub_account_id: None,
                    name: String::new(),
                    hash: [1; 32],
                    allowed_models: vec![],
                    expires_at: 0,
                },
            )
            .expect("key");
        let scope = NodeScope {
            environments: vec!["staging".into()],
            tenants: vec!["t".into()],
        };
        register(&state, "scoped", &scope, b"scoped");
        let mut node = Node::connect_as(&state, b"scoped".to_vec(), 0).await;
        let kinds_of = |records: &[Record]| -> Vec<(u64, String)> {
            records
                .iter()
                .map(|r| (r.kind(), r.id().to_string()))
                .collect()
        };
        match node.next().await {
            Message::Snapshot { records, .. } => {
                // t's staging key; not t's production upstream, route or its credential.
                assert_eq!(
                    kinds_of(&records),
                    vec![(kinds::KEY, "kstaging0000".into())]
                );
                assert_eq!(credential_of(&records), None);
            }
            other => panic!("{other:?}"),
        }
        // A change to t's production: the revision moves, nothing of it is sent.
        let before = store.revision().expect("rev");
        store
            .put_route(&actor(), "t", Environment::Production, "r2", &route("m2"))
            .expect("route");
        state.notify();
        match node.next().await {
            Message::Changes {
                from_revision,
                to_revision,
                changes,
                ..
            } => {
                assert_eq!(from_revision, before as u64);
                assert_eq!(to_revision, before as u64 + 1);
                assert!(changes.is_empty(), "{changes:?}");
            }
            other => panic!("{other:?}"),
        }
        // Rescoped to production: a snapshot of production, credential included.
        store
            .set_node_scope(
                &actor(),
                "scoped",
                &NodeScope {
                    environments: vec!["production".into()],
                    tenants: vec![],
                },
            )
            .expect("scope");
        state.registry_changed();
        match node.next().await {
            Message::Snapshot { records, .. } => {
                assert!(records
                    .iter()
                    .all(|r| r.kind() != kinds::KEY || r.id() != "kstaging0000"));
                assert_eq!(credential_of(&records).as_deref(), Some(SECRET));
                assert_eq!(
                    records.iter().filter(|r| r.kind() == kinds::ROUTE).count(),
                    2
                );
            }
            other => panic!("{other:?}"),
        }
        // Revoked: told so, and the link closes.
        store.revoke_node(&actor(), "scoped").expect("revoke");
        state.registry_changed();
        match node.next().await {
            Message::Refused { reason } => assert_eq!(reason, "this node was revoked"),
            other => panic!("{other:?}"),
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), node.conn.next())
            .await
            .expect("closed in time");
        assert!(closed.is_err());
    }

    fn big_key(i: usize) -> crate::store::NewKey {
        crate::store::NewKey {
            key_id: format!("k{i:011}"),
            tenant_id: "t".into(),
            environment: Environment::Production,
            sub_account_id: None,
            name: String::new(),
            hash: [7; 32],
            allowed_models: (0..aigw_wire::rules::MAX_ALLOWED_MODELS)
                .map(|m| format!("{m:0>255}"))
                .collect(),
            expires_at: 0,
        }
    }

    /// Snapshot parts are sized by bytes, not only by count: keys with the longest model
    /// lists allowed still make frames well under the link's limit.
    #[tokio::test]
    async fn snapshot_parts_are_bounded_in_bytes() {
        let (store, dir) = store();
        for i in 0..120 {
            store.insert_key(&actor(), &big_key(i)).expect("key");
        }
        let state = push_state(&store, &dir);
        let mut node = Node::connect(&state, "fresh", 0).await;
        let mut parts_seen = 0;
        loop {
            let m = node.next().await;
            let mut frame = Vec::new();
            encode_frame(&m, &mut frame);
            let Message::Snapshot { part, parts, .. } = m else {
                panic!("expected a snapshot part");
            };
            assert!(
                frame.len() <= MAX_PART_BYTES + 128 * 1024,
                "part {part} is {} bytes",
                frame.len()
            );
            parts_seen += 1;
            if part + 1 == parts {
                assert!(
                    parts >= 2,
                    "120 keys of 64 KiB of models take several parts"
                );
                break;
            }
        }
        assert!(parts_seen >= 2);
    }

    /// A node that stops talking is let go after three heartbeats; a node that comes back
    /// shows the revision it holds at once; a change whose notification was missed still
    /// reaches it at the next heartbeat.
    #[tokio::test(start_paused = true)]
    async fn silent_nodes_are_let_go_and_heartbeats_catch_up() {
        let (store, dir) = store();
        let state = push_state(&store, &dir);
        let held = store.revision().expect("rev");
        let node = Node::connect(&state, "quiet", held as u64).await;
        let connected = |state: &PushState| {
            state
                .nodes()
                .into_iter()
                .find(|n| n.node_id == "quiet")
                .map(|n| (n.connected, n.applied_revision))
        };
        for _ in 0..100 {
            if connected(&state) == Some((true, held as u64)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            connected(&state),
            Some((true, held as u64)),
            "shows what it holds"
        );
        tokio::time::sleep(SILENT + Duration::from_secs(1)).await;
        assert_eq!(connected(&state), Some((false, held as u64)), "let go");
        drop(node);

        let mut node = Node::connect(&state, "again", held as u64).await;
        // Committed without telling the sessions.
        let w = store
            .put_route(&actor(), "t", Environment::Production, "r2", &route("m2"))
            .expect("route");
        match node.next().await {
            Message::Changes { to_revision, .. } => assert_eq!(to_revision, w.revision as u64),
            other => panic!("expected changes, got {other:?}"),
        }
    }
}
