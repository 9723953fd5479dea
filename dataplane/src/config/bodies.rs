//! Request and response bodies on their way to the control plane's body log.
//!
//! A worker hands a finished request's bodies over with [`BodyQueue::push`], which never
//! waits: the queue is bounded in bytes (what waits to be sent and what was sent and not yet
//! acknowledged, together), and a record that does not fit is dropped, counted
//! (`aigw_body_log_dropped_total`) and reported for the tenant's audit log. A tenant whose
//! setting is `refuse` has its requests refused before they are forwarded while the queue
//! is full instead ([`BodyQueue::full`]); a record that still does not fit when its request
//! ends is dropped and counted all the same (the response's size is not known before).
//!
//! The control thread sends each record once per link, numbered (boot epoch, sequence),
//! and forgets it when the control plane acknowledges it; after a reconnect, what was not
//! acknowledged is sent again (and the control plane writes it once). Bodies are held in
//! memory only, never written to the node's disk: a node that stops loses what the control
//! plane had not acknowledged within its final wait, and a crash loses what was queued.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aigw_wire::Message;

/// Default bound of the queue, in body bytes.
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;
/// Each body is kept up to this many bytes; the rest is cut and the record says so.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// A record sent and not acknowledged (the control plane's writer was behind) is sent again
/// after this long, on the same link.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// Body bytes sent and not yet acknowledged, at most: the link never holds more than this
/// of bodies, so what else it carries (spend cap leases, heartbeats, usage) is not held up
/// behind them when the control plane's writer is behind.
pub const IN_FLIGHT_BYTES: usize = 1 << 20;

/// What is logged of a tenant's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tenant opted out: nothing is captured.
    Off,
    /// Logged; dropped (counted, audited) while the queue is full.
    Drop,
    /// Logged; requests refused while the queue is full.
    Refuse,
}

/// One request's bodies.
#[derive(Debug, Clone)]
pub struct Record {
    pub tenant_id: String,
    pub request_id: String,
    /// JSON: status, model, endpoint, truncation…
    pub meta: String,
    pub request: Vec<u8>,
    pub response: Vec<u8>,
}

impl Record {
    fn weight(&self) -> usize {
        self.request.len() + self.response.len() + self.meta.len()
    }
}

#[derive(Debug)]
struct Held {
    seq: u64,
    record: Record,
    sent: Option<Instant>,
}

/// Records are held in the order they were queued; those sent on the current link (and not
/// yet acknowledged) are always a prefix, so sending never looks at the rest of the queue.
#[derive(Debug, Default)]
struct Inner {
    held: VecDeque<Held>,
    bytes: usize,
    next_seq: u64,
    /// How many records at the front were sent on this link.
    sent: usize,
    /// Their bytes.
    in_flight: usize,
    /// When the sent prefix is next looked through for records to send again.
    next_resend_check: Option<Instant>,
}

impl Held {
    /// Appends the record's frame to `out`: its fields are lent to the message for the
    /// encoding and taken back, so the bodies are copied once, into the frame.
    fn encode(&mut self, node_id: &str, boot_epoch: u64, out: &mut Vec<u8>) {
        let r = &mut self.record;
        let m = Message::BodyLog {
            node_id: node_id.to_string(),
            boot_epoch,
            seq: self.seq,
            tenant_id: std::mem::take(&mut r.tenant_id),
            request_id: std::mem::take(&mut r.request_id),
            meta: std::mem::take(&mut r.meta),
            request: std::mem::take(&mut r.request),
            response: std::mem::take(&mut r.response),
        };
        aigw_wire::encode_frame(&m, out);
        if let Message::BodyLog {
            tenant_id,
            request_id,
            meta,
            request,
            response,
            ..
        } = m
        {
            *r = Record {
                tenant_id,
                request_id,
                meta,
                request,
                response,
            };
        }
    }
}

#[derive(Debug, Default)]
struct Tenants {
    off: HashSet<String>,
    refuse: HashSet<String>,
}

#[derive(Debug)]
pub struct BodyQueue {
    inner: Mutex<Inner>,
    limit: AtomicUsize,
    /// Read without the lock, for [`Self::full`].
    bytes: AtomicUsize,
    dropped: AtomicU64,
    tenants: RwLock<Arc<Tenants>>,
    /// Per tenant: when its last drop was reported, and drops since not reported.
    drop_reports: Mutex<std::collections::HashMap<Arc<str>, (Instant, u64)>>,
}

/// A tenant's drops are reported for its audit log at most this often (each with how many
/// went unreported since the last); every drop is counted in the metrics.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Default for BodyQueue {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_seq: 1,
                ..Inner::default()
            }),
            limit: AtomicUsize::new(DEFAULT_QUEUE_BYTES),
            bytes: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            tenants: RwLock::new(Arc::default()),
            drop_reports: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl BodyQueue {
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// What is logged of `tenant`'s requests.
    pub fn mode(&self, tenant: &str) -> Mode {
        let t = Arc::clone(&self.tenants.read().unwrap_or_else(|p| p.into_inner()));
        if t.off.contains(tenant) {
            Mode::Off
        } else if t.refuse.contains(tenant) {
            Mode::Refuse
        } else {
            Mode::Drop
        }
    }

    /// The tenants' settings, as the control plane sent them.
    pub fn set_tenants(&self, off: Vec<String>, refuse: Vec<String>) {
        let t = Arc::new(Tenants {
            off: off.into_iter().collect(),
            refuse: refuse.into_iter().collect(),
        });
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// How many tenants opted out, as the control plane last said.
    pub fn opted_out(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .off
            .len()
    }

    /// How many tenants refuse requests while the queue is full.
    pub fn refusing(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .refuse
            .len()
    }

    /// Whether the queue holds its bound (a `refuse` tenant's request is refused).
    pub fn full(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed)
    }

    /// Queues a record; false (and counted) when it does not fit.
    pub fn push(&self, record: Record) -> bool {
        let w = record.weight();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.bytes + w > self.limit.load(Ordering::Relaxed) {
            drop(inner);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += w;
        self.bytes.store(inner.bytes, Ordering::Relaxed);
        inner.held.push_back(Held {
            seq,
            record,
            sent: None,
        });
        true
    }

    /// A drop of `tenant`'s record: `Some(n)` when it is to be reported now, `n` drops
    /// (this one included) since its last report; `None` within [`DROP_REPORT_EVERY`] of it.
    pub fn drop_report_due(&self, tenant: &Arc<str>) -> Option<u64> {
        let now = Instant::now();
        let mut reports = self.drop_reports.lock().unwrap_or_else(|p| p.into_inner());
        let entry = reports
            .entry(Arc::clone(tenant))
            .or_insert((now - DROP_REPORT_EVERY, 0));
        entry.1 += 1;
        if now.duration_since(entry.0) < DROP_REPORT_EVERY {
            return None;
        }
        let n = entry.1;
        *entry = (now, 0);
        Some(n)
    }

    /// Records dropped since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records held (queued or waiting for acknowledgement), and their bytes.
    pub fn held(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.held.len(), inner.bytes)
    }

    /// The records [`Self::encode_to_send`] sends now, decoded again from its frames.
    #[cfg(test)]
    pub fn to_send(&self, node_id: &str, boot_epoch: u64) -> Vec<Message> {
        let mut frames = Vec::new();
        let n = self.encode_to_send(node_id, boot_epoch, &mut frames);
        let mut out = Vec::new();
        let mut at = 0;
        while let Ok(Some((aigw_wire::Frame::Message(m), used))) =
            aigw_wire::decode_frame(&frames[at..], aigw_wire::DEFAULT_MAX_FRAME)
        {
            at += used;
            out.push(m);
        }
        assert_eq!((out.len(), at), (n, frames.len()), "every frame decodes");
        out
    }

    /// The records to send on this link now, as frames back to back appended to `out` (one
    /// write for them all; their bodies copied only into the frames); how many. They are
    /// those never sent on this link (while what is in flight allows), and those sent
    /// [`RESEND_AFTER`] ago and not acknowledged (looked for about once a second). Costs
    /// what it sends plus, once a second, what is in flight: the control thread calls it
    /// for every message it reads.
    pub fn encode_to_send(&self, node_id: &str, boot_epoch: u64, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        self.pick(|h| {
            h.encode(node_id, boot_epoch, out);
            n += 1;
        });
        n
    }

    /// Calls `each` on the records to send now (see [`Self::encode_to_send`]), marked sent.
    fn pick(&self, mut each: impl FnMut(&mut Held)) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        if inner.next_resend_check.is_none_or(|at| now >= at) {
            inner.next_resend_check = Some(now + Duration::from_secs(1));
            for h in inner.held.iter_mut().take(inner.sent) {
                if h.sent
                    .is_some_and(|at| now.duration_since(at) >= RESEND_AFTER)
                {
                    h.sent = Some(now);
                    each(h);
                }
            }
        }
        while let Some(h) = inner.held.get_mut(inner.sent) {
            // At least one record goes when none is in flight, however large.
            let w = h.record.weight();
            if inner.in_flight != 0 && inner.in_flight + w > IN_FLIGHT_BYTES {
                break;
            }
            h.sent = Some(now);
            inner.in_flight += w;
            inner.sent += 1;
            each(h);
        }
    }

    /// The control plane has record `seq`.
    pub fn acked(&self, seq: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Acknowledgements come in order: the record is at the front.
        if let Some(i) = inner.held.iter().position(|h| h.seq == seq) {
            if let Some(h) = inner.held.remove(i) {
                let w = h.record.weight();
                inner.bytes -= w;
                if i < inner.sent {
                    inner.sent -= 1;
                    inner.in_flight -= w;
                }
                self.bytes.store(inner.bytes, Ordering::Relaxed);
            }
        }
    }

    /// A new link: everything not acknowledged is sent again.
    pub fn link_down(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for h in &mut inner.held {
            h.sent = None;
        }
        inner.sent = 0;
        inner.in_flight = 0;
        inner.next_resend_check = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Record {
        Record {
            tenant_id: "t".into(),
            request_id: "r".into(),
            meta: String::new(),
            request: vec![b'a'; n],
            response: Vec::new(),
        }
    }

    #[test]
    fn bounded_in_bytes_until_acknowledged() {
        let q = BodyQueue::default();
        q.set_limit(100);
        assert!(q.push(record(60)));
        assert!(!q.full());
        assert!(!q.push(record(60)), "over the bound");
        assert_eq!(q.dropped(), 1);
        assert!(q.push(record(40)));
        assert!(q.full());
        let sent = q.to_send("n", 1);
        assert_eq!(sent.len(), 2);
        // Sent and not acknowledged: still held, not sent again at once.
        assert!(q.full());
        assert!(q.to_send("n", 1).is_empty());
        q.acked(1);
        assert!(!q.full());
        assert_eq!(q.held(), (1, 40));
        // A new link sends what was not acknowledged again.
        q.link_down();
        assert_eq!(q.to_send("n", 1).len(), 1);
    }

    #[test]
    fn a_record_sent_again_is_the_same_record() {
        let q = BodyQueue::default();
        let r = Record {
            tenant_id: "acme".into(),
            request_id: "req-1".into(),
            meta: r#"{"status":200}"#.into(),
            request: b"{\"model\":\"m\"}".to_vec(),
            response: b"{\"id\":\"x\"}".to_vec(),
        };
        let weight = r.weight();
        assert!(q.push(r.clone()));
        let first = q.to_send("n", 7);
        q.link_down();
        let again = q.to_send("n", 7);
        assert_eq!(
            first, again,
            "the encoding lent the record's fields and took them back"
        );
        assert_eq!(
            first,
            vec![Message::BodyLog {
                node_id: "n".into(),
                boot_epoch: 7,
                seq: 1,
                tenant_id: r.tenant_id,
                request_id: r.request_id,
                meta: r.meta,
                request: r.request,
                response: r.response,
            }]
        );
        assert_eq!(q.held(), (1, weight));
    }

    fn seqs(m: &[Message]) -> Vec<u64> {
        m.iter()
            .map(|m| match m {
                Message::BodyLog { seq, .. } => *seq,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn acknowledgements_in_any_order_keep_what_is_in_flight_right() {
        let q = BodyQueue::default();
        let each = IN_FLIGHT_BYTES / 4;
        for _ in 0..6 {
            assert!(q.push(record(each)));
        }
        assert_eq!(seqs(&q.to_send("n", 1)), vec![1, 2, 3, 4]);
        // Out of order: the third, then the first.
        q.acked(3);
        assert_eq!(seqs(&q.to_send("n", 1)), vec![5]);
        q.acked(1);
        assert_eq!(seqs(&q.to_send("n", 1)), vec![6]);
        assert!(q.to_send("n", 1).is_empty());
        // An acknowledgement of a record not held changes nothing.
        q.acked(3);
        assert!(q.to_send("n", 1).is_empty());
        assert_eq!(q.held(), (4, 4 * each));
        // A new link sends what is held again, oldest first, within the window.
        q.link_down();
        assert_eq!(seqs(&q.to_send("n", 2)), vec![2, 4, 5, 6]);
        for seq in [2, 4, 5, 6] {
            q.acked(seq);
        }
        assert_eq!(q.held(), (0, 0));
        assert!(q.push(record(1)));
        assert_eq!(seqs(&q.to_send("n", 2)), vec![7]);
    }

    #[test]
    fn what_is_in_flight_is_bounded() {
        let q = BodyQueue::default();
        let each = IN_FLIGHT_BYTES / 4;
        for _ in 0..10 {
            assert!(q.push(record(each)));
        }
        assert_eq!(q.to_send("n", 1).len(), 4);
        assert!(q.to_send("n", 1).is_empty(), "the window is full");
        q.acked(2);
        assert_eq!(q.to_send("n", 1).len(), 1);
        // A record larger than the window goes alone.
        let big = BodyQueue::default();
        assert!(big.push(record(2 * IN_FLIGHT_BYTES)));
        assert!(big.push(record(1)));
        assert_eq!(big.to_send("n", 1).len(), 1);
    }

    #[test]
    fn drops_are_reported_at_most_once_a_second_per_tenant_with_a_count() {
        let q = BodyQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(q.drop_report_due(&a), Some(1));
        assert_eq!(q.drop_report_due(&a), None);
        assert_eq!(q.drop_report_due(&a), None);
        assert_eq!(
            q.drop_report_due(&b),
            Some(1),
            "another tenant reports its own"
        );
        if let Some(e) = q.drop_reports.lock().unwrap().get_mut(&a) {
            e.0 -= DROP_REPORT_EVERY;
        }
        assert_eq!(q.drop_report_due(&a), Some(3));
    }

    #[test]
    fn tenant_modes() {
        let q = BodyQueue::default();
        assert_eq!(q.mode("a"), Mode::Drop);
        q.set_tenants(vec!["a".into()], vec!["b".into()]);
        assert_eq!(q.mode("a"), Mode::Off);
        assert_eq!(q.mode("b"), Mode::Refuse);
        assert_eq!(q.mode("c"), Mode::Drop);
    }
}
