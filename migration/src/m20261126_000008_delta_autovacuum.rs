//! Autovacuum, never truncating, keeps the rollup's delta table small (PostgreSQL).
//!
//! Every fold deletes the rows it moved, so the delta table is all dead tuples a moment later.
//! Until now each fold ran `VACUUM` on it, from every process every second; that VACUUM
//! queued behind other sessions' locks, and cutting the emptied pages off the table's end
//! takes an ACCESS EXCLUSIVE lock, which the trigger of every tracked call's insert then waits
//! for (calls stalled for ~40 s after another session held a lock on the usage table). The
//! folds no longer vacuum: autovacuum does, as soon as 1,000 dead tuples are there (not a
//! fraction of the table), without cost-based pauses, and with `vacuum_truncate = false`, so no
//! VACUUM (automatic or by hand) ever takes a lock that an insert waits for; freed pages are
//! reused in place. SQLite has no VACUUM to schedule: deleted rows' pages are reused.
//!
//! The SQL is written out here, not generated from live code: it is what this migration does,
//! whatever later versions change.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = "ALTER TABLE llm_tracker_usage_rollup_delta SET (\
    vacuum_truncate = false, \
    autovacuum_vacuum_threshold = 1000, \
    autovacuum_vacuum_scale_factor = 0, \
    autovacuum_vacuum_insert_threshold = 1000, \
    autovacuum_vacuum_insert_scale_factor = 0, \
    autovacuum_vacuum_cost_delay = 0)";

const DOWN: &str = "ALTER TABLE llm_tracker_usage_rollup_delta RESET (\
    vacuum_truncate, \
    autovacuum_vacuum_threshold, \
    autovacuum_vacuum_scale_factor, \
    autovacuum_vacuum_insert_threshold, \
    autovacuum_vacuum_insert_scale_factor, \
    autovacuum_vacuum_cost_delay)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager.get_connection().execute_unprepared(UP).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager.get_connection().execute_unprepared(DOWN).await?;
        }
        Ok(())
    }
}
