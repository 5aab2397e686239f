//! Streamed calls and their time to first token (issue 20), with the successor app's names and
//! types: `is_streaming` boolean (default false) and `first_chunk_at` timestamptz null on
//! `llm_tracker_usage`; and in the rollup (both tables and the delta) the sum of the time to
//! first token in microseconds (`ttft_us`, `first_chunk_at − started_at`, negative as 0) and
//! how many calls it covers (`ttft_calls`), kept by the triggers like the latency, so that
//! `avg_ttft_sec` per model is read from the cells as fast as the other statistics.
//!
//! The usage columns are added only where missing (a database the successor app created has
//! them). Rows that already have a `first_chunk_at` then have their time to first token
//! appended to the delta, and the fold counts it into their cells; every other row adds
//! nothing (no first chunk). Adding a column with a constant default rewrites no table on
//! PostgreSQL 11+ or SQLite, so this is quick at any size.
//!
//! `up` runs frozen SQL (`migration/sql/`): the rollup columns, the triggers rebuilt to fill
//! them, the backfill; `down` puts 000015's triggers back (000006's on SQLite) and drops the
//! rollup's two columns. It leaves `is_streaming` and `first_chunk_at` on the usage table: the
//! successor app may own them (and their data), and with their defaults they stand in no
//! writer's way; `up` again finds them there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20251215_000006_rollup_delta as m6;
use crate::m20261129_000015_rollup_summed_delta as m15;
use crate::rollup;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261129_000016_usage_streaming_ttft.postgres.sql");
pub const SQLITE_SQL: &str =
    include_str!("../sql/m20261129_000016_usage_streaming_ttft.sqlite.sql");

/// The rollup tables that gain the two sums.
const ROLLUP_TABLES: [&str; 3] = [rollup::TABLE, rollup::TOTALS_TABLE, rollup::DELTA_TABLE];

/// The statements of the frozen file for `backend`.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let (boolean, timestamp) = match backend {
            DbBackend::Postgres => (
                "boolean NOT NULL DEFAULT false",
                "timestamp with time zone NULL",
            ),
            _ => ("bool NOT NULL DEFAULT 0", "datetime NULL"),
        };
        for (column, kind) in [("is_streaming", boolean), ("first_chunk_at", timestamp)] {
            if !manager.has_column("llm_tracker_usage", column).await? {
                conn.execute_unprepared(&format!(
                    "ALTER TABLE llm_tracker_usage ADD COLUMN {column} {kind}"
                ))
                .await?;
            }
        }
        for sql in frozen(backend) {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        // The previous triggers first: SQLite drops no column a trigger names.
        let previous = match backend {
            DbBackend::Postgres => m15::frozen(),
            _ => m6::frozen(backend)
                .into_iter()
                .filter(|sql| !sql.starts_with("CREATE TABLE"))
                .collect(),
        };
        for sql in previous {
            conn.execute_unprepared(sql).await?;
        }
        for table in ROLLUP_TABLES {
            for column in ["ttft_us", "ttft_calls"] {
                if manager.has_column(table, column).await? {
                    conn.execute_unprepared(&format!("ALTER TABLE {table} DROP COLUMN {column}"))
                        .await?;
                }
            }
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
