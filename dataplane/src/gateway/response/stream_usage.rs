//! Takes out of an OpenAI-style stream what the gateway's `stream_options.include_usage`
//! added (see the request transform `stream_usage`): the `"usage": null` member of every
//! chunk, and the final chunk that carries only the figures. The client receives what it
//! would have received without the gateway's addition; the usage tap, which runs first, has
//! read the figures by then.

use crate::adapters::openai::{chunk_usage, ChunkUsage};
use crate::gateway::ctx::RequestCtx;
use crate::gateway::response::stage::{Piece, ResponseTransform, Verdict};
use crate::h1::sse::{write_event, SseEvent};

#[derive(Debug, Default)]
pub(crate) struct StreamUsageStrip;

impl ResponseTransform for StreamUsageStrip {
    fn rewrites(&self) -> bool {
        true
    }

    fn on_piece(&mut self, _: &mut RequestCtx, piece: &Piece<'_>, _: &mut Vec<Vec<u8>>) -> Verdict {
        let Piece::Event(e) = piece else {
            return Verdict::Pass;
        };
        let data = e.data();
        if data.first() != Some(&b'{') {
            return Verdict::Pass; // [DONE], comments, keep-alives
        }
        match chunk_usage(data) {
            ChunkUsage::Absent => Verdict::Pass,
            ChunkUsage::Figures {
                only_usage: true, ..
            } => Verdict::Drop,
            ChunkUsage::Null { removable } | ChunkUsage::Figures { removable, .. } => {
                Verdict::Replace(without(e, removable))
            }
        }
    }
}

/// The event with `cut` (a range of its data) taken out.
fn without(e: &SseEvent<'_>, cut: std::ops::Range<usize>) -> Vec<u8> {
    match e.data_at {
        // One data line: edit the event in place, keeping every other byte.
        Some(at) => {
            let mut out = Vec::with_capacity(e.raw.len());
            out.extend_from_slice(&e.raw[..at + cut.start]);
            out.extend_from_slice(&e.raw[at + cut.end..]);
            out
        }
        None => {
            let data = e.data();
            let mut kept = Vec::with_capacity(data.len());
            kept.extend_from_slice(&data[..cut.start]);
            kept.extend_from_slice(&data[cut.end..]);
            let mut out = Vec::with_capacity(e.raw.len());
            write_event(e.event, &kept, &mut out);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::response::stage::tests::ctx;

    fn run(raw: &[u8]) -> Verdict {
        let e = SseEvent::parse(raw);
        StreamUsageStrip.on_piece(&mut ctx(), &Piece::Event(&e), &mut Vec::new())
    }

    #[test]
    fn null_usage_is_cut_and_the_usage_chunk_dropped() {
        assert_eq!(
            run(b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n"),
            Verdict::Replace(b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".to_vec())
        );
        assert_eq!(
            run(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"),
            Verdict::Drop
        );
        assert_eq!(run(b"data: [DONE]\n\n"), Verdict::Pass);
        assert_eq!(run(b": keep-alive\n\n"), Verdict::Pass);
        assert_eq!(
            run(b"data: {\"choices\":[{\"delta\":{}}]}\n\n"),
            Verdict::Pass
        );
        // Split over data lines: rewritten as one event of the same shape.
        assert_eq!(
            run(b"data: {\"choices\":[],\ndata: \"usage\":null}\n\n"),
            Verdict::Replace(b"data: {\"choices\":[]}\n\n".to_vec())
        );
    }
}
