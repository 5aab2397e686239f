//! An index of the rows with negative `total_tokens` (partial: normally empty, so it costs a
//! write nothing but the predicate's test). `by_user` ranks users through upper bounds over
//! whole months only while no row holds negative tokens (issue 16, `rollup::UserBounds`); this
//! index answers "is there one?" without reading the table. On PostgreSQL it is built
//! `CONCURRENTLY` (writers go on during the build), so this migration runs outside a
//! transaction.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub const INDEX: &str = "llm_tracker_usage_negative_tokens_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => {
                // A build cut off midway (this migration is then not recorded, and runs again)
                // leaves an invalid index that `IF NOT EXISTS` would keep, and the planner
                // would not use: drop it first.
                db.execute_unprepared(
                    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c \
                     ON c.oid = i.indexrelid WHERE c.relname = \
                     'llm_tracker_usage_negative_tokens_idx' AND NOT i.indisvalid) THEN \
                     DROP INDEX llm_tracker_usage_negative_tokens_idx; END IF; END $$",
                )
                .await?;
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_negative_tokens_idx \
                 ON llm_tracker_usage (created_at) WHERE total_tokens < 0"
            }
            _ => {
                "CREATE INDEX IF NOT EXISTS llm_tracker_usage_negative_tokens_idx \
                 ON llm_tracker_usage (created_at) WHERE total_tokens < 0"
            }
        };
        db.execute_unprepared(sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS llm_tracker_usage_negative_tokens_idx")
            .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}
