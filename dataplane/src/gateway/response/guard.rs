//! The response guardrail: PII and secrets the environment's policy names are redacted
//! from a response before it reaches the client, or the response is refused.
//!
//! A JSON (or other non-stream) answer is held whole, bounded by [`MAX_GUARDED_BODY`], and
//! redacted inside its string values once it ended; the response phase sends nothing until
//! then, so a blocked answer is replaced by a guardrail error with its own status. It fails
//! closed: a body too large to hold, not UTF-8 text, or a scanner that cannot run ends the
//! response with an error instead of relaying it unscanned.

use std::cell::RefCell;
use std::rc::Rc;

use crate::gateway::ctx::RequestCtx;
use crate::gateway::response::stage::{Piece, ResponseTransform, Verdict};
use crate::pii::{Policy, RedactError, Redactor, Scanner, Scratch};

/// Largest non-stream response held for redaction; a larger one is refused.
pub(crate) const MAX_GUARDED_BODY: usize = 16 << 20;

/// Why a guarded response cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It holds an entity the policy blocks.
    Blocked(crate::pii::Entity),
    /// It could not be scanned (too large, not text, the scanner failed).
    Unscannable,
}

pub(crate) struct ResponseGuard {
    redactor: Redactor<'static>,
    scratch: Rc<RefCell<Scratch>>,
    json: bool,
    body: Vec<u8>,
    too_large: bool,
    /// Set when the response may not be relayed; the response phase answers an error.
    pub(crate) refused: Option<Refusal>,
}

impl std::fmt::Debug for ResponseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseGuard")
            .field("json", &self.json)
            .field("held", &self.body.len())
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl ResponseGuard {
    pub(crate) fn new(
        scanner: &'static Scanner,
        scratch: Rc<RefCell<Scratch>>,
        policy: Policy,
        json: bool,
    ) -> Self {
        Self {
            redactor: Redactor::new(scanner, None, policy),
            scratch,
            json,
            body: Vec::new(),
            too_large: false,
            refused: None,
        }
    }

    fn redact(&mut self, ctx: &mut RequestCtx) -> Option<Vec<u8>> {
        let mut scratch = self.scratch.borrow_mut();
        let result = if self.json {
            self.redactor.redact_json(&mut scratch, &self.body)
        } else {
            match std::str::from_utf8(&self.body) {
                Ok(text) => self
                    .redactor
                    .redact(&mut scratch, text)
                    .map(String::into_bytes),
                Err(_) => {
                    self.refused = Some(Refusal::Unscannable);
                    return None;
                }
            }
        };
        match result {
            Ok(out) => {
                ctx.redacted += self.redactor.redacted();
                Some(out)
            }
            Err(RedactError::Blocked { entity, .. }) => {
                ctx.guardrail_blocked = Some((entity, "response"));
                self.refused = Some(Refusal::Blocked(entity));
                None
            }
            Err(e) => {
                tracing::error!(id = %ctx.id, error = %e, "a response could not be scanned; refused");
                self.refused = Some(Refusal::Unscannable);
                None
            }
        }
    }
}

impl ResponseTransform for ResponseGuard {
    fn rewrites(&self) -> bool {
        true
    }

    fn on_piece(&mut self, _: &mut RequestCtx, piece: &Piece<'_>, _: &mut Vec<Vec<u8>>) -> Verdict {
        if let Piece::Body { data, .. } = piece {
            if self.body.len() + data.len() > MAX_GUARDED_BODY {
                self.too_large = true;
                self.body = Vec::new();
            } else if !self.too_large {
                self.body.extend_from_slice(data);
            }
        }
        Verdict::Drop
    }

    fn on_end(&mut self, ctx: &mut RequestCtx, complete: bool, emit: &mut Vec<Vec<u8>>) {
        if !complete {
            return;
        }
        if self.too_large {
            tracing::warn!(id = %ctx.id, max = MAX_GUARDED_BODY, "a response too large to scan was refused");
            self.refused = Some(Refusal::Unscannable);
            return;
        }
        if let Some(out) = self.redact(ctx) {
            emit.push(out);
        }
    }
}
