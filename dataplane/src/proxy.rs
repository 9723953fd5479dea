//! The gateway service: route the request by model, run the body pipeline, send it to the
//! first upstream that takes it, and relay the answer.
//!
//! Phases, in order: endpoint and method → body parse → route → per target: pipeline →
//! upstream request → response head → (retry or fail over?) → relay. Retrying or failing
//! over happens only when the upstream cannot have acted on the request: nothing was sent, a
//! pooled connection turned out stale, or it answered 429/500/502/503/504 before any byte
//! reached the client. A first-byte timeout is never retried: the provider may still be
//! generating, and billing, the first attempt.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::json;

use crate::adapters::{self, Endpoint};
use crate::body::{BodyError, JsonBody};
use crate::config::ProviderKind;
use crate::errors::{ApiError, ApiStyle};
use crate::relay::{self, Attempt};
use crate::respond::Responder;
use crate::routes::Target;
use crate::routing::{NoTarget, Routing};
use crate::service::{Request, Response, Service};
use crate::upstream::pool::{CheckoutError, Pool};
use crate::worker::WorkerCtx;

/// One per worker.
#[derive(Debug)]
pub struct Gateway {
    ctx: Rc<WorkerCtx>,
    pool: Pool,
    pool_generation: Cell<u64>,
    /// The pushed routing the pools were last trimmed to.
    routing: RefCell<Arc<Routing>>,
}

impl Gateway {
    pub fn new(ctx: &Rc<WorkerCtx>) -> Self {
        Self {
            ctx: Rc::clone(ctx),
            pool: Pool::new(),
            pool_generation: Cell::new(0),
            routing: RefCell::new(Arc::new(Routing::empty())),
        }
    }
}

impl Service for Gateway {
    async fn call(&self, req: &Request<'_>, resp: &mut Responder<'_>) {
        let settings = self.ctx.settings.current();
        let pushed = self
            .ctx
            .keys
            .as_ref()
            .and_then(|k| k.routing_if_changed(self.routing.borrow().generation));
        if settings.generation != self.pool_generation.get() || pushed.is_some() {
            if let Some(r) = pushed {
                *self.routing.borrow_mut() = r;
            }
            let routing = self.routing.borrow();
            self.pool.retain(
                settings
                    .routes
                    .upstreams()
                    .iter()
                    .chain(routing.upstreams()),
            );
            self.pool_generation.set(settings.generation);
        }
        let style = req.api_style();
        let Some(endpoint) = Endpoint::from_path(req.path_only()) else {
            let err = ApiError::downstream(
                404,
                "not_found",
                format!("no such endpoint: {}", req.path_only()),
            );
            return resp.send(Response::error(err, style)).await;
        };
        if req.method() != endpoint.method()
            && !(endpoint == Endpoint::Models && req.method() == "HEAD")
        {
            let err = ApiError::downstream(
                405,
                "method_not_allowed",
                format!("{} is not allowed here", req.method()),
            );
            let allow = if endpoint == Endpoint::Models {
                "GET, HEAD"
            } else {
                "POST"
            };
            return resp
                .send(Response::error(err, style).with_header("allow", allow))
                .await;
        }
        let family = endpoint.family();
        let style = ApiStyle::from(family);
        // Authenticate before reading the body: a request without a valid key costs us no
        // parsing.
        let key = match &self.ctx.keys {
            None => None,
            Some(keys) => {
                if !self.ctx.max_stale.is_zero()
                    && keys
                        .shared()
                        .age_seconds()
                        .is_none_or(|a| a > self.ctx.max_stale.as_secs())
                {
                    let err = ApiError::internal(
                        503,
                        "stale_config",
                        "this gateway has lost its control plane for too long",
                    );
                    return resp.send(Response::error(err, style)).await;
                }
                let presented = crate::auth::presented_key(family, |n| req.header(n));
                match keys.authenticate(presented, unix_now()) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        resp.log.error_code = Some(e.to_api().code);
                        return resp.send(Response::error(e.to_api(), style)).await;
                    }
                }
            }
        };
        if endpoint == Endpoint::Models {
            let table = match &key {
                // With a control plane, the key's environment decides what is routable.
                Some(k) => k.routes.as_ref().map(|r| &r.table),
                None => Some(&*settings.routes),
            };
            return resp.send(models(table)).await;
        }
        if !is_json(req) {
            let err = ApiError::downstream(
                415,
                "unsupported_media_type",
                "request body must be application/json",
            );
            return resp.send(Response::error(err, style)).await;
        }
        let parsed = match JsonBody::parse(req.body) {
            Ok(b) => b,
            Err(e) => {
                let code = match e {
                    BodyError::DuplicateKey(_) => "duplicate_key",
                    _ => "invalid_json",
                };
                return resp
                    .send(Response::error(
                        ApiError::downstream(400, code, e.to_string()),
                        style,
                    ))
                    .await;
            }
        };
        let Some(model) = parsed.get_str("model") else {
            let err = ApiError::downstream(
                400,
                "missing_model",
                "`model` is required and must be a string",
            );
            return resp.send(Response::error(err, style)).await;
        };
        if let Some(entry) = &key {
            if let Err(e) = crate::auth::check_model(entry, &model) {
                return resp.send(Response::error(e.to_api(), style)).await;
            }
        }
        let targets = match &key {
            Some(k) => match &k.routes {
                Some(env) => env.lookup(&model, family),
                None => Err(NoTarget::NoRoute),
            },
            None => {
                let t = settings.routes.lookup(&model, family);
                if t.is_empty() {
                    Err(NoTarget::NoRoute)
                } else {
                    Ok(t)
                }
            }
        };
        let targets = match targets {
            Ok(t) => t,
            Err(NoTarget::NoRoute) => {
                let err = ApiError::downstream(
                    404,
                    "model_not_found",
                    format!("no route for model `{model}` on this API"),
                );
                return resp.send(Response::error(err, style)).await;
            }
            Err(NoTarget::Policy(why)) => {
                let err = ApiError::downstream(
                    403,
                    "policy_blocked",
                    format!(
                        "no upstream for model `{model}` meets this environment's {why} policy"
                    ),
                );
                return resp.send(Response::error(err, style)).await;
            }
        };
        self.forward(req, resp, &parsed, &targets, family).await;
    }
}

impl Gateway {
    async fn forward(
        &self,
        req: &Request<'_>,
        resp: &mut Responder<'_>,
        parsed: &JsonBody<'_>,
        targets: &[&Target],
        family: ProviderKind,
    ) {
        let style = ApiStyle::from(family);
        let mut last_err =
            ApiError::upstream(502, "upstream_unavailable", "no upstream could be reached");
        let mut attempts = 0;
        for (i, target) in targets.iter().enumerate() {
            let is_last = i + 1 == targets.len();
            let up = &target.upstream;
            let outgoing = crate::pipeline::prepare(parsed, req.body, target);
            // One fresh retry on the same upstream when a pooled connection was stale.
            let mut fresh_only = false;
            loop {
                attempts += 1;
                resp.log.attempts = attempts;
                resp.log.upstream = Some(Arc::clone(up));
                let mut lease = match self.pool.checkout(up).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(id = %req.id, upstream = %up.name, error = %e, "upstream unavailable");
                        last_err = match e {
                            CheckoutError::Exhausted(_) => ApiError::internal(
                                503,
                                "upstream_busy",
                                "too many requests in flight to this upstream",
                            ),
                            CheckoutError::Connect(_) => ApiError::upstream(
                                502,
                                "upstream_unavailable",
                                "the upstream could not be reached",
                            ),
                        };
                        break; // nothing was sent: fail over
                    }
                };
                if fresh_only && lease.reused {
                    // Another stale one: drop it and connect anew.
                    drop(lease);
                    continue;
                }
                let body = &outgoing.body;
                let reserve = if lease.conn.sends_from_one_buffer(body.len()) {
                    body.len()
                } else {
                    0
                };
                let head = build_head(
                    req,
                    target,
                    body.len(),
                    &outgoing.headers,
                    family,
                    reserve,
                    lease.conn.take_send_buffer(),
                );
                let outcome = relay::exchange(
                    &self.pool, up, lease, head, body, req, resp, family, !is_last,
                )
                .await;
                match outcome {
                    Attempt::Done => return,
                    Attempt::Stale => {
                        if fresh_only {
                            last_err = ApiError::upstream(
                                502,
                                "upstream_unavailable",
                                "the upstream closed the connection",
                            );
                            break;
                        }
                        fresh_only = true;
                    }
                    Attempt::FailOver(err) => {
                        last_err = err;
                        break;
                    }
                    Attempt::Fail(err) => {
                        resp.log.error_code = Some(err.code);
                        return resp.send(Response::error(err, style)).await;
                    }
                }
            }
        }
        resp.log.error_code = Some(last_err.code);
        resp.send(Response::error(last_err, style)).await;
    }
}

/// Writes the forwarded head into `out` (cleared first; it is the connection's send buffer,
/// so its capacity carries over between requests): the generated request line and Host,
/// then the client's kept header lines copied as runs of the original bytes, then the
/// gateway's own fields. `reserve` more bytes are reserved behind it for the body when the
/// request will be sent from one buffer.
fn build_head(
    req: &Request<'_>,
    target: &Target,
    body_len: usize,
    extra: &[u8],
    family: ProviderKind,
    reserve: usize,
    mut out: Vec<u8>,
) -> Vec<u8> {
    let up = &target.upstream;
    let raw = req.raw();
    let index = req.index();
    out.clear();
    out.reserve(raw.len() + 256 + extra.len() + reserve);
    out.extend_from_slice(req.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(up.url.path_prefix.as_bytes());
    out.extend_from_slice(req.path().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(up.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");

    // Tokens named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    let connection = req.header("connection").unwrap_or_default();
    let mut run: Option<(usize, usize)> = None;
    for f in &index.fields {
        let name = f.name.get(raw);
        let line_start = f.name.start as usize;
        let line_end = memchr::memchr(b'\n', &raw[f.value.end as usize..])
            .map_or(raw.len(), |i| f.value.end as usize + i + 1);
        let keep = !aigw_wire::rules::is_reserved_request_header(name)
            && !crate::h1::list_contains(connection, name);
        match (keep, run) {
            (true, Some((s, e))) if e == line_start => run = Some((s, line_end)),
            (true, Some((s, e))) => {
                out.extend_from_slice(&raw[s..e]);
                run = Some((line_start, line_end));
            }
            (true, None) => run = Some((line_start, line_end)),
            (false, Some((s, e))) => {
                out.extend_from_slice(&raw[s..e]);
                run = None;
            }
            (false, None) => {}
        }
    }
    if let Some((s, e)) = run {
        out.extend_from_slice(&raw[s..e]);
    }

    if let Some(cred) = &up.credential {
        adapters::write_credential(up.kind, cred.expose(), &mut out);
    }
    if family == ProviderKind::Anthropic && req.header("anthropic-version").is_none() {
        out.extend_from_slice(b"anthropic-version: ");
        out.extend_from_slice(adapters::anthropic::DEFAULT_VERSION.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(extra);
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Whole seconds are what key expiry compares.
fn unix_now() -> u64 {
    crate::deadline::coarse_unix_secs()
}

fn is_json(req: &Request<'_>) -> bool {
    req.header("content-type").is_some_and(|v| {
        let v = crate::h1::trim_ows(v);
        let mime = v.split(|&b| b == b';').next().unwrap_or(v);
        crate::h1::trim_ows(mime).eq_ignore_ascii_case(b"application/json")
    })
}

fn models(routes: Option<&crate::routes::RouteTable>) -> Response {
    let data: Vec<_> = routes
        .map(|r| r.model_names())
        .unwrap_or_default()
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "aigateway"}))
        .collect();
    Response::json(
        200,
        json!({"object": "list", "data": data})
            .to_string()
            .into_bytes(),
    )
}
