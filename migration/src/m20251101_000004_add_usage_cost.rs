//! `cost` and `cost_currency`, the successor app's names (SPEC §5). On PostgreSQL exactly its
//! types: `numeric(12,6)` null and `varchar(10)` not null default `'USD'`. On SQLite, `cost`
//! holds integer micro-dollars (`0.001280` USD is stored as `1280`): SQLite has no exact
//! decimal type and would sum `numeric` values as floating point; integers sum exactly.
//! Rows written before (or by the Django app) keep `cost` NULL: unpriced, never guessed.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::util::run_all;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let pg = manager.get_database_backend() == DbBackend::Postgres;
        if !manager.has_column("llm_tracker_usage", "cost").await? {
            let sql = if pg {
                "ALTER TABLE llm_tracker_usage ADD COLUMN IF NOT EXISTS cost numeric(12, 6) NULL"
            } else {
                "ALTER TABLE llm_tracker_usage ADD COLUMN cost integer NULL"
            };
            run_all(manager, &[sql]).await?;
        }
        if !manager
            .has_column("llm_tracker_usage", "cost_currency")
            .await?
        {
            let sql = if pg {
                "ALTER TABLE llm_tracker_usage ADD COLUMN IF NOT EXISTS cost_currency varchar(10) NOT NULL DEFAULT 'USD'"
            } else {
                "ALTER TABLE llm_tracker_usage ADD COLUMN cost_currency varchar(10) NOT NULL DEFAULT 'USD'"
            };
            run_all(manager, &[sql]).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in ["cost_currency", "cost"] {
            if manager.has_column("llm_tracker_usage", column).await? {
                let sql = format!("ALTER TABLE llm_tracker_usage DROP COLUMN {column}");
                run_all(manager, &[sql.as_str()]).await?;
            }
        }
        Ok(())
    }
}
