//! The rollup's PostgreSQL insert and delete triggers sum a statement's rows per delta key only
//! when it wrote more than one row.
//!
//! Migration 000015 made every insert and delete statement append its contributions summed per
//! key (a 1,000-row ingest batch appends a few delta rows, not 1,000). For a one-row statement —
//! the tracker's commit at low concurrency, one call at a time — the grouping is pure cost:
//! `pgbench`, one client, a one-row `INSERT` into the usage table of the benchmark database,
//! three alternating rounds (tps): 000006's plain trigger 5,963 / 5,229 / 5,159, 000015's
//! grouped one 4,180 / 3,929 / 3,868; this one 5,286 / 4,692 / 5,385. Tracked calls at
//! concurrency 1 (committed) had lost 35 % to the rollup against 18 % measured before 000015
//! (`docs/benchmarks.md`).
//!
//! SQLite is unchanged (row triggers). `up` replaces the triggers and their functions in the
//! migration's transaction; `down` puts 000016's back. Both run frozen SQL.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261129_000016_usage_streaming_ttft as m16;

/// What `up` installs on PostgreSQL, frozen (`migration/sql/`).
pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261129_000017_rollup_one_row_statements.postgres.sql");

/// The statements of the frozen file.
pub fn frozen() -> Vec<&'static str> {
    crate::util::statements(POSTGRES_SQL)
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            crate::util::run_all(manager, &frozen()).await?;
        }
        Ok(())
    }

    /// 000016's triggers again (the trigger statements of its frozen file).
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            let conn = manager.get_connection();
            for sql in crate::util::trigger_statements(m16::frozen(DbBackend::Postgres)) {
                conn.execute_unprepared(sql).await?;
            }
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
