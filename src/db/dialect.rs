//! Every difference between SQLite and PostgreSQL that the code relies on, in one type:
//! how values are stored, the SQL fragments that must be spelled per database, the planner
//! settings PostgreSQL needs, transactions and writers. Code elsewhere asks a [`Dialect`]
//! instead of matching on the backend. (The rollup's trigger and cell SQL is generated in the
//! `migration` crate, which the migrations freeze; it has its own per-backend spelling.)
//!
//! Stored values: PostgreSQL has native `uuid` and `timestamptz`; on SQLite the Django app's
//! SQLite backend decides: a `UUIDField` is 32 lowercase hex characters (`char(32)`), a
//! `DateTimeField` naive UTC text `YYYY-MM-DD HH:MM:SS[.ffffff]` (`str()` of the datetime: the
//! fraction only when not zero). Every value this product writes into, or compares with, such a
//! column is bound through here, so both programs' rows sort, range and join alike in one file.

use chrono::{DateTime, Utc};
use sea_orm::{AccessMode, DbBackend, IsolationLevel, Value};
use uuid::Uuid;

/// The database's dialect: PostgreSQL, or SQLite (every other backend sea-orm knows is
/// refused when connecting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A UTC truncation unit of [`Dialect::utc_bucket_start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trunc {
    Hour,
    Day,
    Month,
}

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

impl Dialect {
    pub fn of(backend: DbBackend) -> Self {
        match backend {
            DbBackend::Postgres => Self::Postgres,
            _ => Self::Sqlite,
        }
    }

    // --- Stored values -------------------------------------------------------------------

    /// An instant as the database stores it.
    pub fn datetime(self, t: DateTime<Utc>) -> Value {
        match self {
            Self::Postgres => Value::ChronoDateTimeUtc(Some(t)),
            Self::Sqlite => Value::String(Some(django_datetime(&t))),
        }
    }

    /// [`Self::datetime`] of a nullable column.
    pub fn datetime_opt(self, t: Option<DateTime<Utc>>) -> Value {
        match (t, self) {
            (Some(t), _) => self.datetime(t),
            (None, Self::Postgres) => Value::ChronoDateTimeUtc(None),
            (None, Self::Sqlite) => Value::String(None),
        }
    }

    /// A UUID as the database stores it.
    pub fn uuid(self, id: Uuid) -> Value {
        match self {
            Self::Postgres => Value::Uuid(Some(id)),
            Self::Sqlite => Value::String(Some(id.simple().to_string())),
        }
    }

    /// A cost in micro-dollars as stored: PostgreSQL `numeric(12,6)` USD, SQLite integer
    /// micro-dollars (exact sums).
    pub fn cost(self, micros: Option<i64>) -> Value {
        match self {
            Self::Postgres => Value::Decimal(micros.map(|m| rust_decimal::Decimal::new(m, 6))),
            Self::Sqlite => Value::BigInt(micros),
        }
    }

    // --- SQL ---------------------------------------------------------------------------

    /// The `n`-th (1-based) bind placeholder.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Self::Postgres => format!("${n}"),
            Self::Sqlite => "?".to_owned(),
        }
    }

    /// What precedes a statement to get its plan: `EXPLAIN` / `EXPLAIN QUERY PLAN`.
    pub fn explain_prefix(self) -> &'static str {
        match self {
            Self::Postgres => "EXPLAIN ",
            Self::Sqlite => "EXPLAIN QUERY PLAN ",
        }
    }

    /// `created_at` truncated to a UTC `unit`: (grouping expression, its text
    /// `YYYY-MM-DD HH:MM:SS`). Grouping on PostgreSQL's `date_trunc` (not on a formatted
    /// string) keeps the per-row work small; the label is formatted once per bucket, in Rust.
    pub fn utc_bucket_start(self, unit: Trunc) -> (&'static str, &'static str) {
        match (self, unit) {
            (Self::Postgres, Trunc::Hour) => (
                "date_trunc('hour', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('hour', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (Self::Postgres, Trunc::Day) => (
                "date_trunc('day', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('day', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (Self::Postgres, Trunc::Month) => (
                "date_trunc('month', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('month', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (Self::Sqlite, Trunc::Hour) => (
                "strftime('%Y-%m-%d %H:00:00', created_at)",
                "strftime('%Y-%m-%d %H:00:00', created_at)",
            ),
            (Self::Sqlite, Trunc::Day) => (
                "strftime('%Y-%m-%d 00:00:00', created_at)",
                "strftime('%Y-%m-%d 00:00:00', created_at)",
            ),
            (Self::Sqlite, Trunc::Month) => (
                "strftime('%Y-%m-01 00:00:00', created_at)",
                "strftime('%Y-%m-01 00:00:00', created_at)",
            ),
        }
    }

    /// The sum of `cost` in micro-dollars: PostgreSQL sums `numeric` USD exactly, SQLite sums
    /// integer micro-dollars exactly; NULLs (unpriced) are skipped.
    pub fn cost_sum(self) -> &'static str {
        match self {
            Self::Postgres => "CAST(COALESCE(SUM(cost), 0) * 1000000 AS BIGINT)",
            Self::Sqlite => "CAST(COALESCE(SUM(cost), 0) AS BIGINT)",
        }
    }

    /// Latency in whole microseconds summed over the rows that have `started_at` (negative
    /// clock skew counts as 0). The same per-row value as the rollup's.
    pub fn latency_sum(self) -> String {
        self.micros_since_start_sum("created_at")
    }

    /// Time to first token (`first_chunk_at − started_at`) in whole microseconds summed over
    /// the rows that have both; the same per-row value as the rollup's.
    pub fn ttft_sum(self) -> String {
        self.micros_since_start_sum("first_chunk_at")
    }

    /// How many rows [`Dialect::ttft_sum`] covers.
    pub fn ttft_count(self) -> &'static str {
        "CAST(COUNT(CASE WHEN first_chunk_at IS NOT NULL AND started_at IS NOT NULL THEN 1 END) AS BIGINT)"
    }

    /// `SUM(end − started_at)` in whole microseconds (negative as 0; rows without either
    /// left out).
    fn micros_since_start_sum(self, end: &str) -> String {
        match self {
            // Summing intervals and converting once per group (exact: intervals are whole
            // microseconds): EXTRACT on every row is numeric arithmetic per row (about 120 ms
            // more at 1M rows).
            Self::Postgres => format!(
                "CAST(COALESCE(EXTRACT(EPOCH FROM SUM(GREATEST({end} - started_at, INTERVAL '0'))) * 1000000, 0) AS BIGINT)"
            ),
            Self::Sqlite => format!(
                "CAST(COALESCE(SUM({}), 0) AS INTEGER)",
                migration::rollup::latency_us_sql(DbBackend::Sqlite, end, "started_at")
            ),
        }
    }

    /// The model as a grouping key. On SQLite `+model` (a no-op) keeps the planner from
    /// walking the `(model, created_at)` index to save a sort: that turns a scan into a million
    /// random row lookups (3.2 s instead of 0.95 s for token-stats over 1M rows, measured).
    pub fn model_group(self) -> &'static str {
        match self {
            Self::Postgres => "model",
            Self::Sqlite => "+model",
        }
    }

    /// Planner settings for the raw token-stats aggregate, local to its transaction.
    ///
    /// PostgreSQL cannot estimate how many groups `GROUP BY model, date_trunc(…)` makes (it
    /// guesses 10% of the rows, 100,000 at 1M rows, where there are a few hundred), so it sorts
    /// a million rows on disk instead of hashing them, and will not aggregate in parallel; JIT
    /// then adds ~60 ms of compiling to a query that runs once. The groups are bounded by
    /// models × buckets, so hashing them always fits. Measured at 1M rows (`cargo bench
    /// --bench api`): `granularity=month` 735 ms with the defaults, ~300 ms with these.
    pub fn aggregate_settings(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some(
                "SET LOCAL jit = off; SET LOCAL enable_sort = off; \
                 SET LOCAL work_mem = '64MB'; SET LOCAL parallel_tuple_cost = 0",
            ),
            Self::Sqlite => None,
        }
    }

    /// Planner settings for the rollup statements, local to the read transaction.
    ///
    /// The plan's runs join the rollup's primary key as index range scans, one per run (and
    /// per user, for by_user). With more than a few runs PostgreSQL's estimate tips towards
    /// hashing the whole rollup instead (a sequential scan of millions of cells: 350 ms instead
    /// of a few at 10M rows, measured), and for by_user it puts the user list inside, losing
    /// the index range; so hash and merge joins are off and the joins run in the order written
    /// (users, runs, cells: `join_collapse_limit = 1`). Memoize is off too: over the user list
    /// it cached per run, not per user and run, and scanned every user's cells (by_user at 10M
    /// rows: 13.5 ms without these two settings, 2.7 ms with them, `EXPLAIN ANALYZE`). No other
    /// statement of the transaction joins. Sequential scans are off as well: with thousands of
    /// users the cells of all users are a third of the table and the planner, which cannot see
    /// the runs' ranges, estimated a parallel scan of all 6M cells cheaper than the runs' index
    /// ranges (1.4 s instead of 18 ms for a month at 10M rows and 10,000 users; the delta
    /// table, which has no index, is still scanned). And no parallel workers: the same
    /// misestimate made a month's 1,240 cells a parallel bitmap scan whose workers' start-up
    /// took 8 of its 12 ms (25–76 ms under load); a rollup statement reads thousands of cells,
    /// not millions. Plain index scans are on again (a read of one user's rows before it in
    /// the transaction turns them off, see [`Self::user_rows_settings`]).
    pub fn rollup_settings(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some(
                "SET LOCAL enable_indexscan = on; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
                 SET LOCAL enable_memoize = off; SET LOCAL join_collapse_limit = 1; SET LOCAL jit = off; \
                 SET LOCAL enable_seqscan = off; SET LOCAL max_parallel_workers_per_gather = 0; \
                 SET LOCAL enable_bitmapscan = on",
            ),
            Self::Sqlite => None,
        }
    }

    /// Planner settings for reading one user's rows over a time range, local to the read
    /// transaction: no sequential scans, no parallel workers, and index scans only where the
    /// usage table is nearly all marked all-visible. PostgreSQL estimates a scan of the
    /// `created_at` index in physical order cheaper than the user's rows through `(user_id,
    /// created_at)` when those rows must be fetched from the heap (it cannot see that the
    /// user's rows are a few percent of the range), and filtered 188,386 other users' rows to
    /// find the 13,810 of the heaviest user's last 7 days: 89 ms; as a bitmap scan of the
    /// user's index, 18 ms (`EXPLAIN ANALYZE` at 10M rows, 10,000 users). Since migration
    /// 000033 that index carries the columns these reads take, and where the table's pages are
    /// all-visible an index-only scan of it is the cheapest plan (the heaviest user's 7 days
    /// 9.9 ms; 77 users' partial days 2,212 → 653 buffers): PostgreSQL chose it with 90 % of
    /// the pages all-visible (`pg_class.relallvisible`) and the `created_at` index again with
    /// 50 %. Turning plain index scans off turns index-only scans off too, so they are on only
    /// where at least 95 % of the pages are all-visible — which the table's frequent insert
    /// autovacuum (000033) keeps — and a bitmap scan of the user's index is the plan otherwise
    /// (a table loaded but not vacuumed yet).
    pub fn user_rows_settings(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some(
                "SET LOCAL enable_seqscan = off; \
                 SET LOCAL max_parallel_workers_per_gather = 0; SET LOCAL enable_bitmapscan = on; \
                 SELECT set_config('enable_indexscan', CASE WHEN c.relpages > 0 \
                 AND c.relallvisible >= 0.95 * c.relpages THEN 'on' ELSE 'off' END, true) \
                 FROM pg_class c WHERE c.oid = 'llm_tracker_usage'::regclass",
            ),
            Self::Sqlite => None,
        }
    }

    /// Planner settings for reading one user's rows through
    /// [`crate::usage::UsageFilter::user_range_condition`] (a range of the `(user_id,
    /// created_at)` index that no other index serves), local to the read transaction: a plain
    /// index scan, no bitmap scan, no sequential scan, no parallel workers, no JIT (the
    /// planner cannot estimate the rows of a row comparison and guessed 139,280 for a
    /// typical user's 9,758, enough to compile the statement: 115 ms; the condition now also
    /// says `(user_id = user) IS TRUE`, which the estimate reads). A bitmap scan visits
    /// the same heap pages through a bitmap: a typical user's year (9,758 rows on 9,598 pages)
    /// took 17–22 ms that way, 11 ms in index order (`EXPLAIN ANALYZE` at 10M rows, 10,000
    /// users, cached).
    pub fn user_range_settings(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some(
                "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_indexscan = on; \
                 SET LOCAL enable_seqscan = off; SET LOCAL jit = off; \
                 SET LOCAL max_parallel_workers_per_gather = 0",
            ),
            Self::Sqlite => None,
        }
    }

    /// SQL: the instant `seconds` after the epoch, as `created_at` compares with it (PostgreSQL
    /// `to_timestamp`; on SQLite the stored text, which compares in order only where every row
    /// is written in that one format).
    pub fn instant_sql(self, seconds: i64) -> String {
        match self {
            Self::Postgres => format!(
                "to_timestamp({})",
                seconds.clamp(-210_866_803_200, 9_224_318_015_999)
            ),
            Self::Sqlite => match DateTime::from_timestamp(seconds, 0) {
                Some(t) => format!("'{}'", django_datetime(&t)),
                None => "NULL".to_owned(),
            },
        }
    }

    /// The rows whose `created_at` lies in the 15-minute slots `[lo, hi)`: on PostgreSQL exact
    /// on timestamps and served by the `created_at` index; on SQLite by the rollup's own slot
    /// expression over the stored text.
    pub fn created_in_slots(self, lo: i64, hi: i64) -> String {
        use migration::rollup::SLOT_SECONDS;
        match self {
            Self::Postgres => format!(
                "created_at >= to_timestamp({}) AND created_at < to_timestamp({})",
                lo.saturating_mul(SLOT_SECONDS).max(-210_866_803_200),
                hi.saturating_mul(SLOT_SECONDS).min(9_224_318_015_999)
            ),
            Self::Sqlite => {
                let slot = migration::rollup::slot_sql(DbBackend::Sqlite, "created_at");
                format!("{slot} >= {lo} AND {slot} < {hi}")
            }
        }
    }

    // --- Transactions and writers ------------------------------------------------------

    /// How a read of several statements sees one snapshot: PostgreSQL `REPEATABLE READ, READ
    /// ONLY`; SQLite's plain transaction already reads one snapshot (WAL).
    pub fn read_snapshot(self) -> Option<(IsolationLevel, AccessMode)> {
        match self {
            Self::Postgres => Some((IsolationLevel::RepeatableRead, AccessMode::ReadOnly)),
            Self::Sqlite => None,
        }
    }

    /// Writer tasks of a usage store: SQLite has one writer at a time (and this process
    /// takes turns with its folds and replays, see the store's write gate); PostgreSQL takes
    /// a few in parallel.
    pub fn writers(self) -> usize {
        match self {
            Self::Postgres => 4,
            Self::Sqlite => 1,
        }
    }

    /// Whether a subquery in `FROM` may read the columns of the tables before it (`LATERAL`,
    /// PostgreSQL): a list joined so, one index range per item, stays the outer loop whatever
    /// the planner estimates.
    pub fn lateral_joins(self) -> bool {
        self == Self::Postgres
    }

    /// The statements around one statement to run on its generic plan (PostgreSQL, inside a
    /// transaction): before it, the mode that plans it once per prepared statement; after it,
    /// the server's default back. A statement whose text is the same for every list (a list
    /// as one array parameter) is then planned once per connection, not at every execution.
    pub fn generic_plan_settings(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Postgres => Some((
                "SET LOCAL plan_cache_mode = force_generic_plan",
                "SET LOCAL plan_cache_mode TO DEFAULT",
            )),
            Self::Sqlite => None,
        }
    }

    /// Whether writes in this process take turns (SQLite: one writer at a time).
    pub fn single_writer(self) -> bool {
        self == Self::Sqlite
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
            Dialect::Sqlite.uuid(id),
            Value::String(Some("6f1c2a0e8d4b4c369a570e0f8b7b1c11".to_owned()))
        );
        assert_eq!(Dialect::Postgres.uuid(id), Value::Uuid(Some(id)));
    }
}
