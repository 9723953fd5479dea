//! Data-plane nodes: registering one (which issues its one-time enrolment token), enrolling
//! it again, revoking it, and setting its scope. A node's session learns of each change at
//! once: a revoked node's link is closed, a rescoped one is sent a snapshot of its new scope.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::handlers::blocking;
use super::{ApiError, ApiJson, AppState, Principal};
use crate::store::NodeScope;

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddNode {
    id: String,
    /// Environments whose keys and routing the node receives; empty or absent = all three.
    #[serde(default)]
    environments: Vec<String>,
    /// Tenants whose keys and routing it receives; empty or absent = every tenant.
    #[serde(default)]
    tenants: Vec<String>,
    /// How long the enrolment token is valid (default an hour, at most 7 days).
    expires_in_seconds: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Enrollment {
    expires_in_seconds: Option<i64>,
}

fn enrollment_answer(node: Value, token: String, ttl: Option<i64>) -> Value {
    let ttl = ttl.unwrap_or(crate::store::ENROLLMENT_TTL);
    json!({
        "node": node,
        // Shown once; the control plane keeps only its hash.
        "enrollment_token": token,
        "enrollment_expires_at": crate::store::now() + ttl,
    })
}

pub(super) async fn add(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    ApiJson(body): ApiJson<AddNode>,
) -> Result<(StatusCode, Json<Value>)> {
    let scope = NodeScope {
        environments: body.environments,
        tenants: body.tenants,
    };
    let ttl = body.expires_in_seconds;
    let (node, token) = blocking(&s, move |st| st.add_node(&actor, &body.id, &scope, ttl)).await?;
    s.push.registry_changed();
    let view = s.push.node_view(&node.id).map_err(ApiError::from)?;
    Ok((
        StatusCode::CREATED,
        Json(enrollment_answer(json!(view), token, ttl)),
    ))
}

pub(super) async fn list(State(s): State<Arc<AppState>>) -> Result<Json<Value>> {
    let push = Arc::clone(&s.push);
    let nodes = blocking(&s, move |_| push.node_views()).await?;
    Ok(Json(json!({"data": nodes})))
}

pub(super) async fn get(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let push = Arc::clone(&s.push);
    let node = blocking(&s, move |_| push.node_view(&id)).await?;
    Ok(Json(json!(node)))
}

pub(super) async fn enroll_again(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>> {
    // The body is optional: empty means every default.
    let body: Enrollment = if body.iter().all(u8::is_ascii_whitespace) {
        Enrollment::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("body: {e}")))?
    };
    let ttl = body.expires_in_seconds;
    let (token, view) = blocking(&s, {
        let push = Arc::clone(&s.push);
        move |st| {
            let token = st.reenroll_node(&actor, &id, ttl)?;
            Ok((token, push.node_view(&id)?))
        }
    })
    .await?;
    Ok(Json(enrollment_answer(json!(view), token, ttl)))
}

pub(super) async fn revoke(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let push = Arc::clone(&s.push);
    let view = blocking(&s, move |st| {
        st.revoke_node(&actor, &id)?;
        push.node_view(&id)
    })
    .await?;
    // Its session, if it has one, ends now.
    s.push.registry_changed();
    Ok(Json(json!(view)))
}

pub(super) async fn set_scope(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(scope): ApiJson<NodeScope>,
) -> Result<Json<Value>> {
    let push = Arc::clone(&s.push);
    let view = blocking(&s, move |st| {
        st.set_node_scope(&actor, &id, &scope)?;
        push.node_view(&id)
    })
    .await?;
    // Its session sends it a snapshot of the new scope now.
    s.push.registry_changed();
    Ok(Json(json!(view)))
}
