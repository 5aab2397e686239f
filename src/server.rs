//! Running the HTTP server until Ctrl-C or SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::HttpServer;
use sea_orm::DatabaseConnection;

use crate::config::Settings;
use crate::http::{AppState, app};
use crate::tracker::UsageStore;

/// Serves until a shutdown signal; in-flight requests get up to 30 s to finish.
///
/// `migrated` says whether the schema is known to be in place. If not (the database did not
/// answer at start), the server starts all the same: `/healthz` answers 200, `/readyz` and the
/// admin routes 503, and a background task migrates as soon as the database answers.
pub async fn run(
    settings: Settings,
    db: DatabaseConnection,
    migrated: bool,
) -> std::io::Result<()> {
    let bind_addr = settings.bind_addr;
    let schema_ready = Arc::new(AtomicBool::new(migrated));
    let migrator =
        (!migrated).then(|| tokio::spawn(migrate_when_possible(db.clone(), schema_ready.clone())));
    // Rows a tracker spooled while the database was away are stored from here too.
    let store = UsageStore::open(db.clone(), crate::tracker::store_options(&settings)).await;
    let state = AppState::open(db.clone(), settings, schema_ready)
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
    if let Some(migrator) = migrator {
        migrator.abort();
    }
    store.shutdown().await;
    served?;
    tracing::info!("shut down");
    if let Err(e) = db.close().await {
        tracing::warn!(error = %e, "closing the database pool failed");
    }
    Ok(())
}

/// Migrates once the database answers (retrying every 0.1 s, doubling up to 5 s), then marks
/// the schema ready.
async fn migrate_when_possible(db: DatabaseConnection, ready: Arc<AtomicBool>) {
    let mut delay = Duration::from_millis(100);
    let mut said = false;
    loop {
        let attempt = if crate::db::answers(&db, Duration::from_secs(2)).await {
            crate::db::migrate(&db).await
        } else {
            Err(sea_orm::DbErr::Custom(
                "the database does not answer".into(),
            ))
        };
        match attempt {
            Ok(()) => {
                ready.store(true, Ordering::SeqCst);
                tracing::info!("database reachable: migrations applied; admin routes are up");
                return;
            }
            Err(e) => {
                if !said {
                    tracing::warn!(error = %e, "database not ready; /readyz and admin routes answer 503 until it is");
                    said = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
