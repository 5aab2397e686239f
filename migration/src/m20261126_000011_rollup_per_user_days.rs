//! The rollup's layout at real user counts (issue 16): a user's own cells only where they
//! compress that user's rows.
//!
//! Before, every row was counted in its user's cells at every grain (15-minute slot, hour,
//! :15 and :30 hours, day), so a deployment with thousands of users, each calling a few times
//! an hour, kept about as many cells as rows, ten per row at worst, and the rollup outgrew the
//! usage table (4.2× at 5,000 users). Now the cells of all users together keep every grain,
//! and a user's cells are UTC days (both tables) and UTC calendar months and years (totals
//! table): the months and years let `include=by_user` over months or all time read one or two
//! cells per user; a user's finer statistics come from the rows through the
//! `(user_id, created_at)` index. See `docs/architecture.md` ("Cells per user").
//!
//! This migration drops the per-user cells of the old grains and adds the month and year cells,
//! summed from the day cells, under the folders' lock (PostgreSQL), indexes the totals table by
//! `(grain, slot, user_key)` for `by_user`, then analyzes both tables.
//! Pending delta rows get their month and year cells when folded. The SQL is written out here:
//! it is what this migration does, whatever later versions change.
//!
//! `down` drops the month and year cells and the index; the per-user cells of the finer
//! grains are not recreated (they are not derivable from days): run the older version's
//! `rollup rebuild` after downgrading.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The folders' advisory lock (`crate::rollup::FOLD_LOCK`, written out: a test checks they
/// agree).
pub const FOLDERS_LOCK: i64 = 7812739800484506732;

const SUMS: &str = "calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, \
    reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, successful_calls";

const SUMMED: &str = "SUM(calls), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), \
    SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost_micros), SUM(priced_calls), \
    SUM(latency_us), SUM(latency_calls), SUM(successful_calls)";

/// Month (2976) and year (35040) cells per user, from the user's day cells (96).
fn calendar_cells(backend: DbBackend) -> Vec<String> {
    [(2976, "month"), (35040, "year")]
        .into_iter()
        .map(|(code, unit)| {
            let start = match backend {
                DbBackend::Postgres => format!(
                    "CAST(extract(epoch FROM date_trunc('{unit}', to_timestamp(slot * 900) AT TIME ZONE 'UTC')) / 900 AS BIGINT)"
                ),
                _ => format!(
                    "(CAST(strftime('%s', slot * 900, 'unixepoch', 'start of {unit}') AS INTEGER) / 900)"
                ),
            };
            format!(
                "INSERT INTO llm_tracker_usage_rollup_total (grain, user_key, slot, {SUMS}) \
                 SELECT {code}, user_key, {start}, {SUMMED} FROM llm_tracker_usage_rollup_total \
                 WHERE grain = 96 AND user_key <> 2147483648 GROUP BY user_key, {start}"
            )
        })
        .collect()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let mut statements = Vec::new();
        if backend == DbBackend::Postgres {
            // The folders' lock (migration::rollup::FOLD_LOCK): no fold between the sums and
            // the commit.
            statements.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
        }
        statements.push(
            "DELETE FROM llm_tracker_usage_rollup WHERE user_key <> 2147483648 AND grain <> 96"
                .to_owned(),
        );
        statements.push(
            "DELETE FROM llm_tracker_usage_rollup_total WHERE user_key <> 2147483648 AND grain <> 96"
                .to_owned(),
        );
        statements.extend(calendar_cells(backend));
        // `include=by_user` without a user filter reads every user's cells of a slot range:
        // an index range of (grain, slot) instead of one probe per user.
        statements.push(
            "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_total_slot_idx \
             ON llm_tracker_usage_rollup_total (grain, slot, user_key)"
                .to_owned(),
        );
        if backend == DbBackend::Postgres {
            statements.push(
                "ANALYZE llm_tracker_usage_rollup, llm_tracker_usage_rollup_total".to_owned(),
            );
        }
        for sql in statements {
            conn.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DELETE FROM llm_tracker_usage_rollup_total WHERE grain IN (2976, 35040)",
            )
            .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
