//! Planner statistics for the usage table and the rollup tables before the migration ends
//! (PostgreSQL).
//!
//! The backfill of migration 000005 (and the cells of 000007) fill the rollup tables in one
//! go; until autovacuum happens to analyze them the planner has no statistics for them, and
//! token-stats over a fresh `serve --demo` (50,000 rows) took 230 ms instead of 17 ms for a
//! month (debug build; the issue measured 290–430 ms vs. 14 ms at 5,000 users). ANALYZE reads
//! a sample, not the whole table: seconds even at 10M rows. The delta table is analyzed too:
//! right after a bulk write autovacuum may have seen it full, and every read adds it. SQLite's
//! plans are chosen without
//! `sqlite_stat1` and stay so.
//!
//! The SQL is written out here: it is what this migration does, whatever later versions change.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables analyzed (also by `rollup rebuild` and the demo's seeding).
pub const ANALYZE: &str = "ANALYZE llm_tracker_usage, llm_tracker_usage_rollup, \
    llm_tracker_usage_rollup_total, llm_tracker_usage_rollup_delta";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager.get_connection().execute_unprepared(ANALYZE).await?;
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        // Statistics are not schema: nothing to undo.
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        // ANALYZE runs fine in a transaction, but needs none.
        Some(false)
    }
}
