//! The admin API's API keys (issue 19): list, create (the key is in the answer, once), revoke.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api_keys::{self, KeyError, KeyInfo, KeyRef, NewKey};
use crate::http::AppState;
use crate::http::auth::AdminUser;
use crate::http::error::{ApiError, ErrorBody};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(["/api/v1/admin/api-keys/", "/api/v1/admin/api-keys"])
            .route(web::get().to(list_keys))
            .route(web::post().to(create_key)),
    )
    .service(
        web::resource([
            "/api/v1/admin/api-keys/{id}/",
            "/api/v1/admin/api-keys/{id}",
        ])
        .route(web::delete().to(revoke_key)),
    );
}

/// Query of `GET /api/v1/admin/api-keys/`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyListQuery {
    /// Only this user's keys.
    pub username: Option<String>,
}

/// Every key (never a key itself or its hash), newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub count: usize,
    pub results: Vec<KeyInfo>,
}

/// Body of `POST /api/v1/admin/api-keys/`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// The user the key speaks for (an active user).
    #[schema(example = "backend-service")]
    pub username: String,
    /// What the key is for, 1–100 characters (default `default`).
    #[schema(example = "billing worker")]
    pub name: Option<String>,
    /// `gateway` and/or `ingest` (default both).
    #[schema(example = json!(["gateway"]))]
    pub scopes: Option<Vec<String>>,
    /// Lifetime in days, 1–3650; without it the key does not expire.
    #[schema(example = 90)]
    pub expires_in_days: Option<i64>,
}

/// A key just created: `key` is shown this once (only its hash is stored).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// The whole key, for `Authorization: Bearer <key>`.
    #[schema(example = "ltk_Ab3dE6gH_0123456789abcdefghijABCDEFGHIJ")]
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

fn key_error(field: &str, e: KeyError) -> ApiError {
    match e {
        KeyError::Invalid(m) => ApiError::invalid_param(field, m),
        KeyError::UnknownUser(u) => ApiError::invalid_param("username", format!("no user {u:?}")),
        KeyError::Db(e) => ApiError::database(e),
    }
}

/// API keys, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/admin/api-keys/",
    tag = "admin",
    params(KeyListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The keys", body = KeyList),
        (status = 401, description = "No, or no valid, credentials", body = ErrorBody),
        (status = 403, description = "Not a staff user or superuser", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn list_keys(
    _admin: AdminUser,
    state: web::Data<AppState>,
    query: web::Query<KeyListQuery>,
) -> Result<HttpResponse, ApiError> {
    let username = query
        .username
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let results = api_keys::list(&state.db, username)
        .await
        .map_err(ApiError::database)?;
    Ok(HttpResponse::Ok().json(KeyList {
        count: results.len(),
        results,
    }))
}

/// Creates a key; the answer holds the key, shown this once.
#[utoipa::path(
    post,
    path = "/api/v1/admin/api-keys/",
    tag = "admin",
    request_body = NewApiKey,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The key, shown this once", body = CreatedApiKey),
        (status = 400, description = "A field is missing or not valid, or the user is unknown or inactive", body = ErrorBody),
        (status = 401, description = "No, or no valid, credentials", body = ErrorBody),
        (status = 403, description = "Not a staff user or superuser", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn create_key(
    admin: AdminUser,
    state: web::Data<AppState>,
    body: web::Json<NewApiKey>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let scopes = match &body.scopes {
        None => api_keys::Scope::ALL.into_iter().collect(),
        Some(list) => api_keys::parse_scopes(list.iter().map(String::as_str))
            .map_err(|e| key_error("scopes", e))?,
    };
    let lifetime = match body.expires_in_days {
        None => None,
        Some(days) if (1..=api_keys::MAX_LIFETIME_DAYS).contains(&days) => {
            Some(chrono::Duration::days(days))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "expires_in_days",
                format!("between 1 and {}", api_keys::MAX_LIFETIME_DAYS),
            ));
        }
    };
    let created = api_keys::create(
        &state.db,
        NewKey {
            username: body.username.trim().to_owned(),
            name: body.name.unwrap_or_else(|| "default".into()),
            scopes,
            lifetime,
        },
    )
    .await
    .map_err(|e| key_error("name", e))?;
    tracing::info!(
        prefix = %created.info.prefix,
        user = %created.info.username,
        by = %admin.0.username,
        "API key created"
    );
    Ok(HttpResponse::Created().json(CreatedApiKey {
        key: created.key,
        info: created.info,
    }))
}

/// Revokes a key (it stays listed, with `revoked_at`); revoking it again changes nothing.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/api-keys/{id}/",
    tag = "admin",
    params(("id" = i32, Path, description = "The key's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The revoked key", body = KeyInfo),
        (status = 400, description = "Not an id", body = ErrorBody),
        (status = 401, description = "No, or no valid, credentials", body = ErrorBody),
        (status = 403, description = "Not a staff user or superuser", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn revoke_key(
    admin: AdminUser,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let raw = id.into_inner();
    let id: i32 = raw
        .trim()
        .parse()
        .map_err(|_| ApiError::invalid_param("id", format!("{raw:?} is not a key id")))?;
    match api_keys::revoke(&state.db, KeyRef::Id(id))
        .await
        .map_err(ApiError::database)?
    {
        Some(info) => {
            tracing::info!(prefix = %info.prefix, by = %admin.0.username, "API key revoked");
            Ok(HttpResponse::Ok().json(info))
        }
        None => Err(ApiError::NotFound),
    }
}
