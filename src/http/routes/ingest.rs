//! The ingest API (issue 19 item 3): `POST /api/v1/usage/` with an API key of scope `ingest`.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::api_keys::{Refused, Scope};
use crate::http::AppState;
use crate::http::auth::bearer;
use crate::http::error::{ApiError, ErrorBody};
use crate::ingest::{self, IngestResult, MAX_ROWS, Sender};

/// The largest request body, in bytes.
pub const MAX_BODY: usize = 10 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(["/api/v1/usage/", "/api/v1/usage"]).route(web::post().to(ingest_rows)),
    );
}

/// Body of `POST /api/v1/usage/`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct IngestBody {
    /// 1 to 1,000 rows. Each: `id` (UUID, required: the idempotency key), `model` (required),
    /// `prompt_tokens`, `completion_tokens`, `total_tokens` (default their sum),
    /// `cached_tokens`, `reasoning_tokens` (whole numbers, default 0), `success` (default: no
    /// `error`), `error`, `metadata` (an object), `created_at` (required, RFC 3339 with an
    /// offset, at most 5 minutes ahead), `started_at`, `first_chunk_at` (RFC 3339: when the
    /// first streamed token arrived), `is_streaming` (default: whether `first_chunk_at` is
    /// given), `cost` (USD, a number or decimal string; without it the row is priced from the
    /// price table),
    /// `user_id` (a staff user's key only: another existing user).
    #[schema(value_type = Vec<Object>, example = json!([{
        "id": "6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11", "model": "gpt-4o-mini",
        "prompt_tokens": 1200, "completion_tokens": 300, "cached_tokens": 1024,
        "success": true, "metadata": {"node_name": "worker-1"},
        "started_at": "2026-11-26T14:00:00.000Z", "created_at": "2026-11-26T14:00:01.250Z"}]))]
    pub rows: Vec<serde_json::Value>,
}

/// 401/403 for a refused key, in the JSON error shape; never repeats the key.
pub fn refusal(r: Refused) -> ApiError {
    match r {
        Refused::Missing => ApiError::Unauthorized {
            detail: "Authentication credentials were not provided: send Authorization: Bearer <API key>.",
            code: "not_authenticated",
        },
        Refused::Unknown => ApiError::Unauthorized {
            detail: "The API key is not valid.",
            code: "key_not_valid",
        },
        Refused::Revoked => ApiError::Unauthorized {
            detail: "The API key has been revoked.",
            code: "key_revoked",
        },
        Refused::Expired => ApiError::Unauthorized {
            detail: "The API key has expired.",
            code: "key_expired",
        },
        Refused::Scope(scope) => ApiError::Refused {
            status: StatusCode::FORBIDDEN,
            detail: format!("The API key does not have the {scope} scope."),
            code: "permission_denied",
        },
    }
}

fn too_large(detail: String) -> ApiError {
    ApiError::Refused {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        detail,
        code: "payload_too_large",
    }
}

/// Records usage rows sent by code that calls providers itself.
#[utoipa::path(
    post,
    path = "/api/v1/usage/",
    tag = "ingest",
    request_body = IngestBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "What became of each row: stored (committed, or spooled while the database is slow or down), already there, or refused with the reason per field", body = IngestResult),
        (status = 400, description = "The body is not JSON, or not {\"rows\": [...]} with at least one row", body = ErrorBody),
        (status = 401, description = "No API key, or one unknown, revoked or expired", body = ErrorBody),
        (status = 403, description = "The key lacks the ingest scope", body = ErrorBody),
        (status = 413, description = "More than 1,000 rows, or a body over 10 MB", body = ErrorBody),
        (status = 503, description = "The database cannot confirm the key (and it did not authenticate in the last 10 minutes)", body = ErrorBody),
    )
)]
pub async fn ingest_rows(
    req: HttpRequest,
    state: web::Data<AppState>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let owner = state
        .key_cache
        .authenticate(&state.db, bearer(&req), Scope::Ingest)
        .await
        .map_err(ApiError::database)?
        .map_err(refusal)?;
    let store = state.store.as_ref().ok_or(ApiError::ServiceUnavailable)?;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest {
            detail: format!("The body could not be read: {e}"),
            errors: Default::default(),
        })?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(too_large(format!(
                "The body is over {} MB.",
                MAX_BODY / 1024 / 1024
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let parsed: IngestBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        detail: format!("The body must be {{\"rows\": [...]}}: {e}"),
        errors: Default::default(),
    })?;
    if parsed.rows.is_empty() {
        return Err(ApiError::invalid_param("rows", "at least one row"));
    }
    if parsed.rows.len() > MAX_ROWS {
        return Err(too_large(format!(
            "{} rows: at most {MAX_ROWS} per request.",
            parsed.rows.len()
        )));
    }
    let sender = Sender {
        user_id: owner.user_id,
        is_staff: owner.is_staff,
        key_prefix: owner.prefix.clone(),
    };
    let result = ingest::ingest(
        &state.db,
        store,
        &state.settings.prices,
        &sender,
        &parsed.rows,
    )
    .await;
    tracing::info!(
        key = %owner.prefix,
        stored = result.stored.len(),
        spooled = result.spooled.len(),
        duplicates = result.duplicates.len(),
        refused = result.refused.len(),
        "usage ingested"
    );
    Ok(HttpResponse::Ok().json(result))
}
