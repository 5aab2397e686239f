//! `llm_tracker_usage` with Django's column names and types, plus the indexes the read side
//! needs. The `created_at` index keeps Django's own name, so a Django database keeps one.
//! On SQLite the foreign key is checked immediately: a deferred check is not reliably reported
//! through sqlx there (an orphan row was accepted in our tests).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::util::{create_table_if_missing, run_all, table_is_ours};

#[derive(DeriveMigrationName)]
pub struct Migration;

const POSTGRES: &str = r#"CREATE TABLE IF NOT EXISTS llm_tracker_usage (
    id uuid NOT NULL PRIMARY KEY,
    model varchar(255) NOT NULL,
    prompt_tokens integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    total_tokens integer NOT NULL DEFAULT 0,
    cached_tokens integer NOT NULL DEFAULT 0,
    reasoning_tokens integer NOT NULL DEFAULT 0,
    success boolean NOT NULL DEFAULT true,
    error text NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamp with time zone NOT NULL,
    user_id integer NULL REFERENCES auth_user (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED
)"#;

const SQLITE: &str = r#"CREATE TABLE IF NOT EXISTS "llm_tracker_usage" (
    "id" blob NOT NULL PRIMARY KEY,
    "model" varchar(255) NOT NULL,
    "prompt_tokens" integer NOT NULL DEFAULT 0,
    "completion_tokens" integer NOT NULL DEFAULT 0,
    "total_tokens" integer NOT NULL DEFAULT 0,
    "cached_tokens" integer NOT NULL DEFAULT 0,
    "reasoning_tokens" integer NOT NULL DEFAULT 0,
    "success" bool NOT NULL DEFAULT 1,
    "error" text NULL,
    "metadata" text NOT NULL DEFAULT '{}' CHECK (json_valid("metadata")),
    "created_at" datetime NOT NULL,
    "user_id" integer NULL REFERENCES "auth_user" ("id") ON DELETE SET NULL
)"#;

const INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_created_at_f9de3faa ON llm_tracker_usage (created_at)",
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_user_created_idx ON llm_tracker_usage (user_id, created_at)",
    "CREATE INDEX IF NOT EXISTS llm_tracker_usage_model_created_idx ON llm_tracker_usage (model, created_at)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => POSTGRES,
            _ => SQLITE,
        };
        create_table_if_missing(manager, "llm_tracker_usage", sql).await?;
        run_all(manager, INDEXES).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Our composite indexes go whoever owns the table; the table only when it is ours.
        run_all(
            manager,
            &[
                "DROP INDEX IF EXISTS llm_tracker_usage_user_created_idx",
                "DROP INDEX IF EXISTS llm_tracker_usage_model_created_idx",
            ],
        )
        .await?;
        if table_is_ours(manager, "llm_tracker_usage").await? {
            run_all(manager, &["DROP TABLE llm_tracker_usage"]).await?;
        }
        Ok(())
    }
}
