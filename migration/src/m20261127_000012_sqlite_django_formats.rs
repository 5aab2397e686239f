//! SQLite only: rows that earlier versions wrote get the Django app's storage formats, so that
//! one file serves both programs. Django's SQLite backend stores a `UUIDField` as 32 lowercase
//! hex characters and a `DateTimeField` as naive UTC text `YYYY-MM-DD HH:MM:SS[.ffffff]`
//! (`str()` of the datetime: the fraction only when not zero); earlier versions wrote 16-byte
//! blob ids and RFC 3339 text with an offset (`2026-11-26T05:35:23.712809+00:00`).
//!
//! Converted: `llm_tracker_usage.id`, `.created_at`, `.started_at`, and `auth_user.date_joined`,
//! `.last_login` of every row not in Django's form yet, 10,000 rows per statement (each its own
//! transaction: SQLite migrations run outside one), so a database of any size is converted
//! without one huge write. Every value keeps its instant to the microsecond: the whole seconds
//! go through `strftime` with the text's own offset (an instant, not the wall-clock text), the
//! fraction is copied as digits (never through SQLite's millisecond arithmetic). The rollup's
//! cells do not move: a row's slot is the same instant, and the update trigger appends nothing
//! for a row whose counted values did not change.
//!
//! `down` changes nothing: Django's forms are what the Django app needs; versions before this
//! one cannot read them (the reason for this migration).
//!
//! The SQL is written out here: it is what this migration does, whatever later versions change.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Rows per statement.
const BATCH: u32 = 10_000;

/// True for a datetime text not in Django's form: a `T` separator, or an offset or `Z` after
/// the seconds.
fn not_django(col: &str) -> String {
    format!(
        "({col} IS NOT NULL AND (substr({col}, 11, 1) = 'T' OR substr({col}, 20) GLOB '*[+Z-]*'))"
    )
}

/// Django's text for the instant in `col` (`YYYY-MM-DD[T ]HH:MM:SS[.f…][Z|±HH:MM]`).
fn django_text(col: &str) -> String {
    // After the seconds: `.digits`, then the offset (or nothing).
    let after = format!("substr({col}, 21)");
    let digits_len = format!(
        "(CASE WHEN substr({col}, 20, 1) <> '.' THEN 0 \
         WHEN instr({after}, '+') > 0 THEN instr({after}, '+') - 1 \
         WHEN instr({after}, '-') > 0 THEN instr({after}, '-') - 1 \
         WHEN instr({after}, 'Z') > 0 THEN instr({after}, 'Z') - 1 \
         ELSE length({after}) END)"
    );
    let offset = format!(
        "substr({col}, CASE WHEN substr({col}, 20, 1) = '.' THEN 21 + {digits_len} ELSE 20 END)"
    );
    let micros = format!("substr(substr({after}, 1, {digits_len}) || '000000', 1, 6)");
    format!(
        "strftime('%Y-%m-%d %H:%M:%S', substr({col}, 1, 19) || {offset}) || \
         CASE WHEN {micros} = '000000' THEN '' ELSE '.' || {micros} END"
    )
}

/// The batched statements of `up`, each run until it changes no row.
pub fn statements() -> Vec<String> {
    let mut out = vec![format!(
        "UPDATE llm_tracker_usage SET id = lower(hex(id)) WHERE rowid IN \
         (SELECT rowid FROM llm_tracker_usage WHERE typeof(id) = 'blob' LIMIT {BATCH})"
    )];
    for (table, col) in [
        ("llm_tracker_usage", "created_at"),
        ("llm_tracker_usage", "started_at"),
        ("auth_user", "date_joined"),
        ("auth_user", "last_login"),
    ] {
        out.push(format!(
            "UPDATE {table} SET {col} = {new} WHERE rowid IN \
             (SELECT rowid FROM {table} WHERE {test} LIMIT {BATCH})",
            new = django_text(col),
            test = not_django(col),
        ));
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let conn = manager.get_connection();
        for sql in statements() {
            while conn.execute_unprepared(&sql).await?.rows_affected() > 0 {}
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sea_orm_migration::sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

    use super::*;

    /// Every spelling an earlier version (or another tool) may have stored, converted to the
    /// same instant in Django's text; Django's own text is left alone.
    #[tokio::test]
    async fn datetimes_become_djangos_text_for_the_same_instant() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        let cases = [
            (
                "2026-11-26T05:35:23.712809+00:00",
                "2026-11-26 05:35:23.712809",
            ),
            ("2026-11-26T05:35:23+00:00", "2026-11-26 05:35:23"),
            (
                "2026-11-26T05:35:23.120+00:00",
                "2026-11-26 05:35:23.120000",
            ),
            (
                "2026-11-26T05:35:23.999999999+00:00",
                "2026-11-26 05:35:23.999999",
            ),
            ("2026-11-26T23:59:59.9996Z", "2026-11-26 23:59:59.999600"),
            ("2026-11-26T01:30:00.5+02:00", "2026-11-25 23:30:00.500000"),
            (
                "2026-12-31T20:00:00.000001-05:00",
                "2027-01-01 01:00:00.000001",
            ),
            ("2026-11-26T05:35:23.000000+00:00", "2026-11-26 05:35:23"),
        ];
        for (stored, django) in cases {
            let sql = format!(
                "SELECT {}, {} FROM (SELECT '{stored}' AS x)",
                django_text("x"),
                not_django("x")
            );
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::Sqlite, sql))
                .await
                .unwrap()
                .unwrap();
            let got: String = row.try_get_by_index(0).unwrap();
            assert_eq!(got, django, "{stored}");
            assert_eq!(row.try_get_by_index::<bool>(1).unwrap(), true, "{stored}");
        }
        for already in ["2026-11-26 06:00:00", "2026-11-26 06:00:00.120000"] {
            let sql = format!("SELECT {} FROM (SELECT '{already}' AS x)", not_django("x"));
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::Sqlite, sql))
                .await
                .unwrap()
                .unwrap();
            assert!(!row.try_get_by_index::<bool>(0).unwrap(), "{already}");
        }
    }
}
