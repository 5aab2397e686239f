//! UTC calendar months for all users together, in both rollup tables (issue 16).
//!
//! All users' cells stopped at UTC days, so a sum over a year — `token-stats` over all time,
//! its `by_model`, a monthly series — read 365 day cells per model and outcome (~15,000 rows at
//! 20 models). With month cells it reads a dozen per model and outcome and the days of the
//! partial months at the ends. The fold keeps them from now on (`migration::rollup::
//! ALL_USERS_CALENDAR`); this migration sums them from the day cells there are, under the
//! folders' lock (PostgreSQL), then analyzes both tables. The SQL is written out here: it is what
//! this migration does, whatever later versions change.
//!
//! `down` deletes them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261126_000011_rollup_per_user_days::FOLDERS_LOCK;

#[derive(DeriveMigrationName)]
pub struct Migration;

const SUMS: &str = "calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, \
    reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, ttft_us, ttft_calls";

const SUMMED: &str = "SUM(calls), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), \
    SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost_micros), SUM(priced_calls), \
    SUM(latency_us), SUM(latency_calls), SUM(ttft_us), SUM(ttft_calls)";

/// The statements of `up`, in order.
pub fn up_sql(backend: DbBackend) -> Vec<String> {
    let start = match backend {
        DbBackend::Postgres => {
            "CAST(extract(epoch FROM date_trunc('month', to_timestamp(slot * 900) AT TIME ZONE 'UTC')) / 900 AS BIGINT)"
        }
        _ => "(CAST(strftime('%s', slot * 900, 'unixepoch', 'start of month') AS INTEGER) / 900)",
    };
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!("SELECT pg_advisory_xact_lock({FOLDERS_LOCK})"));
    }
    out.push(format!(
        "INSERT INTO llm_tracker_usage_rollup (grain, user_key, slot, model, success, {SUMS}) \
         SELECT 2976, user_key, {start}, model, success, {SUMMED} FROM llm_tracker_usage_rollup \
         WHERE grain = 96 AND user_key = 2147483648 GROUP BY user_key, {start}, model, success"
    ));
    out.push(format!(
        "INSERT INTO llm_tracker_usage_rollup_total (grain, user_key, slot, {SUMS}, successful_calls) \
         SELECT 2976, user_key, {start}, {SUMMED}, SUM(successful_calls) FROM llm_tracker_usage_rollup_total \
         WHERE grain = 96 AND user_key = 2147483648 GROUP BY user_key, {start}"
    ));
    if backend == DbBackend::Postgres {
        out.push("ANALYZE llm_tracker_usage_rollup, llm_tracker_usage_rollup_total".to_owned());
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        for sql in up_sql(manager.get_database_backend()) {
            conn.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        for table in ["llm_tracker_usage_rollup", "llm_tracker_usage_rollup_total"] {
            conn.execute_unprepared(&format!(
                "DELETE FROM {table} WHERE grain = 2976 AND user_key = 2147483648"
            ))
            .await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
