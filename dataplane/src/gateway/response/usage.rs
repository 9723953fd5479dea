//! Reads the provider's token counts into the request context, for every API family, from a
//! JSON body or a stream's events: OpenAI's `usage` (in the last chunk of a stream), the
//! Responses API's `response.completed`, Anthropic's `message_start` and `message_delta`;
//! and looks for keys of ours in what it reads ([`crate::gateway::leak`]). It only reads:
//! every piece passes.

use crate::adapters;
use crate::errors::Family;
use crate::gateway::ctx::RequestCtx;
use crate::gateway::response::stage::{Piece, ResponseTransform, Verdict};

/// Most bytes of a JSON response kept to read its usage from.
const MAX_JSON_OBSERVED: usize = 4 << 20;

#[derive(Debug)]
pub(crate) struct UsageTap {
    family: Family,
    /// A JSON body arriving in several pieces, kept until its end (bounded); `None` once
    /// it grew past the bound.
    json: Option<Vec<u8>>,
}

impl UsageTap {
    /// `json`: the body is a JSON document (not a stream).
    pub(crate) fn new(family: Family, json: bool) -> Self {
        Self {
            family,
            json: json.then(Vec::new),
        }
    }
}

impl ResponseTransform for UsageTap {
    fn rewrites(&self) -> bool {
        false
    }

    fn on_piece(
        &mut self,
        ctx: &mut RequestCtx,
        piece: &Piece<'_>,
        _: &mut Vec<Vec<u8>>,
    ) -> Verdict {
        match piece {
            Piece::Event(e) => {
                adapters::usage_from_event(self.family, e.event, e.data(), &mut ctx.usage);
                crate::gateway::leak::find(ctx, e.data(), "response");
            }
            Piece::Body { data, last } => {
                if let Some(j) = &mut self.json {
                    if j.is_empty() && *last {
                        // The whole body arrived at once (the usual case): read it in place.
                        ctx.usage = adapters::usage_from_json(self.family, data);
                        crate::gateway::leak::find(ctx, data, "response");
                        self.json = None;
                    } else if j.len() + data.len() <= MAX_JSON_OBSERVED {
                        j.extend_from_slice(data);
                        if *last {
                            ctx.usage = adapters::usage_from_json(self.family, j);
                            crate::gateway::leak::find(ctx, j, "response");
                            self.json = None;
                        }
                    } else {
                        self.json = None;
                    }
                }
            }
        }
        Verdict::Pass
    }
}
