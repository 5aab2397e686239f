//! An index of the failed calls by time (partial: only rows with `success` false, a few percent
//! of the table), for the admin overview's top error messages (issue 21): the newest failures
//! of a range are read from it instead of scanning every call of the range for the few that
//! failed. On PostgreSQL it is built `CONCURRENTLY` (writers go on during the build), so this
//! migration runs outside a transaction.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub const INDEX: &str = "llm_tracker_usage_failed_created_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => {
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_failed_created_idx \
                 ON llm_tracker_usage (created_at) WHERE NOT success"
            }
            _ => {
                "CREATE INDEX IF NOT EXISTS llm_tracker_usage_failed_created_idx \
                 ON llm_tracker_usage (created_at) WHERE success = 0"
            }
        };
        manager.get_connection().execute_unprepared(sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS llm_tracker_usage_failed_created_idx")
            .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}
