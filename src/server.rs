//! Running the HTTP server until Ctrl-C or SIGTERM.

use actix_web::HttpServer;
use sea_orm::DatabaseConnection;

use crate::config::Settings;
use crate::http::{AppState, app};
use crate::tracker::UsageStore;

/// Serves until a shutdown signal; in-flight requests get up to 30 s to finish.
///
/// `migrated` says whether the schema is known to be in place. If not (the database did not
/// answer at start), the server starts all the same: `/healthz` answers 200, `/readyz` and the
/// admin routes 503, and the usage store migrates as soon as the database answers (retrying
/// every 0.1 s, doubling up to 1 s).
pub async fn run(
    settings: Settings,
    db: DatabaseConnection,
    migrated: bool,
) -> std::io::Result<()> {
    let bind_addr = settings.bind_addr;
    // Rows a tracker spooled while the database was away are stored from here too; if the
    // schema is not known to be there, the store migrates as soon as the database answers.
    let mut options = crate::tracker::store_options(&settings);
    options.migrate = !migrated;
    let store = std::sync::Arc::new(UsageStore::open(db.clone(), options).await);
    let schema_ready = store.schema_ready();
    let state = AppState::open(db.clone(), settings, schema_ready)
        .await
        .map_err(|e| std::io::Error::other(format!("read database: {e}")))?
        .with_store(store.clone());
    if state.settings.database_read_url.is_some() {
        tracing::info!("admin reads go to DATABASE_READ_URL");
    }
    crate::http::error::install_dispatcher_error_bodies();
    let server = HttpServer::new(move || app(state.clone()))
        .shutdown_timeout(30)
        .bind(bind_addr)?;
    tracing::info!(%bind_addr, "listening");
    let served = server.run().await;
    store.shutdown().await;
    served?;
    tracing::info!("shut down");
    if let Err(e) = db.close().await {
        tracing::warn!(error = %e, "closing the database pool failed");
    }
    Ok(())
}
