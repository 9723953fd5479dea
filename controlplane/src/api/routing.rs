//! Handlers for what each environment routes: upstreams, routes and the policy, and the
//! changelog's compaction. The provider credential goes in, never out: responses say only
//! whether an upstream has one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::handlers::{blocking, parse_environment};
use super::{ApiError, ApiJson, AppState, Principal};
use crate::store::{PolicySpec, RouteSpec, UpstreamSpec};

type Result<T> = std::result::Result<T, ApiError>;

pub(super) async fn put_upstream(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<UpstreamSpec>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let written = blocking(&s, move |st| {
        st.put_upstream(&actor, &tenant_id, environment, &name, &body)
    })
    .await?;
    Ok(Json(json!(written)))
}

pub(super) async fn get_upstream(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let u = blocking(&s, move |st| st.upstream(&tenant_id, environment, &name)).await?;
    Ok(Json(json!(u)))
}

pub(super) async fn list_upstreams(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, environment)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let list = blocking(&s, move |st| st.upstreams(&tenant_id, environment)).await?;
    Ok(Json(json!({"data": list})))
}

pub(super) async fn delete_upstream(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let deleted = blocking(&s, move |st| {
        st.delete_upstream(&actor, &tenant_id, environment, &name)
    })
    .await?;
    Ok(Json(json!(deleted)))
}

pub(super) async fn put_route(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<RouteSpec>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let written = blocking(&s, move |st| {
        st.put_route(&actor, &tenant_id, environment, &name, &body)
    })
    .await?;
    Ok(Json(json!(written)))
}

pub(super) async fn get_route(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let r = blocking(&s, move |st| st.route(&tenant_id, environment, &name)).await?;
    Ok(Json(json!(r)))
}

pub(super) async fn list_routes(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, environment)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let list = blocking(&s, move |st| st.routes(&tenant_id, environment)).await?;
    Ok(Json(json!({"data": list})))
}

pub(super) async fn delete_route(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, environment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let deleted = blocking(&s, move |st| {
        st.delete_route(&actor, &tenant_id, environment, &name)
    })
    .await?;
    Ok(Json(json!(deleted)))
}

pub(super) async fn put_policy(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, environment)): Path<(String, String)>,
    ApiJson(body): ApiJson<PolicySpec>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let written = blocking(&s, move |st| {
        st.put_policy(&actor, &tenant_id, environment, &body)
    })
    .await?;
    Ok(Json(json!(written)))
}

pub(super) async fn get_policy(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, environment)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let environment = parse_environment(&environment)?;
    let p = blocking(&s, move |st| st.get_policy(&tenant_id, environment)).await?;
    Ok(Json(json!(p)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Compact {
    /// Changelog entries to keep.
    pub(super) keep: u64,
}

pub(super) async fn compact(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    ApiJson(body): ApiJson<Compact>,
) -> Result<Json<Value>> {
    let keep = i64::try_from(body.keep).unwrap_or(i64::MAX);
    let c = blocking(&s, move |st| st.compact(&actor, keep)).await?;
    Ok(Json(json!({
        "compacted_through": c.compacted_through,
        "revision": c.revision,
        "deleted": c.deleted,
    })))
}
