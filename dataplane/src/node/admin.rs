//! The admin listener: `/healthz` (the process answers), `/readyz` (every worker is serving
//! and the node is not draining), `/workers` (each worker's driver, settings generation,
//! requests and open connections) and `/metrics` (Prometheus text format). It runs on its own thread, off the workers' cores'
//! hot path, and keeps answering while the workers drain so load balancers see 503.

use std::rc::Rc;
use std::sync::Arc;

use serde_json::json;

use crate::config::settings::SharedSettings;
use crate::errors::{Code, Family};
use crate::runtime::shutdown::Shutdown;
use crate::server::respond::Responder;
use crate::server::service::{Finished, Head, Request, Response, Service, Verdict};
use crate::server::worker::{WorkerCtx, WorkerStatus};

#[derive(Debug, Clone)]
pub struct AdminState {
    pub workers: Arc<[Arc<WorkerStatus>]>,
    pub shutdown: Arc<Shutdown>,
    pub settings: Arc<SharedSettings>,
    /// The pushed key table and the longest tolerated silence of the control plane.
    pub keys: Option<(
        Arc<crate::config::pushed::SharedConfig>,
        std::time::Duration,
    )>,
    pub started: std::time::Instant,
}

impl AdminState {
    /// Serving, not draining, and (with a control plane) holding a key table that is not
    /// older than allowed.
    pub fn ready(&self) -> bool {
        let config_ok = match &self.keys {
            None => true,
            Some((k, max_stale)) => {
                k.loaded()
                    && (max_stale.is_zero()
                        || k.age_seconds().is_some_and(|a| a <= max_stale.as_secs()))
            }
        };
        config_ok && !self.shutdown.is_triggered() && self.workers.iter().all(|w| w.is_running())
    }
}

#[derive(Debug)]
pub struct AdminService {
    worker: Rc<WorkerCtx>,
    state: AdminState,
}

impl AdminService {
    pub fn new(worker: &Rc<WorkerCtx>, state: AdminState) -> Self {
        Self {
            worker: Rc::clone(worker),
            state,
        }
    }
}

impl Service for AdminService {
    type Ctx = ();

    fn head(&self, head: &Head<'_>) -> Verdict<()> {
        super::whole_request(&self.worker, head)
    }

    async fn call(&self, _: &mut (), req: &mut Request<'_>, resp: &mut Responder<'_>) {
        let r = self.answer(&req.head());
        resp.send(r).await;
    }

    fn finish(&self, _: (), _: &Head<'_>, _: &Finished) {}
}

impl AdminService {
    fn answer(&self, req: &Head<'_>) -> Response {
        let s = &self.state;
        if req.method() != "GET" && req.method() != "HEAD" {
            return Response::error(
                &Code::MethodNotAllowed.with("admin endpoints are read-only"),
                Family::Openai,
            )
            .with_header("allow", "GET, HEAD");
        }
        match req.path_only() {
            "/healthz" => Response::json(200, br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => {
                let ready = s.ready();
                let body = json!({
                    "ready": ready,
                    "draining": s.shutdown.is_triggered(),
                    "workers_running": s.workers.iter().filter(|w| w.is_running()).count(),
                    "workers": s.workers.len(),
                    "config_loaded": s.keys.as_ref().map(|(k, _)| k.loaded()),
                    "config_revision": s.keys.as_ref().map(|(k, _)| k.revision()),
                    "config_age_seconds": s.keys.as_ref().and_then(|(k, _)| k.age_seconds()),
                    "control_plane_connected": s.keys.as_ref().map(|(k, _)| k.connected()),
                    "usage_unacknowledged_entries": s.keys.as_ref().map(|(k, _)| k.usage_backlog().0),
                    "usage_dropped_entries": s.keys.as_ref().map(|(k, _)| k.usage_backlog().1),
                    "body_log_dropped": s.keys.as_ref().map(|(k, _)| k.bodies.dropped()),
                    "body_log_opted_out_tenants": s.keys.as_ref().map(|(k, _)| k.bodies.opted_out()),
                    "body_log_refusing_tenants": s.keys.as_ref().map(|(k, _)| k.bodies.refusing()),
                });
                Response::json(if ready { 200 } else { 503 }, body.to_string().into_bytes())
            }
            "/metrics" => {
                let mut sum = crate::metrics::WorkerMetrics::default();
                for w in s.workers.iter() {
                    sum.merge(&w.metrics.lock().unwrap_or_else(|p| p.into_inner()));
                }
                let keys = s.keys.as_ref().map(|(k, _)| k);
                let gauges = crate::metrics::Gauges {
                    open_connections: s.workers.iter().map(|w| w.open_connections()).sum(),
                    tls_handshakes_failed: s
                        .workers
                        .iter()
                        .map(|w| w.tls_handshakes_failed())
                        .sum(),
                    workers: s.workers.len() as u64,
                    workers_running: s.workers.iter().filter(|w| w.is_running()).count() as u64,
                    uptime_seconds: s.started.elapsed().as_secs_f64(),
                    config_revision: keys.map(|k| k.revision()),
                    config_age_seconds: keys.and_then(|k| k.age_seconds()).map(|a| a as f64),
                    control_plane_connected: keys.map(|k| k.connected()),
                    usage_unacknowledged_entries: keys.map(|k| k.usage_backlog().0),
                    usage_dropped_entries: keys.map(|k| k.usage_backlog().1),
                    body_log_dropped: keys.map(|k| k.bodies.dropped()),
                    body_log_queued_bytes: keys.map(|k| k.bodies.held().1 as u64),
                };
                let mut r = Response::json(200, crate::metrics::render(&sum, &gauges).into_bytes());
                r.content_type = "text/plain; version=0.0.4; charset=utf-8";
                r
            }
            "/workers" => {
                let workers: Vec<_> = s
                    .workers
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let (reported, input, output) = w.usage();
                        json!({
                            "worker": i,
                            "running": w.is_running(),
                            "driver": w.driver().map(|d| d.as_str()),
                            "settings_generation": w.settings_generation(),
                            "config_revision": w.config_revision(),
                            "requests": w.requests(),
                            "open_connections": w.open_connections(),
                            "body_bytes": w.body_bytes(),
                            "usage": {"requests": reported, "input_tokens": input, "output_tokens": output},
                        })
                    })
                    .collect();
                let body = json!({
                    "settings_generation": s.settings.generation(),
                    "config_revision": s.keys.as_ref().map(|(k, _)| k.revision()),
                    "config_age_seconds": s.keys.as_ref().and_then(|(k, _)| k.age_seconds()),
                    "workers": workers,
                });
                Response::json(200, body.to_string().into_bytes())
            }
            _ => Response::error(
                &Code::NotFound.with("no such admin endpoint"),
                Family::Openai,
            ),
        }
    }
}
