//! The gateway: a request's path as named phases, run in a fixed order, each in its own
//! module with one entry point, each able to end the request with an error from the
//! catalogue ([`crate::errors::Code`]):
//!
//! ```text
//!  head parsed → context created (id, API family, timings)      ctx
//!    endpoint       path and method → endpoint, family          endpoint
//!    authenticate   key → identity                              authenticate
//!    rate limit     the key's requests and tokens per minute     limit
//!    admit          reserve what the request may hold           admit
//!  body read
//!    leak, guard    keys of ours seen; PII redacted or refused  leak, guard
//!    body log       bodies kept for the tenant's body log        bodylog
//!    parse          JSON once; model, stream; the key's models  parse
//!    route          model → targets, policy filters             route
//!    spend          the most it may cost, reserved from caps     spend
//!    request xform  per target: body edits, upstream head       request
//!    exchange       send, read the head; fail over              exchange
//!    response xform head filter; body/events → transforms       response
//!                   (usage, stream usage, response guardrail)
//!    finish         tokens charged, spend settled, leaks         limit, spend, leak, meter,
//!                   metered, metrics counted, access log        observe, log
//! ```
//!
//! Nothing is reserved and no body byte is read before a request is authenticated: the
//! phases up to admit run on the head alone ([`Service::head`]).

pub mod admit;
pub mod authenticate;
pub mod bodylog;
pub mod ctx;
pub mod endpoint;
pub mod exchange;
pub(crate) mod guard;
pub(crate) mod leak;
pub(crate) mod limit;
pub mod log;
pub(crate) mod meter;
pub mod models;
pub(crate) mod observe;
pub mod parse;
pub mod request;
pub mod response;
pub mod route;
pub mod spend;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::keys::Environment;

use crate::adapters::Endpoint;
use crate::config::pushed::SharedConfig;
use crate::config::routing::Routing;
use crate::config::settings::Settings;
use crate::errors::{family_for_path, ApiError};
use crate::server::respond::Responder;
use crate::server::service::{Finished, Head, Request, Response, Service, Verdict};
use crate::server::worker::WorkerCtx;
use crate::upstream::pool::Pool;
use authenticate::LocalConfig;
use ctx::RequestCtx;
use exchange::Exchanged;

/// Where a node's keys and routing come from when it has a control plane.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub config: Arc<SharedConfig>,
    /// Environments whose keys this node accepts.
    pub served: Vec<Environment>,
    /// Longest time without the control plane before requests are refused (0 = forever).
    pub max_stale: Duration,
    /// The PII and secret scanner; `None` when it could not be built (requests that need
    /// a guardrail are then refused).
    pub scanner: Option<&'static crate::pii::Scanner>,
}

/// One per worker.
#[derive(Debug)]
pub struct Gateway {
    worker: Rc<WorkerCtx>,
    /// The pushed configuration, as this worker sees it.
    keys: Option<LocalConfig>,
    pool: Pool,
    pool_generation: Cell<u64>,
    /// The pushed routing the pools were last trimmed to.
    routing: RefCell<Arc<Routing>>,
    /// This worker's usage counters, reported to the control plane.
    meter: meter::Meter,
    observer: observe::Observer,
    guard: Option<guard::Guard>,
    limits: limit::Local,
    leases: spend::Local,
}

impl Gateway {
    pub fn new(worker: &Rc<WorkerCtx>, pushed: Option<Pushed>) -> Self {
        let guard = pushed
            .as_ref()
            .and_then(|p| p.scanner)
            .and_then(guard::Guard::new);
        Self {
            guard,
            limits: limit::Local::default(),
            leases: spend::Local::default(),
            worker: Rc::clone(worker),
            keys: pushed.map(|p| LocalConfig::new(p.config, p.served, p.max_stale)),
            pool: Pool::new(),
            pool_generation: Cell::new(0),
            routing: RefCell::new(Arc::new(Routing::empty())),
            meter: meter::Meter::default(),
            observer: observe::Observer::default(),
        }
    }

    /// Closes the pooled connections of upstreams no configuration names any more.
    fn trim_pools(&self, settings: &Settings) {
        let pushed = self
            .keys
            .as_ref()
            .and_then(|k| k.routing_if_changed(self.routing.borrow().generation));
        if settings.generation == self.pool_generation.get() && pushed.is_none() {
            return;
        }
        if let Some(r) = pushed {
            *self.routing.borrow_mut() = r;
        }
        let routing = self.routing.borrow();
        self.pool.retain(
            settings
                .routes
                .table
                .upstreams()
                .iter()
                .chain(routing.upstreams()),
        );
        self.pool_generation.set(settings.generation);
    }

    /// The phases after the body arrived; an error ends the request at the phase that
    /// returned it.
    async fn serve(
        &self,
        ctx: &mut RequestCtx,
        req: &mut Request<'_>,
        resp: &mut Responder<'_>,
    ) -> Result<(), ApiError> {
        if let Some(keys) = &self.keys {
            if let Err(response) = limit::wait(keys.shared(), ctx).await {
                ctx.error = Some(crate::errors::Code::RateLimitExceeded);
                resp.send(response).await;
                return Ok(());
            }
        }
        let settings = self.worker.settings.current();
        self.trim_pools(&settings);
        // Without a control plane, the file's routing serves every request.
        let routes = match &ctx.identity {
            Some(id) => id.routes.clone(),
            None if self.keys.is_none() => Some(Arc::clone(&settings.routes)),
            None => None,
        };
        if ctx.endpoint == Some(Endpoint::Models) {
            resp.send(models::answer(routes.as_deref().map(|r| &r.table)))
                .await;
            return Ok(());
        }
        let head = req.head();
        let body = req.body().clone();
        if self.keys.is_some() {
            leak::find(ctx, &body, "request");
        }
        let body =
            guard::requests(self.guard.as_ref(), ctx, routes.as_deref(), &body)?.unwrap_or(body);
        if let Some(keys) = &self.keys {
            bodylog::start(keys.shared(), ctx, &head, &body, resp)?;
        }
        let parsed = parse::run(ctx, &head, &body)?;
        let targets = route::run(ctx, routes.as_deref())?;
        if let Some(keys) = &self.keys {
            spend::run(
                ctx,
                &parsed,
                body.len(),
                &self.leases,
                &keys.shared().leases,
            )
            .await?;
        }
        let answer =
            match exchange::run(&self.pool, ctx, &head, &parsed, &body, &targets, resp).await {
                Exchanged::Answer(a) => a,
                Exchanged::ClientGone => return Ok(()),
                Exchanged::Error(e) => return Err(e),
            };
        // No retry is possible from here: the request's memory goes back now rather than
        // at the end of a stream that may last minutes.
        drop(targets);
        drop(parsed);
        drop(body);
        req.release_body();
        response::run(&self.pool, ctx, answer, resp, self.guard.as_ref()).await;
        Ok(())
    }
}

impl Service for Gateway {
    /// Boxed: the context lives as long as its request, and the connection's task holds
    /// what it holds by value in several of its states (the head's verdict, the call's
    /// argument): a pointer there instead of the whole context keeps every open
    /// connection's task smaller.
    type Ctx = Box<RequestCtx>;

    fn start(self: &Rc<Self>) {
        if self.keys.is_some() {
            monoio::spawn(watch_config(Rc::clone(self)));
        }
        monoio::spawn(publish(Rc::clone(self)));
    }

    fn head(&self, head: &Head<'_>) -> Verdict<Box<RequestCtx>> {
        let mut ctx = Box::new(RequestCtx::new(
            head.id,
            family_for_path(head.path_only()),
            head.started,
        ));
        if let Err(response) = endpoint::run(&mut ctx, head) {
            return Verdict::Answer(ctx, response);
        }
        if let Err(e) = authenticate::run(self.keys.as_ref(), &mut ctx, head) {
            ctx.error = Some(e.code);
            let response = Response::error(&e, ctx.family);
            return Verdict::Answer(ctx, response);
        }
        if let Some(keys) = &self.keys {
            if let Err(response) = limit::run(&self.limits, keys.shared(), &mut ctx) {
                ctx.error = Some(crate::errors::Code::RateLimitExceeded);
                return Verdict::Answer(ctx, response);
            }
        }
        let admitted = admit::run(&self.worker, &mut ctx, head);
        match admitted {
            Ok(budget) => Verdict::Proceed(ctx, budget),
            Err(e) => {
                ctx.error = Some(e.code);
                let response = Response::error(&e, ctx.family);
                Verdict::Answer(ctx, response)
            }
        }
    }

    async fn call(
        &self,
        ctx: &mut Box<RequestCtx>,
        req: &mut Request<'_>,
        resp: &mut Responder<'_>,
    ) {
        if let Err(e) = self.serve(ctx, req, resp).await {
            ctx.error = Some(e.code);
            resp.send(Response::error(&e, ctx.family)).await;
        }
        bodylog::response(ctx, resp);
    }

    fn stopped(&self) {
        if let Some(keys) = &self.keys {
            self.meter.flush(&keys.shared().usage);
        }
        self.observer.publish(&self.worker.status.metrics);
    }

    fn finish(&self, mut ctx: Box<RequestCtx>, head: &Head<'_>, done: &Finished) {
        limit::settle(&mut ctx);
        spend::settle(&mut ctx, done);
        if let Some(keys) = &self.keys {
            leak::report(&keys.shared().usage, &ctx);
            bodylog::finish(keys.shared(), &mut ctx, done);
        }
        // One clock read for every phase that reports the request's latency.
        let latency = ctx.timings.head_received.elapsed();
        self.meter.record(&ctx, done, latency);
        self.observer.record(&ctx, done, latency);
        if let (Some((entity, direction)), Some(id), Some(keys)) =
            (ctx.guardrail_blocked, &ctx.identity, &self.keys)
        {
            // For the control plane's audit log: who, what kind of thing, never the value.
            let detail = serde_json::json!({
                "tenant_id": &*id.tenant_id,
                "environment": id.environment.name(),
                "key_id": &*id.key_id,
                "entity": entity.tag().to_ascii_lowercase(),
                "direction": direction,
                "request_id": ctx.id.to_string(),
                "model": ctx.model.as_deref(),
            });
            keys.shared()
                .usage
                .event("guardrail.block", detail.to_string());
        }
        if let (Some(direction), Some(id), Some(keys)) =
            (ctx.guardrail_unscanned, &ctx.identity, &self.keys)
        {
            // Failing open is never silent: the tenant's audit log says what went unscanned.
            let detail = serde_json::json!({
                "tenant_id": &*id.tenant_id,
                "environment": id.environment.name(),
                "key_id": &*id.key_id,
                "direction": direction,
                "request_id": ctx.id.to_string(),
                "model": ctx.model.as_deref(),
            });
            keys.shared()
                .usage
                .event("guardrail.unscanned", detail.to_string());
        }
        if ctx.usage.reported {
            self.worker
                .status
                .add_usage(ctx.usage.input_tokens, ctx.usage.output_tokens);
        }
        if self.worker.settings.current().access_log {
            log::run(&ctx, head, done, latency);
        }
    }
}

/// Every second: hands this worker's usage to the control thread and publishes its
/// metrics ([`Service::stopped`] does both once more when the worker stops, after its
/// requests drained).
async fn publish(gw: Rc<Gateway>) {
    loop {
        monoio::select! {
            _ = monoio::time::sleep(Duration::from_secs(1)) => {
                if let Some(keys) = &gw.keys {
                    gw.meter.flush(&keys.shared().usage);
                }
                gw.observer.publish(&gw.worker.status.metrics);
            }
            _ = gw.worker.shutdown.wait() => break,
        }
    }
}

/// Swaps this worker onto every configuration the control thread publishes, as soon as it
/// is published, and reports the revision: an idle worker applies a revocation as fast as a
/// busy one.
async fn watch_config(gw: Rc<Gateway>) {
    let Some(keys) = &gw.keys else { return };
    loop {
        let listener = keys.shared().changed.listen();
        let revision = keys.refresh();
        gw.worker.status.set_config_revision(revision);
        monoio::select! {
            _ = listener => {},
            _ = gw.worker.shutdown.wait() => return,
        }
    }
}
