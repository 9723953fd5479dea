//! The control thread: the node's end of the wire protocol.
//!
//! It connects to the control plane over TLS 1.3, says which revision it holds, receives a
//! snapshot or the changes since, validates them once into a new immutable key table, and
//! publishes it to every worker (who swap at once); then it acknowledges the revision, or
//! refuses it (NACK) and keeps the previous table. It reconnects with exponential backoff
//! and resumes from its revision. Blocking I/O on its own thread: none of this is on a
//! worker's path.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::spend::rate_lease;
use aigw_wire::{decode_frame, encode_frame, Frame, Message, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;

use crate::config::identity::{self, EnrollError, IdentityFiles};
use crate::config::pushed::{NodeConfig, NodeConfigBuilder, SharedConfig};
use crate::config::usage::{Reports, Spill, SPILL_EVERY};
use crate::config::ControlPlaneConfig;
use crate::runtime::shutdown::Shutdown;

/// Three missed heartbeats (sent every 5 s) and the link is considered dead.
const READ_TIMEOUT: Duration = Duration::from_secs(16);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often measured usage is cut into reports and sent.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// At stop, how long the node waits for the control plane to acknowledge its last reports
/// before it spills them to disk (or, without a sealed snapshot, loses them).
const FINAL_ACK_WAIT: Duration = Duration::from_secs(2);

/// The usage spill file beside a sealed snapshot: `<snapshot_file>.usage`.
pub fn spill_path(snapshot: &std::path::Path) -> std::path::PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".usage");
    p.into()
}

/// Where and how the applied table is kept on disk.
#[derive(Debug, Clone)]
pub struct Persist {
    pub path: std::path::PathBuf,
    pub kek: crate::seal::Kek,
    /// Where the key came from, for the messages that a wrong key causes.
    pub key_source: String,
}

/// Boots from the sealed snapshot, if there is one: the node serves what it last applied
/// even when the control plane is unreachable. A file that cannot be opened (wrong key,
/// tampered), or that is older than what the node last applied (it stopped before the
/// snapshot caught up), is not used and the node waits for the control plane: it fails
/// closed, so a restart never brings back a revoked key. The configuration's age is the
/// snapshot's.
pub fn boot_from_disk(persist: &Persist, keys: &SharedConfig) {
    if !persist.path.exists() {
        return;
    }
    match crate::config::snapshot::load(&persist.path, &persist.kek) {
        Ok(table) => {
            let held = (table.revision, table.revision_id);
            match crate::config::snapshot::read_mark(&persist.path) {
                Some(mark) if mark != held => {
                    tracing::error!(
                        snapshot_revision = held.0,
                        applied_revision = mark.0,
                        path = %persist.path.display(),
                        "the sealed snapshot is older than the configuration this node last applied; waiting for the control plane"
                    );
                    return;
                }
                _ => {}
            }
            tracing::info!(revision = table.revision, keys = table.len(), path = %persist.path.display(), "booted from the sealed snapshot");
            keys.publish(table);
            let age = std::fs::metadata(&persist.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            keys.touched_ago(age);
        }
        Err(e) => {
            tracing::error!(error = %e, path = %persist.path.display(), key = %persist.key_source, "sealed snapshot unusable (a wrong seal key?); waiting for the control plane")
        }
    }
}

/// Starts the control thread.
pub fn spawn(
    cfg: ControlPlaneConfig,
    keys: Arc<SharedConfig>,
    stop: Arc<Shutdown>,
    persist: Option<Persist>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let roots = roots(&cfg)?;
    let files = IdentityFiles::new(&cfg.identity_dir);
    let token = cfg.enrollment_token().map_err(anyhow::Error::msg)?;
    let boot_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let spill = persist.as_ref().map(|p| Spill {
        path: spill_path(&p.path),
        kek: p.kek.clone(),
    });
    let handle = std::thread::Builder::new().name("aigw-control".into()).spawn(move || {
        let mut reports = Reports::new(boot_epoch, spill);
        let mut last_spill = std::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut identity: Option<(Arc<rustls::ClientConfig>, String)> = None;
        while !stop.is_triggered() {
            if identity.is_none() {
                match identify(&cfg, &roots, &files, token.as_deref()) {
                    Ok(v) => identity = Some(v),
                    Err(e) => {
                        tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "this node cannot identify itself to the control plane");
                        hold_usage(&mut reports, &keys, &mut last_spill);
                        stop.sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let Some((tls, node_id)) = identity.as_ref() else {
                continue;
            };
            let ended = session(
                &cfg,
                tls,
                node_id,
                boot_epoch,
                &keys,
                &stop,
                persist.as_ref(),
                &mut reports,
            );
            keys.set_connected(false);
            reports.link_down();
            keys.bodies.link_down();
            keys.leases.link_down();
            match ended {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, revision = keys.revision(), retry_in_ms = backoff.as_millis() as u64, "control plane link down");
                }
            }
            hold_usage(&mut reports, &keys, &mut last_spill);
            stop.sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        // Stopping: whatever the control plane has not acknowledged goes to the spill file.
        reports.cut(&keys.usage);
        reports.spill();
        if reports.unacked_entries() > 0 {
            tracing::warn!(
                entries = reports.unacked_entries(),
                spilled = persist.is_some(),
                "usage not acknowledged by the control plane at stop"
            );
        }
    })?;
    Ok(handle)
}

/// The link's TLS config presenting this node's certificate, and the node's id: enrolling
/// first when the node has no identity, or has an enrolment token it has not used.
fn identify(
    cfg: &ControlPlaneConfig,
    roots: &rustls::RootCertStore,
    files: &IdentityFiles,
    token: Option<&str>,
) -> anyhow::Result<(Arc<rustls::ClientConfig>, String)> {
    let held = files.load()?;
    if let Some(token) = token.filter(|t| !files.used(t)) {
        let anonymous = identity::client_config(roots, None)?;
        let mut stream = connect(cfg, &anonymous)?;
        match identity::enroll(&mut stream, files, token) {
            Ok(id) => {
                tracing::info!(node = %id.node_id, dir = %files.dir.display(), "enrolled with the control plane");
                return Ok((identity::client_config(roots, Some(&id))?, id.node_id));
            }
            Err(EnrollError::Refused(reason)) if held.is_some() => {
                tracing::warn!(%reason, "the control plane refused the enrolment token; this node keeps the identity it has");
            }
            Err(e) => return Err(e.into()),
        }
    }
    match held {
        Some(id) => Ok((identity::client_config(roots, Some(&id))?, id.node_id)),
        None => anyhow::bail!(
            "no identity in {} yet: set {} to an enrolment token (on the control plane: controlplane node-add <node id>)",
            files.dir.display(),
            cfg.enrollment_token_env
        ),
    }
}

fn roots(cfg: &ControlPlaneConfig) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&cfg.ca_file)? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

type Link = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the control plane's link.
fn connect(cfg: &ControlPlaneConfig, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Link> {
    let addr = cfg
        .address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} has no address", cfg.address))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let host = cfg.server_name.clone().unwrap_or_else(|| {
        cfg.address
            .rsplit_once(':')
            .map_or(cfg.address.clone(), |(h, _)| h.to_string())
    });
    let name = ServerName::try_from(host)?;
    let mut conn = rustls::ClientConnection::new(Arc::clone(tls), name)?;
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    // Short once connected, so a worker's request for spend cap budget goes out within a
    // few tens of milliseconds (the thread looks for them between reads).
    tcp.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// While the control plane cannot take usage: cut it into reports (bounded) and keep the
/// spill file current.
fn hold_usage(reports: &mut Reports, keys: &SharedConfig, last_spill: &mut std::time::Instant) {
    reports.cut(&keys.usage);
    keys.set_usage_backlog(reports.unacked_entries(), reports.dropped_entries);
    if last_spill.elapsed() >= SPILL_EVERY {
        reports.spill();
        *last_spill = std::time::Instant::now();
    }
}

#[allow(clippy::too_many_arguments)]
fn session(
    cfg: &ControlPlaneConfig,
    tls: &Arc<rustls::ClientConfig>,
    node_id: &str,
    boot_epoch: u64,
    keys: &SharedConfig,
    stop: &Shutdown,
    persist: Option<&Persist>,
    reports: &mut Reports,
) -> anyhow::Result<()> {
    let mut stream = connect(cfg, tls)?;
    send(
        &mut stream,
        &Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: node_id.to_string(),
            boot_epoch,
            revision_held: keys.revision(),
            token: String::new(),
            revision_id: keys.load().revision_id,
        },
    )?;
    keys.set_connected(true);
    tracing::info!(address = %cfg.address, revision = keys.revision(), "control plane link up");
    // Read from the link; `buf[at..]` is not decoded yet (decoded frames are dropped from the
    // front only before the next read, not one by one).
    let mut buf = Vec::new();
    let mut at = 0;
    let mut snapshot: Option<Incoming> = None;
    let mut last_heard = std::time::Instant::now();
    let mut saved_revision = keys.revision();
    let mut last_save = std::time::Instant::now() - SAVE_EVERY;
    // The configuration counts as current (its age restarts) when a revision is applied,
    // or when the control plane's heartbeat finds the node holding what it was sent; not
    // while a revision it was sent stands refused.
    let mut refused = false;
    let mut last_report = std::time::Instant::now();
    let mut last_spill = std::time::Instant::now();
    let mut stopping: Option<std::time::Instant> = None;
    let mut seen_spend = std::sync::Arc::clone(&keys.load().routing.spend);
    loop {
        if stop.is_triggered() {
            match stopping {
                None => {
                    save_if_needed(persist, keys, &mut saved_revision, &mut last_save, true);
                    // The workers have stopped and handed over what they measured: send
                    // it, and wait a little for the acknowledgements.
                    reports.cut(&keys.usage);
                    for m in reports.to_send(node_id) {
                        send(&mut stream, &m)?;
                    }
                    // Spend cap budget and rate-limit leases this node will not use go back
                    // for other nodes — before the bodies: the control plane reads the link
                    // in order, and answering bodies can outlast this node's wait for it.
                    for a in keys.leases.take_unspent() {
                        send(
                            &mut stream,
                            &Message::LeaseReturn {
                                cap_id: a.cap_id,
                                period: a.period,
                                micros: a.want_micros,
                            },
                        )?;
                    }
                    send_bodies(&mut stream, &keys.bodies, node_id, boot_epoch)?;
                    stopping = Some(std::time::Instant::now());
                }
                Some(since)
                    if (reports.unacked_entries() == 0 && keys.bodies.held().0 == 0)
                        || since.elapsed() > FINAL_ACK_WAIT =>
                {
                    let (records, _) = keys.bodies.held();
                    if records > 0 {
                        tracing::warn!(
                            records,
                            "body log records not acknowledged by the control plane at stop are lost"
                        );
                    }
                    return Ok(());
                }
                Some(_) => {}
            }
        } else {
            save_if_needed(persist, keys, &mut saved_revision, &mut last_save, false);
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = std::time::Instant::now();
                reports.cut(&keys.usage);
                for m in reports.to_send(node_id) {
                    send(&mut stream, &m)?;
                }
                keys.set_usage_backlog(reports.unacked_entries(), reports.dropped_entries);
                if last_spill.elapsed() >= SPILL_EVERY {
                    reports.spill();
                    last_spill = std::time::Instant::now();
                }
                let spend = std::sync::Arc::clone(&keys.load().routing.spend);
                if !std::sync::Arc::ptr_eq(&spend, &seen_spend) {
                    // A cap's limit may have been raised: exhausted leases ask again.
                    keys.leases.reopen();
                    seen_spend = std::sync::Arc::clone(&spend);
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                keys.leases.prune(|id| match rate_lease::parse(id) {
                    Some(_) => Some(rate_lease::minute(now)),
                    None => spend.cap_records().get(id).map(|c| c.period.index(now)),
                });
            }
            // Bodies go as soon as the workers hand them over (they weigh on the queue's
            // bound until acknowledged).
            send_bodies(&mut stream, &keys.bodies, node_id, boot_epoch)?;
            for a in keys.leases.asks() {
                send(
                    &mut stream,
                    &Message::LeaseRequest {
                        cap_id: a.cap_id,
                        period: a.period,
                        want_micros: a.want_micros,
                    },
                )?;
            }
        }
        let msg = match decode_frame(&buf[at..], DEFAULT_MAX_FRAME)? {
            Some((frame, used)) => {
                at += used;
                match frame {
                    Frame::Message(m) => m,
                    Frame::Unknown(code) => {
                        tracing::debug!(code, "skipping an unknown message type");
                        continue;
                    }
                }
            }
            None => {
                buf.drain(..at);
                at = 0;
                let mut chunk = [0u8; 64 * 1024];
                match stream.read(&mut chunk) {
                    Ok(0) => anyhow::bail!("control plane closed the link"),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        last_heard = std::time::Instant::now();
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if last_heard.elapsed() > READ_TIMEOUT {
                            anyhow::bail!("no heartbeat from the control plane");
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
        };
        match msg {
            Message::Snapshot {
                revision,
                part,
                parts,
                records,
                revision_id,
            } => {
                if parts == 0 || part >= parts {
                    snapshot = None;
                    let error = format!("snapshot part {part} of {parts}");
                    tracing::error!(revision, error = %error, "refusing a malformed snapshot");
                    send(&mut stream, &Message::Nack { revision, error })?;
                    continue;
                }
                if part == 0 {
                    snapshot = Some(Incoming::new(revision, revision_id, parts, None));
                }
                let s = snapshot.get_or_insert_with(|| {
                    Incoming::new(
                        revision,
                        revision_id,
                        parts,
                        Some("a snapshot part arrived without its first part".into()),
                    )
                });
                if s.error.is_none()
                    && (s.revision, s.revision_id, s.parts, s.next)
                        != (revision, revision_id, parts, part)
                {
                    s.error = Some(format!(
                        "snapshot part {part}/{parts} of revision {revision} arrived, expected part {}/{} of revision {}",
                        s.next, s.parts, s.revision
                    ));
                }
                if s.error.is_none() {
                    s.builder.add_records(records);
                }
                s.next = part + 1;
                if part + 1 == parts {
                    let Some(done) = snapshot.take() else {
                        continue;
                    };
                    let reply = match done.error {
                        None => {
                            let t = done.builder.finish();
                            let n = t.len();
                            let ack = applied(&t);
                            let mark = (t.revision, t.revision_id);
                            keys.publish(t);
                            record_applied(persist, mark);
                            keys.touch();
                            refused = false;
                            tracing::info!(revision, keys = n, "applied snapshot");
                            ack
                        }
                        Some(e) => {
                            refused = true;
                            tracing::error!(revision, error = %e, "refusing a snapshot; keeping the previous configuration");
                            Message::Nack { revision, error: e }
                        }
                    };
                    send(&mut stream, &reply)?;
                }
            }
            Message::Changes {
                from_revision,
                to_revision,
                changes,
                revision_id,
            } => {
                let current = keys.load();
                if from_revision > current.revision {
                    anyhow::bail!(
                        "changes start at {from_revision} but this node holds {}",
                        current.revision
                    );
                }
                let refuse = if snapshot.is_some() {
                    Some("changes arrived in the middle of a snapshot".to_string())
                } else if to_revision <= current.revision || to_revision < from_revision {
                    Some(format!(
                        "changes {from_revision}..{to_revision} do not move this node past {}",
                        current.revision
                    ))
                } else {
                    None
                };
                if let Some(error) = refuse {
                    snapshot = None;
                    refused = true;
                    tracing::error!(revision = to_revision, error = %error, "refusing a revision");
                    send(
                        &mut stream,
                        &Message::Nack {
                            revision: to_revision,
                            error,
                        },
                    )?;
                    continue;
                }
                let n = changes.len();
                let t = current.apply_changes(to_revision, revision_id, changes);
                let reply = applied(&t);
                let mark = (t.revision, t.revision_id);
                keys.publish(t);
                record_applied(persist, mark);
                keys.touch();
                refused = false;
                tracing::debug!(revision = to_revision, changes = n, "applied changes");
                send(&mut stream, &reply)?;
            }
            Message::Heartbeat { .. } => {
                if !refused && snapshot.is_none() {
                    keys.touch();
                }
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                send(&mut stream, &Message::Heartbeat { unix_ms })?;
            }
            Message::UsageAck { boot_epoch, seq } | Message::EventAck { boot_epoch, seq } => {
                reports.acked(boot_epoch, seq)
            }
            Message::BodyLogAck {
                boot_epoch: epoch,
                seq,
            } if epoch == boot_epoch => keys.bodies.acked(seq),
            Message::BodyLogTenants { off, refuse } => keys.bodies.set_tenants(off, refuse),
            Message::LeaseGrant {
                cap_id,
                period,
                granted_micros,
                exhausted,
            } => keys
                .leases
                .granted(&cap_id, period, granted_micros, exhausted),
            Message::Refused { reason } => {
                anyhow::bail!(
                    "the control plane refused this node: {reason} (to enrol it again: controlplane node-enroll <node id>, then restart the node with the token in {})",
                    cfg.enrollment_token_env
                );
            }
            other => tracing::debug!(?other, "ignoring message"),
        }
    }
}

/// The Ack for a configuration just applied: with the records it holds and cannot use.
fn applied(config: &NodeConfig) -> Message {
    let (problems, total) = config.problems();
    for p in problems.iter().take(5) {
        tracing::warn!(revision = config.revision, kind = p.kind, id = %p.id, error = %p.error, "a record cannot be applied; it is unusable until a later revision fixes it");
    }
    if total > 5 {
        tracing::warn!(
            revision = config.revision,
            more = total - 5,
            "more records cannot be applied"
        );
    }
    Message::Ack {
        revision: config.revision,
        problems,
        problems_total: total as u64,
    }
}

/// A snapshot whose parts are arriving: they must come in order, all of one revision.
struct Incoming {
    builder: NodeConfigBuilder,
    revision: u64,
    revision_id: u64,
    parts: u64,
    next: u64,
    /// Set at the first problem; the snapshot is refused once its last part arrives.
    error: Option<String>,
}

impl Incoming {
    fn new(revision: u64, revision_id: u64, parts: u64, error: Option<String>) -> Self {
        Self {
            builder: NodeConfigBuilder::with_id(revision, revision_id),
            revision,
            revision_id,
            parts,
            next: 0,
            error,
        }
    }
}

/// Records beside the sealed snapshot which revision was just applied (see
/// [`crate::config::snapshot::mark_path`]).
fn record_applied(persist: Option<&Persist>, (revision, revision_id): (u64, u64)) {
    let Some(p) = persist else { return };
    if let Err(e) = crate::config::snapshot::write_mark(&p.path, revision, revision_id) {
        tracing::error!(error = %e, path = %p.path.display(), "recording the applied revision failed");
    }
}

/// Most one sealed write per this interval while changes keep coming.
const SAVE_EVERY: Duration = Duration::from_secs(1);

fn save_if_needed(
    persist: Option<&Persist>,
    keys: &SharedConfig,
    saved: &mut u64,
    last: &mut std::time::Instant,
    force: bool,
) {
    let Some(p) = persist else { return };
    let current = keys.revision();
    if current == *saved || !keys.loaded() || (!force && last.elapsed() < SAVE_EVERY) {
        return;
    }
    let table = keys.load();
    match crate::config::snapshot::save(&p.path, &p.kek, &table) {
        Ok(()) => {
            *saved = table.revision;
            tracing::debug!(revision = table.revision, "sealed snapshot written");
        }
        Err(e) => {
            tracing::error!(error = %e, path = %p.path.display(), "writing the sealed snapshot failed")
        }
    }
    *last = std::time::Instant::now();
}

/// The body log records to send now, in one write.
fn send_bodies(
    stream: &mut impl Write,
    bodies: &crate::config::bodies::BodyQueue,
    node_id: &str,
    boot_epoch: u64,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    if bodies.encode_to_send(node_id, boot_epoch, &mut out) > 0 {
        stream.write_all(&out)?;
        stream.flush()?;
    }
    Ok(())
}

fn send(stream: &mut impl Write, m: &Message) -> anyhow::Result<()> {
    let mut out = Vec::new();
    encode_frame(m, &mut out);
    stream.write_all(&out)?;
    stream.flush()?;
    Ok(())
}
