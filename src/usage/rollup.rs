//! Reading the usage rollup (`llm_tracker_usage_rollup`, see [`migration::rollup`]): a range
//! is split into whole cells of the rollup (15-minute slots, UTC hours and UTC days, each
//! inside one bucket of the series) and the raw rows of the partial slots at its edges, whose
//! sums together are exactly those of the raw rows of the whole range.
//!
//! The cells are chosen greedily, coarsest first: a UTC day where it lies inside one bucket
//! (always, without a series), else a UTC hour, else a slot. A slot that straddles a bucket
//! boundary (a zone offset that is not a multiple of 15 minutes: only the local mean times
//! before 1900 in the tz database) makes the whole request fall back to the raw rows.

use chrono::{DateTime, Duration, Utc};
use chrono::{Datelike, Months, NaiveDate, NaiveDateTime};
use chrono_tz::Tz;
use migration::rollup::{
    ALL_USERS, Calendar, DAY, DELTA_TABLE, DENSE_GRAINS, DENSE_MODEL_DAY, DENSE_TABLE,
    FULL_MONTH_TABLE, FULL_YEAR_TABLE, GRAINS, Grain, Level, NO_USER, SLOT_SECONDS, TOTALS_TABLE,
    hour_grain, per_user,
};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

use super::UsageFilter;
use super::buckets::Granularity;
use super::buckets::{
    bucket_key, bucket_start, bucket_start_seconds, in_chrono_range, next_bucket_guess,
};
use super::filters::escape_like;
use super::sums::{Sum, TokenSums};

const SLOT_MICROS: i64 = SLOT_SECONDS * 1_000_000;

/// Whose cells a plan reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The cells of all users together: every fixed grain.
    AllUsers,
    /// One user's cells (a `user_id` filter) or each user's (`by_user`): UTC days, and in the
    /// totals table UTC months and years ([`migration::rollup::per_user`]).
    PerUser,
}

/// Whole cells of one grain over the slots `[first, end)`: a run of a plan, added to the sums,
/// or (`subtract`) taken from them: a month cell less its days outside the range reads fewer
/// cells than the days inside (see [`user_cells`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The cells' grain code ([`migration::rollup::GRAINS`], [`migration::rollup::Calendar`]).
    pub grain: i64,
    pub first: i64,
    pub end: i64,
    pub subtract: bool,
}

impl Run {
    fn new(grain: i64, first: i64, end: i64) -> Self {
        Self {
            grain,
            first,
            end,
            subtract: false,
        }
    }
}

/// A run of [`Plan::per_bucket`] with the bucket it counts towards, named by a slot inside
/// that bucket: a run that subtracts may lie outside its bucket (a UTC day's cell less its
/// hours before a local midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRun {
    pub key: i64,
    pub run: Run,
}

/// The 15-minute slots `[first, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub first: i64,
    pub end: i64,
}

/// A user's UTC day that holds one boundary of the series' buckets (a daily series outside
/// UTC), at a slot: its day cell counts in the bucket of `key`, and the rows of `window` (the
/// shorter side of the boundary, 5 hours of the day in New York instead of 24) move from that
/// bucket to the other one. Exact: the cell and the pending contributions of the whole day are
/// the day's rows (the pending ones of the window are keyed to `key` too, see `build`), so the
/// cell's bucket gets the day less the window's rows, and the other bucket those rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub day: i64,
    pub key: i64,
    pub window: Slots,
}

/// How a request is answered from the rollup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub scope: Scope,
    /// Runs of whole cells that do not overlap, each cell inside one bucket of the series
    /// (when there is one), in the table the series reads.
    pub ranges: Vec<Run>,
    /// The cells of each bucket of the series (the same runs as [`Plan::ranges`] without a
    /// series), keyed by their bucket: the per-model series sums each bucket's runs in SQL, one
    /// group per bucket and model instead of one per cell and model. Over all users a bucket
    /// that is not a UTC day may read its UTC days' cells less their hours outside it (a local
    /// day outside UTC: one day and 8–10 hour cells instead of 24 hour cells).
    pub per_bucket: Vec<BucketRun>,
    /// The same slots in the coarsest cells of the per-model table, ignoring buckets: for the
    /// sums that have none (summary, per model, per user), which then read far fewer cells.
    pub totals: Vec<Run>,
    /// The same slots in the coarsest cells of the totals table (with a user's months and
    /// years): for the sums over all models and outcomes without buckets.
    pub coarse: Vec<Run>,
    /// The raw rows still to add: the filter narrowed to each partial edge of the range.
    pub edges: Vec<UsageFilter>,
    /// The raw rows to take away (only in plans for `by_user` without a series): where more
    /// than half of a partial UTC day at an end of the range lies inside it, the plan reads
    /// that day's cells and takes away the day's rows outside the range (a range from a local
    /// midnight in New York: 4–5 hours of rows instead of 19–20, for every user).
    pub minus: Vec<UsageFilter>,
    /// Whole slots inside `totals` that no cell of `ranges` covers (a user's day that
    /// straddles a local bucket): the series reads their raw rows instead.
    pub gaps: Vec<Slots>,
    /// Whether the series reads the rows of [`Plan::gaps`] one by one (each row its own group,
    /// summed per bucket by the reader) instead of grouped per slot in SQL: an hourly series of
    /// a user who is not dense (no UTC day of [`migration::rollup::DENSE_DAY_CALLS`] calls, so
    /// at most ~1.5 calls per 15-minute slot) on PostgreSQL, where grouping a typical user's
    /// year (9,758 rows into 8,474 slots) hashed nearly one group per row after the rows were
    /// read, and the server waited for all of it; one by one, the server sums the rows as
    /// they arrive ([`super::stats`]).
    pub gaps_by_row: bool,
    /// A user's days whose cell counts in one of the two buckets they straddle, less the rows
    /// moved to the other (on PostgreSQL, from the retention horizon on; [`Moved`]). Their
    /// cells are in [`Plan::per_bucket`], keyed, and not in [`Plan::ranges`].
    pub moved: Vec<Moved>,
    /// Whole slots that no cell of `totals` covers (a user's days per model outside whole
    /// months, see [`migration::rollup::per_user`]): sums without buckets from the per-model
    /// table read their raw rows instead ([`Plan::raw`]).
    pub model_gaps: Vec<Slots>,
    /// The whole slots that `ranges` and `totals` cover: the pending contributions of the
    /// delta table in them are added to the cells.
    pub slots: Slots,
    /// `by_user` per model or outcome, since migration 000030: the users' month cells per
    /// model in [`Plan::totals`] exist for full months only
    /// ([`migration::rollup::FULL_MONTH_TABLE`]). The pending contributions of light months
    /// are left out of the cells' statement, and `by_user` adds those months' rows
    /// ([`Plan::light_month_runs`]). (A plan for one user reads its light months' rows as
    /// [`Plan::model_gaps`] instead.)
    pub light_months: bool,
    /// Whole slots that no cell of [`Plan::coarse`] covers (a user's days of a light month
    /// outside its whole month, migration 000031): sums over all models without buckets read
    /// their raw rows instead ([`Plan::raw`]), as well as the day cells that keep what
    /// retention deleted there.
    pub coarse_gaps: Vec<Slots>,
    /// `by_user` over all models without a user filter, since migration 000031: a user's day
    /// cells in [`Plan::coarse`] exist for full months only (and for what retention deleted),
    /// so the reader adds, for each user whose month is light, each day run's rows less its
    /// pending contributions (what the missing cells would hold; `stats::light_day_groups`).
    pub light_days: bool,
    /// Only the pending contributions of users whose month starting at this slot is light
    /// (a plan of [`light_pending_plan`]).
    pub light_month: Option<i64>,
    /// `by_user` over all models without a user filter, since migration 000032: a user's
    /// month cells in [`Plan::coarse`] exist for full years only
    /// ([`migration::rollup::FULL_YEAR_TABLE`]), so the reader adds, for each user whose year
    /// is light, each month run's rows less its pending contributions
    /// (`stats::light_year_groups`, [`light_year_runs`]).
    pub light_years: bool,
    /// Only the pending contributions of users whose year starting at this slot is light (a
    /// plan of [`light_year_pending_plan`]).
    pub light_year: Option<i64>,
}

impl Plan {
    /// The runs of month cells in [`Plan::totals`] whose light user months `by_user` counts
    /// from the rows (see [`Plan::light_months`]).
    pub fn light_month_runs(&self) -> Vec<Slots> {
        if !self.light_months {
            return Vec::new();
        }
        self.totals
            .iter()
            .filter(|r| r.grain == Calendar::Month.code() && !r.subtract)
            .map(|r| Slots {
                first: r.first,
                end: r.end,
            })
            .collect()
    }

    /// The filter narrowed to each of [`Plan::gaps`]: raw rows counted in the series only.
    pub fn gap_filters(&self, filter: &UsageFilter) -> Vec<UsageFilter> {
        narrowed(&self.gaps, filter)
    }

    /// The raw rows a statement grouped by `by` (not a series) leaves to its reader besides
    /// [`Plan::edges`]: over the per-model table, a user's days outside whole months
    /// ([`Plan::model_gaps`]).
    pub fn model_gap_filters(&self, filter: &UsageFilter, by: GroupBy) -> Vec<UsageFilter> {
        if level_of(filter, by) == Level::ByModel
            && !matches!(by, GroupBy::Slot | GroupBy::SlotModel)
        {
            narrowed(&self.model_gaps, filter)
        } else {
            Vec::new()
        }
    }

    /// The raw rows a statement grouped by `by` (not a series) over the totals table leaves to
    /// its reader besides [`Plan::edges`]: a user's days of light months outside whole months
    /// ([`Plan::coarse_gaps`]).
    pub fn coarse_gap_filters(&self, filter: &UsageFilter, by: GroupBy) -> Vec<UsageFilter> {
        if level_of(filter, by) == Level::Total && !matches!(by, GroupBy::Slot | GroupBy::SlotModel)
        {
            narrowed(&self.coarse_gaps, filter)
        } else {
            Vec::new()
        }
    }

    /// Every raw filter a statement grouped by `by` (not a series) leaves to its reader: the
    /// edges, then [`Plan::model_gap_filters`] and [`Plan::coarse_gap_filters`].
    pub fn raw(&self, filter: &UsageFilter, by: GroupBy) -> Vec<UsageFilter> {
        let mut out = self.edges.clone();
        out.extend(self.model_gap_filters(filter, by));
        out.extend(self.coarse_gap_filters(filter, by));
        out
    }
}

/// `filter` narrowed to each run of whole slots.
fn narrowed(runs: &[Slots], filter: &UsageFilter) -> Vec<UsageFilter> {
    runs.iter().filter_map(|gap| gap.narrow(filter)).collect()
}

impl Slots {
    /// `filter` over these whole slots only.
    pub fn narrow(&self, filter: &UsageFilter) -> Option<UsageFilter> {
        Some(UsageFilter {
            start: Some(slot_start(self.first)?),
            end: Some(slot_start(self.end)? - Duration::microseconds(1)),
            ..filter.clone()
        })
    }
}

fn slot_start(slot: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(slot.checked_mul(SLOT_SECONDS)?, 0)
}

fn slot_of(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp().div_euclid(SLOT_SECONDS)
}

/// The first slot of the calendar cell holding `slot`, and the first slot after it.
pub(crate) fn calendar_cell(c: Calendar, slot: i64) -> Option<(i64, i64)> {
    let at = slot_start(slot)?.date_naive();
    let (first, months) = match c {
        Calendar::Month => (at.with_day(1)?, 1),
        Calendar::Year => (NaiveDate::from_ymd_opt(at.year(), 1, 1)?, 12),
    };
    let next = first.checked_add_months(Months::new(months))?;
    Some((
        slot_of(first.and_hms_opt(0, 0, 0)?),
        slot_of(next.and_hms_opt(0, 0, 0)?),
    ))
}

/// The first and last slot of the rollup (any user), if it has any cell or pending
/// contribution.
pub(crate) async fn extent<C: ConnectionTrait>(db: &C) -> Result<Option<(i64, i64)>, DbErr> {
    let one = |order: &str| {
        format!(
            "(SELECT slot FROM {TOTALS_TABLE} WHERE grain = 1 AND user_key = {ALL_USERS} ORDER BY slot {order} LIMIT 1)"
        )
    };
    let sql = format!(
        "SELECT (SELECT MIN(slot) FROM (SELECT {} AS slot UNION ALL SELECT MIN(slot) FROM {DELTA_TABLE}) a), \
         (SELECT MAX(slot) FROM (SELECT {} AS slot UNION ALL SELECT MAX(slot) FROM {DELTA_TABLE}) b)",
        one("ASC"),
        one("DESC")
    );
    first_and_last(db, sql).await
}

/// The two slots a statement selects (first and last), when both are there.
pub(crate) async fn first_and_last<C: ConnectionTrait>(
    db: &C,
    sql: String,
) -> Result<Option<(i64, i64)>, DbErr> {
    let backend = db.get_database_backend();
    let Some(row) = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
    else {
        return Ok(None);
    };
    let first: Option<i64> = row.try_get_by_index(0)?;
    let last: Option<i64> = row.try_get_by_index(1)?;
    Ok(first.zip(last))
}

/// The table a statement grouped by `by` reads for `filter`: the totals table over all models
/// and outcomes, the per-model table otherwise.
pub(crate) fn level_of(filter: &UsageFilter, by: GroupBy) -> Level {
    match by {
        GroupBy::Model | GroupBy::SlotModel => Level::ByModel,
        _ if filter.model.is_none() && filter.success.is_none() => Level::Total,
        _ => Level::ByModel,
    }
}

/// The calls of `user` in each UTC month whose cell starts in slots `[from, to)`, as `(first
/// slot, first slot of the next month, calls)` in order: the user's month cells in the totals
/// table (one small index range: a year is 12 cells). What the user wrote since the last fold
/// is not in them: a measure of where the user's rows lie, not a statistic.
pub async fn user_month_calls<C: ConnectionTrait>(
    db: &C,
    user: i32,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, i64, i64)>, DbErr> {
    let backend = db.get_database_backend();
    let p = |n| crate::db::Dialect::of(backend).placeholder(n);
    let sql = format!(
        "SELECT slot, calls FROM {TOTALS_TABLE} WHERE grain = {} AND user_key = {} \
         AND slot >= {} AND slot < {} ORDER BY slot",
        p(1),
        p(2),
        p(3),
        p(4)
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [
                Value::from(Calendar::Month.code()),
                Value::from(key_of(Some(user))),
                Value::from(from),
                Value::from(to),
            ],
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let slot: i64 = row.try_get_by_index(0)?;
        let calls: i64 = row.try_get_by_index(1)?;
        let next = slot_start(slot)
            .and_then(|at| at.checked_add_months(Months::new(1)))
            .map(|at| at.timestamp().div_euclid(SLOT_SECONDS))
            .ok_or_else(|| DbErr::Custom(format!("a month cell at slot {slot}")))?;
        out.push((slot, next, calls));
    }
    Ok(out)
}

/// The slots in which the user of rollup key `key` has hour cells that a read may use: from
/// the user's `since` (never before the retention horizon: cells there keep rows that are
/// gone, and a rebuild refills hours from the rows only) to its `until`, if the user is dense
/// ([`migration::rollup::DENSE_TABLE`]).
pub(crate) async fn dense_since<C: ConnectionTrait>(
    db: &C,
    key: i64,
) -> Result<Option<HourWindow>, DbErr> {
    Ok(dense_users(db).await?.remove(&key))
}

/// The slots `[from, until)` (both UTC midnights, `until` open when `None`) in which a dense
/// user's hour cells hold every row of the user (see [`dense_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourWindow {
    pub from: i64,
    pub until: Option<i64>,
}

impl HourWindow {
    /// Whether the slots `[first, end)` lie inside.
    pub fn holds(&self, first: i64, end: i64) -> bool {
        first >= self.from && self.until.is_none_or(|u| end <= u)
    }
}

/// Whether the dense users' table exists (migration 000025): a database not migrated that far
/// yet (a file an earlier version wrote, read before `migrate`) has no dense users. Asked of
/// the catalog, because on PostgreSQL a statement on a missing table would abort the read's
/// transaction.
async fn dense_table_exists<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    table_exists(db, DENSE_TABLE).await
}

/// Whether the rollup's table `table` exists (a database read before `migrate` may not have
/// it yet), asked of the catalog: on PostgreSQL a statement on a missing table would abort the
/// read's transaction.
pub(crate) async fn table_exists<C: ConnectionTrait>(db: &C, table: &str) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => format!("SELECT 1 WHERE to_regclass('{table}') IS NOT NULL"),
        _ => format!("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{table}'"),
    };
    Ok(db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .is_some())
}

/// Every dense user's key and the window in which reads may use the user's hour cells (see
/// [`dense_since`]).
pub(crate) async fn dense_users<C: ConnectionTrait>(
    db: &C,
) -> Result<std::collections::HashMap<i64, HourWindow>, DbErr> {
    let mut out = std::collections::HashMap::new();
    if !dense_table_exists(db).await? {
        return Ok(out);
    }
    let horizon = crate::retention::horizon_slot(db).await?;
    for r in db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT user_key, since, until FROM {DENSE_TABLE}"),
        ))
        .await?
    {
        let (key, since, until): (i64, i64, Option<i64>) = (
            r.try_get_by_index(0)?,
            r.try_get_by_index(1)?,
            r.try_get_by_index(2)?,
        );
        let from = horizon.map_or(since, |h| since.max(h));
        out.insert(key, HourWindow { from, until });
    }
    Ok(out)
}

/// A range of rows `filter` (its two ends set) as whole UTC hours `[first, end)` (slots) and
/// the rows to add (sign 1) or take away (sign -1) around them: at each end, the partial
/// hour's cell less its rows outside the range where more than half of it lies inside, else
/// its rows inside. `None` when no whole hour results.
pub(crate) fn hour_split(filter: &UsageFilter) -> Option<(Slots, Vec<(UsageFilter, i64)>)> {
    let (s, e) = (filter.start?, filter.end?);
    let hour = Duration::hours(1);
    let tick = Duration::microseconds(1);
    let floor = |t: DateTime<Utc>| {
        DateTime::from_timestamp(t.timestamp().div_euclid(3600) * 3600, 0)
            .expect("an hour of a valid instant")
    };
    let after = e.checked_add_signed(tick)?;
    let part = |start: DateTime<Utc>, end: DateTime<Utc>, sign: i64| {
        (start < end).then(|| {
            (
                UsageFilter {
                    start: Some(start),
                    end: Some(end - tick),
                    ..filter.clone()
                },
                sign,
            )
        })
    };
    let mut rows = Vec::new();
    let first = floor(s);
    let first = if s == first || first + hour - s > s - first {
        rows.extend(part(first, s, -1));
        first
    } else {
        rows.extend(part(s, first + hour, 1));
        first + hour
    };
    let last = floor(after);
    let last = if after == last {
        last
    } else if after - last > last + hour - after {
        rows.extend(part(after, last + hour, -1));
        last + hour
    } else {
        rows.extend(part(last, after, 1));
        last
    };
    if first >= last {
        return None;
    }
    let slot = |t: DateTime<Utc>| t.timestamp().div_euclid(SLOT_SECONDS);
    Some((
        Slots {
            first: slot(first),
            end: slot(last),
        },
        rows,
    ))
}

/// The plan that reads the users' UTC hour cells over `hours` (per user, with their pending
/// contributions): for dense users' rows ([`hour_split`]).
pub(crate) fn hours_plan(hours: Slots) -> Plan {
    let run = Run::new(DENSE_GRAINS[0].code, hours.first, hours.end);
    Plan {
        scope: Scope::PerUser,
        ranges: vec![run],
        per_bucket: unkeyed(&[run]),
        totals: vec![run],
        coarse: vec![run],
        edges: Vec::new(),
        minus: Vec::new(),
        gaps: Vec::new(),
        gaps_by_row: false,
        moved: Vec::new(),
        model_gaps: Vec::new(),
        slots: hours,
        light_months: false,
        coarse_gaps: Vec::new(),
        light_days: false,
        light_month: None,
        light_years: false,
        light_year: None,
    }
}

/// The day runs of a `by_user` plan over all models ([`Plan::light_days`]) cut at UTC month
/// boundaries, each with its sign and the first slot of its month: where a user's month is
/// light, its day cells are missing and the reader counts the run as they would (its rows less
/// its pending contributions).
pub fn light_day_runs(plan: &Plan) -> Vec<(Slots, i64, i64)> {
    let mut out = Vec::new();
    if !plan.light_days {
        return out;
    }
    for run in plan.coarse.iter().filter(|r| r.grain == DAY) {
        let sign = if run.subtract { -1 } else { 1 };
        let mut p = run.first;
        while p < run.end {
            let Some((m0, m1)) = calendar_cell(Calendar::Month, p) else {
                break;
            };
            let end = m1.min(run.end);
            out.push((Slots { first: p, end }, sign, m0));
            p = end;
        }
    }
    out
}

/// The month runs of a `by_user` plan over all models ([`Plan::light_years`]) cut at UTC year
/// boundaries, each with its sign and the first slot of its year: where a user's year is
/// light, its month cells are missing and the reader counts the run as they would (its rows
/// and day cells — what retention deleted — less its pending contributions).
pub fn light_year_runs(plan: &Plan) -> Vec<(Slots, i64, i64)> {
    let mut out = Vec::new();
    if !plan.light_years {
        return out;
    }
    for run in plan
        .coarse
        .iter()
        .filter(|r| r.grain == Calendar::Month.code())
    {
        let sign = if run.subtract { -1 } else { 1 };
        let mut p = run.first;
        while p < run.end {
            let Some((y0, y1)) = calendar_cell(Calendar::Year, p) else {
                break;
            };
            let end = y1.min(run.end);
            out.push((Slots { first: p, end }, sign, y0));
            p = end;
        }
    }
    out
}

/// A plan that reads the day cells in `slots` (whole UTC days) of the users whose year starting
/// at slot `year` is light, and no pending contribution: what retention deleted there, which
/// only those cells keep (see [`light_year_runs`]).
pub fn light_year_days_plan(slots: Slots, year: i64) -> Plan {
    let run = Run::new(DAY, slots.first, slots.end);
    Plan {
        ranges: vec![run],
        per_bucket: unkeyed(&[run]),
        totals: vec![run],
        coarse: vec![run],
        slots: Slots {
            first: slots.first,
            end: slots.first,
        },
        light_year: Some(year),
        ..hours_plan(slots)
    }
}

/// A plan that reads no cell, only the pending contributions in `slots` of the users whose
/// year starting at slot `year` is light (see [`light_year_runs`]).
pub fn light_year_pending_plan(slots: Slots, year: i64) -> Plan {
    Plan {
        light_year: Some(year),
        ..hours_plan(slots)
    }
    .without_cells()
}

/// A plan that reads no cell, only the pending contributions in `slots` of the users whose
/// month starting at slot `month` is light (see [`light_day_runs`]).
pub fn light_pending_plan(slots: Slots, month: i64) -> Plan {
    Plan {
        light_month: Some(month),
        ..hours_plan(slots)
    }
    .without_cells()
}

impl Plan {
    fn without_cells(self) -> Plan {
        Plan {
            ranges: Vec::new(),
            per_bucket: Vec::new(),
            totals: Vec::new(),
            coarse: Vec::new(),
            ..self
        }
    }
}

/// The plan for `filter` (and, for a series, its buckets), or `None` when the raw rows answer
/// it better: a range shorter than a slot (a day, for one user's cells), an empty rollup, or a
/// slot that straddles a bucket. `by_user`: the plan serves per-user sums (see [`Scope`]).
pub async fn plan<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    series: Option<(Granularity, Tz)>,
    by_user: bool,
) -> Result<Option<Plan>, DbErr> {
    let scope = if by_user || filter.user_id.is_some() {
        Scope::PerUser
    } else {
        Scope::AllUsers
    };
    if let (Some(s), Some(e)) = (filter.start, filter.end)
        && e < s
    {
        return Ok(None);
    }
    // Whole slots [a, b): the first slot starting at or after `start`, up to the slot holding
    // the first instant after `end` (times are whole microseconds).
    let a = filter.start.map(|s| {
        let us = s.timestamp_micros();
        us.div_euclid(SLOT_MICROS) + i64::from(us.rem_euclid(SLOT_MICROS) != 0)
    });
    let b = filter
        .end
        .map(|e| (e.timestamp_micros() + 1).div_euclid(SLOT_MICROS));
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        _ => match extent(db).await? {
            None => return Ok(None),
            // An open end reaches past every row: for one user's cells it may as well reach a
            // whole year, so that "all time" reads years, not days.
            Some((first, last)) => match scope {
                Scope::AllUsers => (a.unwrap_or(first), b.unwrap_or(last + 1)),
                Scope::PerUser => {
                    let (Some((y0, _)), Some((_, y1))) = (
                        calendar_cell(Calendar::Year, first),
                        calendar_cell(Calendar::Year, last),
                    ) else {
                        return Ok(None);
                    };
                    (a.unwrap_or(y0), b.unwrap_or(y1))
                }
            },
        },
    };
    // A user's finest cells are UTC days.
    let (a, b) = match scope {
        Scope::AllUsers => (a, b),
        Scope::PerUser => (
            a.div_euclid(DAY) * DAY + if a.rem_euclid(DAY) == 0 { 0 } else { DAY },
            b.div_euclid(DAY) * DAY,
        ),
    };
    if a >= b {
        return Ok(None);
    }
    // (Only over the totals table: per model a user has no day cells.)
    let (a, b, minus) =
        if by_user && series.is_none() && level_of(filter, GroupBy::User) == Level::Total {
            complement_ends(db, filter, a, b).await?
        } else {
            (a, b, Vec::new())
        };
    let mut gaps_by_row = false;
    // Per model, a user's light months have no cells (migration 000030): one user's are read
    // from rows (model gaps); for `by_user`, see `Plan::light_months`.
    let layout = match scope {
        Scope::PerUser => light_layout(db).await?,
        Scope::AllUsers => LightLayout::default(),
    };
    let light = match filter.user_id {
        Some(user) if layout.by_model || layout.days => {
            light_months(db, key_of(Some(user)), a, b).await?
        }
        _ => Vec::new(),
    };
    // Over all models a user's light years have no month cells (migration 000032).
    let light_years = match filter.user_id {
        Some(user) if layout.years => light_years(db, key_of(Some(user)), a, b).await?,
        _ => Vec::new(),
    };
    let light_years_all = scope == Scope::PerUser
        && filter.user_id.is_none()
        && level_of(filter, GroupBy::User) == Level::Total
        && layout.years;
    let light_months = scope == Scope::PerUser
        && filter.user_id.is_none()
        && level_of(filter, GroupBy::User) == Level::ByModel
        && layout.by_model;
    let light_days = scope == Scope::PerUser
        && filter.user_id.is_none()
        && level_of(filter, GroupBy::User) == Level::Total
        && layout.days;
    // The light months whose cells each table lacks.
    let (light_model, light_total): (&[i64], &[i64]) = (
        if layout.by_model { &light } else { &[] },
        if layout.days { &light } else { &[] },
    );
    let (ranges, totals, coarse, gaps, model_gaps, moved, coarse_gaps) = match scope {
        Scope::AllUsers => {
            let Some(ranges) = cells(a, b, series) else {
                return Ok(None);
            };
            let totals = match series {
                None => ranges.clone(),
                Some(_) => cells(a, b, None).unwrap_or_else(|| ranges.clone()),
            };
            (
                ranges,
                totals.clone(),
                totals,
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )
        }
        Scope::PerUser => {
            let series_level = level_of(filter, GroupBy::Slot);
            // Days that straddle a bucket move the rows of their shorter side (PostgreSQL
            // only: there the rows of 365 windows are 365 ranges of the (user_id, created_at)
            // index; SQLite, which compares text there, reads the days' rows as before).
            // Never before the retention horizon, whose days may have lost their rows. (In UTC
            // a day never straddles a daily or monthly bucket, and an hourly one crosses 24
            // boundaries a day: no day moves, and the horizon is not read.)
            let moves_from = if matches!(series, Some((gran, tz)) if gran != Granularity::Day && tz != Tz::UTC)
                && series_level == Level::Total
                && db.get_database_backend() == sea_orm::DbBackend::Postgres
            {
                Some(
                    crate::retention::horizon_slot(db)
                        .await?
                        .unwrap_or(i64::MIN),
                )
            } else {
                None
            };
            // A dense user's series reads hour cells where days do not fit its buckets, and
            // the user's sums per model read day cells where months do not fit the range
            // (migration 000035).
            let dense = match filter.user_id {
                Some(user) if series.is_some() || layout.dense_model_days => {
                    dense_since(db, key_of(Some(user))).await?
                }
                _ => None,
            };
            let hours = dense.filter(|_| series.is_some() && series_level == Level::Total);
            let model_days = dense.filter(|_| layout.dense_model_days);
            gaps_by_row = filter.user_id.is_some()
                && dense.is_none()
                && matches!(series, Some((Granularity::Day, _)))
                && db.get_database_backend() == sea_orm::DbBackend::Postgres;
            let light = |level: Level| Light {
                months: match level {
                    Level::ByModel => light_model,
                    Level::Total => light_total,
                },
                years: &light_years,
            };
            let (ranges, gaps, moved) = user_cells(
                a,
                b,
                series,
                series_level,
                moves_from,
                Dense {
                    hours,
                    model_days: None,
                },
                light(series_level),
            );
            let (totals, model_gaps, _) = user_cells(
                a,
                b,
                None,
                Level::ByModel,
                None,
                Dense {
                    hours: None,
                    model_days,
                },
                light(Level::ByModel),
            );
            let (coarse, coarse_gaps, _) = user_cells(
                a,
                b,
                None,
                Level::Total,
                None,
                Dense::default(),
                light(Level::Total),
            );
            (ranges, totals, coarse, gaps, model_gaps, moved, coarse_gaps)
        }
    };
    let mut edges = Vec::new();
    let (Some(a_at), Some(b_at)) = (slot_start(a), slot_start(b)) else {
        return Ok(None);
    };
    if let Some(start) = filter.start
        && start < a_at
    {
        edges.push(UsageFilter {
            start: Some(start),
            end: Some(a_at - Duration::microseconds(1)),
            ..filter.clone()
        });
    }
    if let Some(end) = filter.end
        && b_at <= end
    {
        edges.push(UsageFilter {
            start: Some(b_at),
            end: Some(end),
            ..filter.clone()
        });
    }
    let mut per_bucket = match series {
        Some((gran, tz)) => per_bucket(&split_per_bucket(&ranges, gran, tz), scope),
        None => unkeyed(&ranges),
    };
    per_bucket.extend(moved.iter().map(|m| BucketRun {
        key: m.key,
        run: Run::new(DAY, m.day, m.day + DAY),
    }));
    Ok(Some(Plan {
        scope,
        ranges,
        per_bucket,
        totals,
        coarse,
        edges,
        minus,
        gaps,
        gaps_by_row,
        moved,
        model_gaps,
        slots: Slots { first: a, end: b },
        light_months,
        coarse_gaps,
        light_days,
        light_month: None,
        light_years: light_years_all,
        light_year: None,
    }))
}

/// Which tables lack the cells of light user months in this database (migrations 000029,
/// 000030 and 000031); none on a database not migrated that far (read before `migrate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LightLayout {
    /// Each user's latency histograms (000029).
    pub histograms: bool,
    /// Each user's month cells per model and outcome (000030).
    pub by_model: bool,
    /// Each user's day cells in the totals table (000031).
    pub days: bool,
    /// Each user's month cells in the totals table of light years (000032).
    pub years: bool,
    /// The dense users' day cells per model and outcome (000035).
    pub dense_model_days: bool,
}

pub(crate) async fn light_layout<C: ConnectionTrait>(db: &C) -> Result<LightLayout, DbErr> {
    if !table_exists(db, FULL_MONTH_TABLE).await? {
        return Ok(LightLayout::default());
    }
    // (The full months' table exists only where our migrations ran, which record themselves.)
    let versions: Vec<String> = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT version FROM seaql_migrations WHERE version IN \
             ('m20261210_000030_rollup_full_months_by_model', 'm20261211_000031_rollup_light_days', \
             'm20261212_000032_rollup_light_years', 'm20261215_000035_rollup_dense_model_days')",
        ))
        .await?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<_, _>>()?;
    let has = |v: &str| versions.iter().any(|x| x == v);
    Ok(LightLayout {
        histograms: true,
        by_model: has("m20261210_000030_rollup_full_months_by_model"),
        days: has("m20261211_000031_rollup_light_days"),
        years: has("m20261212_000032_rollup_light_years"),
        dense_model_days: has("m20261215_000035_rollup_dense_model_days"),
    })
}

/// The full months of `user` (a rollup key) starting in the slots `[a, b)`
/// ([`FULL_MONTH_TABLE`], which must exist): one primary-key range.
pub(crate) async fn full_months_of<C: ConnectionTrait>(
    db: &C,
    user: i64,
    a: i64,
    b: i64,
) -> Result<std::collections::HashSet<i64>, DbErr> {
    full_periods_of(db, FULL_MONTH_TABLE, user, a, b).await
}

/// The slots of `user`'s lines in `table` (the full months' or years') in `[a, b)`.
async fn full_periods_of<C: ConnectionTrait>(
    db: &C,
    table: &str,
    user: i64,
    a: i64,
    b: i64,
) -> Result<std::collections::HashSet<i64>, DbErr> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        format!("SELECT slot FROM {table} WHERE user_key = {user} AND slot >= {a} AND slot < {b}"),
    ))
    .await?
    .iter()
    .map(|r| r.try_get_by_index::<i64>(0))
    .collect()
}

/// The months of `user` (a rollup key) starting in the slots `[a, b)` that are light
/// (not in [`FULL_MONTH_TABLE`]), sorted. Only where that table exists ([`light_layout`]).
pub(crate) async fn light_months<C: ConnectionTrait>(
    db: &C,
    user: i64,
    a: i64,
    b: i64,
) -> Result<Vec<i64>, DbErr> {
    light_periods(db, Calendar::Month, user, a, b).await
}

/// The years of `user` (a rollup key) that hold a slot of `[a, b)` and are light (not in
/// [`FULL_YEAR_TABLE`], which must exist: migration 000032), sorted.
pub(crate) async fn light_years<C: ConnectionTrait>(
    db: &C,
    user: i64,
    a: i64,
    b: i64,
) -> Result<Vec<i64>, DbErr> {
    light_periods(db, Calendar::Year, user, a, b).await
}

/// The months or years (`calendar`) of `user` from the one holding slot `a` to `b` that its
/// table of full ones does not list, sorted: one primary-key range.
async fn light_periods<C: ConnectionTrait>(
    db: &C,
    calendar: Calendar,
    user: i64,
    a: i64,
    b: i64,
) -> Result<Vec<i64>, DbErr> {
    let Some((first, _)) = calendar_cell(calendar, a) else {
        return Ok(Vec::new());
    };
    if first >= b {
        return Ok(Vec::new());
    }
    let table = match calendar {
        Calendar::Month => FULL_MONTH_TABLE,
        Calendar::Year => FULL_YEAR_TABLE,
    };
    let full = full_periods_of(db, table, user, first, b).await?;
    let mut out = Vec::new();
    let mut p = first;
    while p < b {
        if !full.contains(&p) {
            out.push(p);
        }
        let Some((_, next)) = calendar_cell(calendar, p) else {
            break;
        };
        p = next;
    }
    Ok(out)
}

/// The whole UTC days `[a, b)` of a per-user plan widened by a day at each end where the range
/// covers more than half of that day, with the filters of the day's rows outside the range
/// (see [`Plan::minus`]); never over days before the retention horizon, whose cells keep rows
/// retention deleted (there the rows left are counted, as for any partial day).
async fn complement_ends<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    a: i64,
    b: i64,
) -> Result<(i64, i64, Vec<UsageFilter>), DbErr> {
    let micro = Duration::microseconds(1);
    let half = Duration::seconds(DAY * SLOT_SECONDS / 2);
    let (Some(a_at), Some(b_at)) = (slot_start(a), slot_start(b)) else {
        return Ok((a, b, Vec::new()));
    };
    // The range's first and last instants where they cut a day, more than half of it inside.
    let start = filter
        .start
        .filter(|&s| a_at - s > half)
        .and_then(|s| s.checked_sub_signed(micro));
    let end = filter
        .end
        .and_then(|e| e.checked_add_signed(micro))
        .filter(|&after| after - b_at > half);
    if start.is_none() && end.is_none() {
        return Ok((a, b, Vec::new()));
    }
    let horizon = crate::retention::horizon_slot(db).await?;
    let after_horizon = |day: i64| horizon.is_none_or(|h| day >= h);
    let (mut a, mut b, mut minus) = (a, b, Vec::new());
    if let Some(before) = start
        && after_horizon(a - DAY)
        && let Some(day) = slot_start(a - DAY)
    {
        a -= DAY;
        minus.push(UsageFilter {
            start: Some(day),
            end: Some(before),
            ..filter.clone()
        });
    }
    if let Some(after) = end
        && after_horizon(b)
        && let Some(next) = slot_start(b + DAY).and_then(|n| n.checked_sub_signed(micro))
    {
        b += DAY;
        minus.push(UsageFilter {
            start: Some(after),
            end: Some(next),
            ..filter.clone()
        });
    }
    Ok((a, b, minus))
}

/// Whole UTC days `[a, b)` in a user's cells of `level` (in the totals table days, months and
/// years; per model months), coarsest first, each inside one bucket of the series; the days
/// that no cell covers or that fit no bucket are returned as gaps (merged runs of slots).
///
/// With `moves_from`, a day from that slot on that holds one boundary of the series' buckets is
/// not a gap but [`Moved`]. With `hours` (a dense user's window, [`dense_since`]), a day inside
/// it whose UTC hours each fit one bucket reads those hours' cells instead of either.
fn user_cells(
    a: i64,
    b: i64,
    series: Option<(Granularity, Tz)>,
    level: Level,
    moves_from: Option<i64>,
    dense: Dense,
    light: Light<'_>,
) -> (Vec<Run>, Vec<Slots>, Vec<Moved>) {
    let Light {
        months: light,
        years: light_years,
    } = light;
    let Dense { hours, model_days } = dense;
    let fits = |p: i64, end: i64| fits(series, p, end);
    let (fixed, calendars) = per_user(level);
    let days = fixed.contains(&DAY);
    let mut runs: Vec<Run> = Vec::new();
    let mut gaps: Vec<Slots> = Vec::new();
    let mut moved: Vec<Moved> = Vec::new();
    // A dense user's days from `hours_from` on whose UTC hours do not fit the buckets but whose
    // :30 hours do (India's hours and days): a span of such days reads its :30 hour cells, and
    // the rows of its first and last half hour (the cells there reach outside the span).
    let [utc_hour, phased_hour] = DENSE_GRAINS;
    let add_gap = |gaps: &mut Vec<Slots>, first: i64, end: i64| match gaps.last_mut() {
        Some(gap) if gap.end == first => gap.end = end,
        _ => gaps.push(Slots { first, end }),
    };
    let mut span: Option<i64> = None;
    let end_span = |s: i64, e: i64, runs: &mut Vec<Run>, gaps: &mut Vec<Slots>| {
        let (first, end) = (
            s + phased_hour.phase,
            e - (utc_hour.len - phased_hour.phase),
        );
        add_gap(gaps, s, first);
        runs.push(Run::new(phased_hour.code, first, end));
        add_gap(gaps, end, e);
    };
    // Over all models a light month keeps its month and year cells but no day cells (migration
    // 000031): its days are read as per model outside whole months (see below).
    let light_day = |p: i64| {
        level == Level::Total
            && !light.is_empty()
            && calendar_cell(Calendar::Month, p)
                .is_some_and(|(m0, _)| light.binary_search(&m0).is_ok())
    };
    let mut p = a;
    while p < b {
        let dense = level == Level::Total
            && series.is_some()
            && hours.is_some_and(|w| w.holds(p, p + DAY))
            && !fits(p, p + DAY);
        // Every cell of grain `g` that holds a slot of the day fits one bucket (asked once per
        // day and grain: each asks up to 25 cells).
        let hours_fit = |g: Grain| {
            let first = p - (g.len - g.phase) % g.len;
            let cells = DAY / g.len + i64::from(g.phase != 0);
            (0..cells).all(|k| fits(first + k * g.len, first + (k + 1) * g.len))
        };
        let utc_hours_fit = dense && hours_fit(utc_hour);
        if dense && !utc_hours_fit && hours_fit(phased_hour) {
            span.get_or_insert(p);
            p += DAY;
            continue;
        }
        if let Some(s) = span.take() {
            end_span(s, p, &mut runs, &mut gaps);
        }
        // Sums without buckets, over a month the range covers in part: the month's cell less
        // the month's days outside the range, when that is fewer cells than the days inside (a
        // rolling 30 days: one month cell and the few days after today, which have no cells
        // yet, instead of up to 30 day cells per user). Exact: a fold adds a row to its day
        // and its month cell in one transaction, so the two differ by nothing outside.
        if series.is_none()
            && days
            && calendars.contains(&Calendar::Month)
            && let Some((m0, m1)) = calendar_cell(Calendar::Month, p)
            && (m0 < p || m1 > b)
            && !light_day(p)
        {
            let inside_end = m1.min(b);
            let inside = (inside_end - p) / DAY;
            let outside = (p - m0 + m1 - inside_end) / DAY;
            if 1 + outside < inside {
                runs.push(Run::new(Calendar::Month.code(), m0, m1));
                for (first, end) in [(m0, p), (inside_end, m1)] {
                    if first < end {
                        runs.push(Run {
                            subtract: true,
                            ..Run::new(DAY, first, end)
                        });
                    }
                }
                p = inside_end;
                continue;
            }
        }
        let calendar = calendars.iter().rev().find_map(|c| {
            let (first, next) = calendar_cell(*c, p)?;
            // (Per model a light month has no cell: its days are read as those outside whole
            // months are.)
            // (Over all models a light year has no month cells: its months are read as a light
            // month's days, migration 000032.)
            let has_cell = *c != Calendar::Month
                || match level {
                    Level::ByModel => light.binary_search(&first).is_err(),
                    Level::Total => calendar_cell(Calendar::Year, first)
                        .is_none_or(|(y0, _)| light_years.binary_search(&y0).is_err()),
                };
            (first == p && next <= b && fits(p, next) && has_cell).then_some((c.code(), next))
        });
        let (code, next) = match calendar {
            Some(found) => found,
            None if days && fits(p, p + DAY) && !light_day(p) => (DAY, p + DAY),
            None if utc_hours_fit => (utc_hour.code, p + DAY),
            None if let (true, Some(from), Some(series)) = (days, moves_from, series)
                && p >= from
                && !light_day(p)
                && let Some(m) = split_day(p, series) =>
            {
                moved.push(m);
                p += DAY;
                continue;
            }
            // Per model a dense user's days in the window have cells of their own (000035).
            None if level == Level::ByModel
                && model_days.is_some_and(|w| w.holds(p, p + DAY))
                && fits(p, p + DAY) =>
            {
                (DENSE_MODEL_DAY.code, p + DAY)
            }
            None => {
                // Per model a user's days outside whole months are counted from the rows, and
                // from the day cells that keep what retention deleted (none after its horizon);
                // so are a light month's days over all models.
                if (level == Level::ByModel || light_day(p)) && fits(p, p + DAY) {
                    match runs.last_mut() {
                        Some(run) if run.grain == DAY && run.end == p && !run.subtract => {
                            run.end = p + DAY
                        }
                        _ => runs.push(Run::new(DAY, p, p + DAY)),
                    }
                }
                match gaps.last_mut() {
                    Some(gap) if gap.end == p => gap.end = p + DAY,
                    _ => gaps.push(Slots {
                        first: p,
                        end: p + DAY,
                    }),
                }
                p += DAY;
                continue;
            }
        };
        match runs.last_mut() {
            Some(run) if run.grain == code && run.end == p && !run.subtract => run.end = next,
            _ => runs.push(Run::new(code, p, next)),
        }
        p = next;
    }
    if let Some(s) = span {
        end_span(s, p, &mut runs, &mut gaps);
    }
    (runs, gaps, moved)
}

/// The windows in which one dense user's plan ([`user_cells`]) may read the user's hour cells
/// (a series over all models) and day cells per model (sums per model, migration 000035).
#[derive(Clone, Copy, Default)]
struct Dense {
    hours: Option<HourWindow>,
    model_days: Option<HourWindow>,
}

/// The light months and years of one user's plan ([`user_cells`]): month starts whose cells
/// the level's table lacks (migrations 000030, 000031), and year starts whose month cells the
/// totals table lacks (migration 000032). Every month of a light year is a light month.
#[derive(Clone, Copy, Default)]
struct Light<'a> {
    months: &'a [i64],
    years: &'a [i64],
}

/// The day `[p, p + DAY)` as [`Moved`], when it holds exactly one boundary of the series'
/// buckets and that boundary is a slot's start.
fn split_day(p: i64, (gran, tz): (Granularity, Tz)) -> Option<Moved> {
    let (d0, d1) = (slot_start(p)?, slot_start(p + DAY)?);
    let tick = Duration::microseconds(1);
    let c = bucket_start(gran, tz, d1 - tick);
    if c <= d0
        || bucket_start(gran, tz, c - tick) != bucket_start(gran, tz, d0)
        || c.timestamp_subsec_micros() != 0
        || c.timestamp().rem_euclid(SLOT_SECONDS) != 0
    {
        return None;
    }
    let at = c.timestamp().div_euclid(SLOT_SECONDS);
    Some(if at - p <= p + DAY - at {
        // The part before the boundary is the shorter: the cell counts after it.
        Moved {
            day: p,
            key: at,
            window: Slots { first: p, end: at },
        }
    } else {
        Moved {
            day: p,
            key: p,
            window: Slots {
                first: at,
                end: p + DAY,
            },
        }
    })
}

/// `runs` cut where the bucket of the series changes: each run's cells in one bucket.
/// Each with the start of its first slot's bucket ([`bucket_of_slot`]), which [`per_bucket`]
/// keys by: asked once per cell here, not again there.
fn split_per_bucket(runs: &[Run], gran: Granularity, tz: Tz) -> Vec<(Run, Option<i64>)> {
    // The start computed once per bucket: consecutive cells of one bucket share its key
    // ([`bucket_key`], one offset lookup), and only a new key asks for its start.
    let mut last: Option<(i64, Option<i64>)> = None;
    let mut bucket = |slot: i64| {
        let seconds = slot
            .checked_mul(SLOT_SECONDS)
            .filter(|&s| in_chrono_range(s))?;
        let key = bucket_key(gran, tz, seconds);
        match last {
            Some((k, start)) if k == key => start,
            _ => {
                let start = bucket_of_slot(slot, gran, tz);
                last = Some((key, start));
                start
            }
        }
    };
    let mut out: Vec<(Run, Option<i64>)> = Vec::new();
    for run in runs {
        // Calendar cells (a user's months and years) are one cell each: as they are.
        let Some(len) = grain(run.grain).map(|g| g.len).filter(|_| !run.subtract) else {
            out.push((*run, bucket(run.first)));
            continue;
        };
        let mut first = run.first;
        let mut current = bucket(first);
        let mut p = run.first + len;
        while p < run.end {
            let b = bucket(p);
            if b != current {
                out.push((
                    Run {
                        first,
                        end: p,
                        ..*run
                    },
                    current,
                ));
                first = p;
                current = b;
            }
            p += len;
        }
        out.push((Run { first, ..*run }, current));
    }
    out
}

/// The start (epoch seconds) of the series bucket holding `slot`'s first instant; `None` past
/// chrono's range. Seconds, not a `DateTime`: an hourly year's plan asks ~35,000 times.
fn bucket_of_slot(slot: i64, gran: Granularity, tz: Tz) -> Option<i64> {
    let seconds = slot
        .checked_mul(SLOT_SECONDS)
        .filter(|&s| in_chrono_range(s))?;
    Some(bucket_start_seconds(gran, tz, seconds))
}

/// The fixed grain of a code (not the calendar grains, a user's months and years).
fn grain(code: i64) -> Option<Grain> {
    GRAINS
        .iter()
        .chain([&DENSE_MODEL_DAY])
        .copied()
        .find(|g| g.code == code)
}

/// How many cells `runs` read (a calendar run counts one per month or year it spans, at least).
fn size(runs: &[Run]) -> i64 {
    runs.iter()
        .map(|r| match grain(r.grain) {
            Some(g) => (r.end - r.first) / g.len,
            None => ((r.end - r.first) / (28 * DAY)).max(1),
        })
        .sum()
}

/// `split` (runs each inside one bucket, in slot order) keyed by bucket. Over all users, a
/// bucket whose slots `[s, e)` are not whole UTC days reads the UTC days around it less their
/// slots outside it, when that is fewer cells: exact, since a fold adds a row to its day and its
/// hour and quarter-hour cells in one transaction, so the day's cell less its other hours holds
/// exactly the bucket's part of that day (the pending contributions are added per slot, as
/// before). A user's cells are days at the finest: as split.
fn per_bucket(split: &[(Run, Option<i64>)], scope: Scope) -> Vec<BucketRun> {
    let runs: Vec<Run> = split.iter().map(|(run, _)| *run).collect();
    let mut out = Vec::with_capacity(split.len());
    let mut i = 0;
    while i < split.len() {
        let current = split[i].1;
        let mut j = i + 1;
        while j < split.len()
            && split[j].0.first == split[j - 1].0.end
            && !split[j].0.subtract
            && split[j].1 == current
        {
            j += 1;
        }
        let group = &runs[i..j];
        let (s, e) = (group[0].first, group[group.len() - 1].end);
        // (A bucket under half a day never reads fewer cells so.)
        let around =
            (scope == Scope::AllUsers && e - s >= DAY / 2 && !group.iter().any(|r| r.subtract))
                .then(|| around_days(s, e))
                .flatten()
                .filter(|runs| size(runs) < size(group));
        let key = s;
        out.extend(
            around
                .as_deref()
                .unwrap_or(group)
                .iter()
                .map(|&run| BucketRun { key, run }),
        );
        i = j;
    }
    out
}

/// The slots `[s, e)` as a run of whole UTC days `[d0, d1)` (each end the UTC midnight before
/// or after the bucket's) with the slots between the days' ends and the bucket's in their
/// coarsest cells, taken away where the days reach past the bucket, added where they fall
/// short; the choice with the fewest cells, or `None` when `[s, e)` is whole days already.
fn around_days(s: i64, e: i64) -> Option<Vec<Run>> {
    let floor = |x: i64| x.div_euclid(DAY) * DAY;
    let ceil = |x: i64| floor(x) + if x.rem_euclid(DAY) == 0 { 0 } else { DAY };
    let mut best: Option<Vec<Run>> = None;
    for d0 in [floor(s), ceil(s)] {
        for d1 in [floor(e), ceil(e)] {
            if d0 >= d1 || (d0, d1) == (s, e) {
                continue;
            }
            let mut runs = vec![Run::new(DAY, d0, d1)];
            for (first, end, subtract) in
                [(d0, s, true), (e, d1, true), (s, d0, false), (d1, e, false)]
            {
                if first < end {
                    runs.extend(
                        cells(first, end, None)?
                            .into_iter()
                            .map(|r| Run { subtract, ..r }),
                    );
                }
            }
            if best.as_ref().is_none_or(|b| size(&runs) < size(b)) {
                best = Some(runs);
            }
        }
    }
    best
}

/// Slots `[a, b)` as merged runs of cells, coarsest first, each cell inside one bucket of the
/// series; `None` when a single slot straddles two buckets.
/// Whether the slots `[first, end)` lie inside one bucket of the series (always, without one).
fn fits(series: Option<(Granularity, Tz)>, first: i64, end: i64) -> bool {
    match series {
        None => true,
        // The last instant of slot `end - 1` is in the bucket of its last second: buckets
        // start at whole seconds.
        Some((gran, tz)) => match (
            first.checked_mul(SLOT_SECONDS),
            end.checked_mul(SLOT_SECONDS),
        ) {
            (Some(s), Some(e)) => bucket_key(gran, tz, s) == bucket_key(gran, tz, e - 1),
            _ => false,
        },
    }
}

fn cells(a: i64, b: i64, series: Option<(Granularity, Tz)>) -> Option<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    match series {
        None => greedy(a, b, Limit::NONE, &mut runs),
        // In UTC a bucket is a UTC hour, day or month: the coarsest cells up to that grain.
        Some((gran, Tz::UTC)) => greedy(a, b, Limit::utc(gran), &mut runs),
        Some((Granularity::Day, _)) => return cells_by_fits(a, b, series),
        // Daily and monthly buckets elsewhere, bucket by bucket: each bucket's slots in their
        // coarsest cells. (Asking whether each candidate cell fits its bucket took two
        // time-zone conversions per cell: 58 % of the server's time for a daily year in New
        // York.)
        Some((gran, tz)) => {
            let bucket = |slot: i64| slot_start(slot).map(|t| bucket_start(gran, tz, t));
            // The bucket of the last instant of slot `q - 1`.
            let before = |q: i64| {
                slot_start(q).map(|t| bucket_start(gran, tz, t - Duration::microseconds(1)))
            };
            let mut p = a;
            while p < b {
                let current = bucket(p)?;
                // The bucket's slots from `p`: up to the next hour, day or month where the
                // slots around it say so, otherwise slot by slot (where a half-hour change of
                // offset shortens, stretches or overlaps an hour).
                let guess = next_bucket_guess(gran, tz, current)
                    .filter(|n| n.timestamp_subsec_micros() == 0)
                    .filter(|n| n.timestamp().rem_euclid(SLOT_SECONDS) == 0)
                    .map(|n| n.timestamp().div_euclid(SLOT_SECONDS))
                    .filter(|&q| q > p && before(q) == Some(current) && bucket(q) != Some(current));
                let end = match guess {
                    Some(q) => q.min(b),
                    None => {
                        let mut q = p + 1;
                        while q < b && bucket(q) == Some(current) {
                            q += 1;
                        }
                        q
                    }
                };
                // A bucket boundary inside a slot: no cell fits (a zone whose offset is not a
                // whole number of quarter hours).
                if before(end) != Some(current) {
                    return None;
                }
                greedy(p, end, Limit::SERIES, &mut runs);
                p = end;
            }
        }
    }
    Some(runs)
}

/// Which cells [`greedy`] may take.
#[derive(Debug, Clone, Copy)]
struct Limit {
    months: bool,
    days: bool,
    /// Consecutive months in one run (not under a series: there each month is its own run,
    /// keyed to one bucket).
    merge_months: bool,
}

impl Limit {
    const NONE: Self = Self {
        months: true,
        days: true,
        merge_months: true,
    };
    const SERIES: Self = Self {
        months: true,
        days: true,
        merge_months: false,
    };

    /// The cells inside one UTC bucket of `gran`.
    fn utc(gran: Granularity) -> Self {
        Self {
            months: gran == Granularity::Year,
            days: gran != Granularity::Day,
            merge_months: false,
        }
    }
}

/// The slots `[a, b)` in their coarsest cells that `limit` allows, appended to `runs` (a cell
/// of the grain that ends the last run, right after it, extends it). The hours that start at
/// :15 or :30 are left to [`cells_by_fits`] (hourly series outside UTC).
fn greedy(a: i64, b: i64, limit: Limit, runs: &mut Vec<Run>) {
    let mut p = a;
    while p < b {
        // A whole UTC month inside the range: its cell (migration 000022).
        if limit.months
            && p.rem_euclid(DAY) == 0
            && let Some((m0, m1)) = calendar_cell(Calendar::Month, p)
            && m0 == p
            && m1 <= b
        {
            let code = Calendar::Month.code();
            match runs.last_mut() {
                Some(run) if limit.merge_months && run.grain == code && run.end == p => {
                    run.end = m1
                }
                _ => runs.push(Run::new(code, p, m1)),
            }
            p = m1;
            continue;
        }
        let candidates = [grain(96).filter(|_| limit.days), grain(4), grain(1)];
        // (A slot always fits: grain 1.)
        let Some(g) = candidates
            .into_iter()
            .flatten()
            .find(|g| p.rem_euclid(g.len) == g.phase && p + g.len <= b)
        else {
            break;
        };
        match runs.last_mut() {
            Some(run) if run.grain == g.code && run.end == p => run.end = p + g.len,
            _ => runs.push(Run::new(g.code, p, p + g.len)),
        }
        p += g.len;
    }
}

/// [`cells`] cell by cell, each candidate asked whether it fits its bucket (two time-zone
/// conversions a cell): for hourly series outside UTC, whose buckets hold four cells at most
/// (the walk bucket by bucket would cost more there), and the reference the walk is checked
/// against.
fn cells_by_fits(a: i64, b: i64, series: Option<(Granularity, Tz)>) -> Option<Vec<Run>> {
    let fits = |p: i64, g: i64| fits(series, p, p + g);
    // Hours that start at :15 or :30 past a UTC hour serve hourly series in zones with such
    // offsets (there, no UTC hour or day fits a bucket). Elsewhere they would lead the greedy
    // choice away from UTC days, so only hourly series use them.
    let hourly = matches!(series, Some((Granularity::Day, _)));
    let mut runs: Vec<Run> = Vec::new();
    let mut p = a;
    while p < b {
        // A whole UTC month inside the range (and the series' bucket): its cell (migration
        // 000022). Under a series each month stays its own run (a run is keyed to one bucket).
        // (Months start at UTC midnights: no calendar asked at the other 95 slots of a day.)
        if p.rem_euclid(DAY) == 0
            && let Some((m0, m1)) = calendar_cell(Calendar::Month, p)
            && m0 == p
            && m1 <= b
            && fits(p, m1 - p)
        {
            let code = Calendar::Month.code();
            match runs.last_mut() {
                Some(run) if series.is_none() && run.grain == code && run.end == p => run.end = m1,
                _ => runs.push(Run::new(code, p, m1)),
            }
            p = m1;
            continue;
        }
        let candidates = [
            grain(96),
            grain(4),
            hour_grain(p).filter(|g| hourly && g.phase != 0),
            grain(1),
        ];
        let g = candidates
            .into_iter()
            .flatten()
            .find(|g| p.rem_euclid(g.len) == g.phase && p + g.len <= b && fits(p, g.len))?;
        match runs.last_mut() {
            Some(run) if run.grain == g.code && run.end == p => run.end = p + g.len,
            _ => runs.push(Run::new(g.code, p, p + g.len)),
        }
        p += g.len;
    }
    Some(runs)
}

/// What a rollup query groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One group per model (the columns of the raw groups, `bucket` null).
    Model,
    /// One group per cell start slot (`model` null, `bucket` the slot as text).
    Slot,
    /// One group per cell start slot and model (the series of each model), from the per-model
    /// cells; only for plans of all users' cells (a user's calendar cells exist in the totals
    /// table alone), see [`Scope`].
    SlotModel,
    /// One group per user key (`user_key`).
    User,
    /// A single group.
    Nothing,
}

/// The statement summing the plan's cells that `filter` selects, grouped by `by`, with the
/// column names of the raw aggregate (`total_calls`, `successful_calls`, …).
pub fn statement(backend: DbBackend, plan: &Plan, filter: &UsageFilter, by: GroupBy) -> Statement {
    statement_with(backend, plan, filter, by, Sums::All, None)
}

/// Which sums a statement computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sums {
    /// Every column of the raw aggregate.
    All,
    /// `total_calls` and `total_tokens` only: what ranks users for `by_user` (ranking 10,000
    /// users on two sums instead of eleven halves the statement). Grouped by user, the cells
    /// come one line each, not summed: the reader sums them (see `build`). The columns are
    /// `user_key`, `total_calls`, `total_tokens`, in this order (read by position).
    Rank,
    /// The token sums, cost and `successful_calls`: what a series bucket shows (no latency,
    /// time to first token or unpriced calls, which only the summary and `by_model` show). An
    /// hourly year reads 8,760 cells: 9 columns each instead of 14.
    Series,
}

/// [`statement`] with a choice of sums and, optionally, only the cells of the user keys
/// `users` (integers, written into the SQL).
pub fn statement_with(
    backend: DbBackend,
    plan: &Plan,
    filter: &UsageFilter,
    by: GroupBy,
    sums: Sums,
    users: Option<&[i64]>,
) -> Statement {
    build(backend, plan, filter, by, sums, users, None)
}

/// The series of all models: [`GroupBy::Slot`] with the sums a bucket shows
/// ([`Sums::Series`]); what token-stats runs and `plans` explains.
pub fn series_statement(backend: DbBackend, plan: &Plan, filter: &UsageFilter) -> Statement {
    build(
        backend,
        plan,
        filter,
        GroupBy::Slot,
        Sums::Series,
        None,
        None,
    )
}

/// The series of each model: [`GroupBy::SlotModel`], over the cells of `models` only (exact
/// names) when given.
pub fn models_statement(
    backend: DbBackend,
    plan: &Plan,
    filter: &UsageFilter,
    models: Option<&[String]>,
) -> Statement {
    build(
        backend,
        plan,
        filter,
        GroupBy::SlotModel,
        Sums::Series,
        None,
        models,
    )
}

/// Runs named by their own first slot.
fn unkeyed(runs: &[Run]) -> Vec<BucketRun> {
    runs.iter()
        .map(|&run| BucketRun {
            key: run.first,
            run,
        })
        .collect()
}

fn build(
    backend: DbBackend,
    plan: &Plan,
    filter: &UsageFilter,
    by: GroupBy,
    sums: Sums,
    users: Option<&[i64]>,
    models: Option<&[String]>,
) -> Statement {
    // Over all models and outcomes, the totals table has one row per cell.
    let level = level_of(filter, by);
    // Each run with the slot that names its group: the per-model series groups by bucket, and
    // so does the series of all models where a bucket reads UTC days less their hours outside
    // it (`Plan::per_bucket`); otherwise the series reads its cells one by one.
    let keyed = by == GroupBy::SlotModel
        || (by == GroupBy::Slot
            && (plan.per_bucket.iter().any(|b| b.run.subtract) || !plan.moved.is_empty()));
    let ranges: Vec<BucketRun> = match (by, level) {
        (GroupBy::SlotModel, _) => plan.per_bucket.clone(),
        (GroupBy::Slot, _) if keyed => plan.per_bucket.clone(),
        (GroupBy::Slot, _) => unkeyed(&plan.ranges),
        (_, Level::Total) => unkeyed(&plan.coarse),
        (_, Level::ByModel) => unkeyed(&plan.totals),
    };
    let table = level.table();
    // Per user, without a user filter: the primary key is (grain, user_key, slot, …), so a slot
    // range is an index range only for one user key at a time. Every user with a row has a
    // year cell in the totals table (a few per user), so those name every user key to visit.
    // Over the totals table, the index on (grain, slot, user_key) serves every user's cells of
    // a range at once (migration 000011).
    // A few chosen users: one primary-key range per user and run.
    let listed = users.filter(|k| !k.is_empty() && by == GroupBy::User && filter.user_id.is_none());
    let all_keys = by == GroupBy::User
        && filter.user_id.is_none()
        && level == Level::Total
        && listed.is_none();
    let join_users = match (by, filter.user_id) {
        (GroupBy::User, None) if listed.is_some() => {
            let rows: Vec<String> = listed
                .unwrap_or_default()
                .iter()
                .map(|k| format!("({k})"))
                .collect();
            // `column1`: the name both databases give a VALUES list's column.
            format!(
                "(SELECT column1 AS k FROM (VALUES {}) l) u CROSS JOIN ",
                rows.join(", ")
            )
        }
        (GroupBy::User, None) if all_keys => String::new(),
        (GroupBy::User, None) => format!(
            "(SELECT DISTINCT user_key AS k FROM {TOTALS_TABLE} WHERE grain = {}) u CROSS JOIN ",
            Calendar::Year.code()
        ),
        _ => String::new(),
    };
    // Runs that subtract carry a sign (-1) that multiplies their cells; without one the
    // statement stays as it was (no sign column).
    let signed = ranges.iter().any(|r| r.run.subtract);
    let value = |BucketRun { key, run }: BucketRun| {
        let sign = match (signed, run.subtract) {
            (false, _) => "",
            (true, false) => ", 1",
            (true, true) => ", -1",
        };
        let key = if keyed {
            format!(", {key}")
        } else {
            String::new()
        };
        format!("({}, {}, {}{sign}{key})", run.grain, run.first, run.end)
    };
    let mut values: Vec<String> = ranges.iter().copied().map(value).collect();
    if values.is_empty() {
        // No whole cell (a user's series whose days all straddle buckets): an empty run.
        values.push(value(BucketRun {
            key: 0,
            run: Run::new(0, 0, 0),
        }));
    }
    let mut params: Vec<Value> = Vec::new();
    let mut placeholder = |v: Value| {
        params.push(v);
        crate::db::Dialect::of(backend).placeholder(params.len())
    };
    // In the join, so that it bounds the index range (with the grain and the slots).
    let user_on = match (by, filter.user_id) {
        (_, Some(user)) => format!("r.user_key = {user}"),
        (GroupBy::User, None) if all_keys => format!("r.user_key <> {ALL_USERS}"),
        (GroupBy::User, None) => "r.user_key = u.k".to_owned(),
        (_, None) => format!("r.user_key = {ALL_USERS}"),
    };
    // The model and outcome filters (on the cells, then again on the pending contributions).
    let mut narrow = |conditions: &mut Vec<String>| {
        if let Some(model) = &filter.model {
            let pattern = format!("%{}%", escape_like(&model.to_lowercase()));
            conditions.push(format!(
                "lower(r.model) LIKE {} ESCAPE '\\'",
                placeholder(pattern.into())
            ));
        }
        if let Some(success) = filter.success {
            conditions.push(format!("r.success = {}", placeholder(success.into())));
        }
        if let Some(models) = models {
            let list: Vec<String> = models
                .iter()
                .map(|m| placeholder(m.clone().into()))
                .collect();
            conditions.push(if list.is_empty() {
                "1 = 0".to_owned()
            } else {
                format!("r.model IN ({})", list.join(", "))
            });
        }
    };
    let only_users = users.map(|keys| {
        let list: Vec<String> = keys.iter().map(i64::to_string).collect();
        if list.is_empty() {
            "1 = 0".to_owned()
        } else {
            format!("r.user_key IN ({})", list.join(", "))
        }
    });
    let mut conditions = vec!["1 = 1".to_owned()];
    if let Some(year) = plan.light_year {
        conditions.push(format!(
            "r.user_key < {ALL_USERS} AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y \
             WHERE y.user_key = r.user_key AND y.slot = {year})"
        ));
    }
    // (The listed users' join already holds the cells to them.)
    if listed.is_none() {
        conditions.extend(only_users.clone());
    }
    narrow(&mut conditions);
    // Per slot over the totals table, each cell is one row (cells do not overlap): read as is,
    // no aggregation (which costs more than the reading, measured: 10 ms for 2,000 cells).
    // The ranking of users is summed by its reader, which merges the pending contributions and
    // the edges anyway: PostgreSQL's hash aggregate of 20,000 cells into 10,000 users took
    // 15 of the ranking statement's 20 ms.
    let one_row_per_group = (by == GroupBy::Slot && level == Level::Total && !keyed)
        || (by == GroupBy::User && sums == Sums::Rank);
    let aggregate = |expr: &str| format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)");
    let sum = |expr: &str| {
        let expr = if signed {
            format!("v.s * ({expr})")
        } else {
            expr.to_owned()
        };
        if one_row_per_group {
            format!("CAST({expr} AS BIGINT)")
        } else {
            aggregate(&expr)
        }
    };
    use super::sums::col;
    let (key, group) = match by {
        GroupBy::Model => (
            format!(
                "r.model AS {}, CAST(NULL AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            " GROUP BY r.model",
        ),
        GroupBy::Slot => (
            format!(
                "CAST(NULL AS TEXT) AS {}, CAST(r.slot AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            " GROUP BY r.slot",
        ),
        GroupBy::SlotModel => (
            format!(
                "r.model AS {}, CAST(r.slot AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            " GROUP BY r.slot, r.model",
        ),
        GroupBy::User => (
            format!("r.user_key AS {}", col::USER_KEY),
            " GROUP BY r.user_key",
        ),
        GroupBy::Nothing => (
            format!(
                "CAST(NULL AS TEXT) AS {}, CAST(NULL AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            "",
        ),
    };
    // The cells' column behind each of the sums.
    let cell = |s: Sum| match s {
        Sum::Calls => "r.calls",
        Sum::Prompt => "r.prompt_tokens",
        Sum::Completion => "r.completion_tokens",
        Sum::Total => "r.total_tokens",
        Sum::Cached => "r.cached_tokens",
        Sum::Reasoning => "r.reasoning_tokens",
        Sum::CostMicros => "r.cost_micros",
    };
    let columns = |sum: &dyn Fn(&str) -> String, ok: &str| {
        match sums {
            Sums::Rank => {
                return [Sum::Calls, Sum::Total]
                    .map(|s| format!("{} AS {}", sum(cell(s)), TokenSums::alias(s)))
                    .join(", ");
            }
            Sums::Series => {
                return format!(
                    "{}, {} AS {}",
                    TokenSums::select(|s| sum(cell(s))),
                    sum(ok),
                    col::SUCCESSFUL
                );
            }
            Sums::All => {}
        }
        format!(
            "{sums}, {ok} AS {}, {unpriced} AS {}, {lat} AS {}, {latn} AS {}, {ttft} AS {}, {ttftn} AS {}",
            col::SUCCESSFUL,
            col::UNPRICED,
            col::LATENCY_US,
            col::LATENCY_N,
            col::TTFT_US,
            col::TTFT_N,
            sums = TokenSums::select(|s| sum(cell(s))),
            ok = sum(ok),
            unpriced = sum("r.calls - r.priced_calls"),
            lat = sum("r.latency_us"),
            latn = sum("r.latency_calls"),
            ttft = sum("r.ttft_us"),
            ttftn = sum("r.ttft_calls"),
        )
    };
    // The per-model series: one group per bucket (see `Plan::per_bucket`) and model, named by
    // a slot of the bucket; the series of all models, keyed, one group per bucket.
    let (cells_key, cells_group) = match by {
        GroupBy::SlotModel => (
            format!(
                "r.model AS {}, CAST(v.k AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            " GROUP BY v.k, r.model",
        ),
        GroupBy::Slot if keyed => (
            format!(
                "CAST(NULL AS TEXT) AS {}, CAST(v.k AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            " GROUP BY v.k",
        ),
        _ if one_row_per_group => (key.clone(), ""),
        _ => (key.clone(), group),
    };
    let cells = format!(
        "SELECT {cells_key}, {columns} \
         FROM {join_users}v JOIN {table} r ON r.grain = v.g AND {user_on} AND r.slot >= v.lo AND r.slot < v.hi \
         WHERE {conditions}{cells_group}",
        columns = columns(
            &sum,
            match level {
                Level::ByModel => "CASE WHEN r.success THEN r.calls ELSE 0 END",
                Level::Total => "r.successful_calls",
            }
        ),
        conditions = conditions.join(" AND "),
    );
    // The contributions not folded into the cells yet, in the plan's whole slots: each lies
    // in one slot, so in one cell of the plan, and groups like the cells.
    let Slots { first, end } = plan.slots;
    let mut pending = vec![format!("r.slot >= {first} AND r.slot < {end}")];
    // The series reads the gaps' raw rows, which hold their pending contributions already;
    // so do the sums over a user's days per model outside whole months.
    let raw_gaps = if matches!(by, GroupBy::Slot | GroupBy::SlotModel) {
        &plan.gaps
    } else if level == Level::ByModel {
        &plan.model_gaps
    } else {
        &plan.coarse_gaps
    };
    pending.extend(
        raw_gaps
            .iter()
            .map(|g| format!("NOT (r.slot >= {} AND r.slot < {})", g.first, g.end)),
    );
    // `by_user` per model: a light month's pending contributions are in its rows, which the
    // reader adds (`Plan::light_months`).
    let light_runs = match level {
        Level::ByModel => plan.light_month_runs(),
        Level::Total => Vec::new(),
    };
    if !light_runs.is_empty() {
        let inside: Vec<String> = light_runs
            .iter()
            .map(|r| format!("(r.slot >= {} AND r.slot < {})", r.first, r.end))
            .collect();
        pending.push(format!(
            "(NOT ({}) OR r.user_key >= {ALL_USERS} OR EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
             WHERE f.user_key = r.user_key AND f.slot = {}))",
            inside.join(" OR "),
            Calendar::Month.start_sql(backend, "r.slot")
        ));
    }
    if let Some(month) = plan.light_month {
        pending.push(format!(
            "r.user_key < {ALL_USERS} AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
             WHERE f.user_key = r.user_key AND f.slot = {month})"
        ));
    }
    if let Some(year) = plan.light_year {
        pending.push(format!(
            "r.user_key < {ALL_USERS} AND NOT EXISTS (SELECT 1 FROM {FULL_YEAR_TABLE} y \
             WHERE y.user_key = r.user_key AND y.slot = {year})"
        ));
    }
    if let Some(user) = filter.user_id {
        pending.push(format!("r.user_key = {user}"));
    }
    pending.extend(only_users);
    narrow(&mut pending);
    // The pending contributions of a moved day's window count where its cell does.
    let (key, delta, group) = if by == GroupBy::Slot && !plan.moved.is_empty() {
        let windows: Vec<String> = plan
            .moved
            .iter()
            .map(|m| format!("({}, {}, {})", m.window.first, m.window.end, m.key))
            .collect();
        (
            format!(
                "CAST(NULL AS TEXT) AS {}, CAST(COALESCE(m.k, r.slot) AS TEXT) AS {}",
                col::MODEL,
                col::BUCKET
            ),
            format!(
                "{DELTA_TABLE} r LEFT JOIN (SELECT column1 AS lo, column2 AS hi, column3 AS k \
                 FROM (VALUES {}) l) m ON r.slot >= m.lo AND r.slot < m.hi",
                windows.join(", ")
            ),
            " GROUP BY COALESCE(m.k, r.slot)",
        )
    } else {
        (key, format!("{DELTA_TABLE} r"), group)
    };
    let sql = format!(
        "WITH v (g, lo, hi{sign_column}{key_column}) AS (VALUES {values}) {cells} UNION ALL \
         SELECT {key}, {columns} FROM {delta} WHERE {pending}{group}",
        sign_column = if signed { ", s" } else { "" },
        key_column = if keyed { ", k" } else { "" },
        values = values.join(", "),
        columns = columns(&aggregate, "r.successful_calls"),
        pending = pending.join(" AND "),
    );
    Statement::from_sql_and_values(backend, sql, params)
}

/// The range of `filter` widened to whole UTC calendar months (an open end stays open): the
/// cover whose per-user cells bound every user's sums over the range (see [`UserBounds`]).
pub fn month_cover(filter: &UsageFilter) -> Option<UsageFilter> {
    let month = |at: DateTime<Utc>| calendar_cell(Calendar::Month, slot_of(at.naive_utc()));
    let start = match filter.start {
        None => None,
        Some(s) => Some(slot_start(month(s)?.0)?),
    };
    let end = match filter.end {
        None => None,
        Some(e) => Some(slot_start(month(e)?.1)? - Duration::microseconds(1)),
    };
    Some(UsageFilter {
        start,
        end,
        ..filter.clone()
    })
}

/// How many cells of each user the sums without buckets of a per-user plan read in the totals
/// table (its days, months and years): what ranking every user costs per user.
pub fn cells_per_user(plan: &Plan) -> i64 {
    plan.coarse
        .iter()
        .map(
            |run| match Calendar::ALL.into_iter().find(|c| c.code() == run.grain) {
                Some(c) => calendar_cells(c, run).count() as i64,
                None => (run.end - run.first) / DAY.max(1),
            },
        )
        .sum()
}

/// The calendar cells `c` of `run` from its first slot on, each as the slot it starts at and
/// the next cell's ([`calendar_cell`] of the slot reached), until `run` ends (or a slot has no
/// cell after it).
fn calendar_cells(c: Calendar, run: &Run) -> impl Iterator<Item = (i64, i64)> + '_ {
    std::iter::successors(
        calendar_cell(c, run.first).map(|(_, next)| (run.first, next)),
        move |&(_, slot)| calendar_cell(c, slot).map(|(_, next)| (slot, next)),
    )
    .take_while(|&(slot, next)| slot < run.end && next > slot)
}

/// Upper bounds on users' tokens over a range, from their cells over its [`month_cover`]: the
/// users with the highest bounds and the highest bound left out. While no row holds negative
/// tokens and the cover lies after the retention horizon (before it a cell keeps rows that
/// are gone), every row adds tokens ≥ 0, so a user's tokens over the cover are at least their
/// tokens over the range: a user left out ranks below every user whose exact tokens exceed
/// `rest` (see `stats::stats_by_user`).
#[derive(Debug, Clone, PartialEq)]
pub struct UserBounds {
    /// User keys, highest bound first.
    pub keys: Vec<i64>,
    /// Each key's bound, in the same order.
    pub bounds: Vec<f64>,
    /// The highest bound of a user not in `keys` (`None`: no user was left out).
    pub rest: Option<f64>,
    /// The share of the cover's time (up to the newest cell) that the range spans.
    pub share: f64,
}

impl UserBounds {
    /// Whether reading the exact sums of `keys` is worth it: the `limit`-th highest exact
    /// total is at most the `limit`-th highest bound, and near that bound × `share` when users
    /// call evenly over time; where `rest` is not below that, the exact sums would almost
    /// surely not decide (users of nearly equal use: every bound about twice its total), and
    /// ranking every user straight away saves reading them. A guess only: a wrong one costs
    /// time, never exactness (`stats::bounds_decide` decides).
    pub fn may_decide(&self, limit: u64) -> bool {
        let Some(rest) = self.rest else {
            return true;
        };
        usize::try_from(limit)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|i| self.bounds.get(i))
            .is_some_and(|&nth| rest < nth * self.share)
    }

    /// The first `n` users only: the bound of the next one becomes `rest`.
    pub fn first(&self, n: usize) -> UserBounds {
        let n = n.min(self.keys.len());
        UserBounds {
            keys: self.keys[..n].to_vec(),
            bounds: self.bounds[..n].to_vec(),
            rest: self.bounds.get(n).copied().or(self.rest),
            share: self.share,
        }
    }
}

/// The `n` user keys with the most tokens in the cells (and pending contributions) of `plan`,
/// a plan of a [`month_cover`], most first, as `user_key` and `bound` (each user's ~2 month
/// cells summed in the database). The sum is a double: summing 10,000 users' cells as
/// `bigint` (PostgreSQL accumulates into `numeric`) took 8–9 ms, as doubles 6; a double holds
/// every integer below 2^53 exactly, and `stats::bounds_decide` trusts no bound above 2^52.
pub fn bound_statement(backend: DbBackend, plan: &Plan, filter: &UsageFilter, n: u64) -> Statement {
    let rank = build(backend, plan, filter, GroupBy::User, Sums::Rank, None, None);
    Statement {
        sql: format!(
            "SELECT user_key, SUM(CAST(total_tokens AS DOUBLE PRECISION)) AS bound FROM ({}) s \
             GROUP BY user_key ORDER BY 2 DESC LIMIT {n}",
            rank.sql
        ),
        values: rank.values,
        db_backend: backend,
    }
}

/// [`bound_statement`] without summing every user's cells, where the cover is whole calendar
/// cells only (its [`Plan::coarse`] runs are month or year cells): each cell's `k` users with
/// the most tokens, read in that order from the index of its grain (migration 000026 for
/// months, 000028 for years), and then the exact cover tokens of those users and of every user
/// with pending contributions. A user in none of the lists has at most the `k`-th tokens of
/// each cell whose list is full. One statement, three kinds of line (`kind`, `key`, `v`, `n`):
/// - `0`: a calendar cell (`key`, its position in the cover), the lowest tokens of its list
///   (`v`) and the list's length (`n`);
/// - `1`: a listed user (`key`) and their tokens over the cover's cells (`v`);
/// - `2`: a user with pending contributions in the cover and their tokens (`v`).
///
/// Summing 10,000 users' two month cells (30 days from mid-month, 20,000 cells) took 6.4 ms;
/// the two lists of 400 and their users' cells well under 1 ms (`EXPLAIN ANALYZE`, cached).
/// `None` where the cover holds cells of another grain (a day).
pub fn top_bound_statement(backend: DbBackend, plan: &Plan, k: u64) -> Option<Statement> {
    // (grain, first slot) of each calendar cell of the cover.
    let mut cells: Vec<(i64, i64)> = Vec::new();
    for run in &plan.coarse {
        let c = Calendar::ALL
            .into_iter()
            .find(|c| c.code() == run.grain && !run.subtract)?;
        // Whole cells only, from the run's first slot (each next one starts a cell) to where
        // the run ends.
        if calendar_cell(c, run.first).map(|(first, _)| first) != Some(run.first) {
            return None;
        }
        let mut end = run.first;
        for (slot, next) in calendar_cells(c, run) {
            cells.push((c.code(), slot));
            end = next;
        }
        if end < run.end {
            return None;
        }
    }
    if cells.is_empty() {
        return None;
    }
    // Each list in a subquery: SQLite takes no LIMIT on a part of a UNION. The listed users'
    // cells by primary key, user after user (`CROSS JOIN`: SQLite keeps that order, where it
    // chose to scan every month cell against the list).
    let lists: Vec<String> = cells
        .iter()
        .enumerate()
        .map(|(i, (grain, slot))| {
            format!(
                "SELECT {i} AS c, user_key, total_tokens FROM (SELECT user_key, total_tokens \
                 FROM {TOTALS_TABLE} WHERE grain = {grain} AND slot = {slot} \
                 AND user_key <> {ALL_USERS} ORDER BY total_tokens DESC LIMIT {k}) l{i}"
            )
        })
        .collect();
    // The listed users' cells of each grain: a month and a year may start at the same slot
    // (a January), so each grain names its own slots. User after user by primary key: on
    // PostgreSQL a `LATERAL` subquery per user, fenced by `OFFSET 0` so that it is not pulled
    // up into a plain join (which was planned the other way round, every year cell tested
    // against every listed user, 234 ms at 10,000 users: the planner takes the year grain
    // and the year's slot as independent and expects 276 of the 20,000 cells); on SQLite a
    // `CROSS JOIN`, which keeps its order.
    let lateral = crate::db::dialect::Dialect::of(backend).lateral_joins();
    let exact: Vec<String> = Calendar::ALL
        .into_iter()
        .map(Calendar::code)
        .filter_map(|grain| {
            let slots: Vec<String> = cells
                .iter()
                .filter(|(g, _)| *g == grain)
                .map(|(_, slot)| slot.to_string())
                .collect();
            (!slots.is_empty()).then(|| {
                let slots = slots.join(", ");
                match lateral {
                    true => format!(
                        "SELECT u.user_key, r.total_tokens FROM u CROSS JOIN LATERAL \
                         (SELECT total_tokens FROM {TOTALS_TABLE} WHERE grain = {grain} \
                         AND user_key = u.user_key AND slot IN ({slots}) OFFSET 0) r"
                    ),
                    false => format!(
                        "SELECT r.user_key, r.total_tokens FROM u CROSS JOIN {TOTALS_TABLE} r \
                         WHERE r.grain = {grain} AND r.user_key = u.user_key \
                         AND r.slot IN ({slots})"
                    ),
                }
            })
        })
        .collect();
    let Slots { first, end } = plan.slots;
    let sql = format!(
        "WITH t AS ({lists}), \
         d AS (SELECT user_key, SUM(total_tokens) AS total_tokens FROM {DELTA_TABLE} \
         WHERE slot >= {first} AND slot < {end} GROUP BY user_key), \
         u AS (SELECT user_key FROM t UNION SELECT user_key FROM d) \
         SELECT 0 AS kind, c AS key, CAST(MIN(total_tokens) AS BIGINT) AS v, COUNT(*) AS n \
         FROM t GROUP BY c \
         UNION ALL SELECT 1, e.user_key, CAST(SUM(e.total_tokens) AS BIGINT), 0 \
         FROM ({exact}) e GROUP BY e.user_key \
         UNION ALL SELECT 2, user_key, CAST(total_tokens AS BIGINT), 0 FROM d",
        lists = lists.join(" UNION ALL "),
        exact = exact.join(" UNION ALL "),
    );
    Some(Statement::from_string(backend, sql))
}

/// The rollup user key of a `user_id` (`None`: calls made for no user); [`user_of`]'s inverse.
pub fn key_of(user: Option<i32>) -> i64 {
    user.map_or(NO_USER, i64::from)
}

/// A rollup user key as the `user_id` it stands for (`None`: calls made for no user).
pub fn user_of(key: i64) -> Option<i32> {
    if key == NO_USER {
        None
    } else {
        i32::try_from(key).ok()
    }
}

/// What `llm-tracker rollup verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The slots compared, `[first, end)` (whole UTC days), or `None` for the whole table.
    pub slots: Option<(i64, i64)>,
    /// Cells that should exist (recomputed from the rows).
    pub expected_cells: u64,
    /// Cells whose stored sums differ from the recomputed ones (missing and extra included).
    pub differing_cells: u64,
    /// The first differing cells: key, then recomputed and stored call counts.
    pub examples: Vec<String>,
}

fn day_aligned(t: DateTime<Utc>, up: bool) -> i64 {
    let slot = t.timestamp().div_euclid(SLOT_SECONDS);
    let day = slot.div_euclid(96) + i64::from(up);
    day * 96
}

/// Recomputes the rollup's cells from the rows and compares them with the stored ones, over
/// the whole UTC days from `since` to `until` (each optional). Read-only, in one snapshot.
/// Never before the retention horizon ([`crate::retention`]): the cells there keep rows
/// retention deleted, which no row can confirm.
pub async fn verify(
    db: &sea_orm::DatabaseConnection,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<VerifyReport, DbErr> {
    use migration::rollup::{Source, cells_select};
    let backend = db.get_database_backend();
    let txn = crate::db::read_txn(db).await?;
    let horizon = crate::retention::horizon(&txn).await?;
    let since = match (since, horizon) {
        (Some(s), Some(h)) => Some(s.max(h)),
        (s, h) => s.or(h),
    };
    let slots = match (since, until) {
        (None, None) => None,
        (s, u) => Some((
            s.map(|t| day_aligned(t, false)).unwrap_or(i64::MIN / 2),
            u.map(|t| day_aligned(t, true)).unwrap_or(i64::MAX / 2),
        )),
    };
    let row_range = slots.map(|(lo, hi)| crate::db::Dialect::of(backend).created_in_slots(lo, hi));
    // Cells inside the range: a month or year cell only when it ends inside it too.
    let stored_range = slots
        .map(|(lo, hi)| {
            let calendar: Vec<String> = Calendar::ALL
                .iter()
                .map(|c| {
                    format!(
                        "(grain = {} AND {} <= {hi})",
                        c.code(),
                        c.next_sql(backend, "slot")
                    )
                })
                .collect();
            let codes: Vec<String> = Calendar::ALL.iter().map(|c| c.code().to_string()).collect();
            format!(
                " WHERE slot >= {lo} AND slot < {hi} AND (grain NOT IN ({}) OR {})",
                codes.join(", "),
                calendar.join(" OR ")
            )
        })
        .unwrap_or_default();
    let mut report = VerifyReport {
        slots,
        expected_cells: 0,
        differing_cells: 0,
        examples: Vec::new(),
    };
    // (Before migrations 000029–000031 every month keeps its cells.)
    let layout = light_layout(&txn).await?;
    let full_only = layout.histograms;
    // The cells of `sources` at `level`: in the totals table the dense users' hours too (per
    // model their days); a
    // user's months per model, and days in the totals table, only where the month is full (a
    // light month's pending contributions are never folded into such a cell).
    // Per model, the dense users' days too (migration 000035).
    let kept = |sources: &[Source<'_>], level: Level| match level {
        Level::ByModel => {
            let cells = match layout.by_model {
                true => migration::rollup::model_cells_of_full_months(&cells_select(
                    backend, sources, level,
                )),
                false => cells_select(backend, sources, level),
            };
            match layout.dense_model_days {
                true => format!(
                    "{cells} UNION ALL {}",
                    migration::rollup::dense_model_days_select(backend, sources)
                ),
                false => cells,
            }
        }
        Level::Total => format!(
            "{} UNION ALL {}",
            match layout.days {
                true => migration::rollup::totals_cells_kept(
                    backend,
                    &cells_select(backend, sources, level),
                    layout.years,
                ),
                false => cells_select(backend, sources, level),
            },
            migration::rollup::dense_hours_select(backend, sources)
        ),
    };
    for level in Level::ALL {
        let expected = kept(
            &[Source::Table {
                name: "llm_tracker_usage",
                sign: 1,
                where_sql: row_range.as_deref(),
            }],
            level,
        );
        // Expected cells counted in, stored cells and pending contributions counted out, one
        // group per key: a cell differs when any of its sums is not zero (no outer join, which
        // SQLite would run as nested loops over unindexed subqueries).
        let key = level.key();
        let key_list = key.join(", ");
        let sums = level.sums();
        let sum_list = sums.join(", ");
        let negated: Vec<String> = sums.iter().map(|c| format!("-{c} AS {c}")).collect();
        let pending = kept(&[Source::Delta(DELTA_TABLE)], level);
        let differs: Vec<String> = sums.iter().map(|c| format!("SUM({c}) <> 0")).collect();
        let key_out: Vec<String> = key
            .iter()
            .map(|k| format!("CAST({k} AS TEXT) AS {k}"))
            .collect();
        let sql = format!(
            "SELECT {key_out}, CAST(SUM(e_calls) AS BIGINT) AS expected_calls, \
             CAST(SUM(s_calls) AS BIGINT) AS stored_calls, MAX(is_expected) AS is_expected, \
             CASE WHEN {differs} THEN 1 ELSE 0 END AS is_diff \
             FROM (SELECT {key_list}, 1 AS is_expected, calls AS e_calls, 0 AS s_calls, {sum_list} FROM ({expected}) e{stored_range} \
             UNION ALL SELECT {key_list}, 0, 0, calls, {negated} FROM {table}{stored_range} \
             UNION ALL SELECT {key_list}, 0, 0, calls, {negated} FROM ({pending}) p{stored_range}) x \
             GROUP BY {key_list}",
            key_out = key_out.join(", "),
            differs = differs.join(" OR "),
            negated = negated.join(", "),
            table = level.table(),
        );
        record_differences(&txn, &sql, key, level.table(), "rollup", &mut report).await?;
    }
    // The latency histograms, all users' and each user's: the same comparison over their
    // cells (a month cell only when the range holds all of it).
    {
        use migration::rollup::{
            LATENCY_KEY, LATENCY_TABLE, USER_LATENCY_KEY, USER_LATENCY_TABLE, full_months_only,
            latency_cells_select, latency_rows, user_latency_cells_select, user_latency_stored_sql,
        };
        let within = slots
            .map(|(lo, hi)| {
                format!(
                    " WHERE slot >= {lo} AND slot < {hi} AND (grain <> {m} OR {next} <= {hi})",
                    m = Calendar::Month.code(),
                    next = Calendar::Month.next_sql(backend, "slot"),
                )
            })
            .unwrap_or_default();
        let rows = [Source::Table {
            name: "llm_tracker_usage",
            sign: 1,
            where_sql: row_range.as_deref(),
        }];
        let pending = [Source::Delta(DELTA_TABLE)];
        let month = Calendar::Month.code();
        let full_months_only = |select: &str| match full_only {
            true => full_months_only(select),
            false => select.to_owned(),
        };
        let tables: [(&[&str], &str, String, String, String); 2] = [
            (
                &LATENCY_KEY,
                LATENCY_TABLE,
                LATENCY_TABLE.to_owned(),
                latency_cells_select(backend, &rows, true),
                latency_cells_select(backend, &pending, true),
            ),
            (
                &USER_LATENCY_KEY,
                USER_LATENCY_TABLE,
                user_latency_stored_sql(backend, "s"),
                // (Full months only: a light month has no cells, and its pending
                // contributions are never folded into one.)
                full_months_only(&user_latency_cells_select(
                    backend,
                    &latency_rows(backend, &rows),
                    month,
                )),
                full_months_only(&user_latency_cells_select(
                    backend,
                    &latency_rows(backend, &pending),
                    month,
                )),
            ),
        ];
        for (key, table, stored, expected, pending) in tables {
            let key_list = key.join(", ");
            let key_out: Vec<String> = key
                .iter()
                .map(|k| format!("CAST({k} AS TEXT) AS {k}"))
                .collect();
            let sql = format!(
                "SELECT {key_out}, CAST(SUM(e_calls) AS BIGINT) AS expected_calls, \
                 CAST(SUM(s_calls) AS BIGINT) AS stored_calls, MAX(is_expected) AS is_expected, \
                 CASE WHEN SUM(e_calls) <> SUM(s_calls) THEN 1 ELSE 0 END AS is_diff \
                 FROM (SELECT {key_list}, CASE WHEN calls <> 0 THEN 1 ELSE 0 END AS is_expected, calls AS e_calls, 0 AS s_calls FROM ({expected}) e{within} \
                 UNION ALL SELECT {key_list}, 0, 0, calls FROM {stored}{within} \
                 UNION ALL SELECT {key_list}, 0, 0, calls FROM ({pending}) p{within}) x \
                 GROUP BY {key_list}",
                key_out = key_out.join(", "),
            );
            record_differences(&txn, &sql, key, table, "histogram", &mut report).await?;
        }
    }
    txn.commit().await?;
    Ok(report)
}

/// Runs a comparison of `verify` (`sql`: one row per cell key of `table`, with
/// `expected_calls`, `stored_calls`, `is_expected` and `is_diff`) and adds what it finds to
/// `report`: the cells expected, the cells that differ and the first 20 of them.
async fn record_differences(
    txn: &sea_orm::DatabaseTransaction,
    sql: &str,
    key: &[&str],
    table: &str,
    stored: &str,
    report: &mut VerifyReport,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    let summary_sql = format!(
        "SELECT CAST(COALESCE(SUM(is_expected), 0) AS BIGINT), CAST(COALESCE(SUM(is_diff), 0) AS BIGINT) FROM ({sql}) j"
    );
    let Some(r) = txn
        .query_one_raw(Statement::from_string(backend, summary_sql))
        .await?
    else {
        return Ok(());
    };
    report.expected_cells += r.try_get_by_index::<i64>(0)?.max(0) as u64;
    let differing = r.try_get_by_index::<i64>(1)?.max(0) as u64;
    report.differing_cells += differing;
    if differing == 0 {
        return Ok(());
    }
    let order = ["slot", "grain", "user_key"]
        .into_iter()
        .filter(|k| key.contains(k))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = txn
        .query_all_raw(Statement::from_string(
            backend,
            format!("SELECT * FROM ({sql}) j WHERE is_diff = 1 ORDER BY {order} LIMIT 20"),
        ))
        .await?;
    for r in rows {
        let text = |k: &str| r.try_get::<String>("", k).unwrap_or_default();
        let dims = key
            .iter()
            .map(|k| format!("{k}={}", text(k)))
            .collect::<Vec<_>>()
            .join(" ");
        report.examples.push(format!(
            "{table}: {dims}: rows say {} calls, {stored} {}",
            r.try_get::<i64>("", "expected_calls").unwrap_or_default(),
            r.try_get::<i64>("", "stored_calls").unwrap_or_default(),
        ));
    }
    Ok(())
}

/// Recreates the rollup from every row, in one transaction (PostgreSQL writers wait for it);
/// before the retention horizon, from the cells kept there ([`crate::retention`]). Returns the
/// number of cells written.
pub async fn rebuild(db: &sea_orm::DatabaseConnection) -> Result<u64, DbErr> {
    use sea_orm::TransactionTrait;
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    for sql in migration::rollup::rebuild_lock_sql(backend) {
        txn.execute_unprepared(&sql).await?;
    }
    let horizon = crate::retention::horizon_slot(&txn).await?;
    for sql in migration::rollup::rebuild_sql(backend, horizon) {
        txn.execute_unprepared(&sql).await?;
    }
    let cells = txn
        .query_one_raw(Statement::from_string(
            backend,
            format!(
                "SELECT (SELECT CAST(COUNT(*) AS BIGINT) FROM {}) + (SELECT CAST(COUNT(*) AS BIGINT) FROM {TOTALS_TABLE})",
                migration::rollup::TABLE
            ),
        ))
        .await?
        .map(|r| r.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0);
    txn.commit().await?;
    Ok(cells.max(0) as u64)
}

/// The fold lives with the rollup's SQL in the schema crate ([`migration::rollup::fold`]):
/// the write path (the usage store folds every second) must not depend on the read side.
pub use migration::rollup::{PromotionClock, fold, fold_with};

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Runs as `(grain, first, end)`, for comparing with literals.
    fn tup(runs: Vec<Run>) -> Vec<(i64, i64, i64)> {
        runs.into_iter()
            .map(|r| (r.grain, r.first, r.end))
            .collect()
    }

    fn slot(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp() / SLOT_SECONDS
    }

    #[test]
    fn a_range_of_rows_as_whole_hours_and_the_rows_around_them() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let range = |s: &str, e: &str| UsageFilter {
            start: Some(at(s)),
            end: Some(at(e)),
            ..Default::default()
        };
        let slot = |s: &str| at(s).timestamp() / 900;
        let tick = Duration::microseconds(1);
        let parts = |rows: Vec<(UsageFilter, i64)>| -> Vec<(DateTime<Utc>, DateTime<Utc>, i64)> {
            rows.into_iter()
                .map(|(f, sign)| (f.start.unwrap(), f.end.unwrap(), sign))
                .collect()
        };
        // Whole hours: nothing around them.
        let (hours, rows) = hour_split(&range(
            "2026-03-04T14:00:00Z",
            "2026-03-04T23:59:59.999999Z",
        ))
        .unwrap();
        assert_eq!(
            (hours.first, hours.end),
            (slot("2026-03-04T14:00:00Z"), slot("2026-03-05T00:00:00Z"))
        );
        assert!(rows.is_empty());
        // A microsecond after the hour (a by_user `minus` part): the hour less that instant.
        let (hours, rows) = hour_split(&range(
            "2026-03-04T14:00:00.000001Z",
            "2026-03-04T23:59:59.999999Z",
        ))
        .unwrap();
        assert_eq!(hours.first, slot("2026-03-04T14:00:00Z"));
        assert_eq!(
            parts(rows),
            vec![(at("2026-03-04T14:00:00Z"), at("2026-03-04T14:00:00Z"), -1)]
        );
        // Less than half of the first hour, more than half of the last.
        let (hours, rows) =
            hour_split(&range("2026-03-04T14:40:00Z", "2026-03-04T20:50:00Z")).unwrap();
        assert_eq!(
            (hours.first, hours.end),
            (slot("2026-03-04T15:00:00Z"), slot("2026-03-04T21:00:00Z"))
        );
        assert_eq!(
            parts(rows),
            vec![
                (
                    at("2026-03-04T14:40:00Z"),
                    at("2026-03-04T15:00:00Z") - tick,
                    1
                ),
                (
                    at("2026-03-04T20:50:00Z") + tick,
                    at("2026-03-04T21:00:00Z") - tick,
                    -1
                ),
            ]
        );
        // Inside one hour: no whole hour.
        assert!(hour_split(&range("2026-03-04T14:40:00Z", "2026-03-04T14:45:00Z")).is_none());
    }

    #[test]
    fn bounds_that_cannot_decide_are_not_followed() {
        let bounds = |b: &[f64], rest: Option<f64>, share: f64| UserBounds {
            keys: (0..b.len() as i64).collect(),
            bounds: b.to_vec(),
            rest,
            share,
        };
        // Nobody left out: the keys are every user.
        assert!(bounds(&[5.0], None, 0.5).may_decide(3));
        // The second-highest bound is 9, the highest left out 8: the second-highest exact
        // total may still be above 8.
        assert!(bounds(&[10.0, 9.0, 7.0], Some(8.0), 1.0).may_decide(2));
        // The third-highest bound is 7, below the 8 left out: no exact total can rank it out.
        assert!(!bounds(&[10.0, 9.0, 7.0], Some(8.0), 1.0).may_decide(3));
        // A range of half its cover: the second total is likely near 4.5, not above 8.
        assert!(!bounds(&[10.0, 9.0, 7.0], Some(8.0), 0.5).may_decide(2));
        assert!(bounds(&[10.0, 9.0, 7.0], Some(4.0), 0.5).may_decide(2));
        // Equal bounds (users of equal use) never decide.
        assert!(!bounds(&[4.0, 4.0, 4.0], Some(4.0), 1.0).may_decide(1));
        // Fewer keys than shown, or none shown.
        assert!(!bounds(&[4.0], Some(1.0), 1.0).may_decide(2));
        assert!(!bounds(&[4.0], Some(1.0), 1.0).may_decide(0));
        // The first users of the bounded ones: the next one's bound is what is left out.
        let first = bounds(&[10.0, 9.0, 7.0], Some(2.0), 1.0).first(2);
        assert_eq!(
            (first.keys, first.bounds, first.rest),
            (vec![0, 1], vec![10.0, 9.0], Some(7.0))
        );
        let all = bounds(&[10.0, 9.0, 7.0], Some(2.0), 1.0).first(5);
        assert_eq!((all.keys.len(), all.rest), (3, Some(2.0)));
        assert_eq!(bounds(&[10.0], None, 1.0).first(1).rest, None);
    }

    #[test]
    fn coarsest_cells_first_and_merged() {
        let a = slot("2025-01-01T23:15:00Z");
        let b = slot("2025-01-04T01:30:00Z");
        let runs = tup(cells(a, b, None).unwrap());
        assert_eq!(
            runs,
            vec![
                (1, a, a + 3),
                (96, a + 3, a + 3 + 192),
                (4, a + 195, a + 195 + 4),
                (1, a + 199, b),
            ]
        );
    }

    #[test]
    fn all_users_whole_months_are_month_cells() {
        let m = Calendar::Month.code();
        let a = slot("2025-01-15T00:00:00Z");
        let feb = slot("2025-02-01T00:00:00Z");
        let mar = slot("2025-03-01T00:00:00Z");
        let apr = slot("2025-04-01T00:00:00Z");
        let b = slot("2025-04-10T00:00:00Z");
        // Sums: the whole months as one run of month cells, days around them.
        assert_eq!(
            tup(cells(a, b, None).unwrap()),
            vec![(96, a, feb), (m, feb, apr), (96, apr, b)]
        );
        // A monthly series in UTC: each month its own run (a run is keyed to one bucket).
        assert_eq!(
            tup(cells(a, b, Some((Granularity::Year, Tz::UTC))).unwrap()),
            vec![(96, a, feb), (m, feb, mar), (m, mar, apr), (96, apr, b)]
        );
        // Monthly buckets in New York are not UTC months: days (and hours at their ends).
        let ny: Tz = "America/New_York".parse().unwrap();
        assert!(
            cells(a, b, Some((Granularity::Year, ny)))
                .unwrap()
                .iter()
                .all(|r| r.grain != m)
        );
        // A daily series in UTC: days only.
        assert!(
            cells(a, b, Some((Granularity::Month, Tz::UTC)))
                .unwrap()
                .iter()
                .all(|r| r.grain == 96)
        );
    }

    #[test]
    fn a_users_cells_per_model_are_months_and_the_days_retention_kept() {
        // 28 January to 3 March: February is a month cell; the other days are read from the
        // rows (gaps) and from the day cells that only retention writes (runs of days).
        let a = slot("2025-01-28T00:00:00Z");
        let feb = slot("2025-02-01T00:00:00Z");
        let mar = slot("2025-03-01T00:00:00Z");
        let b = slot("2025-03-03T00:00:00Z");
        let days_month_days = vec![
            (DAY, a, feb),
            (Calendar::Month.code(), feb, mar),
            (DAY, mar, b),
        ];
        let (runs, gaps, _) = user_cells(
            a,
            b,
            None,
            Level::ByModel,
            None,
            Dense::default(),
            Light::default(),
        );
        assert_eq!(tup(runs), days_month_days);
        assert_eq!(
            gaps,
            vec![Slots { first: a, end: feb }, Slots { first: mar, end: b }]
        );
        // Over all models a user keeps days: no gaps, and the month less nothing.
        let (runs, gaps, _) = user_cells(
            a,
            b,
            None,
            Level::Total,
            None,
            Dense::default(),
            Light::default(),
        );
        assert!(gaps.is_empty());
        assert_eq!(tup(runs), days_month_days);
        // Local days in New York fit no UTC day: per model, only rows (no day runs).
        let ny: Tz = "America/New_York".parse().unwrap();
        let (runs, gaps, _) = user_cells(
            a,
            feb,
            Some((Granularity::Month, ny)),
            Level::ByModel,
            None,
            Dense::default(),
            Light::default(),
        );
        assert!(runs.is_empty());
        assert_eq!(gaps, vec![Slots { first: a, end: feb }]);
    }

    #[test]
    fn a_light_years_months_are_read_as_its_rows_and_retained_days() {
        // Migration 000032: over all models a light year has no month cells; its months are
        // light months, whose days are day runs (what retention kept) and rows. Its year cell
        // stays. Per model nothing changes (the light months are passed as such).
        let (jan, mar, y2026) = (
            slot("2025-01-01T00:00:00Z"),
            slot("2025-03-01T00:00:00Z"),
            slot("2026-01-01T00:00:00Z"),
        );
        let months: Vec<i64> = ["2025-01", "2025-02"]
            .iter()
            .map(|m| slot(&format!("{m}-01T00:00:00Z")))
            .collect();
        let light = Light {
            months: &months,
            years: &[jan],
        };
        let (runs, gaps, _) =
            user_cells(jan, mar, None, Level::Total, None, Dense::default(), light);
        assert_eq!(tup(runs), vec![(DAY, jan, mar)]);
        assert_eq!(
            gaps,
            vec![Slots {
                first: jan,
                end: mar
            }]
        );
        // The whole year: its year cell.
        let (runs, gaps, _) = user_cells(
            jan,
            y2026,
            None,
            Level::Total,
            None,
            Dense::default(),
            light,
        );
        assert_eq!(tup(runs), vec![(Calendar::Year.code(), jan, y2026)]);
        assert!(gaps.is_empty());
        // A full year: month cells.
        let (runs, _, _) = user_cells(
            jan,
            mar,
            None,
            Level::Total,
            None,
            Dense::default(),
            Light::default(),
        );
        assert_eq!(tup(runs), vec![(Calendar::Month.code(), jan, mar)]);
    }

    #[test]
    fn local_days_outside_utc_read_utc_days_less_their_other_hours() {
        // Month series (local days) in New York (UTC−5 in January): a local day is
        // [05:00, 05:00) UTC, 24 hour cells; read as the UTC day it starts in, less its first
        // 5 hours, plus the next day's first 5 hours: 11 cells.
        let tz: Tz = "America/New_York".parse().unwrap();
        let a = slot("2025-01-02T05:00:00Z");
        let b = slot("2025-01-04T05:00:00Z");
        let series = Some((Granularity::Month, tz));
        let split = split_per_bucket(&cells(a, b, series).unwrap(), Granularity::Month, tz);
        let split_runs: Vec<Run> = split.iter().map(|(run, _)| *run).collect();
        assert_eq!(size(&split_runs), 48);
        let keyed = per_bucket(&split, Scope::AllUsers);
        let read: Vec<Run> = keyed.iter().map(|b| b.run).collect();
        assert_eq!(size(&read), 22);
        let day = |d: &str| slot(&format!("{d}T00:00:00Z"));
        let runs: Vec<(i64, i64, i64, i64, bool)> = keyed
            .iter()
            .map(|b| (b.key, b.run.grain, b.run.first, b.run.end, b.run.subtract))
            .collect();
        let (d2, d3, d4) = (day("2025-01-02"), day("2025-01-03"), day("2025-01-04"));
        assert_eq!(
            runs,
            vec![
                (a, 96, d2, d3, false),
                (a, 4, d2, d2 + 20, true),
                (a, 4, d3, d3 + 20, false),
                (a + 96, 96, d3, d4, false),
                (a + 96, 4, d3, d3 + 20, true),
                (a + 96, 4, d4, d4 + 20, false),
            ]
        );
        // Each key names a slot of its own bucket; each bucket nets exactly its own slots.
        for k in [a, a + 96] {
            let mut net = std::collections::BTreeMap::<i64, i64>::new();
            for b in keyed.iter().filter(|b| b.key == k) {
                for p in b.run.first..b.run.end {
                    *net.entry(p).or_default() += if b.run.subtract { -1 } else { 1 };
                }
            }
            net.retain(|_, n| *n != 0);
            assert_eq!(
                net.keys().copied().collect::<Vec<_>>(),
                (k..k + 96).collect::<Vec<_>>()
            );
            assert!(net.values().all(|n| *n == 1));
        }
        // Fewer cells only: in UTC, and for a user's cells, the runs as they were.
        let utc = split_per_bucket(
            &cells(d2, d4, Some((Granularity::Month, Tz::UTC))).unwrap(),
            Granularity::Month,
            Tz::UTC,
        );
        let kept = per_bucket(&utc, Scope::AllUsers);
        assert!(kept.iter().all(|b| !b.run.subtract && b.key == b.run.first));
        assert!(
            per_bucket(&split, Scope::PerUser)
                .iter()
                .all(|b| !b.run.subtract)
        );
    }

    #[test]
    fn the_bucket_walk_chooses_the_cells_the_fit_test_chose() {
        let zones = [
            "UTC",
            "America/New_York",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "Australia/Lord_Howe",
            "Pacific/Chatham",
            "America/Santiago",
            "Europe/London",
        ];
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: i64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as i64
        };
        let base = slot("2024-01-01T00:00:00Z");
        for zone in zones {
            let tz: Tz = zone.parse().unwrap();
            for gran in [Granularity::Day, Granularity::Month, Granularity::Year] {
                for _ in 0..40 {
                    let a = base + next(400 * 96);
                    let len = match gran {
                        Granularity::Day => next(20 * 96),
                        _ => next(120 * 96),
                    };
                    let b = a + 1 + len;
                    assert_eq!(
                        cells(a, b, Some((gran, tz))),
                        cells_by_fits(a, b, Some((gran, tz))),
                        "{zone} {gran:?} [{a}, {b})"
                    );
                }
            }
        }
        let (a, b) = (base, base + 400 * 96);
        assert_eq!(cells(a, b, None), cells_by_fits(a, b, None));
    }

    #[test]
    fn cells_stay_inside_local_buckets() {
        // Month series (local days) in Asia/Kolkata (+05:30): days start at 18:30 UTC.
        let tz: Tz = "Asia/Kolkata".parse().unwrap();
        let a = slot("2025-01-01T00:00:00Z");
        let b = slot("2025-01-03T00:00:00Z");
        let runs = tup(cells(a, b, Some((Granularity::Month, tz))).unwrap());
        for (g, lo, hi) in &runs {
            for p in (*lo..*hi).step_by(*g as usize) {
                let s = slot_start(p).unwrap();
                let e = slot_start(p + g).unwrap() - Duration::microseconds(1);
                assert_eq!(
                    super::super::buckets::bucket_of(Granularity::Month, tz, s),
                    super::super::buckets::bucket_of(Granularity::Month, tz, e)
                );
            }
        }
        assert!(runs.iter().all(|(g, _, _)| *g != 96));
        assert_eq!(runs.first().unwrap().1, a);
        assert_eq!(runs.last().unwrap().2, b);
    }

    #[test]
    fn hourly_series_in_half_and_quarter_hour_zones_read_phased_hours() {
        // Asia/Kathmandu (+05:45): local hours start at :15 UTC; Asia/Kolkata (+05:30) at :30.
        for (zone, code) in [("Asia/Kathmandu", 5), ("Asia/Kolkata", 6)] {
            let tz: Tz = zone.parse().unwrap();
            let a = slot("2025-01-01T00:00:00Z");
            let b = slot("2025-04-01T00:00:00Z");
            let runs = tup(cells(a, b, Some((Granularity::Day, tz))).unwrap());
            // Slots up to the first local hour, one run of phased hours, slots after the last.
            assert_eq!(runs.len(), 3, "{zone}: {runs:?}");
            assert_eq!(runs[0].0, 1);
            assert_eq!(runs[1].0, code);
            assert_eq!(runs[2].0, 1);
            assert_eq!((runs[1].2 - runs[1].1) % 4, 0);
            for (_, lo, hi) in &runs[1..2] {
                for p in (*lo..*hi).step_by(4) {
                    let s = slot_start(p).unwrap();
                    let e = slot_start(p + 4).unwrap() - Duration::microseconds(1);
                    assert_eq!(
                        super::super::buckets::bucket_of(Granularity::Day, tz, s),
                        super::super::buckets::bucket_of(Granularity::Day, tz, e)
                    );
                }
            }
            // Without a series (and for daily buckets) the UTC days (and months) are still read.
            assert!(
                cells(a, b, None)
                    .unwrap()
                    .iter()
                    .all(|r| [1, 4, 96, Calendar::Month.code()].contains(&r.grain))
            );
            assert!(
                cells(a, b, Some((Granularity::Month, tz)))
                    .unwrap()
                    .iter()
                    .all(|r| [1, 4, 96].contains(&r.grain))
            );
        }
        // Whole-hour zones keep UTC hours.
        let ny: Tz = "America/New_York".parse().unwrap();
        let a = slot("2025-01-01T00:00:00Z");
        let runs = tup(cells(a, a + 96 * 30, Some((Granularity::Day, ny))).unwrap());
        assert_eq!(runs, vec![(4, a, a + 96 * 30)]);
    }

    #[test]
    fn a_straddling_slot_means_raw_rows() {
        // Before 1883 New York kept local mean time, UTC-4:56:02.
        let tz: Tz = "America/New_York".parse().unwrap();
        let t = Utc.with_ymd_and_hms(1870, 1, 1, 0, 0, 0).unwrap();
        let a = t.timestamp() / SLOT_SECONDS;
        assert_eq!(cells(a, a + 200, Some((Granularity::Day, tz))), None);
        assert!(cells(a, a + 200, None).is_some());
    }
}
