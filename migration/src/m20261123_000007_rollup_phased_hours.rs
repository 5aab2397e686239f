//! Hour cells that start at :15 and :30 past a UTC hour (see [`crate::rollup::GRAINS`]), summed
//! from the slot cells already there: an hourly series in a zone with a :30 or :45 offset then
//! reads one cell per hour instead of four slots.
//!
//! On PostgreSQL the migration holds the folders' lock, so no fold runs between the sums and
//! the commit; rows still pending in the delta table get their phased cells when folded.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use crate::rollup;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        // Frozen (migration/sql/): the sums as this migration first wrote them.
        for sql in crate::util::for_backend(
            manager.get_database_backend(),
            include_str!("../sql/m20261123_000007_rollup_phased_hours.postgres.sql"),
            include_str!("../sql/m20261123_000007_rollup_phased_hours.sqlite.sql"),
        ) {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        let codes: Vec<String> = rollup::PHASED_HOURS
            .iter()
            .map(|g| g.code.to_string())
            .collect();
        for level in rollup::Level::ALL {
            conn.execute_unprepared(&format!(
                "DELETE FROM {} WHERE grain IN ({})",
                level.table(),
                codes.join(", ")
            ))
            .await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
