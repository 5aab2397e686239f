//! A user's cells per model and outcome become UTC months (issue 16, the size budget).
//!
//! Since migration 000011 each user had UTC day cells in both rollup tables. Per model and
//! outcome those did not compress: at 10M rows from 10,000 users, 3.46M of the 4.44M such
//! cells held a single call, and they were most of the rollup's size, which with the streaming
//! and latency sums added since came to 0.59× the usage table (the budget is 0.5×). A user's
//! days stay in the totals table (their series and sums over all models); per model and
//! outcome a user now has month cells, summed here from the day cells. Where a user's
//! per-model sums need part of a month (`by_model` with a user filter over a range that is not
//! whole months, a user filter with a model or outcome filter) the rows of those days are read
//! through the `(user_id, created_at)` index. See `docs/architecture.md` ("Cells per user").
//!
//! Day cells per model stay only for what retention deleted (before its horizon): each
//! retention batch now adds its rows to them (`migration::rollup::retained_days_upsert_sql`),
//! and here the day cells before the horizon keep only the deleted rows' sums — the rows still
//! there are taken out (and what is pending there put in, as the fold would have). From the
//! horizon on, the day cells are deleted.
//!
//! Under the folders' lock (PostgreSQL); pending delta rows get their month cells when folded.
//! Then `ANALYZE`. Frozen SQL (`migration/sql/m20261202_000021_*`): what this migration does,
//! whatever later versions change.
//!
//! `down` deletes the month cells and counts the day cells again from the rows (less what is
//! pending in the delta, which the older version's fold adds); before a retention horizon the
//! deleted rows' day cells are still there and the rows left are added to them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261202_000021_rollup_user_model_months.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261202_000021_rollup_user_model_months.sqlite.sql");

/// `down`'s recount of a user's days per model and outcome from the rows.
const DOWN_POSTGRES_SQL: &str =
    include_str!("../sql/m20261202_000021_rollup_user_model_months.down.postgres.sql");
const DOWN_SQLITE_SQL: &str =
    include_str!("../sql/m20261202_000021_rollup_user_model_months.down.sqlite.sql");

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let statements =
            crate::util::for_backend(manager.get_database_backend(), POSTGRES_SQL, SQLITE_SQL);
        crate::util::run_all(manager, &statements).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let mut statements = Vec::new();
        if backend == DbBackend::Postgres {
            statements.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
        }
        statements.push(
            "DELETE FROM llm_tracker_usage_rollup WHERE grain = 2976 AND user_key <> 2147483648"
                .to_owned(),
        );
        statements.extend(
            crate::util::for_backend(backend, DOWN_POSTGRES_SQL, DOWN_SQLITE_SQL)
                .into_iter()
                .map(str::to_owned),
        );
        if backend == DbBackend::Postgres {
            statements.push("ANALYZE llm_tracker_usage_rollup".to_owned());
        }
        for sql in statements {
            conn.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
