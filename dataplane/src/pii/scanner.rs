//! Hyperscan databases (built-in and per tenant), the per-thread scratch, and how raw
//! Hyperscan hits become findings.

use std::sync::Arc;

use hyperscan::prelude::*;

use rustc_hash::FxHashSet;

use super::gate;
use super::numeric::Numeric;
use super::patterns::{self, builtins, Builtin, Extend, Long};
use super::validate::{self, Validator};
use super::{Entity, Finding, Rule};

/// Why a pattern list (built-in or a tenant's) cannot become a database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{count} patterns given, at most {max} allowed")]
    TooMany { count: usize, max: usize },
    #[error("pattern {index} is {len} bytes long, at most {max} allowed")]
    TooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("pattern {index} does not compile: {message}")]
    Invalid { index: usize, message: String },
    #[error("pattern {index} has no bounded match width")]
    Unbounded { index: usize },
    #[error("pattern {index} matches up to {width} bytes, at most {max} allowed")]
    TooWide {
        index: usize,
        width: usize,
        max: usize,
    },
    #[error("pattern database: {0}")]
    Database(String),
}

/// Scanning failed inside Hyperscan (out of memory, a scratch in use): the text was not
/// scanned and must not be treated as clean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pii scan failed: {0}")]
pub struct ScanError(pub String);

/// Limits on a tenant's pattern list.
pub const MAX_TENANT_PATTERNS: usize = 64;
pub const MAX_TENANT_PATTERN_LEN: usize = 256;
pub const MAX_TENANT_PATTERN_WIDTH: usize = 512;

/// Tenant rule ids start here in the candidate id space.
const TENANT_ID_BASE: u32 = 1 << 16;
const TENANT_PRIORITY: u8 = 90;

/// One hit that passed its validator, before overlaps are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cand {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) id: u32,
    pub(crate) entity: Entity,
    pub(crate) priority: u8,
}

impl Cand {
    fn key(&self) -> (usize, u8, std::cmp::Reverse<usize>, std::cmp::Reverse<u32>) {
        (
            self.end - self.start,
            self.priority,
            std::cmp::Reverse(self.start),
            std::cmp::Reverse(self.id),
        )
    }

    /// The overlap rule: longer wins, then the higher priority, then the earlier start.
    pub(crate) fn beats(&self, other: &Self) -> bool {
        self.key() > other.key()
    }

    pub(crate) fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Per-thread (per-core) Hyperscan scratch space plus reusable buffers. One is needed for
/// each thread scanning concurrently; it serves the built-in database and, once grown on
/// first use, tenant databases.
pub struct Scratch {
    hs: hyperscan::Scratch,
    raw: Vec<(u32, usize, usize)>,
    starts: Vec<(usize, usize)>,
    seen: FxHashSet<(u32, usize)>,
    /// Room for a redaction's candidates, reused.
    pub(crate) cands: Vec<Cand>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").finish_non_exhaustive()
    }
}

struct Inner {
    /// The rules scanned over the whole text.
    direct: BlockDatabase,
    /// The numeric rules, matched from the starts [`gate::starts`] finds (`None`: every rule
    /// is in `direct`).
    numeric: Option<Numeric>,
    /// The IPv6 rule, whose head [`gate::colon_pairs`] finds (`None`: it is in `direct`).
    ipv6: Option<u32>,
    rules: Vec<Builtin>,
    short_width: usize,
    longs: Vec<(Long, usize)>,
    max_width: usize,
}

/// The built-in detectors: one Hyperscan database, compiled once, shared read-only by every
/// core (cloning is an `Arc` clone).
#[derive(Clone)]
pub struct Scanner {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("rules", &self.inner.rules.len())
            .field("short_width", &self.inner.short_width)
            .field("max_width", &self.inner.max_width)
            .finish()
    }
}

fn width_of(index: usize, expr: &str, max: usize) -> Result<usize, PatternError> {
    let p = Pattern::with_flags(expr, CompileFlags::SOM_LEFTMOST).map_err(|e| {
        PatternError::Invalid {
            index,
            message: e.to_string(),
        }
    })?;
    let info = p.info().map_err(|e| PatternError::Invalid {
        index,
        message: e.to_string(),
    })?;
    let width = info.max_width();
    if width == u32::MAX as usize {
        return Err(PatternError::Unbounded { index });
    }
    if width > max {
        return Err(PatternError::TooWide { index, width, max });
    }
    Ok(width)
}

fn build(exprs: &[&str]) -> Result<BlockDatabase, PatternError> {
    build_ids(exprs.iter().copied().enumerate())
}

/// A database of `(id, expression)` pairs, every one with leftmost start of match.
fn build_ids<'e>(
    exprs: impl Iterator<Item = (usize, &'e str)>,
) -> Result<BlockDatabase, PatternError> {
    let patterns: Patterns = exprs
        .map(|(i, e)| Pattern {
            expression: e.to_owned(),
            flags: CompileFlags::SOM_LEFTMOST,
            id: Some(i),
            ext: Default::default(),
            som: None,
        })
        .collect();
    patterns
        .build::<hyperscan::Block>()
        .map_err(|e| PatternError::Database(e.to_string()))
}

fn scan(db: &BlockDatabase, scratch: &mut Scratch, text: &[u8]) -> Result<(), ScanError> {
    scratch.raw.clear();
    if u32::try_from(text.len()).is_err() {
        return Err(ScanError("text longer than 4 GiB".into()));
    }
    let raw = &mut scratch.raw;
    let mut on_match = |id: u32, from: u64, to: u64, _flags: u32| {
        raw.push((id, from as usize, to as usize));
        Matching::Continue
    };
    if db.scan(text, &scratch.hs, &mut on_match).is_ok() {
        return Ok(());
    }
    // A scratch built for another database: grow it (allocation only) and retry once.
    raw.clear();
    db.realloc_scratch(&mut scratch.hs)
        .map_err(|e| ScanError(e.to_string()))?;
    let raw = &mut scratch.raw;
    let mut on_match = |id: u32, from: u64, to: u64, _flags: u32| {
        raw.push((id, from as usize, to as usize));
        Matching::Continue
    };
    db.scan(text, &scratch.hs, &mut on_match)
        .map_err(|e| ScanError(e.to_string()))
}

/// Raw hits → candidates: for each (rule, start) the longest end its validator accepts.
fn collect(
    raw: &mut [(u32, usize, usize)],
    text: &[u8],
    offset: usize,
    info: impl Fn(u32) -> (Validator, Option<Extend>, Entity, u8),
    id_base: u32,
    out: &mut Vec<Cand>,
) {
    raw.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(b.2.cmp(&a.2)));
    let mut i = 0;
    while i < raw.len() {
        let (id, start, _) = raw[i];
        let mut j = i;
        while j < raw.len() && raw[j].0 == id && raw[j].1 == start {
            j += 1;
        }
        let (validate, extend, entity, priority) = info(id);
        let whole = |&(_, s, e): &(u32, usize, usize)| {
            let (s, e) = match extend {
                Some(f) => f(text, s, e)?,
                None => (s, e),
            };
            validate(text, s, e).then_some((s, e))
        };
        if let Some((start, end)) = raw[i..j].iter().find_map(whole) {
            out.push(Cand {
                start: start + offset,
                end: end + offset,
                id: id + id_base,
                entity,
                priority,
            });
        }
        i = j;
    }
}

impl Scanner {
    /// Compiles the built-in databases. Call once per process and share the result.
    pub fn new() -> Result<Self, PatternError> {
        Self::compile(true)
    }

    /// The same detectors with every rule scanned over the whole text, in one database: the
    /// reference the gate is checked against (the findings are the same, only slower).
    #[cfg(test)]
    pub(crate) fn without_gate() -> Result<Self, PatternError> {
        Self::compile(false)
    }

    fn compile(gate: bool) -> Result<Self, PatternError> {
        let rules = builtins();
        let mut short_width = 0;
        let mut max_width = 0;
        let mut longs = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let head = width_of(i, &r.expr, 64 * 1024)?;
            let w = r.extend.map_or(head, |(_, whole)| whole.max(head));
            max_width = max_width.max(w);
            match r.long {
                Some(l) => longs.push((l, w)),
                None => short_width = short_width.max(w),
            }
        }
        let numeric = |r: &Builtin| gate && patterns::numeric(r.name);
        let ipv6 = gate
            .then(|| rules.iter().position(|r| r.name == "ipv6"))
            .flatten()
            .map(|i| i as u32);
        let direct = build_ids(
            rules
                .iter()
                .enumerate()
                .filter(|&(i, r)| !numeric(r) && ipv6 != Some(i as u32))
                .map(|(i, r)| (i, r.expr.as_ref())),
        )?;
        let numeric = if gate {
            Some(Numeric::new(
                rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| numeric(r))
                    .map(|(i, r)| (i as u32, r.expr.as_ref())),
            )?)
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                direct,
                numeric,
                ipv6,
                rules,
                short_width,
                longs,
                max_width,
            }),
        })
    }

    /// Whether any built-in pattern matches anywhere in `text` (a numeric one where the gate
    /// lets it start), before any validator. A `false` means no finding is possible in `text`,
    /// nor in a part of it cut at non-word characters, such as a JSON string value: no pattern
    /// is anchored, `\b` sees such a cut as the whole text does, and a digit run in a part
    /// lies in a run of the whole that qualifies at least as well.
    pub(crate) fn matches_any(
        &self,
        scratch: &mut Scratch,
        text: &[u8],
    ) -> Result<bool, ScanError> {
        self.raw_hits(scratch, text)?;
        Ok(!scratch.raw.is_empty())
    }

    /// Every raw hit of the built-in rules in `text` into `scratch.raw`: the direct database
    /// over the whole text, the numeric rules' automaton from the gate's starts.
    fn raw_hits(&self, scratch: &mut Scratch, text: &[u8]) -> Result<(), ScanError> {
        scan(&self.inner.direct, scratch, text)?;
        if let Some(id) = self.inner.ipv6 {
            gate::colon_pairs(text, |s, e| scratch.raw.push((id, s, e)));
        }
        let Some(numeric) = &self.inner.numeric else {
            return Ok(());
        };
        gate::starts(text, &mut scratch.starts);
        numeric.hits(text, &scratch.starts, &mut scratch.seen, &mut scratch.raw);
        Ok(())
    }

    /// A scratch for one thread.
    pub fn scratch(&self) -> Result<Scratch, ScanError> {
        let hs = self
            .inner
            .direct
            .alloc_scratch()
            .map_err(|e| ScanError(e.to_string()))?;
        Ok(Scratch {
            hs,
            raw: Vec::new(),
            starts: Vec::new(),
            seen: FxHashSet::default(),
            cands: Vec::new(),
        })
    }

    /// Widest match of any built-in pattern without an anchor (see `PII.md`).
    pub fn short_width(&self) -> usize {
        self.inner.short_width
    }

    /// Widest match of any built-in pattern (the PEM block with its body cap).
    pub fn max_width(&self) -> usize {
        self.inner.max_width
    }

    /// Names of the built-in rules, with their entity, as `PII.md` lists them.
    pub fn rules(&self) -> impl Iterator<Item = (&'static str, Entity)> + '_ {
        self.inner.rules.iter().map(|r| (r.name, r.entity))
    }

    /// The findings of the built-in detectors in `text`, overlaps resolved, by start.
    pub fn find(&self, scratch: &mut Scratch, text: &[u8]) -> Result<Vec<Finding>, ScanError> {
        Detect {
            scanner: self,
            tenant: None,
        }
        .find(scratch, text)
    }

    pub(crate) fn longs(&self) -> &[(Long, usize)] {
        &self.inner.longs
    }

    pub(crate) fn rule(&self, id: u32) -> Rule {
        if id >= TENANT_ID_BASE {
            Rule::Tenant((id - TENANT_ID_BASE) as usize)
        } else {
            Rule::Builtin(self.inner.rules[id as usize].name)
        }
    }
}

/// A tenant's own patterns, compiled into their own database off the worker threads (a
/// plain function the control path runs), then shared read-only like [`Scanner`].
#[derive(Clone)]
pub struct TenantPatterns {
    db: Option<Arc<BlockDatabase>>,
    count: usize,
    max_width: usize,
}

impl std::fmt::Debug for TenantPatterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantPatterns")
            .field("count", &self.count)
            .field("max_width", &self.max_width)
            .finish()
    }
}

impl TenantPatterns {
    /// Compiles a tenant's patterns (Hyperscan syntax, case-sensitive, matched with
    /// leftmost start). At most [`MAX_TENANT_PATTERNS`] patterns of at most
    /// [`MAX_TENANT_PATTERN_LEN`] bytes, each with a bounded match width of at most
    /// [`MAX_TENANT_PATTERN_WIDTH`] bytes; errors name the first bad pattern's index.
    pub fn compile<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        if patterns.len() > MAX_TENANT_PATTERNS {
            return Err(PatternError::TooMany {
                count: patterns.len(),
                max: MAX_TENANT_PATTERNS,
            });
        }
        let mut max_width = 0;
        for (index, p) in patterns.iter().enumerate() {
            let p = p.as_ref();
            if p.len() > MAX_TENANT_PATTERN_LEN {
                return Err(PatternError::TooLong {
                    index,
                    len: p.len(),
                    max: MAX_TENANT_PATTERN_LEN,
                });
            }
            max_width = max_width.max(width_of(index, p, MAX_TENANT_PATTERN_WIDTH)?);
            // Some patterns pass `hs_expression_info` yet cannot be built with SOM.
            build(&[p]).map_err(|e| PatternError::Invalid {
                index,
                message: e.to_string(),
            })?;
        }
        let exprs: Vec<&str> = patterns.iter().map(AsRef::as_ref).collect();
        let db = if exprs.is_empty() {
            None
        } else {
            Some(Arc::new(build(&exprs)?))
        };
        Ok(Self {
            db,
            count: patterns.len(),
            max_width,
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Widest match of any of the patterns.
    pub fn max_width(&self) -> usize {
        self.max_width
    }

    /// Whether both are the same compiled database (not merely equal patterns).
    pub fn same_database(&self, other: &Self) -> bool {
        match (&self.db, &other.db) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// The built-in detectors plus, optionally, a tenant's patterns (shared: a clone is a
/// reference count).
#[derive(Debug, Clone)]
pub(crate) struct Detect<'a> {
    pub(crate) scanner: &'a Scanner,
    pub(crate) tenant: Option<TenantPatterns>,
}

impl Detect<'_> {
    /// Widest match of any pattern a stream holds back for unconditionally.
    pub(crate) fn short_width(&self) -> usize {
        // A tenant match may end inside a UTF-8 character; the redactor widens it to whole
        // characters (3 bytes at most on either side).
        self.scanner
            .short_width()
            .max(self.tenant.as_ref().map_or(0, |t| t.max_width + 6))
    }

    pub(crate) fn max_width(&self) -> usize {
        self.scanner
            .max_width()
            .max(self.tenant.as_ref().map_or(0, |t| t.max_width + 6))
    }

    /// Every validated candidate in `text`, with offsets shifted by `offset`.
    pub(crate) fn candidates(
        &self,
        scratch: &mut Scratch,
        text: &[u8],
        offset: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), ScanError> {
        let rules = &self.scanner.inner.rules;
        self.scanner.raw_hits(scratch, text)?;
        let mut raw = std::mem::take(&mut scratch.raw);
        collect(
            &mut raw,
            text,
            offset,
            |id| {
                let r = &rules[id as usize];
                (r.validate, r.extend.map(|(f, _)| f), r.entity, r.priority)
            },
            0,
            out,
        );
        scratch.raw = raw;
        if let Some(db) = self.tenant.as_ref().and_then(|t| t.db.as_deref()) {
            scan(db, scratch, text)?;
            let mut raw = std::mem::take(&mut scratch.raw);
            collect(
                &mut raw,
                text,
                offset,
                |_| (validate::always, None, Entity::Custom, TENANT_PRIORITY),
                TENANT_ID_BASE,
                out,
            );
            scratch.raw = raw;
        }
        out.sort_unstable_by_key(|c| (c.start, c.end, c.id));
        out.dedup();
        Ok(())
    }

    pub(crate) fn find(
        &self,
        scratch: &mut Scratch,
        text: &[u8],
    ) -> Result<Vec<Finding>, ScanError> {
        let mut cands = Vec::new();
        self.candidates(scratch, text, 0, &mut cands)?;
        let kept = kept(&cands, self.max_width());
        Ok(cands
            .iter()
            .zip(kept)
            .filter(|(_, k)| *k)
            .map(|(c, _)| Finding {
                start: c.start,
                end: c.end,
                entity: c.entity,
                rule: self.scanner.rule(c.id),
            })
            .collect())
    }
}

/// Which candidates (sorted by start) survive: those no overlapping candidate beats. The
/// decision for one candidate depends only on candidates overlapping it, which is what lets a
/// stream decide with a bounded hold-back. Kept candidates never overlap each other.
pub(crate) fn kept(cands: &[Cand], max_width: usize) -> smallvec::SmallVec<[bool; 32]> {
    let mut out = smallvec::smallvec![true; cands.len()];
    for (i, c) in cands.iter().enumerate() {
        let earlier = cands[..i]
            .iter()
            .rev()
            .take_while(|o| o.start + max_width >= c.start);
        let later = cands[i + 1..].iter().take_while(|o| o.start < c.end);
        if earlier.chain(later).any(|o| o.overlaps(c) && o.beats(c)) {
            out[i] = false;
        }
    }
    out
}
