//! Retention that keeps the statistics (`USAGE_RETENTION_DAYS`, `llm-tracker retention`).
//!
//! Raw rows older than the limit are deleted in small batches, each its own short transaction
//! that first marks itself in [`RETENTION_TABLE`] (`deleting`, cleared before it commits): the
//! rollup's delete trigger (migration 000018) sees the mark and leaves the cells as they are, so
//! token-stats over the deleted period keeps its numbers while the listing has no rows there.
//! Deletes by anyone else (the Django admin, SQL) still take their rows out of the statistics.
//!
//! The **horizon** is the UTC midnight from which the usage table is whole. It is stored
//! (advanced, never moved back) and committed before the first batch, so every snapshot can say
//! how many rows a range holds: the cells from the horizon on, plus the raw rows before it
//! (see [`crate::usage::list`]); `rollup verify` checks from the horizon on and `rollup rebuild`
//! keeps the cells before it.
//!
//! What survives: all users' cells at every grain (15-minute slots, hours, UTC days), each
//! user's UTC days, months and years over all models, and per model and outcome each user's
//! months and — added by each batch from the rows it deletes (migration 000021) — UTC days. A
//! request that needs raw rows over the deleted period — a range edge that is not on a
//! 15-minute slot (a UTC day for one user), a user's series in buckets finer than a UTC day or
//! in another zone's days — counts only the rows left.
//!
//! Batches never make a tracked call wait beyond its bound: each is sized to take about 4 ms on
//! SQLite (whose one write lock it holds) and 50 ms on PostgreSQL (where it locks only the old
//! rows it deletes), and the run then pauses twice as long, so that the database's writers and
//! its disk get two thirds of the time; see [`Pace`]. Several servers
//! may run it at once: each batch takes the retention row's lock, so they take turns, and a
//! row is deleted once.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use migration::rollup::{RETENTION_TABLE, SLOT_SECONDS};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait, Value};

use crate::config::MAX_RETENTION_DAYS as MAX_DAYS;
use crate::db::Dialect;

/// How long a batch should hold its locks, the most rows it deletes, and how many times its
/// duration the run then pauses. On PostgreSQL a batch locks only the old rows it deletes
/// (inserts never wait for them); on SQLite it holds the database's one write lock, so it is
/// kept well inside the tracker's 10 ms commit deadline. Both leave writers (and the disk, which
/// the tracker's spool fsyncs to) two thirds of the time.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub target: Duration,
    pub max_rows: u64,
    pub rest: u32,
}

impl Pace {
    pub fn of(dialect: Dialect) -> Self {
        match dialect {
            Dialect::Postgres => Self {
                target: Duration::from_millis(50),
                max_rows: 5_000,
                rest: 2,
            },
            Dialect::Sqlite => Self {
                target: Duration::from_millis(4),
                max_rows: 1_000,
                rest: 2,
            },
        }
    }

    /// The next batch's size: this one's scaled to the target duration.
    fn next(self, rows: u64, took: Duration) -> u64 {
        let scaled = rows as f64 * self.target.as_secs_f64() / took.as_secs_f64().max(1e-6);
        (scaled as u64).clamp(MIN_BATCH, self.max_rows)
    }
}

/// The smallest batch.
const MIN_BATCH: u64 = 20;

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Rows created before this instant (a UTC midnight) are (or would be) deleted.
    pub horizon: DateTime<Utc>,
    /// Rows deleted (dry run: rows that would be).
    pub rows: u64,
    /// Batches run (0 for a dry run).
    pub batches: u64,
    pub dry_run: bool,
}

/// Parses a retention such as `400d` or `400` (whole days, 1 to [`MAX_DAYS`]).
pub fn parse_days(raw: &str) -> Result<u32, String> {
    let raw = raw.trim();
    let digits = raw.strip_suffix('d').unwrap_or(raw);
    digits
        .parse::<u32>()
        .ok()
        .filter(|d| (1..=MAX_DAYS).contains(d))
        .ok_or_else(|| {
            format!("{raw:?}: expected a whole number of days from 1 to {MAX_DAYS}, such as 400d")
        })
}

/// The horizon of a retention of `days` at `now`: the UTC midnight `days` days before today's,
/// so rows are kept at least `days` days (and less than one more).
pub fn horizon_for(now: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    let day = (now - chrono::Duration::days(i64::from(days))).date_naive();
    day.and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// One column of the retention row (`None` when the row is missing).
async fn state_column<C: ConnectionTrait, T: sea_orm::TryGetable>(
    db: &C,
    column: &str,
) -> Result<Option<T>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT {column} FROM {RETENTION_TABLE} WHERE id = 1"),
        ))
        .await?;
    row.map(|r| r.try_get_by_index::<T>(0)).transpose()
}

/// The stored horizon as a slot: every row created at or after its start is in the usage
/// table; cells before it may count rows retention deleted. `None` before the first run.
pub async fn horizon_slot<C: ConnectionTrait>(db: &C) -> Result<Option<i64>, DbErr> {
    Ok(state_column::<_, Option<i64>>(db, "horizon_slot")
        .await?
        .flatten())
}

/// [`horizon_slot`] as an instant.
pub async fn horizon<C: ConnectionTrait>(db: &C) -> Result<Option<DateTime<Utc>>, DbErr> {
    Ok(horizon_slot(db)
        .await?
        .and_then(|s| DateTime::from_timestamp(s.checked_mul(SLOT_SECONDS)?, 0)))
}

/// Rows deleted by retention so far (all runs, every server).
pub async fn rows_deleted<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    Ok(state_column::<_, i64>(db, "rows_deleted")
        .await?
        .map_or(0, |n| n.max(0) as u64))
}

/// Deletes the rows created before [`horizon_for`]`(now, days)`, keeping their statistics (see
/// the module). With `dry_run`, only counts them and changes nothing.
pub async fn run(
    db: &DatabaseConnection,
    days: u32,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Report, DbErr> {
    let backend = db.get_database_backend();
    let dialect = Dialect::of(backend);
    let horizon = horizon_for(now, days);
    let before = dialect.datetime(horizon);
    let p1 = dialect.placeholder(1);
    let mut report = Report {
        horizon,
        rows: 0,
        batches: 0,
        dry_run,
    };
    if dry_run {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                format!("SELECT COUNT(*) FROM llm_tracker_usage WHERE created_at < {p1}"),
                [before],
            ))
            .await?;
        report.rows = match row {
            Some(r) => r.try_get_by_index::<i64>(0)?.max(0) as u64,
            None => 0,
        };
        return Ok(report);
    }
    // The horizon first, committed: from now on every reader counts the rows before it one
    // by one, whichever of them the batches below have deleted yet.
    let slot = horizon.timestamp().div_euclid(SLOT_SECONDS);
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "UPDATE {RETENTION_TABLE} SET horizon_slot = CASE WHEN horizon_slot IS NULL OR horizon_slot < {p1} THEN {} ELSE horizon_slot END WHERE id = 1",
            dialect.placeholder(2)
        ),
        [Value::BigInt(Some(slot)), Value::BigInt(Some(slot))],
    ))
    .await?;
    // The light user years that now start before the horizon are made full before any of
    // their rows goes (migration 000032: a light year's months are read from its rows, which
    // must all be there), under the folders' lock.
    {
        let txn = db.begin().await?;
        if backend == sea_orm::DbBackend::Postgres {
            txn.execute_unprepared(&format!(
                "SELECT pg_advisory_xact_lock({})",
                migration::rollup::FOLD_LOCK
            ))
            .await?;
        }
        let years: Vec<(i64, i64)> = txn
            .query_all_raw(Statement::from_string(
                backend,
                migration::rollup::promote_years_before_sql(),
            ))
            .await?
            .iter()
            .map(|r| Ok((r.try_get_by_index::<i64>(0)?, r.try_get_by_index::<i64>(1)?)))
            .collect::<Result<_, DbErr>>()?;
        migration::rollup::promote_years_in(&txn, &years).await?;
        txn.commit().await?;
    }
    let pace = Pace::of(dialect);
    let chosen = format!(
        "id IN (SELECT id FROM llm_tracker_usage WHERE created_at < {p1} ORDER BY created_at LIMIT {})",
        dialect.placeholder(2)
    );
    let delete = format!("DELETE FROM llm_tracker_usage WHERE {chosen}");
    // The batch's rows added to their users' day cells per model and outcome, and to their
    // users' latency histograms per day (the only cells that change: a user's per-model cells
    // and histograms are months, and these keep a user's per-model sums and percentiles over
    // any whole UTC day before the horizon; see `migration::rollup::retained_days_upsert_sql`),
    // and, in a light month (migration 000031), to the user's day cells in the totals table.
    // PostgreSQL: in the statement that deletes them. SQLite: just before, the same rows (the
    // transaction holds the write lock from its first statement on).
    let keep_from = |name: &str, where_sql: Option<&str>| {
        let source = [migration::rollup::Source::Table {
            name,
            sign: 1,
            where_sql,
        }];
        [
            migration::rollup::retained_days_upsert_sql(backend, &source),
            migration::rollup::retained_latency_days_upsert_sql(backend, &source),
            migration::rollup::retained_light_days_upsert_sql(backend, &source),
        ]
    };
    let (keep, delete) = match backend {
        sea_orm::DbBackend::Postgres => {
            let [days, latency, light_days] = keep_from("gone", None);
            (
                Vec::new(),
                format!(
                    "WITH gone AS ({delete} RETURNING *), kept AS ({days}), kept_latency AS ({latency}), \
                     kept_light_days AS ({light_days}) SELECT COUNT(*) FROM gone"
                ),
            )
        }
        _ => (
            keep_from("llm_tracker_usage", Some(&chosen)).to_vec(),
            delete,
        ),
    };
    let mut batch = 100;
    loop {
        let started = Instant::now();
        let txn = db.begin().await?;
        txn.execute_unprepared(&format!(
            "UPDATE {RETENTION_TABLE} SET deleting = true WHERE id = 1"
        ))
        .await?;
        let values = [dialect.datetime(horizon), Value::BigInt(Some(batch as i64))];
        for keep in &keep {
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                keep.clone(),
                values.clone(),
            ))
            .await?;
        }
        let statement = Statement::from_sql_and_values(backend, delete.clone(), values);
        let deleted = match backend {
            sea_orm::DbBackend::Postgres => txn
                .query_one_raw(statement)
                .await?
                .map(|r| r.try_get_by_index::<i64>(0))
                .transpose()?
                .map_or(0, |n| n.max(0) as u64),
            _ => txn.execute_raw(statement).await?.rows_affected(),
        };
        txn.execute_unprepared(&format!(
            "UPDATE {RETENTION_TABLE} SET deleting = false, rows_deleted = rows_deleted + {deleted} WHERE id = 1"
        ))
        .await?;
        txn.commit().await?;
        let took = started.elapsed();
        if deleted == 0 {
            break;
        }
        report.rows += deleted;
        report.batches += 1;
        crate::metrics::metrics().rows_retained_out.inc_by(deleted);
        if deleted < batch {
            break;
        }
        batch = pace.next(batch, took);
        tokio::time::sleep((took * pace.rest).max(Duration::from_millis(1))).await;
    }
    // The dense users' hours and days per model before the horizon go with the rows: nothing
    // reads them.
    for sql in migration::rollup::delete_dense_cells_before_sql(slot) {
        db.execute_unprepared(&sql).await?;
    }
    Ok(report)
}

/// Runs retention at `serve`'s start and then once a day, until the task is aborted; a failed
/// run (the database away, the schema not migrated yet) is logged and retried after
/// [`RETRY_AFTER`]. Never on the insert path.
pub fn spawn_daily(db: DatabaseConnection, days: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = match run(&db, days, false, Utc::now()).await {
                Ok(r) => {
                    tracing::info!(
                        rows = r.rows,
                        batches = r.batches,
                        horizon = %r.horizon.to_rfc3339(),
                        "retention: rows older than {days} days deleted, statistics kept"
                    );
                    DAILY
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention run failed; retrying later");
                    RETRY_AFTER
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}

/// Between two runs of `serve`'s retention.
pub const DAILY: Duration = Duration::from_secs(24 * 3600);
/// After a failed run.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn days_are_whole_days_within_bounds() {
        assert_eq!(parse_days("400d"), Ok(400));
        assert_eq!(parse_days(" 30 "), Ok(30));
        for bad in ["0d", "", "d", "12h", "-3d", "36501d", "1.5d", "400dd"] {
            assert!(parse_days(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batches_are_sized_to_their_target_duration() {
        let sqlite = Pace::of(Dialect::Sqlite);
        assert_eq!(sqlite.next(100, Duration::from_millis(8)), 50);
        assert_eq!(sqlite.next(100, Duration::from_millis(1)), 400);
        assert_eq!(sqlite.next(800, Duration::from_micros(100)), 1_000);
        assert_eq!(sqlite.next(100, Duration::from_secs(2)), MIN_BATCH);
        let pg = Pace::of(Dialect::Postgres);
        assert_eq!(pg.next(1_000, Duration::from_millis(25)), 2_000);
        assert_eq!(pg.next(4_000, Duration::from_millis(10)), 5_000);
    }

    #[test]
    fn the_horizon_is_a_utc_midnight_at_least_the_given_days_back() {
        let now = Utc.with_ymd_and_hms(2026, 11, 26, 19, 30, 5).unwrap();
        let h = horizon_for(now, 400);
        assert_eq!(h, Utc.with_ymd_and_hms(2025, 10, 22, 0, 0, 0).unwrap());
        assert!(now - h >= chrono::Duration::days(400));
        assert!(now - h < chrono::Duration::days(401));
        assert_eq!(h.timestamp() % (96 * SLOT_SECONDS), 0);
    }
}
