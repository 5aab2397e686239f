//! `started_at`: when the request started (the successor app's name and type), nullable so
//! rows written by the Django app stay valid. Latency = `created_at − started_at`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::util::run_all;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager
            .has_column("llm_tracker_usage", "started_at")
            .await?
        {
            return Ok(());
        }
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => {
                "ALTER TABLE llm_tracker_usage ADD COLUMN IF NOT EXISTS started_at timestamp with time zone NULL"
            }
            _ => "ALTER TABLE llm_tracker_usage ADD COLUMN started_at datetime NULL",
        };
        run_all(manager, &[sql]).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager
            .has_column("llm_tracker_usage", "started_at")
            .await?
        {
            run_all(
                manager,
                &["ALTER TABLE llm_tracker_usage DROP COLUMN started_at"],
            )
            .await?;
        }
        Ok(())
    }
}
