use super::*;
use crate::store::tests::{actor, kek, temp};
use crate::store::{BodyLogSpec, WhenBehind};

fn seg(tenant: &str, day: &str, id: &str) -> SegmentRow {
    SegmentRow {
        tenant_id: tenant.into(),
        day: day.into(),
        segment_id: id.into(),
        state: "open".into(),
        records: 0,
    }
}

fn record(i: usize) -> BodyRecord {
    BodyRecord {
        meta: format!(r#"{{"request_id":"r{i}"}}"#),
        request: format!("request {i}").into_bytes(),
        response: format!("response {i}").into_bytes(),
    }
}

/// A segment of `n` records, closed or not, and the byte offsets where each chunk starts
/// (the head's end first).
fn segment(row: &SegmentRow, n: usize, close: bool) -> (Vec<u8>, Vec<usize>) {
    let (mut s, mut out) = Sealer::new(&kek(), &purpose(row)).expect("sealer");
    let mut starts = Vec::new();
    for i in 0..n {
        starts.push(out.len());
        out.extend_from_slice(&s.chunk(&record(i).encode(), false).expect("chunk"));
    }
    if close {
        starts.push(out.len());
        out.extend_from_slice(&s.chunk(&[], true).expect("final"));
    }
    (out, starts)
}

#[test]
fn a_closed_segment_reads_back_every_record_in_order() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, _) = segment(&row, 3, true);
    let read = read_segment(&kek(), &row, &bytes, true).expect("reads");
    assert!(read.terminated);
    assert_eq!(read.records, vec![record(0), record(1), record(2)]);
}

#[test]
fn a_tampered_byte_is_refused() {
    let row = seg("t", "2026-01-02", "s1");
    let (mut bytes, starts) = segment(&row, 3, true);
    // A byte of the second record's ciphertext.
    bytes[starts[1] + 40] ^= 1;
    let err = read_segment(&kek(), &row, &bytes, true).expect_err("tampered");
    assert!(matches!(err, ReadError::Seal(SealError::Auth)), "{err}");
}

#[test]
fn a_truncated_closed_segment_is_refused() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, starts) = segment(&row, 3, true);
    // Cut at a record boundary: the final record is gone.
    let cut = &bytes[..starts[3]];
    let err = read_segment(&kek(), &row, cut, true).expect_err("truncated");
    assert!(matches!(err, ReadError::Unterminated), "{err}");
    // Cut within a record.
    let cut = &bytes[..starts[2] + 10];
    let err = read_segment(&kek(), &row, cut, true).expect_err("truncated");
    assert!(matches!(err, ReadError::Unterminated), "{err}");
}

#[test]
fn reordered_records_are_refused() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, starts) = segment(&row, 3, true);
    let mut swapped = bytes[..starts[0]].to_vec();
    swapped.extend_from_slice(&bytes[starts[1]..starts[2]]);
    swapped.extend_from_slice(&bytes[starts[0]..starts[1]]);
    swapped.extend_from_slice(&bytes[starts[2]..]);
    assert_eq!(swapped.len(), bytes.len());
    let err = read_segment(&kek(), &row, &swapped, true).expect_err("reordered");
    assert!(matches!(err, ReadError::Seal(SealError::Auth)), "{err}");
}

#[test]
fn a_dropped_record_is_refused() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, starts) = segment(&row, 3, true);
    for dropped in 0..3 {
        let mut out = bytes[..starts[dropped]].to_vec();
        out.extend_from_slice(&bytes[starts[dropped + 1]..]);
        let err = read_segment(&kek(), &row, &out, true).expect_err("dropped");
        assert!(
            matches!(err, ReadError::Seal(SealError::Auth)),
            "{dropped}: {err}"
        );
    }
}

#[test]
fn a_segment_passed_off_as_another_is_refused() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, _) = segment(&row, 2, true);
    for other in [
        seg("u", "2026-01-02", "s1"),
        seg("t", "2026-01-03", "s1"),
        seg("t", "2026-01-02", "s2"),
    ] {
        let err = read_segment(&kek(), &other, &bytes, true).expect_err("another segment");
        assert!(
            matches!(err, ReadError::Seal(SealError::Purpose(_))),
            "{err}"
        );
    }
    // A record moved in from another segment of the same tenant and day.
    let other = seg("t", "2026-01-02", "s2");
    let (theirs, their_starts) = segment(&other, 2, true);
    let (ours, our_starts) = segment(&row, 2, true);
    let mut mixed = ours[..our_starts[1]].to_vec();
    mixed.extend_from_slice(&theirs[their_starts[1]..their_starts[2]]);
    mixed.extend_from_slice(&ours[our_starts[2]..]);
    let err = read_segment(&kek(), &row, &mixed, true).expect_err("moved record");
    assert!(matches!(err, ReadError::Seal(SealError::Auth)), "{err}");
}

#[test]
fn an_unterminated_segment_reads_up_to_its_last_whole_record() {
    let row = seg("t", "2026-01-02", "s1");
    let (bytes, starts) = segment(&row, 3, false);
    let read = read_segment(&kek(), &row, &bytes, false).expect("reads");
    assert!(!read.terminated);
    assert_eq!(read.records.len(), 3);
    // A crash mid-write: the partial record is not returned.
    let read = read_segment(&kek(), &row, &bytes[..starts[2] + 20], false).expect("reads");
    assert_eq!(read.records, vec![record(0), record(1)]);
    // But tampering is refused all the same.
    let mut bad = bytes.clone();
    bad[starts[0] + 40] ^= 1;
    assert!(read_segment(&kek(), &row, &bad, false).is_err());
}

#[test]
fn expiry_counts_whole_days_after_the_segment_day() {
    assert!(!expired("2026-01-01", 7, "2026-01-08"));
    assert!(expired("2026-01-01", 7, "2026-01-09"));
    assert!(!expired("2026-01-01", 30, "2026-01-09"));
    assert!(!expired("not-a-day", 1, "2026-01-09"));
    assert_eq!(day_of(0), "1970-01-01");
    assert_eq!(day_of(1_767_225_600), "2026-01-01");
}

fn append(log: &BodyLog, tenant: &str, day: &str, seq: u64) -> Result<(), String> {
    submit(log, tenant, day, seq)
        .blocking_recv()
        .expect("writer answers")
}

/// Submits an append without waiting for its answer.
fn submit(
    log: &BodyLog,
    tenant: &str,
    day: &str,
    seq: u64,
) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    assert!(log.submit(Job::Append {
        node_id: "n1".into(),
        boot_epoch: 1,
        seq,
        tenant_id: tenant.into(),
        request_id: format!("{tenant}-{seq}"),
        day: day.into(),
        record: BodyRecord {
            meta: format!(r#"{{"request_id":"{tenant}-{seq}"}}"#),
            request: b"MARKER-request".to_vec(),
            response: b"MARKER-response".to_vec(),
        },
        done: tx,
    }));
    rx
}

#[test]
fn records_queued_together_are_checked_together_and_each_answered() {
    let dir = temp();
    let store = Arc::new(Store::open(&dir, kek()).expect("store"));
    for t in ["on", "off"] {
        store.create_tenant(&actor(), t, t, "pro").expect("tenant");
    }
    store
        .set_body_log_settings(
            &actor(),
            "off",
            &BodyLogSpec {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .expect("opts out");
    let segments: Arc<dyn SegmentStore> = Arc::new(DirStore::new(dir.join("bodies")));
    let (log, thread) = BodyLog::start(kek(), Arc::clone(&store), segments).expect("starts");
    const D: &str = "2026-01-01";
    // Queued at once (the writer takes what is queued as one batch): a record, its resend,
    // an opted-out tenant's, an unknown tenant's, another record.
    let answers = vec![
        submit(&log, "on", D, 1),
        submit(&log, "on", D, 1),
        submit(&log, "off", D, 2),
        submit(&log, "ghost", D, 3),
        submit(&log, "on", D, 4),
    ];
    for a in answers {
        assert_eq!(a.blocking_recv().expect("answered"), Ok(()));
    }
    // A resend in a later batch.
    assert_eq!(
        submit(&log, "on", D, 4).blocking_recv().expect("answered"),
        Ok(())
    );
    assert!(log.get("on", "on-1").expect("reads").is_some());
    assert!(log.get("on", "on-4").expect("reads").is_some());
    assert!(log.get("off", "off-2").expect("reads").is_none());
    let segs = store.body_segments().expect("segments");
    assert_eq!(segs.len(), 1, "only the logging tenant has a segment");
    assert_eq!(segs[0].0.records, 2, "each record written once");
    drop(log);
    thread.join().expect("writer stops");
}

fn sweep(log: &BodyLog, today: &str) -> usize {
    let (tx, rx) = tokio::sync::oneshot::channel();
    assert!(log.submit(Job::Sweep {
        today: today.into(),
        done: Some(tx),
    }));
    rx.blocking_recv().expect("writer answers").expect("sweeps")
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_writer_indexes_dedups_rotates_by_day_and_the_sweep_removes_only_expired() {
    let dir = temp();
    let store = Arc::new(Store::open(&dir, kek()).expect("store"));
    for (t, tier) in [("free_t", "free"), ("pro_t", "pro")] {
        store.create_tenant(&actor(), t, t, tier).expect("tenant");
    }
    let segments: Arc<dyn SegmentStore> = Arc::new(DirStore::new(dir.join("bodies")));
    let (log, thread) = BodyLog::start(kek(), Arc::clone(&store), segments).expect("starts");
    append(&log, "free_t", "2026-01-01", 1).expect("appends");
    append(&log, "free_t", "2026-01-01", 2).expect("appends");
    // A resend of the same (node, boot epoch, seq) is not written twice.
    append(&log, "free_t", "2026-01-01", 2).expect("appends");
    append(&log, "free_t", "2026-01-09", 3).expect("appends");
    append(&log, "pro_t", "2026-01-01", 4).expect("appends");
    let got = log
        .get("free_t", "free_t-2")
        .expect("reads")
        .expect("logged");
    assert_eq!(got.request, b"MARKER-request");
    assert!(log.get("pro_t", "free_t-2").expect("reads").is_none());
    let segs = store.body_segments().expect("segments");
    // free_t's day-1 segment was closed when day 9 began.
    let day1 = segs
        .iter()
        .find(|(s, _)| s.tenant_id == "free_t" && s.day == "2026-01-01")
        .expect("day 1");
    assert_eq!((day1.0.state.as_str(), day1.0.records), ("closed", 2));
    // No body is in plaintext on disk.
    for f in files_under(&dir) {
        let bytes = std::fs::read(&f).expect("reads");
        assert!(
            !bytes.windows(6).any(|w| w == b"MARKER"),
            "{} holds a body in plaintext",
            f.display()
        );
    }
    // 2026-01-09: free (7 days) loses day 1; pro (30 days) keeps it; day 9 stays.
    assert_eq!(sweep(&log, "2026-01-09"), 1);
    assert!(log.get("free_t", "free_t-1").expect("reads").is_none());
    assert!(log.get("free_t", "free_t-3").expect("reads").is_some());
    assert!(log.get("pro_t", "pro_t-4").expect("reads").is_some());
    assert_eq!(sweep(&log, "2026-01-09"), 0);
    // Opting out deletes what the tenant had at the next sweep.
    store
        .set_body_log_settings(
            &actor(),
            "pro_t",
            &BodyLogSpec {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .expect("opts out");
    assert_eq!(sweep(&log, "2026-01-09"), 1);
    assert!(log.get("pro_t", "pro_t-4").expect("reads").is_none());
    assert_eq!(store.body_segments().expect("segments").len(), 1);
    drop(log);
    thread.join().expect("writer stops");
    // At stop the open segment was closed: it reads as closed, with its final record.
    let (seg, _) = store.body_segments().expect("segments").remove(0);
    assert_eq!(seg.state, "closed");
    let bytes = DirStore::new(dir.join("bodies")).read(&seg).expect("file");
    assert!(
        read_segment(&kek(), &seg, &bytes, true)
            .expect("reads")
            .terminated
    );
}

#[test]
fn tier_bounds_retention_and_names_the_field() {
    let dir = temp();
    let store = Store::open(&dir, kek()).expect("store");
    store
        .create_tenant(&actor(), "f", "F", "free")
        .expect("tenant");
    store
        .create_tenant(&actor(), "e", "E", "enterprise")
        .expect("tenant");
    assert_eq!(
        store
            .body_log_settings("f")
            .expect("defaults")
            .retention_days,
        7
    );
    let err = store
        .set_body_log_settings(
            &actor(),
            "f",
            &BodyLogSpec {
                retention_days: Some(8),
                ..Default::default()
            },
        )
        .expect_err("over the tier");
    assert!(err.to_string().contains("retention_days"), "{err}");
    let e = store
        .set_body_log_settings(
            &actor(),
            "e",
            &BodyLogSpec {
                retention_days: Some(365),
                when_behind: Some(WhenBehind::Refuse),
                ..Default::default()
            },
        )
        .expect("enterprise sets its own");
    assert_eq!(e.retention_days, 365);
    assert_eq!(
        store.body_log_exceptions().expect("exceptions"),
        (vec![], vec!["e".to_string()])
    );
}
