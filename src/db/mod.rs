//! Connecting to the database and applying migrations.

pub mod dialect;
pub mod entities;

pub use dialect::Dialect;

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, TransactionTrait,
};

use crate::config::DatabaseUrl;

/// How long a SQLite writer waits for a lock before giving up.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::config::DEFAULT_SQLITE_CACHE_MIB;

/// Connections in a SQLite pool.
const SQLITE_CONNECTIONS: u32 = 4;

/// Opens a pool for `url` ([`connect_with`] and the default SQLite cache).
pub async fn connect(url: &DatabaseUrl) -> Result<DatabaseConnection, DbErr> {
    connect_with(url, DEFAULT_SQLITE_CACHE_MIB).await
}

/// Opens a pool for `url`: SQLite in WAL mode with a busy timeout, foreign keys on and a page
/// cache of `sqlite_cache_mib` MiB shared out between its 4 connections (SQLite's own cache is
/// per connection: at 64 MiB each, as before, a busy server reached 160–250 MB of memory);
/// PostgreSQL with a pool sized for a small server.
///
/// The pool connects lazily: this never waits for the database, and succeeds while it is
/// down (a malformed URL is still an error). Each use then connects as needed, failing after
/// the acquire timeout (5 s) while the database stays away.
pub async fn connect_with(
    url: &DatabaseUrl,
    sqlite_cache_mib: u32,
) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(url.expose().to_owned());
    opts.sqlx_logging(false)
        .connect_lazy(true)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5));
    if url.is_sqlite() {
        // A negative cache_size is in KiB.
        let per_connection_kib =
            (u64::from(sqlite_cache_mib) * 1024 / u64::from(SQLITE_CONNECTIONS)).max(64);
        opts.max_connections(SQLITE_CONNECTIONS)
            .min_connections(1)
            .map_sqlx_sqlite_opts(move |o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true)
                    .pragma("cache_size", format!("-{per_connection_kib}"))
            });
    } else {
        opts.max_connections(16).min_connections(1);
    }
    Database::connect(opts).await
}

/// Whether the database answers within `within`.
pub async fn answers(db: &DatabaseConnection, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, db.ping()).await, Ok(Ok(())))
}

/// A lazily connecting pool for `url`, migrated if the database answers within `probe`.
/// Returns whether it did: `false` means the database was away, and the caller starts without
/// it (the usage store then migrates once it answers, `StoreOptions::migrate`). A migration
/// that fails while the database answers is an error.
pub async fn open(
    url: &DatabaseUrl,
    probe: Duration,
    sqlite_cache_mib: u32,
) -> Result<(DatabaseConnection, bool), DbErr> {
    let db = connect_with(url, sqlite_cache_mib).await?;
    let up = answers(&db, probe).await;
    if up {
        migrate(&db).await?;
    } else {
        tracing::warn!("the database does not answer; starting without it");
    }
    Ok((db, up))
}

/// Applies every pending migration. On PostgreSQL, when any was applied, then vacuums the
/// rollup tables and the usage table (outside the migrations' transactions, where `VACUUM`
/// cannot run): a migration that fills or rewrites cells leaves pages that are not marked
/// all-visible, and until autovacuum comes round every index-only read of the cells also
/// visits the heap — measured at 10M rows from 10,000 users, `include=by_user` over 30 days
/// took 103 ms before the `VACUUM` and 46 ms after. The usage table likewise: one user's rows
/// are read from its `(user_id, created_at)` index alone only where its pages are marked
/// (migration 000033), which a table never vacuumed, or rewritten by `VACUUM FULL`, lacks
/// until 10,000 more inserts bring its autovacuum (a vacuum skips the pages already marked:
/// 4.5 s at 10M rows where none was). It does not block reads or writes; a failure is logged,
/// not returned.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    let applied = Migrator::get_pending_migrations(db).await?.len();
    Migrator::up(db, None).await?;
    if applied > 0 && db.get_database_backend() == sea_orm::DbBackend::Postgres {
        let started = std::time::Instant::now();
        match db.execute_unprepared(VACUUM_AFTER_MIGRATING).await {
            Ok(_) => tracing::info!(
                applied,
                seconds = started.elapsed().as_secs_f64(),
                "migrations applied; usage and rollup tables vacuumed"
            ),
            Err(e) => tracing::warn!(error = %e, "vacuuming the tables after migrating"),
        }
    }
    Ok(())
}

/// What [`migrate`] runs on PostgreSQL after applying migrations.
const VACUUM_AFTER_MIGRATING: &str = "VACUUM (ANALYZE) llm_tracker_usage_rollup, \
     llm_tracker_usage_rollup_total, llm_tracker_usage_latency, llm_tracker_usage_latency_user, \
     llm_tracker_usage";

/// True when the database answers and the usage table is readable.
pub async fn is_ready(db: &DatabaseConnection) -> bool {
    let probe = db.execute_unprepared("SELECT 1 FROM llm_tracker_usage LIMIT 1");
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(_))
    )
}

/// A read-only transaction: every statement of one request sees the same snapshot (on
/// PostgreSQL `REPEATABLE READ`), so the rollup and the raw edge rows agree.
pub(crate) async fn read_txn(
    db: &DatabaseConnection,
) -> Result<sea_orm::DatabaseTransaction, DbErr> {
    match Dialect::of(db.get_database_backend()).read_snapshot() {
        Some((isolation, access)) => db.begin_with_config(Some(isolation), Some(access)).await,
        None => db.begin().await,
    }
}

/// The name of `txn`'s snapshot, for other connections to read exactly what it reads
/// (PostgreSQL `pg_export_snapshot`, what `pg_dump --jobs` does; the name is good while `txn`
/// is open).
pub(crate) async fn export_snapshot(txn: &sea_orm::DatabaseTransaction) -> Result<String, DbErr> {
    txn.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT pg_export_snapshot()",
    ))
    .await?
    .ok_or_else(|| DbErr::Custom("pg_export_snapshot returned no row".into()))?
    .try_get_by_index(0)
}

/// Up to `n` more read-only transactions that see exactly what `txn` sees (its exported
/// snapshot, [`export_snapshot`]), under the rollup's planner settings, each on another
/// connection of the pool — for a read to run several of its statements at once. Empty on
/// SQLite, and fewer where fewer connections are spare ([`spare_connections`]' rule: an idle
/// one, or a new one within [`SPARE_CONNECT`] while the pool is under half its size).
pub async fn snapshot_txns(
    db: &DatabaseConnection,
    txn: &sea_orm::DatabaseTransaction,
    n: usize,
) -> Result<Vec<sea_orm::DatabaseTransaction>, DbErr> {
    let mut out = Vec::new();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(out);
    }
    let pool = db.get_postgres_connection_pool();
    while out.len() < n && has_spare(pool) {
        match tokio::time::timeout(SPARE_CONNECT, read_txn(db)).await {
            Ok(Ok(other)) => out.push(other),
            _ => break,
        }
    }
    if out.is_empty() {
        return Ok(out);
    }
    let snapshot = export_snapshot(txn).await?;
    let settings = Dialect::Postgres.rollup_settings().unwrap_or_default();
    let setup = format!(
        "SET TRANSACTION SNAPSHOT '{}'; {settings}",
        snapshot_name(&snapshot)?
    );
    for other in &out {
        other.execute_unprepared(&setup).await?;
    }
    Ok(out)
}

/// How long a read waits for a new connection of its own beside the one it has
/// ([`spare_connections`]); past it the read goes on with the one.
const SPARE_CONNECT: Duration = Duration::from_millis(250);

/// Up to `n` connections of `db`'s PostgreSQL pool that a read may use beside its own, without
/// making anyone wait: idle ones, and new ones while the pool is under half its size (the rest
/// is left to other requests and to the tracker's writes). Empty on SQLite.
pub(crate) async fn spare_connections(
    db: &DatabaseConnection,
    n: usize,
) -> Vec<sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Postgres>> {
    let mut out = Vec::new();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return out;
    }
    let pool = db.get_postgres_connection_pool();
    while out.len() < n {
        match pool.try_acquire() {
            Some(conn) => out.push(conn),
            None if has_spare(pool) => {
                match tokio::time::timeout(SPARE_CONNECT, pool.acquire()).await {
                    Ok(Ok(conn)) => out.push(conn),
                    _ => break,
                }
            }
            None => break,
        }
    }
    out
}

/// Whether a read may take one more connection of `pool` beside its own without making anyone
/// wait: an idle one, or a new one while the pool is under half its size (the rest is left to
/// other requests and to the tracker's writes).
fn has_spare(pool: &sea_orm::sqlx::PgPool) -> bool {
    pool.num_idle() > 0 || pool.size() < pool.options().get_max_connections() / 2
}

/// `snapshot` as a name PostgreSQL gives a snapshot — hex digits and dashes
/// (`00000003-0000001B-1`) — to be written into a `SET TRANSACTION SNAPSHOT`; anything else
/// is an error, not written into a statement.
pub(crate) fn snapshot_name(snapshot: &str) -> Result<&str, DbErr> {
    match !snapshot.is_empty() && snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        true => Ok(snapshot),
        false => Err(DbErr::Custom(format!(
            "an unexpected snapshot name {snapshot:?}"
        ))),
    }
}

/// The pool's connections: `(in use, idle)`. Reads the pool's own counters (no query).
pub fn pool_connections(db: &DatabaseConnection) -> (i64, i64) {
    let (size, idle) = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle())
        }
        sea_orm::DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle())
        }
        _ => (0, 0),
    };
    let idle = i64::try_from(idle).unwrap_or(i64::MAX);
    (i64::from(size).saturating_sub(idle).max(0), idle)
}
