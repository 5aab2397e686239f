//! The rollup's PostgreSQL insert and delete triggers sum a statement's contributions per
//! delta key (slot, user, model, outcome) before appending them, instead of appending one delta
//! row per written row.
//!
//! A batch of the ingest API (up to 1,000 rows in one statement pair) or a group commit of the
//! tracker spans a few 15-minute slots, users and models: its 1,000 rows become tens of delta
//! rows. Measured in `psql` on the 1M-row benchmark database (1,000 rows of one user in one
//! `INSERT … SELECT`): the insert took 48–56 ms with 000006's trigger and 32–40 ms with this one,
//! against 30–35 ms with no trigger at all; the fold then has fewer rows to move too. The sums
//! are the same (each delta row is a sum already, and the fold and the reads add them up), so
//! nothing else changes: the update trigger already summed (and skips keys whose sums are all
//! zero), and the delete trigger now does what the insert does with the sign reversed.
//!
//! SQLite is unchanged: its triggers are row-level (it has no statement-level ones), one delta
//! row per row either way.
//!
//! `up` replaces the triggers and their functions in the migration's transaction (the usage
//! table is locked meanwhile, so no row is written between the old triggers and the new);
//! `down` puts 000006's back. Both run frozen SQL: this migration's file, and 000006's.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20251215_000006_rollup_delta as m6;

/// What `up` installs on PostgreSQL, frozen (`migration/sql/`).
pub const POSTGRES_SQL: &str =
    include_str!("../sql/m20261129_000015_rollup_summed_delta.postgres.sql");

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

    /// 000006's triggers again (its frozen file without the delta table it also created).
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            let conn = manager.get_connection();
            for sql in m6::frozen(DbBackend::Postgres)
                .into_iter()
                .filter(|sql| !sql.starts_with("CREATE TABLE"))
            {
                conn.execute_unprepared(sql).await?;
            }
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
