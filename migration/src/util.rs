//! Helpers shared by the migrations: run plain SQL per backend, and remember which tables we
//! created so that `down` never drops a table the Django app owns.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

/// The marker written as a PostgreSQL table comment on tables this crate created.
pub const OWNED_MARKER: &str = "created by llm-tracker";

/// The line between two statements in a frozen SQL file of `migration/sql/` (trigger bodies
/// hold `;`, so statements cannot be split on it).
pub const SEPARATOR: &str = "\n-- statement --\n";

/// The statements of a frozen SQL file: what a migration installs, written out once so that
/// it never changes meaning when the code that once generated it does.
pub fn statements(text: &'static str) -> Vec<&'static str> {
    text.split(SEPARATOR)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The frozen file of a backend: `postgres` or `sqlite`.
pub fn for_backend(
    backend: DbBackend,
    postgres: &'static str,
    sqlite: &'static str,
) -> Vec<&'static str> {
    statements(match backend {
        DbBackend::Postgres => postgres,
        _ => sqlite,
    })
}

/// The statements of a frozen file that drop or create the rollup's triggers and their
/// functions (not its tables, columns or backfill): what a later migration's `down` runs to put
/// that file's triggers back.
pub fn trigger_statements(statements: Vec<&'static str>) -> Vec<&'static str> {
    statements
        .into_iter()
        .filter(|sql| {
            [
                "DROP TRIGGER",
                "DROP FUNCTION",
                "CREATE FUNCTION",
                "CREATE TRIGGER",
            ]
            .iter()
            .any(|p| sql.starts_with(p))
        })
        .collect()
}

/// Runs each statement in order.
pub async fn run_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    let conn = manager.get_connection();
    for sql in statements {
        conn.execute_unprepared(sql).await?;
    }
    Ok(())
}

/// Creates a table when it is missing and marks it as ours (PostgreSQL: a table comment).
/// An existing table, such as one the Django app made, is left exactly as it is.
pub async fn create_table_if_missing(
    manager: &SchemaManager<'_>,
    table: &str,
    create_sql: &str,
) -> Result<(), DbErr> {
    if manager.has_table(table).await? {
        return Ok(());
    }
    run_all(manager, &[create_sql]).await?;
    if manager.get_database_backend() == DbBackend::Postgres {
        let sql = format!("COMMENT ON TABLE {table} IS '{OWNED_MARKER}'");
        run_all(manager, &[&sql]).await?;
    }
    Ok(())
}

/// True when `down` may drop the table: on PostgreSQL only tables carrying our marker (so a
/// rollback never destroys the Django app's own tables); on SQLite, whose Django compatibility
/// is not promised, every table.
pub async fn table_is_ours(manager: &SchemaManager<'_>, table: &str) -> Result<bool, DbErr> {
    if !manager.has_table(table).await? {
        return Ok(false);
    }
    let conn = manager.get_connection();
    match manager.get_database_backend() {
        DbBackend::Postgres => {
            let row = conn
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT obj_description(to_regclass($1), 'pg_class') AS c",
                    [table.into()],
                ))
                .await?;
            let comment: Option<String> = match row {
                Some(row) => row.try_get("", "c")?,
                None => None,
            };
            Ok(comment.as_deref() == Some(OWNED_MARKER))
        }
        _ => Ok(true),
    }
}

/// Drops the index `name` where it exists: the `down` of a migration that made it with
/// [`create_index`].
pub async fn drop_index(manager: &SchemaManager<'_>, name: &str) -> Result<(), DbErr> {
    manager
        .get_connection()
        .execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
        .await?;
    Ok(())
}

/// Builds an index without stopping writers: on PostgreSQL `postgres` (a `CREATE INDEX
/// CONCURRENTLY IF NOT EXISTS` of the index `name`), after dropping an invalid index of that
/// name — what a build cut off midway leaves (the migration is then not recorded and runs
/// again), which `IF NOT EXISTS` would keep and the planner would not use; on SQLite `sqlite`
/// (`None`: no index there). The migration runs outside a transaction.
pub async fn create_index(
    manager: &SchemaManager<'_>,
    name: &str,
    postgres: &str,
    sqlite: Option<&str>,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    match manager.get_database_backend() {
        DbBackend::Postgres => {
            db.execute_unprepared(&format!(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c \
                 ON c.oid = i.indexrelid WHERE c.relname = '{name}' AND NOT i.indisvalid) THEN \
                 DROP INDEX {name}; END IF; END $$"
            ))
            .await?;
            db.execute_unprepared(postgres).await?;
        }
        _ => {
            if let Some(sql) = sqlite {
                db.execute_unprepared(sql).await?;
            }
        }
    }
    Ok(())
}

/// PostgreSQL: whether the valid index `name` exists, and whether it carries payload columns
/// (`INCLUDE`).
pub async fn index_covers(manager: &SchemaManager<'_>, name: &str) -> Result<Option<bool>, DbErr> {
    let row = manager
        .get_connection()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT i.indnatts > i.indnkeyatts AS covers FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = $1 AND i.indisvalid",
            [name.into()],
        ))
        .await?;
    match row {
        Some(row) => Ok(Some(row.try_get("", "covers")?)),
        None => Ok(None),
    }
}

/// PostgreSQL: replaces the index `name` by the one `create` builds (`CREATE INDEX
/// CONCURRENTLY IF NOT EXISTS`) under the name `temporary`, unless `name` already carries
/// payload columns (`covering`) or not, as wanted. The new index is built beside the old one,
/// the old one dropped `CONCURRENTLY` and the new one renamed: writers go on throughout, and a
/// run cut off midway finishes the swap when it runs again. The migration runs outside a
/// transaction.
pub async fn swap_index(
    manager: &SchemaManager<'_>,
    name: &str,
    covering: bool,
    temporary: &str,
    create: &str,
) -> Result<(), DbErr> {
    if index_covers(manager, name).await? == Some(covering) {
        return Ok(());
    }
    create_index(manager, temporary, create, None).await?;
    let db = manager.get_connection();
    db.execute_unprepared(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
        .await?;
    db.execute_unprepared(&format!("ALTER INDEX {temporary} RENAME TO {name}"))
        .await?;
    Ok(())
}
