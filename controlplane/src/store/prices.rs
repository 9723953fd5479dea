//! Per-model prices, global or for one tenant (a tenant's price wins), from which the
//! control plane computes the cost of the usage nodes report, as the report arrives.
//!
//! Prices are US dollars per million tokens, kept as whole millionths of a dollar per
//! million tokens (so $0.15 is 150,000): exact, and a token's cost is
//! `tokens × price / 10⁶` millionths of a dollar.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{audit, now, Actor, Store, StoreError};

/// A price as an operator sets it: USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSpec {
    pub model: String,
    /// The tenant this price is for; absent: every tenant without a price of its own.
    #[serde(default)]
    pub tenant_id: Option<String>,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Input read from the provider's prompt cache; absent: the input price.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// Input written to the provider's prompt cache (Anthropic); absent: the input price.
    #[serde(default)]
    pub cache_write_per_mtok: Option<f64>,
}

/// A stored price (micro-USD per million tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Rates {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
}

impl Rates {
    /// The cost of these figures, in millionths of a dollar. Input counts include the
    /// cached and cache-written parts, which are priced at their own rates.
    pub(super) fn cost_micros(&self, e: &aigw_wire::UsageEntry) -> u64 {
        let plain = e
            .input_tokens
            .saturating_sub(e.cached_input_tokens)
            .saturating_sub(e.cache_write_tokens);
        let total = u128::from(plain) * u128::from(self.input)
            + u128::from(e.cached_input_tokens) * u128::from(self.cached_input)
            + u128::from(e.cache_write_tokens) * u128::from(self.cache_write)
            + u128::from(e.output_tokens) * u128::from(self.output);
        u64::try_from((total + 500_000) / 1_000_000).unwrap_or(u64::MAX)
    }
}

/// A price as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Price {
    pub model: String,
    pub tenant_id: Option<String>,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cached_input_per_mtok: f64,
    pub cache_write_per_mtok: f64,
    pub updated_at: i64,
}

/// Highest price accepted, USD per million tokens.
const MAX_PRICE: f64 = 1_000_000.0;

fn micros(field: &str, usd: f64) -> Result<u64, StoreError> {
    if !usd.is_finite() || !(0.0..=MAX_PRICE).contains(&usd) {
        return Err(StoreError::Invalid(format!(
            "{field}: must be a number of US dollars per million tokens from 0 to {MAX_PRICE}"
        )));
    }
    Ok((usd * 1e6).round() as u64)
}

fn usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

fn price_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Price> {
    let tenant: String = r.get(0)?;
    Ok(Price {
        tenant_id: (!tenant.is_empty()).then_some(tenant),
        model: r.get(1)?,
        input_per_mtok: usd(r.get(2)?),
        output_per_mtok: usd(r.get(3)?),
        cached_input_per_mtok: usd(r.get(4)?),
        cache_write_per_mtok: usd(r.get(5)?),
        updated_at: r.get(6)?,
    })
}

/// The rates for `tenant`'s `model`: its own, else the global one.
pub(super) fn rates(
    c: &Connection,
    tenant: &str,
    model: &str,
) -> Result<Option<Rates>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT input, output, cached_input, cache_write FROM prices
         WHERE model = ?2 AND tenant_id IN (?1, '') ORDER BY tenant_id = '' LIMIT 1",
    )?;
    Ok(stmt
        .query_row(params![tenant, model], |r| {
            let n = |i| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok(Rates {
                input: n(0)?,
                output: n(1)?,
                cached_input: n(2)?,
                cache_write: n(3)?,
            })
        })
        .optional()?)
}

impl Store {
    /// Sets a price (audited). Costs of usage reported from now on use it.
    pub fn put_price(&self, actor: &Actor, spec: &PriceSpec) -> Result<Price, StoreError> {
        if spec.model.is_empty() || spec.model.len() > 256 {
            return Err(StoreError::Invalid("model: 1 to 256 characters".into()));
        }
        let input = micros("input_per_mtok", spec.input_per_mtok)?;
        let output = micros("output_per_mtok", spec.output_per_mtok)?;
        let cached = match spec.cached_input_per_mtok {
            Some(v) => micros("cached_input_per_mtok", v)?,
            None => input,
        };
        let write = match spec.cache_write_per_mtok {
            Some(v) => micros("cache_write_per_mtok", v)?,
            None => input,
        };
        let tenant = spec.tenant_id.clone().unwrap_or_default();
        self.with_tx(|tx| {
            if !tenant.is_empty() {
                super::tenant_exists(tx, &tenant)?;
            }
            tx.execute(
                "INSERT INTO prices (tenant_id, model, input, output, cached_input, cache_write, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (tenant_id, model) DO UPDATE SET input = excluded.input, output = excluded.output,
                    cached_input = excluded.cached_input, cache_write = excluded.cache_write, updated_at = excluded.updated_at",
                params![tenant, spec.model, input as i64, output as i64, cached as i64, write as i64, now()],
            )?;
            let price = tx.query_row(
                "SELECT tenant_id, model, input, output, cached_input, cache_write, updated_at FROM prices
                 WHERE tenant_id = ?1 AND model = ?2",
                params![tenant, spec.model],
                price_row,
            )?;
            super::change(
                tx,
                "price",
                &aigw_wire::PriceRecord::id_of(&tenant, &spec.model),
                "upsert",
            )?;
            audit(
                tx,
                actor,
                "price.put",
                &spec.model,
                serde_json::json!({
                    "tenant_id": price.tenant_id,
                    "input_per_mtok": price.input_per_mtok,
                    "output_per_mtok": price.output_per_mtok,
                    "cached_input_per_mtok": price.cached_input_per_mtok,
                    "cache_write_per_mtok": price.cache_write_per_mtok,
                }),
            )?;
            Ok(price)
        })
    }

    /// Prices: the global ones and, with `tenant`, that tenant's.
    pub fn prices(&self, tenant: Option<&str>) -> Result<Vec<Price>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT tenant_id, model, input, output, cached_input, cache_write, updated_at FROM prices
                 WHERE tenant_id IN ('', ?1) ORDER BY model, tenant_id",
            )?;
            let rows = stmt
                .query_map(params![tenant.unwrap_or("")], price_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Removes a price (audited).
    pub fn delete_price(
        &self,
        actor: &Actor,
        model: &str,
        tenant: Option<&str>,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "DELETE FROM prices WHERE tenant_id = ?1 AND model = ?2",
                params![tenant.unwrap_or(""), model],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("price"));
            }
            super::change(
                tx,
                "price",
                &aigw_wire::PriceRecord::id_of(tenant.unwrap_or(""), model),
                "delete",
            )?;
            audit(
                tx,
                actor,
                "price.delete",
                model,
                serde_json::json!({"tenant_id": tenant}),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_prices_each_kind_of_token_at_its_rate() {
        let r = Rates {
            input: 2_500_000,        // $2.50 / Mtok
            output: 10_000_000,      // $10
            cached_input: 1_250_000, // $1.25
            cache_write: 3_125_000,
        };
        let e = aigw_wire::UsageEntry {
            input_tokens: 1_000_000,
            cached_input_tokens: 400_000,
            cache_write_tokens: 100_000,
            output_tokens: 200_000,
            ..Default::default()
        };
        // 500k plain × 2.5 + 400k × 1.25 + 100k × 3.125 + 200k × 10 = 1.25 + 0.5 + 0.3125 + 2
        assert_eq!(r.cost_micros(&e), 4_062_500);
    }
}
