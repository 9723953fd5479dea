//! Pushing configuration to data-plane nodes over the wire protocol, on TLS 1.3.
//!
//! A node says which revision it holds; it gets the changes since then — every record changed
//! since, as it is now, or a tombstone when it was deleted — or a full snapshot (keys,
//! upstreams, routes and policies) when it holds nothing, a revision this control plane never
//! issued, or one older than what compaction kept of the changelog. After that every
//! committed mutation is pushed the moment it commits — revocations reach nodes in
//! milliseconds, not at the next poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aigw_wire::{
    decode_frame, encode_frame, Change, Frame, Message, Record, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::store::{Store, StoreError};

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
    pub node_token: String,
}

impl PushState {
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
        let entry = nodes.entry(node.to_string()).or_insert_with(|| NodeStatus {
            node_id: node.to_string(),
            boot_epoch: 0,
            connected: false,
            applied_revision: 0,
            last_error: None,
            problems: Vec::new(),
            problem_count: 0,
            snapshots_sent: 0,
            changes_sent: 0,
        });
        f(entry);
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
                hello(tls, &state).await
            };
            let (mut conn, hello) = match tokio::time::timeout(HANDSHAKE, handshake).await {
                Ok(Ok(v)) => v,
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
    buf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Conn<S> {
    /// Reads the next known message (unknown types are skipped). Cancel-safe: bytes read
    /// stay in `buf`.
    async fn next(&mut self) -> anyhow::Result<Message> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, DEFAULT_MAX_FRAME)? {
                self.buf.drain(..used);
                match frame {
                    Frame::Message(m) => return Ok(m),
                    Frame::Unknown(code) => {
                        tracing::debug!(code, "skipping an unknown message type")
                    }
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                anyhow::bail!("node closed the link");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Tells the peer why it is not served, closes the link cleanly (TLS close_notify,
    /// then FIN), and lets what the peer sent meanwhile drain a moment, so the closing does
    /// not reset the connection and destroy the explanation before the peer reads it.
    async fn refuse(&mut self, reason: &str) {
        let _ = self
            .send(&Message::Refused {
                reason: reason.into(),
            })
            .await;
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
        let mut out = Vec::new();
        encode_frame(m, &mut out);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// What a node said in its Hello, once its token checked out.
#[derive(Debug)]
struct Hello {
    node_id: String,
    boot_epoch: u64,
    revision_held: u64,
    revision_id: u64,
}

/// Reads and checks the first message of a connection. Before it is authenticated a peer
/// gets nothing but this: one frame of at most [`aigw_wire::frame::MAX_HELLO_FRAME`]
/// bytes, which must be a Hello; its body is not decoded before its size and type are
/// checked. A peer refused here is told why before the link closes.
async fn hello<S>(stream: S, state: &Arc<PushState>) -> anyhow::Result<(Conn<S>, Hello)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    let first = loop {
        if let Some(t) = aigw_wire::frame::peek_type(&conn.buf) {
            if t != aigw_wire::messages::types::HELLO {
                anyhow::bail!("first message (type {t}) was not Hello");
            }
        }
        match decode_frame(&conn.buf, aigw_wire::frame::MAX_HELLO_FRAME)? {
            Some((Frame::Message(m), used)) => {
                conn.buf.drain(..used);
                break m;
            }
            Some((Frame::Unknown(t), _)) => anyhow::bail!("first message (type {t}) was not Hello"),
            None => {}
        }
        let mut chunk = [0u8; 4096];
        let n = conn.stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("node closed the link before its Hello");
        }
        conn.buf.extend_from_slice(&chunk[..n]);
    };
    let Message::Hello {
        protocol_version,
        node_id,
        boot_epoch,
        revision_held,
        token,
        revision_id,
    } = first
    else {
        anyhow::bail!("first message was not Hello");
    };
    let ok: bool = aigw_wire::keys::token_is_acceptable(&token)
        && bool::from(token.as_bytes().ct_eq(state.node_token.as_bytes()));
    if !ok {
        conn.refuse("wrong node token").await;
        anyhow::bail!("node {node_id:?} presented a wrong token");
    }
    if protocol_version != PROTOCOL_VERSION {
        // One version apart still works: unknown fields and messages are skipped.
        tracing::info!(node = %node_id, protocol_version, "node speaks another protocol version");
    }
    Ok((
        conn,
        Hello {
            node_id,
            boot_epoch,
            revision_held,
            revision_id,
        },
    ))
}

async fn session<S>(conn: &mut Conn<S>, state: &Arc<PushState>, hello: Hello) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Hello {
        node_id,
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
    state.update(&node_id, |n| {
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
    let result = run_session(conn, state, &node_id, held).await;
    state.update(&node_id, |n| n.connected = false);
    result
}

async fn run_session<S>(
    conn: &mut Conn<S>,
    state: &Arc<PushState>,
    node: &str,
    held: Held,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rx = state.revision.subscribe();
    let store = Arc::clone(&state.store);
    // What the node holds for certain: its revision at hello, then what it acknowledged.
    let mut acked = held;
    let mut sent = sync(conn, state, &store, node, held).await?;
    // The newest revision ever offered on this link (a refusal does not lower it).
    let mut offered = sent.revision;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(heard + SILENT) => {
                anyhow::bail!("node {node} silent for {SILENT:?}");
            }
            changed = rx.changed() => {
                changed?;
                let newest = *rx.borrow_and_update();
                if newest > sent.revision {
                    sent = sync(conn, state, &store, node, sent).await?;
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
                other => tracing::debug!(node, ?other, "ignoring message"),
            }
            }
            _ = heartbeat.tick() => {
                let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                conn.send(&Message::Heartbeat { unix_ms }).await?;
                // A change whose notification was missed is still sent (one refused is
                // offered again only with the next change).
                if store.revision().is_ok_and(|newest| newest > offered) {
                    sent = sync(conn, state, &store, node, sent).await?;
                    offered = offered.max(sent.revision);
                }
            }
        }
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
/// many changes that one frame would not hold them.
fn plan(store: &Store, held: Held) -> Result<Update, StoreError> {
    let same_history = held.id == 0 || store.revision_id(held.revision)? == Some(held.id);
    if held.revision > 0 && same_history {
        if let Some((changes, newest, newest_id)) =
            store.changes_since_at_most(held.revision, SNAPSHOT_PART)?
        {
            if held.revision == newest {
                return Ok(Update::UpToDate);
            }
            let bytes: usize = changes.iter().map(encoded_len).sum();
            if held.revision < newest && bytes <= MAX_PART_BYTES {
                return Ok(Update::Changes(changes, newest, newest_id));
            }
        }
    }
    let (records, revision, id) = store.snapshot()?;
    Ok(Update::Snapshot(records, revision, id))
}

/// Brings a node holding `held` to the newest revision; returns what it was sent.
async fn sync<S>(
    conn: &mut Conn<S>,
    state: &PushState,
    store: &Arc<Store>,
    node: &str,
    held: Held,
) -> anyhow::Result<Held>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let update = tokio::task::spawn_blocking({
        let store = Arc::clone(store);
        move || plan(&store, held)
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
            // Sent on this link: its history is this store's, no need to check it again.
            Ok(Held {
                revision: to,
                id: 0,
            })
        }
        Update::Snapshot(records, revision, id) => {
            send_snapshot(conn, records, revision, id).await?;
            state.update(node, |n| n.snapshots_sent += 1);
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

    const TOKEN: &str = "aigw_node_test0123456789abcdefghijklmnopqrstuv";
    const SECRET: &str = "sk-push-PLAINTEXT";

    fn actor() -> Actor {
        Actor {
            principal: "admin".into(),
            source: "test".into(),
        }
    }

    fn store() -> (Arc<Store>, std::path::PathBuf) {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        let dir = std::env::temp_dir().join(format!(
            "aigw-push-{}-{}",
            std::process::id(),
            u64::from_le_bytes(b)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let kek = aigw_seal::Kek::generate().expect("key");
        let s = Store::open(&dir, kek).expect("store");
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

    fn push_state(store: &Arc<Store>) -> Arc<PushState> {
        let (tx, _) = watch::channel(store.revision().expect("rev"));
        Arc::new(PushState {
            store: Arc::clone(store),
            revision: tx,
            nodes: Mutex::new(HashMap::new()),
            node_token: TOKEN.into(),
        })
    }

    struct Node {
        conn: Conn<DuplexStream>,
    }

    impl Node {
        async fn connect(state: &Arc<PushState>, id: &str, held: u64) -> Self {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let state = Arc::clone(state);
            tokio::spawn(async move {
                if let Ok((mut conn, hello)) = hello(theirs, &state).await {
                    let _ = session(&mut conn, &state, hello).await;
                }
            });
            let mut conn = Conn {
                stream: ours,
                buf: Vec::new(),
            };
            conn.send(&Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: id.into(),
                boot_epoch: 1,
                revision_held: held,
                token: TOKEN.into(),
                revision_id: 0,
            })
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
                if !matches!(m, Message::Heartbeat { .. }) {
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
        let state = push_state(&store);
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn after_a_nack_the_next_push_starts_from_what_the_node_holds() {
        let (store, dir) = store();
        let state = push_state(&store);
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_records_a_node_cannot_apply_are_shown_with_it() {
        let (store, dir) = store();
        let state = push_state(&store);
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
        let json = serde_json::to_value(state.nodes()).expect("json");
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Before it is authenticated a peer can make the control plane read one small Hello and
    /// nothing else: a large first frame is refused from its header, another message type
    /// from its header, a wrong, empty or short token with a Refused message.
    #[tokio::test]
    async fn an_unauthenticated_peer_gets_one_small_hello_and_nothing_else() {
        let (store, dir) = store();
        let state = push_state(&store);
        async fn handshake(
            state: &Arc<PushState>,
            bytes: Vec<u8>,
        ) -> (anyhow::Result<()>, Vec<u8>) {
            let (mut ours, theirs) = tokio::io::duplex(1 << 16);
            let state = Arc::clone(state);
            let task = tokio::spawn(async move { hello(theirs, &state).await.map(|_| ()) });
            // Only what fits the pipe is written; the rest is never asked for.
            let _ = tokio::time::timeout(Duration::from_millis(200), ours.write_all(&bytes)).await;
            let result = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("decided at once")
                .expect("task");
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(200), ours.read_to_end(&mut answer))
                .await;
            (result, answer)
        }
        let frame = |m: &Message| {
            let mut out = Vec::new();
            encode_frame(m, &mut out);
            out
        };
        // A first frame announcing 16 MiB: refused from its header, before any body.
        let mut huge = ((16u32 << 20) + 2).to_be_bytes().to_vec();
        huge.extend_from_slice(&aigw_wire::messages::types::HELLO.to_be_bytes());
        huge.extend(std::iter::repeat_n(0u8, 8192));
        let (r, _) = handshake(&state, huge).await;
        assert!(r.expect_err("too large").to_string().contains("exceeds"));
        // Another message first: refused from its type.
        let snapshot = frame(&Message::Snapshot {
            revision: 1,
            part: 0,
            parts: 1,
            records: vec![],
            revision_id: 0,
        });
        let (r, _) = handshake(&state, snapshot).await;
        assert!(r
            .expect_err("not a Hello")
            .to_string()
            .contains("was not Hello"));
        // Wrong, empty and short tokens: told why.
        for token in [
            "",
            "short",
            "aigw_node_wrong0123456789abcdefghijklmnopqrstuv",
        ] {
            let hello = frame(&Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: "n".into(),
                boot_epoch: 1,
                revision_held: 0,
                token: token.into(),
                revision_id: 0,
            });
            let (r, answer) = handshake(&state, hello).await;
            assert!(r.is_err(), "{token:?} accepted");
            match decode_frame(&answer, DEFAULT_MAX_FRAME).expect("a frame") {
                Some((Frame::Message(Message::Refused { reason }), _)) => {
                    assert_eq!(reason, "wrong node token")
                }
                other => panic!("{token:?}: {other:?}"),
            }
        }
        // The right token passes.
        let hello = frame(&Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "n".into(),
            boot_epoch: 1,
            revision_held: 0,
            token: TOKEN.into(),
            revision_id: 0,
        });
        let (r, _) = handshake(&state, hello).await;
        assert!(r.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
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
        let state = push_state(&store);
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node that stops talking is let go after three heartbeats; a node that comes back
    /// shows the revision it holds at once; a change whose notification was missed still
    /// reaches it at the next heartbeat.
    #[tokio::test(start_paused = true)]
    async fn silent_nodes_are_let_go_and_heartbeats_catch_up() {
        let (store, dir) = store();
        let state = push_state(&store);
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
