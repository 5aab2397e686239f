//! SQLite only: rows that earlier versions wrote get the Django app's storage formats, so that
//! one file serves both programs. Django's SQLite backend stores a `UUIDField` as 32 lowercase
//! hex characters and a `DateTimeField` as naive UTC text `YYYY-MM-DD HH:MM:SS[.ffffff]`
//! (`str()` of the datetime: the fraction only when not zero); earlier versions wrote 16-byte
//! blob ids and RFC 3339 text with an offset (`2026-11-26T05:35:23.712809+00:00`).
//!
//! Converted: `llm_tracker_usage.id`, `.created_at`, `.started_at`, and `auth_user.date_joined`,
//! `.last_login` of every row not in Django's form yet, in rowid ranges of 10,000 rows, one
//! `UPDATE` per range (each its own transaction: SQLite migrations run outside one), so a
//! database of any size is converted without one huge write. Every value keeps its instant to the microsecond: the whole seconds
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
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Rows per statement.
const BATCH: i64 = 10_000;

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

/// One batch's `UPDATE` of `table`: the rows whose rowid is in `?1..=?2` with any of
/// `columns` (`(column, is_uuid)`) not in Django's form yet.
fn batch_update(table: &str, columns: &[(&str, bool)]) -> String {
    let (mut sets, mut tests) = (Vec::new(), Vec::new());
    for &(col, is_uuid) in columns {
        let (test, new) = if is_uuid {
            (
                format!("typeof({col}) = 'blob'"),
                format!("lower(hex({col}))"),
            )
        } else {
            (not_django(col), django_text(col))
        };
        sets.push(format!(
            "{col} = CASE WHEN {test} THEN {new} ELSE {col} END"
        ));
        tests.push(test);
    }
    format!(
        "UPDATE {table} SET {} WHERE rowid >= ?1 AND rowid <= ?2 AND ({})",
        sets.join(", "),
        tests.join(" OR ")
    )
}

/// The tables, each with its batch statement.
pub fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "llm_tracker_usage",
            batch_update(
                "llm_tracker_usage",
                &[("id", true), ("created_at", false), ("started_at", false)],
            ),
        ),
        (
            "auth_user",
            batch_update(
                "auth_user",
                &[("date_joined", false), ("last_login", false)],
            ),
        ),
    ]
}

/// SQLite's page cache for the conversion, in KiB: the new ids land at random places in the
/// primary-key index, which thrashes a small cache (1M rows: 25 s with the default 2 MiB,
/// 12 s with this). Only the conversion's own connection, closed afterwards.
const CONVERSION_CACHE_KIB: i64 = 131_072;

/// `(lo, hi)` of each batch between `first` and `last`.
fn batches(first: i64, last: i64) -> impl Iterator<Item = (i64, i64)> {
    let mut lo = first;
    std::iter::from_fn(move || {
        (lo <= last).then(|| {
            let range = (lo, lo.saturating_add(BATCH - 1));
            lo = range.1.saturating_add(1);
            range
        })
    })
}

/// Every table's batches on `conn`, each statement committed on its own outside a transaction.
/// Rowid ranges, not "the next rows still to convert": each batch reads only its own rows (the
/// latter rescans every converted row: quadratic, 1M rows in 2 min).
async fn convert(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    for (table, sql) in statements() {
        let range = conn
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("SELECT MIN(rowid), MAX(rowid) FROM {table}"),
            ))
            .await?;
        let Some(range) = range else { continue };
        if let (Some(first), Some(last)) = (
            range.try_get_by_index::<Option<i64>>(0)?,
            range.try_get_by_index::<Option<i64>>(1)?,
        ) {
            for (lo, hi) in batches(first, last) {
                conn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    &sql,
                    [lo.into(), hi.into()],
                ))
                .await?;
            }
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm_migration::sea_orm::sqlx::sqlite::SqlitePoolOptions;
        use sea_orm_migration::sea_orm::{DatabaseExecutor, SqlxSqliteConnector};
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let DatabaseExecutor::Connection(db) = manager.get_connection() else {
            // Inside a caller's transaction: its connection, as it is.
            return convert(manager.get_connection()).await;
        };
        // A connection of its own (the pool's options: WAL, busy timeout), for its cache.
        let options = db.get_sqlite_connection_pool().connect_options();
        let own = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with((*options).clone())
            .await
            .map_err(|e| DbErr::Custom(format!("converting to Django's formats: {e}")))?;
        let own = SqlxSqliteConnector::from_sqlx_sqlite_pool(own);
        own.execute_unprepared(&format!("PRAGMA cache_size = -{CONVERSION_CACHE_KIB}"))
            .await?;
        let converted = convert(&own).await;
        own.close().await?;
        converted
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
            assert!(row.try_get_by_index::<bool>(1).unwrap(), "{stored}");
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
