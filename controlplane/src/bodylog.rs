//! The body log: request and response bodies, sealed, in append-only segments bucketed by
//! tenant and day.
//!
//! A segment is one sealed file ([`aigw_seal`]) whose purpose names the tenant (by a hash
//! of its id), the day and the segment id, so a segment cannot be passed off as another.
//! Each record is one chunk: its associated data binds the segment's head, the record's
//! index and a last-record flag. A segment is closed with a final, empty record when it is
//! rotated (a size or record bound, another day) and when the control plane stops in order,
//! so truncation, reordering, a dropped record or a record moved from another segment is
//! detected. A segment a crash left open has no final record: its whole records are
//! readable and it is reported unterminated; a segment the index says was closed and that
//! lacks its final record is refused as tampered.
//!
//! Writing happens on one thread of its own ([`Writer`]); the index (tenant, request id →
//! segment, record) is in the store, so reading one request's bodies is a seek. The
//! segments live behind [`SegmentStore`], a directory on one machine ([`DirStore`]); an
//! object store can implement it.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use aigw_seal::{Kek, Opener, SealError, Sealer};
use sha2::Digest;

use crate::store::{IndexRow, SegmentRow, Store, StoreError};

/// A segment is closed once it holds this many bytes…
pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;
/// …or this many records.
pub const MAX_SEGMENT_RECORDS: u64 = 10_000;
/// Records waiting for the writer, at most; beyond, the link does not acknowledge and the
/// node resends later.
pub const WRITER_QUEUE: usize = 1024;
/// Records indexed in one transaction, at most.
const MAX_BATCH: usize = 256;

/// Where segments are kept. Segments are only ever appended to, read whole and deleted
/// whole.
pub trait SegmentStore: Send + Sync + std::fmt::Debug {
    fn append(&self, seg: &SegmentRow, bytes: &[u8]) -> std::io::Result<()>;
    fn read(&self, seg: &SegmentRow) -> std::io::Result<Vec<u8>>;
    fn delete(&self, seg: &SegmentRow) -> std::io::Result<()>;
}

/// Segments as files: `<root>/<tenant hash>/<day>/<segment id>.seal`, directories 0700,
/// files 0600. The segments appended to lately stay open (at most [`OPEN_FILES`]), so a
/// record costs one write, not a directory check, an open and a close.
#[derive(Debug)]
pub struct DirStore {
    pub root: PathBuf,
    files: std::sync::Mutex<std::collections::HashMap<PathBuf, std::fs::File>>,
}

/// Segment files a [`DirStore`] keeps open, at most.
const OPEN_FILES: usize = 64;

/// A tenant id as a file name and in a segment's purpose: tenant ids are not restricted to
/// characters a file name may hold.
pub fn tenant_hash(tenant_id: &str) -> String {
    hex::encode(&sha2::Sha256::digest(tenant_id.as_bytes())[..16])
}

impl DirStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            files: Default::default(),
        }
    }

    pub fn path(&self, seg: &SegmentRow) -> PathBuf {
        self.root
            .join(tenant_hash(&seg.tenant_id))
            .join(&seg.day)
            .join(format!("{}.seal", seg.segment_id))
    }
}

impl SegmentStore for DirStore {
    fn append(&self, seg: &SegmentRow, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = self.path(seg);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if !files.contains_key(&path) && files.len() >= OPEN_FILES {
            files.clear();
        }
        let f = match files.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                if let Some(dir) = path.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)?;
                }
                v.insert(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(&path)?,
                )
            }
        };
        let written = f.write_all(bytes);
        if written.is_err() {
            files.remove(&path);
        }
        written
    }

    fn read(&self, seg: &SegmentRow) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(seg))
    }

    fn delete(&self, seg: &SegmentRow) -> std::io::Result<()> {
        let path = self.path(seg);
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&path);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Empty day and tenant directories go too.
        if let Some(day) = path.parent() {
            if std::fs::remove_dir(day).is_ok() {
                if let Some(tenant) = day.parent() {
                    let _ = std::fs::remove_dir(tenant);
                }
            }
        }
        Ok(())
    }
}

/// A segment's purpose, bound into its head and so into every record's associated data.
pub fn purpose(seg: &SegmentRow) -> String {
    format!(
        "body-log/{}/{}/{}",
        tenant_hash(&seg.tenant_id),
        seg.day,
        seg.segment_id
    )
}

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyRecord {
    /// JSON: request id, tenant, node, time, status, model, truncation flags.
    pub meta: String,
    pub request: Vec<u8>,
    pub response: Vec<u8>,
}

impl BodyRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(12 + self.meta.len() + self.request.len() + self.response.len());
        for part in [self.meta.as_bytes(), &self.request, &self.response] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn decode(mut b: &[u8]) -> Result<Self, ReadError> {
        let mut parts = Vec::with_capacity(3);
        for _ in 0..3 {
            if b.len() < 4 {
                return Err(ReadError::Malformed);
            }
            let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            b = &b[4..];
            if b.len() < n {
                return Err(ReadError::Malformed);
            }
            parts.push(b[..n].to_vec());
            b = &b[n..];
        }
        if !b.is_empty() {
            return Err(ReadError::Malformed);
        }
        let response = parts.pop().unwrap_or_default();
        let request = parts.pop().unwrap_or_default();
        let meta =
            String::from_utf8(parts.pop().unwrap_or_default()).map_err(|_| ReadError::Malformed)?;
        Ok(Self {
            meta,
            request,
            response,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the segment does not open: {0}")]
    Seal(#[from] SealError),
    #[error("the segment was closed but its final record is missing (truncated)")]
    Unterminated,
    #[error("a record in the segment is malformed")]
    Malformed,
    #[error("the segment holds no record {0}")]
    NoRecord(u64),
    #[error("the record is not the one the index names")]
    Mismatch,
    #[error("reading the segment: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A segment read back: its records, and whether its final record was there.
#[derive(Debug)]
pub struct Segment {
    pub records: Vec<BodyRecord>,
    pub terminated: bool,
}

/// Reads a segment's records, every one authenticated in order. `closed`: the segment was
/// closed, so its final record must be there; otherwise (open, or left open by a crash)
/// the records up to the last whole one are returned, reported unterminated.
pub fn read_segment(
    kek: &Kek,
    seg: &SegmentRow,
    bytes: &[u8],
    closed: bool,
) -> Result<Segment, ReadError> {
    let mut opener = Opener::new(kek, &purpose(seg), Cursor::new(bytes))?;
    let mut records = Vec::new();
    loop {
        match opener.next_chunk() {
            // The final record, empty, is the only empty chunk ever written.
            Ok(Some(pt)) if pt.is_empty() => {}
            Ok(Some(pt)) => records.push(BodyRecord::decode(&pt)?),
            Ok(None) => {
                return Ok(Segment {
                    records,
                    terminated: true,
                })
            }
            // The bytes end before a final record: at a record boundary, or within a record
            // (a segment still being written, or cut by a crash mid-write).
            Err(SealError::Format) if closed => return Err(ReadError::Unterminated),
            Err(SealError::Format) => {
                return Ok(Segment {
                    records,
                    terminated: false,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Records appended in a batch, indexed together.
#[derive(Default)]
struct Pending {
    rows: Vec<IndexRow>,
    done: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// Appends to segments, one open segment per tenant and day.
struct Open {
    row: SegmentRow,
    sealer: Sealer,
    bytes: u64,
}

/// What the writer thread is asked to do.
pub enum Job {
    Append {
        node_id: String,
        boot_epoch: u64,
        seq: u64,
        tenant_id: String,
        request_id: String,
        /// The UTC day the request ended (`YYYY-MM-DD`).
        day: String,
        record: BodyRecord,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Closes every open segment and ends the writer (the control plane is stopping).
    Close { done: std::sync::mpsc::Sender<()> },
    /// Deletes what has outlived its retention as of `today`; sends how many segments went.
    Sweep {
        today: String,
        done: Option<tokio::sync::oneshot::Sender<Result<usize, String>>>,
    },
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Append { request_id, .. } => f
                .debug_struct("Append")
                .field("request_id", request_id)
                .finish(),
            Self::Sweep { today, .. } => f.debug_struct("Sweep").field("today", today).finish(),
            Self::Close { .. } => f.write_str("Close"),
        }
    }
}

/// The writer: owns every open segment; the sweeper runs on it too, so a segment is never
/// deleted under a write.
pub struct Writer {
    kek: Kek,
    store: Arc<Store>,
    segments: Arc<dyn SegmentStore>,
    open: HashMap<(String, String), Open>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("open", &self.open.len())
            .finish()
    }
}

/// The handle the link and the admin API use.
#[derive(Debug, Clone)]
pub struct BodyLog {
    pub kek: Kek,
    pub store: Arc<Store>,
    pub segments: Arc<dyn SegmentStore>,
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl BodyLog {
    /// Starts the writer thread; it closes every open segment and exits once every handle
    /// is dropped. Segments a previous run left open are marked unterminated first.
    pub fn start(
        kek: Kek,
        store: Arc<Store>,
        segments: Arc<dyn SegmentStore>,
    ) -> anyhow::Result<(Self, std::thread::JoinHandle<()>)> {
        let left = store.body_segments_unterminated()?;
        if left > 0 {
            tracing::warn!(
                segments = left,
                "body log segments left open by an earlier run are unterminated; their whole records stay readable"
            );
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITER_QUEUE);
        let mut writer = Writer {
            kek: kek.clone(),
            store: Arc::clone(&store),
            segments: Arc::clone(&segments),
            open: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("aigw-bodylog".into())
            .spawn(move || {
                // What has queued up is written together: one transaction indexes it all.
                while let Ok(job) = rx.recv() {
                    let mut batch = vec![job];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    if writer.run(batch) {
                        return;
                    }
                }
                writer.close_all();
            })?;
        Ok((
            Self {
                kek,
                store,
                segments,
                tx,
            },
            thread,
        ))
    }

    /// Hands a job to the writer; false when its queue is full (the caller does not
    /// acknowledge, and the node resends).
    pub fn submit(&self, job: Job) -> bool {
        self.tx.try_send(job).is_ok()
    }

    /// Closes every open segment and ends the writer, waiting for it (at an orderly stop:
    /// records already acknowledged are all in closed segments). Nothing is written after.
    pub fn close(&self) {
        let (done, closed) = std::sync::mpsc::channel();
        if self.tx.send(Job::Close { done }).is_ok() {
            let _ = closed.recv();
        }
    }

    /// Asks for a sweep as of today (not waiting for it).
    pub fn sweep_soon(&self) {
        let _ = self.tx.try_send(Job::Sweep {
            today: today(),
            done: None,
        });
    }

    /// A tenant's logged request, while it is retained.
    pub fn get(&self, tenant_id: &str, request_id: &str) -> Result<Option<BodyRecord>, ReadError> {
        let Some(place) = self.store.body_record(tenant_id, request_id)? else {
            return Ok(None);
        };
        let kek = match self.store.body_segment_key(&place.segment)? {
            Some(wrapped) => self.store.tenant_unwrap(tenant_id, &wrapped)?,
            None => self.kek.clone(),
        };
        let bytes = self.segments.read(&place.segment)?;
        let closed = place.segment.state == "closed";
        let seg = read_segment(&kek, &place.segment, &bytes, closed)?;
        let record = seg
            .records
            .into_iter()
            .nth(place.record_index as usize)
            .ok_or(ReadError::NoRecord(place.record_index))?;
        let meta: serde_json::Value =
            serde_json::from_str(&record.meta).map_err(|_| ReadError::Malformed)?;
        if meta.get("request_id").and_then(|v| v.as_str()) != Some(request_id) {
            return Err(ReadError::Mismatch);
        }
        Ok(Some(record))
    }
}

/// Today as `YYYY-MM-DD` (UTC).
pub fn today() -> String {
    day_of(crate::store::now())
}

pub fn day_of(unix: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Whether a segment of `day` kept `retention_days` has expired by `today`: a day's
/// segments are kept for `retention_days` whole days after it.
pub fn expired(day: &str, retention_days: u32, today: &str) -> bool {
    let parse = |s: &str| {
        let mut it = s.splitn(3, '-');
        let y: i32 = it.next()?.parse().ok()?;
        let m: u8 = it.next()?.parse().ok()?;
        let d: u8 = it.next()?.parse().ok()?;
        time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()
    };
    match (parse(day), parse(today)) {
        (Some(d), Some(t)) => (t - d).whole_days() > i64::from(retention_days),
        // Not a day this writer made: never deleted by the sweeper.
        _ => false,
    }
}

fn new_segment_id() -> Result<String, String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(format!("{}-{}", crate::store::now(), hex::encode(b)))
}

impl Writer {
    /// Runs a batch of jobs; true once the writer is closed.
    fn run(&mut self, batch: Vec<Job>) -> bool {
        // What the store says of the batch's records (their tenants' settings, whether
        // they are logged already), read together rather than record by record.
        let mut tenants: Vec<&str> = Vec::new();
        let mut asked: Vec<(&str, u64, u64)> = Vec::new();
        for job in &batch {
            if let Job::Append {
                node_id,
                boot_epoch,
                seq,
                tenant_id,
                ..
            } = job
            {
                if !tenants.contains(&tenant_id.as_str()) {
                    tenants.push(tenant_id);
                }
                asked.push((node_id, *boot_epoch, *seq));
            }
        }
        let checks = self
            .store
            .body_log_checks(&tenants, &asked)
            .map_err(|e| e.to_string());
        drop((tenants, asked));
        let mut pending = Pending::default();
        // Records of this batch written (or answered) already, across its flushes.
        let mut sent = std::collections::HashSet::new();
        let mut nth = 0;
        for job in batch {
            match job {
                Job::Append {
                    node_id,
                    boot_epoch,
                    seq,
                    tenant_id,
                    request_id,
                    day,
                    record,
                    done,
                } => {
                    let asked = nth;
                    nth += 1;
                    if !sent.insert((node_id.clone(), boot_epoch, seq)) {
                        // The same record twice in one batch (a resend): written once.
                        pending.done.push(done);
                        continue;
                    }
                    let checks = match &checks {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = done.send(Err(e.clone()));
                            continue;
                        }
                    };
                    let enabled = checks.enabled.get(&tenant_id).copied().flatten();
                    if enabled != Some(true) || checks.logged.get(asked).copied().unwrap_or(false) {
                        // Opted out, no such tenant, or written before: nothing to write.
                        let _ = done.send(Ok(()));
                        continue;
                    }
                    match self.append(
                        &node_id,
                        boot_epoch,
                        seq,
                        &tenant_id,
                        &request_id,
                        &day,
                        &record,
                    ) {
                        Ok(Some(row)) => {
                            pending.rows.push(row);
                            pending.done.push(done);
                        }
                        Ok(None) => {
                            let _ = done.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                Job::Close { done } => {
                    self.flush(std::mem::take(&mut pending));
                    self.close_all();
                    let _ = done.send(());
                    return true;
                }
                Job::Sweep { today, done } => {
                    self.flush(std::mem::take(&mut pending));
                    let r = self.sweep(&today);
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "body log sweep failed");
                    }
                    if let Some(done) = done {
                        let _ = done.send(r);
                    }
                }
            }
        }
        self.flush(pending);
        false
    }

    /// Indexes the records appended, in one transaction, and answers their senders.
    fn flush(&self, pending: Pending) {
        if pending.done.is_empty() {
            return;
        }
        let r = self
            .store
            .body_records_indexed(&pending.rows)
            .map_err(|e| e.to_string());
        if let Err(e) = &r {
            tracing::error!(error = %e, "cannot index body log records; the nodes send them again");
        }
        for done in pending.done {
            let _ = done.send(r.clone());
        }
    }

    /// Appends a record the batch's checks let through (its tenant logs bodies, it is not
    /// logged yet) to its tenant's open segment of `day`; `None` when it is not written
    /// (the tenant's own KMS key does not answer).
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        node_id: &str,
        boot_epoch: u64,
        seq: u64,
        tenant_id: &str,
        request_id: &str,
        day: &str,
        record: &BodyRecord,
    ) -> Result<Option<IndexRow>, String> {
        let store = Arc::clone(&self.store);
        // Another day for this tenant: its segments of earlier days are done.
        let stale: Vec<_> = self
            .open
            .keys()
            .filter(|(t, d)| t == tenant_id && d.as_str() < day)
            .cloned()
            .collect();
        for k in stale {
            self.close(&k);
        }
        let key = (tenant_id.to_string(), day.to_string());
        let full = self
            .open
            .get(&key)
            .is_some_and(|o| o.bytes >= MAX_SEGMENT_BYTES || o.row.records >= MAX_SEGMENT_RECORDS);
        if full {
            self.close(&key);
        }
        if !self.open.contains_key(&key) {
            let row = SegmentRow {
                tenant_id: tenant_id.to_string(),
                day: day.to_string(),
                segment_id: new_segment_id()?,
                state: "open".into(),
                records: 0,
            };
            // An enterprise tenant's own KMS key seals its segments (through a data key it
            // generates, kept wrapped beside the segment's index row); when that key does not
            // answer (disabled, say), its bodies are not written.
            let cmk = match store.tenant_data_key(tenant_id) {
                Ok(k) => k,
                Err(StoreError::Kms(e)) => {
                    tracing::warn!(tenant = tenant_id, error = %e, "a body log record is not written: the tenant's own key does not answer");
                    return Ok(None);
                }
                Err(e) => return Err(e.to_string()),
            };
            let kek = cmk
                .as_ref()
                .map_or_else(|| self.kek.clone(), |(k, _)| k.clone());
            let (sealer, head) = Sealer::new(&kek, &purpose(&row)).map_err(|e| e.to_string())?;
            store.body_segment_opened(&row).map_err(|e| e.to_string())?;
            if let Some((_, wrapped)) = &cmk {
                store
                    .body_segment_key_set(&row, wrapped)
                    .map_err(|e| e.to_string())?;
            }
            self.segments
                .append(&row, &head)
                .map_err(|e| format!("writing a body log segment: {e}"))?;
            self.open.insert(
                key.clone(),
                Open {
                    row,
                    sealer,
                    bytes: head.len() as u64,
                },
            );
        }
        let Some(open) = self.open.get_mut(&key) else {
            return Err("no open segment".into());
        };
        let chunk = open
            .sealer
            .chunk(&record.encode(), false)
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.segments.append(&open.row, &chunk) {
            // A partial write would leave the segment unreadable past it: it is not
            // written again.
            tracing::error!(error = %e, "writing a body log segment failed; the segment is abandoned");
            self.open.remove(&key);
            return Err(format!("writing a body log segment: {e}"));
        }
        let index = open.row.records;
        open.row.records += 1;
        open.bytes += chunk.len() as u64;
        Ok(Some(IndexRow {
            segment: open.row.clone(),
            record_index: index,
            request_id: request_id.to_string(),
            node_id: node_id.to_string(),
            boot_epoch,
            seq,
        }))
    }

    /// Writes a segment's final record and marks it closed.
    fn close(&mut self, key: &(String, String)) {
        let Some(mut open) = self.open.remove(key) else {
            return;
        };
        let done = open
            .sealer
            .chunk(&[], true)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                self.segments
                    .append(&open.row, &c)
                    .map_err(|e| e.to_string())
            })
            .and_then(|()| {
                self.store
                    .body_segment_closed(&open.row)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = done {
            tracing::error!(error = %e, segment = %open.row.segment_id, "closing a body log segment failed; it stays unterminated");
        }
        open.row.state = "closed".into();
    }

    fn close_all(&mut self) {
        let keys: Vec<_> = self.open.keys().cloned().collect();
        for k in keys {
            self.close(&k);
        }
    }

    /// Deletes every segment past its tenant's retention (all of an opted-out tenant's),
    /// and nothing else. Open segments of days before `today` are closed first.
    fn sweep(&mut self, today: &str) -> Result<usize, String> {
        let old: Vec<_> = self
            .open
            .keys()
            .filter(|(_, d)| d.as_str() < today)
            .cloned()
            .collect();
        for k in old {
            self.close(&k);
        }
        let mut deleted = 0;
        for (seg, days) in self.store.body_segments().map_err(|e| e.to_string())? {
            let gone = if days == 0 {
                true
            } else {
                expired(&seg.day, days, today)
            };
            if !gone {
                continue;
            }
            let key = (seg.tenant_id.clone(), seg.day.clone());
            if self
                .open
                .get(&key)
                .is_some_and(|o| o.row.segment_id == seg.segment_id)
            {
                self.open.remove(&key);
            }
            self.segments.delete(&seg).map_err(|e| e.to_string())?;
            self.store
                .body_segment_deleted(&seg)
                .map_err(|e| e.to_string())?;
            deleted += 1;
        }
        if deleted > 0 {
            tracing::info!(
                segments = deleted,
                "body log segments past their retention deleted"
            );
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests;
