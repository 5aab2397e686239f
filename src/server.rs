//! Running the HTTP server until Ctrl-C or SIGTERM.

use actix_web::HttpServer;
use sea_orm::DatabaseConnection;

use crate::config::Settings;
use crate::http::{AppState, app};
use crate::tracker::{StoreOptions, UsageStore};

/// Serves until a shutdown signal; in-flight requests get up to 30 s to finish.
pub async fn run(settings: Settings, db: DatabaseConnection) -> std::io::Result<()> {
    let bind_addr = settings.bind_addr;
    // Rows a tracker spooled while the database was away are stored from here too.
    let store = UsageStore::open(
        db.clone(),
        StoreOptions::new(settings.usage_spool_path.clone()),
    )
    .await;
    let state = AppState::open(db.clone(), settings)
        .await
        .map_err(|e| std::io::Error::other(format!("read database: {e}")))?;
    if state.settings.database_read_url.is_some() {
        tracing::info!("admin reads go to DATABASE_READ_URL");
    }
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
