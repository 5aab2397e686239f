//! What the ingest and gateway benchmarks share: a database with a user and an API key, and
//! llm-tracker served on a loopback port with its usage store, as `serve` runs it.

use std::sync::Arc;

use llm_tracker::Settings;
use llm_tracker::api_keys::{self, NewKey, Scope};
use llm_tracker::config::DatabaseUrl;
use llm_tracker::http::{AppState, app};
use llm_tracker::tracker::{StoreOptions, UsageStore};
use llm_tracker::users::{NewUser, create_user};
use sea_orm::DatabaseConnection;

/// The database (`BENCH_DATABASE_URL`, else a SQLite file in `dir`), migrated, with a new user
/// and a key of `scope` for it: (connection, URL, "PostgreSQL"/"SQLite", key).
pub async fn database_with_key(
    dir: &std::path::Path,
    name: &str,
    scope: Scope,
) -> (DatabaseConnection, String, &'static str, String) {
    let url = std::env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("{name}.db")).display()
        )
    });
    let label = if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let db = llm_tracker::db::connect(&DatabaseUrl::parse("DATABASE_URL", &url).unwrap())
        .await
        .unwrap();
    llm_tracker::db::migrate(&db).await.unwrap();
    let username = format!("{name}-bench-{}", std::process::id());
    create_user(
        &db,
        NewUser {
            username: username.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let key = api_keys::create(
        &db,
        NewKey {
            username,
            name: "bench".into(),
            scopes: [scope].into(),
            lifetime: None,
        },
    )
    .await
    .unwrap()
    .key;
    (db, url, label, key)
}

/// Serves the application (2 workers) with a usage store spooling to `spool`, as the settings
/// say (commit deadline, write mode), on an actix system of its own; returns its base URL.
pub fn serve_with_store(
    db: DatabaseConnection,
    settings: Settings,
    spool: std::path::PathBuf,
) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let mut opts = StoreOptions::new(spool);
            opts.commit_deadline = settings.usage_commit_deadline;
            opts.write_mode = settings.usage_write_mode;
            let store = Arc::new(UsageStore::open(db.clone(), opts).await);
            let state = AppState::new(db, settings).with_store(store);
            let server = actix_web::HttpServer::new(move || app(state.clone()))
                .workers(2)
                .bind(("127.0.0.1", 0))
                .unwrap();
            let addr = server.addrs()[0];
            tx.send(format!("http://{addr}")).unwrap();
            server.run().await.unwrap();
        });
    });
    rx.recv().unwrap()
}
