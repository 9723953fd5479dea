//! Usage the nodes report, and the analytics read from it.
//!
//! A node numbers each report (its boot epoch, a sequence) once and resends it until it is
//! acknowledged; the store applies a report and records its number in one transaction, so a
//! report resent after a lost acknowledgement is recognised and not counted twice. Figures
//! are kept per (UTC day, key, model) with the key's tenant and sub-account as they were
//! when the report arrived; latency and time to first byte are mergeable sketches, so
//! percentiles over any grouping are computed from the merged sketches, never averaged.

use std::collections::BTreeMap;

use aigw_wire::sketch::Sketch;
use aigw_wire::UsageEntry;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{now, Store, StoreError};

/// How long the store remembers the numbers of the reports it applied. A report resent
/// later than this (a node buffering through a longer outage) would be counted again.
pub const REPORT_MEMORY_DAYS: i64 = 35;
/// Longest range one usage query may cover, in days.
pub const MAX_QUERY_DAYS: u64 = 400;

/// Unix epoch as a Julian day number.
const UNIX_EPOCH_JULIAN_DAY: i64 = 2_440_588;

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn sketch(bytes: &[u8]) -> Result<Sketch, StoreError> {
    Sketch::decode(bytes).map_err(|e| StoreError::Invalid(format!("stored latency sketch: {e}")))
}

/// Records that a node's report (usage or event) numbered (`boot_epoch`, `seq`) is being
/// applied: false when it was applied before. Usage and events share the numbering.
fn first_time(
    tx: &super::Tx<'_>,
    node_id: &str,
    boot_epoch: u64,
    seq: u64,
) -> Result<bool, StoreError> {
    let fresh = tx.execute(
        "INSERT OR IGNORE INTO usage_reports (node_id, boot_epoch, seq, received_at) VALUES (?1, ?2, ?3, ?4)",
        params![node_id, n(boot_epoch), n(seq), now()],
    )?;
    Ok(fresh != 0)
}

/// A node saw one of our keys in traffic: when the key and its hash match the store, the
/// key is marked leaked (once) and audited, and revoked at once when its environment's
/// policy says so. A report that does not match (a key of another installation, a made-up
/// one) changes nothing but the event's own audit record.
fn leaked(
    tx: &super::Tx<'_>,
    actor: &super::Actor,
    detail: &serde_json::Value,
) -> Result<(), StoreError> {
    let (Some(key_id), Some(sha)) = (
        detail["leaked_key_id"].as_str(),
        detail["leaked_key_sha256"].as_str(),
    ) else {
        return Ok(());
    };
    let row: Option<(String, String, Vec<u8>, String, i64)> = tx
        .query_row(
            "SELECT tenant_id, environment, hash, status, leaked_at FROM api_keys WHERE key_id = ?1",
            params![key_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((tenant, environment, hash, status, leaked_at)) = row else {
        return Ok(());
    };
    let stored: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        stored.as_bytes(),
        sha.as_bytes(),
    )) {
        return Ok(());
    }
    if leaked_at == 0 {
        tx.execute(
            "UPDATE api_keys SET leaked_at = ?2 WHERE key_id = ?1",
            params![key_id, now()],
        )?;
        super::audit(
            tx,
            actor,
            "key.leak_confirmed",
            key_id,
            serde_json::json!({"tenant_id": tenant, "environment": environment}),
        )?;
    }
    let revoke: bool = tx
        .query_row(
            "SELECT revoke_leaked_keys FROM policies WHERE tenant_id = ?1 AND environment = ?2",
            params![tenant, environment],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some_and(|v| v != 0);
    if revoke && status == "active" {
        tx.execute(
            "UPDATE api_keys SET status = 'revoked', revoked_at = ?2 WHERE key_id = ?1",
            params![key_id, now()],
        )?;
        super::change(tx, "key", key_id, "upsert")?;
        super::audit(
            tx,
            actor,
            "key.revoke",
            key_id,
            serde_json::json!({"reason": "leaked", "policy": "revoke_leaked_keys"}),
        )?;
    }
    Ok(())
}

/// Usage fields a tenant may have dropped before its usage is stored: dimensions (stored
/// empty, so usage of every key / model / sub-account is merged) and measures (not
/// stored). Requests, input and output tokens and cost stay: they are what is billed and
/// what spend caps count.
pub(super) const DROPPABLE: [&str; 8] = [
    "key_id",
    "model",
    "sub_account_id",
    "latency",
    "ttfb",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
];

/// The bit of a droppable field in a stored row's `dropped` mask.
fn drop_bit(field: &str) -> i64 {
    DROPPABLE
        .iter()
        .position(|f| *f == field)
        .map_or(0, |i| 1 << i)
}

/// Checks an operator's list of fields to drop; the mask it stands for.
pub(super) fn drop_mask(fields: &[String]) -> Result<i64, StoreError> {
    let mut mask = 0;
    for f in fields {
        let bit = drop_bit(f);
        if bit == 0 {
            return Err(StoreError::Invalid(format!(
                "drop: {f:?} is not a field that can be dropped (one of {})",
                DROPPABLE.join(", ")
            )));
        }
        mask |= bit;
    }
    Ok(mask)
}

/// The field names of a mask, in [`DROPPABLE`]'s order.
pub(super) fn dropped_fields(mask: i64) -> Vec<&'static str> {
    DROPPABLE
        .iter()
        .filter(|f| mask & drop_bit(f) != 0)
        .copied()
        .collect()
}

/// A dimension usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Day,
    Key,
    Model,
    SubAccount,
}

impl Dim {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "key" => Self::Key,
            "model" => Self::Model,
            "sub_account" => Self::SubAccount,
            _ => return None,
        })
    }

    fn field(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Key => "key_id",
            Self::Model => "model",
            Self::SubAccount => "sub_account_id",
        }
    }
}

/// Which usage to read: days `from..=to` (days since 1970-01-01 UTC), optionally one
/// sub-account's subtree, one key or one model, grouped by some dimensions (none: one
/// total).
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub from_day: u64,
    pub to_day: u64,
    pub group_by: Vec<Dim>,
    pub sub_account: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
}

/// Latency percentiles, milliseconds (within 2% of the true value).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Quantiles {
    fn of(s: &Sketch) -> Self {
        let ms = |q| s.quantile(q).map(|us| us as f64 / 1000.0);
        Self {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
        }
    }
}

/// One group's figures.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRow {
    /// The group's values, by dimension (`day`, `key_id`, `model`, `sub_account_id`); a
    /// dimension the tenant drops is absent.
    #[serde(flatten)]
    pub group: BTreeMap<&'static str, Option<String>>,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Absent when the tenant drops the field (for every day in the group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// Requests whose tokens were estimated (the provider never reported them).
    pub estimated_requests: u64,
    /// From the prices held when the usage arrived.
    pub cost_usd: f64,
    /// Requests of models with no price (global or the tenant's) when they arrived: not in
    /// `cost_usd`.
    pub unpriced_requests: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Quantiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<Quantiles>,
}

/// `YYYY-MM-DD` for a day number.
pub fn day_name(day: u64) -> String {
    match time::Date::from_julian_day(
        i32::try_from(n(day) + UNIX_EPOCH_JULIAN_DAY).unwrap_or(i32::MAX),
    ) {
        Ok(d) => format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day()),
        Err(_) => day.to_string(),
    }
}

/// The day number of `YYYY-MM-DD`.
pub fn parse_day(s: &str) -> Option<u64> {
    let mut parts = s.splitn(3, '-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: u8 = parts.next()?.parse().ok()?;
    let d: u8 = parts.next()?.parse().ok()?;
    let date = time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()?;
    u64::try_from(i64::from(date.to_julian_day()) - UNIX_EPOCH_JULIAN_DAY).ok()
}

struct Agg {
    counts: [u64; 10],
    latency: Sketch,
    ttfb: Sketch,
    /// Fields dropped in every row of the group.
    dropped: i64,
}

impl Default for Agg {
    fn default() -> Self {
        Self {
            counts: [0; 10],
            latency: Sketch::default(),
            ttfb: Sketch::default(),
            dropped: !0,
        }
    }
}

impl Store {
    /// Applies a node's usage report once. `Ok(true)`: applied now; `Ok(false)`: it had
    /// been applied before (a resend), and nothing changed. Entries for a key the store
    /// does not hold, or outside the node's scope (a node cannot bill a tenant it does not
    /// serve), are logged and skipped.
    pub fn record_usage(
        &self,
        node_id: &str,
        scope: &super::NodeScope,
        boot_epoch: u64,
        seq: u64,
        entries: &[UsageEntry],
    ) -> Result<bool, StoreError> {
        self.with_tx(|tx| {
            if !first_time(tx, node_id, boot_epoch, seq)? {
                return Ok(false);
            }
            let mut owner = tx.prepare_cached(
                "SELECT k.tenant_id, k.sub_account_id, k.environment, t.usage_dropped
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_id = ?1",
            )?;
            let mut held = tx.prepare_cached(
                "SELECT latency, ttfb FROM usage_daily WHERE day = ?1 AND key_id = ?2 AND model = ?3",
            )?;
            let mut upsert = tx.prepare_cached(
                "INSERT INTO usage_daily (day, key_id, model, tenant_id, sub_account_id, requests, errors,
                    input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens,
                    estimated_requests, cost_micros, latency, ttfb, unpriced_requests, dropped)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
                 ON CONFLICT (day, key_id, model) DO UPDATE SET
                    dropped = dropped & excluded.dropped,
                    requests = requests + excluded.requests,
                    errors = errors + excluded.errors,
                    input_tokens = input_tokens + excluded.input_tokens,
                    output_tokens = output_tokens + excluded.output_tokens,
                    cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
                    cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
                    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
                    estimated_requests = estimated_requests + excluded.estimated_requests,
                    cost_micros = cost_micros + excluded.cost_micros,
                    unpriced_requests = unpriced_requests + excluded.unpriced_requests,
                    latency = excluded.latency,
                    ttfb = excluded.ttfb",
            )?;
            for e in entries {
                let Some((tenant, sub_account, environment, dropped)) = owner
                    .query_row(params![e.key_id], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .optional()?
                else {
                    tracing::warn!(node = node_id, key_id = %e.key_id, "usage reported for a key this store does not hold; skipped");
                    continue;
                };
                if !scope.covers(&tenant, &environment) {
                    tracing::warn!(node = node_id, key_id = %e.key_id, "usage reported for a key outside the node's scope; skipped");
                    continue;
                }
                // Cost from the prices the control plane holds now (the tenant's, else the
                // global one); a model without a price costs nothing and says so.
                let (cost, unpriced) = match super::prices::rates(tx, &tenant, &e.model)? {
                    Some(r) => (r.cost_micros(e), 0),
                    None => (0, e.requests),
                };
                // What the tenant drops is not stored: dimensions are stored empty (merging
                // every key's, model's or sub-account's usage), measures as nothing.
                let gone = |f| dropped & drop_bit(f) != 0;
                let key_id = if gone("key_id") { "" } else { e.key_id.as_str() };
                let model = if gone("model") { "" } else { e.model.as_str() };
                let sub_account = if gone("sub_account_id") { None } else { sub_account };
                let measure = |f, v: u64| if gone(f) { 0 } else { v };
                let (mut latency, mut ttfb) = (
                    if gone("latency") { Sketch::default() } else { e.latency.clone() },
                    if gone("ttfb") { Sketch::default() } else { e.ttfb.clone() },
                );
                if let Some((l, t)) = held
                    .query_row(params![n(e.day), key_id, model], |r| {
                        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })
                    .optional()?
                {
                    latency.merge(&sketch(&l)?);
                    ttfb.merge(&sketch(&t)?);
                }
                upsert.execute(params![
                    n(e.day),
                    key_id,
                    model,
                    tenant,
                    sub_account,
                    n(e.requests),
                    n(e.errors),
                    n(e.input_tokens),
                    n(e.output_tokens),
                    n(measure("cached_input_tokens", e.cached_input_tokens)),
                    n(measure("cache_write_tokens", e.cache_write_tokens)),
                    n(measure("reasoning_tokens", e.reasoning_tokens)),
                    n(e.estimated_requests),
                    n(cost),
                    latency.to_bytes(),
                    ttfb.to_bytes(),
                    n(unpriced),
                    dropped,
                ])?;
            }
            tx.execute(
                "DELETE FROM usage_reports WHERE received_at < ?1",
                params![now() - REPORT_MEMORY_DAYS * 86_400],
            )?;
            Ok(true)
        })
    }

    /// Writes a node's event (a guardrail block…) to the audit log once: `Ok(false)` when it
    /// was written before (a resend). An event naming a tenant environment outside the
    /// node's scope is refused.
    pub fn record_event(
        &self,
        node_id: &str,
        scope: &super::NodeScope,
        boot_epoch: u64,
        seq: u64,
        kind: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let detail: serde_json::Value = serde_json::from_str(detail)
            .map_err(|e| StoreError::Invalid(format!("event detail is not JSON: {e}")))?;
        let tenant = detail["tenant_id"].as_str().unwrap_or("");
        let environment = detail["environment"].as_str().unwrap_or("");
        if !scope.covers(tenant, environment) {
            return Err(StoreError::Invalid(format!(
                "event for {tenant}/{environment}, outside node {node_id}'s scope"
            )));
        }
        self.with_tx(|tx| {
            if !first_time(tx, node_id, boot_epoch, seq)? {
                return Ok(false);
            }
            let actor = super::Actor {
                principal: format!("node:{node_id}"),
                source: node_id.to_string(),
            };
            let target = detail["key_id"].as_str().unwrap_or("").to_string();
            super::audit(tx, &actor, kind, &target, detail.clone())?;
            if kind == "key.leaked" {
                leaked(tx, &actor, &detail)?;
            }
            Ok(true)
        })
    }

    /// Sets the usage fields a tenant has dropped before its usage is stored (from now on;
    /// what was stored stays). Audited.
    pub fn set_usage_dropped(
        &self,
        actor: &super::Actor,
        tenant_id: &str,
        fields: &[String],
    ) -> Result<Vec<&'static str>, StoreError> {
        let mask = drop_mask(fields)?;
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE tenants SET usage_dropped = ?2 WHERE id = ?1",
                params![tenant_id, mask],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("tenant"));
            }
            let dropped = dropped_fields(mask);
            super::audit(
                tx,
                actor,
                "tenant.usage_dropped",
                tenant_id,
                serde_json::json!({ "drop": dropped }),
            )?;
            Ok(dropped)
        })
    }

    /// The usage fields a tenant drops.
    pub fn usage_dropped(&self, tenant_id: &str) -> Result<Vec<&'static str>, StoreError> {
        self.read(|c| {
            let mask: i64 = c
                .query_row(
                    "SELECT usage_dropped FROM tenants WHERE id = ?1",
                    params![tenant_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or(StoreError::NotFound("tenant"))?;
            Ok(dropped_fields(mask))
        })
    }

    /// A tenant's usage, grouped as asked, groups in order.
    pub fn usage(&self, tenant_id: &str, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        if q.to_day < q.from_day {
            return Err(StoreError::Invalid("to: must not be before from".into()));
        }
        if q.to_day - q.from_day >= MAX_QUERY_DAYS {
            return Err(StoreError::Invalid(format!(
                "from, to: at most {MAX_QUERY_DAYS} days at once"
            )));
        }
        self.read(|c| {
            let tenant: Option<String> = c
                .query_row("SELECT id FROM tenants WHERE id = ?1", params![tenant_id], |r| r.get(0))
                .optional()?;
            if tenant.is_none() {
                return Err(StoreError::NotFound("tenant"));
            }
            // A sub-account's analytics cover its whole subtree.
            let subtree: Option<Vec<String>> = match &q.sub_account {
                None => None,
                Some(root) => {
                    let mut stmt = c.prepare(
                        "WITH RECURSIVE tree(id) AS (
                            SELECT id FROM sub_accounts WHERE id = ?1 AND tenant_id = ?2
                            UNION ALL
                            SELECT s.id FROM sub_accounts s JOIN tree t ON s.parent_id = t.id)
                         SELECT id FROM tree",
                    )?;
                    let ids = stmt
                        .query_map(params![root, tenant_id], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    if ids.is_empty() {
                        return Err(StoreError::NotFound("sub-account"));
                    }
                    Some(ids)
                }
            };
            let mut stmt = c.prepare(
                "SELECT day, key_id, model, sub_account_id, requests, errors, input_tokens, output_tokens,
                        cached_input_tokens, cache_write_tokens, reasoning_tokens, estimated_requests,
                        cost_micros, unpriced_requests, latency, ttfb, dropped
                 FROM usage_daily WHERE tenant_id = ?1 AND day BETWEEN ?2 AND ?3",
            )?;
            let mut rows = stmt.query(params![tenant_id, n(q.from_day), n(q.to_day)])?;
            let mut groups: BTreeMap<Vec<Option<Option<String>>>, Agg> = BTreeMap::new();
            while let Some(r) = rows.next()? {
                let day: i64 = r.get(0)?;
                let key_id: String = r.get(1)?;
                let model: String = r.get(2)?;
                let sub_account: Option<String> = r.get(3)?;
                let dropped: i64 = r.get(16)?;
                if let Some(tree) = &subtree {
                    if !sub_account.as_ref().is_some_and(|s| tree.contains(s)) {
                        continue;
                    }
                }
                if q.key_id.as_ref().is_some_and(|k| *k != key_id)
                    || q.model.as_ref().is_some_and(|m| *m != model)
                {
                    continue;
                }
                // Outer `None`: the dimension was dropped (absent from the answer).
                let group: Vec<Option<Option<String>>> = q
                    .group_by
                    .iter()
                    .map(|d| {
                        if dropped & drop_bit(d.field()) != 0 {
                            return None;
                        }
                        Some(match d {
                            Dim::Day => Some(day_name(u64::try_from(day).unwrap_or(0))),
                            Dim::Key => Some(key_id.clone()),
                            Dim::Model => Some(model.clone()),
                            Dim::SubAccount => sub_account.clone(),
                        })
                    })
                    .collect();
                let agg = groups.entry(group).or_default();
                agg.dropped &= dropped;
                for (i, c) in agg.counts.iter_mut().enumerate() {
                    *c += u64::try_from(r.get::<_, i64>(4 + i)?).unwrap_or(0);
                }
                agg.latency.merge(&sketch(&r.get::<_, Vec<u8>>(14)?)?);
                agg.ttfb.merge(&sketch(&r.get::<_, Vec<u8>>(15)?)?);
            }
            Ok(groups
                .into_iter()
                .map(|(values, a)| {
                    let [requests, errors, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, estimated_requests, cost_micros, unpriced_requests] =
                        a.counts;
                    let kept = |f: &str| a.dropped & drop_bit(f) == 0;
                    UsageRow {
                        group: q
                            .group_by
                            .iter()
                            .map(|d| d.field())
                            .zip(values)
                            .filter_map(|(f, v)| Some((f, v?)))
                            .collect(),
                        requests,
                        errors,
                        input_tokens,
                        output_tokens,
                        cached_input_tokens: kept("cached_input_tokens")
                            .then_some(cached_input_tokens),
                        cache_write_tokens: kept("cache_write_tokens").then_some(cache_write_tokens),
                        reasoning_tokens: kept("reasoning_tokens").then_some(reasoning_tokens),
                        estimated_requests,
                        cost_usd: cost_micros as f64 / 1e6,
                        unpriced_requests,
                        latency_ms: kept("latency").then(|| Quantiles::of(&a.latency)),
                        ttfb_ms: kept("ttfb").then(|| Quantiles::of(&a.ttfb)),
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{actor, kek, temp};
    use crate::store::NewKey;

    fn key(s: &Store, id: &str, sub_account: Option<&str>) {
        s.insert_key(
            &actor(),
            &NewKey {
                key_id: id.into(),
                tenant_id: "t".into(),
                environment: aigw_wire::keys::Environment::Production,
                sub_account_id: sub_account.map(Into::into),
                name: id.into(),
                hash: [7; 32],
                allowed_models: vec![],
                expires_at: 0,
            },
        )
        .expect("key");
    }

    fn entry(key: &str, model: &str, day: u64, requests: u64, latency_ms: u64) -> UsageEntry {
        let mut e = UsageEntry {
            key_id: key.into(),
            model: model.into(),
            day,
            requests,
            input_tokens: requests * 10,
            output_tokens: requests * 3,
            ..UsageEntry::default()
        };
        for _ in 0..requests {
            e.latency.record(latency_ms * 1000);
        }
        e
    }

    #[test]
    fn a_report_counts_once_and_sub_accounts_cover_their_subtree() {
        let dir = temp();
        let s = Store::open(&dir, kek()).expect("opens");
        s.create_tenant(&actor(), "t", "T", "pro").expect("tenant");
        s.create_sub_account(&actor(), "team", "t", None, "team")
            .expect("sa");
        s.create_sub_account(&actor(), "squad", "t", Some("team"), "squad")
            .expect("sa");
        s.create_sub_account(&actor(), "other", "t", None, "other")
            .expect("sa");
        key(&s, "k_top", None);
        key(&s, "k_squad", Some("squad"));
        key(&s, "k_other", Some("other"));
        let day = 20_000;
        let all_scope = crate::store::NodeScope::default();
        let staging_only = crate::store::NodeScope {
            environments: vec!["staging".into()],
            tenants: vec![],
        };
        assert!(s
            .record_usage(
                "n0",
                &staging_only,
                1,
                1,
                &[entry("k_top", "gpt", day, 50, 1)]
            )
            .expect("applied"));
        let price = |model: &str, tenant: Option<&str>, input: f64, output: f64| {
            s.put_price(
                &actor(),
                &crate::store::PriceSpec {
                    model: model.into(),
                    tenant_id: tenant.map(Into::into),
                    input_per_mtok: input,
                    output_per_mtok: output,
                    cached_input_per_mtok: None,
                    cache_write_per_mtok: None,
                },
            )
            .expect("price")
        };
        price("gpt", None, 100.0, 1000.0);
        price("claude", None, 1.0, 1.0);
        price("claude", Some("t"), 200.0, 0.0);
        assert!(s
            .put_price(
                &actor(),
                &crate::store::PriceSpec {
                    model: "x".into(),
                    tenant_id: None,
                    input_per_mtok: -1.0,
                    output_per_mtok: 0.0,
                    cached_input_per_mtok: None,
                    cache_write_per_mtok: None
                }
            )
            .is_err_and(|e| e.to_string().contains("input_per_mtok")));
        let report = [
            entry("k_top", "mystery", day, 1, 100),
            entry("k_top", "gpt", day, 2, 100),
            entry("k_squad", "gpt", day, 3, 200),
            entry("k_other", "claude", day + 1, 5, 400),
            entry("k_unknown", "gpt", day, 9, 1),
        ];
        assert!(s
            .record_usage("n1", &all_scope, 1, 1, &report)
            .expect("applied"));
        assert!(
            !s.record_usage("n1", &all_scope, 1, 1, &report)
                .expect("resend"),
            "a resend is recognised"
        );
        // The same numbers from another node, or another boot, are other reports.
        assert!(s
            .record_usage("n1", &all_scope, 2, 1, &report[2..3])
            .expect("applied"));
        let all = |group_by: Vec<Dim>, sub_account: Option<&str>| {
            s.usage(
                "t",
                &UsageQuery {
                    from_day: day,
                    to_day: day + 1,
                    group_by,
                    sub_account: sub_account.map(Into::into),
                    key_id: None,
                    model: None,
                },
            )
            .expect("usage")
        };
        let total = all(vec![], None);
        assert_eq!(total.len(), 1);
        assert_eq!(
            total[0].requests,
            1 + 2 + 3 + 3 + 5,
            "the resend was not counted, the unknown key and the out-of-scope node skipped"
        );
        assert_eq!(total[0].input_tokens, 140);
        // gpt: 80 input × $100/M + 24 output × $1000/M; claude at the tenant's price:
        // 50 × $200/M; the unpriced model is counted apart.
        assert!(
            (total[0].cost_usd - 0.042).abs() < 1e-9,
            "{}",
            total[0].cost_usd
        );
        assert_eq!(total[0].unpriced_requests, 1);
        let by_model = all(vec![Dim::Model], None);
        assert_eq!(by_model.len(), 3);
        assert_eq!(by_model[0].group["model"].as_deref(), Some("claude"));
        let p50 = by_model[1]
            .latency_ms
            .as_ref()
            .expect("latency kept")
            .p50
            .expect("p50");
        assert!((p50 - 200.0).abs() <= 200.0 * 0.02, "{p50}");
        // The team's analytics include its squad; not the other sub-account, nor keys
        // outside any.
        let team = all(vec![Dim::SubAccount, Dim::Day], Some("team"));
        assert_eq!(team.len(), 1);
        assert_eq!(team[0].requests, 6);
        assert_eq!(team[0].group["sub_account_id"].as_deref(), Some("squad"));
        assert_eq!(
            team[0].group["day"].as_deref(),
            Some(day_name(day).as_str())
        );
        assert!(matches!(
            s.usage(
                "t",
                &UsageQuery {
                    from_day: day,
                    to_day: day,
                    group_by: vec![],
                    sub_account: Some("nope".into()),
                    key_id: None,
                    model: None
                }
            ),
            Err(StoreError::NotFound("sub-account"))
        ));
        assert!(matches!(
            s.usage(
                "t",
                &UsageQuery {
                    from_day: day,
                    to_day: day - 1,
                    group_by: vec![],
                    sub_account: None,
                    key_id: None,
                    model: None
                }
            ),
            Err(StoreError::Invalid(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn days_name_and_parse_both_ways() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(parse_day("2026-12-05"), Some(20_792));
        assert_eq!(day_name(20_792), "2026-12-05");
        assert_eq!(parse_day("2024-02-30"), None);
        assert_eq!(parse_day("yesterday"), None);
    }
}
