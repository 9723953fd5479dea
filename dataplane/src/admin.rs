//! The admin listener: `/healthz` (the process answers), `/readyz` (every worker is serving
//! and the node is not draining) and `/workers` (each worker's driver, settings generation,
//! requests and open connections). It runs on its own thread, off the workers' cores'
//! hot path, and keeps answering while the workers drain so load balancers see 503.

use std::sync::Arc;

use serde_json::json;

use crate::errors::{ApiError, ApiStyle};
use crate::respond::Responder;
use crate::service::{Request, Response, Service};
use crate::settings::SharedSettings;
use crate::shutdown::Shutdown;
use crate::worker::WorkerStatus;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub workers: Arc<[Arc<WorkerStatus>]>,
    pub shutdown: Arc<Shutdown>,
    pub settings: Arc<SharedSettings>,
}

impl AdminState {
    pub fn ready(&self) -> bool {
        !self.shutdown.is_triggered() && self.workers.iter().all(|w| w.is_running())
    }
}

#[derive(Debug)]
pub struct AdminService {
    state: AdminState,
}

impl AdminService {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

impl Service for AdminService {
    async fn call(&self, req: &Request<'_>, resp: &mut Responder<'_>) {
        let r = self.answer(req);
        resp.send(r).await;
    }
}

impl AdminService {
    fn answer(&self, req: &Request<'_>) -> Response {
        let s = &self.state;
        if req.method() != "GET" && req.method() != "HEAD" {
            return Response::error(
                ApiError::downstream(405, "method_not_allowed", "admin endpoints are read-only"),
                ApiStyle::OpenAi,
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
                });
                Response::json(if ready { 200 } else { 503 }, body.to_string().into_bytes())
            }
            "/workers" => {
                let workers: Vec<_> = s
                    .workers
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        json!({
                            "worker": i,
                            "running": w.is_running(),
                            "driver": w.driver().map(|d| d.as_str()),
                            "settings_generation": w.settings_generation(),
                            "requests": w.requests(),
                            "open_connections": w.open_connections(),
                        })
                    })
                    .collect();
                let body = json!({
                    "settings_generation": s.settings.generation(),
                    "workers": workers,
                });
                Response::json(200, body.to_string().into_bytes())
            }
            _ => Response::error(
                ApiError::downstream(404, "not_found", "no such admin endpoint"),
                ApiStyle::OpenAi,
            ),
        }
    }
}
