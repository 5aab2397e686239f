//! One user's rows read from the `(user_id, created_at)` index alone (issue 16). The index
//! keeps the columns the statistics read of a row as payload (`INCLUDE`), so a read of one
//! user's rows — the partial days at a range's ends, a series' days the user's cells do not
//! fit, a user's per-model sums outside whole months, the latency histograms' rows — is an
//! index-only scan: the user's entries lie next to each other in the index, where the rows lie
//! one or two to a heap page. At 10M rows and 10,000 users (`EXPLAIN ANALYZE`): a typical
//! user's 4,831 rows of a year's half, 4,829 heap pages and 18–20 ms, are 89 index pages and
//! ~2 ms; the heaviest user's per-model sums of 7 days (14,186 rows) 31–37 → 11–12 ms. The
//! index is 924 MB instead of 361 MB there (2,202 MB of table); a one-row insert measured the
//! same with either (`pgbench`, 0.09–0.14 ms).
//!
//! An index-only scan reads a row's heap page when the page is not known to be all-visible,
//! which only `VACUUM` records. On an insert-only table autovacuum comes after 20 % of the
//! table was inserted (PostgreSQL's default), so the newest fifth of the rows — the weeks a
//! dashboard looks at — would still be read from the heap. The table is vacuumed after every
//! 10,000 inserts and 0.1 % of its rows instead (`autovacuum_vacuum_insert_threshold`,
//! `autovacuum_vacuum_insert_scale_factor`): such a vacuum visits the pages written since the
//! last one and skips the indexes when nothing was deleted; it takes no lock a writer waits
//! for. These are storage parameters of the table; the Django app neither reads nor sets them.
//!
//! The index keeps its name and keys (the SPEC's `(user_id, created_at)`). It is built
//! `CONCURRENTLY` beside the old one, which is then dropped `CONCURRENTLY`, and renamed, so
//! writers go on throughout and the migration runs outside a transaction; a run cut off midway
//! runs again from where it stopped. `down` puts the plain index back the same way.
//!
//! PostgreSQL only: SQLite has no `INCLUDE`, and its reads stay as they are.
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// The index of one user's rows (its name since migration 000002).
pub const INDEX: &str = "llm_tracker_usage_user_created_idx";

/// The covering index while it is built beside the plain one.
const COVER: &str = "llm_tracker_usage_user_created_cover_idx";

/// The plain index while `down` builds it beside the covering one.
const PLAIN: &str = "llm_tracker_usage_user_created_plain_idx";

/// The columns the statistics read of one user's rows, besides the keys.
pub const INCLUDED: &str = "model, prompt_tokens, completion_tokens, total_tokens, \
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
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {COVER} \
                 ON llm_tracker_usage (user_id, created_at) INCLUDE ({INCLUDED})"
            ),
        )
        .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE llm_tracker_usage SET (autovacuum_vacuum_insert_threshold = 10000, \
                 autovacuum_vacuum_insert_scale_factor = 0.001)",
            )
            .await?;
        Ok(())
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
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {PLAIN} \
                 ON llm_tracker_usage (user_id, created_at)"
            ),
        )
        .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE llm_tracker_usage RESET (autovacuum_vacuum_insert_threshold, \
                 autovacuum_vacuum_insert_scale_factor)",
            )
            .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}
