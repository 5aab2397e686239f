//! One error type for every HTTP error: a JSON body with `detail` (what the dashboard shows),
//! a stable snake_case `code`, and `errors` per parameter for validation failures.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;

/// The response header carrying the request id (every answer has one, errors included).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: BTreeMap<String, Vec<String>>,
    },
    /// 401, with `WWW-Authenticate: Bearer realm="api"`.
    #[error("{detail}")]
    Unauthorized {
        detail: &'static str,
        code: &'static str,
    },
    #[error("You do not have permission to perform this action.")]
    Forbidden,
    #[error("Not found.")]
    NotFound,
    #[error("Service temporarily unavailable, try again later.")]
    ServiceUnavailable,
    #[error("A server error occurred.")]
    Internal,
    /// Any other refusal, with its status and code (403 for an API key out of scope, 413 for
    /// a body or batch too large).
    #[error("{detail}")]
    Refused {
        status: StatusCode,
        detail: String,
        code: &'static str,
    },
}

/// The JSON body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"detail": "start_date: \"2025-02-30\" is not a valid date or date-time", "code": "invalid_query", "errors": {"start_date": ["\"2025-02-30\" is not a valid date or date-time"]}}))]
pub struct ErrorBody {
    pub detail: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<BTreeMap<String, Vec<String>>>,
}

impl ApiError {
    /// A database failure: logged with its cause, answered as a generic 503.
    pub fn database(err: sea_orm::DbErr) -> Self {
        tracing::error!(error = %err, "database error");
        Self::ServiceUnavailable
    }

    /// A 400 about one query parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let mut errors = BTreeMap::new();
        errors.insert(param.to_owned(), vec![message.clone()]);
        Self::BadRequest {
            detail: format!("{param}: {message}"),
            errors,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "invalid_query",
            Self::Unauthorized { code, .. } => code,
            Self::Forbidden => "permission_denied",
            Self::NotFound => "not_found",
            Self::ServiceUnavailable => "service_unavailable",
            Self::Internal => "server_error",
            Self::Refused { code, .. } => code,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Refused { status, .. } => *status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let errors = match self {
            Self::BadRequest { errors, .. } if !errors.is_empty() => Some(errors.clone()),
            _ => None,
        };
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, Self::Unauthorized { .. }) {
            response.insert_header(("WWW-Authenticate", r#"Bearer realm="api""#));
        }
        response.json(ErrorBody {
            detail: self.to_string(),
            code: self.code(),
            errors,
        })
    }
}

/// Unknown routes answer 404 in the JSON shape.
pub async fn not_found(_req: HttpRequest) -> HttpResponse {
    ApiError::NotFound.error_response()
}

/// Malformed query strings get the JSON shape.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _req| {
        ApiError::BadRequest {
            detail: format!("Malformed query string: {err}"),
            errors: BTreeMap::new(),
        }
        .into()
    })
}

/// Malformed path segments get the JSON shape.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err, _req| {
        ApiError::BadRequest {
            detail: format!("Malformed path: {err}"),
            errors: BTreeMap::new(),
        }
        .into()
    })
}

/// Malformed JSON bodies get the JSON shape.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().error_handler(|err, _req| {
        ApiError::BadRequest {
            detail: format!("Malformed JSON body: {err}"),
            errors: BTreeMap::new(),
        }
        .into()
    })
}

/// Gives the responses actix-http's HTTP/1 dispatcher writes itself, before any service or
/// middleware runs, the JSON error shape and a request id: 400 for a request line or header
/// it cannot parse (a URI over 65,534 bytes among them), 431 for a request head over 128 KiB,
/// 408 for a head that did not arrive in time. Upstream sends them empty; the hook is our patch
/// of actix-http (`vendor/README.md`). Installed once per process by `serve`.
pub fn install_dispatcher_error_bodies() {
    actix_http::h1::set_error_response_hook(dispatcher_error_body);
}

fn dispatcher_error_body(res: &mut actix_http::Response<()>) -> actix_http::body::BoxBody {
    use actix_web::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};

    let status = res.status();
    let (code, detail) = match status.as_u16() {
        400 => (
            "bad_request",
            "Malformed request: the request line or a header could not be parsed \
             (a URI may be at most 65,534 bytes).",
        ),
        408 => (
            "request_timeout",
            "Request timeout: the request head did not arrive in time.",
        ),
        431 => (
            "request_header_fields_too_large",
            "Request header fields too large: the request line and headers may take at most \
             128 KiB.",
        ),
        500..=599 => ("server_error", "A server error occurred."),
        _ => ("error", status.canonical_reason().unwrap_or("Error")),
    };
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    // Nothing of the request is logged: it could not be read, and its head may hold tokens.
    tracing::info!(%request_id, status = status.as_u16(), "refused before routing");
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    let body = ErrorBody {
        detail: detail.to_owned(),
        code,
        errors: None,
    };
    actix_http::body::BoxBody::new(serde_json::to_vec(&body).unwrap_or_default())
}
