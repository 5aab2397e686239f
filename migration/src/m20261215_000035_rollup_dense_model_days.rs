//! Day cells per model and outcome for the users who call most (issue 16: a heavy user's last
//! week by model).
//!
//! A user's cells per model and outcome are UTC months (migration 000021), so the user's
//! per-model sums over part of a month read that user's rows there: for the heaviest user of
//! the 10,000-user benchmark, the last 7 days were 14,186 rows (~12 ms of the database, beside
//! as many for the latency histograms). The dense users of migration 000025 (a UTC day of 150
//! calls) now keep UTC day cells per model and outcome in `llm_tracker_usage_rollup`, under
//! grain 97 (`migration::rollup::DENSE_MODEL_DAY`; grain 96 there keeps what retention deleted),
//! in the window of their hours (`since`, `until`), kept by the fold, promotion and demotion
//! like the hours.
//!
//! `up` deletes any such cells (a fold of a newer version may have added some before this ran)
//! and fills them from the dense users' rows less what is pending in the delta (which the fold
//! adds), under the folders' lock (PostgreSQL), then `ANALYZE`. Frozen SQL
//! (`migration/sql/m20261215_000035_*`). `down` deletes the cells.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261215_000035_rollup_dense_model_days.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261215_000035_rollup_dense_model_days.sqlite.sql");
pub const POSTGRES_DOWN_SQL: &str =
    include_str!("../sql/m20261215_000035_rollup_dense_model_days.down.postgres.sql");
pub const SQLITE_DOWN_SQL: &str =
    include_str!("../sql/m20261215_000035_rollup_dense_model_days.down.sqlite.sql");

/// The frozen statements of `up` and (`down`) of `down`.
pub fn frozen(backend: DbBackend, down: bool) -> Vec<&'static str> {
    match down {
        false => crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL),
        true => crate::util::for_backend(backend, POSTGRES_DOWN_SQL, SQLITE_DOWN_SQL),
    }
}

/// What today's code generates for `up` (`down`: for `down`), compared with [`frozen`] by a
/// test while this is the newest migration of the dense users' cells.
pub fn generated(backend: DbBackend, down: bool) -> Vec<String> {
    use crate::rollup::{DENSE_MODEL_DAY, DENSE_TABLE, TABLE, dense_model_days_backfill_sql};
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    out.push(format!(
        "DELETE FROM {TABLE} WHERE grain = {}",
        DENSE_MODEL_DAY.code
    ));
    if down {
        return out;
    }
    out.push(dense_model_days_backfill_sql(
        backend,
        &format!("SELECT user_key FROM {DENSE_TABLE}"),
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
