//! An index of the rows with negative `total_tokens` (partial: normally empty, so it costs a
//! write nothing but the predicate's test). `by_user` ranks users through upper bounds over
//! whole months only while no row holds negative tokens (issue 16, `rollup::UserBounds`); this
//! index answers "is there one?" without reading the table. On PostgreSQL it is built
//! `CONCURRENTLY` (writers go on during the build), so this migration runs outside a
//! transaction.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;

pub const INDEX: &str = "llm_tracker_usage_negative_tokens_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::create_index(
            manager,
            INDEX,
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_negative_tokens_idx \
             ON llm_tracker_usage (created_at) WHERE total_tokens < 0",
            Some(
                "CREATE INDEX IF NOT EXISTS llm_tracker_usage_negative_tokens_idx \
                 ON llm_tracker_usage (created_at) WHERE total_tokens < 0",
            ),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::drop_index(manager, INDEX).await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}
