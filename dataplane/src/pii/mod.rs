//! PII and secret detection and redaction, built on Hyperscan. `dataplane/PII.md` is the
//! specification: what each entity is and is not, the validators, the widths, the overlap
//! rule and the stream hold-back.
//!
//! - [`Scanner`]: the built-in database, compiled once and shared (`Arc`) by every core;
//!   [`Scratch`]: one per thread; [`Scanner::find`] → [`Finding`]s.
//! - [`TenantPatterns`]: a tenant's own patterns, compiled off the workers.
//! - [`Redactor`]: per request; typed placeholders, a [`Policy`] per [`Entity`], text and
//!   JSON modes. [`StreamRedactor`]: the same for text arriving in pieces.

mod patterns;
mod redact;
mod scanner;
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
