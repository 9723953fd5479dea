//! Pushing configuration to data-plane nodes over the wire protocol, on TLS 1.3.
//!
//! A node says which revision it holds; it gets the changes since then (the changelog keeps
//! every entry, so any revision the control plane ever issued can be caught up from), or a
//! full snapshot when it holds nothing or a revision this control plane never issued. After
//! that every committed mutation is pushed the moment it commits — revocations reach nodes
//! in milliseconds, not at the next poll.

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

use crate::store::Store;

/// Keys per snapshot part.
const SNAPSHOT_PART: usize = 20_000;
const HEARTBEAT: Duration = Duration::from_secs(5);

/// What the control plane knows of a node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub boot_epoch: u64,
    pub connected: bool,
    /// The newest revision the node acknowledged as applied on every worker.
    pub applied_revision: u64,
    pub last_error: Option<String>,
    /// Full snapshots and change sets sent over the node's current connection.
    pub snapshots_sent: u64,
    pub changes_sent: u64,
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
            self.revision.send_if_modified(|v| {
                let moved = *v != r;
                *v = r;
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
            snapshots_sent: 0,
            changes_sent: 0,
        });
        f(entry);
    }
}

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, state: Arc<PushState>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "push listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    if let Err(e) = session(tls, &state).await {
                        tracing::info!(peer = %peer, error = %e, "node session ended");
                    }
                }
                Ok(Err(e)) => tracing::warn!(peer = %peer, error = %e, "node TLS handshake failed"),
                Err(_) => tracing::warn!(peer = %peer, "node TLS handshake timed out"),
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

    async fn send(&mut self, m: &Message) -> anyhow::Result<()> {
        let mut out = Vec::new();
        encode_frame(m, &mut out);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

async fn session<S>(stream: S, state: &Arc<PushState>) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    let hello = tokio::time::timeout(Duration::from_secs(10), conn.next()).await??;
    let Message::Hello {
        protocol_version,
        node_id,
        boot_epoch,
        revision_held,
        token,
    } = hello
    else {
        anyhow::bail!("first message was not Hello");
    };
    let ok: bool = token.as_bytes().ct_eq(state.node_token.as_bytes()).into();
    if !ok {
        anyhow::bail!("node {node_id:?} presented a wrong token");
    }
    if protocol_version != PROTOCOL_VERSION {
        // One version apart still works: unknown fields and messages are skipped.
        tracing::info!(node = %node_id, protocol_version, "node speaks another protocol version");
    }
    state.update(&node_id, |n| {
        n.connected = true;
        n.boot_epoch = boot_epoch;
        n.snapshots_sent = 0;
        n.changes_sent = 0;
    });
    let result = run_session(&mut conn, state, &node_id, revision_held).await;
    state.update(&node_id, |n| n.connected = false);
    result
}

async fn run_session<S>(
    conn: &mut Conn<S>,
    state: &Arc<PushState>,
    node: &str,
    held: u64,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rx = state.revision.subscribe();
    let store = Arc::clone(&state.store);
    let current = tokio::task::spawn_blocking({
        let store = Arc::clone(&store);
        move || store.revision()
    })
    .await??;
    let mut sent = held as i64;
    if held == 0 || sent > current {
        send_snapshot(conn, &store, current).await?;
        state.update(node, |n| n.snapshots_sent += 1);
        sent = current;
    } else if sent < current {
        sent = send_changes(conn, &store, sent).await?;
        state.update(node, |n| n.changes_sent += 1);
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                changed?;
                let newest = *rx.borrow_and_update();
                if newest > sent {
                    sent = send_changes(conn, &store, sent).await?;
                    state.update(node, |n| n.changes_sent += 1);
                }
            }
            msg = conn.next() => match msg? {
                Message::Ack { revision } => state.update(node, |n| {
                    n.applied_revision = n.applied_revision.max(revision);
                    n.last_error = None;
                }),
                Message::Nack { revision, error } => {
                    tracing::warn!(node, revision, error = %error, "node refused a revision");
                    state.update(node, |n| n.last_error = Some(format!("revision {revision}: {error}")));
                }
                Message::Heartbeat { .. } => {}
                other => tracing::debug!(node, ?other, "ignoring message"),
            },
            _ = heartbeat.tick() => {
                let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                conn.send(&Message::Heartbeat { unix_ms }).await?;
            }
        }
    }
}

async fn send_snapshot<S>(
    conn: &mut Conn<S>,
    store: &Arc<Store>,
    revision: i64,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let records = tokio::task::spawn_blocking({
        let store = Arc::clone(store);
        move || store.key_records(None)
    })
    .await??;
    let parts = records.len().div_ceil(SNAPSHOT_PART).max(1);
    let mut it = records.into_iter().map(Record::Key);
    for part in 0..parts {
        let chunk: Vec<Record> = it.by_ref().take(SNAPSHOT_PART).collect();
        conn.send(&Message::Snapshot {
            revision: revision as u64,
            part: part as u64,
            parts: parts as u64,
            records: chunk,
        })
        .await?;
    }
    Ok(())
}

/// Sends the changes after `from`; returns the revision they bring the node to.
async fn send_changes<S>(conn: &mut Conn<S>, store: &Arc<Store>, from: i64) -> anyhow::Result<i64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (records, to) = tokio::task::spawn_blocking({
        let store = Arc::clone(store);
        move || {
            let (ids, to) = store.keys_changed_since(from)?;
            Ok::<_, crate::store::StoreError>((store.key_records(Some(&ids))?, to))
        }
    })
    .await??;
    let changes = records
        .into_iter()
        .map(|k| Change::Upsert(Record::Key(k)))
        .collect();
    conn.send(&Message::Changes {
        from_revision: from as u64,
        to_revision: to as u64,
        changes,
    })
    .await?;
    Ok(to)
}
