//! PII and secret detection and redaction, built on Hyperscan. `dataplane/PII.md` is the
//! specification: what each entity is and is not, the validators, the widths, the overlap
//! rule and the stream hold-back.
//!
//! - [`Scanner`]: the built-in database, compiled once and shared (`Arc`) by every core;
//!   [`Scratch`]: one per thread; [`Scanner::find`] → [`Finding`]s.
//! - [`TenantPatterns`]: a tenant's own patterns, compiled off the workers.
//! - [`Redactor`]: per request; typed placeholders, a [`Policy`] per [`Entity`], text and
//!   JSON modes. [`StreamRedactor`]: the same for text arriving in pieces.
//! - [`SseRedactor`]: a provider's server-sent event stream (chat, completions, Responses,
//!   Anthropic), each text through its own hold-back, one placeholder numbering.

mod gate;
mod numeric;
mod patterns;
mod redact;
mod scanner;
pub mod sse;
mod stream;
mod validate;

#[cfg(test)]
mod eval;
#[cfg(test)]
mod tests;

pub use redact::{Action, Policy, RedactError, Redactor};
pub use scanner::{
    PatternError, ScanError, Scanner, Scratch, TenantPatterns, MAX_TENANT_PATTERNS,
    MAX_TENANT_PATTERN_LEN, MAX_TENANT_PATTERN_WIDTH,
};
pub use sse::{OutEvent, SseRedactor, StreamKind, MAX_OPEN_TEXTS};
pub use stream::StreamRedactor;

/// What a finding is; each has its own placeholder and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Email,
    Phone,
    Card,
    Ssn,
    Iban,
    Ip,
    Secret,
    /// A tenant pattern.
    Custom,
}

impl Entity {
    pub const ALL: [Self; 8] = [
        Self::Email,
        Self::Phone,
        Self::Card,
        Self::Ssn,
        Self::Iban,
        Self::Ip,
        Self::Secret,
        Self::Custom,
    ];

    /// The entity a policy names (`email`, … `custom`, as `PII.md` and the control plane
    /// spell them).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "email" => Self::Email,
            "phone" => Self::Phone,
            "card" => Self::Card,
            "ssn" => Self::Ssn,
            "iban" => Self::Iban,
            "ip" => Self::Ip,
            "secret" => Self::Secret,
            "custom" => Self::Custom,
            _ => return None,
        })
    }

    /// The placeholder's tag: `[EMAIL_1]`.
    pub const fn tag(self) -> &'static str {
        match self {
            Self::Email => "EMAIL",
            Self::Phone => "PHONE",
            Self::Card => "CARD",
            Self::Ssn => "SSN",
            Self::Iban => "IBAN",
            Self::Ip => "IP",
            Self::Secret => "SECRET",
            Self::Custom => "CUSTOM",
        }
    }
}

/// Which pattern found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A built-in rule by name (`PII.md` lists them), e.g. `"card_grouped"`, `"openai_key"`.
    Builtin(&'static str),
    /// The index of a tenant pattern.
    Tenant(usize),
}

/// A detected span: byte offsets into the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    pub entity: Entity,
    pub rule: Rule,
}

/// The built-in rules' Hyperscan expressions and confirmation step, so a benchmark can run a
/// `regex`-crate baseline through exactly the same extension, validators and overlap rule.
/// Not an API.
#[doc(hidden)]
pub mod baseline {
    use std::sync::OnceLock;

    use super::patterns::{builtins, Builtin};
    use super::scanner::{kept, Cand};
    use super::{Finding, Rule};

    fn rules() -> &'static [Builtin] {
        static RULES: OnceLock<Vec<Builtin>> = OnceLock::new();
        RULES.get_or_init(builtins)
    }

    /// The expression of each built-in rule, by rule id.
    pub fn expressions() -> Vec<String> {
        rules().iter().map(|r| r.expr.to_string()).collect()
    }

    /// A raw hit of rule `id` at `start..end` extended and validated: `Some` whole span.
    pub fn confirm(id: usize, text: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
        let r = rules().get(id)?;
        let (s, e) = match r.extend {
            Some((f, _)) => f(text, start, end)?,
            None => (start, end),
        };
        (r.validate)(text, s, e).then_some((s, e))
    }

    /// Confirmed spans `(start, end, id)` → findings, overlaps resolved as the scanner does.
    pub fn resolve(mut spans: Vec<(usize, usize, usize)>, max_width: usize) -> Vec<Finding> {
        let rules = rules();
        spans.sort_unstable();
        spans.dedup();
        let cands: Vec<Cand> = spans
            .iter()
            .map(|&(start, end, id)| Cand {
                start,
                end,
                id: id as u32,
                entity: rules[id].entity,
                priority: rules[id].priority,
            })
            .collect();
        let keep = kept(&cands, max_width);
        cands
            .iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(c, _)| Finding {
                start: c.start,
                end: c.end,
                entity: c.entity,
                rule: Rule::Builtin(rules[c.id as usize].name),
            })
            .collect()
    }
}
