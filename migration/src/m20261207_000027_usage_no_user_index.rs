//! An index of the calls made for no user by time (partial: rows whose `user_id` is null).
//! `by_user` reads the rows of its chosen users on a range's partial days, the calls made for
//! no user among them (issue 16): through the `(user_id, created_at)` index PostgreSQL chose
//! the `created_at` index instead and tested every row of the range (10 hours at 10,000 users:
//! 11,415 rows for 1,122 without a user, 1.5–2.1 ms; through this index 0.4 ms). About a tenth
//! of the rows in the benchmark's data: 21 MB at 10M rows, next to 2.2 GB of table. On
//! PostgreSQL it is built `CONCURRENTLY` (writers go on during the build), so this migration
//! runs outside a transaction.
//!
//! PostgreSQL only: SQLite reads those rows as a range of the `(user_id, created_at)` index
//! already (its planner takes `user_id IS NULL` as the index's first column), so there the
//! index would only cost writes.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;

pub const INDEX: &str = "llm_tracker_usage_no_user_created_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::create_index(
            manager,
            INDEX,
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_no_user_created_idx \
             ON llm_tracker_usage (created_at) WHERE user_id IS NULL",
            None,
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
