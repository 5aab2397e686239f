//! `GET /metrics`: the Prometheus text exposition (issue 20). On the main address only when
//! `METRICS_TOKEN` is set, and then only with it as a bearer token; on `METRICS_BIND_ADDR`
//! (a second listener, see `server::run`) without one. Neither set: 404, as for any unknown
//! path. A scrape reads what is in memory: no database query; under `serve` it copies out the
//! exposition rendered in the background every second (`crate::metrics::Metrics::exposition`).

use actix_web::{HttpRequest, HttpResponse, web};

use crate::http::AppState;
use crate::http::error::ApiError;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text of every metric family.
pub fn exposition() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .insert_header(("cache-control", "no-store"))
        .body(crate::metrics::metrics().exposition().as_str().to_owned())
}

/// On the main address: the token, else 401; 404 when no token is configured.
async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(token) = &state.settings.metrics_token else {
        return Err(ApiError::NotFound);
    };
    match crate::http::auth::bearer(&req) {
        None => Err(ApiError::Unauthorized {
            detail: "Authentication credentials were not provided.",
            code: "not_authenticated",
        }),
        Some(given) if crate::http::auth::same_token(given, token.expose()) => Ok(exposition()),
        Some(_) => Err(ApiError::Unauthorized {
            detail: "The metrics token is not valid.",
            code: "token_not_valid",
        }),
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics));
}
