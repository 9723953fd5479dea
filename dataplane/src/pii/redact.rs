//! Per-request redaction: typed placeholders, a policy per entity, text and JSON modes.

use std::collections::HashMap;

use super::scanner::{kept, Cand, Detect};
use super::{Entity, Rule, ScanError, Scanner, Scratch, TenantPatterns};

/// What to do with an entity's findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace with a placeholder.
    Redact,
    /// Refuse the request: redaction stops with [`RedactError::Blocked`].
    Block,
    /// Leave as is (the entity is not looked for).
    Allow,
}

/// An [`Action`] per [`Entity`]; the default redacts everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    actions: [Action; Entity::ALL.len()],
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            actions: [Action::Redact; Entity::ALL.len()],
        }
    }
}

impl Policy {
    /// Every entity redacted.
    pub fn redact_all() -> Self {
        Self::default()
    }

    /// The same policy with `entity` set to `action`.
    pub fn with(mut self, entity: Entity, action: Action) -> Self {
        self.actions[entity as usize] = action;
        self
    }

    pub fn action(&self, entity: Entity) -> Action {
        self.actions[entity as usize]
    }
}

/// Why redaction produced no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedactError {
    /// The policy blocks this entity and the text holds one: refuse the request.
    #[error("request holds {entity:?} ({rule:?}), which the policy blocks")]
    Blocked { entity: Entity, rule: Rule },
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The body given to [`Redactor::redact_json`] is not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Values given a placeholder, and their numbers: a short list while a request holds a few
/// (most do; no hashing, no table), per-entity maps beyond.
#[derive(Debug)]
enum Seen {
    Few(Vec<(Entity, String, u32)>),
    Many(Box<[HashMap<String, u32>; Entity::ALL.len()]>),
}

/// Distinct values kept in [`Seen::Few`], at most.
const FEW: usize = 16;

impl Seen {
    fn get(&self, entity: Entity, value: &str) -> Option<u32> {
        match self {
            Self::Few(list) => list
                .iter()
                .find(|(e, v, _)| *e == entity && v == value)
                .map(|&(_, _, n)| n),
            Self::Many(maps) => maps[entity as usize].get(value).copied(),
        }
    }

    fn insert(&mut self, entity: Entity, value: &str, n: u32) {
        if let Self::Few(list) = self {
            if list.len() < FEW {
                list.push((entity, value.to_owned(), n));
                return;
            }
            let mut maps: Box<[HashMap<String, u32>; Entity::ALL.len()]> = Box::default();
            for (e, v, n) in list.drain(..) {
                maps[e as usize].insert(v, n);
            }
            *self = Self::Many(maps);
        }
        if let Self::Many(maps) = self {
            maps[entity as usize].insert(value.to_owned(), n);
        }
    }
}

/// One request's redaction state: the same value gets the same placeholder everywhere in the
/// request (`[EMAIL_1]` … per entity, numbered in order of first appearance).
#[derive(Debug)]
pub struct Redactor<'a> {
    pub(crate) detect: Detect<'a>,
    policy: Policy,
    seen: Seen,
    next: [u32; Entity::ALL.len()],
    redacted: usize,
}

impl<'a> Redactor<'a> {
    pub fn new(scanner: &'a Scanner, tenant: Option<TenantPatterns>, policy: Policy) -> Self {
        Self {
            detect: Detect { scanner, tenant },
            policy,
            seen: Seen::Few(Vec::new()),
            next: [0; Entity::ALL.len()],
            redacted: 0,
        }
    }

    /// How many spans were replaced so far.
    pub fn redacted(&self) -> usize {
        self.redacted
    }

    /// How many distinct values of `entity` got a placeholder so far.
    pub fn distinct(&self, entity: Entity) -> u32 {
        self.next[entity as usize]
    }

    /// `text` with every finding the policy redacts replaced by its placeholder.
    pub fn redact(&mut self, scratch: &mut Scratch, text: &str) -> Result<String, RedactError> {
        let mut cands = std::mem::take(&mut scratch.cands);
        let result = self.redact_with(scratch, text, &mut cands);
        scratch.cands = cands;
        result
    }

    fn redact_with(
        &mut self,
        scratch: &mut Scratch,
        text: &str,
        cands: &mut Vec<Cand>,
    ) -> Result<String, RedactError> {
        self.candidates(scratch, text, 0, 0, cands)?;
        if cands.is_empty() {
            return Ok(text.to_owned());
        }
        let kept = kept(cands, self.detect.max_width());
        let mut out = String::with_capacity(text.len());
        self.apply(text, 0, 0, text.len(), cands, &kept, &mut out)?;
        Ok(out)
    }

    /// A JSON document with findings redacted inside string values only (object keys and
    /// everything outside strings are copied byte for byte). Escapes are decoded before
    /// matching; a changed string is re-encoded, so the output is valid JSON.
    ///
    /// Most documents hold nothing to find: one scan of the whole document settles it when
    /// it has no escape (then every string value is its own bytes, and a pattern that
    /// matches nowhere in the document matches in no value: none is anchored, and a quote
    /// is a non-word character like a text's edge). Such a document comes back unchanged,
    /// whether or not it is well-formed JSON (the request phase parses requests anyway).
    /// A tenant's own patterns may be anchored, so with them every value is scanned.
    pub fn redact_json(
        &mut self,
        scratch: &mut Scratch,
        json: &[u8],
    ) -> Result<Vec<u8>, RedactError> {
        if self.detect.tenant.is_none()
            && memchr::memchr(b'\\', json).is_none()
            && !self.detect.scanner.matches_any(scratch, json)?
        {
            return Ok(json.to_vec());
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(json)
            .map_err(|e| RedactError::Json(e.to_string()))?;
        let mut out = Vec::with_capacity(json.len());
        let mut i = 0;
        while i < json.len() {
            let Some(q) = memchr::memchr(b'"', &json[i..]) else {
                out.extend_from_slice(&json[i..]);
                break;
            };
            let start = i + q;
            out.extend_from_slice(&json[i..start]);
            let mut j = start + 1;
            while j < json.len() && json[j] != b'"' {
                j += if json[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(json.len());
            let raw = &json[start..end];
            let next = json[end..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .copied();
            if next == Some(b':') {
                out.extend_from_slice(raw);
            } else {
                let value: String =
                    serde_json::from_slice(raw).map_err(|e| RedactError::Json(e.to_string()))?;
                let redacted = self.redact(scratch, &value)?;
                if redacted == value {
                    out.extend_from_slice(raw);
                } else {
                    serde_json::to_writer(&mut out, &redacted)
                        .map_err(|e| RedactError::Json(e.to_string()))?;
                }
            }
            i = end;
        }
        Ok(out)
    }

    /// Candidates in `text[from..]` (absolute offsets from `base`), the allowed entities left
    /// out, spans widened to character boundaries, sorted by start.
    pub(crate) fn candidates(
        &self,
        scratch: &mut Scratch,
        text: &str,
        base: usize,
        from: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), ScanError> {
        out.clear();
        let window = &text[from - base..];
        self.detect
            .candidates(scratch, window.as_bytes(), from, out)?;
        out.retain(|c| self.policy.action(c.entity) != Action::Allow);
        for c in out.iter_mut() {
            while !text.is_char_boundary(c.start - base) {
                c.start -= 1;
            }
            while !text.is_char_boundary(c.end - base) {
                c.end += 1;
            }
        }
        out.sort_unstable_by_key(|c| (c.start, c.end, c.id));
        out.dedup();
        Ok(())
    }

    /// Copies `text[from..to]` (absolute offsets; `text` starts at `base`) to `out`, replacing
    /// the kept candidates that start at or after `from` and end by `to`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &mut self,
        text: &str,
        base: usize,
        from: usize,
        to: usize,
        cands: &[Cand],
        kept: &[bool],
        out: &mut String,
    ) -> Result<(), RedactError> {
        let mut at = from;
        for (c, _) in cands
            .iter()
            .zip(kept)
            .filter(|(c, k)| **k && c.start >= from && c.end <= to)
        {
            if self.policy.action(c.entity) == Action::Block {
                return Err(RedactError::Blocked {
                    entity: c.entity,
                    rule: self.detect.scanner.rule(c.id),
                });
            }
            out.push_str(&text[at - base..c.start - base]);
            self.placeholder(c.entity, &text[c.start - base..c.end - base], out);
            at = c.end;
        }
        out.push_str(&text[at - base..to - base]);
        Ok(())
    }

    fn placeholder(&mut self, entity: Entity, value: &str, out: &mut String) {
        let n = match self.seen.get(entity, value) {
            Some(n) => n,
            None => {
                let next = &mut self.next[entity as usize];
                *next += 1;
                self.seen.insert(entity, value, *next);
                *next
            }
        };
        self.redacted += 1;
        out.push('[');
        out.push_str(entity.tag());
        out.push('_');
        out.push_str(itoa::Buffer::new().format(n));
        out.push(']');
    }
}
