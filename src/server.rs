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
    let metrics_on =
        state.settings.metrics_token.is_some() || state.settings.metrics_bind_addr.is_some();
    let metrics_addr = state.settings.metrics_bind_addr;
    let retention_days = state.settings.usage_retention_days;
    let server = HttpServer::new(move || app(state.clone()))
        .shutdown_timeout(30)
        .bind(bind_addr)?;
    tracing::info!(%bind_addr, "listening");
    let refresher = metrics_on.then(|| {
        tokio::spawn(refresh_metrics(
            db.clone(),
            store.clone(),
            std::time::Duration::from_secs(5),
        ))
    });
    let prerender = metrics_on.then(|| tokio::spawn(prerender_metrics()));
    let retention = retention_days.map(|days| {
        tracing::info!(
            days,
            "retention: rows older than this are deleted daily, statistics kept"
        );
        crate::retention::spawn_daily(db.clone(), days)
    });
    // `/metrics` alone on a second address, without a token, stopped with the main server.
    let metrics_server = match metrics_addr {
        Some(addr) => {
            let s = HttpServer::new(|| {
                actix_web::App::new().route(
                    "/metrics",
                    actix_web::web::get()
                        .to(|| async { crate::http::routes::metrics::exposition() }),
                )
            })
            .workers(1)
            .disable_signals()
            .bind(addr)?
            .run();
            tracing::info!(%addr, "metrics listening");
            let handle = s.handle();
            tokio::spawn(s);
            Some(handle)
        }
        None => None,
    };
    let served = server.run().await;
    if let Some(handle) = metrics_server {
        handle.stop(true).await;
    }
    for task in [refresher, prerender, retention].into_iter().flatten() {
        task.abort();
    }
    store.shutdown().await;
    served?;
    tracing::info!("shut down");
    if let Err(e) = db.close().await {
        tracing::warn!(error = %e, "closing the database pool failed");
    }
    Ok(())
}

/// Renders the metrics exposition every [`crate::metrics::PRERENDER_EVERY`], off the async
/// workers, so that a scrape only copies the text out (at most a second old).
pub async fn prerender_metrics() {
    loop {
        let _ = tokio::task::spawn_blocking(|| crate::metrics::metrics().prerender()).await;
        tokio::time::sleep(crate::metrics::PRERENDER_EVERY).await;
    }
}

/// Refreshes the metrics gauges that need the database or the spool, every `every`, so that
/// a scrape reads memory only (see [`refresh_metrics_once`]).
pub async fn refresh_metrics(
    db: DatabaseConnection,
    store: std::sync::Arc<UsageStore>,
    every: std::time::Duration,
) {
    loop {
        refresh_metrics_once(&db, &store, every).await;
        tokio::time::sleep(every).await;
    }
}

/// One refresh: the delta table's row count (rows pending fold; skipped when the database
/// does not answer within `within`), the spool's depth and size, the pool's connections.
pub async fn refresh_metrics_once(
    db: &DatabaseConnection,
    store: &UsageStore,
    within: std::time::Duration,
) {
    use sea_orm::{ConnectionTrait, Statement};
    let m = crate::metrics::metrics();
    let count = tokio::time::timeout(
        within,
        db.query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {}",
                migration::rollup::DELTA_TABLE
            ),
        )),
    )
    .await;
    if let Ok(Ok(Some(row))) = count
        && let Ok(n) = row.try_get::<i64>("", "n")
    {
        m.rollup_pending.set(n);
    }
    let (rows, bytes) = store.spool_depth().await;
    m.spool_rows.set(i64::try_from(rows).unwrap_or(i64::MAX));
    m.spool_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    let (in_use, idle) = crate::db::pool_connections(db);
    m.db_connections.with_label_values(&["in_use"]).set(in_use);
    m.db_connections.with_label_values(&["idle"]).set(idle);
}
