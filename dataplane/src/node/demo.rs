//! The built-in demo provider: answers OpenAI- and Anthropic-style requests itself, so a
//! fresh install can be tried with no provider account. It echoes the last user message.
//! Real upstreams replace it as soon as one is configured.

use serde_json::{json, Value};

use std::rc::Rc;

use crate::errors::{family_for_path, Code, Family};
use crate::server::respond::Responder;
use crate::server::service::{Finished, Head, Request, Response, Service, Verdict};
use crate::server::worker::WorkerCtx;

/// Model name the demo answers to (any name is accepted; this is what `/v1/models` lists).
pub const DEMO_MODEL: &str = "demo";

#[derive(Debug)]
pub struct DemoService {
    worker: Rc<WorkerCtx>,
}

impl DemoService {
    pub fn new(worker: &Rc<WorkerCtx>) -> Self {
        Self {
            worker: Rc::clone(worker),
        }
    }
}

/// A request as the demo reads it.
struct Req<'a> {
    head: Head<'a>,
    body: &'a [u8],
}

impl<'a> Req<'a> {
    fn id(&self) -> crate::server::request_id::RequestId {
        self.head.id
    }
    fn method(&self) -> &'a str {
        self.head.method()
    }
    fn path_only(&self) -> &'a str {
        self.head.path_only()
    }
    fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.head.header(name)
    }
    fn api_style(&self) -> Family {
        family_for_path(self.path_only())
    }
}

impl Service for DemoService {
    type Ctx = ();

    fn head(&self, head: &Head<'_>) -> Verdict<()> {
        super::whole_request(&self.worker, head)
    }

    async fn call(&self, _: &mut (), req: &mut Request<'_>, resp: &mut Responder<'_>) {
        let r = self.answer(&Req {
            head: req.head(),
            body: req.body(),
        });
        resp.send(r).await;
    }

    fn finish(&self, _: (), _: &Head<'_>, _: &Finished) {}
}

impl DemoService {
    fn answer(&self, req: &Req<'_>) -> Response {
        let style = req.api_style();
        match (req.method(), req.path_only()) {
            ("POST", "/v1/chat/completions") => chat_completion(req),
            ("POST", "/v1/messages") => anthropic_message(req),
            ("GET" | "HEAD", "/v1/models") => models(),
            (_, "/v1/chat/completions" | "/v1/messages" | "/v1/models") => Response::error(
                &Code::MethodNotAllowed.with("method not allowed on this path"),
                style,
            )
            .with_header(
                "allow",
                if req.path_only() == "/v1/models" {
                    "GET, HEAD"
                } else {
                    "POST"
                },
            ),
            _ => Response::error(&Code::NotFound.into(), style),
        }
    }
}

fn parse_json(req: &Req<'_>) -> Result<Value, Response> {
    let style = req.api_style();
    let is_json = req
        .header("content-type")
        .is_some_and(|v| v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/json"));
    if !is_json {
        return Err(Response::error(&Code::UnsupportedMediaType.into(), style));
    }
    match serde_json::from_slice::<Value>(req.body) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(Response::error(
            &Code::InvalidJson.with("request body is not a JSON object"),
            style,
        )),
    }
}

/// The text of the last user message: a string, or the text parts of a content array.
fn last_user_text(messages: Option<&Value>) -> Option<String> {
    let last = messages?
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")?;
    match &last["content"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// A 400 for a required field the request lacks; the message names it.
fn missing(message: &'static str, style: Family) -> Response {
    Response::error(&Code::InvalidRequest.with(message), style)
}

fn chat_completion(req: &Req<'_>) -> Response {
    let body = match parse_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(model) = body["model"].as_str() else {
        return missing("`model` is required and must be a string", Family::Openai);
    };
    let Some(text) = last_user_text(body.get("messages")) else {
        return missing("`messages` must contain a user message", Family::Openai);
    };
    let reply = format!("(demo) You said: {text}");
    let prompt_tokens = approx_tokens(&text);
    let completion_tokens = approx_tokens(&reply);
    if body["stream"] == true {
        let include_usage = body["stream_options"]["include_usage"] == true;
        return openai_stream(
            req,
            model,
            &reply,
            include_usage,
            prompt_tokens,
            completion_tokens,
        );
    }
    let out = json!({
        "id": format!("chatcmpl-{}", req.id()),
        "object": "chat.completion",
        "created": crate::runtime::unix_seconds(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    });
    Response::json(200, out.to_string().into_bytes())
}

fn anthropic_message(req: &Req<'_>) -> Response {
    let body = match parse_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(model) = body["model"].as_str() else {
        return missing("model: field required", Family::Anthropic);
    };
    if !body["max_tokens"].is_u64() {
        return missing("max_tokens: field required", Family::Anthropic);
    }
    let Some(text) = last_user_text(body.get("messages")) else {
        return missing("messages: must contain a user message", Family::Anthropic);
    };
    let reply = format!("(demo) You said: {text}");
    if body["stream"] == true {
        return anthropic_stream(req, model, &reply, approx_tokens(&text));
    }
    let out = json!({
        "id": format!("msg_{}", req.id()),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": approx_tokens(&text), "output_tokens": approx_tokens(&reply)}
    });
    Response::json(200, out.to_string().into_bytes())
}

/// The reply as OpenAI chat chunks, a word per event, then `[DONE]`.
fn openai_stream(
    req: &Req<'_>,
    model: &str,
    reply: &str,
    include_usage: bool,
    prompt: u64,
    completion: u64,
) -> Response {
    let id = format!("chatcmpl-{}", req.id());
    let created = crate::runtime::unix_seconds();
    let mut out = String::new();
    let mut event = |v: Value| {
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
    };
    event(
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
    );
    for word in reply.split_inclusive(' ') {
        event(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]}),
        );
    }
    event(
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    );
    if include_usage {
        event(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}),
        );
    }
    out.push_str("data: [DONE]\n\n");
    Response {
        status: 200,
        content_type: "text/event-stream",
        body: out.into_bytes(),
        headers: Vec::new(),
        close: false,
    }
}

/// The reply as Anthropic message events.
fn anthropic_stream(req: &Req<'_>, model: &str, reply: &str, input: u64) -> Response {
    let mut out = String::new();
    let mut event = |name: &str, v: Value| {
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
    };
    event(
        "message_start",
        json!({"type": "message_start", "message": {"id": format!("msg_{}", req.id()), "type": "message",
        "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": 1}}}),
    );
    event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    for word in reply.split_inclusive(' ') {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        );
    }
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": approx_tokens(reply)}}),
    );
    event("message_stop", json!({"type": "message_stop"}));
    Response {
        status: 200,
        content_type: "text/event-stream",
        body: out.into_bytes(),
        headers: Vec::new(),
        close: false,
    }
}

fn models() -> Response {
    let out = json!({
        "object": "list",
        "data": [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "aigateway"}]
    });
    Response::json(200, out.to_string().into_bytes())
}

/// About four bytes per token; the demo only needs plausible figures.
fn approx_tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4).max(1)
}
