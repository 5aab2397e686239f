//! Light user years (issue 16: the rollup's size at a million users).
//!
//! Migrations 000029–000031 kept each user's histograms, month cells per model and day cells
//! for full months only, but every user month kept its month cell in
//! `llm_tracker_usage_rollup_total`. At 10M rows a year from a million Zipf users each user
//! calls about ten times a year: 2.2M user months, of which 1.6M in years of fewer than 10
//! calls, and their month and year cells were more than half of the rows' size. A user year
//! of fewer than 10 calls (`migration::rollup::FULL_YEAR_CALLS`) is now **light**: it keeps its
//! year cell, and its months are counted from its rows (a few), which are all there — a year
//! is made full before retention deletes any of its rows.
//!
//! `up` lists the full years (`migration::rollup::FULL_YEAR_TABLE`): 10 calls or more, holding
//! a full month, or starting before the retention horizon; deletes the other years' month
//! cells; indexes the year cells of fewer than 10 calls by tokens (`by_user`'s bound on a light
//! year); `ANALYZE`. Under the folders' lock (PostgreSQL). Frozen SQL
//! (`migration/sql/m20261212_000032_*`). `down` fills the light years' month cells again from
//! their rows, less what is pending.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261212_000032_rollup_light_years.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20261212_000032_rollup_light_years.sqlite.sql");
pub const POSTGRES_DOWN_SQL: &str =
    include_str!("../sql/m20261212_000032_rollup_light_years.down.postgres.sql");
pub const SQLITE_DOWN_SQL: &str =
    include_str!("../sql/m20261212_000032_rollup_light_years.down.sqlite.sql");

/// The frozen statements of `up` and (`down`) of `down`.
pub fn frozen(backend: DbBackend, down: bool) -> Vec<&'static str> {
    match down {
        false => crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL),
        true => crate::util::for_backend(backend, POSTGRES_DOWN_SQL, SQLITE_DOWN_SQL),
    }
}

/// What today's code generates for `up` (`down`: for `down`), compared with [`frozen`] by a
/// test while this is the newest migration of the light cells.
pub fn generated(backend: DbBackend, down: bool) -> Vec<String> {
    use crate::rollup::{
        ALL_USERS, Calendar, FULL_YEAR_TABLE, LIGHT_YEAR_INDEX, RETENTION_TABLE, TOTALS_TABLE,
        create_full_year_table_sql, create_light_year_index_sql, full_years_month_fill_sql,
        full_years_sql,
    };
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    if down {
        out.push(full_years_month_fill_sql(
            backend,
            &format!(
                "SELECT t.user_key AS fu, t.slot AS fy FROM {TOTALS_TABLE} t \
                 WHERE t.grain = {} AND t.user_key < {ALL_USERS} \
                 AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = t.user_key AND y.slot = t.slot)",
                Calendar::Year.code()
            ),
        ));
        out.push(format!("DROP INDEX IF EXISTS {LIGHT_YEAR_INDEX}"));
        out.push(format!("DROP TABLE IF EXISTS {FULL_YEAR_TABLE}"));
        return out;
    }
    out.push(create_full_year_table_sql(backend));
    out.extend(full_years_sql(
        backend,
        Some(&format!(
            "(SELECT h.horizon_slot FROM {RETENTION_TABLE} h WHERE h.id = 1)"
        )),
    ));
    out.push(create_light_year_index_sql());
    if backend == DbBackend::Postgres {
        out.push(format!("ANALYZE {FULL_YEAR_TABLE}, {TOTALS_TABLE}"));
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
