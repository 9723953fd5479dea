//! Request handlers. Store calls are blocking (SQLite), so they run on the blocking pool.

use std::sync::Arc;

use aigw_wire::keys::Environment;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiJson, ApiQuery, AppState, Principal};
use crate::keys::{mint, random_id};
use crate::store::{NewKey, Store};

type Result<T> = std::result::Result<T, ApiError>;

pub(super) async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&Store) -> std::result::Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T> {
    let shared = Arc::clone(state);
    let out = tokio::task::spawn_blocking(move || f(&shared.store))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "store task failed",
            )
        })?
        .map_err(ApiError::from)?;
    // Whatever committed is pushed to the nodes now (a no-op when nothing changed).
    state.push.notify();
    Ok(out)
}

/// A requested environment, or a 400 naming the field.
pub(super) fn parse_environment(name: &str) -> Result<Environment> {
    Environment::from_name(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "environment: must be production, staging or development",
        )
    })
}

fn rng_error(_: getrandom::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "no randomness available",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateTenant {
    pub(super) id: Option<String>,
    pub(super) name: String,
    pub(super) tier: String,
}

pub(super) async fn create_tenant(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<Value>)> {
    let id = match body.id {
        Some(id)
            if !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            id
        }
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "id: letters, digits, - and _ only",
            ))
        }
        None => format!("t_{}", random_id(16).map_err(rng_error)?),
    };
    let t = blocking(&s, move |st| {
        st.create_tenant(&actor, &id, &body.name, &body.tier)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!(t))))
}

pub(super) async fn list_tenants(State(s): State<Arc<AppState>>) -> Result<Json<Value>> {
    let t = blocking(&s, |st| st.tenants()).await?;
    Ok(Json(json!({"data": t})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSubAccount {
    pub(super) name: String,
    pub(super) parent_id: Option<String>,
}

pub(super) async fn create_sub_account(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<CreateSubAccount>,
) -> Result<(StatusCode, Json<Value>)> {
    let id = format!("sa_{}", random_id(16).map_err(rng_error)?);
    let sa = blocking(&s, move |st| {
        st.create_sub_account(
            &actor,
            &id,
            &tenant_id,
            body.parent_id.as_deref(),
            &body.name,
        )
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!(sa))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    pub(super) environment: String,
    #[serde(default)]
    pub(super) name: String,
    pub(super) sub_account_id: Option<String>,
    #[serde(default)]
    pub(super) allowed_models: Vec<String>,
    /// Unix seconds UTC.
    pub(super) expires_at: Option<i64>,
}

pub(super) async fn create_key(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>)> {
    let environment = parse_environment(&body.environment)?;
    let expires_at = body.expires_at.unwrap_or(0);
    if expires_at < 0 || (expires_at != 0 && expires_at <= crate::store::now()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "expires_at: must be a future Unix time",
        ));
    }
    let minted = mint(environment).map_err(rng_error)?;
    let new = NewKey {
        key_id: minted.key_id.clone(),
        tenant_id,
        environment,
        sub_account_id: body.sub_account_id,
        name: body.name,
        hash: minted.hash,
        allowed_models: body.allowed_models,
        expires_at,
    };
    let info = blocking(&s, move |st| st.insert_key(&actor, &new)).await?;
    // The plaintext leaves the control plane here, once; it is stored nowhere.
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": minted.plaintext, "info": info})),
    ))
}

pub(super) async fn list_keys(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Value>> {
    let keys = blocking(&s, move |st| st.keys(&tenant_id)).await?;
    Ok(Json(json!({"data": keys})))
}

pub(super) async fn get_key(
    State(s): State<Arc<AppState>>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>> {
    let k = blocking(&s, move |st| st.key(&key_id)).await?;
    Ok(Json(json!(k)))
}

pub(super) async fn revoke_key(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>> {
    let k = blocking(&s, move |st| st.revoke_key(&actor, &key_id)).await?;
    Ok(Json(json!(k)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateKey {
    /// How long the old key keeps working (default 24 h).
    pub(super) grace_seconds: Option<i64>,
}

pub(super) async fn rotate_key(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(key_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    // The body is optional: empty means every default.
    let body: RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
        RotateKey::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("body: {e}")))?
    };
    let grace = body.grace_seconds.unwrap_or(86_400);
    if !(0..=90 * 86_400).contains(&grace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "grace_seconds: between 0 and 90 days",
        ));
    }
    let old = blocking(&s, {
        let key_id = key_id.clone();
        move |st| st.key(&key_id)
    })
    .await?;
    let environment = Environment::from_name(&old.environment).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "stored environment unknown",
        )
    })?;
    let minted = mint(environment).map_err(rng_error)?;
    let new = NewKey {
        key_id: minted.key_id.clone(),
        tenant_id: old.tenant_id.clone(),
        environment,
        sub_account_id: old.sub_account_id.clone(),
        name: old.name.clone(),
        hash: minted.hash,
        allowed_models: old.allowed_models.clone(),
        expires_at: old.expires_at,
    };
    let grace_ends_at = crate::store::now() + grace;
    let (old, new) = blocking(&s, move |st| {
        st.rotate_key(&actor, &key_id, &new, grace_ends_at)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": minted.plaintext, "info": new, "old": old})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    #[serde(default)]
    pub(super) after: i64,
    pub(super) limit: Option<i64>,
}

pub(super) async fn audit(
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Value>> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let records = blocking(&s, move |st| st.audit(q.after, limit)).await?;
    Ok(Json(json!({"data": records})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageParams {
    /// First and last UTC day, `YYYY-MM-DD`; both default to today.
    from: Option<String>,
    to: Option<String>,
    /// Comma-separated: day, key, model, sub_account.
    group_by: Option<String>,
    sub_account: Option<String>,
    key_id: Option<String>,
    model: Option<String>,
}

/// A tenant's usage: requests, errors, tokens by kind, cost, latency and time-to-first-byte
/// percentiles, over whole UTC days, grouped as asked. A sub-account's covers its subtree.
pub(super) async fn usage(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
    ApiQuery(q): ApiQuery<UsageParams>,
) -> Result<Json<Value>> {
    use crate::store::{parse_day, Dim, UsageQuery};
    let today = crate::store::now().max(0) as u64 / 86_400;
    let day = |field: &str, v: &Option<String>| -> Result<u64> {
        match v {
            None => Ok(today),
            Some(v) => parse_day(v).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("{field}: {v:?} is not a date (YYYY-MM-DD)"),
                )
            }),
        }
    };
    let (from_day, to_day) = (day("from", &q.from)?, day("to", &q.to)?);
    let mut group_by = Vec::new();
    for name in q
        .group_by
        .iter()
        .flat_map(|g| g.split(','))
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        let d = Dim::parse(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("group_by: {name:?} is not one of day, key, model, sub_account"),
            )
        })?;
        if !group_by.contains(&d) {
            group_by.push(d);
        }
    }
    let query = UsageQuery {
        from_day,
        to_day,
        group_by,
        sub_account: q.sub_account,
        key_id: q.key_id,
        model: q.model,
    };
    let from = crate::store::day_name(from_day);
    let to = crate::store::day_name(to_day);
    let rows = blocking(&s, move |st| st.usage(&tenant_id, &query)).await?;
    Ok(Json(json!({"from": from, "to": to, "data": rows})))
}

/// Sets a model's price, global or for one tenant.
pub(super) async fn put_price(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    ApiJson(body): ApiJson<crate::store::PriceSpec>,
) -> Result<Json<Value>> {
    let p = blocking(&s, move |st| st.put_price(&actor, &body)).await?;
    Ok(Json(json!(p)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PriceParams {
    tenant_id: Option<String>,
    model: Option<String>,
}

/// The global prices and, with `tenant_id`, that tenant's.
pub(super) async fn list_prices(
    State(s): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<PriceParams>,
) -> Result<Json<Value>> {
    let prices = blocking(&s, move |st| st.prices(q.tenant_id.as_deref())).await?;
    Ok(Json(json!({"data": prices})))
}

/// Removes a price: `model`, and `tenant_id` for a tenant's own.
pub(super) async fn delete_price(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    ApiQuery(q): ApiQuery<PriceParams>,
) -> Result<Json<Value>> {
    let model = q
        .model
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid", "model: required"))?;
    let tenant_id = q.tenant_id.clone();
    let deleted = model.clone();
    blocking(&s, move |st| {
        st.delete_price(&actor, &model, q.tenant_id.as_deref())
    })
    .await?;
    Ok(Json(
        json!({"deleted": true, "model": deleted, "tenant_id": tenant_id}),
    ))
}

/// Sets a spend cap on the tenant, one of its sub-accounts or one of its keys (replacing
/// the cap of the same scope and period).
pub(super) async fn put_cap(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<crate::store::CapSpec>,
) -> Result<Json<Value>> {
    let cap = blocking(&s, move |st| st.put_cap(&actor, &tenant_id, &body)).await?;
    Ok(Json(json!(cap)))
}

/// A tenant's spend caps, each with what its current period spent and leased.
pub(super) async fn list_caps(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Value>> {
    let caps = blocking(&s, move |st| st.caps(&tenant_id)).await?;
    Ok(Json(json!({"data": caps})))
}

pub(super) async fn delete_cap(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, cap_id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let id = cap_id.clone();
    blocking(&s, move |st| st.delete_cap(&actor, &tenant_id, &cap_id)).await?;
    Ok(Json(json!({"deleted": true, "id": id})))
}

/// Sets a key's rate limits (requests and tokens per minute, per node; 0 = none).
pub(super) async fn set_rate_limits(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(key_id): Path<String>,
    ApiJson(body): ApiJson<crate::store::RateLimitsView>,
) -> Result<Json<Value>> {
    let k = blocking(&s, move |st| st.set_rate_limits(&actor, &key_id, body)).await?;
    Ok(Json(json!(k)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageSettings {
    drop: Vec<String>,
}

/// Sets the usage fields a tenant drops before its usage is stored.
pub(super) async fn set_usage_settings(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<UsageSettings>,
) -> Result<Json<Value>> {
    let dropped = blocking(&s, move |st| {
        st.set_usage_dropped(&actor, &tenant_id, &body.drop)
    })
    .await?;
    Ok(Json(json!({ "drop": dropped })))
}

pub(super) async fn usage_settings(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Value>> {
    let dropped = blocking(&s, move |st| st.usage_dropped(&tenant_id)).await?;
    Ok(Json(json!({ "drop": dropped })))
}

/// Names the tenant's own KMS key (enterprise tier): its provider credentials are sealed
/// under data keys that key generates from then on.
pub(super) async fn set_tenant_kms(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<crate::kms::KmsKey>,
) -> Result<Json<Value>> {
    let k = blocking(&s, move |st| st.set_tenant_kms(&actor, &tenant_id, &body)).await?;
    Ok(Json(json!(k)))
}

pub(super) async fn tenant_kms(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Value>> {
    let k = blocking(&s, move |st| st.tenant_kms(&tenant_id)).await?;
    Ok(Json(json!({ "kms": k })))
}

/// Sets a sub-account's rate limits, covering every key in its subtree (per node; 0 = none).
pub(super) async fn set_sub_account_rate_limits(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path((tenant_id, sub_account_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<crate::store::RateLimitsView>,
) -> Result<Json<Value>> {
    let id = sub_account_id.clone();
    let l = blocking(&s, move |st| {
        st.set_sub_account_rate_limits(&actor, &tenant_id, &sub_account_id, body)
    })
    .await?;
    Ok(Json(json!({"sub_account_id": id, "rate_limits": l})))
}

pub(super) async fn revision(State(s): State<Arc<AppState>>) -> Result<Json<Value>> {
    let r = blocking(&s, |st| st.revision()).await?;
    Ok(Json(json!({"revision": r})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportKeys {
    pub(super) environment: String,
    pub(super) count: usize,
    /// How many of the minted keys to return in plaintext (the rest are only stored).
    #[serde(default)]
    pub(super) return_keys: usize,
}

/// Bulk seeding: mints `count` keys in one transaction (load tests, migrations).
pub(super) async fn import_keys(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<ImportKeys>,
) -> Result<(StatusCode, Json<Value>)> {
    let environment = parse_environment(&body.environment)?;
    if body.count == 0 || body.count > 2_000_000 || body.return_keys > body.count.min(1000) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "count: 1..=2000000; return_keys: at most 1000",
        ));
    }
    let mut plaintexts = Vec::with_capacity(body.return_keys);
    let mut keys = Vec::with_capacity(body.count);
    for i in 0..body.count {
        let m = mint(environment).map_err(rng_error)?;
        if i < body.return_keys {
            plaintexts.push(m.plaintext);
        }
        keys.push(NewKey {
            key_id: m.key_id,
            tenant_id: tenant_id.clone(),
            environment,
            sub_account_id: None,
            name: String::new(),
            hash: m.hash,
            allowed_models: Vec::new(),
            expires_at: 0,
        });
    }
    let revision = blocking(&s, move |st| st.import_keys(&actor, &keys)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"revision": revision, "keys": plaintexts})),
    ))
}

/// Sets a tenant's body log settings; nodes hear of it at once.
pub(super) async fn set_body_log(
    State(s): State<Arc<AppState>>,
    Extension(Principal(actor)): Extension<Principal>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<crate::store::BodyLogSpec>,
) -> Result<Json<Value>> {
    let settings = blocking(&s, move |st| {
        st.set_body_log_settings(&actor, &tenant_id, &body)
    })
    .await?;
    s.push.body_settings_changed();
    if let Some(log) = s.push.bodylog.get() {
        // A shorter retention or an opt-out takes effect now.
        log.sweep_soon();
    }
    Ok(Json(json!(settings)))
}

pub(super) async fn body_log(
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Value>> {
    let settings = blocking(&s, move |st| st.body_log_settings(&tenant_id)).await?;
    Ok(Json(json!(settings)))
}

/// A body as JSON: text when it is UTF-8, else hex.
fn body_field(out: &mut serde_json::Map<String, Value>, name: &str, bytes: Vec<u8>) {
    match String::from_utf8(bytes) {
        Ok(text) => {
            out.insert(name.to_string(), Value::String(text));
        }
        Err(e) => {
            out.insert(
                format!("{name}_hex"),
                Value::String(hex::encode(e.as_bytes())),
            );
        }
    }
}

/// A logged request's bodies, while retained.
pub(super) async fn logged_bodies(
    State(s): State<Arc<AppState>>,
    Path((tenant_id, request_id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let Some(log) = s.push.bodylog.get().cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "logged request not found",
        ));
    };
    let read = tokio::task::spawn_blocking(move || log.get(&tenant_id, &request_id))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "body log task failed",
            )
        })?;
    let record = match read {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "logged request not found (never logged, or past its retention)",
            ))
        }
        Err(crate::bodylog::ReadError::Store(e)) => return Err(e.into()),
        Err(crate::bodylog::ReadError::Io(e)) => {
            tracing::error!(error = %e, "cannot read a body log segment");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the body log segment cannot be read",
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "a body log segment was refused");
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "body_log_damaged",
                format!("the logged request's segment is refused: {e}"),
            ));
        }
    };
    let mut out = serde_json::Map::new();
    out.insert(
        "meta".into(),
        serde_json::from_str(&record.meta).unwrap_or(Value::Null),
    );
    body_field(&mut out, "request_body", record.request);
    body_field(&mut out, "response_body", record.response);
    Ok(Json(Value::Object(out)))
}
