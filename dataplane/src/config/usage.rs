//! Usage on its way to the control plane. Workers add what they measured about once a
//! second ([`Outbox::add`]); the control thread cuts it into reports, each numbered (boot
//! epoch, sequence) once and for all, sends them, and forgets a report only when the control
//! plane has acknowledged it — so a report resent after a reconnect is counted once (the
//! control plane records every (node, boot epoch, sequence) it applied).
//!
//! While the control plane is unreachable, measured usage merges by (key, model, day) in
//! memory; with a sealed snapshot configured, it is also cut into reports and written to a
//! sealed spill file every [`SPILL_EVERY`], read back at the next start. Bounds:
//! - at most [`MAX_UNACKED_ENTRIES`] entries wait in reports; beyond, the oldest reports
//!   never sent are dropped, counted and logged;
//! - a crash loses what the workers had not yet handed over (about a second), and what was
//!   measured since the last spill ([`SPILL_EVERY`]) — or, without a sealed snapshot
//!   configured, everything not yet acknowledged.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aigw_wire::{Message, UsageEntry};

/// Entries held in reports not yet acknowledged, at most.
pub const MAX_UNACKED_ENTRIES: usize = 200_000;
/// Entries per report, at most (a report is one frame).
pub const MAX_REPORT_ENTRIES: usize = 5_000;
/// How often usage is written to the spill file while the control plane cannot take it.
pub const SPILL_EVERY: Duration = Duration::from_secs(10);
/// A report sent and not acknowledged (the control plane could not store it) is sent again
/// after this long, on the same link.
pub const RESEND_AFTER: Duration = Duration::from_secs(30);

type Key = (String, String, u64);

/// Events (a guardrail block…) waiting to be cut into reports, at most; beyond, the
/// oldest are dropped, counted and logged.
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// Usage measured by the workers, merged, and events they raised, not yet cut into
/// reports.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<HashMap<Key, UsageEntry>>,
    events: Mutex<VecDeque<(String, String)>>,
}

impl Outbox {
    /// Adds a worker's figures; entries of the same key, model and day merge.
    pub fn add(&self, entries: impl IntoIterator<Item = UsageEntry>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            match pending.entry((e.key_id.clone(), e.model.clone(), e.day)) {
                std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().merge(&e),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(e);
                }
            }
        }
    }

    fn take(&self) -> Vec<UsageEntry> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.drain().map(|(_, e)| e).collect()
    }

    /// An event for the control plane's audit log (`detail` is JSON).
    pub fn event(&self, kind: &str, detail: String) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() >= MAX_PENDING_EVENTS {
            events.pop_front();
            tracing::error!(
                kind,
                "too many events waiting for the control plane: the oldest is dropped"
            );
        }
        events.push_back((kind.to_string(), detail));
    }

    fn take_events(&self) -> Vec<(String, String)> {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.drain(..).collect()
    }
}

/// One report: its number, what it carries, and whether it has been sent on the current
/// link.
#[derive(Debug, Clone)]
struct Report {
    boot_epoch: u64,
    seq: u64,
    body: Body,
    /// When it was last sent on the current link.
    sent: Option<std::time::Instant>,
}

/// What a report carries: usage entries, or one event.
#[derive(Debug, Clone)]
enum Body {
    Usage(Vec<UsageEntry>),
    Event { kind: String, detail: String },
}

impl Body {
    /// Its weight against [`MAX_UNACKED_ENTRIES`].
    fn entries(&self) -> usize {
        match self {
            Body::Usage(e) => e.len(),
            Body::Event { .. } => 1,
        }
    }

    fn message(&self, node_id: &str, boot_epoch: u64, seq: u64) -> Message {
        match self {
            Body::Usage(entries) => Message::UsageReport {
                node_id: node_id.to_string(),
                boot_epoch,
                seq,
                entries: entries.clone(),
            },
            Body::Event { kind, detail } => Message::Event {
                node_id: node_id.to_string(),
                boot_epoch,
                seq,
                kind: kind.clone(),
                detail: detail.clone(),
            },
        }
    }
}

/// The control thread's side: reports not yet acknowledged, and the spill file.
#[derive(Debug)]
pub struct Reports {
    boot_epoch: u64,
    next_seq: u64,
    unacked: VecDeque<Report>,
    entries: usize,
    spill: Option<Spill>,
    spilled_changed: bool,
    /// Entries dropped since start for want of room, reported in the log and on /workers.
    pub dropped_entries: u64,
}

/// Where reports are kept across a restart, sealed with the snapshot's key.
#[derive(Debug)]
pub struct Spill {
    pub path: PathBuf,
    pub kek: crate::seal::Kek,
}

const SPILL_PURPOSE: &str = "usage-spill";

impl Reports {
    /// Reports of this boot are numbered from 1; those of earlier boots, read back from the
    /// spill file, keep their numbers.
    pub fn new(boot_epoch: u64, spill: Option<Spill>) -> Self {
        let mut r = Self {
            boot_epoch,
            next_seq: 1,
            unacked: VecDeque::new(),
            entries: 0,
            spill,
            spilled_changed: false,
            dropped_entries: 0,
        };
        r.read_spill();
        r
    }

    fn read_spill(&mut self) {
        let Some(spill) = &self.spill else { return };
        if !spill.path.exists() {
            return;
        }
        match read_spill_file(&spill.path, &spill.kek) {
            Ok(reports) => {
                let n: usize = reports.iter().map(|r| r.body.entries()).sum();
                tracing::info!(reports = reports.len(), entries = n, path = %spill.path.display(), "usage reports from before the restart, to be sent");
                for r in reports {
                    self.entries += r.body.entries();
                    self.unacked.push_back(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, path = %spill.path.display(), "the usage spill file cannot be read; its usage is lost");
            }
        }
    }

    fn push(&mut self, body: Body) {
        self.entries += body.entries();
        self.unacked.push_back(Report {
            boot_epoch: self.boot_epoch,
            seq: self.next_seq,
            body,
            sent: None,
        });
        self.next_seq += 1;
        self.spilled_changed = true;
    }

    /// Cuts what the workers handed over into reports.
    pub fn cut(&mut self, outbox: &Outbox) {
        for (kind, detail) in outbox.take_events() {
            self.push(Body::Event { kind, detail });
        }
        let mut entries = outbox.take();
        while !entries.is_empty() {
            let rest = entries.split_off(entries.len().min(MAX_REPORT_ENTRIES));
            let chunk = std::mem::replace(&mut entries, rest);
            self.push(Body::Usage(chunk));
        }
        // Over the bound: the oldest reports never sent go (sent ones may have counted).
        while self.entries > MAX_UNACKED_ENTRIES {
            let Some(i) = self.unacked.iter().position(|r| r.sent.is_none()) else {
                break;
            };
            if let Some(r) = self.unacked.remove(i) {
                self.entries -= r.body.entries();
                self.dropped_entries += r.body.entries() as u64;
                tracing::error!(
                    entries = r.body.entries(),
                    dropped_total = self.dropped_entries,
                    "usage buffer full while the control plane cannot take it: the oldest usage is dropped"
                );
            }
        }
    }

    /// The reports not yet sent on this link (or sent [`RESEND_AFTER`] ago and still not
    /// acknowledged), marked sent.
    pub fn to_send(&mut self, node_id: &str) -> Vec<Message> {
        let now = std::time::Instant::now();
        self.unacked
            .iter_mut()
            .filter(|r| {
                r.sent
                    .is_none_or(|at| now.duration_since(at) >= RESEND_AFTER)
            })
            .map(|r| {
                r.sent = Some(now);
                r.body.message(node_id, r.boot_epoch, r.seq)
            })
            .collect()
    }

    /// A new link: everything not acknowledged is sent again.
    pub fn link_down(&mut self) {
        for r in &mut self.unacked {
            r.sent = None;
        }
    }

    /// The control plane applied report (`boot_epoch`, `seq`).
    pub fn acked(&mut self, boot_epoch: u64, seq: u64) {
        if let Some(i) = self
            .unacked
            .iter()
            .position(|r| r.boot_epoch == boot_epoch && r.seq == seq)
        {
            if let Some(r) = self.unacked.remove(i) {
                self.entries -= r.body.entries();
                self.spilled_changed = true;
            }
        }
    }

    pub fn unacked_entries(&self) -> usize {
        self.entries
    }

    /// Brings the spill file up to date with the reports not acknowledged (removed when
    /// there are none).
    pub fn spill(&mut self) {
        if !self.spilled_changed {
            return;
        }
        let Some(spill) = &self.spill else { return };
        let result = if self.unacked.is_empty() {
            match std::fs::remove_file(&spill.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            }
        } else {
            write_spill_file(&spill.path, &spill.kek, self.unacked.iter())
        };
        match result {
            Ok(()) => self.spilled_changed = false,
            Err(e) => {
                tracing::error!(error = %e, path = %spill.path.display(), "cannot write the usage spill file")
            }
        }
    }
}

/// The spill file: the reports, each a framed UsageReport, sealed, written atomically
/// (mode 0600).
fn write_spill_file<'a>(
    path: &Path,
    kek: &crate::seal::Kek,
    reports: impl Iterator<Item = &'a Report>,
) -> Result<(), String> {
    let mut frames = Vec::new();
    for r in reports {
        aigw_wire::encode_frame(&r.body.message("", r.boot_epoch, r.seq), &mut frames);
    }
    let sealed = crate::seal::seal(kek, SPILL_PURPOSE, &frames).map_err(|e| e.to_string())?;
    crate::seal::files::write_private(path, &sealed).map_err(|e| e.to_string())
}

fn read_spill_file(path: &Path, kek: &crate::seal::Kek) -> Result<Vec<Report>, String> {
    let sealed = std::fs::read(path).map_err(|e| e.to_string())?;
    let bytes = crate::seal::open(kek, SPILL_PURPOSE, &sealed).map_err(|e| e.to_string())?;
    let mut reports = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        match aigw_wire::decode_frame(rest, aigw_wire::DEFAULT_MAX_FRAME) {
            Ok(Some((aigw_wire::Frame::Message(m), used))) => {
                let (boot_epoch, seq, body) = match m {
                    Message::UsageReport {
                        boot_epoch,
                        seq,
                        entries,
                        ..
                    } => (boot_epoch, seq, Body::Usage(entries)),
                    Message::Event {
                        boot_epoch,
                        seq,
                        kind,
                        detail,
                        ..
                    } => (boot_epoch, seq, Body::Event { kind, detail }),
                    _ => return Err("the spill file holds something other than reports".into()),
                };
                reports.push(Report {
                    boot_epoch,
                    seq,
                    body,
                    sent: None,
                });
                rest = &rest[used..];
            }
            _ => return Err("the spill file holds something other than reports".into()),
        }
    }
    Ok(reports)
}

/// Days since 1970-01-01, UTC, now (on the coarse clock, see
/// [`crate::runtime::unix_seconds`]).
pub fn utc_day() -> u64 {
    crate::runtime::unix_seconds() / 86_400
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, requests: u64) -> UsageEntry {
        UsageEntry {
            key_id: key.into(),
            model: "m".into(),
            requests,
            input_tokens: requests * 10,
            day: 20_000,
            ..UsageEntry::default()
        }
    }

    #[test]
    fn reports_are_numbered_once_resent_until_acked_and_spilled_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("aigw-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let spill = || Spill {
            path: dir.join("usage.sealed"),
            kek: crate::seal::Kek::from_hex(&"11".repeat(32)).expect("kek"),
        };
        let outbox = Outbox::default();
        outbox.add([entry("a", 1), entry("a", 2), entry("b", 5)]);
        let mut reports = Reports::new(7, Some(spill()));
        reports.cut(&outbox);
        let sent = reports.to_send("n");
        assert_eq!(sent.len(), 1);
        let Message::UsageReport { seq, entries, .. } = &sent[0] else {
            panic!()
        };
        assert_eq!(*seq, 1);
        let a = entries.iter().find(|e| e.key_id == "a").expect("a");
        assert_eq!((a.requests, a.input_tokens), (3, 30), "merged");
        // Nothing new to send until the link drops; then the same report, same number.
        assert!(reports.to_send("n").is_empty());
        reports.link_down();
        let again = reports.to_send("n");
        assert!(matches!(
            &again[0],
            Message::UsageReport {
                seq: 1,
                boot_epoch: 7,
                ..
            }
        ));
        // Spilled, then read back by the next boot with its original number.
        reports.spill();
        assert!(dir.join("usage.sealed").exists());
        let mut next = Reports::new(8, Some(spill()));
        let resent = next.to_send("n");
        assert!(matches!(
            &resent[0],
            Message::UsageReport {
                seq: 1,
                boot_epoch: 7,
                ..
            }
        ));
        // Acknowledged: gone, and so is the spill file.
        next.acked(7, 1);
        next.spill();
        assert_eq!(next.unacked_entries(), 0);
        assert!(!dir.join("usage.sealed").exists());

        let _ = std::fs::remove_dir_all(&dir);
    }
}
