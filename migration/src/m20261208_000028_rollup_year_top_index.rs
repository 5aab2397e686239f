//! An index of the users' year cells in the totals table by tokens, most first, per year
//! (partial: the year grain only, one cell per user and year), as 000026's is of their month
//! cells. `by_user` over a range whose cover holds a whole year (all time above all: an open
//! range is widened to whole years) bounds its users from each year's users with the most
//! tokens (`rollup::top_bound_statement`) instead of ranking every user's year cells (all time
//! at 10,000 users: 20,000 cells read and summed, ~13 ms of a 15 ms request). On PostgreSQL it
//! is built `CONCURRENTLY`, so this migration runs outside a transaction.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;

pub const INDEX: &str = "llm_tracker_usage_rollup_total_year_top_idx";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::create_index(
            manager,
            INDEX,
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tracker_usage_rollup_total_year_top_idx \
             ON llm_tracker_usage_rollup_total (slot, total_tokens DESC, user_key) \
             WHERE grain = 35040",
            Some(
                "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_year_top_idx \
                 ON llm_tracker_usage_rollup_total (slot, total_tokens DESC, user_key) \
                 WHERE grain = 35040",
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
