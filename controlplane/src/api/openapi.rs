//! The OpenAPI 3.1 description of the admin API, served at `/openapi.json`.

use serde_json::{json, Value};

fn op(summary: &str, body: Option<&str>, ok: &str) -> Value {
    let mut o = json!({
        "summary": summary,
        "security": [{"adminToken": []}],
        "responses": {
            ok: {"description": "success"},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "404": {"$ref": "#/components/responses/Error"},
            "409": {"$ref": "#/components/responses/Error"}
        }
    });
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    }
    o
}

pub fn document() -> Value {
    let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "aigateway control plane", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "up"}}}},
            "/v1/tenants": {
                "post": op("Create a tenant", Some("CreateTenant"), "201"),
                "get": op("List tenants", None, "200")
            },
            "/v1/tenants/{tenant_id}/sub-accounts": {
                "parameters": [path_param("tenant_id")],
                "post": op("Create a sub-account (nested up to 8 deep)", Some("CreateSubAccount"), "201")
            },
            "/v1/tenants/{tenant_id}/keys": {
                "parameters": [path_param("tenant_id")],
                "post": op("Create an API key; the key is returned once", Some("CreateKey"), "201"),
                "get": op("List a tenant's keys (never the keys themselves)", None, "200")
            },
            "/v1/keys/{key_id}": {"parameters": [path_param("key_id")], "get": op("Get a key's metadata", None, "200")},
            "/v1/keys/{key_id}/revoke": {"parameters": [path_param("key_id")], "post": op("Revoke a key at once", None, "200")},
            "/v1/keys/{key_id}/rotate": {
                "parameters": [path_param("key_id")],
                "post": op("Issue a replacement; the old key works until the grace period ends", Some("RotateKey"), "201")
            },
            "/v1/audit": {"get": op("Audit records in order (query: after, limit)", None, "200")},
            "/v1/revision": {"get": op("The newest configuration revision", None, "200")}
        },
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "CreateTenant": {"type": "object", "required": ["name", "tier"], "additionalProperties": false, "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "tier": {"enum": ["free", "pro", "enterprise"]}}},
                "CreateSubAccount": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"}, "parent_id": {"type": "string"}}},
                "CreateKey": {"type": "object", "required": ["environment"], "additionalProperties": false, "properties": {
                    "environment": {"enum": ["production", "staging", "development"]},
                    "name": {"type": "string"},
                    "sub_account_id": {"type": "string"},
                    "allowed_models": {"type": "array", "items": {"type": "string"}},
                    "expires_at": {"type": "integer", "description": "Unix seconds, UTC"}}},
                "RotateKey": {"type": "object", "additionalProperties": false, "properties": {
                    "grace_seconds": {"type": "integer", "minimum": 0, "default": 86400}}}
            }
        }
    })
}
