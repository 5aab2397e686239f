//! The rollup's triggers stop upserting cells and append to a delta table instead (see
//! [`crate::rollup`]): a write no longer waits for locks on cells every other writer updates
//! too, nor pays for twelve upserts.
//!
//! `up` creates [`rollup::DELTA_TABLE`] and replaces the triggers, in the migration's
//! transaction (on PostgreSQL `DROP TRIGGER` / `CREATE TRIGGER` lock the usage table, so no
//! row is written between the old triggers and the new). `down` folds what is pending into the
//! cells and puts the direct triggers back.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use crate::rollup::{self, Mechanism};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let mut statements = vec![rollup::create_delta_table_sql(backend)];
        statements.extend(rollup::create_triggers_sql(backend, Mechanism::Delta));
        for sql in statements {
            conn.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let conn = manager.get_connection();
        let mut statements = rollup::create_triggers_sql(backend, Mechanism::Direct);
        // The usage table is locked by now (PostgreSQL), so nothing new reaches the delta.
        statements.extend(rollup::fold_sql(backend));
        statements.push(format!("DROP TABLE IF EXISTS {}", rollup::DELTA_TABLE));
        for sql in statements {
            conn.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
