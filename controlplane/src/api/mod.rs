//! The admin REST API (JSON over HTTPS, TLS 1.3, described by `/openapi.json`).
//!
//! Every request carries the admin token (`Authorization: Bearer …`), compared in constant
//! time; every mutation is recorded in the audit log with the acting principal and the
//! caller's address, in the same transaction as the change itself.

mod handlers;
mod nodes;
pub mod openapi;
mod routing;
pub mod transport;

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::store::{Actor, Store, StoreError};

/// Shared by every handler.
#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub admin_token: String,
    pub push: Arc<crate::push::PushState>,
}

/// Every authenticated route: a path and what serves it. `/openapi.json` describes each
/// (a test holds the two together).
fn authed_routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        (
            "/v1/tenants",
            post(handlers::create_tenant).get(handlers::list_tenants),
        ),
        (
            "/v1/tenants/{tenant_id}/sub-accounts",
            post(handlers::create_sub_account),
        ),
        (
            "/v1/tenants/{tenant_id}/sub-accounts/{sub_account_id}/rate-limits",
            put(handlers::set_sub_account_rate_limits),
        ),
        (
            "/v1/tenants/{tenant_id}/keys",
            post(handlers::create_key).get(handlers::list_keys),
        ),
        ("/v1/keys/{key_id}", get(handlers::get_key)),
        ("/v1/keys/{key_id}/revoke", post(handlers::revoke_key)),
        ("/v1/keys/{key_id}/rotate", post(handlers::rotate_key)),
        (
            "/v1/keys/{key_id}/rate-limits",
            put(handlers::set_rate_limits),
        ),
        ("/v1/audit", get(handlers::audit)),
        ("/v1/tenants/{tenant_id}/usage", get(handlers::usage)),
        (
            "/v1/tenants/{tenant_id}/usage-settings",
            put(handlers::set_usage_settings).get(handlers::usage_settings),
        ),
        (
            "/v1/tenants/{tenant_id}/kms",
            put(handlers::set_tenant_kms).get(handlers::tenant_kms),
        ),
        (
            "/v1/tenants/{tenant_id}/body-log",
            put(handlers::set_body_log).get(handlers::body_log),
        ),
        (
            "/v1/tenants/{tenant_id}/bodies/{request_id}",
            get(handlers::logged_bodies),
        ),
        (
            "/v1/tenants/{tenant_id}/spend-caps",
            put(handlers::put_cap).get(handlers::list_caps),
        ),
        (
            "/v1/tenants/{tenant_id}/spend-caps/{cap_id}",
            axum::routing::delete(handlers::delete_cap),
        ),
        (
            "/v1/prices",
            put(handlers::put_price)
                .get(handlers::list_prices)
                .delete(handlers::delete_price),
        ),
        ("/v1/revision", get(handlers::revision)),
        ("/v1/nodes", get(nodes::list).post(nodes::add)),
        ("/v1/nodes/{node_id}", get(nodes::get)),
        ("/v1/nodes/{node_id}/enrollment", post(nodes::enroll_again)),
        ("/v1/nodes/{node_id}/revoke", post(nodes::revoke)),
        ("/v1/nodes/{node_id}/scope", put(nodes::set_scope)),
        (
            "/v1/tenants/{tenant_id}/keys/import",
            post(handlers::import_keys),
        ),
        (
            "/v1/tenants/{tenant_id}/environments/{environment}/upstreams",
            get(routing::list_upstreams),
        ),
        (
            "/v1/tenants/{tenant_id}/environments/{environment}/upstreams/{name}",
            put(routing::put_upstream)
                .get(routing::get_upstream)
                .delete(routing::delete_upstream),
        ),
        (
            "/v1/tenants/{tenant_id}/environments/{environment}/routes",
            get(routing::list_routes),
        ),
        (
            "/v1/tenants/{tenant_id}/environments/{environment}/routes/{name}",
            put(routing::put_route)
                .get(routing::get_route)
                .delete(routing::delete_route),
        ),
        (
            "/v1/tenants/{tenant_id}/environments/{environment}/policy",
            put(routing::put_policy).get(routing::get_policy),
        ),
        ("/v1/admin/compact", post(routing::compact)),
    ]
}

/// Every answer over TLS, errors and unknown paths included, tells browsers to come back
/// over HTTPS only ([`transport::HSTS`]).
pub(crate) fn with_hsts(router: Router) -> Router {
    router.layer(middleware::map_response(|mut resp: Response| async move {
        resp.headers_mut().insert(
            axum::http::header::STRICT_TRANSPORT_SECURITY,
            axum::http::HeaderValue::from_static(transport::HSTS),
        );
        resp
    }))
}

pub fn router(state: Arc<AppState>) -> Router {
    let authed = authed_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, handler)| r.route(path, handler))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin,
        ));
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/metrics", get(metrics))
        .merge(authed)
        .with_state(state)
}

/// Prometheus metrics (text format), without the admin token, like `/healthz`: node ids,
/// revisions and counts, nothing of tenants or keys.
async fn metrics(
    axum::extract::State(s): axum::extract::State<Arc<AppState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let push = Arc::clone(&s.push);
    let views = tokio::task::spawn_blocking(move || {
        let revision = push.store.revision()?;
        push.node_views().map(|v| (revision, v))
    })
    .await;
    let (revision, nodes) = match views {
        Ok(Ok(v)) => v,
        _ => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read\n",
            )
                .into_response()
        }
    };
    let label = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    family(
        "aigw_cp_revision",
        "gauge",
        "The newest configuration revision.",
        vec![(String::new(), u64::try_from(revision).unwrap_or(0))],
    );
    let active: Vec<_> = nodes.iter().filter(|n| !n.revoked).collect();
    let connected = active.iter().filter(|n| n.status.connected).count() as u64;
    family(
        "aigw_cp_nodes",
        "gauge",
        "Nodes not revoked, by whether their link is up.",
        vec![
            ("{state=\"connected\"}".into(), connected),
            (
                "{state=\"disconnected\"}".into(),
                active.len() as u64 - connected,
            ),
        ],
    );
    family(
        "aigw_cp_node_connected",
        "gauge",
        "1 while the node's link is up.",
        active
            .iter()
            .map(|n| {
                (
                    format!("{{node=\"{}\"}}", label(&n.status.node_id)),
                    u64::from(n.status.connected),
                )
            })
            .collect(),
    );
    family(
        "aigw_cp_node_lag_revisions",
        "gauge",
        "Revisions between the newest and the one the node last applied.",
        active
            .iter()
            .map(|n| {
                let lag = u64::try_from(revision)
                    .unwrap_or(0)
                    .saturating_sub(n.status.applied_revision);
                (format!("{{node=\"{}\"}}", label(&n.status.node_id)), lag)
            })
            .collect(),
    );
    let c = &s.push.counters;
    family(
        "aigw_cp_pushes_total",
        "counter",
        "Snapshots and change sets sent to nodes.",
        vec![
            ("{kind=\"snapshot\"}".into(), c.snapshots_sent.load(Relaxed)),
            ("{kind=\"changes\"}".into(), c.changes_sent.load(Relaxed)),
        ],
    );
    family(
        "aigw_cp_usage_reports_total",
        "counter",
        "Usage reports from nodes: applied, recognised as applied before, or not stored.",
        vec![
            (
                "{result=\"applied\"}".into(),
                c.usage_reports_applied.load(Relaxed),
            ),
            (
                "{result=\"duplicate\"}".into(),
                c.usage_reports_duplicate.load(Relaxed),
            ),
            (
                "{result=\"failed\"}".into(),
                c.usage_reports_failed.load(Relaxed),
            ),
        ],
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The paths served behind the admin token.
pub fn served_paths() -> Vec<&'static str> {
    authed_routes().into_iter().map(|(p, _)| p).collect()
}

/// The principal behind a request, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal(pub Actor);

async fn require_admin(
    State(state): State<Arc<AppState>>,
    ConnectInfo(transport::Peer(peer)): ConnectInfo<transport::Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = presented
        .as_bytes()
        .ct_eq(state.admin_token.as_bytes())
        .into();
    if !ok || !aigw_wire::keys::token_is_acceptable(&state.admin_token) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin token is required",
        )
        .into_response();
    }
    req.extensions_mut().insert(Principal(Actor {
        principal: "admin-token".into(),
        source: peer.ip().to_string(),
    }));
    next.run(req).await
}

/// A JSON body whose rejection (malformed JSON, an unknown or missing field) answers in our
/// error shape, with serde's message naming the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                e.body_text(),
            )),
        }
    }
}

/// A query string whose rejection (a malformed value, an unknown parameter) answers in our
/// error shape, naming the parameter.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                e.body_text(),
            )),
        }
    }
}

/// `{"error":{"code","message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            StoreError::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid", m),
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Sql(e) if e.to_string().contains("UNIQUE") => {
                Self::new(StatusCode::CONFLICT, "conflict", "already exists")
            }
            StoreError::Sql(e) => {
                tracing::error!(error = %e, "store error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "store error")
            }
            // The tenant's own key refused (disabled, deleted, not granted): the caller's to
            // fix, and KMS's words say how.
            StoreError::Kms(m) => Self::new(StatusCode::BAD_GATEWAY, "kms_unavailable", m),
            StoreError::Seal(e) => {
                tracing::error!(error = %e, "sealing error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "stored credentials could not be sealed or opened",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests;
