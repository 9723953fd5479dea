//! The first phase: which endpoint the request is for, and whether its method is the one
//! that endpoint takes. It fixes the API family, hence the error shape of every later
//! refusal.

use crate::adapters::Endpoint;
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::server::service::{Head, Response};

/// Records the endpoint in `ctx`; an unknown path or a wrong method ends the request.
pub fn run(ctx: &mut RequestCtx, head: &Head<'_>) -> Result<(), Response> {
    let Some(endpoint) = Endpoint::from_path(head.path_only()) else {
        let err = Code::NotFound.with(format!("no such endpoint: {}", head.path_only()));
        return Err(refuse(ctx, &err));
    };
    ctx.family = endpoint.family();
    ctx.endpoint = Some(endpoint);
    let method = head.method();
    let allowed = method == endpoint.method() || (endpoint == Endpoint::Models && method == "HEAD");
    if !allowed {
        let err = Code::MethodNotAllowed.with(format!("{method} is not allowed here"));
        let allow = if endpoint == Endpoint::Models {
            "GET, HEAD"
        } else {
            "POST"
        };
        return Err(refuse(ctx, &err).with_header("allow", allow));
    }
    Ok(())
}

fn refuse(ctx: &mut RequestCtx, err: &ApiError) -> Response {
    ctx.error = Some(err.code);
    Response::error(err, ctx.family)
}
