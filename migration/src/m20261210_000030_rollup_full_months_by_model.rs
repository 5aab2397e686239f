//! Light user months, per model (issue 16: the rollup's size at 100,000 users).
//!
//! Migration 000029 kept each user's latency histograms for full months only
//! (`migration::rollup::FULL_MONTH_TABLE`: a user month of 10 calls or more, or one that starts
//! before the retention horizon). This one does the same for each user's month cells per model
//! and outcome in `llm_tracker_usage_rollup` (grain 2976, the user's key): at 10M rows from
//! 100,000 Zipf users 1.80M of those 2.88M cells were light months', about one call each.
//! Reads count a light month's per-model sums from its rows (and the day cells that keep what
//! retention deleted); the fold adds to full months' cells only and fills a month's cells when
//! it becomes full.
//!
//! Under the folders' lock (PostgreSQL), then `ANALYZE`. Frozen SQL
//! (`migration/sql/m20261210_000030_*`). `down` fills the light months' cells again from their
//! rows and retained day cells, less what is pending.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261210_000030_rollup_full_months_by_model.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261210_000030_rollup_full_months_by_model.sqlite.sql");
pub const POSTGRES_DOWN_SQL: &str =
    include_str!("../sql/m20261210_000030_rollup_full_months_by_model.down.postgres.sql");
pub const SQLITE_DOWN_SQL: &str =
    include_str!("../sql/m20261210_000030_rollup_full_months_by_model.down.sqlite.sql");

/// The frozen statements of `up` and (`down`) of `down`.
pub fn frozen(backend: DbBackend, down: bool) -> Vec<&'static str> {
    match down {
        false => crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL),
        true => crate::util::for_backend(backend, POSTGRES_DOWN_SQL, SQLITE_DOWN_SQL),
    }
}

/// What today's code generates for `up` (`down`: for `down`), compared with [`frozen`] by a
/// test while this is the newest migration of the full months.
pub fn generated(backend: DbBackend, down: bool) -> Vec<String> {
    use crate::rollup::{
        ALL_USERS, Calendar, FULL_MONTH_TABLE, TABLE, TOTALS_TABLE, full_months_model_fill_sql,
    };
    let month = Calendar::Month.code();
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    if down {
        out.push(full_months_model_fill_sql(
            backend,
            &format!(
                "SELECT t.user_key AS fu, t.slot AS fm FROM {TOTALS_TABLE} t \
                 WHERE t.grain = {month} AND t.user_key < {ALL_USERS} \
                 AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot)"
            ),
        ));
        return out;
    }
    out.push(format!(
        "DELETE FROM {TABLE} WHERE grain = {month} AND user_key < {ALL_USERS} AND NOT EXISTS \
         (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = {TABLE}.user_key AND f.slot = {TABLE}.slot)"
    ));
    if backend == DbBackend::Postgres {
        out.push(format!("ANALYZE {TABLE}"));
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(manager, &frozen(manager.get_database_backend(), false)).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(manager, &frozen(manager.get_database_backend(), true)).await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
