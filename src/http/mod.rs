//! The HTTP layer: a thin actix-web adapter over the library modules.

pub mod auth;
pub mod error;
pub mod middleware;
pub mod openapi;
pub mod pages;
pub mod routes;

use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::{Condition, from_fn};
use actix_web::{App, web};
use sea_orm::DatabaseConnection;

use crate::config::Settings;

/// Shared, read-only state for every handler.
#[derive(Clone)]
pub struct AppState {
    /// The primary database (`DATABASE_URL`): users, readiness.
    pub db: DatabaseConnection,
    /// Where the admin API's usage reads go: `DATABASE_READ_URL` (a read replica) when set,
    /// else the primary.
    pub read_db: DatabaseConnection,
    pub settings: Settings,
    /// Failed admin-page sign-ins per username and client address.
    pub login_limiter: std::sync::Arc<crate::http::pages::session::Limiter>,
    /// Set once the schema is in place (`serve` started while the database was unreachable
    /// migrates when it answers); until then admin routes and `/readyz` answer 503 at once.
    pub schema_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The write path of the ingest API (`serve` shares its usage store); without one the
    /// ingest API answers 503.
    pub store: Option<std::sync::Arc<crate::tracker::UsageStore>>,
    /// API keys that authenticated recently, trusted for a while when the database is down.
    pub key_cache: std::sync::Arc<crate::api_keys::KeyCache>,
}

impl AppState {
    /// Reads and writes on `db`.
    pub fn new(db: DatabaseConnection, settings: Settings) -> Self {
        Self {
            read_db: db.clone(),
            db,
            settings,
            login_limiter: Default::default(),
            schema_ready: std::sync::Arc::new(true.into()),
            store: None,
            key_cache: Default::default(),
        }
    }

    /// With `store` as the ingest API's write path.
    pub fn with_store(mut self, store: std::sync::Arc<crate::tracker::UsageStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Whether the schema is known to be in place.
    pub fn schema_ready(&self) -> bool {
        self.schema_ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// As `serve` builds it: usage reads on a pool of its own for `DATABASE_READ_URL` when set
    /// (not migrated: a replica follows its primary). Connects lazily; `schema_ready` says
    /// whether the primary is migrated yet.
    pub async fn open(
        db: DatabaseConnection,
        settings: Settings,
        schema_ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, sea_orm::DbErr> {
        let read_db = match &settings.database_read_url {
            Some(url) => crate::db::connect_with(url, settings.sqlite_cache_mib).await?,
            None => db.clone(),
        };
        Ok(Self {
            db,
            read_db,
            settings,
            login_limiter: Default::default(),
            schema_ready,
            store: None,
            key_cache: Default::default(),
        })
    }
}

/// Registers every route and the JSON error handlers; used by `serve` and by the tests.
pub fn configure(state: AppState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(state))
            .app_data(error::query_config())
            .app_data(error::path_config())
            .app_data(error::json_config())
            .service(routes::health::healthz)
            .service(routes::health::readyz)
            .configure(routes::admin::configure)
            .configure(routes::api_keys::configure)
            .configure(routes::ingest::configure)
            .configure(routes::gateway::configure)
            .configure(routes::metrics::configure)
            .configure(crate::http::pages::configure)
            .service(utoipa_swagger_ui::SwaggerUi::new("/api/docs/{_:.*}").url(
                "/api/openapi.json",
                <openapi::ApiDoc as utoipa::OpenApi>::openapi(),
            ))
            .default_service(web::to(error::not_found));
    }
}

/// The whole application as `serve` runs it: request logging, JSON error bodies, CORS and
/// every route. Tests build the same thing.
pub fn app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let origins = &state.settings.cors_allowed_origins;
    // With no origin configured there is no CORS layer at all: actix-cors would otherwise
    // answer any origin.
    let cors = Condition::new(!origins.is_empty(), cors(origins));
    App::new()
        .wrap(cors)
        .wrap(from_fn(middleware::reject_bad_query))
        .wrap(from_fn(middleware::require_schema))
        .wrap(from_fn(middleware::json_errors))
        .wrap(from_fn(middleware::log_requests))
        .configure(configure(state))
}

/// CORS for the configured origins only (`CORS_ALLOWED_ORIGINS`): GET with `Authorization`.
/// Other origins get no CORS headers (their requests still run; browsers block the reading).
/// No `Access-Control-Expose-Headers`: actix-cors would send it to every origin.
fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::OPTIONS])
        .allowed_headers([header::AUTHORIZATION, header::ACCEPT, header::CONTENT_TYPE])
        .max_age(3600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}
