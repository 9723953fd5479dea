//! The body log phase: for a request authenticated with a control plane's key, whose tenant
//! has not opted out and whose client did not ask for no logging ([`NO_LOG_HEADER`]), the
//! request body as forwarded (after the guardrail's redaction) and the response body as the
//! client received it (after the response transforms; for streams, the bytes relayed) are
//! kept, each up to [`MAX_BODY_BYTES`], and handed to the node's body queue when the request
//! ends. Nothing here waits: the control thread ships them ([`crate::config::bodies`]).

use crate::config::bodies::{Mode, Record, MAX_BODY_BYTES};
use crate::config::pushed::SharedConfig;
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::server::respond::{Captured, Responder};
use crate::server::service::{Finished, Head};

/// A client's request not to have this request's bodies logged: `1` or `true` (`0` or
/// `false` log as usual). Never forwarded upstream.
pub const NO_LOG_HEADER: &str = "x-aigw-no-log";

/// What is kept of one request while it runs.
#[derive(Debug)]
pub struct Capture {
    pub request: Vec<u8>,
    pub request_truncated: bool,
    pub response: Option<Captured>,
}

/// Whether the client asked for no logging; a value other than `1`, `true`, `0` or `false`
/// is refused, naming the header.
fn opted_out(head: &Head<'_>) -> Result<bool, ApiError> {
    let Some(v) = head.header(NO_LOG_HEADER) else {
        return Ok(false);
    };
    match v.trim_ascii() {
        b"1" => Ok(true),
        v if v.eq_ignore_ascii_case(b"true") => Ok(true),
        b"0" => Ok(false),
        v if v.eq_ignore_ascii_case(b"false") => Ok(false),
        _ => {
            Err(Code::InvalidRequest.with(format!("{NO_LOG_HEADER}: must be 1, true, 0 or false")))
        }
    }
}

/// Decides whether this request is logged, before it is forwarded: refuses it when its
/// tenant refuses while the queue is full; else keeps its body and has the responder keep
/// the response's.
pub fn start(
    shared: &SharedConfig,
    ctx: &mut RequestCtx,
    head: &Head<'_>,
    body: &[u8],
    resp: &mut Responder<'_>,
) -> Result<(), ApiError> {
    if opted_out(head)? {
        return Ok(());
    }
    let Some(id) = &ctx.identity else {
        return Ok(());
    };
    match shared.bodies.mode(&id.tenant_id) {
        Mode::Off => return Ok(()),
        Mode::Refuse if shared.bodies.full() => return Err(Code::BodyLogUnavailable.into()),
        Mode::Refuse | Mode::Drop => {}
    }
    let kept = body.len().min(MAX_BODY_BYTES);
    ctx.body_log = Some(Capture {
        request: body[..kept].to_vec(),
        request_truncated: body.len() > kept,
        response: None,
    });
    resp.capture(MAX_BODY_BYTES);
    Ok(())
}

/// The response is complete (or given up on): what went out is kept.
pub fn response(ctx: &mut RequestCtx, resp: &mut Responder<'_>) {
    if let Some(c) = &mut ctx.body_log {
        c.response = resp.take_captured();
    }
}

/// The request ended: its bodies go to the queue, or are dropped (counted and reported for
/// the tenant's audit log) when it is full.
pub fn finish(shared: &SharedConfig, ctx: &mut RequestCtx, done: &Finished) {
    let (Some(c), Some(id)) = (ctx.body_log.take(), &ctx.identity) else {
        return;
    };
    let response = c.response.unwrap_or_default();
    let meta = serde_json::json!({
        "environment": id.environment.name(),
        "key_id": &*id.key_id,
        "model": ctx.model.as_deref(),
        "stream": ctx.stream,
        "status": done.status,
        "error": done.error.or(ctx.error).map(|c| c.as_str()),
        "upstream": ctx.chosen.as_ref().map(|c| c.upstream.name.as_str()),
        "request_truncated": c.request_truncated,
        "response_truncated": response.truncated,
        "at_unix_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    });
    let record = Record {
        tenant_id: id.tenant_id.to_string(),
        request_id: ctx.id.to_string(),
        meta: meta.to_string(),
        request: c.request,
        response: response.bytes,
    };
    if !shared.bodies.push(record) {
        // Counted every time; reported for the tenant's audit log at most once a second,
        // with the number dropped since its last report, so an overload does not flood it.
        if let Some(dropped) = shared.bodies.drop_report_due(&id.tenant_id) {
            tracing::warn!(id = %ctx.id, tenant = %id.tenant_id, dropped, "the body log queue is full; requests' bodies are dropped");
            let detail = serde_json::json!({
                "tenant_id": &*id.tenant_id,
                "environment": id.environment.name(),
                "key_id": &*id.key_id,
                "request_id": ctx.id.to_string(),
                "dropped": dropped,
            });
            shared.usage.event("body_log.dropped", detail.to_string());
        }
    }
}
