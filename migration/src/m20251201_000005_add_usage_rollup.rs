//! The usage rollup (see [`crate::rollup`]): its two tables, the triggers that keep it exact on
//! every insert, update, delete (and on PostgreSQL truncate) of `llm_tracker_usage` whoever
//! makes them, and the backfill from the rows already there.
//!
//! Triggers come before the backfill, in the migration's transaction: on PostgreSQL
//! `CREATE TRIGGER` takes a lock that makes concurrent writers (the Django app) wait until the
//! migration commits, so every row is counted exactly once, by the backfill or by a trigger.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use crate::rollup;
use crate::util::{self, run_all};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let existed = manager.has_table(rollup::TABLE).await?;
        let conn = manager.get_connection();
        // Frozen (migration/sql/): the tables and the triggers that upserted the cells directly,
        // then, on a database that had no rollup, the backfill from every row.
        for sql in util::for_backend(
            backend,
            include_str!("../sql/m20251201_000005_add_usage_rollup.postgres.sql"),
            include_str!("../sql/m20251201_000005_add_usage_rollup.sqlite.sql"),
        ) {
            conn.execute_unprepared(sql).await?;
        }
        if !existed {
            for sql in util::for_backend(
                backend,
                include_str!("../sql/m20251201_000005_add_usage_rollup.backfill.postgres.sql"),
                include_str!("../sql/m20251201_000005_add_usage_rollup.backfill.sqlite.sql"),
            ) {
                conn.execute_unprepared(sql).await?;
            }
        }
        Ok(())
    }

    /// Frozen: the triggers (and on PostgreSQL their functions) and both tables dropped.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let statements = util::for_backend(
            manager.get_database_backend(),
            include_str!("../sql/m20251201_000005_add_usage_rollup.down.postgres.sql"),
            include_str!("../sql/m20251201_000005_add_usage_rollup.down.sqlite.sql"),
        );
        run_all(manager, &statements).await
    }

    /// On SQLite too: the triggers and the backfill land together or not at all.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
