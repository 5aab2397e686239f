//! The OpenAPI 3.1 document (utoipa), served at `/api/openapi.json` with Swagger UI at
//! `/api/docs/`, and written by `llm-tracker openapi`. Deterministic: no `servers` entry.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api_keys::{KeyInfo, Scope};
use crate::http::error::ErrorBody;
use crate::http::routes::{admin, api_keys, health, ingest};
use crate::ingest::{IngestResult, RefusedRow};
use crate::usage::list::{UsagePage, UsageRow};
use crate::usage::stats::{Granularity, ModelStats, SeriesItem, Summary, UserStats};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "llm-tracker",
        description = "Admin API over the record of LLM calls: token statistics and the usage listing. JSON-compatible with the Django llm_tracker app. Every path also works without the trailing slash."
    ),
    paths(admin::token_stats, admin::llm_usage, admin::usage_detail, admin::export_csv, admin::prices, api_keys::list_keys, api_keys::create_key, api_keys::revoke_key, ingest::ingest_rows, health::healthz, health::readyz),
    components(schemas(
        admin::TokenStats, admin::Series, Summary, ModelStats, SeriesItem, UserStats, Granularity,
        UsagePage, UsageRow, admin::PriceList, admin::PriceEntry, ErrorBody,
        api_keys::KeyList, api_keys::NewApiKey, api_keys::CreatedApiKey, KeyInfo, Scope,
        ingest::IngestBody, IngestResult, RefusedRow
    )),
    modifiers(&BearerAuth),
    tags((name = "admin", description = "Staff or superuser, Bearer JWT"), (name = "ingest", description = "Usage rows from any language, Bearer API key (scope ingest)"), (name = "health", description = "Probes"))
)]
pub struct ApiDoc;

/// The `bearer` security scheme (an HS256 JWT, simplejwt-compatible) for the Authorize button,
/// and `api_key` (an API key, for the ingest API).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
        let mut key = Http::new(HttpAuthScheme::Bearer);
        key.bearer_format = Some("API key (ltk_…)".into());
        components.add_security_scheme("api_key", SecurityScheme::Http(key));
    }
}

/// The document as pretty JSON, as committed in `openapi/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default() + "\n"
}
