//! Spend caps, and the leases of their budgets to nodes.
//!
//! A cap is a bound, not a target: nodes forward a capped request only after reserving its
//! maximum cost from budget this store leased them, and the leases of a cap's period never
//! add up to more than its limit (each grant is decided in one transaction). What nodes
//! spend is therefore at most what they were leased, whatever their number or the timing
//! of their reports. A node that stops in an orderly way gives back what it holds unspent;
//! one that crashes strands its unspent lease until the period ends (under-use, never
//! overshoot).

use aigw_wire::{CapPeriod, CapRecord, CapScope, LimitRecord, PriceRecord};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{audit, change, now, Actor, RateLimitsView, Store, StoreError};

/// A cap as an operator sets it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapSpec {
    /// `tenant`, `sub_account` or `key`.
    pub scope: String,
    /// The sub-account or key id (absent for a tenant cap).
    #[serde(default)]
    pub id: Option<String>,
    /// `day` (UTC), `month` (UTC) or `lifetime`.
    pub period: String,
    /// US dollars per period.
    pub limit_usd: f64,
}

/// A cap as the API shows it, with where its current period stands.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cap {
    pub id: String,
    pub tenant_id: String,
    pub scope: String,
    pub scope_id: String,
    pub period: String,
    pub limit_usd: f64,
    /// The current period's first day (`YYYY-MM-DD`, UTC; lifetime caps: `1970-01-01`).
    pub period_start: String,
    /// What nodes reported spending in the current period (as priced when reported);
    /// absent when the tenant drops the usage field that tells whose spend it was
    /// (`key_id` for a key's cap, `sub_account_id` for a sub-account's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_usd: Option<f64>,
    /// Budget leased to nodes for the current period: the most they can spend in it.
    pub leased_usd: f64,
    pub updated_at: i64,
}

/// Highest cap accepted, US dollars.
const MAX_LIMIT_USD: f64 = 1e9;

/// The id of the cap on `scope_id` of this kind and period.
pub fn cap_id(scope: CapScope, scope_id: &str, period: CapPeriod) -> String {
    format!("{}:{scope_id}:{}", scope.name(), period.name())
}

fn usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

/// The current period of `period`, by this host's clock.
fn current(period: CapPeriod) -> u64 {
    period.index(now().max(0) as u64)
}

fn day_text(days: u64) -> String {
    let secs = i64::try_from(days * 86_400).unwrap_or(0);
    chrono_like_date(secs)
}

/// `YYYY-MM-DD` of Unix seconds, UTC.
fn chrono_like_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400) as u64;
    // The day's month and year from the wire crate's period arithmetic.
    let month = CapPeriod::Month.index(days * 86_400);
    let (first, _) = CapPeriod::Month.days(month);
    format!(
        "{:04}-{:02}-{:02}",
        1970 + month / 12,
        month % 12 + 1,
        days - first + 1
    )
}

fn cap_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CapRecord> {
    let scope: String = r.get(2)?;
    let period: String = r.get(4)?;
    Ok(CapRecord {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        scope: CapScope::from_name(&scope).unwrap_or(CapScope::Tenant),
        scope_id: r.get(3)?,
        period: CapPeriod::from_name(&period).unwrap_or(CapPeriod::Lifetime),
        limit_micros: r.get::<_, i64>(5)?.max(0) as u64,
    })
}

const CAP_SELECT: &str =
    "SELECT id, tenant_id, scope, scope_id, period, limit_micros, updated_at FROM spend_caps";

/// The rows `sql` selects, each read by `row`: all of them, or with `one` (a condition
/// appended to `sql`, and its parameters) the one it names.
fn records<T>(
    c: &Connection,
    sql: &str,
    one: Option<(&str, &[&dyn rusqlite::ToSql])>,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let out = match one {
        None => c
            .prepare(sql)?
            .query_map([], row)?
            .collect::<Result<_, _>>()?,
        Some((condition, values)) => c
            .prepare(&format!("{sql} {condition}"))?
            .query_map(values, row)?
            .collect::<Result<_, _>>()?,
    };
    Ok(out)
}

/// Caps as nodes hold them: all, or the one with this id.
pub(super) fn cap_records(c: &Connection, id: Option<&str>) -> Result<Vec<CapRecord>, StoreError> {
    match id {
        None => records(c, CAP_SELECT, None, cap_row),
        Some(id) => records(c, CAP_SELECT, Some(("WHERE id = ?1", params![id])), cap_row),
    }
}

/// Prices as nodes hold them: all, or the one with this id (`tenant/model`).
pub(super) fn price_records(
    c: &Connection,
    id: Option<&str>,
) -> Result<Vec<PriceRecord>, StoreError> {
    let sql = "SELECT tenant_id, model, input, output, cached_input, cache_write FROM prices";
    let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<PriceRecord> {
        let tenant_id: String = r.get(0)?;
        let model: String = r.get(1)?;
        let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
        Ok(PriceRecord {
            id: PriceRecord::id_of(&tenant_id, &model),
            tenant_id,
            model,
            input: n(2)?,
            output: n(3)?,
            cached_input: n(4)?,
            cache_write: n(5)?,
        })
    };
    match id.map(|id| id.split_once('/')) {
        None => records(c, sql, None, row),
        Some(None) => Ok(Vec::new()),
        Some(Some((tenant, model))) => records(
            c,
            sql,
            Some((
                "WHERE tenant_id = ?1 AND model = ?2",
                params![tenant, model],
            )),
            row,
        ),
    }
}

/// Sub-accounts' rate limits as nodes hold them: every sub-account with a limit, or the
/// one with this id (`None` when it has none, so nodes drop it).
pub(super) fn limit_records(
    c: &Connection,
    id: Option<&str>,
) -> Result<Vec<LimitRecord>, StoreError> {
    let sql = "SELECT id, tenant_id, requests_per_minute, tokens_per_minute FROM sub_accounts
               WHERE (requests_per_minute > 0 OR tokens_per_minute > 0)";
    let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<LimitRecord> {
        Ok(LimitRecord {
            id: r.get(0)?,
            tenant_id: r.get(1)?,
            requests_per_minute: r.get::<_, i64>(2)?.max(0) as u64,
            tokens_per_minute: r.get::<_, i64>(3)?.max(0) as u64,
        })
    };
    match id {
        None => records(c, sql, None, row),
        Some(id) => records(c, sql, Some(("AND id = ?1", params![id])), row),
    }
}

/// The sub-accounts above `sub_account`, nearest first.
pub(super) fn parents(c: &Connection, sub_account: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut at = sub_account.to_string();
    let mut st = c.prepare_cached("SELECT parent_id FROM sub_accounts WHERE id = ?1")?;
    // Depth is bounded when sub-accounts are created; the bound here only guards the loop.
    for _ in 0..=super::MAX_SUB_ACCOUNT_DEPTH {
        let parent: Option<String> = st
            .query_row(params![at], |r| r.get(0))
            .optional()?
            .flatten();
        match parent {
            Some(p) => {
                out.push(p.clone());
                at = p;
            }
            None => break,
        }
    }
    Ok(out)
}

/// What a cap's scope spent over the days `[from, to)`, as reported and priced.
fn spent(c: &Connection, cap: &CapRecord, from: u64, to: Option<u64>) -> Result<i64, StoreError> {
    let to = to.map_or(i64::MAX, |d| d as i64);
    let from = from as i64;
    let sum: Option<i64> = match cap.scope {
        CapScope::Tenant => c.query_row(
            "SELECT SUM(cost_micros) FROM usage_daily WHERE tenant_id = ?1 AND day >= ?2 AND day < ?3",
            params![cap.scope_id, from, to],
            |r| r.get(0),
        )?,
        CapScope::Key => c.query_row(
            "SELECT SUM(cost_micros) FROM usage_daily WHERE key_id = ?1 AND day >= ?2 AND day < ?3",
            params![cap.scope_id, from, to],
            |r| r.get(0),
        )?,
        CapScope::SubAccount => c.query_row(
            "WITH RECURSIVE tree(id) AS (
                 SELECT ?1 UNION ALL SELECT s.id FROM sub_accounts s JOIN tree ON s.parent_id = tree.id
             )
             SELECT SUM(cost_micros) FROM usage_daily
             WHERE sub_account_id IN (SELECT id FROM tree) AND day >= ?2 AND day < ?3",
            params![cap.scope_id, from, to],
            |r| r.get(0),
        )?,
    };
    Ok(sum.unwrap_or(0))
}

/// Whether the tenant drops the usage field a cap's spend is found by.
fn unattributed(c: &Connection, cap: &CapRecord) -> Result<bool, StoreError> {
    let field = match cap.scope {
        CapScope::Tenant => return Ok(false),
        CapScope::Key => "key_id",
        CapScope::SubAccount => "sub_account_id",
    };
    let mask: i64 = c
        .query_row(
            "SELECT usage_dropped FROM tenants WHERE id = ?1",
            params![cap.tenant_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(super::usage::dropped_fields(mask).contains(&field))
}

fn view(c: &Connection, cap: &CapRecord, updated_at: i64) -> Result<Cap, StoreError> {
    let period = current(cap.period);
    let (from, to) = cap.period.days(period);
    let leased: Option<i64> = c.query_row(
        "SELECT SUM(granted) FROM cap_leases WHERE cap_id = ?1 AND period = ?2",
        params![cap.id, period as i64],
        |r| r.get(0),
    )?;
    Ok(Cap {
        id: cap.id.clone(),
        tenant_id: cap.tenant_id.clone(),
        scope: cap.scope.name().into(),
        scope_id: cap.scope_id.clone(),
        period: cap.period.name().into(),
        limit_usd: usd(cap.limit_micros as i64),
        period_start: day_text(from),
        spent_usd: if unattributed(c, cap)? {
            None
        } else {
            Some(usd(spent(c, cap, from, to)?))
        },
        leased_usd: usd(leased.unwrap_or(0)),
        updated_at,
    })
}

impl Store {
    /// Sets a cap (audited); nodes hear of it with the next push.
    pub fn put_cap(&self, actor: &Actor, tenant: &str, spec: &CapSpec) -> Result<Cap, StoreError> {
        let scope = CapScope::from_name(&spec.scope).ok_or_else(|| {
            StoreError::Invalid("scope: one of \"tenant\", \"sub_account\", \"key\"".into())
        })?;
        let period = CapPeriod::from_name(&spec.period).ok_or_else(|| {
            StoreError::Invalid("period: one of \"day\", \"month\", \"lifetime\"".into())
        })?;
        if !spec.limit_usd.is_finite() || !(0.0..=MAX_LIMIT_USD).contains(&spec.limit_usd) {
            return Err(StoreError::Invalid(format!(
                "limit_usd: a number of US dollars from 0 to {MAX_LIMIT_USD}"
            )));
        }
        let limit = (spec.limit_usd * 1e6).round() as i64;
        self.with_tx(|tx| {
            super::tenant_exists(tx, tenant)?;
            let scope_id = match (scope, spec.id.as_deref()) {
                (CapScope::Tenant, None) => tenant.to_string(),
                (CapScope::Tenant, Some(id)) if id == tenant => tenant.to_string(),
                (CapScope::Tenant, Some(_)) => {
                    return Err(StoreError::Invalid(
                        "id: a tenant cap covers the tenant in the path; leave id out".into(),
                    ))
                }
                (_, None) => {
                    return Err(StoreError::Invalid(format!(
                        "id: the {} the cap covers is required",
                        if scope == CapScope::Key { "key" } else { "sub-account" }
                    )))
                }
                (CapScope::SubAccount, Some(id)) => {
                    let owner: Option<String> = tx
                        .query_row(
                            "SELECT tenant_id FROM sub_accounts WHERE id = ?1",
                            params![id],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if owner.as_deref() != Some(tenant) {
                        return Err(StoreError::Invalid(
                            "id: no such sub-account in this tenant".into(),
                        ));
                    }
                    id.to_string()
                }
                (CapScope::Key, Some(id)) => {
                    let owner: Option<String> = tx
                        .query_row(
                            "SELECT tenant_id FROM api_keys WHERE key_id = ?1",
                            params![id],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if owner.as_deref() != Some(tenant) {
                        return Err(StoreError::Invalid("id: no such key in this tenant".into()));
                    }
                    id.to_string()
                }
            };
            let id = cap_id(scope, &scope_id, period);
            let at = now();
            tx.execute(
                "INSERT INTO spend_caps (id, tenant_id, scope, scope_id, period, limit_micros, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET limit_micros = excluded.limit_micros, updated_at = excluded.updated_at",
                params![id, tenant, scope.name(), scope_id, period.name(), limit, at],
            )?;
            change(tx, "cap", &id, "upsert")?;
            audit(
                tx,
                actor,
                "spend_cap.put",
                &id,
                serde_json::json!({"tenant_id": tenant, "limit_usd": usd(limit)}),
            )?;
            let rec = cap_records(tx, Some(&id))?
                .pop()
                .ok_or(StoreError::NotFound("spend cap"))?;
            view(tx, &rec, at)
        })
    }

    /// A tenant's caps, with their current periods' spend and leases.
    /// Sets a sub-account's rate limits, which cover every key in its subtree (audited;
    /// pushed to every node of the tenant; 0 is no limit).
    pub fn set_sub_account_rate_limits(
        &self,
        actor: &Actor,
        tenant: &str,
        sub_account: &str,
        limits: super::RateLimitsView,
    ) -> Result<super::RateLimitsView, StoreError> {
        limits.check()?;
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE sub_accounts SET requests_per_minute = ?3, tokens_per_minute = ?4
                 WHERE id = ?1 AND tenant_id = ?2",
                params![
                    sub_account,
                    tenant,
                    limits.requests_per_minute as i64,
                    limits.tokens_per_minute as i64
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("sub-account"));
            }
            let none = limits.requests_per_minute == 0 && limits.tokens_per_minute == 0;
            change(
                tx,
                "limit",
                sub_account,
                if none { "delete" } else { "upsert" },
            )?;
            audit(
                tx,
                actor,
                "sub_account.rate_limits",
                sub_account,
                serde_json::json!({
                    "tenant_id": tenant,
                    "requests_per_minute": limits.requests_per_minute,
                    "tokens_per_minute": limits.tokens_per_minute,
                }),
            )?;
            Ok(limits)
        })
    }

    /// The tenant and rate limits of a limiter as nodes name it: a key id, or
    /// `sub_account/<id>`; `None` when there is no such key or sub-account.
    pub fn limiter_limits(
        &self,
        limiter: &str,
    ) -> Result<Option<(String, RateLimitsView)>, StoreError> {
        let (sql, id) = match limiter.strip_prefix("sub_account/") {
            Some(id) => (
                "SELECT tenant_id, requests_per_minute, tokens_per_minute FROM sub_accounts WHERE id = ?1",
                id,
            ),
            None => (
                "SELECT tenant_id, requests_per_minute, tokens_per_minute FROM api_keys WHERE key_id = ?1",
                limiter,
            ),
        };
        self.read(|c| {
            let row = c
                .query_row(sql, params![id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .optional()?;
            Ok(row.map(|(tenant, rpm, tpm)| {
                (
                    tenant,
                    RateLimitsView {
                        requests_per_minute: rpm.max(0) as u64,
                        tokens_per_minute: tpm.max(0) as u64,
                    },
                )
            }))
        })
    }

    pub fn caps(&self, tenant: &str) -> Result<Vec<Cap>, StoreError> {
        self.read(|c| {
            super::tenant_exists(c, tenant)?;
            let mut st = c.prepare(&format!("{CAP_SELECT} WHERE tenant_id = ?1 ORDER BY id"))?;
            let rows = st
                .query_map(params![tenant], |r| Ok((cap_row(r)?, r.get::<_, i64>(6)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows.iter().map(|(rec, at)| view(c, rec, *at)).collect()
        })
    }

    /// Removes a cap (audited); its requests are no longer bounded by it.
    pub fn delete_cap(&self, actor: &Actor, tenant: &str, id: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "DELETE FROM spend_caps WHERE id = ?1 AND tenant_id = ?2",
                params![id, tenant],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("spend cap"));
            }
            tx.execute("DELETE FROM cap_leases WHERE cap_id = ?1", params![id])?;
            change(tx, "cap", id, "delete")?;
            audit(
                tx,
                actor,
                "spend_cap.delete",
                id,
                serde_json::json!({"tenant_id": tenant}),
            )
        })
    }

    /// Leases up to `want` micro-USD of cap `cap_id`'s `period` to `node`: what is left of the
    /// limit after every lease of that period, at most (nothing of a cap of a tenant the
    /// node does not serve). Returns what was granted and whether
    /// nothing is left. A period other than the current one (give or take one, for clocks
    /// near a boundary) gets nothing.
    pub fn lease(
        &self,
        node: &str,
        scope: &super::NodeScope,
        cap_id: &str,
        period: u64,
        want: u64,
    ) -> Result<(u64, bool), StoreError> {
        self.with_tx(|tx| {
            let Some(cap) = cap_records(tx, Some(cap_id))?
                .pop()
                .filter(|c| scope.covers_tenant(&c.tenant_id))
            else {
                return Ok((0, true));
            };
            let now = current(cap.period);
            if period + 1 < now || period > now + 1 {
                return Ok((0, true));
            }
            let leased: Option<i64> = tx.query_row(
                "SELECT SUM(granted) FROM cap_leases WHERE cap_id = ?1 AND period = ?2",
                params![cap_id, period as i64],
                |r| r.get(0),
            )?;
            let left = cap.limit_micros.saturating_sub(leased.unwrap_or(0).max(0) as u64);
            let granted = want.min(left);
            if granted > 0 {
                tx.execute(
                    "INSERT INTO cap_leases (cap_id, period, node_id, granted) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (cap_id, period, node_id) DO UPDATE SET granted = granted + excluded.granted",
                    params![cap_id, period as i64, node, granted as i64],
                )?;
            }
            Ok((granted, left - granted == 0))
        })
    }

    /// Takes back `micros` of what `node` was leased of `cap_id`'s `period` (never more
    /// than it holds).
    pub fn return_lease(
        &self,
        node: &str,
        cap_id: &str,
        period: u64,
        micros: u64,
    ) -> Result<(), StoreError> {
        let micros = i64::try_from(micros).unwrap_or(i64::MAX);
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE cap_leases SET granted = MAX(0, granted - ?4)
                 WHERE cap_id = ?1 AND period = ?2 AND node_id = ?3",
                params![cap_id, period as i64, node, micros],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{actor, kek};

    fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = Store::open(dir.path(), kek()).expect("store");
        s.create_tenant(&actor(), "t", "T", "pro").expect("tenant");
        (s, dir)
    }

    #[test]
    fn leases_never_add_up_to_more_than_the_cap() {
        let (s, _dir) = store();
        let cap = s
            .put_cap(
                &actor(),
                "t",
                &CapSpec {
                    scope: "tenant".into(),
                    id: None,
                    period: "day".into(),
                    limit_usd: 1.0,
                },
            )
            .expect("cap");
        assert_eq!(cap.id, "tenant:t:day");
        let all = crate::store::NodeScope::default();
        let others = crate::store::NodeScope {
            tenants: vec!["u".into()],
            ..Default::default()
        };
        let day0 = current(CapPeriod::Day);
        assert_eq!(s.lease("c", &others, &cap.id, day0, 10).unwrap(), (0, true));
        let day = current(CapPeriod::Day);
        assert_eq!(
            s.lease("a", &all, &cap.id, day, 600_000).unwrap(),
            (600_000, false)
        );
        assert_eq!(
            s.lease("b", &all, &cap.id, day, 600_000).unwrap(),
            (400_000, true)
        );
        assert_eq!(s.lease("a", &all, &cap.id, day, 1).unwrap(), (0, true));
        // Given back, it can be leased again, to anyone.
        s.return_lease("a", &cap.id, day, 250_000).unwrap();
        assert_eq!(
            s.lease("b", &all, &cap.id, day, 1_000_000).unwrap(),
            (250_000, true)
        );
        // Another period starts whole; a period long past gets nothing.
        assert_eq!(
            s.lease("a", &all, &cap.id, day + 1, 10).unwrap(),
            (10, false)
        );
        assert_eq!(s.lease("a", &all, &cap.id, day - 5, 10).unwrap(), (0, true));
        let shown = s.caps("t").unwrap();
        assert_eq!(shown.len(), 1);
        assert!((shown[0].leased_usd - 1.0).abs() < 1e-9, "{shown:?}");
    }

    #[test]
    fn caps_name_what_they_cover_and_bad_fields_are_named() {
        let (s, _dir) = store();
        let spec = |scope: &str, id: Option<&str>, period: &str, usd: f64| CapSpec {
            scope: scope.into(),
            id: id.map(Into::into),
            period: period.into(),
            limit_usd: usd,
        };
        let err = |r: Result<Cap, StoreError>| match r {
            Err(StoreError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            err(s.put_cap(&actor(), "t", &spec("team", None, "day", 1.0))).starts_with("scope")
        );
        assert!(
            err(s.put_cap(&actor(), "t", &spec("tenant", None, "week", 1.0))).starts_with("period")
        );
        assert!(
            err(s.put_cap(&actor(), "t", &spec("tenant", None, "day", -1.0)))
                .starts_with("limit_usd")
        );
        assert!(err(s.put_cap(&actor(), "t", &spec("key", None, "day", 1.0))).starts_with("id"));
        assert!(
            err(s.put_cap(&actor(), "t", &spec("key", Some("nope"), "day", 1.0))).starts_with("id")
        );
        assert!(err(s.put_cap(
            &actor(),
            "t",
            &spec("sub_account", Some("nope"), "day", 1.0)
        ))
        .starts_with("id"));
        assert!(matches!(
            s.delete_cap(&actor(), "t", "tenant:t:day"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(chrono_like_date(0), "1970-01-01");
        assert_eq!(chrono_like_date(1_709_208_000), "2024-02-29");
        assert_eq!(chrono_like_date(1_709_251_200), "2024-03-01");
    }
}
