//! The body phase: the request body is read as JSON once, here, and what routing needs
//! (`model`, `stream`) is recorded in the context. The key's model list is checked here,
//! since only the body names the model.

use crate::body::{BodyError, JsonBody};
use crate::errors::{ApiError, Code};
use crate::gateway::authenticate;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Head;

pub fn run<'b>(
    ctx: &mut RequestCtx,
    head: &Head<'_>,
    body: &'b [u8],
) -> Result<JsonBody<'b>, ApiError> {
    if !is_json(head) {
        return Err(Code::UnsupportedMediaType.into());
    }
    let parsed = JsonBody::parse(body).map_err(|e| match e {
        BodyError::DuplicateKey(_) => Code::DuplicateKey.with(e.to_string()),
        _ => Code::InvalidJson.with(e.to_string()),
    })?;
    let Some(model) = parsed.get_str("model") else {
        return Err(Code::MissingModel.into());
    };
    if let Some(identity) = &ctx.identity {
        if !authenticate::may_use(identity, &model) {
            return Err(
                Code::ModelNotAllowed.with(format!("the API key may not use the model `{model}`"))
            );
        }
    }
    ctx.model = Some(model.into());
    ctx.stream = parsed.get_bool("stream") == Some(true);
    Ok(parsed)
}

fn is_json(head: &Head<'_>) -> bool {
    head.header("content-type").is_some_and(|v| {
        let v = crate::h1::trim_ows(v);
        let mime = v.split(|&b| b == b';').next().unwrap_or(v);
        crate::h1::trim_ows(mime).eq_ignore_ascii_case(b"application/json")
    })
}
