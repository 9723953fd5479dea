//! `GET /v1/models`: the models the key's environment (or the node's file) routes.

use serde_json::json;

use crate::config::routing::RouteTable;
use crate::server::service::Response;

pub fn answer(routes: Option<&RouteTable>) -> Response {
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
