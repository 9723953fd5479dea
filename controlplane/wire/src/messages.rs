//! The messages and records of the control-plane ⇄ data-plane protocol.
//!
//! Field tags are part of the protocol: a tag is never reused for another meaning, new
//! fields get new tags, and readers skip tags they do not know. PROTOCOL.md beside this
//! crate describes the exchange.

use crate::codec::{
    first_field, get_str, get_u64, put_bytes, put_field, put_str, put_u64, repeated,
    within_expansion, Codec, InvalidMessage, Reader,
};
use crate::routing::{PolicyRecord, RouteRecord, UpstreamRecord};
use crate::spend::{CapRecord, LimitRecord, PriceRecord};

/// Bumped only for changes an older peer cannot skip over.
pub const PROTOCOL_VERSION: u64 = 1;

/// A key's state as every node must enforce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
}

/// One API key, as nodes hold it: never the key itself, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public id embedded in the key (looked up first).
    pub key_id: String,
    pub tenant_id: String,
    /// `production`, `staging` or `development`.
    pub environment: String,
    pub sub_account_id: Option<String>,
    /// Which hash function `hash` was made with.
    pub hash_version: u64,
    pub hash: [u8; 32],
    pub status: KeyStatus,
    /// Unix seconds, UTC; 0 = never.
    pub expires_at: u64,
    /// Unix seconds, UTC; 0 = no grace period (set on the old key when rotating).
    pub grace_ends_at: u64,
    /// Empty = every model the environment routes.
    pub allowed_models: Vec<String>,
    /// Enforced by each node on its own traffic (0 = no limit).
    pub rate_limits: RateLimits,
    /// The sub-accounts above the key's, nearest first (their spend caps cover the key).
    pub sub_account_parents: Vec<String>,
}

/// A key's rate limits; 0 = none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
}

/// What a change or snapshot carries. Kinds a node does not know are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Key(KeyRecord),
    Upstream(UpstreamRecord),
    Route(RouteRecord),
    Policy(PolicyRecord),
    Cap(CapRecord),
    Price(PriceRecord),
    Limit(LimitRecord),
    /// A record kind from a newer peer: kept opaque (and re-encoded verbatim), ignored.
    Unknown {
        kind: u64,
        body: Vec<u8>,
    },
}

/// Deletion of a record, by kind and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub kind: u64,
    pub id: String,
}

// Most changes are upserts; boxing every record to shrink the rarer tombstone would cost an
// allocation per change.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(Record),
    Delete(Tombstone),
}

/// A record a node could not apply: it applied every other one, and serves without this
/// one (an upstream or route unusable, a key unknown) until a later revision fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordProblem {
    /// The record's kind ([`kinds`]).
    pub kind: u64,
    pub id: String,
    pub error: String,
}

/// Problems an Ack carries at most; the count of the rest is reported.
pub const MAX_PROBLEMS: usize = 100;

/// What one key's requests for one model used, on one UTC day, over a reporting interval.
/// Counts add up: entries of the same (key, model, day) merge by addition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageEntry {
    pub key_id: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Days since 1970-01-01, UTC, when the requests ended.
    pub day: u64,
    /// Requests answered with an error (status 400 or above), the gateway's or the
    /// provider's.
    pub errors: u64,
    /// Of the input tokens, those read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic).
    pub cache_write_tokens: u64,
    /// Of the output tokens, those spent reasoning.
    pub reasoning_tokens: u64,
    /// Requests whose tokens the provider never reported (a stream cut short, say), counted
    /// from an estimate instead.
    pub estimated_requests: u64,
    /// Cost in millionths of a US dollar when the node priced the usage itself; the control
    /// plane prices reports as they arrive and does not read it.
    pub cost_micros: u64,
    /// Total latency and time to first byte, microseconds ([`crate::sketch::Sketch`]).
    pub latency: crate::sketch::Sketch,
    pub ttfb: crate::sketch::Sketch,
}

impl UsageEntry {
    /// Adds `other`'s figures (same key, model and day) to these.
    pub fn merge(&mut self, other: &UsageEntry) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.errors += other.errors;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.estimated_requests += other.estimated_requests;
        self.cost_micros += other.cost_micros;
        self.latency.merge(&other.latency);
        self.ttfb.merge(&other.ttfb);
    }
}

/// Every message on the link. Unknown message types are skipped by the framing layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Node → control plane, first on every connection. `token` authenticates the node
    /// (the link is TLS, so it never crosses the network in the clear).
    Hello {
        protocol_version: u64,
        node_id: String,
        boot_epoch: u64,
        revision_held: u64,
        token: String,
        /// The id of the revision held ([`Message::Changes::revision_id`]); 0 = none.
        revision_id: u64,
    },
    /// Control plane → node: the changes after `from_revision` up to `to_revision`.
    Changes {
        from_revision: u64,
        to_revision: u64,
        changes: Vec<Change>,
        /// A random id the control plane gave `to_revision` when it committed it: two
        /// histories that reach the same revision number (a database restored from a
        /// backup, then changed) have different ids, so a node holding the other one gets
        /// a snapshot instead of changes that do not apply to what it holds.
        revision_id: u64,
    },
    /// Control plane → node: a full snapshot at `revision`, in `parts` messages.
    Snapshot {
        revision: u64,
        part: u64,
        parts: u64,
        records: Vec<Record>,
        /// As in [`Message::Changes`].
        revision_id: u64,
    },
    /// Node → control plane: `revision` is applied on every worker, except the records in
    /// `problems` (every record the node holds and cannot use, not only this revision's).
    Ack {
        revision: u64,
        /// At most [`MAX_PROBLEMS`] of them.
        problems: Vec<RecordProblem>,
        /// How many there are in all.
        problems_total: u64,
    },
    /// Node → control plane: `revision` was refused; the node keeps its previous config.
    Nack {
        revision: u64,
        error: String,
    },
    Heartbeat {
        unix_ms: u64,
    },
    /// Node → control plane; (node, boot epoch, seq) makes a resend idempotent.
    UsageReport {
        node_id: String,
        boot_epoch: u64,
        seq: u64,
        entries: Vec<UsageEntry>,
    },
    UsageAck {
        boot_epoch: u64,
        seq: u64,
    },
    /// Control plane → node, just before it closes the link: why it will not serve this
    /// node (a wrong token, say), so the node can say so instead of a bare disconnect.
    Refused {
        reason: String,
    },
    /// Node → control plane, instead of a Hello, from a node with no identity yet: a
    /// one-time enrolment token and the public half of the key it made (an uncompressed
    /// P-256 point, 65 bytes).
    Enroll {
        token: String,
        public_key: Vec<u8>,
    },
    /// Control plane → node: its client certificate (DER, signed by the link's CA), for the
    /// mutual TLS of every later connection, and the node id it names.
    Enrolled {
        node_id: String,
        cert_der: Vec<u8>,
    },
    /// Node → control plane: a guardrail block, a leaked-key sighting… for the audit log;
    /// (node, boot epoch, seq) makes a resend idempotent.
    Event {
        node_id: String,
        boot_epoch: u64,
        seq: u64,
        kind: String,
        detail: String,
    },
    /// Control plane → node: the event is in the audit log.
    EventAck {
        boot_epoch: u64,
        seq: u64,
    },
    /// Node → control plane: one request's bodies for the tenant's body log; (node, boot
    /// epoch, seq) makes a resend idempotent. `meta` is JSON (status, model, truncation…).
    BodyLog {
        node_id: String,
        boot_epoch: u64,
        seq: u64,
        tenant_id: String,
        request_id: String,
        meta: String,
        request: Vec<u8>,
        response: Vec<u8>,
    },
    /// Control plane → node: the bodies are in the body log (or were refused for good).
    BodyLogAck {
        boot_epoch: u64,
        seq: u64,
    },
    /// Control plane → node, at link up and whenever it changes: the tenants that opted
    /// out of the body log (nothing of theirs is captured), and those whose requests are
    /// refused, rather than their bodies dropped, while the node's body queue is full. A
    /// tenant in neither list is logged, dropping when the queue is full.
    BodyLogTenants {
        off: Vec<String>,
        refuse: Vec<String>,
    },
    /// Node → control plane: more of a spend cap's budget for `period`
    /// ([`crate::spend::CapPeriod::index`]), in millionths of a US dollar; or, for a lease
    /// id of [`crate::spend::rate_lease`], more of a rate limit's requests or tokens for the
    /// minute `period`.
    LeaseRequest {
        cap_id: String,
        period: u64,
        want_micros: u64,
    },
    /// Control plane → node: `granted_micros` more of the cap's budget for `period` (0 when
    /// there is none left); `exhausted`: nothing more will be leased for this period.
    LeaseGrant {
        cap_id: String,
        period: u64,
        granted_micros: u64,
        exhausted: bool,
    },
    /// Node → control plane: lease it holds and will not spend (at an orderly stop), given
    /// back for other nodes.
    LeaseReturn {
        cap_id: String,
        period: u64,
        micros: u64,
    },
}

/// Message type codes (the frame header carries them).
pub mod types {
    pub const HELLO: u16 = 1;
    pub const CHANGES: u16 = 2;
    pub const SNAPSHOT: u16 = 3;
    pub const ACK: u16 = 4;
    pub const NACK: u16 = 5;
    pub const HEARTBEAT: u16 = 6;
    pub const USAGE_REPORT: u16 = 7;
    pub const USAGE_ACK: u16 = 8;
    pub const EVENT: u16 = 9;
    pub const REFUSED: u16 = 10;
    pub const ENROLL: u16 = 11;
    pub const ENROLLED: u16 = 12;
    pub const EVENT_ACK: u16 = 13;
    pub const LEASE_REQUEST: u16 = 14;
    pub const LEASE_GRANT: u16 = 15;
    pub const LEASE_RETURN: u16 = 16;
    pub const BODY_LOG: u16 = 17;
    pub const BODY_LOG_ACK: u16 = 18;
    pub const BODY_LOG_TENANTS: u16 = 19;
}

/// Record kind codes.
pub mod kinds {
    pub const KEY: u64 = 1;
    pub const UPSTREAM: u64 = 2;
    pub const ROUTE: u64 = 3;
    pub const POLICY: u64 = 4;
    pub const CAP: u64 = 5;
    pub const PRICE: u64 = 6;
    pub const LIMIT: u64 = 7;
}

impl Codec for KeyStatus {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self {
            Self::Active => 1,
            Self::Revoked => 2,
        });
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        match r.u8()? {
            1 => Ok(Self::Active),
            2 => Ok(Self::Revoked),
            _ => Err(InvalidMessage::BadField { tag: 7 }),
        }
    }
}

impl Codec for KeyRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.key_id);
        put_str(out, 2, &self.tenant_id);
        put_str(out, 3, &self.environment);
        if let Some(s) = &self.sub_account_id {
            put_str(out, 4, s);
        }
        put_u64(out, 5, self.hash_version);
        put_bytes(out, 6, &self.hash);
        put_field(out, 7, |o| self.status.encode(o));
        if self.expires_at != 0 {
            put_u64(out, 8, self.expires_at);
        }
        if self.grace_ends_at != 0 {
            put_u64(out, 9, self.grace_ends_at);
        }
        for m in &self.allowed_models {
            put_str(out, 10, m);
        }
        if self.rate_limits.requests_per_minute != 0 {
            put_u64(out, 11, self.rate_limits.requests_per_minute);
        }
        if self.rate_limits.tokens_per_minute != 0 {
            put_u64(out, 12, self.rate_limits.tokens_per_minute);
        }
        for p in &self.sub_account_parents {
            put_str(out, 13, p);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut key_id, mut tenant_id, mut environment) = (None, None, None);
        let mut sub_account_id = None;
        let mut hash_version = None;
        let mut hash = None;
        let mut status = None;
        let (mut expires_at, mut grace_ends_at) = (0, 0);
        let mut allowed_models = Vec::new();
        let mut rate_limits = RateLimits::default();
        let mut sub_account_parents = Vec::new();
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => key_id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => environment = Some(get_str(body)?),
                4 => sub_account_id = Some(get_str(body)?),
                5 => hash_version = Some(get_u64(tag, body)?),
                6 => {
                    hash = Some(
                        <[u8; 32]>::try_from(body).map_err(|_| InvalidMessage::BadField { tag })?,
                    )
                }
                7 => status = Some(KeyStatus::from_bytes(body)?),
                8 => expires_at = get_u64(tag, body)?,
                9 => grace_ends_at = get_u64(tag, body)?,
                10 => {
                    within_expansion(
                        allowed_models.len() + 1,
                        std::mem::size_of::<String>(),
                        r.total_len(),
                    )?;
                    allowed_models.push(get_str(body)?)
                }
                11 => rate_limits.requests_per_minute = get_u64(tag, body)?,
                12 => rate_limits.tokens_per_minute = get_u64(tag, body)?,
                13 => {
                    within_expansion(
                        sub_account_parents.len() + 1,
                        std::mem::size_of::<String>(),
                        r.total_len(),
                    )?;
                    sub_account_parents.push(get_str(body)?)
                }
                _ => {} // a newer peer's field
            }
        }
        let missing = |tag| InvalidMessage::MissingField { tag };
        Ok(Self {
            key_id: key_id.ok_or(missing(1))?,
            tenant_id: tenant_id.ok_or(missing(2))?,
            environment: environment.ok_or(missing(3))?,
            sub_account_id,
            hash_version: hash_version.ok_or(missing(5))?,
            hash: hash.ok_or(missing(6))?,
            status: status.ok_or(missing(7))?,
            expires_at,
            grace_ends_at,
            allowed_models,
            rate_limits,
            sub_account_parents,
        })
    }
}

impl Record {
    /// The record's kind code.
    pub fn kind(&self) -> u64 {
        match self {
            Self::Key(_) => kinds::KEY,
            Self::Upstream(_) => kinds::UPSTREAM,
            Self::Route(_) => kinds::ROUTE,
            Self::Policy(_) => kinds::POLICY,
            Self::Cap(_) => kinds::CAP,
            Self::Price(_) => kinds::PRICE,
            Self::Limit(_) => kinds::LIMIT,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    /// The record's id (a key's id; `{tenant}/{environment}[/{name}]` for routing; empty
    /// for an unknown kind).
    pub fn id(&self) -> &str {
        match self {
            Self::Key(k) => &k.key_id,
            Self::Upstream(u) => &u.id,
            Self::Route(r) => &r.id,
            Self::Policy(p) => &p.id,
            Self::Cap(c) => &c.id,
            Self::Price(p) => &p.id,
            Self::Limit(l) => &l.id,
            Self::Unknown { .. } => "",
        }
    }
}

impl Codec for Record {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Key(k) => put_field(out, kinds::KEY, |o| k.encode(o)),
            Self::Upstream(u) => put_field(out, kinds::UPSTREAM, |o| u.encode(o)),
            Self::Route(rt) => put_field(out, kinds::ROUTE, |o| rt.encode(o)),
            Self::Policy(p) => put_field(out, kinds::POLICY, |o| p.encode(o)),
            Self::Cap(c) => put_field(out, kinds::CAP, |o| c.encode(o)),
            Self::Price(p) => put_field(out, kinds::PRICE, |o| p.encode(o)),
            Self::Limit(l) => put_field(out, kinds::LIMIT, |o| l.encode(o)),
            Self::Unknown { kind, body } => put_field(out, *kind, |o| o.extend_from_slice(body)),
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (kind, body) = r.field()?;
        Ok(match kind {
            kinds::KEY => Self::Key(KeyRecord::from_bytes(body)?),
            kinds::UPSTREAM => Self::Upstream(UpstreamRecord::from_bytes(body)?),
            kinds::ROUTE => Self::Route(RouteRecord::from_bytes(body)?),
            kinds::POLICY => Self::Policy(PolicyRecord::from_bytes(body)?),
            kinds::CAP => Self::Cap(CapRecord::from_bytes(body)?),
            kinds::PRICE => Self::Price(PriceRecord::from_bytes(body)?),
            kinds::LIMIT => Self::Limit(LimitRecord::from_bytes(body)?),
            other => Self::Unknown {
                kind: other,
                body: body.to_vec(),
            },
        })
    }
}

impl Codec for Change {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Upsert(rec) => put_field(out, 1, |o| rec.encode(o)),
            Self::Delete(t) => put_field(out, 2, |o| {
                put_u64(o, 1, t.kind);
                put_str(o, 2, &t.id);
            }),
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (tag, body) = r.field()?;
        match tag {
            1 => Ok(Self::Upsert(Record::from_bytes(body)?)),
            2 => {
                let mut rr = Reader::new(body);
                let (mut kind, mut id) = (None, None);
                while !rr.is_empty() {
                    let (t, b) = rr.field()?;
                    match t {
                        1 => kind = Some(get_u64(t, b)?),
                        2 => id = Some(get_str(b)?),
                        _ => {}
                    }
                }
                Ok(Self::Delete(Tombstone {
                    kind: kind.ok_or(InvalidMessage::MissingField { tag: 1 })?,
                    id: id.ok_or(InvalidMessage::MissingField { tag: 2 })?,
                }))
            }
            _ => Err(InvalidMessage::BadField { tag }),
        }
    }
}

impl Codec for RecordProblem {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, 1, self.kind);
        put_str(out, 2, &self.id);
        put_str(out, 3, &self.error);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let mut p = RecordProblem {
            kind: 0,
            id: String::new(),
            error: String::new(),
        };
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => p.kind = get_u64(tag, body)?,
                2 => p.id = get_str(body)?,
                3 => p.error = get_str(body)?,
                _ => {}
            }
        }
        Ok(p)
    }
}

impl Codec for UsageEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.key_id);
        put_str(out, 2, &self.model);
        put_u64(out, 3, self.requests);
        put_u64(out, 4, self.input_tokens);
        put_u64(out, 5, self.output_tokens);
        put_u64(out, 6, self.day);
        for (tag, v) in [
            (7, self.errors),
            (8, self.cached_input_tokens),
            (9, self.cache_write_tokens),
            (10, self.reasoning_tokens),
            (11, self.estimated_requests),
            (12, self.cost_micros),
        ] {
            if v != 0 {
                put_u64(out, tag, v);
            }
        }
        if !self.latency.is_empty() {
            put_field(out, 13, |o| self.latency.encode(o));
        }
        if !self.ttfb.is_empty() {
            put_field(out, 14, |o| self.ttfb.encode(o));
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let mut e = UsageEntry::default();
        let sketch = |tag, body| {
            crate::sketch::Sketch::decode(body).map_err(|_| InvalidMessage::BadField { tag })
        };
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => e.key_id = get_str(body)?,
                2 => e.model = get_str(body)?,
                3 => e.requests = get_u64(tag, body)?,
                4 => e.input_tokens = get_u64(tag, body)?,
                5 => e.output_tokens = get_u64(tag, body)?,
                6 => e.day = get_u64(tag, body)?,
                7 => e.errors = get_u64(tag, body)?,
                8 => e.cached_input_tokens = get_u64(tag, body)?,
                9 => e.cache_write_tokens = get_u64(tag, body)?,
                10 => e.reasoning_tokens = get_u64(tag, body)?,
                11 => e.estimated_requests = get_u64(tag, body)?,
                12 => e.cost_micros = get_u64(tag, body)?,
                13 => e.latency = sketch(tag, body)?,
                14 => e.ttfb = sketch(tag, body)?,
                _ => {}
            }
        }
        Ok(e)
    }
}

impl Message {
    pub fn type_code(&self) -> u16 {
        match self {
            Self::Hello { .. } => types::HELLO,
            Self::Changes { .. } => types::CHANGES,
            Self::Snapshot { .. } => types::SNAPSHOT,
            Self::Ack { .. } => types::ACK,
            Self::Nack { .. } => types::NACK,
            Self::Heartbeat { .. } => types::HEARTBEAT,
            Self::UsageReport { .. } => types::USAGE_REPORT,
            Self::UsageAck { .. } => types::USAGE_ACK,
            Self::Event { .. } => types::EVENT,
            Self::EventAck { .. } => types::EVENT_ACK,
            Self::LeaseRequest { .. } => types::LEASE_REQUEST,
            Self::LeaseGrant { .. } => types::LEASE_GRANT,
            Self::LeaseReturn { .. } => types::LEASE_RETURN,
            Self::BodyLog { .. } => types::BODY_LOG,
            Self::BodyLogAck { .. } => types::BODY_LOG_ACK,
            Self::BodyLogTenants { .. } => types::BODY_LOG_TENANTS,
            Self::Refused { .. } => types::REFUSED,
            Self::Enroll { .. } => types::ENROLL,
            Self::Enrolled { .. } => types::ENROLLED,
        }
    }

    /// Writes the message body (without the frame header).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Self::Hello {
                protocol_version,
                node_id,
                boot_epoch,
                revision_held,
                token,
                revision_id,
            } => {
                put_u64(out, 1, *protocol_version);
                put_str(out, 2, node_id);
                put_u64(out, 3, *boot_epoch);
                put_u64(out, 4, *revision_held);
                put_str(out, 5, token);
                if *revision_id != 0 {
                    put_u64(out, 6, *revision_id);
                }
            }
            Self::Changes {
                from_revision,
                to_revision,
                changes,
                revision_id,
            } => {
                put_u64(out, 1, *from_revision);
                put_u64(out, 2, *to_revision);
                for c in changes {
                    put_field(out, 3, |o| c.encode(o));
                }
                if *revision_id != 0 {
                    put_u64(out, 4, *revision_id);
                }
            }
            Self::Snapshot {
                revision,
                part,
                parts,
                records,
                revision_id,
            } => {
                put_u64(out, 1, *revision);
                put_u64(out, 2, *part);
                put_u64(out, 3, *parts);
                for rec in records {
                    put_field(out, 4, |o| rec.encode(o));
                }
                if *revision_id != 0 {
                    put_u64(out, 5, *revision_id);
                }
            }
            Self::Ack {
                revision,
                problems,
                problems_total,
            } => {
                put_u64(out, 1, *revision);
                for p in problems {
                    put_field(out, 2, |o| p.encode(o));
                }
                if *problems_total != 0 {
                    put_u64(out, 3, *problems_total);
                }
            }
            Self::Nack { revision, error } => {
                put_u64(out, 1, *revision);
                put_str(out, 2, error);
            }
            Self::Heartbeat { unix_ms } => put_u64(out, 1, *unix_ms),
            Self::UsageReport {
                node_id,
                boot_epoch,
                seq,
                entries,
            } => {
                put_str(out, 1, node_id);
                put_u64(out, 2, *boot_epoch);
                put_u64(out, 3, *seq);
                for e in entries {
                    put_field(out, 4, |o| e.encode(o));
                }
            }
            Self::UsageAck { boot_epoch, seq }
            | Self::EventAck { boot_epoch, seq }
            | Self::BodyLogAck { boot_epoch, seq } => {
                put_u64(out, 1, *boot_epoch);
                put_u64(out, 2, *seq);
            }
            Self::Event {
                node_id,
                boot_epoch,
                seq,
                kind,
                detail,
            } => {
                put_str(out, 1, node_id);
                put_u64(out, 2, *boot_epoch);
                put_u64(out, 3, *seq);
                put_str(out, 4, kind);
                put_str(out, 5, detail);
            }
            Self::LeaseRequest {
                cap_id,
                period,
                want_micros: micros,
            }
            | Self::LeaseReturn {
                cap_id,
                period,
                micros,
            } => {
                put_str(out, 1, cap_id);
                put_u64(out, 2, *period);
                put_u64(out, 3, *micros);
            }
            Self::LeaseGrant {
                cap_id,
                period,
                granted_micros,
                exhausted,
            } => {
                put_str(out, 1, cap_id);
                put_u64(out, 2, *period);
                put_u64(out, 3, *granted_micros);
                put_u64(out, 4, u64::from(*exhausted));
            }
            Self::BodyLog {
                node_id,
                boot_epoch,
                seq,
                tenant_id,
                request_id,
                meta,
                request,
                response,
            } => {
                put_str(out, 1, node_id);
                put_u64(out, 2, *boot_epoch);
                put_u64(out, 3, *seq);
                put_str(out, 4, tenant_id);
                put_str(out, 5, request_id);
                put_str(out, 6, meta);
                put_bytes(out, 7, request);
                put_bytes(out, 8, response);
            }
            Self::BodyLogTenants { off, refuse } => {
                for t in off {
                    put_str(out, 1, t);
                }
                for t in refuse {
                    put_str(out, 2, t);
                }
            }
            Self::Refused { reason } => put_str(out, 1, reason),
            Self::Enroll { token, public_key } => {
                put_str(out, 1, token);
                put_bytes(out, 2, public_key);
            }
            Self::Enrolled { node_id, cert_der } => {
                put_str(out, 1, node_id);
                put_bytes(out, 2, cert_der);
            }
        }
    }

    /// Reads a body of message type `code`; `Ok(None)` for a type this version does not
    /// know (the caller skips it).
    pub fn decode_body(code: u16, body: &[u8]) -> Result<Option<Self>, InvalidMessage> {
        if !(types::HELLO..=types::BODY_LOG_TENANTS).contains(&code) {
            return Ok(None);
        }
        // Checked whole first; then each field is looked up where it is, without building
        // an index of them (its memory would grow with the number of fields, not their size).
        let mut r = Reader::new(body);
        while !r.is_empty() {
            r.field()?;
        }
        let u = |tag: u64| -> Result<u64, InvalidMessage> {
            first_field(body, tag)?
                .map(|b| get_u64(tag, b))
                .unwrap_or(Err(InvalidMessage::MissingField { tag }))
        };
        let u_or0 = |tag: u64| -> Result<u64, InvalidMessage> {
            first_field(body, tag)?.map_or(Ok(0), |b| get_u64(tag, b))
        };
        let s = |tag: u64| -> Result<String, InvalidMessage> {
            first_field(body, tag)?.map_or(Ok(String::new()), get_str)
        };
        let b = |tag: u64| -> Result<Vec<u8>, InvalidMessage> {
            Ok(first_field(body, tag)?
                .map(<[u8]>::to_vec)
                .unwrap_or_default())
        };
        let strings = |tag: u64| -> Result<Vec<String>, InvalidMessage> {
            let mut out = Vec::new();
            let mut r = Reader::new(body);
            while !r.is_empty() {
                let (t, v) = r.field()?;
                if t == tag {
                    out.push(get_str(v)?);
                }
            }
            Ok(out)
        };
        Ok(Some(match code {
            types::HELLO => Self::Hello {
                protocol_version: u(1)?,
                node_id: s(2)?,
                boot_epoch: u_or0(3)?,
                revision_held: u_or0(4)?,
                token: s(5)?,
                revision_id: u_or0(6)?,
            },
            types::CHANGES => Self::Changes {
                from_revision: u_or0(1)?,
                to_revision: u(2)?,
                changes: repeated(body, 3)?,
                revision_id: u_or0(4)?,
            },
            types::SNAPSHOT => Self::Snapshot {
                revision: u(1)?,
                part: u_or0(2)?,
                parts: u(3)?,
                records: repeated(body, 4)?,
                revision_id: u_or0(5)?,
            },
            types::ACK => Self::Ack {
                revision: u(1)?,
                problems: repeated(body, 2)?,
                problems_total: u_or0(3)?,
            },
            types::NACK => Self::Nack {
                revision: u(1)?,
                error: s(2)?,
            },
            types::HEARTBEAT => Self::Heartbeat { unix_ms: u_or0(1)? },
            types::USAGE_REPORT => Self::UsageReport {
                node_id: s(1)?,
                boot_epoch: u(2)?,
                seq: u(3)?,
                entries: repeated(body, 4)?,
            },
            types::USAGE_ACK => Self::UsageAck {
                boot_epoch: u(1)?,
                seq: u(2)?,
            },
            types::EVENT_ACK => Self::EventAck {
                boot_epoch: u(1)?,
                seq: u(2)?,
            },
            types::LEASE_REQUEST => Self::LeaseRequest {
                cap_id: s(1)?,
                period: u(2)?,
                want_micros: u(3)?,
            },
            types::LEASE_GRANT => Self::LeaseGrant {
                cap_id: s(1)?,
                period: u(2)?,
                granted_micros: u(3)?,
                exhausted: u(4)? != 0,
            },
            types::LEASE_RETURN => Self::LeaseReturn {
                cap_id: s(1)?,
                period: u(2)?,
                micros: u(3)?,
            },
            types::REFUSED => Self::Refused { reason: s(1)? },
            types::ENROLL => Self::Enroll {
                token: s(1)?,
                public_key: first_field(body, 2)?
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            },
            types::ENROLLED => Self::Enrolled {
                node_id: s(1)?,
                cert_der: first_field(body, 2)?
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            },
            types::EVENT => Self::Event {
                node_id: s(1)?,
                boot_epoch: u(2)?,
                seq: u(3)?,
                kind: s(4)?,
                detail: s(5)?,
            },
            types::BODY_LOG => Self::BodyLog {
                node_id: s(1)?,
                boot_epoch: u(2)?,
                seq: u(3)?,
                tenant_id: s(4)?,
                request_id: s(5)?,
                meta: s(6)?,
                request: b(7)?,
                response: b(8)?,
            },
            types::BODY_LOG_ACK => Self::BodyLogAck {
                boot_epoch: u(1)?,
                seq: u(2)?,
            },
            types::BODY_LOG_TENANTS => Self::BodyLogTenants {
                off: strings(1)?,
                refuse: strings(2)?,
            },
            _ => return Ok(None),
        }))
    }
}
