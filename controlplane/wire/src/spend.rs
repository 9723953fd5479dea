//! Spend caps and model prices as nodes hold them, and the periods caps are counted in.
//!
//! A cap bounds what a tenant, a sub-account (with every sub-account under it) or a key
//! spends in a UTC day, a UTC month or ever. Nodes never hold a cap's whole budget: the
//! control plane leases it to them in parts ([`crate::Message::LeaseRequest`]), and a node
//! forwards a request only once it has reserved the request's maximum cost from its lease.

use crate::codec::{get_str, get_u64, put_str, put_u64, Codec, InvalidMessage, Reader};
use crate::routing::{put_nonzero, required};

/// What a cap covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapScope {
    /// Every request of the tenant.
    Tenant,
    /// Every request of the sub-account's keys and of every sub-account under it.
    SubAccount,
    /// The key's requests.
    Key,
}

impl CapScope {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::SubAccount => "sub_account",
            Self::Key => "key",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "tenant" => Self::Tenant,
            "sub_account" => Self::SubAccount,
            "key" => Self::Key,
            _ => return None,
        })
    }

    fn code(self) -> u64 {
        match self {
            Self::Tenant => 1,
            Self::SubAccount => 2,
            Self::Key => 3,
        }
    }

    fn from_code(tag: u64, v: u64) -> Result<Self, InvalidMessage> {
        Ok(match v {
            1 => Self::Tenant,
            2 => Self::SubAccount,
            3 => Self::Key,
            _ => return Err(InvalidMessage::BadField { tag }),
        })
    }
}

/// The period a cap's budget is counted over; a new period starts with the whole budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapPeriod {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
    /// Never renewed.
    Lifetime,
}

impl CapPeriod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Lifetime => "lifetime",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "month" => Self::Month,
            "lifetime" => Self::Lifetime,
            _ => return None,
        })
    }

    fn code(self) -> u64 {
        match self {
            Self::Day => 1,
            Self::Month => 2,
            Self::Lifetime => 3,
        }
    }

    fn from_code(tag: u64, v: u64) -> Result<Self, InvalidMessage> {
        Ok(match v {
            1 => Self::Day,
            2 => Self::Month,
            3 => Self::Lifetime,
            _ => return Err(InvalidMessage::BadField { tag }),
        })
    }

    /// The number of the period `unix_secs` falls in: days since 1970-01-01, months since
    /// January 1970, or 0 for a lifetime cap.
    pub fn index(self, unix_secs: u64) -> u64 {
        let days = unix_secs / 86_400;
        match self {
            Self::Day => days,
            Self::Month => {
                let (y, m) = year_month(days);
                (y - 1970) * 12 + (m - 1)
            }
            Self::Lifetime => 0,
        }
    }

    /// The first day (days since 1970-01-01) of period `index`, and the first day after it
    /// (`None`: a lifetime cap's period never ends).
    pub fn days(self, index: u64) -> (u64, Option<u64>) {
        match self {
            Self::Day => (index, Some(index + 1)),
            Self::Month => {
                let first = |i: u64| days_from_civil(1970 + i / 12, i % 12 + 1, 1);
                (first(index), Some(first(index + 1)))
            }
            Self::Lifetime => (0, None),
        }
    }
}

/// (year, month) of a day counted from 1970-01-01 (Howard Hinnant's civil-from-days).
fn year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m)
}

/// Days since 1970-01-01 of a civil date (its inverse).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A spend cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapRecord {
    pub id: String,
    pub tenant_id: String,
    pub scope: CapScope,
    /// The tenant, sub-account or key id the cap covers.
    pub scope_id: String,
    pub period: CapPeriod,
    /// Millionths of a US dollar per period.
    pub limit_micros: u64,
}

impl Codec for CapRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        put_str(out, 2, &self.tenant_id);
        put_u64(out, 3, self.scope.code());
        put_str(out, 4, &self.scope_id);
        put_u64(out, 5, self.period.code());
        put_u64(out, 6, self.limit_micros);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id, mut scope_id) = (None, None, None);
        let (mut scope, mut period, mut limit) = (None, None, 0);
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => scope = Some(CapScope::from_code(tag, get_u64(tag, body)?)?),
                4 => scope_id = Some(get_str(body)?),
                5 => period = Some(CapPeriod::from_code(tag, get_u64(tag, body)?)?),
                6 => limit = get_u64(tag, body)?,
                _ => {}
            }
        }
        Ok(Self {
            id: required(id, 1)?,
            tenant_id: required(tenant_id, 2)?,
            scope: scope.ok_or(InvalidMessage::MissingField { tag: 3 })?,
            scope_id: required(scope_id, 4)?,
            period: period.ok_or(InvalidMessage::MissingField { tag: 5 })?,
            limit_micros: limit,
        })
    }
}

/// A model's price: millionths of a US dollar per million tokens of each kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceRecord {
    /// `<tenant>/<model>`, or `/<model>` for the price every tenant without its own pays.
    pub id: String,
    /// Empty: every tenant without a price of its own.
    pub tenant_id: String,
    pub model: String,
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
}

impl PriceRecord {
    /// The id of `tenant`'s (or, with `""`, the global) price of `model`.
    pub fn id_of(tenant: &str, model: &str) -> String {
        format!("{tenant}/{model}")
    }
}

impl Codec for PriceRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        if !self.tenant_id.is_empty() {
            put_str(out, 2, &self.tenant_id);
        }
        put_str(out, 3, &self.model);
        put_nonzero(out, 4, self.input);
        put_nonzero(out, 5, self.output);
        put_nonzero(out, 6, self.cached_input);
        put_nonzero(out, 7, self.cache_write);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id, mut model) = (None, String::new(), None);
        let mut rates = [0u64; 4];
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = get_str(body)?,
                3 => model = Some(get_str(body)?),
                4..=7 => rates[(tag - 4) as usize] = get_u64(tag, body)?,
                _ => {}
            }
        }
        Ok(Self {
            id: required(id, 1)?,
            tenant_id,
            model: required(model, 3)?,
            input: rates[0],
            output: rates[1],
            cached_input: rates[2],
            cache_write: rates[3],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        // 2024-02-29 12:00 UTC (a leap day).
        let t = 1_709_208_000;
        assert_eq!(CapPeriod::Day.index(t), 19_782);
        assert_eq!(CapPeriod::Month.index(t), (2024 - 1970) * 12 + 1);
        assert_eq!(CapPeriod::Lifetime.index(t), 0);
        // The month's first day is 2024-02-01, and March starts 29 days later.
        let (first, next) = CapPeriod::Month.days(CapPeriod::Month.index(t));
        assert_eq!(first, 19_754);
        assert_eq!(next, Some(19_783));
        // The last second of a month and the first of the next.
        let march = 19_783 * 86_400;
        assert_eq!(
            CapPeriod::Month.index(march - 1) + 1,
            CapPeriod::Month.index(march)
        );
        for d in [0u64, 59, 365, 10_956, 19_782, 40_000] {
            let (y, m) = year_month(d);
            let first = days_from_civil(y, m, 1);
            assert!(first <= d && d - first < 31, "{d}: {y}-{m}");
        }
    }

    #[test]
    fn records_round_trip() {
        let cap = CapRecord {
            id: "cap_1".into(),
            tenant_id: "t".into(),
            scope: CapScope::SubAccount,
            scope_id: "sa".into(),
            period: CapPeriod::Month,
            limit_micros: 25_000_000,
        };
        assert_eq!(CapRecord::from_bytes(&cap.to_bytes()).unwrap(), cap);
        let price = PriceRecord {
            id: PriceRecord::id_of("", "gpt-4o"),
            tenant_id: String::new(),
            model: "gpt-4o".into(),
            input: 2_500_000,
            output: 10_000_000,
            cached_input: 1_250_000,
            cache_write: 0,
        };
        assert_eq!(PriceRecord::from_bytes(&price.to_bytes()).unwrap(), price);
    }
}

/// A sub-account's rate limits, covering every key in its subtree (0: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRecord {
    /// The sub-account's id.
    pub id: String,
    pub tenant_id: String,
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
}

impl Codec for LimitRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        put_str(out, 2, &self.tenant_id);
        put_nonzero(out, 3, self.requests_per_minute);
        put_nonzero(out, 4, self.tokens_per_minute);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id) = (None, None);
        let (mut rpm, mut tpm) = (0, 0);
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => rpm = get_u64(tag, body)?,
                4 => tpm = get_u64(tag, body)?,
                _ => {}
            }
        }
        Ok(Self {
            id: required(id, 1)?,
            tenant_id: required(tenant_id, 2)?,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        })
    }
}

/// Rate limits leased between nodes. A node holds, for each UTC minute, a part of a limited
/// key's or sub-account's requests and tokens for that minute, leased with the same messages
/// as spend cap budget ([`crate::Message::LeaseRequest`]): the lease id names the limit, the
/// period is the minute (Unix seconds / 60) and the amount counts requests or tokens.
pub mod rate_lease {
    /// Which of a limiter's two limits a lease is of.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Unit {
        Requests,
        Tokens,
    }

    /// The lease id of `limiter`'s limit of `unit` (`limiter` is a key id, or
    /// `sub_account/<id>`).
    pub fn id(unit: Unit, limiter: &str) -> String {
        match unit {
            Unit::Requests => format!("rpm/{limiter}"),
            Unit::Tokens => format!("tpm/{limiter}"),
        }
    }

    /// The unit and limiter of a rate lease id; `None` for any other lease (a spend cap's).
    pub fn parse(id: &str) -> Option<(Unit, &str)> {
        if let Some(l) = id.strip_prefix("rpm/") {
            Some((Unit::Requests, l))
        } else {
            id.strip_prefix("tpm/").map(|l| (Unit::Tokens, l))
        }
    }

    /// The minute `unix_secs` falls in: the period of a rate lease.
    pub fn minute(unix_secs: u64) -> u64 {
        unix_secs / 60
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_round_trip_and_caps_are_not_rate_leases() {
            assert_eq!(
                parse(&id(Unit::Requests, "k_1")),
                Some((Unit::Requests, "k_1"))
            );
            assert_eq!(
                parse(&id(Unit::Tokens, "sub_account/sa_2")),
                Some((Unit::Tokens, "sub_account/sa_2"))
            );
            assert_eq!(parse("key:k_1:day"), None);
            assert_eq!(minute(119), 1);
        }
    }
}
