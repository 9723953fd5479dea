//! The node's last applied key table and routing (provider credentials included), sealed on disk (AES-256-GCM, envelope-encrypted) so
//! the node can restart and serve while the control plane is unreachable.
//!
//! Written by the control thread (never a worker) at most once a second while changes keep
//! coming, to a temporary file (created exclusively, mode 0600) that is synced and renamed
//! over the old one, so a crash leaves either the previous or the new snapshot, never a torn
//! one. Its directory is created with mode 0700. Bound: a node restarted
//! within about a second of a change may boot one revision behind; it then catches up from
//! the control plane, which it tells which revision it holds.

use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use aigw_wire::{decode_frame, encode_frame, Frame, Message, Record, DEFAULT_MAX_FRAME};

use crate::config::pushed::{NodeConfig, NodeConfigBuilder};
use crate::seal::{Kek, Opener, Sealer};

pub const PURPOSE: &str = "key-snapshot";

/// Beside the snapshot: the revision the node last applied (`<snapshot>.applied`), written
/// whenever it applies one, so that a snapshot older than what the node served before it
/// stopped is refused at boot (a revocation is never rolled back by a restart).
pub fn mark_path(snapshot: &Path) -> std::path::PathBuf {
    let mut name = snapshot.as_os_str().to_os_string();
    name.push(".applied");
    std::path::PathBuf::from(name)
}

/// Records that the node applied `revision` (with its id). Written atomically but not
/// synced: it survives the process dying, which is what it guards against.
pub fn write_mark(snapshot: &Path, revision: u64, revision_id: u64) -> std::io::Result<()> {
    let mut f = crate::seal::files::AtomicFile::create(&mark_path(snapshot))?;
    f.file()
        .write_all(format!("{revision} {revision_id}\n").as_bytes())?;
    f.commit_unsynced()
}

/// The revision (and its id) the node last applied, if it recorded one.
pub fn read_mark(snapshot: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(mark_path(snapshot)).ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}
/// Records per sealed chunk: bounded memory whatever the table's size.
const PART: usize = 20_000;

pub fn save(path: &Path, kek: &Kek, table: &NodeConfig) -> anyhow::Result<()> {
    // Created exclusively, mode 0600, beside the snapshot; renamed over it once synced.
    let mut out = crate::seal::files::AtomicFile::create(path)?;
    {
        let mut w = BufWriter::new(out.file());
        let (mut sealer, head) = Sealer::new(kek, PURPOSE)?;
        w.write_all(&head)?;
        let total = table.len() + table.routing.records().count();
        let parts = total.div_ceil(PART).max(1);
        let mut part = 0usize;
        let mut batch: Vec<Record> = Vec::with_capacity(PART.min(total));
        let mut flush = |batch: &mut Vec<Record>,
                         part: usize,
                         w: &mut BufWriter<&mut std::fs::File>|
         -> anyhow::Result<()> {
            let mut frame = Vec::new();
            let records = std::mem::take(batch);
            encode_frame(
                &Message::Snapshot {
                    revision: table.revision,
                    part: part as u64,
                    parts: parts as u64,
                    records,
                    revision_id: table.revision_id,
                },
                &mut frame,
            );
            w.write_all(&sealer.chunk(&frame, part + 1 == parts)?)?;
            Ok(())
        };
        let mut err = None;
        // Keys, then the routing, in parts of at most PART records.
        let mut add = |r: Record| {
            if err.is_some() {
                return;
            }
            batch.push(r);
            if batch.len() == PART && part + 1 < parts {
                if let Err(e) = flush(&mut batch, part, &mut w) {
                    err = Some(e);
                }
                part += 1;
            }
        };
        table.for_each_record(|k| add(Record::Key(k)));
        table.routing.records().for_each(&mut add);
        if let Some(e) = err {
            return Err(e);
        }
        flush(&mut batch, part, &mut w)?;
        w.flush()?;
    }
    out.commit()?;
    Ok(())
}

pub fn load(path: &Path, kek: &Kek) -> anyhow::Result<NodeConfig> {
    let file = std::fs::File::open(path)?;
    let mut opener = Opener::new(kek, PURPOSE, BufReader::new(file))?;
    let mut builder: Option<NodeConfigBuilder> = None;
    while let Some(chunk) = opener.next_chunk()? {
        let Some((
            Frame::Message(Message::Snapshot {
                revision,
                records,
                revision_id,
                ..
            }),
            used,
        )) = decode_frame(&chunk, DEFAULT_MAX_FRAME)?
        else {
            anyhow::bail!("sealed snapshot holds something other than a snapshot part");
        };
        if used != chunk.len() {
            anyhow::bail!("sealed snapshot chunk holds bytes after its part");
        }
        builder
            .get_or_insert_with(|| NodeConfigBuilder::with_id(revision, revision_id))
            .add_records(records);
    }
    match builder {
        Some(b) => Ok(b.finish()),
        None => Ok(NodeConfig::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_wire::{KeyRecord, KeyStatus};

    #[test]
    fn a_saved_table_loads_back_identically() {
        let records: Vec<KeyRecord> = (0..45_000)
            .map(|i| KeyRecord {
                sub_account_parents: Vec::new(),
                key_id: format!("{i:012}"),
                tenant_id: format!("t{}", i % 7),
                environment: ["production", "staging", "development"][i % 3].into(),
                sub_account_id: (i % 5 == 0).then(|| format!("sa{i}")),
                hash_version: 1,
                hash: [(i % 251) as u8; 32],
                status: if i % 11 == 0 {
                    KeyStatus::Revoked
                } else {
                    KeyStatus::Active
                },
                expires_at: i as u64,
                grace_ends_at: 0,
                allowed_models: if i % 13 == 0 {
                    vec!["m".into()]
                } else {
                    vec![]
                },
                rate_limits: Default::default(),
            })
            .collect();
        let table = NodeConfig::from_records(42, &records);
        let dir = std::env::temp_dir().join(format!("aigw-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.sealed");
        let kek = Kek::from_hex(&"11".repeat(32)).expect("kek");
        save(&path, &kek, &table).expect("saves");
        let raw = std::fs::read(&path).expect("read");
        assert!(
            !raw.windows(12).any(|w| w == b"000000000777"),
            "key ids are not on disk in the clear"
        );
        let back = load(&path, &kek).expect("loads");
        assert_eq!(back.revision, 42);
        assert_eq!(back.len(), table.len());
        for r in records.iter().step_by(997) {
            assert_eq!(back.get(&r.key_id), table.get(&r.key_id));
        }
        let wrong = Kek::from_hex(&"22".repeat(32)).expect("kek");
        assert!(load(&path, &wrong).is_err(), "the wrong key opens nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn routing_and_credentials_are_sealed_with_the_keys() {
        use aigw_wire::{NonRetention, RouteRecord, RouteTargetRecord, UpstreamRecord};
        let up = UpstreamRecord {
            id: "t/production/oa".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            name: "oa".into(),
            provider: "openai".into(),
            base_url: "http://127.0.0.1:9".into(),
            credential: Some("sk-live-credential-0123456789".into()),
            non_retention: NonRetention::AccountAgreement {},
            stream_options: true,
            region: "eu".into(),
            baa: false,
            pass_organization_headers: false,
            max_connections: 4,
            connect_timeout_ms: 0,
            first_byte_timeout_ms: 0,
            read_idle_timeout_ms: 0,
        };
        let route = RouteRecord {
            id: "t/production/all".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            model: None,
            prefix: Some(String::new()),
            targets: vec![RouteTargetRecord {
                upstream: "oa".into(),
                model: None,
            }],
        };
        let mut b = NodeConfigBuilder::new(7);
        b.add_records(vec![Record::Upstream(up), Record::Route(route)]);
        let table = b.finish();
        let dir = std::env::temp_dir().join(format!("aigw-snap-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.sealed");
        let kek = Kek::from_hex(&"33".repeat(32)).expect("kek");
        save(&path, &kek, &table).expect("saves");
        let raw = std::fs::read(&path).expect("read");
        assert!(
            !raw.windows(14).any(|w| w == b"sk-live-creden"),
            "the provider credential is not on disk in the clear"
        );
        let back = load(&path, &kek).expect("loads");
        assert_eq!(back.revision, 7);
        let env = back
            .routing
            .env("t", aigw_wire::keys::Environment::Production)
            .expect("routing came back");
        let targets = env
            .lookup("gpt-4o", crate::config::ProviderKind::Openai)
            .expect("routes");
        assert_eq!(
            targets[0].upstream.credential.as_ref().map(|c| c.expose()),
            Some("sk-live-credential-0123456789")
        );
        assert_eq!(back.routing.records().count(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
