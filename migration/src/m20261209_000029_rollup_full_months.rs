//! Light user months (issue 16: the rollup's size at 100,000 users).
//!
//! At 10M rows a year from 100,000 Zipf users, most of a user's months hold a few calls, and
//! each user's latency histograms kept about one cell per call for them (2.88M rows, 376 MB:
//! as large as the rows they summed). This migration creates
//! `llm_tracker_usage_rollup_full_month (user_key, slot)`: the user months that keep their
//! cells (`migration::rollup::FULL_MONTH_TABLE`). Here a month is full when its totals cell
//! holds 10 calls or more (`FULL_MONTH_CALLS`), or when it starts before the retention horizon
//! (its deleted rows may be in no day cell); every other user month is light, and its month
//! cells in each user's latency histograms are deleted: reads count its rows instead. The fold
//! makes later months full when it takes them to the threshold (`migration::rollup::FoldSql`,
//! `promote_months_in`) and keeps cells for full months only.
//!
//! Under the folders' lock (PostgreSQL), then `ANALYZE`. Frozen SQL
//! (`migration/sql/m20261209_000029_*`): what this migration does, whatever later versions
//! change.
//!
//! `down` fills the light months' histogram cells from their rows (and the day cells that keep
//! what retention deleted), less what is pending, and drops the table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261209_000029_rollup_full_months.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20261209_000029_rollup_full_months.sqlite.sql");
pub const POSTGRES_DOWN_SQL: &str =
    include_str!("../sql/m20261209_000029_rollup_full_months.down.postgres.sql");
pub const SQLITE_DOWN_SQL: &str =
    include_str!("../sql/m20261209_000029_rollup_full_months.down.sqlite.sql");

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
        ALL_USERS, Calendar, FULL_MONTH_CALLS, FULL_MONTH_TABLE, RETENTION_TABLE, TOTALS_TABLE,
        USER_LATENCY_TABLE, create_full_month_table_sql, full_months_latency_fill_sql,
    };
    let month = Calendar::Month.code();
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    if down {
        out.push(full_months_latency_fill_sql(
            backend,
            &format!(
                "SELECT t.user_key AS fu, t.slot AS fm FROM {TOTALS_TABLE} t \
                 WHERE t.grain = {month} AND t.user_key < {ALL_USERS} \
                 AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot)"
            ),
        ));
        out.push(format!("DROP TABLE IF EXISTS {FULL_MONTH_TABLE}"));
        return out;
    }
    out.push(create_full_month_table_sql(backend));
    out.push(format!(
        "INSERT INTO {FULL_MONTH_TABLE} (user_key, slot) \
         SELECT t.user_key, t.slot FROM {TOTALS_TABLE} t LEFT JOIN {RETENTION_TABLE} h ON h.id = 1 \
         WHERE t.grain = {month} AND t.user_key < {ALL_USERS} \
         AND (t.calls >= {FULL_MONTH_CALLS} OR t.slot < h.horizon_slot)"
    ));
    out.push(format!(
        "DELETE FROM {USER_LATENCY_TABLE} WHERE grain = {month} AND NOT EXISTS \
         (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = {USER_LATENCY_TABLE}.user_key \
         AND f.slot = {USER_LATENCY_TABLE}.slot)"
    ));
    if backend == DbBackend::Postgres {
        out.push(format!("ANALYZE {FULL_MONTH_TABLE}, {USER_LATENCY_TABLE}"));
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
