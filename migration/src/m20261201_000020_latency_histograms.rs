//! Latency histograms (issue 21): the table [`rollup::LATENCY_TABLE`] (per UTC day and quarter
//! day of all users' calls, model, outcome and latency bucket, the number of calls), the delta
//! table's `latency_bucket` column, the triggers rebuilt to fill it, and a backfill of the
//! histograms from every row there is. On SQLite also [`rollup::LATENCY_BOUNDS_TABLE`], the
//! buckets' lower bounds the triggers look a latency up in.
//!
//! The contributions pending when it runs have no bucket (NULL): the fold leaves them out of the
//! histograms, whose backfill counted their rows already. On PostgreSQL the usage table is
//! locked against writers for the migration (the backfill and the new triggers see the same
//! rows); writers wait, the tracker's spool takes over if they wait too long.
//!
//! `up` runs frozen SQL (`migration/sql/`); `down` puts 000018's triggers back and drops what
//! `up` added.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261130_000018_usage_retention as m18;
use crate::rollup;

pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261201_000020_latency_histograms.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20261201_000020_latency_histograms.sqlite.sql");

/// The statements of the frozen file for `backend`.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

/// The statements today's code writes for what this migration does.
pub fn generated(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push("LOCK TABLE llm_tracker_usage IN SHARE MODE".to_owned());
        out.push(format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS latency_bucket integer NULL",
            rollup::DELTA_TABLE
        ));
    } else {
        out.push(format!(
            "ALTER TABLE {} ADD COLUMN latency_bucket integer NULL",
            rollup::DELTA_TABLE
        ));
    }
    out.extend(rollup::create_latency_tables_sql(backend));
    if backend == DbBackend::Postgres {
        out.push(format!(
            "COMMENT ON TABLE {} IS '{}'",
            rollup::LATENCY_TABLE,
            crate::util::OWNED_MARKER
        ));
    }
    out.push(rollup::latency_upsert_sql(
        backend,
        &[rollup::Source::Table {
            name: "llm_tracker_usage",
            sign: 1,
            where_sql: None,
        }],
    ));
    out.extend(rollup::create_triggers_sql(backend));
    out.push(format!("ANALYZE {}", rollup::LATENCY_TABLE));
    out
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(manager, &frozen(manager.get_database_backend())).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        for sql in crate::util::trigger_statements(m18::frozen(backend)) {
            conn.execute_unprepared(sql).await?;
        }
        conn.execute_unprepared(&format!("DROP TABLE IF EXISTS {}", rollup::LATENCY_TABLE))
            .await?;
        conn.execute_unprepared(&format!(
            "DROP TABLE IF EXISTS {}",
            rollup::LATENCY_BOUNDS_TABLE
        ))
        .await?;
        conn.execute_unprepared(&format!(
            "ALTER TABLE {} DROP COLUMN latency_bucket",
            rollup::DELTA_TABLE
        ))
        .await?;
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
