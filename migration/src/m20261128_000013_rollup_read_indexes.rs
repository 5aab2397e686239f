//! Two indexes for the rollup's reads on PostgreSQL: the ranking of `include=by_user` reads
//! from an index alone, and reads find the pending contributions without scanning the delta
//! table's empty pages.
//!
//! ## The ranking
//!
//! `include=by_user` without a user filter first ranks every user on calls and tokens: the
//! totals table's cells of a run (a year, a month, days) for all users, through the
//! `(grain, slot, user_key)` index of migration 000011. That index does not hold the two sums,
//! so each cell cost a heap page: a month cell is rewritten by every fold and never sits near
//! its neighbours (`EXPLAIN (ANALYZE, BUFFERS)` at 10,000 users: 32,765 cells, 24k buffers,
//! 211 ms). With the sums in the index (`INCLUDE (calls, total_tokens)`) the ranking is an
//! index-only scan: 48 ms for the same statement after a `VACUUM`; measured request figures in
//! `docs/benchmarks.md`. The old index is dropped (the new one serves every query it served).
//!
//! ## The pending contributions
//!
//! Every rollup statement adds the delta rows of its slots, and every plan starts from the
//! delta's lowest and highest slot. The delta table had no index (appends stay cheap) and is
//! nearly always almost empty, but migration 000008 keeps it from being truncated (truncating
//! takes a lock every insert would wait for), so after a burst of writes its emptied pages stay:
//! 40,000 rows pending once left 26 MB, and from then on every statement of every read scanned
//! them (the extent probe alone 2 × 6.5 ms; `include=by_user` all time 40 → 87 ms at 10,000
//! users). With an index on `slot` reads touch only live entries (87 → 54 ms); what the index
//! costs each tracked call is measured in `docs/benchmarks.md`.
//!
//! SQLite is left as it is: it has no `INCLUDE`, sums as key columns would move in the index on
//! every fold, and its deleted rows' pages leave the table's b-tree (a scan never visits them).
//!
//! The SQL is written out here, not generated from live code.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 3] = [
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_rank_idx \
     ON llm_tracker_usage_rollup_total (grain, slot, user_key) INCLUDE (calls, total_tokens)",
    "DROP INDEX IF EXISTS llm_tracker_usage_rollup_total_slot_idx",
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_delta_slot_idx \
     ON llm_tracker_usage_rollup_delta (slot)",
];

const DOWN: [&str; 3] = [
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_slot_idx \
     ON llm_tracker_usage_rollup_total (grain, slot, user_key)",
    "DROP INDEX IF EXISTS llm_tracker_usage_rollup_total_rank_idx",
    "DROP INDEX IF EXISTS llm_tracker_usage_rollup_delta_slot_idx",
];

async fn run(manager: &SchemaManager<'_>, statements: [&str; 3]) -> Result<(), DbErr> {
    if manager.get_database_backend() == DbBackend::Postgres {
        for sql in statements {
            manager.get_connection().execute_unprepared(sql).await?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, DOWN).await
    }
}
