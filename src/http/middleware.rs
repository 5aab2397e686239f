//! Request logging: one line per request with method, path, status, duration and a request
//! id, also returned as `X-Request-Id`. The query string and headers (tokens) are never logged.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;

/// The response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Logs the request once it is answered and stamps the response with its id.
pub async fn log_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let started = Instant::now();
    let result = next.call(req).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(mut res) => {
            let status = res.status().as_u16();
            tracing::info!(request_id, method, path, status, elapsed_ms, "request");
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                res.headers_mut()
                    .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
            }
            Ok(res)
        }
        Err(err) => {
            tracing::warn!(request_id, method, path, elapsed_ms, error = %err, "request failed");
            Err(err)
        }
    }
}

/// Gives every error response the JSON error shape, including those actix or the CORS layer
/// write themselves (405 Method Not Allowed, a refused preflight, 413…). Headers such as
/// `Allow` and `WWW-Authenticate` are kept.
pub async fn json_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::HttpResponse;
    use actix_web::http::header::CONTENT_TYPE;

    let res = next.call(req).await?;
    let status = res.status();
    // JSON already, or an HTML error page of the admin pages (for a person, not a client).
    let keep = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/html"));
    if status.as_u16() < 400 || keep {
        return Ok(res.map_into_boxed_body());
    }
    let (req, old) = res.into_parts();
    let code = match status.as_u16() {
        400 => "bad_request",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        500..=599 => "server_error",
        _ => "error",
    };
    let mut new = HttpResponse::build(status);
    for (name, value) in old.headers() {
        if name != CONTENT_TYPE && name != actix_web::http::header::CONTENT_LENGTH {
            new.append_header((name.clone(), value.clone()));
        }
    }
    let detail = status.canonical_reason().unwrap_or("Error").to_owned() + ".";
    let body = crate::http::error::ErrorBody {
        detail,
        code,
        errors: None,
    };
    Ok(ServiceResponse::new(req, new.json(body)))
}

/// Until the schema is in place (a `serve` that started while the database was unreachable),
/// the admin API and the admin pages answer 503 in the JSON error shape at once, instead of
/// waiting out the pool's timeout on every request. Probes and the API docs still answer.
pub async fn require_schema(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let gated = req.path().starts_with("/api/v1/admin") || req.path().starts_with("/admin");
    let ready = req
        .app_data::<actix_web::web::Data<crate::http::AppState>>()
        .is_none_or(|state| state.schema_ready());
    if gated && !ready {
        use actix_web::ResponseError;
        let res = crate::http::error::ApiError::ServiceUnavailable.error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}
