//! Each user's latency histograms (issue 21): the table [`rollup::USER_LATENCY_TABLE`] — per
//! user, UTC calendar month, model, outcome and latency bucket, the number of that user's calls
//! — so that `include=latency` with a `user_id` reads a few cells per whole month instead of
//! every row of the user (2.9 s for the heaviest user of the 10,000-user benchmark). The fold
//! keeps it from the delta rows, which carry their user and bucket already (no trigger change
//! for that); the PostgreSQL `TRUNCATE` trigger empties it too, so the triggers are installed
//! again (only that function's text changes). On PostgreSQL a row holds one user, month, model
//! and outcome with its buckets as one `bigint[]` (see [`rollup::USER_LATENCY_TABLE`]).
//!
//! The backfill counts every row with a user and a latency, less what is pending in the delta
//! (the fold adds that), under the folders' lock and with the usage table locked against
//! writers (PostgreSQL), so the rows and the pending contributions it reads are the same ones
//! the fold sees. Then `ANALYZE`.
//!
//! `up` runs frozen SQL (`migration/sql/m20261203_000023_*`); `down` puts 000020's triggers
//! back and drops the table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;
use crate::m20261201_000020_latency_histograms as m20;
use crate::rollup;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261203_000023_user_latency_histograms.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261203_000023_user_latency_histograms.sqlite.sql");

/// The statements of the frozen file for `backend`.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

/// The statements today's code writes for what this migration does.
pub fn generated(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push("LOCK TABLE llm_tracker_usage IN SHARE MODE".to_owned());
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    out.push(rollup::create_user_latency_table_sql(backend));
    if backend == DbBackend::Postgres {
        out.push(format!(
            "COMMENT ON TABLE {} IS '{}'",
            rollup::USER_LATENCY_TABLE,
            crate::util::OWNED_MARKER
        ));
    }
    // Every row, less the pending contributions (which the fold adds).
    let rows = format!(
        "{} UNION ALL SELECT slot, user_key, model, success, latency_bucket, -latency_calls AS latency_calls FROM {}",
        rollup::latency_rows(
            backend,
            &[rollup::Source::Table {
                name: "llm_tracker_usage",
                sign: 1,
                where_sql: None,
            }],
        ),
        rollup::DELTA_TABLE
    );
    out.push(rollup::user_latency_upsert_sql(
        backend,
        &rows,
        rollup::Calendar::Month.code(),
    ));
    out.extend(rollup::create_triggers_sql(backend));
    out.push(format!("ANALYZE {}", rollup::USER_LATENCY_TABLE));
    out
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(manager, &frozen(manager.get_database_backend())).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        for sql in crate::util::trigger_statements(m20::frozen(backend)) {
            conn.execute_unprepared(sql).await?;
        }
        conn.execute_unprepared(&format!(
            "DROP TABLE IF EXISTS {}",
            rollup::USER_LATENCY_TABLE
        ))
        .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
