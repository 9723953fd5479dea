//! The body log's settings and index: per tenant whether bodies are logged, for how long and
//! what a node does when it cannot keep up; per segment its state; per logged request where
//! its record is, so reading one is a seek, not a scan.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{audit, tenant_exists, Actor, Store, StoreError};

/// Longest retention an enterprise tenant may set.
pub(crate) const MAX_RETENTION_DAYS: u32 = 3650;

/// What a node does with a request whose bodies its full queue cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenBehind {
    /// The request is served; its bodies are not logged (counted, and audited).
    #[default]
    Drop,
    /// The request is refused before it is forwarded.
    Refuse,
}

impl WhenBehind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Refuse => "refuse",
        }
    }
}

/// A tenant's body log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BodyLogSettings {
    pub enabled: bool,
    pub retention_days: u32,
    pub when_behind: WhenBehind,
}

/// The longest retention a tier may keep; its default too (`None`: enterprise, no bound
/// below [`MAX_RETENTION_DAYS`], default 30).
pub(crate) fn tier_retention(tier: &str) -> Option<u32> {
    match tier {
        "free" => Some(7),
        "pro" => Some(30),
        _ => None,
    }
}

fn defaults(tier: &str) -> BodyLogSettings {
    BodyLogSettings {
        enabled: true,
        retention_days: tier_retention(tier).unwrap_or(30),
        when_behind: WhenBehind::Drop,
    }
}

/// A segment as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRow {
    pub tenant_id: String,
    pub day: String,
    pub segment_id: String,
    /// `open` (being written), `closed` (its final record written) or `unterminated` (the
    /// control plane stopped without closing it).
    pub state: String,
    pub records: u64,
}

/// A record just appended, to index.
#[derive(Debug, Clone)]
pub struct IndexRow {
    pub segment: SegmentRow,
    pub record_index: u64,
    pub request_id: String,
    pub node_id: String,
    pub boot_epoch: u64,
    pub seq: u64,
}

/// Where a logged request's record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPlace {
    pub segment: SegmentRow,
    pub record_index: u64,
}

/// The tenant's tier; not found when there is no such tenant. (Statements on the body
/// log's path are cached: it runs them for every record.)
fn tier_of(c: &Connection, tenant_id: &str) -> Result<String, StoreError> {
    c.prepare_cached("SELECT tier FROM tenants WHERE id = ?1")?
        .query_row(params![tenant_id], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NotFound("tenant"))
}

fn settings_of(c: &Connection, tenant_id: &str) -> Result<BodyLogSettings, StoreError> {
    let tier = tier_of(c, tenant_id)?;
    let row = c
        .prepare_cached(
            "SELECT enabled, retention_days, when_behind FROM body_log_settings WHERE tenant_id = ?1",
        )?
        .query_row(params![tenant_id], |r| {
            Ok((
                r.get::<_, bool>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?;
    Ok(match row {
        None => defaults(&tier),
        Some((enabled, days, behind)) => BodyLogSettings {
            enabled,
            retention_days: u32::try_from(days).unwrap_or(0),
            when_behind: if behind == "refuse" {
                WhenBehind::Refuse
            } else {
                WhenBehind::Drop
            },
        },
    })
}

/// What [`Store::body_log_checks`] found.
#[derive(Debug, Default)]
pub struct BodyLogChecks {
    /// Tenant → whether it logs bodies; `None`: no such tenant.
    pub enabled: std::collections::HashMap<String, Option<bool>>,
    /// Per record asked about, in order: already in the body log.
    pub logged: Vec<bool>,
}

/// What an operator sends; an absent field keeps its current value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyLogSpec {
    pub enabled: Option<bool>,
    pub retention_days: Option<u32>,
    pub when_behind: Option<WhenBehind>,
}

impl Store {
    /// A tenant's body log settings (its tier's defaults when it set none).
    pub fn body_log_settings(&self, tenant_id: &str) -> Result<BodyLogSettings, StoreError> {
        self.read(|c| settings_of(c, tenant_id))
    }

    /// Every tenant's settings that differ from logging with drop-when-behind: the
    /// tenants opted out, and those refusing when behind.
    pub fn body_log_exceptions(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        self.read(|c| {
            let mut off = Vec::new();
            let mut refuse = Vec::new();
            let mut st = c.prepare(
                "SELECT tenant_id, enabled, when_behind FROM body_log_settings ORDER BY tenant_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                let (t, enabled, behind) = row?;
                if !enabled {
                    off.push(t);
                } else if behind == "refuse" {
                    refuse.push(t);
                }
            }
            Ok((off, refuse))
        })
    }

    /// Sets a tenant's body log settings, within its tier; audited, the opt-out on a line of
    /// its own.
    pub fn set_body_log_settings(
        &self,
        actor: &Actor,
        tenant_id: &str,
        spec: &BodyLogSpec,
    ) -> Result<BodyLogSettings, StoreError> {
        self.with_tx(|tx| {
            let tier = tier_of(tx, tenant_id)?;
            let before = settings_of(tx, tenant_id)?;
            let after = BodyLogSettings {
                enabled: spec.enabled.unwrap_or(before.enabled),
                retention_days: spec.retention_days.unwrap_or(before.retention_days),
                when_behind: spec.when_behind.unwrap_or(before.when_behind),
            };
            let max = tier_retention(&tier).unwrap_or(MAX_RETENTION_DAYS);
            if after.retention_days == 0 || after.retention_days > max {
                return Err(StoreError::Invalid(format!(
                    "retention_days: must be 1 to {max} for a {tier} tenant (got {})",
                    after.retention_days
                )));
            }
            tx.execute(
                "INSERT INTO body_log_settings (tenant_id, enabled, retention_days, when_behind)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant_id) DO UPDATE SET enabled = ?2, retention_days = ?3, when_behind = ?4",
                params![
                    tenant_id,
                    after.enabled,
                    i64::from(after.retention_days),
                    after.when_behind.name()
                ],
            )?;
            audit(
                tx,
                actor,
                "body_log.settings",
                tenant_id,
                serde_json::json!({
                    "enabled": after.enabled,
                    "retention_days": after.retention_days,
                    "when_behind": after.when_behind.name(),
                }),
            )?;
            if before.enabled && !after.enabled {
                audit(
                    tx,
                    actor,
                    "body_log.opt_out",
                    tenant_id,
                    serde_json::json!({ "tenant_id": tenant_id }),
                )?;
            }
            Ok(after)
        })
    }

    /// For a batch of body log records, read together (one transaction): whether each
    /// tenant logs bodies (`None`: no such tenant), and whether each (node, boot epoch,
    /// seq) is in the body log already (a resend).
    pub fn body_log_checks(
        &self,
        tenants: &[&str],
        records: &[(&str, u64, u64)],
    ) -> Result<BodyLogChecks, StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let mut enabled = std::collections::HashMap::new();
            for t in tenants {
                let e = match settings_of(&tx, t) {
                    Ok(s) => Some(s.enabled),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                };
                enabled.insert((*t).to_string(), e);
            }
            let mut logged = Vec::with_capacity(records.len());
            {
                let mut st = tx.prepare_cached(
                    "SELECT COUNT(*) FROM body_log_records WHERE node_id = ?1 AND boot_epoch = ?2 AND seq = ?3",
                )?;
                for (node, epoch, seq) in records {
                    let n: i64 =
                        st.query_row(params![node, *epoch as i64, *seq as i64], |r| r.get(0))?;
                    logged.push(n > 0);
                }
            }
            tx.commit()?;
            Ok(BodyLogChecks { enabled, logged })
        })
    }

    /// A segment the writer starts.
    pub fn body_segment_opened(&self, seg: &SegmentRow) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO body_log_segments (tenant_id, day, segment_id, state, records) VALUES (?1, ?2, ?3, 'open', 0)",
                params![seg.tenant_id, seg.day, seg.segment_id],
            )?;
            Ok(())
        })
    }

    /// A segment's final record is written.
    pub fn body_segment_closed(&self, seg: &SegmentRow) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE body_log_segments SET state = 'closed' WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
                params![seg.tenant_id, seg.day, seg.segment_id],
            )?;
            Ok(())
        })
    }

    /// At start: segments left open by a control plane that did not stop in order. They
    /// are never written again.
    pub fn body_segments_unterminated(&self) -> Result<usize, StoreError> {
        self.with_tx(|tx| {
            Ok(tx.execute(
                "UPDATE body_log_segments SET state = 'unterminated' WHERE state = 'open'",
                [],
            )?)
        })
    }

    /// Indexes records just appended, in one transaction (a request id logged again points
    /// at its newest record).
    pub fn body_records_indexed(&self, rows: &[IndexRow]) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO body_log_records (tenant_id, request_id, day, segment_id, record_index, node_id, boot_epoch, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (tenant_id, request_id) DO UPDATE SET day = ?3, segment_id = ?4, record_index = ?5,
                   node_id = ?6, boot_epoch = ?7, seq = ?8",
            )?;
            let mut count = tx.prepare_cached(
                "UPDATE body_log_segments SET records = MAX(records, ?4) WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
            )?;
            for r in rows {
                let seg = &r.segment;
                insert.execute(
                    params![
                        seg.tenant_id,
                        r.request_id,
                        seg.day,
                        seg.segment_id,
                        r.record_index as i64,
                        r.node_id,
                        r.boot_epoch as i64,
                        r.seq as i64
                    ],
                )?;
                count.execute(params![
                    seg.tenant_id,
                    seg.day,
                    seg.segment_id,
                    (r.record_index + 1) as i64
                ])?;
            }
            Ok(())
        })
    }

    /// Where a tenant's logged request is.
    pub fn body_record(
        &self,
        tenant_id: &str,
        request_id: &str,
    ) -> Result<Option<RecordPlace>, StoreError> {
        self.read(|c| {
            tenant_exists(c, tenant_id)?;
            Ok(c.query_row(
                "SELECT r.day, r.segment_id, r.record_index, s.state, s.records
                 FROM body_log_records r JOIN body_log_segments s
                   ON s.tenant_id = r.tenant_id AND s.day = r.day AND s.segment_id = r.segment_id
                 WHERE r.tenant_id = ?1 AND r.request_id = ?2",
                params![tenant_id, request_id],
                |r| {
                    Ok(RecordPlace {
                        segment: SegmentRow {
                            tenant_id: tenant_id.to_string(),
                            day: r.get(0)?,
                            segment_id: r.get(1)?,
                            state: r.get(3)?,
                            records: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                        },
                        record_index: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    })
                },
            )
            .optional()?)
        })
    }

    /// Every segment with the tenant's current settings (retention days; 0 when opted
    /// out), for the sweeper.
    pub fn body_segments(&self) -> Result<Vec<(SegmentRow, u32)>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT tenant_id, day, segment_id, state, records FROM body_log_segments ORDER BY tenant_id, day",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(SegmentRow {
                        tenant_id: r.get(0)?,
                        day: r.get(1)?,
                        segment_id: r.get(2)?,
                        state: r.get(3)?,
                        records: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for seg in rows {
                let days = match settings_of(c, &seg.tenant_id) {
                    Ok(s) if s.enabled => s.retention_days,
                    Ok(_) => 0,
                    // A tenant that no longer exists keeps nothing.
                    Err(StoreError::NotFound(_)) => 0,
                    Err(e) => return Err(e),
                };
                out.push((seg, days));
            }
            Ok(out)
        })
    }

    /// A segment deleted by the sweeper: it and its records leave the index.
    pub fn body_segment_deleted(&self, seg: &SegmentRow) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM body_log_records WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
                params![seg.tenant_id, seg.day, seg.segment_id],
            )?;
            tx.execute(
                "DELETE FROM body_log_segments WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
                params![seg.tenant_id, seg.day, seg.segment_id],
            )?;
            tx.execute(
                "DELETE FROM body_log_segment_keys WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
                params![seg.tenant_id, seg.day, seg.segment_id],
            )?;
            Ok(())
        })
    }
}
