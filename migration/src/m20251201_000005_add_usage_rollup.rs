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
use crate::util::run_all;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let existed = manager.has_table(rollup::TABLE).await?;
        let conn = manager.get_connection();
        for level in rollup::Level::ALL {
            conn.execute_unprepared(&rollup::create_table_sql(backend, level))
                .await?;
        }
        for sql in rollup::create_triggers_sql(backend, rollup::Mechanism::Direct) {
            conn.execute_unprepared(&sql).await?;
        }
        if !existed {
            for sql in rollup::rebuild_sql(backend, rollup::Mechanism::Direct) {
                conn.execute_unprepared(&sql).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let mut statements = rollup::drop_triggers_sql(backend);
        for level in rollup::Level::ALL {
            statements.push(format!("DROP TABLE IF EXISTS {}", level.table()));
        }
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        run_all(manager, &refs).await
    }

    /// On SQLite too: the triggers and the backfill land together or not at all.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
