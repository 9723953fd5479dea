//! The response transform stage: upstream bodies reach the client through an ordered list of
//! transforms, each seeing decoded data — the de-chunked body, or, for a stream, complete
//! SSE events (split across reads or not) — and each able to pass, rewrite, drop or hold
//! back what it sees, and to emit what it held.
//!
//! What every transform passes goes out as the bytes that arrived, uncopied when they lie
//! in one upstream read; the stage tells the response phase whether the body's length can
//! change ([`Stage::rewrites`]), in which case the client gets it chunked. A transform that
//! holds something back bounds what it holds itself.
//!
//! Transforms are an enum, dispatched statically: the list is built per response and
//! costs no allocation.

use std::ops::Range;

use crate::gateway::ctx::RequestCtx;
use crate::gateway::response::{
    guard::{Refusal, ResponseGuard, StreamGuard},
    stream_usage::StreamUsageStrip,
    usage::UsageTap,
};
use crate::h1::sse::{SseEvent, SseFramer, SseTooLarge};
use crate::server::respond::Responder;

/// What a transform sees.
#[derive(Debug)]
pub(crate) enum Piece<'a> {
    /// A complete event of a stream.
    Event(&'a SseEvent<'a>),
    /// Part of a body that is not a stream; `last` ends it.
    Body { data: &'a [u8], last: bool },
}

/// What becomes of a piece.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    /// Not sent (dropped, or held back by the transform to be emitted later).
    Drop,
    /// Sent as these bytes instead (a complete event, for a stream).
    Replace(Vec<u8>),
}

/// One response transform.
pub(crate) trait ResponseTransform {
    /// Whether it may change the body's bytes.
    fn rewrites(&self) -> bool;

    /// Sees one piece; `emit` takes pieces to send before this one's verdict (what it held).
    fn on_piece(
        &mut self,
        ctx: &mut RequestCtx,
        piece: &Piece<'_>,
        emit: &mut Vec<Vec<u8>>,
    ) -> Verdict;

    /// The body ended (`complete`: as the upstream framed it, not cut short); `emit` takes
    /// anything still held.
    fn on_end(&mut self, _ctx: &mut RequestCtx, _complete: bool, _emit: &mut Vec<Vec<u8>>) {}
}

/// The transforms a response can go through, in the order they run.
#[derive(Debug)]
pub(crate) enum Transform {
    /// Reads the provider's token counts into the context.
    Usage(UsageTap),
    /// Takes out the usage the gateway asked for on the client's behalf.
    StreamUsage(StreamUsageStrip),
    /// Redacts or refuses what the environment's response guardrails name.
    Guard(Box<ResponseGuard>),
    /// The same for an event stream.
    StreamGuard(Box<StreamGuard>),
    #[cfg(test)]
    Test(tests::Scripted),
}

impl ResponseTransform for Transform {
    fn rewrites(&self) -> bool {
        match self {
            Self::Usage(t) => t.rewrites(),
            Self::StreamUsage(t) => t.rewrites(),
            Self::Guard(t) => t.rewrites(),
            Self::StreamGuard(t) => t.rewrites(),
            #[cfg(test)]
            Self::Test(t) => t.rewrites(),
        }
    }

    fn on_piece(
        &mut self,
        ctx: &mut RequestCtx,
        piece: &Piece<'_>,
        emit: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        match self {
            Self::Usage(t) => t.on_piece(ctx, piece, emit),
            Self::StreamUsage(t) => t.on_piece(ctx, piece, emit),
            Self::Guard(t) => t.on_piece(ctx, piece, emit),
            Self::StreamGuard(t) => t.on_piece(ctx, piece, emit),
            #[cfg(test)]
            Self::Test(t) => t.on_piece(ctx, piece, emit),
        }
    }

    fn on_end(&mut self, ctx: &mut RequestCtx, complete: bool, emit: &mut Vec<Vec<u8>>) {
        match self {
            Self::Usage(t) => t.on_end(ctx, complete, emit),
            Self::StreamUsage(t) => t.on_end(ctx, complete, emit),
            Self::Guard(t) => t.on_end(ctx, complete, emit),
            Self::StreamGuard(t) => t.on_end(ctx, complete, emit),
            #[cfg(test)]
            Self::Test(t) => t.on_end(ctx, complete, emit),
        }
    }
}

/// Largest single event the stage assembles from several reads.
pub(crate) const MAX_EVENT: usize = 1 << 20;

/// A response body on its way through the transforms.
#[derive(Debug)]
pub(crate) struct Stage {
    transforms: smallvec::SmallVec<[Transform; 2]>,
    /// Set for event streams.
    framer: Option<SseFramer>,
    /// An event too large to assemble arrived: the rest of the stream passes untouched.
    passthrough: bool,
}

/// Where the stage's output goes: the responder (each push one chunk of a chunked body).
pub(crate) trait BodySink {
    fn push(&mut self, data: &[u8]);
}

impl BodySink for Responder<'_> {
    fn push(&mut self, data: &[u8]) {
        self.push_body(data);
    }
}

/// The stage's output: runs of the current chunk, kept as ranges until another piece breaks
/// them, so passed bytes are copied once, into the sink.
struct Output<'o, S: BodySink> {
    chunk: &'o [u8],
    run: Option<Range<usize>>,
    resp: &'o mut S,
}

impl<S: BodySink> Output<'_, S> {
    fn put(&mut self, raw: &[u8], range: Option<Range<usize>>) {
        match (range, &mut self.run) {
            (Some(r), Some(run)) if run.end == r.start => run.end = r.end,
            (Some(r), _) => {
                self.flush_run();
                self.run = Some(r);
            }
            (None, _) => {
                self.flush_run();
                self.resp.push(raw);
            }
        }
    }

    fn flush_run(&mut self) {
        if let Some(r) = self.run.take() {
            self.resp.push(&self.chunk[r]);
        }
    }
}

impl Stage {
    pub(crate) fn new(transforms: smallvec::SmallVec<[Transform; 2]>, event_stream: bool) -> Self {
        Self {
            transforms,
            framer: event_stream.then(|| SseFramer::new(MAX_EVENT)),
            passthrough: false,
        }
    }

    /// Whether the body's bytes may change on the way.
    pub(crate) fn rewrites(&self) -> bool {
        self.transforms.iter().any(ResponseTransform::rewrites)
    }

    /// Whether a transform holds the whole body until its end (nothing, not even the head,
    /// should go out before: the response may yet be refused).
    pub(crate) fn holds_body(&self) -> bool {
        self.framer.is_none() && self.guard().is_some()
    }

    /// Why the stream guardrail ended this stream, if it did: nothing more is relayed.
    pub(crate) fn stream_refused(&self) -> Option<Refusal> {
        self.transforms.iter().find_map(|t| match t {
            Transform::StreamGuard(g) => g.refused,
            _ => None,
        })
    }

    /// The response guardrail, when this response has one.
    pub(crate) fn guard(&self) -> Option<&ResponseGuard> {
        self.transforms.iter().find_map(|t| match t {
            Transform::Guard(g) => Some(&**g),
            _ => None,
        })
    }

    /// Runs the transforms over the next decoded bytes of the body and pushes what they
    /// let through to `resp` (the caller flushes it).
    pub(crate) fn feed<S: BodySink>(
        &mut self,
        ctx: &mut RequestCtx,
        data: &[u8],
        last: bool,
        resp: &mut S,
    ) {
        let mut out = Output {
            chunk: data,
            run: None,
            resp,
        };
        if self.passthrough {
            out.put(data, Some(0..data.len()));
        } else if let Some(framer) = &mut self.framer {
            let transforms = &mut self.transforms;
            let fed = framer.feed(data, |raw, range| {
                let event = SseEvent::parse(raw);
                through(transforms, ctx, &Piece::Event(&event), raw, range, &mut out);
            });
            if let Err(SseTooLarge { max, unsent_from }) = fed {
                let guard = transforms.iter_mut().find_map(|t| match t {
                    Transform::StreamGuard(g) => Some(g),
                    _ => None,
                });
                if let Some(g) = guard {
                    // A guarded stream is never relayed unscanned: it ends here, the way
                    // the guardrail ends any stream it cannot read.
                    tracing::warn!(id = %ctx.id, max, "stream event too large to scan; the stream is ended");
                    let mut emitted = Vec::new();
                    g.refuse_unreadable(ctx, "an event too large to scan", &mut emitted);
                    out.flush_run();
                    for e in emitted {
                        out.resp.push(&e);
                    }
                    return;
                }
                // The event's start was held back: it goes out now, with everything after
                // it, untouched.
                tracing::warn!(id = %ctx.id, max, "stream event too large to transform; relaying the rest untouched");
                self.passthrough = true;
                out.flush_run();
                out.resp.push(framer.incomplete());
                out.put(&data[unsent_from..], Some(unsent_from..data.len()));
            }
        } else {
            through(
                &mut self.transforms,
                ctx,
                &Piece::Body { data, last },
                data,
                Some(0..data.len()),
                &mut out,
            );
        }
        out.flush_run();
    }

    /// The body ended; what transforms still hold is pushed to `resp`. An event stream's
    /// trailing bytes that never formed a complete event go out as they came.
    pub(crate) fn end<S: BodySink>(&mut self, ctx: &mut RequestCtx, complete: bool, resp: &mut S) {
        let mut out = Output {
            chunk: &[],
            run: None,
            resp,
        };
        for i in 0..self.transforms.len() {
            let mut emitted = Vec::new();
            self.transforms[i].on_end(ctx, complete, &mut emitted);
            let (_, rest) = self.transforms.split_at_mut(i + 1);
            for e in emitted {
                emit_through(rest, ctx, self.framer.is_some(), &e, &mut out);
            }
        }
        if let Some(f) = &self.framer {
            if !self.passthrough && !f.incomplete().is_empty() {
                out.put(f.incomplete(), None);
            }
        }
    }
}

/// Runs `piece` through `ts` in order and puts what comes out.
fn through<S: BodySink>(
    ts: &mut [Transform],
    ctx: &mut RequestCtx,
    piece: &Piece<'_>,
    raw: &[u8],
    range: Option<Range<usize>>,
    out: &mut Output<'_, S>,
) {
    let Some((first, rest)) = ts.split_first_mut() else {
        out.put(raw, range);
        return;
    };
    let mut emitted = Vec::new();
    let verdict = first.on_piece(ctx, piece, &mut emitted);
    let is_event = matches!(piece, Piece::Event(_));
    for e in emitted {
        emit_through(rest, ctx, is_event, &e, out);
    }
    match verdict {
        Verdict::Pass => through(rest, ctx, piece, raw, range, out),
        Verdict::Drop => {}
        Verdict::Replace(bytes) => emit_through(rest, ctx, is_event, &bytes, out),
    }
}

/// Runs bytes a transform produced through the transforms after it.
fn emit_through<S: BodySink>(
    ts: &mut [Transform],
    ctx: &mut RequestCtx,
    is_event: bool,
    bytes: &[u8],
    out: &mut Output<'_, S>,
) {
    if is_event {
        let event = SseEvent::parse(bytes);
        through(ts, ctx, &Piece::Event(&event), bytes, None, out);
    } else {
        through(
            ts,
            ctx,
            &Piece::Body {
                data: bytes,
                last: false,
            },
            bytes,
            None,
            out,
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A transform scripted by the events' data: `drop` is dropped, `hold` is held back and
    /// emitted before the next event, `up` is rewritten to upper case; the rest passes.
    #[derive(Debug, Default)]
    pub(crate) struct Scripted {
        held: Option<Vec<u8>>,
        pub(crate) seen: Vec<String>,
    }

    impl ResponseTransform for Scripted {
        fn rewrites(&self) -> bool {
            true
        }

        fn on_piece(
            &mut self,
            _ctx: &mut RequestCtx,
            piece: &Piece<'_>,
            emit: &mut Vec<Vec<u8>>,
        ) -> Verdict {
            let Piece::Event(e) = piece else {
                return Verdict::Pass;
            };
            self.seen
                .push(String::from_utf8_lossy(e.data()).into_owned());
            if let Some(h) = self.held.take() {
                emit.push(h);
            }
            match e.data() {
                b"drop" => Verdict::Drop,
                b"hold" => {
                    self.held = Some(e.raw.to_vec());
                    Verdict::Drop
                }
                b"up" => Verdict::Replace(b"data: UP\n\n".to_vec()),
                _ => Verdict::Pass,
            }
        }

        fn on_end(&mut self, _ctx: &mut RequestCtx, _complete: bool, emit: &mut Vec<Vec<u8>>) {
            emit.extend(self.held.take());
        }
    }

    /// Collects what the stage sends, and counts the pushes.
    #[derive(Default)]
    struct Sink(Vec<u8>, usize);

    impl BodySink for Sink {
        fn push(&mut self, data: &[u8]) {
            self.0.extend_from_slice(data);
            self.1 += 1;
        }
    }

    pub(crate) fn ctx() -> RequestCtx {
        RequestCtx::new(
            crate::server::request_id::RequestIdGen::new().next_id(),
            crate::errors::Family::Openai,
            std::time::Instant::now(),
        )
    }

    /// What a client receives from a stage over `chunks`, whatever the reads' boundaries.
    fn relay(mut stage: Stage, chunks: &[&[u8]]) -> (Vec<u8>, Stage) {
        let mut out = Vec::new();
        let mut ctx = ctx();
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut sink = Sink::default();
            stage.feed(&mut ctx, c, last, &mut sink);
            out.extend(sink.0);
        }
        let mut sink = Sink::default();
        stage.end(&mut ctx, true, &mut sink);
        out.extend(sink.0);
        (out, stage)
    }

    fn scripted() -> Stage {
        Stage::new(
            smallvec::smallvec![Transform::Test(Scripted::default())],
            true,
        )
    }

    #[test]
    fn events_pass_drop_rewrite_and_are_held_back_across_any_split() {
        let input: &[u8] =
            b"data: a\n\ndata: drop\n\n: ping\n\ndata: hold\n\ndata: b\n\ndata: up\n\ndata: hold\n\n";
        let expected: &[u8] =
            b"data: a\n\n: ping\n\ndata: hold\n\ndata: b\n\ndata: UP\n\ndata: hold\n\n";
        let (whole, stage) = relay(scripted(), &[input]);
        assert_eq!(
            String::from_utf8_lossy(&whole),
            String::from_utf8_lossy(expected)
        );
        let Transform::Test(t) = &stage.transforms[0] else {
            unreachable!()
        };
        assert_eq!(t.seen, ["a", "drop", "", "hold", "b", "up", "hold"]);
        for cut in 0..input.len() {
            let (got, _) = relay(scripted(), &[&input[..cut], &input[cut..]]);
            assert_eq!(got, expected, "cut at {cut}");
        }
    }

    #[test]
    fn passed_events_of_one_read_go_out_as_one_run() {
        let mut stage = scripted();
        let mut sink = Sink::default();
        stage.feed(
            &mut ctx(),
            b"data: a\n\ndata: b\n\ndata: c",
            false,
            &mut sink,
        );
        assert_eq!(sink.1, 1, "one push for two events");
        assert_eq!(sink.0, b"data: a\n\ndata: b\n\n");
    }

    #[test]
    fn an_event_too_large_to_assemble_is_relayed_untouched_with_the_rest() {
        let big = vec![b'x'; MAX_EVENT];
        let mut first = b"data: a\n\ndata: ".to_vec();
        first.extend_from_slice(&big[..10]);
        let mut second = big[10..].to_vec();
        second.extend_from_slice(b"\n\ndata: up\n\n");
        let (got, stage) = relay(scripted(), &[&first, &second]);
        let mut expected = first.clone();
        expected.extend_from_slice(&second);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "byte for byte, after the first event");
        assert!(stage.passthrough);
    }
}
