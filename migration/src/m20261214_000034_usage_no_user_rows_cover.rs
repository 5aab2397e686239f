//! The calls made for no user read from their own index alone (issue 16), as one user's rows
//! are since migration 000033. `by_user` counts the calls made for no user among its chosen
//! "users" on a range's partial days, through the partial index of those rows by time
//! (migration 000027); the index now keeps the columns the statistics read of a row as payload
//! (`INCLUDE`, with `user_id`, always null there, which the statement groups by), so that read
//! is an index-only scan where the rows lie one or two to a heap page. At 10M rows and 10,000
//! users (`EXPLAIN ANALYZE`, a partial day of 10 hours, 1,199 such rows): 2.3 ms through the
//! heap, 0.75 ms from the index, the chosen users' whole statement 5.2 → 2.4–2.9 ms, run once
//! for each partial end of the range. The index is 85 MB instead of 21 MB there (about a tenth
//! of the benchmark's rows are made for no user; the table is 2.2 GB).
//!
//! The index keeps its name, keys and predicate. Like 000033's it is built `CONCURRENTLY`
//! beside the old one, which is then dropped `CONCURRENTLY`, and renamed, so writers go on
//! throughout and the migration runs outside a transaction; a run cut off midway runs again
//! from where it stopped. `down` puts the plain index back the same way. The pages' visibility
//! that index-only scans need is 000033's insert autovacuum, and the `VACUUM` after `migrate`.
//!
//! PostgreSQL only: SQLite has no such index (see migration 000027).
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// The index of the calls made for no user (its name since migration 000027).
pub const INDEX: &str = "llm_tracker_usage_no_user_created_idx";

/// The covering index while it is built beside the plain one.
const COVER: &str = "llm_tracker_usage_no_user_created_cover_idx";

/// The plain index while `down` builds it beside the covering one.
const PLAIN: &str = "llm_tracker_usage_no_user_created_plain_idx";

/// The columns the statistics read of those rows, besides the key.
pub const INCLUDED: &str = "user_id, model, prompt_tokens, completion_tokens, total_tokens, \
     cached_tokens, reasoning_tokens, success, cost, started_at, first_chunk_at";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        crate::util::swap_index(
            manager,
            INDEX,
            true,
            COVER,
            &format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {COVER} ON llm_tracker_usage \
                 (created_at) INCLUDE ({INCLUDED}) WHERE user_id IS NULL"
            ),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        crate::util::swap_index(
            manager,
            INDEX,
            false,
            PLAIN,
            &format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {PLAIN} ON llm_tracker_usage \
                 (created_at) WHERE user_id IS NULL"
            ),
        )
        .await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}
