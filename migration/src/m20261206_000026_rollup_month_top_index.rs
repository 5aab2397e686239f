//! An index of the users' month cells in the totals table by tokens, most first, per month
//! (partial: the month grain only, about 13 cells per user and year). `by_user` bounds each
//! user's tokens over a range by their tokens over its whole months (issue 16,
//! `rollup::UserBounds`); with this index it reads each month's few hundred users with the most
//! tokens, and their cells, instead of summing every user's month cells (30 days from
//! mid-month at 10,000 users: 6.4 → 1.8 ms). On PostgreSQL it is built `CONCURRENTLY` (writers
//! go on during the build), so this migration runs outside a transaction.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;

pub const INDEX: &str = "llm_tracker_usage_rollup_total_month_top_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::create_index(
            manager,
            INDEX,
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_rollup_total_month_top_idx \
             ON llm_tracker_usage_rollup_total (slot, total_tokens DESC, user_key) \
             WHERE grain = 2976",
            Some(
                "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_month_top_idx \
                 ON llm_tracker_usage_rollup_total (slot, total_tokens DESC, user_key) \
                 WHERE grain = 2976",
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
