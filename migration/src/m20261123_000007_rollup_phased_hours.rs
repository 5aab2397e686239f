//! Hour cells that start at :15 and :30 past a UTC hour (see [`crate::rollup::GRAINS`]), summed
//! from the slot cells already there: an hourly series in a zone with a :30 or :45 offset then
//! reads one cell per hour instead of four slots.
//!
//! On PostgreSQL the migration holds the folders' lock, so no fold runs between the sums and
//! the commit; rows still pending in the delta table get their phased cells when folded.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

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

    /// The hour cells starting at :15 and :30 (grain codes 5 and 6) deleted, written out.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::util::run_all(
            manager,
            &[
                "DELETE FROM llm_tracker_usage_rollup WHERE grain IN (5, 6)",
                "DELETE FROM llm_tracker_usage_rollup_total WHERE grain IN (5, 6)",
            ],
        )
        .await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
