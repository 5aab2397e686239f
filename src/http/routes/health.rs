//! Liveness and readiness probes.

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use crate::http::AppState;
use crate::http::error::ApiError;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Up")))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The database answers and the schema is in place; 503 otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready"),
        (status = 503, description = "Database unreachable", body = crate::http::error::ErrorBody),
    )
)]
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.schema_ready() && crate::db::is_ready(&state.db).await {
        Ok(HttpResponse::Ok().json(json!({"status": "ok"})))
    } else {
        Err(ApiError::ServiceUnavailable)
    }
}
