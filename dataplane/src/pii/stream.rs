//! Redaction of text arriving in pieces (the `content` deltas of an SSE stream), with a
//! bounded hold-back and the same output as redacting the whole text at once.
//!
//! Why it is exact (`PII.md` has the long form): every match is at most `W` bytes wide (`W`
//! the widest unanchored pattern) or starts at an anchor (`-----BEGIN `, `eyJ`) and consists
//! of its class's bytes; validators look at most `CONTEXT` bytes outside their span; and
//! whether a candidate survives depends only on the candidates overlapping it. So text up to
//! `cut = len − W − CONTEXT` (moved back to an open anchor, and to the start of a surviving
//! candidate that crosses it) is final and is emitted; the rest waits.

use memchr::memmem;

use super::redact::{RedactError, Redactor};
use super::scanner::{kept, Cand};
use super::validate::CONTEXT;
use super::Scratch;

/// Redacts a stream piece by piece; see the module docs.
#[derive(Debug)]
pub struct StreamRedactor<'a> {
    redactor: Redactor<'a>,
    text: StreamText,
}

/// The hold-back state of one text, redacted through a [`Redactor`] it does not own: several
/// texts of one response (choices, content blocks) share one placeholder numbering.
#[derive(Debug, Default)]
pub(crate) struct StreamText {
    /// Original text from absolute offset `base`.
    buf: String,
    base: usize,
    /// Absolute offset up to which output has been produced.
    committed: usize,
    cands: Vec<Cand>,
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl<'a> StreamRedactor<'a> {
    pub fn new(redactor: Redactor<'a>) -> Self {
        Self {
            redactor,
            text: StreamText::default(),
        }
    }

    /// Adds a piece; returns the redacted text that is now final (possibly empty).
    pub fn push(&mut self, scratch: &mut Scratch, piece: &str) -> Result<String, RedactError> {
        self.text.push(&mut self.redactor, scratch, piece)
    }

    /// The end of the stream: returns everything still held back, redacted.
    pub fn finish(&mut self, scratch: &mut Scratch) -> Result<String, RedactError> {
        self.text.finish(&mut self.redactor, scratch)
    }

    /// Bytes received but not yet emitted.
    pub fn held_back(&self) -> usize {
        self.text.held_back()
    }

    /// The most [`held_back`](Self::held_back) can be after a `push`: `2 × (W + CONTEXT)`
    /// without an open anchor, `W_long + W + 2 × CONTEXT` with one (`PII.md`).
    pub fn hold_back_bound(&self) -> usize {
        hold_back_bound(&self.redactor)
    }

    /// The request's redactor (its placeholder numbering continues).
    pub fn into_redactor(self) -> Redactor<'a> {
        self.redactor
    }
}

/// [`StreamRedactor::hold_back_bound`] for texts redacted through `redactor`.
pub(crate) fn hold_back_bound(redactor: &Redactor<'_>) -> usize {
    let w = redactor.detect.short_width();
    let long = redactor.detect.max_width();
    (2 * (w + CONTEXT)).max(long + w + 2 * CONTEXT)
}

impl StreamText {
    /// Adds a piece; returns the redacted text that is now final (possibly empty).
    pub(crate) fn push(
        &mut self,
        redactor: &mut Redactor<'_>,
        scratch: &mut Scratch,
        piece: &str,
    ) -> Result<String, RedactError> {
        self.buf.push_str(piece);
        self.process(redactor, scratch, false)
    }

    /// The end of the text: returns everything still held back, redacted.
    pub(crate) fn finish(
        &mut self,
        redactor: &mut Redactor<'_>,
        scratch: &mut Scratch,
    ) -> Result<String, RedactError> {
        self.process(redactor, scratch, true)
    }

    /// Bytes received but not yet emitted.
    pub(crate) fn held_back(&self) -> usize {
        self.base + self.buf.len() - self.committed
    }

    fn process(
        &mut self,
        redactor: &mut Redactor<'_>,
        scratch: &mut Scratch,
        finished: bool,
    ) -> Result<String, RedactError> {
        let detect = redactor.detect.clone();
        let w = detect.short_width();
        let len = self.base + self.buf.len();
        let bytes = self.buf.as_bytes();
        let local = |abs: usize| abs - self.base;
        if !finished && len.saturating_sub(w + CONTEXT) <= self.committed {
            return Ok(String::new()); // nothing could be emitted: no scan
        }

        // Scan from far enough back that every candidate reaching past `committed` is seen
        // whole, with its left context.
        let mut from = self
            .committed
            .saturating_sub(w + CONTEXT + 1)
            .max(self.base);
        for &(long, lw) in detect.scanner.longs() {
            let lo = self.committed.saturating_sub(lw + CONTEXT).max(self.base);
            let hay = &bytes[local(lo)..local(self.committed)];
            if let Some(p) = memmem::find(hay, long.anchor) {
                from = from.min(lo + p);
            }
        }
        let from = self.base + floor_boundary(&self.buf, local(from));
        let mut cands = std::mem::take(&mut self.cands);
        redactor.candidates(scratch, &self.buf, self.base, from, &mut cands)?;
        if !finished {
            cands.retain(|c| c.end + CONTEXT <= len);
        }
        let keep = kept(&cands, detect.max_width());

        let cut = if finished {
            len
        } else {
            let mut cut = len.saturating_sub(w + CONTEXT);
            // An anchored match may still be growing: hold back from its anchor.
            for &(long, lw) in detect.scanner.longs() {
                let lo = self.committed.max(len.saturating_sub(lw + CONTEXT));
                for p in memmem::find_iter(&bytes[local(lo)..], long.anchor) {
                    let p = local(lo) + p;
                    let run = bytes[p..].iter().take_while(|&&b| (long.class)(b)).count();
                    if p + run + CONTEXT >= bytes.len() {
                        cut = cut.min(self.base + p);
                        break;
                    }
                }
            }
            let mut cut = self.base + floor_boundary(&self.buf, local(cut.max(self.committed)));
            // Never split a surviving candidate; they do not overlap, so one pass settles it.
            while let Some(c) = cands
                .iter()
                .zip(&keep)
                .find(|(c, k)| **k && c.start >= self.committed && c.start < cut && cut < c.end)
            {
                cut = c.0.start;
            }
            cut
        };

        let mut out = String::new();
        let applied = redactor.apply(
            &self.buf,
            self.base,
            self.committed,
            cut,
            &cands,
            &keep,
            &mut out,
        );
        self.cands = cands;
        applied?;
        self.committed = cut;

        // Keep enough already-emitted text to serve as left context next time.
        let retain = detect.max_width() + w + CONTEXT + 1;
        let keep_from = floor_boundary(
            &self.buf,
            local(self.committed.saturating_sub(retain).max(self.base)),
        );
        self.buf.drain(..keep_from);
        self.base += keep_from;
        Ok(out)
    }
}
