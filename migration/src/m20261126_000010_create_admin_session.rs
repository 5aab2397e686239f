//! Server-side records of the admin pages' sessions, so that a session can end before its
//! cookie expires: logging out deletes its record, "sign out everywhere" all of a user's.
//! The cookie stays signed (it carries the user, expiry and CSRF token); this table only says
//! which sessions are still open. `session_key` is an HMAC of the session's token under the
//! server's key, never the token itself.
//!
//! The SQL is written out here: it is what this migration does, whatever later versions change.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::util::{create_table_if_missing, run_all, table_is_ours};

#[derive(DeriveMigrationName)]
pub struct Migration;

pub const TABLE: &str = "llm_tracker_admin_session";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let create = match manager.get_database_backend() {
            DbBackend::Postgres => {
                "CREATE TABLE IF NOT EXISTS llm_tracker_admin_session (\
                 session_key varchar(64) PRIMARY KEY, \
                 user_id integer NOT NULL, \
                 expires_at bigint NOT NULL)"
            }
            _ => {
                "CREATE TABLE IF NOT EXISTS llm_tracker_admin_session (\
                 session_key TEXT PRIMARY KEY NOT NULL, \
                 user_id INTEGER NOT NULL, \
                 expires_at INTEGER NOT NULL)"
            }
        };
        create_table_if_missing(manager, TABLE, create).await?;
        run_all(
            manager,
            &["CREATE INDEX IF NOT EXISTS llm_tracker_admin_session_user \
               ON llm_tracker_admin_session (user_id)"],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if table_is_ours(manager, TABLE).await? {
            run_all(manager, &["DROP TABLE llm_tracker_admin_session"]).await?;
        }
        Ok(())
    }
}
