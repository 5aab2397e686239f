//! Request logging: one line per request with method, path, status, duration and a request
//! id, also returned as `X-Request-Id`, and the HTTP metrics (by route template). The query string and headers (tokens) are never logged.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;

pub use super::error::REQUEST_ID_HEADER;

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
            // By route template (`/api/v1/admin/llm-usage/{id}/`), never the raw path: the
            // label values stay few whatever clients send.
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_owned());
            let method_label = match method.as_str() {
                m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m,
                _ => "other",
            };
            let m = crate::metrics::metrics();
            m.http_requests
                .with_label_values(&[route.as_str(), method_label, &status.to_string()])
                .inc();
            m.http_duration
                .with_label_values(&[route.as_str()])
                .observe(elapsed_ms / 1000.0);
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

/// Refuses, before any handler runs, a query string on the admin API or the admin pages whose
/// names or values are malformed (a `%` not followed by two hex digits, bytes that are not
/// UTF-8) or hold control characters (NUL, line breaks, DEL…, which no parameter can mean and
/// which PostgreSQL refuses and SQLite's `LIKE` cuts short): 400 in the JSON error shape,
/// naming the parameter. Nothing is read or written.
pub async fn reject_bad_query(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let checked = req.path().starts_with("/api/v1/") || req.path().starts_with("/admin");
    if checked && let Some(err) = query_problem(req.query_string()) {
        use actix_web::ResponseError;
        let res = err.error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// What is wrong with a raw query string, if anything.
pub fn query_problem(raw: &str) -> Option<crate::http::error::ApiError> {
    use crate::http::error::ApiError;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(key) = strict_decode(raw_key) else {
            return Some(ApiError::invalid_param(
                &printable(raw_key),
                "malformed parameter name (bad percent-encoding or not UTF-8)",
            ));
        };
        if key.chars().any(char::is_control) {
            return Some(ApiError::invalid_param(
                &printable(raw_key),
                "a parameter name must not contain control characters",
            ));
        }
        let Some(value) = strict_decode(raw_value) else {
            return Some(ApiError::invalid_param(
                &key,
                "malformed value (bad percent-encoding or not UTF-8)",
            ));
        };
        if value.chars().any(char::is_control) {
            return Some(ApiError::invalid_param(
                &key,
                "must not contain control characters (such as NUL or a line break)",
            ));
        }
    }
    None
}

/// `application/x-www-form-urlencoded` decoding that refuses what lenient decoders pass
/// through: `%` without two hex digits, and bytes that are not UTF-8.
fn strict_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A raw (still percent-encoded) name, safe to echo: printable ASCII only, at most 64 chars.
fn printable(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bad_escapes_are_refused_by_name() {
        for (raw, param) in [
            ("model=%00", "model"),
            ("model=gpt%00", "model"),
            ("model=flash%00zzz&page=1", "model"),
            ("page=1&model=a%0Ab", "model"),
            ("model=%7F", "model"),
            ("%zz=1", "%zz"),
            ("model=%zz", "model"),
            ("model=%C3%28", "model"),
            ("a%00b=1", "a%00b"),
        ] {
            let err = query_problem(raw).unwrap_or_else(|| panic!("{raw} passed"));
            let text = format!("{err:?}");
            assert!(text.contains(param), "{raw}: {text}");
        }
    }

    #[test]
    fn ordinary_queries_pass() {
        for raw in [
            "",
            "model=gpt-4o&page=2",
            "start_date=2026-01-01T00%3A00%3A00%2B08%3A00",
            "model=gemini+2.5",
            "model=%E4%BD%A0%E5%A5%BD",
            "flag",
            "a=&b=",
        ] {
            assert!(query_problem(raw).is_none(), "{raw}");
        }
    }
}
