//! The rollup's triggers stop upserting cells and append to a delta table instead (see
//! [`crate::rollup`]): a write no longer waits for locks on cells every other writer updates
//! too, nor pays for twelve upserts.
//!
//! `up` creates [`crate::rollup::DELTA_TABLE`] and replaces the triggers, in the migration's
//! transaction (on PostgreSQL `DROP TRIGGER` / `CREATE TRIGGER` lock the usage table, so no
//! row is written between the old triggers and the new). `down` folds what is pending into the
//! cells and puts the direct triggers back. Both directions run frozen SQL (`migration/sql/`).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use sea_orm_migration::sea_orm::DbBackend;

/// What `up` installs, frozen: the delta table and the triggers as this migration first wrote
/// them (`migration/sql/`). An old migration never changes meaning when `crate::rollup`
/// changes. (`rollup::tests::the_installed_triggers_are_what_the_code_generates` compares the
/// newest such migration's files with the generator.)
pub const POSTGRES_SQL: &str = include_str!("../sql/m20251215_000006_rollup_delta.postgres.sql");
pub const SQLITE_SQL: &str = include_str!("../sql/m20251215_000006_rollup_delta.sqlite.sql");

pub use crate::util::SEPARATOR;

/// The statements of the frozen file for `backend`.
pub fn frozen(backend: DbBackend) -> Vec<&'static str> {
    crate::util::for_backend(backend, POSTGRES_SQL, SQLITE_SQL)
}

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        for sql in frozen(manager.get_database_backend()) {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    /// Frozen too: the direct triggers of 000005 put back, then (the usage table locked by
    /// the trigger changes on PostgreSQL, so nothing new reaches the delta) the fold of what
    /// is pending, then the delta table dropped.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        for sql in crate::util::for_backend(
            manager.get_database_backend(),
            include_str!("../sql/m20251215_000006_rollup_delta.down.postgres.sql"),
            include_str!("../sql/m20251215_000006_rollup_delta.down.sqlite.sql"),
        ) {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
