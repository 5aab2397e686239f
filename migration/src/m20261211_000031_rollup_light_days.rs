//! Light user months, their days (issue 16: the rollup's size at 100,000 users).
//!
//! Migrations 000029 and 000030 kept each user's latency histograms and month cells per model
//! and outcome for full months only (`migration::rollup::FULL_MONTH_TABLE`: a user month of 10
//! calls or more). This one does the same for each user's day cells in
//! `llm_tracker_usage_rollup_total` (grain 96, the user's key): at 10M rows from 100,000 Zipf
//! users 1.93M of those 3.35M cells were light months', about one call each. A light month keeps
//! its month and year cells (which `by_user` ranks and bounds through); its days are counted
//! from its rows, and its day cells hold only what retention deletes from then on.
//!
//! A light month that starts before the retention horizon has lost rows that only its day
//! cells still count: such months are made full first (their histograms and cells per model
//! filled from their rows and the day cells that keep what retention deleted, less what is
//! pending), as 000029 made full every month before the horizon it found.
//!
//! Under the folders' lock (PostgreSQL), then `ANALYZE`. Frozen SQL
//! (`migration/sql/m20261211_000031_*`). `down` fills the light months' day cells again from
//! their rows, less what is pending.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261211_000031_rollup_light_days.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20261211_000031_rollup_light_days.sqlite.sql");
pub const POSTGRES_DOWN_SQL: &str =
    include_str!("../sql/m20261211_000031_rollup_light_days.down.postgres.sql");
pub const SQLITE_DOWN_SQL: &str =
    include_str!("../sql/m20261211_000031_rollup_light_days.down.sqlite.sql");

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
        ALL_USERS, Calendar, DAY, FULL_MONTH_TABLE, RETENTION_TABLE, TOTALS_TABLE,
        full_months_day_fill_sql, full_months_latency_fill_sql, full_months_model_fill_sql,
    };
    let month = Calendar::Month.code();
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    let light = |before_horizon: bool| {
        format!(
            "SELECT t.user_key AS fu, t.slot AS fm FROM {TOTALS_TABLE} t{join} \
             WHERE t.grain = {month} AND t.user_key < {ALL_USERS}{before} \
             AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = t.user_key AND f.slot = t.slot)",
            join = if before_horizon {
                format!(" JOIN {RETENTION_TABLE} h ON h.id = 1")
            } else {
                String::new()
            },
            before = if before_horizon {
                " AND t.slot < h.horizon_slot"
            } else {
                ""
            },
        )
    };
    if down {
        out.push(full_months_day_fill_sql(backend, &light(false)));
        return out;
    }
    // Light months before the horizon: full, their histograms and cells per model filled (their
    // day cells are whole), then listed.
    let before = light(true);
    out.push(full_months_latency_fill_sql(backend, &before));
    out.push(full_months_model_fill_sql(backend, &before));
    out.push(format!(
        "INSERT INTO {FULL_MONTH_TABLE} (user_key, slot) SELECT k.fu, k.fm FROM ({before}) k"
    ));
    out.push(format!(
        "DELETE FROM {TOTALS_TABLE} WHERE grain = {DAY} AND user_key < {ALL_USERS} AND NOT EXISTS \
         (SELECT 1 FROM {FULL_MONTH_TABLE} f WHERE f.user_key = {TOTALS_TABLE}.user_key AND f.slot = {})",
        Calendar::Month.start_sql(backend, &format!("{TOTALS_TABLE}.slot")),
    ));
    if backend == DbBackend::Postgres {
        out.push(format!("ANALYZE {FULL_MONTH_TABLE}, {TOTALS_TABLE}"));
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
