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
    /// Relay unscanned what cannot be scanned (the policy fails open).
    fail_open: bool,
    /// Failing open: what is held went out unscanned, and the rest passes as it comes.
    passing: bool,
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
        patterns: Option<crate::pii::TenantPatterns>,
        policy: Policy,
        json: bool,
        fail_open: bool,
    ) -> Self {
        Self {
            redactor: Redactor::new(scanner, patterns, policy),
            scratch,
            json,
            body: Vec::new(),
            too_large: false,
            fail_open,
            passing: false,
            refused: None,
        }
    }

    /// The answer cannot be scanned: refused, or (failing open) relayed unscanned.
    fn unscannable(&mut self, ctx: &mut RequestCtx, why: &str) -> Option<Vec<u8>> {
        if self.fail_open {
            tracing::warn!(id = %ctx.id, why, "a response was relayed unscanned (the policy fails open)");
            ctx.guardrail_unscanned = Some("response");
            Some(std::mem::take(&mut self.body))
        } else {
            tracing::error!(id = %ctx.id, why, "a response could not be scanned; refused");
            self.refused = Some(Refusal::Unscannable);
            None
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
                    drop(scratch);
                    return self.unscannable(ctx, "not UTF-8 text");
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
                drop(scratch);
                self.unscannable(ctx, &e.to_string())
            }
        }
    }
}

impl ResponseTransform for ResponseGuard {
    fn rewrites(&self) -> bool {
        true
    }

    fn on_piece(
        &mut self,
        ctx: &mut RequestCtx,
        piece: &Piece<'_>,
        emit: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        if let Piece::Body { data, .. } = piece {
            if self.passing {
                emit.push(data.to_vec());
            } else if self.body.len() + data.len() > MAX_GUARDED_BODY {
                if let Some(held) = self.unscannable(ctx, "too large to hold for scanning") {
                    self.passing = true;
                    emit.push(held);
                    emit.push(data.to_vec());
                } else {
                    self.too_large = true;
                    self.body = Vec::new();
                }
            } else if !self.too_large {
                self.body.extend_from_slice(data);
            }
        }
        Verdict::Drop
    }

    fn on_end(&mut self, ctx: &mut RequestCtx, complete: bool, emit: &mut Vec<Vec<u8>>) {
        if !complete || self.passing {
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

/// The response guardrail for event streams: each event's text fields go through the
/// stream redactor ([`crate::pii::SseRedactor`]: per text a bounded hold-back, one
/// placeholder numbering for the whole response); what it holds back is sent as synthetic
/// delta events before the event that closes the text. A blocked entity, an event it cannot
/// read, or a scanner failure ends the stream with an error event: nothing after it is
/// relayed.
pub(crate) struct StreamGuard {
    sse: crate::pii::SseRedactor<'static>,
    scratch: Rc<RefCell<Scratch>>,
    family: crate::errors::Family,
    /// Set once the stream was ended by the guardrail.
    pub(crate) refused: Option<Refusal>,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard")
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

/// The stream grammar of an endpoint, if the guardrail can read it.
pub(crate) fn stream_kind(
    endpoint: Option<crate::adapters::Endpoint>,
) -> Option<crate::pii::StreamKind> {
    use crate::adapters::Endpoint;
    use crate::pii::StreamKind;
    Some(match endpoint? {
        Endpoint::ChatCompletions => StreamKind::OpenAiChat,
        Endpoint::Completions => StreamKind::OpenAiCompletions,
        Endpoint::Responses => StreamKind::Responses,
        Endpoint::Messages => StreamKind::Anthropic,
        Endpoint::Embeddings | Endpoint::Models => return None,
    })
}

fn sse_bytes(events: Vec<crate::pii::OutEvent>, emit: &mut Vec<Vec<u8>>) {
    for e in events {
        let mut out = Vec::with_capacity(e.data.len() + 32);
        let name = e.event.as_deref().unwrap_or("");
        crate::h1::sse::write_event(name.as_bytes(), e.data.as_bytes(), &mut out);
        emit.push(out);
    }
}

impl StreamGuard {
    pub(crate) fn new(
        scanner: &'static Scanner,
        scratch: Rc<RefCell<Scratch>>,
        patterns: Option<crate::pii::TenantPatterns>,
        policy: Policy,
        kind: crate::pii::StreamKind,
        family: crate::errors::Family,
    ) -> Self {
        Self {
            sse: crate::pii::SseRedactor::with_redactor(
                Redactor::new(scanner, patterns, policy),
                kind,
            ),
            scratch,
            family,
            refused: None,
        }
    }

    /// Ends a stream the guardrail cannot read (`why`), as [`Self::refuse`] does.
    pub(crate) fn refuse_unreadable(
        &mut self,
        ctx: &mut RequestCtx,
        why: &str,
        emit: &mut Vec<Vec<u8>>,
    ) {
        self.refuse(ctx, RedactError::Json(why.into()), emit);
    }

    /// Ends the stream: an error event in the client's grammar, and nothing after.
    fn refuse(&mut self, ctx: &mut RequestCtx, e: RedactError, emit: &mut Vec<Vec<u8>>) {
        let (refusal, err) = match e {
            RedactError::Blocked { entity, .. } => {
                ctx.guardrail_blocked = Some((entity, "response"));
                (
                    Refusal::Blocked(entity),
                    crate::gateway::guard::code(entity).with(
                        "the provider's answer holds what this environment's guardrail blocks; the stream was ended",
                    ),
                )
            }
            other => {
                tracing::error!(id = %ctx.id, error = %other, "a streamed answer could not be scanned; ended");
                (
                    Refusal::Unscannable,
                    crate::errors::ApiError::from(crate::errors::Code::GuardrailUnavailable),
                )
            }
        };
        ctx.error = Some(err.code);
        emit.push(crate::adapters::stream_error_event(self.family, &err));
        self.refused = Some(refusal);
    }
}

impl ResponseTransform for StreamGuard {
    fn rewrites(&self) -> bool {
        true
    }

    fn on_piece(
        &mut self,
        ctx: &mut RequestCtx,
        piece: &Piece<'_>,
        emit: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        if self.refused.is_some() {
            return Verdict::Drop;
        }
        let Piece::Event(e) = piece else {
            // Not an event stream after all: nothing of it is relayed unscanned.
            self.refuse_unreadable(ctx, "not an event stream", emit);
            return Verdict::Drop;
        };
        let Some(data) = &e.data else {
            return Verdict::Pass; // a comment or keep-alive
        };
        let (Ok(name), Ok(data)) = (std::str::from_utf8(e.event), std::str::from_utf8(data)) else {
            self.refuse(
                ctx,
                RedactError::Json("an event that is not UTF-8".into()),
                emit,
            );
            return Verdict::Drop;
        };
        let name = (!name.is_empty()).then_some(name);
        let result = self
            .sse
            .on_event(&mut self.scratch.borrow_mut(), name, data);
        match result {
            Ok(out) => {
                if let [only] = out.as_slice() {
                    if only.event.as_deref() == name && only.data == data {
                        return Verdict::Pass;
                    }
                }
                sse_bytes(out, emit);
                Verdict::Drop
            }
            Err(err) => {
                self.refuse(ctx, err, emit);
                Verdict::Drop
            }
        }
    }

    fn on_end(&mut self, ctx: &mut RequestCtx, _complete: bool, emit: &mut Vec<Vec<u8>>) {
        if self.refused.is_some() {
            return;
        }
        let result = self.sse.finish(&mut self.scratch.borrow_mut());
        match result {
            Ok(out) => sse_bytes(out, emit),
            Err(err) => self.refuse(ctx, err, emit),
        }
        ctx.redacted += self.sse.redactor().redacted();
    }
}
