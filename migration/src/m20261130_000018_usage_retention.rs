//! Retention that keeps the statistics (issue 20): the retention state table
//! ([`rollup::RETENTION_TABLE`]: one row, the horizon and a `deleting` mark) and the rollup's
//! delete trigger rebuilt to leave the cells alone for rows that retention deletes.
//!
//! A retention batch marks its own transaction (`deleting = true`, set and cleared inside it, so
//! no other transaction ever sees it set) and deletes old rows; the trigger sees the mark and
//! appends nothing, so the cells keep counting the rows. Every other delete — the Django admin,
//! SQL by hand — takes its rows out of the statistics, as before. The horizon says from where the
//! usage table is whole: the listing's total and `rollup verify`/`rebuild` use it (see
//! `src/retention.rs`).
//!
//! `up` runs the table's SQL and the frozen trigger SQL (`migration/sql/`); `down` puts 000017's
//! triggers back (000016's on SQLite) and drops the table. Cells that kept deleted rows stay: a
//! `rollup verify` after `down` reports them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261129_000016_usage_streaming_ttft as m16;
use crate::m20261129_000017_rollup_one_row_statements as m17;
use crate::rollup;

pub const POSTGRES_SQL: &str = include_str!("../sql/m20261130_000018_usage_retention.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20261130_000018_usage_retention.sqlite.sql");

const POSTGRES_TABLE: &str = "CREATE TABLE IF NOT EXISTS llm_tracker_usage_retention (\
    id integer PRIMARY KEY, \
    horizon_slot bigint NULL, \
    deleting boolean NOT NULL DEFAULT false, \
    rows_deleted bigint NOT NULL DEFAULT 0)";

const SQLITE_TABLE: &str = "CREATE TABLE IF NOT EXISTS llm_tracker_usage_retention (\
    id integer PRIMARY KEY NOT NULL, \
    horizon_slot integer NULL, \
    deleting bool NOT NULL DEFAULT 0, \
    rows_deleted integer NOT NULL DEFAULT 0)";

const POSTGRES_ROW: &str =
    "INSERT INTO llm_tracker_usage_retention (id) VALUES (1) ON CONFLICT (id) DO NOTHING";
const SQLITE_ROW: &str = "INSERT OR IGNORE INTO llm_tracker_usage_retention (id) VALUES (1)";

/// The statements of the frozen file for `backend`: the triggers.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let (table, row) = match backend {
            DbBackend::Postgres => (POSTGRES_TABLE, POSTGRES_ROW),
            _ => (SQLITE_TABLE, SQLITE_ROW),
        };
        crate::util::create_table_if_missing(manager, rollup::RETENTION_TABLE, table).await?;
        crate::util::run_all(manager, &[row]).await?;
        crate::util::run_all(manager, &frozen(backend)).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let previous = match backend {
            DbBackend::Postgres => m17::frozen(),
            _ => crate::util::trigger_statements(m16::frozen(backend)),
        };
        for sql in previous {
            conn.execute_unprepared(sql).await?;
        }
        conn.execute_unprepared("DROP TABLE IF EXISTS llm_tracker_usage_retention")
            .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
