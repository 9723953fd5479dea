//! The configuration the control plane pushes: API keys, and each tenant environment's
//! routing and policy, at one revision ([`NodeConfig`]). Shared by every worker (memory does
//! not grow with the number of cores), replaced as a whole by the control thread
//! ([`SharedConfig::publish`]), and cheap to update.
//!
//! Keys sit in 256 shards behind `Arc`s, each a vector sorted by key id (exactly sized: a
//! hash map's power-of-two buckets would waste a third of the memory at a million keys).
//! A change copies the shard vector (256 pointers) and only the shards it touches, so
//! revoking one key among a million costs microseconds, not a copy of the table; readers
//! never lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use aigw_wire::keys::{Environment, KEY_ID_LEN};
use aigw_wire::{Change, KeyRecord, KeyStatus, Record};
use arc_swap::ArcSwap;

use crate::config::routing::Routing;
use event_listener::Event;

const SHARDS: usize = 256;

/// One key as the data plane needs it, compact: a million of them must fit well under
/// 256 MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub tenant_id: Arc<str>,
    pub environment: Environment,
    pub sub_account_id: Option<Arc<str>>,
    pub hash: [u8; 32],
    pub revoked: bool,
    /// Unix seconds; 0 = never.
    pub expires_at: u64,
    /// Unix seconds; 0 = none.
    pub grace_ends_at: u64,
    /// `None` = every model (most keys: no allocation for them).
    pub allowed_models: Option<Arc<[Box<str>]>>,
    pub rate_limits: aigw_wire::RateLimits,
    /// The sub-accounts above the key's, nearest first (`None` for most keys).
    pub sub_account_parents: Option<Arc<[Arc<str>]>>,
}

type KeyId = [u8; KEY_ID_LEN];
type Shard = Vec<(KeyId, Arc<KeyEntry>)>;

/// The pushed configuration at one revision: the key table, and the environments' routing
/// at that revision.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub revision: u64,
    /// The id the control plane gave this revision (0: none known); it tells one history
    /// of revisions from another that reached the same number.
    pub revision_id: u64,
    shards: Vec<Arc<Shard>>,
    /// Key records held that could not be applied (their key is unknown here), by key id.
    key_problems: Arc<BTreeMap<String, String>>,
    /// Upstreams, routes and policies per tenant environment (shared across revisions that
    /// do not change them).
    pub routing: Arc<Routing>,
}

/// Why a key record could not be applied (its key is then unknown to this node, and the
/// record is reported to the control plane).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("key {0:?}: malformed key id")]
    BadKeyId(String),
    #[error("key {0:?}: unknown environment {1:?}")]
    BadEnvironment(String, String),
    #[error("key {0:?}: unsupported hash version {1}")]
    BadHashVersion(String, u64),
}

fn shard_of(id: &KeyId) -> usize {
    // FNV-1a; key ids are random, any mixing spreads them.
    let mut h: u32 = 0x811c_9dc5;
    for &b in id {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h as usize) % SHARDS
}

fn key_id(s: &str) -> Option<KeyId> {
    KeyId::try_from(s.as_bytes()).ok()
}

/// Interns tenant ids so a million keys of a thousand tenants hold a thousand strings.
#[derive(Default)]
struct Interner(HashMap<String, Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(s.to_string(), Arc::clone(&a));
        a
    }
}

fn entry(r: &KeyRecord, interner: &mut Interner) -> Result<(KeyId, KeyEntry), TableError> {
    let id = key_id(&r.key_id).ok_or_else(|| TableError::BadKeyId(r.key_id.clone()))?;
    let environment = Environment::from_name(&r.environment)
        .ok_or_else(|| TableError::BadEnvironment(r.key_id.clone(), r.environment.clone()))?;
    if r.hash_version != aigw_wire::keys::HASH_VERSION {
        return Err(TableError::BadHashVersion(r.key_id.clone(), r.hash_version));
    }
    Ok((
        id,
        KeyEntry {
            tenant_id: interner.get(&r.tenant_id),
            environment,
            sub_account_id: r.sub_account_id.as_deref().map(|s| interner.get(s)),
            hash: r.hash,
            revoked: r.status == KeyStatus::Revoked,
            expires_at: r.expires_at,
            grace_ends_at: r.grace_ends_at,
            allowed_models: (!r.allowed_models.is_empty())
                .then(|| r.allowed_models.iter().map(|m| m.as_str().into()).collect()),
            rate_limits: r.rate_limits,
            sub_account_parents: (!r.sub_account_parents.is_empty()).then(|| {
                r.sub_account_parents
                    .iter()
                    .map(|p| interner.get(p))
                    .collect()
            }),
        },
    ))
}

impl NodeConfig {
    pub fn empty() -> Self {
        Self {
            revision: 0,
            revision_id: 0,
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
            routing: Arc::new(Routing::empty()),
            key_problems: Arc::default(),
        }
    }

    /// A table from a full snapshot's keys. A record that cannot be applied is left out
    /// and reported ([`Self::problems`]); the others are applied.
    pub fn from_records(revision: u64, records: &[KeyRecord]) -> Self {
        let mut b = NodeConfigBuilder::new(revision);
        b.add(records);
        b.finish()
    }

    /// A new table with `upserts` applied and `deletes` removed; `self` is untouched. A key
    /// whose record cannot be applied is removed (never left as it was: a revocation must
    /// not be lost to a malformed record) and reported.
    pub fn apply(&self, revision: u64, upserts: &[KeyRecord], deletes: &[String]) -> Self {
        let mut interner = Interner::default();
        let mut prepared = Vec::with_capacity(upserts.len());
        let mut problems: Option<BTreeMap<String, String>> = None;
        for r in upserts {
            match entry(r, &mut interner) {
                Ok((id, mut e)) => {
                    // Reuse the tenant string the table already holds.
                    if let Some(existing) = self.get_raw(&id) {
                        if *existing.tenant_id == *e.tenant_id {
                            e.tenant_id = Arc::clone(&existing.tenant_id);
                        }
                    }
                    if self.key_problems.contains_key(&r.key_id) {
                        problems
                            .get_or_insert_with(|| (*self.key_problems).clone())
                            .remove(&r.key_id);
                    }
                    prepared.push((id, Some(e)));
                }
                Err(err) => {
                    problems
                        .get_or_insert_with(|| (*self.key_problems).clone())
                        .insert(r.key_id.clone(), err.to_string());
                    if let Some(id) = key_id(&r.key_id) {
                        prepared.push((id, None));
                    }
                }
            }
        }
        let mut shards = self.shards.clone();
        for (id, e) in prepared {
            let shard = Arc::make_mut(&mut shards[shard_of(&id)]);
            match (shard.binary_search_by(|(k, _)| k.cmp(&id)), e) {
                (Ok(i), Some(e)) => shard[i].1 = Arc::new(e),
                (Err(i), Some(e)) => shard.insert(i, (id, Arc::new(e))),
                (Ok(i), None) => {
                    shard.remove(i);
                }
                (Err(_), None) => {}
            }
        }
        for d in deletes {
            if self.key_problems.contains_key(d) {
                problems
                    .get_or_insert_with(|| (*self.key_problems).clone())
                    .remove(d);
            }
            if let Some(id) = key_id(d) {
                let shard = Arc::make_mut(&mut shards[shard_of(&id)]);
                if let Ok(i) = shard.binary_search_by(|(k, _)| k.cmp(&id)) {
                    shard.remove(i);
                }
            }
        }
        Self {
            revision,
            revision_id: 0,
            shards,
            routing: Arc::clone(&self.routing),
            key_problems: problems.map_or_else(|| Arc::clone(&self.key_problems), Arc::new),
        }
    }

    /// A new table with a change set applied: keys, and the routing when the set touches
    /// it; `self` is untouched. Every record that can be applied is.
    pub fn apply_changes(&self, revision: u64, revision_id: u64, changes: Vec<Change>) -> Self {
        let mut key_upserts = Vec::new();
        let mut key_deletes = Vec::new();
        let mut routing_upserts = Vec::new();
        let mut routing_deletes = Vec::new();
        for c in changes {
            match c {
                Change::Upsert(Record::Key(k)) => key_upserts.push(k),
                Change::Upsert(Record::Unknown { .. }) => {}
                Change::Upsert(r) => routing_upserts.push(r),
                Change::Delete(t) if t.kind == aigw_wire::messages::kinds::KEY => {
                    key_deletes.push(t.id)
                }
                Change::Delete(t) if crate::config::routing::is_routing_kind(t.kind) => {
                    routing_deletes.push(t)
                }
                Change::Delete(_) => {}
            }
        }
        let mut next = self.apply(revision, &key_upserts, &key_deletes);
        next.revision_id = revision_id;
        if !routing_upserts.is_empty() || !routing_deletes.is_empty() {
            next.routing = Arc::new(self.routing.apply(routing_upserts, &routing_deletes));
        }
        next
    }

    /// Every record held that could not be applied, keys first, at most
    /// [`aigw_wire::messages::MAX_PROBLEMS`] of them, and how many there are in all.
    pub fn problems(&self) -> (Vec<aigw_wire::RecordProblem>, usize) {
        let keys = self
            .key_problems
            .iter()
            .map(|(id, e)| (aigw_wire::messages::kinds::KEY, id, e));
        let routing = self
            .routing
            .problems()
            .iter()
            .map(|((k, id), e)| (*k, id, e));
        let total = self.key_problems.len() + self.routing.problems().len();
        let list = keys
            .chain(routing)
            .take(aigw_wire::messages::MAX_PROBLEMS)
            .map(|(kind, id, error)| aigw_wire::RecordProblem {
                kind,
                id: id.clone(),
                error: error.clone(),
            })
            .collect();
        (list, total)
    }

    fn get_raw(&self, id: &KeyId) -> Option<&KeyEntry> {
        let shard = &self.shards[shard_of(id)];
        shard
            .binary_search_by(|(k, _)| k.cmp(id))
            .ok()
            .map(|i| &*shard[i].1)
    }

    pub fn get(&self, key_id_str: &str) -> Option<&KeyEntry> {
        self.get_raw(&key_id(key_id_str)?)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Every key as a wire record (for sealing the table to disk).
    pub fn for_each_record(&self, mut f: impl FnMut(KeyRecord)) {
        for shard in &self.shards {
            for (id, e) in shard.iter() {
                f(KeyRecord {
                    key_id: String::from_utf8_lossy(id).into_owned(),
                    tenant_id: e.tenant_id.to_string(),
                    environment: e.environment.name().to_string(),
                    sub_account_id: e.sub_account_id.as_ref().map(|s| s.to_string()),
                    hash_version: aigw_wire::keys::HASH_VERSION,
                    hash: e.hash,
                    status: if e.revoked {
                        KeyStatus::Revoked
                    } else {
                        KeyStatus::Active
                    },
                    expires_at: e.expires_at,
                    grace_ends_at: e.grace_ends_at,
                    allowed_models: e
                        .allowed_models
                        .iter()
                        .flat_map(|m| m.iter().map(|s| s.to_string()))
                        .collect(),
                    rate_limits: e.rate_limits,
                    sub_account_parents: e
                        .sub_account_parents
                        .iter()
                        .flat_map(|p| p.iter().map(|s| s.to_string()))
                        .collect(),
                });
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds a table from a snapshot arriving in parts, converting each part as it comes so
/// the wire records of a million keys are never all held at once.
#[derive(Default)]
pub struct NodeConfigBuilder {
    revision: u64,
    revision_id: u64,
    interner: Interner,
    /// Every key record in arrival order; `None` for one that could not be applied.
    shards: Vec<Vec<(KeyId, Option<Arc<KeyEntry>>)>>,
    routing: Vec<Record>,
    key_problems: BTreeMap<String, String>,
}

impl std::fmt::Debug for NodeConfigBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfigBuilder")
            .field("revision", &self.revision)
            .finish()
    }
}

impl NodeConfigBuilder {
    pub fn new(revision: u64) -> Self {
        Self::with_id(revision, 0)
    }

    /// A builder for revision `revision` whose id is `revision_id`.
    pub fn with_id(revision: u64, revision_id: u64) -> Self {
        Self {
            revision,
            revision_id,
            interner: Interner::default(),
            shards: (0..SHARDS).map(|_| Vec::new()).collect(),
            routing: Vec::new(),
            key_problems: BTreeMap::new(),
        }
    }

    /// Takes a snapshot part's records: keys go into the table, upstreams, routes and
    /// policies into the routing (built once, in [`Self::finish`]); unknown kinds are
    /// skipped.
    pub fn add_records(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::Key(k) => self.add_one(&k),
                Record::Unknown { .. } => {}
                other => self.routing.push(other),
            }
        }
    }

    pub fn add(&mut self, records: &[KeyRecord]) {
        for r in records {
            self.add_one(r);
        }
    }

    /// A key whose record cannot be applied is left out (unknown here) and reported.
    fn add_one(&mut self, r: &KeyRecord) {
        match entry(r, &mut self.interner) {
            Ok((id, e)) => {
                self.key_problems.remove(&r.key_id);
                self.shards[shard_of(&id)].push((id, Some(Arc::new(e))));
            }
            Err(err) => {
                self.key_problems.insert(r.key_id.clone(), err.to_string());
                // A later valid record of the same id in the snapshot still wins.
                if let Some(id) = key_id(&r.key_id) {
                    self.shards[shard_of(&id)].push((id, None));
                }
            }
        }
    }

    /// The table; fails when the routing records do not form a valid routing.
    pub fn finish(self) -> NodeConfig {
        let routing = Routing::from_records(self.routing);
        NodeConfig {
            revision: self.revision,
            revision_id: self.revision_id,
            routing: Arc::new(routing),
            key_problems: Arc::new(self.key_problems),
            shards: self
                .shards
                .into_iter()
                .map(|mut s| {
                    // Sort, and keep the last of duplicate ids (a later record wins).
                    s.reverse();
                    s.sort_by_key(|e| e.0);
                    s.dedup_by(|a, b| a.0 == b.0);
                    let mut shard: Shard =
                        s.into_iter().filter_map(|(id, e)| Some((id, e?))).collect();
                    shard.shrink_to_fit();
                    Arc::new(shard)
                })
                .collect(),
        }
    }
}

/// The published table, and how workers learn it changed.
#[derive(Debug)]
pub struct SharedConfig {
    revision: AtomicU64,
    /// Bumped on every publish (a republished revision included), so a worker can tell
    /// with one atomic load whether its copy is current.
    generation: AtomicU64,
    loaded: AtomicBool,
    current: ArcSwap<NodeConfig>,
    /// Woken on every publish: each worker's watcher swaps its copy at once, so idle
    /// workers apply a revocation as fast as busy ones.
    pub changed: Event,
    /// When the node last heard from the control plane.
    last_contact: std::sync::Mutex<Option<Instant>>,
    /// Whether the link to the control plane is up (a session established).
    connected: AtomicBool,
    /// Usage the workers measured, for the control thread to report.
    pub usage: crate::config::usage::Outbox,
    /// Bodies for the control plane's body log.
    pub bodies: crate::config::bodies::BodyQueue,
    /// Usage entries waiting for the control plane's acknowledgement, and those dropped
    /// for want of room since start (see [`crate::config::usage::MAX_UNACKED_ENTRIES`]).
    usage_backlog: AtomicU64,
    usage_dropped: AtomicU64,
    /// Rate-limit state of the keys that have limits, shared by the workers.
    pub limiters: crate::config::limits::Limiters,
    /// The spend cap budget leased to this node.
    pub leases: crate::config::spend::Leases,
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            revision: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            current: ArcSwap::from_pointee(NodeConfig::empty()),
            changed: Event::new(),
            last_contact: std::sync::Mutex::new(None),
            connected: AtomicBool::new(false),
            usage: crate::config::usage::Outbox::default(),
            bodies: Default::default(),
            usage_backlog: AtomicU64::new(0),
            usage_dropped: AtomicU64::new(0),
            limiters: Default::default(),
            leases: Default::default(),
        }
    }
}

impl SharedConfig {
    pub fn publish(&self, table: NodeConfig) {
        let revision = table.revision;
        self.current.store(Arc::new(table));
        self.revision.store(revision, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.loaded.store(true, Ordering::Release);
        self.changed.notify(usize::MAX);
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether any table (snapshot or sealed copy) has been published.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn load(&self) -> Arc<NodeConfig> {
        self.current.load_full()
    }

    /// Records that the control plane was last heard from `ago`.
    pub fn touched_ago(&self, ago: std::time::Duration) {
        let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    pub fn touch(&self) {
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Records whether the link to the control plane is up.
    pub fn set_usage_backlog(&self, waiting: usize, dropped: u64) {
        self.usage_backlog.store(waiting as u64, Ordering::Relaxed);
        self.usage_dropped.store(dropped, Ordering::Relaxed);
    }

    /// (entries waiting for acknowledgement, entries dropped since start).
    pub fn usage_backlog(&self) -> (u64, u64) {
        (
            self.usage_backlog.load(Ordering::Relaxed),
            self.usage_dropped.load(Ordering::Relaxed),
        )
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Seconds since the control plane was last heard from (`None`: never).
    pub fn age_seconds(&self) -> Option<u64> {
        self.last_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, tenant: &str, revoked: bool) -> KeyRecord {
        KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: id.into(),
            tenant_id: tenant.into(),
            environment: "production".into(),
            sub_account_id: None,
            hash_version: 1,
            hash: [1; 32],
            status: if revoked {
                KeyStatus::Revoked
            } else {
                KeyStatus::Active
            },
            expires_at: 0,
            grace_ends_at: 0,
            allowed_models: vec![],
            rate_limits: Default::default(),
        }
    }

    #[test]
    fn apply_copies_only_what_changes() {
        let ids: Vec<String> = (0..1000).map(|i| format!("{i:012}")).collect();
        let records: Vec<KeyRecord> = ids.iter().map(|id| rec(id, "t", false)).collect();
        let t1 = NodeConfig::from_records(5, &records);
        assert_eq!(t1.len(), 1000);
        let t2 = t1.apply(6, &[rec(&ids[3], "t", true)], &[ids[4].clone()]);
        assert!(t2.get(&ids[3]).expect("kept").revoked);
        assert!(t2.get(&ids[4]).is_none());
        assert!(!t1.get(&ids[3]).expect("old table intact").revoked);
        let untouched = (0..SHARDS)
            .filter(|&i| Arc::ptr_eq(&t1.shards[i], &t2.shards[i]))
            .count();
        assert!(
            untouched >= SHARDS - 2,
            "only the touched shards are copied ({untouched})"
        );
        // Tenant strings are shared, not copied per key.
        let a = t1.get(&ids[0]).expect("present");
        let b = t1.get(&ids[1]).expect("present");
        assert!(Arc::ptr_eq(&a.tenant_id, &b.tenant_id));
        // A new key lands in order and is found.
        let t3 = t2.apply(
            7,
            &[
                rec("000000000000", "t", false),
                rec("zzzzzzzzzzzz", "u", false),
            ],
            &[],
        );
        assert!(t3.get("zzzzzzzzzzzz").is_some());
        assert_eq!(t3.len(), 1000);
    }

    #[test]
    fn a_key_record_that_cannot_be_applied_leaves_its_key_unknown_and_is_reported() {
        let good = rec("abcdefghijkl", "t", false);
        let other = rec("mnopqrstuvwx", "t", false);
        let t = NodeConfig::from_records(1, &[good.clone(), other.clone()]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.problems().1, 0);
        for (bad, expected) in [
            (
                KeyRecord {
                    environment: "qa".into(),
                    ..good.clone()
                },
                "unknown environment",
            ),
            (
                KeyRecord {
                    hash_version: 9,
                    ..good.clone()
                },
                "hash version",
            ),
        ] {
            // An update the node cannot read removes the key rather than leave its old
            // state (a revocation must not be lost to it); the other key is untouched.
            let next = t.apply(2, &[bad], &[]);
            assert!(next.get("abcdefghijkl").is_none());
            assert!(next.get("mnopqrstuvwx").is_some());
            let (problems, total) = next.problems();
            assert_eq!(total, 1);
            assert_eq!(problems[0].id, "abcdefghijkl");
            assert!(
                problems[0].error.contains(expected),
                "{}",
                problems[0].error
            );
            // A later good record clears it.
            let fixed = next.apply(3, std::slice::from_ref(&good), &[]);
            assert!(fixed.get("abcdefghijkl").is_some());
            assert_eq!(fixed.problems().1, 0);
        }
        // A malformed id, in a snapshot: reported, the rest applied.
        let t = NodeConfig::from_records(1, &[rec("short", "t", false), other]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.problems().0[0].id, "short");
    }
}
