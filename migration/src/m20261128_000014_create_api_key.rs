//! API keys (`llm_tracker_api_key`): how code in any language authenticates to the gateway and
//! the ingest API. A key belongs to a user (`auth_user`; deleting the user deletes its keys),
//! has a name, a short display prefix that also finds it (unique), the SHA-256 of the whole
//! key (never the key), scopes (`gateway`, `ingest`, comma-separated), and its times: created,
//! last used, expiry, revocation (a revoked key stays listed).
//!
//! The SQL is written out here: it is what this migration does, whatever later versions change.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::util::{create_table_if_missing, run_all, table_is_ours};

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const TABLE: &str = "llm_tracker_api_key";

const POSTGRES: &str = "CREATE TABLE IF NOT EXISTS llm_tracker_api_key (\
    id serial PRIMARY KEY, \
    user_id integer NOT NULL REFERENCES auth_user (id) ON DELETE CASCADE, \
    name varchar(100) NOT NULL, \
    prefix varchar(16) NOT NULL UNIQUE, \
    key_hash varchar(64) NOT NULL, \
    scopes varchar(64) NOT NULL, \
    created_at timestamp with time zone NOT NULL, \
    last_used_at timestamp with time zone NULL, \
    expires_at timestamp with time zone NULL, \
    revoked_at timestamp with time zone NULL)";

const SQLITE: &str = "CREATE TABLE IF NOT EXISTS llm_tracker_api_key (\
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, \
    user_id INTEGER NOT NULL REFERENCES auth_user (id) ON DELETE CASCADE, \
    name varchar(100) NOT NULL, \
    prefix varchar(16) NOT NULL UNIQUE, \
    key_hash varchar(64) NOT NULL, \
    scopes varchar(64) NOT NULL, \
    created_at TEXT NOT NULL, \
    last_used_at TEXT NULL, \
    expires_at TEXT NULL, \
    revoked_at TEXT NULL)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let create = match manager.get_database_backend() {
            DbBackend::Postgres => POSTGRES,
            _ => SQLITE,
        };
        create_table_if_missing(manager, TABLE, create).await?;
        run_all(
            manager,
            &["CREATE INDEX IF NOT EXISTS llm_tracker_api_key_user ON llm_tracker_api_key (user_id)"],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if table_is_ours(manager, TABLE).await? {
            run_all(manager, &["DROP TABLE llm_tracker_api_key"]).await?;
        }
        Ok(())
    }
}
