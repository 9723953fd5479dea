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

/// Upstream and route names.
const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]{0,63}$";
/// Regions; empty = none.
const REGION_PATTERN: &str = "^([a-z0-9][a-z0-9-]{0,31})?$";

pub fn document() -> Value {
    let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
    let env_param = json!({"name": "environment", "in": "path", "required": true, "schema": {"enum": ["production", "staging", "development"]}});
    let name_param = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string", "pattern": NAME_PATTERN}});
    let millis = json!({"type": "integer", "minimum": 0, "maximum": 86_400_000, "default": 0, "description": "milliseconds; 0 = the node's default"});
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
            "/v1/tenants/{tenant_id}/keys/import": {
                "parameters": [path_param("tenant_id")],
                "post": op("Mint many keys in one transaction (seeding, migrations); returns up to 1,000 of them", Some("ImportKeys"), "201")
            },
            "/v1/keys/{key_id}": {"parameters": [path_param("key_id")], "get": op("Get a key's metadata", None, "200")},
            "/v1/keys/{key_id}/revoke": {"parameters": [path_param("key_id")], "post": op("Revoke a key at once", None, "200")},
            "/v1/keys/{key_id}/rotate": {
                "parameters": [path_param("key_id")],
                "post": op("Issue a replacement; the old key works until the grace period ends", Some("RotateKey"), "201")
            },
            "/v1/audit": {"get": op("Audit records in order (query: after, limit)", None, "200")},
            "/v1/keys/{key_id}/rate-limits": {"put": op("Set a key's rate limits, enforced by each node on its own traffic (body: requests_per_minute, tokens_per_minute; 0 = no limit); over a limit the client gets 429 rate_limit_exceeded with Retry-After", None, "200")},
            "/v1/tenants/{tenant_id}/sub-accounts/{sub_account_id}/rate-limits": {
                "parameters": [path_param("tenant_id"), path_param("sub_account_id")],
                "put": op("Set a sub-account's rate limits, covering every key in its subtree together, enforced by each node on its own traffic (body: requests_per_minute, tokens_per_minute; 0 = no limit); over a limit the client gets 429 rate_limit_exceeded with Retry-After", None, "200")
            },
            "/v1/prices": {
                "put": op("Set a model's price in USD per million tokens, global or for one tenant (body: model, tenant_id?, input_per_mtok, output_per_mtok, cached_input_per_mtok?, cache_write_per_mtok?); usage arriving from then on is priced with it", None, "200"),
                "get": op("The global prices and, with tenant_id, that tenant's", None, "200"),
                "delete": op("Remove a price (query: model, tenant_id for a tenant's own)", None, "200"),
            },
            "/v1/tenants/{tenant_id}/usage": {"get": op("A tenant's usage over whole UTC days: requests, errors, tokens by kind, cost, latency and time-to-first-byte percentiles (query: from, to as YYYY-MM-DD, default today; group_by: comma-separated day, key, model, sub_account; filters sub_account (its subtree), key_id, model)", None, "200")},
            "/v1/tenants/{tenant_id}/usage-settings": {
                "parameters": [path_param("tenant_id")],
                "put": op("Choose the usage fields dropped before the tenant's usage is stored (body: drop, a list of key_id, model, sub_account_id, latency, ttfb, cached_input_tokens, cache_write_tokens, reasoning_tokens); a dropped field is absent from usage answers, not zero. Applies to usage arriving from then on", None, "200"),
                "get": op("The usage fields the tenant drops", None, "200")
            },
            "/v1/tenants/{tenant_id}/kms": {
                "parameters": [path_param("tenant_id")],
                "put": op("Name the enterprise tenant's own AWS KMS key (body: key_id, region, endpoint optional); it is tried at once, and provider credentials written from then on are sealed under data keys it generates. Disabling the key makes them unreadable within a minute, and refuses new ones with KMS's error (502 kms_unavailable)", None, "200"),
                "get": op("The tenant's own KMS key, or null", None, "200")
            },
            "/v1/tenants/{tenant_id}/body-log": {
                "parameters": [path_param("tenant_id")],
                "put": op("Set the tenant's body log (body: enabled, retention_days, when_behind = drop | refuse; an absent field keeps its value). Retention is at most 7 days on free, 30 on pro, 3650 on enterprise; enabled: false (audited) writes nothing from then on and deletes what was logged at the next sweep; when_behind: what a node does with a request while its body queue is full", None, "200"),
                "get": op("The tenant's body log settings (its tier's defaults when it set none: enabled, drop)", None, "200")
            },
            "/v1/tenants/{tenant_id}/bodies/{request_id}": {
                "parameters": [path_param("tenant_id"), path_param("request_id")],
                "get": op("A logged request's bodies by its request id (the x-request-id response header), while retained: meta, request_body and response_body (as text, or _hex when not UTF-8); 404 once swept, and 422 body_log_damaged when its segment fails authentication", None, "200")
            },
            "/v1/tenants/{tenant_id}/spend-caps": {
                "parameters": [path_param("tenant_id")],
                "put": op("Set a spend cap in USD per UTC day, UTC month or lifetime on the tenant, a sub-account (covering its whole subtree) or a key (body: scope = tenant | sub_account | key, id for a sub-account or key, period = day | month | lifetime, limit_usd); nodes reserve each request's maximum cost against it before forwarding and answer 429 insufficient_quota when it is spent", None, "200"),
                "get": op("A tenant's spend caps, each with its current period's start, spend and budget leased to nodes", None, "200")
            },
            "/v1/tenants/{tenant_id}/spend-caps/{cap_id}": {
                "parameters": [path_param("tenant_id"), path_param("cap_id")],
                "delete": op("Remove a spend cap", None, "200")
            },
            "/v1/revision": {"get": op("The newest configuration revision", None, "200")},
            "/v1/nodes": {
                "get": op("Registered nodes: scope, enrolment, connection, applied revision, records they cannot apply", None, "200"),
                "post": op("Register a node; returns its one-time enrolment token (shown once)", Some("AddNode"), "201")
            },
            "/v1/nodes/{node_id}": {"parameters": [path_param("node_id")], "get": op("A node", None, "200")},
            "/v1/nodes/{node_id}/enrollment": {
                "parameters": [path_param("node_id")],
                "post": op("A new enrolment token for a node; its current certificate is refused once it enrols again", Some("Enrollment"), "200")
            },
            "/v1/nodes/{node_id}/revoke": {
                "parameters": [path_param("node_id")],
                "post": op("Revoke a node: its link closes at once and its certificate is refused", None, "200")
            },
            "/v1/nodes/{node_id}/scope": {
                "parameters": [path_param("node_id")],
                "put": op("Set what a node receives; it is sent a snapshot of the new scope at once", Some("NodeScope"), "200")
            },
            "/v1/tenants/{tenant_id}/environments/{environment}/upstreams": {
                "parameters": [path_param("tenant_id"), env_param.clone()],
                "get": op("List an environment's upstreams (never their credentials)", None, "200")
            },
            "/v1/tenants/{tenant_id}/environments/{environment}/upstreams/{name}": {
                "parameters": [path_param("tenant_id"), env_param.clone(), name_param.clone()],
                "put": op("Create or replace an upstream; without credential the stored one is kept, an empty one removes it", Some("PutUpstream"), "200"),
                "get": op("Get an upstream (has_credential, never the credential)", None, "200"),
                "delete": op("Delete an upstream; 409 while a route names it", None, "200")
            },
            "/v1/tenants/{tenant_id}/environments/{environment}/routes": {
                "parameters": [path_param("tenant_id"), env_param.clone()],
                "get": op("List an environment's routes", None, "200")
            },
            "/v1/tenants/{tenant_id}/environments/{environment}/routes/{name}": {
                "parameters": [path_param("tenant_id"), env_param.clone(), name_param],
                "put": op("Create or replace a route: an exact model or a prefix, to upstreams of the same environment in failover order", Some("PutRoute"), "200"),
                "get": op("Get a route", None, "200"),
                "delete": op("Delete a route", None, "200")
            },
            "/v1/tenants/{tenant_id}/environments/{environment}/policy": {
                "parameters": [path_param("tenant_id"), env_param],
                "put": op("Set an environment's policy", Some("PutPolicy"), "200"),
                "get": op("Get an environment's policy (every field off when never set)", None, "200")
            },
            "/v1/admin/compact": {
                "post": op("Delete all but the newest `keep` changelog entries; nodes further behind get a snapshot", Some("Compact"), "200")
            }
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
                "ImportKeys": {"type": "object", "required": ["environment", "count"], "additionalProperties": false, "properties": {
                    "environment": {"enum": ["production", "staging", "development"]},
                    "count": {"type": "integer", "minimum": 1, "maximum": 2_000_000},
                    "return_keys": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0}}},
                "RotateKey": {"type": "object", "additionalProperties": false, "properties": {
                    "grace_seconds": {"type": "integer", "minimum": 0, "default": 86400}}},
                "NonRetention": {"description": "How the provider is told not to retain a request", "oneOf": [
                    {"type": "object", "required": ["mode"], "additionalProperties": false, "properties": {"mode": {"const": "none"}}},
                    {"type": "object", "required": ["mode", "name", "value"], "additionalProperties": false, "properties": {
                        "mode": {"const": "header"}, "name": {"type": "string"}, "value": {"type": "string"}}},
                    {"type": "object", "required": ["mode", "name", "value"], "additionalProperties": false, "properties": {
                        "mode": {"const": "body_field"}, "name": {"type": "string"}, "value": {"description": "any JSON value"}}},
                    {"type": "object", "required": ["mode"], "additionalProperties": false, "properties": {"mode": {"const": "account_agreement"}}}
                ]},
                "PutUpstream": {"type": "object", "required": ["provider", "base_url"], "additionalProperties": false, "properties": {
                    "provider": {"enum": ["openai", "anthropic"]},
                    "base_url": {"type": "string", "description": "http:// or https://, a host, optional port and path; no query, fragment or user info"},
                    "credential": {"type": ["string", "null"], "writeOnly": true, "description": "absent or null: keep the stored credential; empty: remove it"},
                    "non_retention": {"allOf": [{"$ref": "#/components/schemas/NonRetention"}], "description": "absent: the provider's default (openai: body_field store=false, sent on chat completions and responses; anthropic: none)"},
                    "stream_options": {"type": "boolean", "default": false},
                    "pass_organization_headers": {"type": "boolean", "default": false, "description": "Forward the client's OpenAI-Organization and OpenAI-Project headers"},
                    "region": {"type": "string", "pattern": REGION_PATTERN, "default": ""},
                    "baa": {"type": "boolean", "default": false},
                    "max_connections": {"type": "integer", "minimum": 0, "maximum": 100_000, "default": 0},
                    "connect_timeout_ms": millis.clone(),
                    "first_byte_timeout_ms": millis.clone(),
                    "read_idle_timeout_ms": millis}},
                "PutRoute": {"type": "object", "required": ["targets"], "additionalProperties": false,
                    "description": "exactly one of model and prefix",
                    "properties": {
                        "model": {"type": "string"},
                        "prefix": {"type": "string", "description": "routes every model starting with it; empty routes every model"},
                        "targets": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                            "type": "object", "required": ["upstream"], "additionalProperties": false, "properties": {
                                "upstream": {"type": "string", "pattern": NAME_PATTERN},
                                "model": {"type": "string", "description": "model name to send instead of the client's"}}}}}},
                "PutPolicy": {"type": "object", "additionalProperties": false, "properties": {
                    "zero_retention": {"type": "boolean", "default": true, "description": "false opts out of zero retention (audited as policy.zero_retention_opt_out)"},
                    "region": {"type": "string", "pattern": REGION_PATTERN, "default": ""},
                    "hipaa": {"type": "boolean", "default": false}}},
                "NodeScope": {"type": "object", "additionalProperties": false, "properties": {
                    "environments": {"type": "array", "items": {"enum": ["production", "staging", "development"]}, "description": "empty: all three"},
                    "tenants": {"type": "array", "maxItems": 1000, "items": {"type": "string"}, "description": "empty: every tenant"}}},
                "AddNode": {"type": "object", "required": ["id"], "additionalProperties": false, "properties": {
                    "id": {"type": "string", "pattern": NAME_PATTERN},
                    "environments": {"type": "array", "items": {"enum": ["production", "staging", "development"]}, "description": "empty: all three"},
                    "tenants": {"type": "array", "maxItems": 1000, "items": {"type": "string"}, "description": "empty: every tenant"},
                    "expires_in_seconds": {"type": "integer", "minimum": 1, "maximum": 604_800, "default": 3600}}},
                "Enrollment": {"type": "object", "additionalProperties": false, "properties": {
                    "expires_in_seconds": {"type": "integer", "minimum": 1, "maximum": 604_800, "default": 3600}}},
                "Compact": {"type": "object", "required": ["keep"], "additionalProperties": false, "properties": {
                    "keep": {"type": "integer", "minimum": 0}}}
            }
        }
    })
}
