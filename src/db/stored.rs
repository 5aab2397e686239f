//! How values are bound where the two databases store them differently. PostgreSQL has native
//! `uuid` and `timestamptz`; on SQLite the Django app's SQLite backend decides: a `UUIDField` is
//! 32 lowercase hex characters (`char(32)`), a `DateTimeField` naive UTC text
//! `YYYY-MM-DD HH:MM:SS[.ffffff]` (`str()` of the datetime: the fraction only when not zero).
//! Every value this product writes into, or compares with, such a column goes through here, so
//! both programs' rows sort, range and join alike in one file.

use chrono::{DateTime, Utc};
use sea_orm::{DbBackend, Value};
use uuid::Uuid;

/// Django's SQLite text for an instant (microseconds; anything finer is dropped).
pub fn django_datetime(t: &DateTime<Utc>) -> String {
    use chrono::Timelike;
    let micros = t.nanosecond() / 1000 % 1_000_000;
    if micros == 0 {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    } else {
        format!("{}.{micros:06}", t.format("%Y-%m-%d %H:%M:%S"))
    }
}

/// An instant as `backend` stores it.
pub fn datetime(backend: DbBackend, t: DateTime<Utc>) -> Value {
    match backend {
        DbBackend::Postgres => Value::ChronoDateTimeUtc(Some(t)),
        _ => Value::String(Some(django_datetime(&t))),
    }
}

/// [`datetime`] of a nullable column.
pub fn datetime_opt(backend: DbBackend, t: Option<DateTime<Utc>>) -> Value {
    match (t, backend) {
        (Some(t), _) => datetime(backend, t),
        (None, DbBackend::Postgres) => Value::ChronoDateTimeUtc(None),
        (None, _) => Value::String(None),
    }
}

/// A UUID as `backend` stores it.
pub fn uuid(backend: DbBackend, id: Uuid) -> Value {
    match backend {
        DbBackend::Postgres => Value::Uuid(Some(id)),
        _ => Value::String(Some(id.simple().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_are_written_as_python_str_writes_them() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T06:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(django_datetime(&t), "2026-11-26 06:00:00");
        let t = DateTime::parse_from_rfc3339("2026-11-26T05:35:23.712809+00:00")
            .unwrap()
            .to_utc();
        assert_eq!(django_datetime(&t), "2026-11-26 05:35:23.712809");
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.120000999+01:00")
            .unwrap()
            .to_utc();
        assert_eq!(django_datetime(&t), "2026-01-02 02:04:05.120000");
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.000001Z")
            .unwrap()
            .to_utc();
        assert_eq!(django_datetime(&t), "2026-01-02 03:04:05.000001");
    }

    #[test]
    fn uuids_are_32_lowercase_hex_characters_on_sqlite() {
        let id = Uuid::parse_str("6F1C2A0E-8D4B-4C36-9A57-0E0F8B7B1C11").unwrap();
        assert_eq!(
            uuid(DbBackend::Sqlite, id),
            Value::String(Some("6f1c2a0e8d4b4c369a570e0f8b7b1c11".to_owned()))
        );
        assert_eq!(uuid(DbBackend::Postgres, id), Value::Uuid(Some(id)));
    }
}
