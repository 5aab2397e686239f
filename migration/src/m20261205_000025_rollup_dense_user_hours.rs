//! UTC hour cells for the users who call most (issue 16: a user's series at real cardinality).
//!
//! A user's finest cells are UTC days, so one user's hourly series, or daily series in a zone
//! whose days are not UTC days (New York), read that user's rows. For the heaviest users those
//! are hundreds of thousands of rows: the heaviest of the 10,000-user benchmark (677,035 rows)
//! took 5.6 s for an hourly series over all time and 150 ms for a daily one in New York. This
//! migration creates `llm_tracker_usage_rollup_dense_user` (`user_key`, `since`, `until`): the
//! users whose UTC hours and :30 hours the totals table keeps (grains 4 and 6 with the user's
//! key) from slot `since` on, and before `until` when set (`migration::rollup::DENSE_TABLE`).
//! Here every user with a UTC day of 150 calls or more becomes dense from the retention
//! horizon, or the user's first day; the fold keeps the hours, makes later users dense and
//! stops keeping them for idle ones (`migration::rollup::promote_dense_in`).
//!
//! The hour cells are filled from the rows less what is pending in the delta (which the fold
//! adds), under the folders' lock (PostgreSQL), then `ANALYZE`. Frozen SQL
//! (`migration/sql/m20261205_000025_*`): what this migration does, whatever later versions
//! change.
//!
//! `down` deletes the hour cells of users and drops the table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261205_000025_rollup_dense_user_hours.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261205_000025_rollup_dense_user_hours.sqlite.sql");

/// The frozen statements of `up`.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

/// What today's code generates for `up` (compared with [`frozen`] by a test while this is the
/// newest migration of the rollup's cells).
pub fn generated(backend: DbBackend) -> Vec<String> {
    use crate::rollup::{
        DAY, DENSE_DAY_CALLS, DENSE_TABLE, RETENTION_TABLE, TOTALS_TABLE, create_dense_table_sql,
        dense_backfill_sql,
    };
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    out.push(create_dense_table_sql(backend));
    out.push(format!(
        "INSERT INTO {DENSE_TABLE} (user_key, since) \
         SELECT t.user_key, CASE WHEN h.horizon_slot IS NOT NULL AND h.horizon_slot > MIN(t.slot) \
         THEN h.horizon_slot ELSE MIN(t.slot) END \
         FROM {TOTALS_TABLE} t LEFT JOIN {RETENTION_TABLE} h ON h.id = 1 \
         WHERE t.grain = {DAY} AND t.user_key < 2147483648 \
         GROUP BY t.user_key, h.horizon_slot HAVING MAX(t.calls) >= {DENSE_DAY_CALLS}"
    ));
    out.push(dense_backfill_sql(
        backend,
        &format!("SELECT user_key FROM {DENSE_TABLE}"),
    ));
    if backend == DbBackend::Postgres {
        out.push(format!("ANALYZE {TOTALS_TABLE}, {DENSE_TABLE}"));
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(manager, &frozen(manager.get_database_backend())).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let lock = format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})");
        let mut statements: Vec<&str> = Vec::new();
        if manager.get_database_backend() == DbBackend::Postgres {
            statements.push(&lock);
        }
        statements.push(
            "DELETE FROM llm_tracker_usage_rollup_total WHERE grain IN (4, 6) AND user_key <> 2147483648",
        );
        statements.push("DROP TABLE IF EXISTS llm_tracker_usage_rollup_dense_user");
        crate::util::run_all(manager, &statements).await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
