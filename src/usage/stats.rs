//! token-stats: summary, per-model breakdown and time series, from one SQL aggregate.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
    FromQueryResult, QueryFilter, QuerySelect, QueryTrait, Select, Statement,
};
use serde::Serialize;
use utoipa::ToSchema;

use super::UsageFilter;
pub use super::buckets::Granularity;
use super::buckets::{bucket_start_seconds, buckets_between, label_at_seconds};
use super::latency::LatencyHistograms;
use super::rollup;
use super::sums::col;
use super::sums::{Sum, TokenSums};
use crate::db::dialect::Dialect;
use crate::db::entities::usage;
use crate::db::read_txn;
use crate::pricing::{CURRENCY, Usd};

/// Sums over the matching rows; zeros when nothing matches.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Summary {
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    pub total_calls: i64,
    pub successful_calls: i64,
    pub failed_calls: i64,
    /// USD over the priced calls (0 when none is priced), exact to the micro-dollar.
    #[schema(value_type = f64, example = 0.00128)]
    pub total_cost: Usd,
    #[schema(value_type = String, example = "USD")]
    pub total_cost_currency: &'static str,
    /// Calls whose model had no price (their `cost` is null; not in `total_cost`).
    pub unpriced_calls: i64,
    /// Only with `include=latency`: the median latency in seconds over the calls that know it
    /// (within 5 %; null if none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 1.84)]
    pub latency_p50_sec: Option<Option<f64>>,
    /// Only with `include=latency`: the 95th percentile, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 6.2)]
    pub latency_p95_sec: Option<Option<f64>>,
    /// Only with `include=latency`: the 99th percentile, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 11.9)]
    pub latency_p99_sec: Option<Option<f64>>,
}

impl Default for Summary {
    fn default() -> Self {
        Self::new(TokenSums::default(), 0, 0)
    }
}

impl Summary {
    /// The summary of `sums`, `successful_calls` of whose calls succeeded and `unpriced_calls`
    /// had no price.
    pub fn new(sums: TokenSums, successful_calls: i64, unpriced_calls: i64) -> Self {
        Self {
            total_prompt_tokens: sums.total_prompt_tokens,
            total_completion_tokens: sums.total_completion_tokens,
            total_tokens: sums.total_tokens,
            total_cached_tokens: sums.total_cached_tokens,
            total_reasoning_tokens: sums.total_reasoning_tokens,
            total_calls: sums.total_calls,
            successful_calls,
            failed_calls: sums.total_calls - successful_calls,
            total_cost: Usd(sums.cost_micros),
            total_cost_currency: CURRENCY,
            unpriced_calls,
            latency_p50_sec: None,
            latency_p95_sec: None,
            latency_p99_sec: None,
        }
    }
}

/// One model's totals.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelStats {
    pub model: String,
    pub total_calls: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    #[schema(value_type = f64, example = 0.00128)]
    pub total_cost: Usd,
    #[schema(value_type = String, example = "USD")]
    pub total_cost_currency: &'static str,
    /// Mean `created_at − started_at` in seconds over the rows that know it; null if none does.
    #[schema(example = 1.25)]
    pub avg_latency_sec: Option<f64>,
    /// Mean time to first token (`first_chunk_at − started_at`) in seconds over the streamed
    /// rows that know it; null if none does.
    #[schema(example = 0.42)]
    pub avg_ttft_sec: Option<f64>,
    /// Only with `include=latency`: the median latency in seconds over the calls that know it
    /// (within 5 %; null if none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 1.84)]
    pub latency_p50_sec: Option<Option<f64>>,
    /// Only with `include=latency`: the 95th percentile, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 6.2)]
    pub latency_p95_sec: Option<Option<f64>>,
    /// Only with `include=latency`: the 99th percentile, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, example = 11.9)]
    pub latency_p99_sec: Option<Option<f64>>,
}

impl ModelStats {
    /// `model`'s line: its sums, mean latency and mean time to first token.
    pub fn new(
        model: String,
        sums: TokenSums,
        avg_latency_sec: Option<f64>,
        avg_ttft_sec: Option<f64>,
    ) -> Self {
        Self {
            model,
            total_calls: sums.total_calls,
            total_prompt_tokens: sums.total_prompt_tokens,
            total_completion_tokens: sums.total_completion_tokens,
            total_tokens: sums.total_tokens,
            total_cached_tokens: sums.total_cached_tokens,
            total_reasoning_tokens: sums.total_reasoning_tokens,
            total_cost: Usd(sums.cost_micros),
            total_cost_currency: CURRENCY,
            avg_latency_sec,
            avg_ttft_sec,
            latency_p50_sec: None,
            latency_p95_sec: None,
            latency_p99_sec: None,
        }
    }
}

/// One bucket of the time series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SeriesItem {
    /// `day`: `2025-01-31T10:00:00+00:00` (hour); `month`: `2025-01-31`; `year`:
    /// `2025-01-01T00:00:00+00:00` (month).
    pub bucket: String,
    pub total_calls: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    #[schema(value_type = f64, example = 0.00128)]
    pub total_cost: Usd,
    /// Calls that succeeded: for the admin pages' outcome charts, not in the API's JSON (whose
    /// shape is the Django app's).
    #[serde(skip)]
    pub successful_calls: i64,
}

impl SeriesItem {
    /// The bucket labelled `bucket` with `sums`, `successful_calls` of its calls succeeded.
    pub fn new(bucket: String, sums: TokenSums, successful_calls: i64) -> Self {
        Self {
            successful_calls,
            bucket,
            total_calls: sums.total_calls,
            total_prompt_tokens: sums.total_prompt_tokens,
            total_completion_tokens: sums.total_completion_tokens,
            total_tokens: sums.total_tokens,
            total_cached_tokens: sums.total_cached_tokens,
            total_reasoning_tokens: sums.total_reasoning_tokens,
            total_cost: Usd(sums.cost_micros),
        }
    }

    /// The item's JSON, as `serde_json` writes it (`a_series_item_writes_serde_s_json` holds it
    /// so), appended to `out` by hand: field by field through serde was a fifth of the
    /// server's time for an hourly year's 8,760 items (each key escaped on every item).
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"bucket\":");
        // Labels are digits and `-`, `:`, `+`, `T`: nothing to escape; anything else through
        // serde.
        if self
            .bucket
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            out.push(b'"');
            out.extend_from_slice(self.bucket.as_bytes());
            out.push(b'"');
        } else {
            serde_json::to_writer(&mut *out, &self.bucket)?;
        }
        let mut digits = itoa::Buffer::new();
        for (key, value) in [
            (&b",\"total_calls\":"[..], self.total_calls),
            (b",\"total_prompt_tokens\":", self.total_prompt_tokens),
            (
                b",\"total_completion_tokens\":",
                self.total_completion_tokens,
            ),
            (b",\"total_tokens\":", self.total_tokens),
            (b",\"total_cached_tokens\":", self.total_cached_tokens),
            (b",\"total_reasoning_tokens\":", self.total_reasoning_tokens),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(digits.format(value).as_bytes());
        }
        out.extend_from_slice(b",\"total_cost\":");
        serde_json::to_writer(&mut *out, &self.total_cost)?;
        out.push(b'}');
        Ok(())
    }
}

/// The 15-minute UTC slot of each row (`epoch seconds / 900`), as text: every real time-zone
/// offset is a whole number of slots, so local buckets are unions of slots. The rollup's own
/// expression, so raw rows and rollup cells fall in the same slots.
fn slot_sql(backend: DbBackend) -> String {
    format!(
        "CAST({} AS TEXT)",
        migration::rollup::slot_sql(backend, "created_at")
    )
}

/// How the series is bucketed: the time zone of its local buckets, and whether a range given
/// by both dates is zero-filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesOptions {
    pub tz: Tz,
    pub fill: bool,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        Self {
            tz: Tz::UTC,
            fill: false,
        }
    }
}

/// A sum over the raw rows.
fn raw_sum_sql(backend: DbBackend, sum: Sum) -> String {
    let column = match sum {
        Sum::Calls => return "COUNT(*)".to_owned(),
        Sum::CostMicros => return Dialect::of(backend).cost_sum().to_owned(),
        Sum::Prompt => "prompt_tokens",
        Sum::Completion => "completion_tokens",
        Sum::Total => "total_tokens",
        Sum::Cached => "cached_tokens",
        Sum::Reasoning => "reasoning_tokens",
    };
    // PostgreSQL's SUM(integer) is bigint; the cast keeps SQLite and PostgreSQL alike.
    format!("CAST(COALESCE(SUM({column}), 0) AS BIGINT)")
}

/// The sums of a series bucket over the raw rows ([`rollup::Sums::Series`]), with their column
/// names: the token sums, cost and `successful_calls`.
fn raw_series_sums(backend: DbBackend) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = TokenSums::COLUMNS
        .iter()
        .map(|&(sum, alias)| (raw_sum_sql(backend, sum), alias))
        .collect();
    out.push((
        "CAST(COUNT(*) FILTER (WHERE success) AS BIGINT)".to_owned(),
        col::SUCCESSFUL,
    ));
    out
}

/// Every sum of a [`Group`] over the raw rows, with its column name.
fn raw_sums(backend: DbBackend) -> Vec<(String, &'static str)> {
    let dialect = Dialect::of(backend);
    let mut out = raw_series_sums(backend);
    out.extend([
        (dialect.latency_sum().to_owned(), col::LATENCY_US),
        (
            "CAST(COUNT(started_at) AS BIGINT)".to_owned(),
            col::LATENCY_N,
        ),
        (dialect.ttft_sum().to_owned(), col::TTFT_US),
        (dialect.ttft_count().to_owned(), col::TTFT_N),
        (
            "CAST(COUNT(*) - COUNT(cost) AS BIGINT)".to_owned(),
            col::UNPRICED,
        ),
    ]);
    out
}

fn with_sums<S: QuerySelect>(q: S, backend: DbBackend) -> S {
    with_these(q, raw_sums(backend))
}

fn with_these<S: QuerySelect>(mut q: S, sums: Vec<(String, &'static str)>) -> S {
    for (sql, alias) in sums {
        q = q.column_as(Expr::cust(sql), alias);
    }
    q
}

/// The rows of the moved days' windows ([`rollup::Moved`]), one group per window (named by its
/// first slot: a window lies on one side of a bucket boundary), each group twice: in its own
/// bucket (the window's), and taken away from the bucket where its day's cell counts. One
/// statement: the windows are a list joined to the `(user_id, created_at)` index (a condition
/// of 365 `OR`s took 160 ms to plan). Grouped by the window, not by each row's slot: for the
/// heaviest user's New York days (122,784 rows in 730 windows) the slot of every row and a sort
/// of 6,348 text keys took 200 ms, the window's key 132 ms.
async fn moved_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    user: i32,
) -> Result<Vec<Group>, DbErr> {
    if plan.moved.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let dialect = Dialect::of(backend);
    let seconds = migration::rollup::SLOT_SECONDS;
    let windows: Vec<String> = plan
        .moved
        .iter()
        .map(|m| {
            format!(
                "({user}, {}, {}, {})",
                dialect.instant_sql(m.window.first * seconds),
                dialect.instant_sql(m.window.end * seconds),
                m.window.first
            )
        })
        .collect();
    let sums: Vec<String> = raw_series_sums(backend)
        .into_iter()
        .map(|(sql, alias)| format!("{sql} AS {alias}"))
        .collect();
    // The user in the list, not a constant: so the index range is the window's, not the
    // user's every row.
    let sql = format!(
        "SELECT CAST(NULL AS TEXT) AS {model}, CAST(w.s AS TEXT) AS {bucket}, {sums} \
         FROM (SELECT column1 AS uid, column2 AS lo, column3 AS hi, column4 AS s \
         FROM (VALUES {windows}) l) w \
         JOIN llm_tracker_usage u ON u.user_id = w.uid AND u.created_at >= w.lo \
         AND u.created_at < w.hi GROUP BY w.s",
        model = col::MODEL,
        bucket = col::BUCKET,
        sums = sums.join(", "),
        windows = windows.join(", "),
    );
    let rows = rollup_groups(txn, Statement::from_string(backend, sql)).await?;
    let mut out = Vec::with_capacity(rows.len() * 2);
    for g in rows {
        let slot = g
            .bucket
            .map(|at| at.div_euclid(seconds))
            .ok_or_else(|| DbErr::Custom("a moved window without its slot".into()))?;
        // The windows are in slot order and do not overlap; `slot` is a window's first.
        let i = plan.moved.partition_point(|m| m.window.end <= slot);
        let Some(m) = plan.moved.get(i).filter(|m| m.window.first <= slot) else {
            return Err(DbErr::Custom(format!("slot {slot} outside every window")));
        };
        out.push(Group {
            bucket: Some(m.key * seconds),
            ..g.negated()
        });
        out.push(g);
    }
    Ok(out)
}

/// Sums over every matching row.
pub async fn summary_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<Summary, DbErr> {
    Ok(token_stats(db, filter, None).await?.summary)
}

/// Everything token-stats shows, from one pass over the matching rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStatsData {
    pub summary: Summary,
    pub by_model: Vec<ModelStats>,
    /// `Some` when a granularity was asked for.
    pub series: Option<Vec<SeriesItem>>,
}

impl TokenStatsData {
    /// Sets the latency percentiles of the summary and of each model's line from `histograms`
    /// (of the same filter): null percentiles where no call knows its latency.
    pub fn with_latency(mut self, histograms: &LatencyHistograms) -> Self {
        let p = histograms.total().percentiles();
        self.summary.latency_p50_sec = Some(p.latency_p50_sec);
        self.summary.latency_p95_sec = Some(p.latency_p95_sec);
        self.summary.latency_p99_sec = Some(p.latency_p99_sec);
        for m in &mut self.by_model {
            let p = histograms
                .by_model
                .get(&m.model)
                .map(|h| h.percentiles())
                .unwrap_or_default();
            m.latency_p50_sec = Some(p.latency_p50_sec);
            m.latency_p95_sec = Some(p.latency_p95_sec);
            m.latency_p99_sec = Some(p.latency_p99_sec);
        }
        self
    }
}

/// One `(model, bucket)` group of the single aggregate query behind [`token_stats`].
#[derive(Debug)]
pub(crate) struct Group {
    model: Option<String>,
    /// The instant its bucket text stands for, in UTC epoch seconds ([`group_instant`]).
    bucket: Option<i64>,
    sums: TokenSums,
    successful_calls: i64,
    unpriced_calls: i64,
    latency_us: i64,
    latency_n: i64,
    ttft_us: i64,
    ttft_n: i64,
}

impl Group {
    /// A row one by one as its own group in its slot (a series' group: no model).
    fn of_row(row: super::row_copy::CopiedRow) -> Self {
        Self {
            model: None,
            bucket: Some(row.slot_start),
            sums: row.sums,
            successful_calls: i64::from(row.success),
            unpriced_calls: 0,
            latency_us: 0,
            latency_n: 0,
            ttft_us: 0,
            ttft_n: 0,
        }
    }
}

/// The groups of a statement. Each column is found by its name once, then read by position:
/// by name on every row (sea-orm's derive) was a quarter of the server's time for an hourly
/// year (8,760 rows of 14 columns). Read as the rows arrive, not once they all have: the
/// server's reading of one row overlaps the database's sending of the next.
async fn all_groups<C: ConnectionTrait + sea_orm::StreamTrait>(
    db: &C,
    stmt: Statement,
) -> Result<Vec<Group>, DbErr> {
    use futures_util::TryStreamExt;
    let rows = sea_orm::StreamTrait::stream_raw(db, stmt).await?;
    let mut rows = std::pin::pin!(rows);
    let mut reader: Option<GroupReader> = None;
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await? {
        let reader = match &reader {
            Some(r) => r,
            None => reader.insert(GroupReader::of(&row)?),
        };
        out.push(reader.read(&row)?);
    }
    Ok(out)
}

/// Where each column of a [`Group`] is in a statement's rows.
struct GroupReader {
    /// PostgreSQL, every integer column `bigint` (checked on the first row: a statement's
    /// column types are the same on every row): read without sqlx's type check per value,
    /// which was half of reading an hourly year's 8,760 rows.
    pg_ints: bool,
    model: usize,
    bucket: usize,
    sums: [usize; TokenSums::COLUMNS.len()],
    successful: usize,
    /// Absent from a series' statements ([`rollup::Sums::Series`]): zeros.
    unpriced: Option<usize>,
    latency_us: Option<usize>,
    latency_n: Option<usize>,
    ttft_us: Option<usize>,
    ttft_n: Option<usize>,
}

impl GroupReader {
    /// The positions of the columns in `first`'s statement.
    fn of(first: &sea_orm::QueryResult) -> Result<Self, DbErr> {
        let names = first.column_names();
        let maybe = |name: &str| names.iter().position(|n| n == name);
        let at = |name: &str| {
            maybe(name).ok_or_else(|| DbErr::Custom(format!("a group without the column {name}")))
        };
        let mut sums = [0usize; TokenSums::COLUMNS.len()];
        for (i, (_, alias)) in TokenSums::COLUMNS.iter().enumerate() {
            sums[i] = at(alias)?;
        }
        let mut reader = Self {
            pg_ints: false,
            model: at(col::MODEL)?,
            bucket: at(col::BUCKET)?,
            sums,
            successful: at(col::SUCCESSFUL)?,
            unpriced: maybe(col::UNPRICED),
            latency_us: maybe(col::LATENCY_US),
            latency_n: maybe(col::LATENCY_N),
            ttft_us: maybe(col::TTFT_US),
            ttft_n: maybe(col::TTFT_N),
        };
        if let Some(row) = first.try_as_pg_row() {
            use sea_orm::sqlx::{Column, Row, Type, postgres::Postgres};
            let columns = row.columns();
            let all_bigint = reader.ints().all(|i| {
                columns
                    .get(i)
                    .is_some_and(|c| <i64 as Type<Postgres>>::compatible(c.type_info()))
            });
            reader.pg_ints = all_bigint;
        }
        Ok(reader)
    }

    /// The positions of the integer columns present.
    fn ints(&self) -> impl Iterator<Item = usize> + '_ {
        self.sums.iter().copied().chain(
            [
                Some(self.successful),
                self.unpriced,
                self.latency_us,
                self.latency_n,
                self.ttft_us,
                self.ttft_n,
            ]
            .into_iter()
            .flatten(),
        )
    }

    fn read(&self, r: &sea_orm::QueryResult) -> Result<Group, DbErr> {
        match r.try_as_pg_row().filter(|_| self.pg_ints) {
            Some(row) => {
                use sea_orm::sqlx::Row;
                // The texts borrowed from the row (the bucket's not copied into a `String` per
                // row), without sea-orm's generic getter (a twentieth of an hourly year's time).
                let text = |i: usize, what: &str| {
                    row.try_get_unchecked::<Option<&str>, _>(i)
                        .map_err(|e| DbErr::Custom(format!("the {what} of a group: {e}")))
                };
                let model = text(self.model, "model")?.map(str::to_owned);
                let bucket = text(self.bucket, "bucket")?
                    .map(group_instant)
                    .transpose()?;
                self.assemble(model, bucket, |i| pg_int8(row, i))
            }
            None => {
                let bucket = r
                    .try_get_by_index::<Option<String>>(self.bucket)?
                    .as_deref()
                    .map(group_instant)
                    .transpose()?;
                self.assemble(r.try_get_by_index(self.model)?, bucket, |i| {
                    r.try_get_by_index::<i64>(i)
                })
            }
        }
    }

    /// The group of `model` in `bucket`, its integers read by `int`.
    fn assemble(
        &self,
        model: Option<String>,
        bucket: Option<i64>,
        int: impl Fn(usize) -> Result<i64, DbErr>,
    ) -> Result<Group, DbErr> {
        let some = |i: Option<usize>| i.map_or(Ok(0), &int);
        Ok(Group {
            model,
            bucket,
            sums: TokenSums::try_from_fn(|k| int(self.sums[k]))?,
            successful_calls: int(self.successful)?,
            unpriced_calls: some(self.unpriced)?,
            latency_us: some(self.latency_us)?,
            latency_n: some(self.latency_n)?,
            ttft_us: some(self.ttft_us)?,
            ttft_n: some(self.ttft_n)?,
        })
    }
}

/// Column `i` of a PostgreSQL row, a `bigint` not null. In binary (what sqlx asks of a prepared
/// statement) it is read as its 8 bytes in place: sqlx's decoding per value was a tenth of
/// reading an hourly year's 8,760 rows, and most of reading `by_user`'s 20,000 year cells.
/// Anything else through sqlx.
fn pg_int8(row: &sea_orm::sqlx::postgres::PgRow, i: usize) -> Result<i64, DbErr> {
    use sea_orm::sqlx::Row;
    let raw = row
        .try_get_raw(i)
        .map_err(|e| DbErr::Custom(format!("column {i} of a row: {e}")))?;
    if raw.format() == sea_orm::sqlx::postgres::PgValueFormat::Binary
        && let Ok(bytes) = raw.as_bytes()
        && let Ok(bytes) = <[u8; 8]>::try_from(bytes)
    {
        return Ok(i64::from_be_bytes(bytes));
    }
    row.try_get_unchecked::<Option<i64>, _>(i)
        .map_err(|e| DbErr::Custom(format!("column {i} of a row: {e}")))?
        .ok_or_else(|| DbErr::Custom(format!("column {i} of a row is null")))
}

/// Column `i` of `r`, a `bigint` not null ([`pg_int8`] on PostgreSQL).
fn int8_at(r: &sea_orm::QueryResult, i: usize) -> Result<i64, DbErr> {
    match r.try_as_pg_row() {
        Some(row) => pg_int8(row, i),
        None => r.try_get_by_index(i),
    }
}

/// [`all_groups`] of a raw aggregate of `filter`'s rows (built on
/// [`UsageFilter::rows_condition`]), under its planner settings ([`UsageFilter::rows_settings`]:
/// for one user, the user's rows through `(user_id, created_at)`, not the `created_at` index
/// filtering every other user's rows out).
async fn rows_groups(
    txn: &DatabaseTransaction,
    filter: &UsageFilter,
    stmt: Statement,
) -> Result<Vec<Group>, DbErr> {
    filter.set_rows_settings(txn).await?;
    all_groups(txn, stmt).await
}

/// [`all_groups`] of a rollup statement, under the rollup's planner settings.
async fn rollup_groups(txn: &DatabaseTransaction, stmt: Statement) -> Result<Vec<Group>, DbErr> {
    if let Some(sql) = Dialect::of(txn.get_database_backend()).rollup_settings() {
        txn.execute_unprepared(sql).await?;
    }
    all_groups(txn, stmt).await
}

impl Group {
    /// The group with every sum of the opposite sign.
    fn negated(&self) -> Self {
        Self {
            model: self.model.clone(),
            bucket: self.bucket,
            sums: -self.sums,
            successful_calls: -self.successful_calls,
            unpriced_calls: -self.unpriced_calls,
            latency_us: -self.latency_us,
            latency_n: -self.latency_n,
            ttft_us: -self.ttft_us,
            ttft_n: -self.ttft_n,
        }
    }
}

/// What the groups add up to: the sums, and what the summary or a model's line adds to them.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    sums: TokenSums,
    successful_calls: i64,
    unpriced_calls: i64,
    latency_us: i64,
    latency_n: i64,
    ttft_us: i64,
    ttft_n: i64,
}

impl Totals {
    fn add(&mut self, g: &Group) {
        self.sums += g.sums;
        self.successful_calls += g.successful_calls;
        self.unpriced_calls += g.unpriced_calls;
        self.latency_us += g.latency_us;
        self.latency_n += g.latency_n;
        self.ttft_us += g.ttft_us;
        self.ttft_n += g.ttft_n;
    }

    /// Mean latency in seconds (microsecond precision), if any row knows it.
    fn avg_latency_sec(&self) -> Option<f64> {
        (self.latency_n > 0).then(|| (self.latency_us as f64 / self.latency_n as f64).round() / 1e6)
    }

    /// Mean time to first token in seconds (microsecond precision), if any streamed row knows it.
    fn avg_ttft_sec(&self) -> Option<f64> {
        (self.ttft_n > 0).then(|| (self.ttft_us as f64 / self.ttft_n as f64).round() / 1e6)
    }
}

/// The one aggregate query behind [`token_stats`] (see [`super::plans`]).
pub(crate) fn token_stats_query(
    backend: DbBackend,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    tz: Tz,
) -> Select<usage::Entity> {
    let q = with_sums(
        usage::Entity::find()
            .select_only()
            .column(usage::Column::Model),
        backend,
    )
    .filter(filter.rows_condition(backend))
    .group_by(Expr::cust(Dialect::of(backend).model_group()));
    match granularity {
        Some(g) => {
            let (group, text) = bucket_group(backend, g, tz);
            q.column_as(Expr::cust(text), col::BUCKET)
                .group_by(Expr::cust(group))
        }
        None => q.column_as(Expr::cust("CAST(NULL AS TEXT)"), col::BUCKET),
    }
}

/// The series' grouping expression and its text (the `bucket` column). In UTC the buckets
/// themselves are grouped in SQL (fewest groups); in any other zone, 15-minute UTC slots,
/// mapped to local buckets in Rust.
fn bucket_group(backend: DbBackend, granularity: Granularity, tz: Tz) -> (String, String) {
    if tz == Tz::UTC {
        let (group, text) = Dialect::of(backend).utc_bucket_start(granularity.trunc());
        (group.to_owned(), text.to_owned())
    } else {
        (slot_sql(backend), slot_sql(backend))
    }
}

/// The series alone (no model dimension) of `filter`'s rows: the days of a user's plan that no
/// cell answers (see [`rollup::Plan::gaps`]), counted in the series only. Without the model a
/// year of the heaviest user outside UTC is ~35,000 slot groups instead of ~600,000.
pub(crate) fn series_query(
    backend: DbBackend,
    filter: &UsageFilter,
    granularity: Granularity,
    tz: Tz,
) -> Select<usage::Entity> {
    let q = with_these(
        usage::Entity::find()
            .select_only()
            .column_as(Expr::cust("CAST(NULL AS TEXT)"), col::MODEL),
        raw_series_sums(backend),
    )
    .filter(filter.rows_condition(backend));
    let (group, text) = bucket_group(backend, granularity, tz);
    q.column_as(Expr::cust(text), col::BUCKET)
        .group_by(Expr::cust(group))
}

/// The series' statement over one of a plan's gaps ([`rollup::Plan::gap_filters`]): its rows
/// grouped per bucket or slot, or one by one ([`rollup::Plan::gaps_by_row`]).
pub fn gap_query(
    backend: DbBackend,
    plan: &rollup::Plan,
    gap: &UsageFilter,
    granularity: Granularity,
    tz: Tz,
) -> Select<usage::Entity> {
    if plan.gaps_by_row {
        series_rows_query(backend, gap)
    } else {
        series_query(backend, gap, granularity, tz)
    }
}

/// The series' groups of one of a plan's gaps ([`gap_query`], under its planner settings).
async fn gap_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    gap: &UsageFilter,
    granularity: Granularity,
    tz: Tz,
) -> Result<Vec<Group>, DbErr> {
    let backend = txn.get_database_backend();
    let stmt = gap_query(backend, plan, gap, granularity, tz).build(backend);
    gap.set_rows_settings(txn).await?;
    match plan.gaps_by_row {
        true => row_groups(txn, stmt).await,
        false => all_groups(txn, stmt).await,
    }
}

/// The series' groups of all of a plan's gaps: the rows [`copied_gap_rows`] copies, each its
/// own group; where it does not, each gap's [`gap_groups`] in turn on the request's
/// transaction.
async fn series_gap_groups(
    db: &DatabaseConnection,
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    gaps: &[UsageFilter],
    granularity: Granularity,
    tz: Tz,
) -> Result<Vec<Group>, DbErr> {
    if let Some(copied) = copied_gap_rows(db, txn, plan, gaps).await? {
        return Ok(copied.into_iter().map(Group::of_row).collect());
    }
    let mut groups = Vec::new();
    for gap in gaps {
        groups.extend(gap_groups(txn, plan, gap, granularity, tz).await?);
    }
    Ok(groups)
}

/// For a light user's rows one by one ([`rollup::Plan::gaps_by_row`]) over a long range
/// reaching the present ([`copies_rows`]): the rows of `gaps` in two halves of the user's calls
/// ([`row_halves`]) copied at once by `COPY` on two spare connections of the pool that share
/// `txn`'s snapshot ([`super::row_copy`], [`crate::db::export_snapshot`],
/// [`crate::db::spare_connections`]). `None` where it does not apply, where the calls do not
/// halve, or when two connections are not spare: the caller reads the rows on `txn`.
///
/// PostgreSQL visits such rows one heap page each (~1 µs a page even cached: 11 ms of a
/// typical user's year) on one core per connection, and the server reads a copied row in
/// place where a statement's row went through sqlx's and sea-orm's layers. (One connection
/// copying them all was measured no faster than the request's own reading them: the
/// database's one core is the limit then.)
pub async fn copied_gap_rows(
    db: &DatabaseConnection,
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    gaps: &[UsageFilter],
) -> Result<Option<Vec<super::row_copy::CopiedRow>>, DbErr> {
    if !copies_rows(txn.get_database_backend(), plan, gaps) {
        return Ok(None);
    }
    let mut spares = crate::db::spare_connections(db, 2).await;
    let [a, b] = spares.as_mut_slice() else {
        return Ok(None);
    };
    let Some((early, late)) = row_halves(gaps, &user_months(txn, gaps).await?) else {
        return Ok(None);
    };
    let snapshot = crate::db::export_snapshot(txn).await?;
    let settings = Dialect::Postgres.user_range_settings().unwrap_or_default();
    let copy = super::row_copy::copy_rows;
    let (early, late) = (copy_selects(&early), copy_selects(&late));
    let (mut rows, later) = futures_util::try_join!(
        copy(a, &snapshot, settings, &early),
        copy(b, &snapshot, settings, &late),
    )?;
    rows.extend(later);
    Ok(Some(rows))
}

/// A light user's rows one by one are copied on spare connections from this span of gaps on
/// (shorter, their round trips are more than they save).
pub const COPY_ROWS_FROM: chrono::Duration = chrono::Duration::days(28);

/// Whether [`series_gap_groups`] copies the rows of `gaps` on spare connections: on
/// PostgreSQL, where the plan reads them one by one, they span [`COPY_ROWS_FROM`] or more, and
/// the latest reaches the present ([`UsageFilter::reads_user_range`]) — so that each part is
/// read as ranges of the `(user_id, created_at)` index, and a range's scan, which walks on past
/// its end to the user's last entry, walks over the later part's entries and at most a day
/// more (leaf entries, not heap pages).
pub fn copies_rows(backend: DbBackend, plan: &rollup::Plan, gaps: &[UsageFilter]) -> bool {
    let spans: Option<Vec<_>> = gaps.iter().map(|g| Some((g.start?, g.end?))).collect();
    let Some(spans) = spans else {
        return false;
    };
    let total: chrono::Duration = spans.iter().map(|&(start, end)| end - start).sum();
    let latest = spans.iter().map(|&(_, end)| end).max();
    backend == DbBackend::Postgres
        && plan.gaps_by_row
        && total >= COPY_ROWS_FROM
        && gaps
            .iter()
            .any(|g| g.end == latest && g.reads_user_range(backend))
}

/// The user's calls per UTC month over `gaps` ([`rollup::user_month_calls`]), from the month
/// before the first gap's.
async fn user_months(
    txn: &DatabaseTransaction,
    gaps: &[UsageFilter],
) -> Result<Vec<(i64, i64, i64)>, DbErr> {
    let slot = migration::rollup::SLOT_SECONDS;
    let first = gaps.iter().filter_map(|g| g.start).min();
    let last = gaps.iter().filter_map(|g| g.end).max();
    match (gaps.first().and_then(|g| g.user_id), first, last) {
        (Some(user), Some(first), Some(last)) => {
            let from = first.timestamp().div_euclid(slot) - 31 * migration::rollup::DAY;
            let to = last.timestamp().div_euclid(slot) + 1;
            rollup::user_month_calls(txn, user, from, to).await
        }
        _ => Ok(Vec::new()),
    }
}

/// The `SELECT`s, values written in, of each gap's rows one by one as ranges of the
/// `(user_id, created_at)` index ([`UsageFilter::user_range_condition`]).
fn copy_selects(gaps: &[UsageFilter]) -> Vec<String> {
    let backend = DbBackend::Postgres;
    gaps.iter()
        .map(|gap| {
            let condition = gap
                .user_range_condition(backend)
                .unwrap_or_else(|| gap.condition(backend));
            rows_query(condition)
                .into_query()
                .to_string(sea_orm::sea_query::PostgresQueryBuilder)
        })
        .collect()
}

/// `gaps` (one user's) in two parts holding about as many of the user's calls each, the
/// earlier and the later, cut at a 15-minute slot boundary: the calls of each month
/// (`(first slot, next month's first slot, calls)`, [`rollup::user_month_calls`]) taken as
/// spread evenly over the month. `None` where either part would be empty. Together the parts
/// select exactly the rows of `gaps`: a gap cut in two ends a microsecond before the later
/// part begins.
///
/// Each part is read as ranges of the `(user_id, created_at)` index ([`copied_gap_rows`],
/// [`copy_selects`]): the earlier part's scans walk on past their ends to the user's last
/// entry (see [`UsageFilter::reads_user_range`]), which, where the later part reaches the
/// present, is the later part's entries and at most a day more: leaf entries, not heap pages.
pub fn row_halves(
    gaps: &[UsageFilter],
    months: &[(i64, i64, i64)],
) -> Option<(Vec<UsageFilter>, Vec<UsageFilter>)> {
    let slot = migration::rollup::SLOT_SECONDS;
    let mut spans = gaps
        .iter()
        .map(|g| {
            let (start, end) = (g.start?, g.end?);
            let after = end.checked_add_signed(chrono::Duration::microseconds(1))?;
            Some((start.timestamp(), after.timestamp(), g))
        })
        .collect::<Option<Vec<_>>>()?;
    spans.sort_by_key(|&(start, _, _)| start);
    // The calls of `months` in `[a, b)` seconds, each month's spread evenly over it; and, when
    // `need` of them are reached inside, the second at which that happens.
    let calls_in = |a: i64, b: i64, mut need: f64| -> (f64, Option<i64>) {
        let mut sum = 0.0;
        for &(m0, m1, calls) in months {
            let (s0, s1) = (m0 * slot, m1 * slot);
            let (x, y) = (a.max(s0), b.min(s1));
            if y <= x || s1 <= s0 || calls <= 0 {
                continue;
            }
            let (calls, span) = (calls as f64, (s1 - s0) as f64);
            let here = calls * (y - x) as f64 / span;
            if need <= here {
                return (sum + need, Some(x + (need * span / calls) as i64));
            }
            need -= here;
            sum += here;
        }
        (sum, None)
    };
    let total: f64 = spans
        .iter()
        .map(|&(a, b, _)| calls_in(a, b, f64::INFINITY).0)
        .sum();
    if total <= 0.0 {
        return None;
    }
    let mut need = total / 2.0;
    let (mut early, mut late) = (Vec::new(), Vec::new());
    for (a, b, gap) in spans {
        if need <= 0.0 {
            late.push(gap.clone());
            continue;
        }
        match calls_in(a, b, need) {
            (_, Some(at)) => {
                need = 0.0;
                let cut = super::row_copy::slot_start(at);
                let cut_at = DateTime::from_timestamp(cut, 0)?;
                if cut > a {
                    early.push(UsageFilter {
                        end: Some(cut_at - chrono::Duration::microseconds(1)),
                        ..gap.clone()
                    });
                    late.push(UsageFilter {
                        start: Some(cut_at),
                        ..gap.clone()
                    });
                } else {
                    late.push(gap.clone());
                }
            }
            (here, None) => {
                need -= here;
                early.push(gap.clone());
            }
        }
    }
    (!early.is_empty() && !late.is_empty()).then_some((early, late))
}

/// The rows of `filter` one by one (PostgreSQL; see [`rollup::Plan::gaps_by_row`]): each row's
/// `created_at` (as the bucket), token counts, cost in micro-dollars and outcome, named as the
/// sums they add to, selected by [`UsageFilter::rows_condition`]. A row's cost in
/// micro-dollars is exact: `cost` is `numeric(12, 6)`, so each row's micro-dollars are whole
/// and their sum is the sum's.
pub(crate) fn series_rows_query(backend: DbBackend, filter: &UsageFilter) -> Select<usage::Entity> {
    rows_query(filter.rows_condition(backend))
}

/// [`series_rows_query`] of the rows `condition` selects.
fn rows_query(condition: sea_orm::Condition) -> Select<usage::Entity> {
    let mut q = usage::Entity::find()
        .select_only()
        .column_as(Expr::cust("created_at"), col::BUCKET);
    for (k, sum) in super::row_copy::row_sums() {
        if let Some(value) = super::row_copy::row_value_sql(sum) {
            q = q.column_as(Expr::cust(value), TokenSums::COLUMNS[k].1);
        }
    }
    q.column_as(Expr::cust("success"), col::SUCCESSFUL)
        .filter(condition)
}

/// The groups of [`series_rows_query`]: each row a group of its own in its 15-minute slot
/// (found in integer arithmetic from `created_at`), read as the rows arrive, each column by
/// its position (found by name on the first row) and its type as the statement has it.
async fn row_groups(txn: &DatabaseTransaction, stmt: Statement) -> Result<Vec<Group>, DbErr> {
    use futures_util::TryStreamExt;
    use sea_orm::sqlx::Row;
    let rows = sea_orm::StreamTrait::stream_raw(txn, stmt).await?;
    let mut rows = std::pin::pin!(rows);
    let bad = |e: sea_orm::sqlx::Error| DbErr::Custom(format!("a row one by one: {e}"));
    // (the bucket, each sum but the calls, the outcome)
    let mut at: Option<(usize, [Option<usize>; TokenSums::COLUMNS.len()], usize)> = None;
    let mut out = Vec::new();
    while let Some(r) = rows.try_next().await? {
        let row = r
            .try_as_pg_row()
            .ok_or_else(|| DbErr::Custom("rows one by one are read on PostgreSQL only".into()))?;
        let (bucket, sums, success) = match at {
            Some(p) => p,
            None => {
                let names = r.column_names();
                let find = |name: &str| {
                    names.iter().position(|n| n == name).ok_or_else(|| {
                        DbErr::Custom(format!("a row one by one without the column {name}"))
                    })
                };
                let mut sums = [None; TokenSums::COLUMNS.len()];
                for (k, _) in super::row_copy::row_sums() {
                    sums[k] = Some(find(TokenSums::COLUMNS[k].1)?);
                }
                *at.insert((find(col::BUCKET)?, sums, find(col::SUCCESSFUL)?))
            }
        };
        let instant: DateTime<Utc> = row.try_get_unchecked(bucket).map_err(bad)?;
        out.push(Group::of_row(super::row_copy::CopiedRow {
            slot_start: super::row_copy::slot_start(instant.timestamp()),
            sums: TokenSums::try_from_fn(|k| match sums[k] {
                None => Ok(1),
                Some(i) if TokenSums::COLUMNS[k].0 == Sum::CostMicros => {
                    row.try_get_unchecked::<i64, _>(i).map_err(bad)
                }
                Some(i) => row
                    .try_get_unchecked::<i32, _>(i)
                    .map(i64::from)
                    .map_err(bad),
            })?,
            success: row.try_get_unchecked::<bool, _>(success).map_err(bad)?,
        }));
    }
    Ok(out)
}

/// The instant a group's bucket text stands for: a 15-minute slot number (the rollup, and the
/// raw rows outside UTC), or a UTC bucket start `YYYY-MM-DD HH:MM:SS`.
///
/// In UTC epoch seconds, within chrono's range: the fold works on seconds and makes a
/// `DateTime` per bucket, not per group (an hourly year is 8,760 groups).
fn group_instant(text: &str) -> Result<i64, DbErr> {
    let bad = |e: String| DbErr::Custom(format!("bucket {text:?}: {e}"));
    let seconds = match text.parse::<i64>() {
        Ok(slot) => slot
            .checked_mul(migration::rollup::SLOT_SECONDS)
            .ok_or_else(|| bad("out of range".into()))?,
        Err(_) => NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
            .map(|t| t.and_utc().timestamp())
            .map_err(|e| bad(e.to_string()))?,
    };
    Some(seconds)
        .filter(|&s| super::buckets::in_chrono_range(s))
        .ok_or_else(|| bad("out of range".into()))
}

/// Summary, per-model breakdown and (with a granularity) the series, from a single
/// `GROUP BY model[, bucket]` query: one pass over the rows where the Django app makes three.
/// The groups (models × buckets) are folded in Rust; rows are never loaded.
pub async fn token_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
) -> Result<TokenStatsData, DbErr> {
    token_stats_in(db, filter, granularity, SeriesOptions::default()).await
}

/// The raw `(model, bucket)` groups of the partial slots at a plan's edges.
async fn edge_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    granularity: Option<Granularity>,
    tz: Tz,
) -> Result<Vec<Group>, DbErr> {
    let backend = txn.get_database_backend();
    let mut groups = Vec::new();
    for edge in &plan.edges {
        groups.extend(
            rows_groups(
                txn,
                edge,
                token_stats_query(backend, edge, granularity, tz).build(backend),
            )
            .await?,
        );
    }
    Ok(groups)
}

/// The raw groups of `filter` (the single aggregate over the rows, under its planner
/// settings), inside `txn`.
async fn raw_groups(
    txn: &DatabaseTransaction,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    tz: Tz,
) -> Result<Vec<Group>, DbErr> {
    let backend = txn.get_database_backend();
    if let Some(settings) = Dialect::of(backend).aggregate_settings() {
        txn.execute_unprepared(settings).await?;
    }
    rows_groups(
        txn,
        filter,
        token_stats_query(backend, filter, granularity, tz).build(backend),
    )
    .await
}

/// [`token_stats`] with local buckets in `options.tz` and, with `options.fill` and both ends
/// of the range in `filter`, every bucket of the range (empty ones with zeros). The caller
/// checks the range against [`super::buckets::MAX_BUCKETS`] first.
///
/// Whole 15-minute slots come from the rollup, the partial slots at the edges from the raw
/// rows (see [`super::rollup`]); the figures are exactly those of [`token_stats_raw`].
pub async fn token_stats_in(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    options: SeriesOptions,
) -> Result<TokenStatsData, DbErr> {
    let backend = db.get_database_backend();
    let tz = options.tz;
    let txn = read_txn(db).await?;
    let plan = rollup::plan(&txn, filter, granularity.map(|g| (g, tz)), false).await?;
    let mut summary = None;
    let (totals, series, both) = match plan {
        None => (
            Vec::new(),
            Vec::new(),
            raw_groups(&txn, filter, granularity, tz).await?,
        ),
        Some(plan) => {
            let by = |by| rollup::statement(backend, &plan, filter, by);
            let mut totals = rollup_groups(&txn, by(rollup::GroupBy::Model)).await?;
            // Each gap's rows, grouped per model.
            let gap_rows = async |gaps: Vec<UsageFilter>| -> Result<Vec<Group>, DbErr> {
                let mut out = Vec::new();
                for gap in gaps {
                    let stmt = token_stats_query(backend, &gap, None, tz).build(backend);
                    out.extend(rows_groups(&txn, &gap, stmt).await?);
                }
                Ok(out)
            };
            // A user's days per model outside whole months: their rows; the summary then comes
            // from the user's cells over all models (which keep what retention deleted).
            let gaps = plan.model_gap_filters(filter, rollup::GroupBy::Model);
            if !gaps.is_empty()
                && rollup::level_of(filter, rollup::GroupBy::Nothing)
                    == migration::rollup::Level::Total
            {
                let mut groups = rollup_groups(&txn, by(rollup::GroupBy::Nothing)).await?;
                // (And a light month's days outside whole months: their rows, migration 000031.)
                groups.extend(
                    gap_rows(plan.coarse_gap_filters(filter, rollup::GroupBy::Nothing)).await?,
                );
                summary = Some(groups);
            }
            totals.extend(gap_rows(gaps).await?);
            let mut series = match granularity {
                Some(_) => {
                    rollup_groups(&txn, rollup::series_statement(backend, &plan, filter)).await?
                }
                None => Vec::new(),
            };
            // A user's days that straddle a local bucket: the series reads their rows, or the
            // rows on the shorter side of the bucket boundary (PostgreSQL).
            if let Some(granularity) = granularity {
                let gaps = plan.gap_filters(filter);
                series.extend(series_gap_groups(db, &txn, &plan, &gaps, granularity, tz).await?);
                if let Some(user) = filter.user_id {
                    series.extend(moved_groups(&txn, &plan, user).await?);
                }
            }
            let edges = edge_groups(&txn, &plan, granularity, tz).await?;
            (totals, series, edges)
        }
    };
    txn.commit().await?;
    fold(
        &totals,
        summary.as_deref(),
        &series,
        &both,
        filter,
        granularity,
        options,
    )
}

/// [`token_stats_in`] from the raw rows only (the reference the rollup is checked against).
pub async fn token_stats_raw(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    options: SeriesOptions,
) -> Result<TokenStatsData, DbErr> {
    let txn = read_txn(db).await?;
    let groups = raw_groups(&txn, filter, granularity, options.tz).await?;
    txn.commit().await?;
    fold(&[], None, &[], &groups, filter, granularity, options)
}

/// Folds groups into the response: `totals` count in the summary and per model, `series` in
/// the buckets, `both` in all three; with `summary`, the summary counts those instead of
/// `totals`. A model or bucket whose groups add up to no calls (rollup
/// cells whose rows were all deleted, or cells and the pending contributions that take their
/// rows out again) is left out, so it never appears with zeros. A single group with no calls
/// still counts: a pending update that changed a row's tokens but not its count.
fn fold(
    totals: &[Group],
    summary_groups: Option<&[Group]>,
    series: &[Group],
    both: &[Group],
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    options: SeriesOptions,
) -> Result<TokenStatsData, DbErr> {
    let tz = options.tz;
    let mut summary = Totals::default();
    let mut models: BTreeMap<&str, Totals> = BTreeMap::new();
    // The series' groups by the start of their local bucket in epoch seconds (labels with
    // offsets do not sort by time across DST); sorted and summed per bucket below.
    let mut in_buckets: Vec<(i64, &Group)> = Vec::with_capacity(series.len() + both.len());
    // (group, counts in the summary, per model, in the series)
    let tagged = totals
        .iter()
        .map(|g| (g, summary_groups.is_none(), true, false))
        .chain(
            summary_groups
                .unwrap_or_default()
                .iter()
                .map(|g| (g, true, false, false)),
        )
        .chain(series.iter().map(|g| (g, false, false, true)))
        .chain(both.iter().map(|g| (g, true, true, true)));
    for (g, to_summary, to_models, to_series) in tagged {
        if to_summary {
            summary.add(g);
        }
        if to_models {
            models
                .entry(g.model.as_deref().unwrap_or_default())
                .or_default()
                .add(g);
        }
        if let (true, Some(at), Some(gran)) = (to_series, g.bucket, granularity) {
            in_buckets.push((bucket_start_seconds(gran, tz, at), g));
        }
    }
    models.retain(|_, t| t.sums.total_calls != 0);
    // Sorted and summed per bucket (a sorted vector, not a map: 8,760 inserts into a B-tree were
    // a twentieth of an hourly year's time). Each bucket without a label yet gets it below, once
    // per bucket, not once per group (a quarter's hourly series in a :45 zone comes as 8,640
    // slot groups).
    in_buckets.sort_unstable_by_key(|&(start, _)| start);
    let mut buckets: Vec<(i64, Option<String>, Totals)> = Vec::new();
    for (start, g) in in_buckets {
        match buckets.last_mut() {
            Some((last, _, t)) if *last == start => t.add(g),
            _ => {
                let mut t = Totals::default();
                t.add(g);
                buckets.push((start, None, t));
            }
        }
    }
    buckets.retain(|(_, _, t)| t.sums.total_calls != 0);
    if let (Some(gran), true, Some(start), Some(end)) =
        (granularity, options.fill, filter.start, filter.end)
    {
        // Zero-filled: every bucket of the range, with the sums of those that have calls.
        let mut have = buckets.into_iter().peekable();
        let mut filled = Vec::new();
        for b in buckets_between(gran, tz, start, end).unwrap_or_default() {
            let at = b.start.timestamp();
            filled.extend(std::iter::from_fn(|| have.next_if(|(s, _, _)| *s < at)));
            filled.push(have.next_if(|(s, _, _)| *s == at).unwrap_or((
                at,
                Some(b.label),
                Totals::default(),
            )));
        }
        filled.extend(have);
        buckets = filled;
    }

    let mut by_model: Vec<ModelStats> = models
        .into_iter()
        .map(|(model, t)| {
            ModelStats::new(
                model.to_owned(),
                t.sums,
                t.avg_latency_sec(),
                t.avg_ttft_sec(),
            )
        })
        .collect();
    // Total tokens descending, then model ascending (the map already gave model order).
    by_model.sort_by_key(|m| std::cmp::Reverse(m.total_tokens));

    let series = granularity.map(|gran| {
        buckets
            .into_iter()
            .map(|(start, label, t)| {
                let label = label.unwrap_or_else(|| label_at_seconds(gran, tz, start));
                SeriesItem::new(label, t.sums, t.successful_calls)
            })
            .collect()
    });
    Ok(TokenStatsData {
        summary: Summary::new(
            summary.sums,
            summary.successful_calls,
            summary.unpriced_calls,
        ),
        by_model,
        series,
    })
}

/// One model's series (the overview's bars stacked by model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSeries {
    pub model: String,
    /// Its buckets with calls, in time order.
    pub series: Vec<SeriesItem>,
}

/// The series of each model, models by total tokens descending then name: over all users from
/// the per-model cells of the rollup (plus the raw rows of the range's partial edges), exact
/// like [`token_stats_in`]; with a user filter (whose per-model days straddle local buckets,
/// and whose calendar cells hold no model) from the raw rows.
///
/// With `models`, only those (exact names): a chart that stacks the largest few reads their
/// cells alone (the rest is the all-models series less them).
pub async fn series_by_model(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Granularity,
    tz: Tz,
    models: Option<&[String]>,
) -> Result<Vec<ModelSeries>, DbErr> {
    let backend = db.get_database_backend();
    let txn = read_txn(db).await?;
    let plan = rollup::plan(&txn, filter, Some((granularity, tz)), false).await?;
    let groups: Vec<Group> = match plan {
        Some(plan) if plan.scope == rollup::Scope::AllUsers => {
            let stmt = rollup::models_statement(backend, &plan, filter, models);
            let mut groups = rollup_groups(&txn, stmt).await?;
            groups.extend(edge_groups(&txn, &plan, Some(granularity), tz).await?);
            groups
        }
        _ => raw_groups(&txn, filter, Some(granularity), tz).await?,
    };
    txn.commit().await?;
    fold_by_model(&groups, granularity, tz, models)
}

/// [`series_by_model`] from the raw rows only (the reference it is checked against).
pub async fn series_by_model_raw(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Granularity,
    tz: Tz,
    models: Option<&[String]>,
) -> Result<Vec<ModelSeries>, DbErr> {
    let txn = read_txn(db).await?;
    let groups = raw_groups(&txn, filter, Some(granularity), tz).await?;
    txn.commit().await?;
    fold_by_model(&groups, granularity, tz, models)
}

fn fold_by_model(
    groups: &[Group],
    granularity: Granularity,
    tz: Tz,
    only: Option<&[String]>,
) -> Result<Vec<ModelSeries>, DbErr> {
    type Buckets = BTreeMap<i64, (String, Totals)>;
    let mut models: BTreeMap<&str, Buckets> = BTreeMap::new();
    for g in groups {
        let Some(at) = g.bucket else { continue };
        let model = g.model.as_deref().unwrap_or_default();
        if only.is_some_and(|o| !o.iter().any(|m| m == model)) {
            continue;
        }
        models
            .entry(model)
            .or_default()
            .entry(bucket_start_seconds(granularity, tz, at))
            .or_insert_with_key(|&start| {
                (label_at_seconds(granularity, tz, start), Totals::default())
            })
            .1
            .add(g);
    }
    let mut out: Vec<(i64, ModelSeries)> = models
        .into_iter()
        .filter_map(|(model, buckets)| {
            let series: Vec<SeriesItem> = buckets
                .into_values()
                .filter(|(_, t)| t.sums.total_calls != 0)
                .map(|(label, t)| SeriesItem::new(label, t.sums, t.successful_calls))
                .collect();
            let tokens = series.iter().map(|i| i.total_tokens).sum();
            (!series.is_empty()).then(|| {
                (
                    tokens,
                    ModelSeries {
                        model: model.to_owned(),
                        series,
                    },
                )
            })
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.model.cmp(&b.1.model)));
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

/// One item per model, by total tokens descending, then model ascending.
pub async fn stats_by_model(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<Vec<ModelStats>, DbErr> {
    Ok(token_stats(db, filter, None).await?.by_model)
}

/// Buckets that have rows, in order.
pub async fn time_series_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Granularity,
) -> Result<Vec<SeriesItem>, DbErr> {
    Ok(token_stats(db, filter, Some(granularity))
        .await?
        .series
        .unwrap_or_default())
}

/// One user's totals (`user_id` null: calls made for no user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UserStats {
    pub user_id: Option<i32>,
    /// Null when the row has no user or the user no longer exists.
    pub username: Option<String>,
    pub total_calls: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    #[schema(value_type = f64, example = 0.00128)]
    pub total_cost: Usd,
    #[schema(value_type = String, example = "USD")]
    pub total_cost_currency: &'static str,
}

impl UserStats {
    /// `user_id`'s line, named `username`.
    pub fn new(user_id: Option<i32>, username: Option<String>, sums: TokenSums) -> Self {
        Self {
            user_id,
            username,
            total_calls: sums.total_calls,
            total_prompt_tokens: sums.total_prompt_tokens,
            total_completion_tokens: sums.total_completion_tokens,
            total_tokens: sums.total_tokens,
            total_cached_tokens: sums.total_cached_tokens,
            total_reasoning_tokens: sums.total_reasoning_tokens,
            total_cost: Usd(sums.cost_micros),
            total_cost_currency: CURRENCY,
        }
    }
}

/// One user's sums: from the rollup (`user_key`) or the raw edge rows (`user_id`).
#[derive(Debug, Default, FromQueryResult)]
struct UserGroup {
    #[sea_orm(skip)]
    user: Option<i32>,
    #[sea_orm(nested)]
    sums: TokenSums,
}

#[derive(Debug, FromQueryResult)]
struct KeyOnly {
    user_key: i64,
}

#[derive(Debug, FromQueryResult)]
struct UserIdOnly {
    user_id: Option<i32>,
}

/// The raw per-user groups of `filter`.
async fn raw_user_groups<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
) -> Result<Vec<UserGroup>, DbErr> {
    raw_user_groups_of(db, filter, None).await
}

/// [`raw_user_groups`], with `users` only those users (rollup keys).
async fn raw_user_groups_of<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    users: Option<&[i64]>,
) -> Result<Vec<UserGroup>, DbErr> {
    let backend = db.get_database_backend();
    let stmt = raw_user_statement(backend, filter, users);
    // PostgreSQL: a listed users' statement on its generic plan (the same plan at every
    // execution: one index-only range per user, and the no-user calls' partial index). Its
    // custom plan was made again at each execution: 0.65 ms of its bind, against 0.12 on the
    // generic plan (the 77 chosen users' partial day at 10,000 users). `SET LOCAL` keeps the
    // mode to this transaction, and it is set back to the server's default before any other
    // statement runs.
    let generic = Dialect::of(backend)
        .generic_plan_settings()
        .filter(|_| users.is_some_and(|u| !u.is_empty()));
    if let Some((before, _)) = generic {
        db.execute_unprepared(before).await?;
    }
    let rows = db.query_all_raw(stmt).await?;
    if let Some((_, after)) = generic {
        db.execute_unprepared(after).await?;
    }
    rows.iter()
        .map(|r| {
            let mut g = UserGroup::from_query_result(r, "")?;
            g.user = UserIdOnly::from_query_result(r, "")?.user_id;
            Ok(g)
        })
        .collect()
}

/// The statement of [`raw_user_groups_of`]: each user's sums over the rows of `filter`, of the
/// users `users` names only (rollup keys; every user without it). The named users are a list
/// joined to the `(user_id, created_at)` index, so each user's rows are an index range: as a
/// condition (`user_id IN (…)`) PostgreSQL chose the `created_at` index and tested every row of
/// the time range against the list. 80 of 10,000 users over 10 hours of a day (1,659 of the
/// range's 11,415 rows): 2.4–2.8 ms that way, 1.1–1.2 ms joined (cached). The calls made for
/// no user, where named, are a second part (`user_id IS NULL`), read through the partial
/// index of migration 000027 (0.4 ms for their 1,122 rows there, 1.5–2.1 ms through
/// `created_at`).
pub fn raw_user_statement(
    backend: DbBackend,
    filter: &UsageFilter,
    users: Option<&[i64]>,
) -> Statement {
    use sea_orm::ColumnTrait;
    use sea_orm::sea_query::{Alias, Asterisk, ExprTrait, JoinType, Query, UnionType, ValueTuple};
    let select = || {
        with_sums(usage::Entity::find().select_only(), backend)
            .column(usage::Column::UserId)
            .filter(filter.condition(backend))
            .group_by(usage::Column::UserId)
    };
    let Some(keys) = users else {
        return select().build(backend);
    };
    // Each user once: a user listed twice would count twice.
    let ids: Vec<i32> = keys
        .iter()
        .filter_map(|k| rollup::user_of(*k))
        .collect::<std::collections::BTreeSet<i32>>()
        .into_iter()
        .collect();
    let nobody = keys.iter().any(|k| rollup::user_of(*k).is_none());
    let l = Alias::new("l");
    let of_listed = Expr::col((usage::Entity, usage::Column::UserId))
        .equals((l.clone(), Alias::new("column1")));
    let listed = (!ids.is_empty()).then(|| {
        if Dialect::of(backend).lateral_joins() {
            // Each listed user's rows in a subquery of their own. The list is one parameter
            // (`unnest` of an array's text), so the statement's text is the same whatever the
            // list's length: a connection prepares it once, and [`raw_user_groups_of`] has it
            // run on its generic plan instead of planning it again each time.
            let list = format!(
                "{{{}}}",
                ids.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
            );
            let mut unnest = Query::select();
            unnest.expr_as(
                Expr::cust_with_values("unnest(CAST(CAST($1 AS TEXT) AS INTEGER[]))", [list]),
                Alias::new("column1"),
            );
            let s = Alias::new("s");
            let mut q = Query::select();
            q.column((s.clone(), Asterisk))
                .from_subquery(unnest, l)
                .join_lateral(
                    JoinType::InnerJoin,
                    select().filter(of_listed).into_query(),
                    s,
                    Expr::val(true),
                );
            q
        } else {
            // The list first: SQLite keeps the tables of a `CROSS JOIN` in their order.
            let mut q = select().filter(of_listed).into_query();
            let tuples = ids.iter().map(|id| ValueTuple::One((*id).into()));
            q.from_clear()
                .from_values(tuples, l)
                .cross_join(usage::Entity);
            q
        }
    });
    let unnamed = nobody.then(|| {
        select()
            .filter(usage::Column::UserId.is_null())
            .into_query()
    });
    let query = match (listed, unnamed) {
        (Some(mut l), Some(u)) => {
            l.union(UnionType::All, u);
            l
        }
        (Some(q), None) | (None, Some(q)) => q,
        // No user at all: a statement that reads no row.
        (None, None) => select().filter(Expr::cust("1 = 0")).into_query(),
    };
    backend.build(&query)
}

/// `by_user` per model or outcome ([`rollup::Plan::light_months`], migration 000030): each
/// user's sums over the rows of the plan's whole months that are light for that user (they have
/// no cell per model; their pending contributions are left out of the cells' statement).
async fn light_month_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    filter: &UsageFilter,
) -> Result<Vec<UserGroup>, DbErr> {
    use migration::rollup::{Calendar, FULL_MONTH_TABLE, slot_sql};
    let backend = txn.get_database_backend();
    let light = format!(
        "user_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
         WHERE f.user_key = user_id AND f.slot = {})",
        Calendar::Month.start_sql(backend, &slot_sql(backend, "created_at"))
    );
    let mut out = Vec::new();
    for run in plan.light_month_runs() {
        if let Some(part) = run.narrow(filter) {
            out.extend(user_groups_where(txn, &part, &light).await?);
        }
    }
    Ok(out)
}

/// Each user's sums over the rows of `part` that the SQL condition `condition` also selects.
async fn user_groups_where(
    txn: &DatabaseTransaction,
    part: &UsageFilter,
    condition: &str,
) -> Result<Vec<UserGroup>, DbErr> {
    let backend = txn.get_database_backend();
    let stmt = with_sums(usage::Entity::find().select_only(), backend)
        .column(usage::Column::UserId)
        .filter(part.condition(backend))
        .filter(Expr::cust(condition.to_owned()))
        .group_by(usage::Column::UserId)
        .build(backend);
    let mut out = Vec::new();
    for r in txn.query_all_raw(stmt).await? {
        let mut g = UserGroup::from_query_result(&r, "")?;
        g.user = UserIdOnly::from_query_result(&r, "")?.user_id;
        out.push(g);
    }
    Ok(out)
}

/// `by_user` over all models without a user filter ([`rollup::Plan::light_days`], migration
/// 000031): for each user whose month is light, each day run of the plan's cells counted as
/// its missing day cells would count it — the run's rows less its pending contributions — with
/// the run's sign ([`rollup::light_day_runs`]). `users`: those users only (rollup keys; each
/// run's rows are then read for the listed users whose month is light, through the
/// `(user_id, created_at)` index), every user without it (the run's rows of every light month).
async fn light_day_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    filter: &UsageFilter,
    users: Option<&[i64]>,
) -> Result<Vec<UserGroup>, DbErr> {
    light_groups(
        txn,
        filter,
        users,
        rollup::light_day_runs(plan),
        migration::rollup::FULL_MONTH_TABLE,
        rollup::light_pending_plan,
        None,
    )
    .await
}

/// The same for the month runs of users whose year is light ([`rollup::Plan::light_years`],
/// migration 000032: a light year has no month cells): each month run's rows and day cells
/// (what retention deleted) less its pending contributions, with its sign
/// ([`rollup::light_year_runs`]).
async fn light_year_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    filter: &UsageFilter,
    users: Option<&[i64]>,
) -> Result<Vec<UserGroup>, DbErr> {
    light_groups(
        txn,
        filter,
        users,
        rollup::light_year_runs(plan),
        migration::rollup::FULL_YEAR_TABLE,
        rollup::light_year_pending_plan,
        Some(rollup::light_year_days_plan),
    )
    .await
}

/// [`light_day_groups`] and [`light_year_groups`]: for each run `(slots, sign, period)` —
/// `period` the first slot of the month or year that `full` lists the full ones of — the rows,
/// plus the cells of `cells_plan`, less the pending contributions (`pending_plan`) of the users
/// whose period is light.
async fn light_groups(
    txn: &DatabaseTransaction,
    filter: &UsageFilter,
    users: Option<&[i64]>,
    runs: Vec<(rollup::Slots, i64, i64)>,
    full: &str,
    pending_plan: fn(rollup::Slots, i64) -> rollup::Plan,
    cells_plan: Option<fn(rollup::Slots, i64) -> rollup::Plan>,
) -> Result<Vec<UserGroup>, DbErr> {
    use migration::rollup::ALL_USERS;
    let backend = txn.get_database_backend();
    let mut out = Vec::new();
    if runs.is_empty() {
        return Ok(out);
    }
    // With `users`: which of them are full in each of the runs' periods, in one lookup.
    let keys: Vec<i64> = users
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|k| *k < ALL_USERS)
        .collect();
    let mut full_in: std::collections::HashSet<(i64, i64)> = std::collections::HashSet::new();
    if users.is_some() {
        if keys.is_empty() {
            return Ok(out);
        }
        let list = |v: &mut dyn Iterator<Item = i64>| {
            v.map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
        };
        let periods = list(&mut runs.iter().map(|(_, _, p)| *p));
        for r in txn
            .query_all_raw(Statement::from_string(
                backend,
                format!(
                    "SELECT user_key, slot FROM {full} WHERE slot IN ({periods}) AND user_key IN ({})",
                    list(&mut keys.iter().copied())
                ),
            ))
            .await?
        {
            full_in.insert((int8_at(&r, 0)?, int8_at(&r, 1)?));
        }
    }
    for (run, sign, period) in runs {
        let light: Option<Vec<i64>> = match users {
            None => None,
            Some(_) => {
                let light: Vec<i64> = keys
                    .iter()
                    .copied()
                    .filter(|k| !full_in.contains(&(*k, period)))
                    .collect();
                if light.is_empty() {
                    continue;
                }
                Some(light)
            }
        };
        let Some(part) = run.narrow(filter) else {
            continue;
        };
        let rows = match &light {
            Some(keys) => raw_user_groups_of(txn, &part, Some(keys)).await?,
            None => {
                let light = format!(
                    "user_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {full} f \
                     WHERE f.user_key = user_id AND f.slot = {period})"
                );
                user_groups_where(txn, &part, &light).await?
            }
        };
        // The groups of a plan of rollup cells or pending contributions, for those users.
        let groups_of =
            async |plan: rollup::Plan| user_cell_groups(txn, &plan, filter, light.as_deref()).await;
        let pending = groups_of(pending_plan(run, period)).await?;
        if let Some(cells_plan) = cells_plan {
            out.extend(signed(groups_of(cells_plan(run, period)).await?, sign));
        }
        out.extend(signed(rows, sign));
        out.extend(signed(pending, -sign));
    }
    Ok(out)
}

/// `groups` with their sums negated where `sign` is negative (rows taken away).
fn signed(groups: Vec<UserGroup>, sign: i64) -> impl Iterator<Item = UserGroup> {
    groups.into_iter().map(move |g| {
        if sign < 0 {
            UserGroup { sums: -g.sums, ..g }
        } else {
            g
        }
    })
}

/// Every sum per user of `plan`'s cells and pending contributions under `filter`, for the
/// users `users` names (all without it).
async fn user_cell_groups(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    filter: &UsageFilter,
    users: Option<&[i64]>,
) -> Result<Vec<UserGroup>, DbErr> {
    let stmt = rollup::statement_with(
        txn.get_database_backend(),
        plan,
        filter,
        rollup::GroupBy::User,
        rollup::Sums::All,
        users,
    );
    rollup_user_groups(txn, stmt).await
}

/// The per-user groups of a rollup statement grouped by user (its `user_key` column).
async fn rollup_user_groups(
    txn: &DatabaseTransaction,
    stmt: Statement,
) -> Result<Vec<UserGroup>, DbErr> {
    txn.query_all_raw(stmt)
        .await?
        .iter()
        .map(|r| {
            let mut g = UserGroup::from_query_result(r, "")?;
            g.user = rollup::user_of(KeyOnly::from_query_result(r, "")?.user_key);
            Ok(g)
        })
        .collect()
}

/// Per-user totals, by total tokens descending (then user id, no-user last), at most `limit`:
/// whole slots from the rollup, the edges from the raw rows, as [`token_stats_in`].
pub async fn stats_by_user(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    limit: u64,
) -> Result<Vec<UserStats>, DbErr> {
    let txn = read_txn(db).await?;
    let users = match rollup::plan(&txn, filter, None, true).await? {
        None => merge_users(&raw_user_groups(&txn, filter).await?),
        Some(plan) => {
            if let Some(sql) = Dialect::of(txn.get_database_backend()).rollup_settings() {
                txn.execute_unprepared(sql).await?;
            }
            // The rows the cells leave out: the edges (sign 1) and, taken away, the rows outside
            // a mostly covered day (sign -1).
            let parts: Vec<(UsageFilter, i64)> = plan
                .raw(filter, rollup::GroupBy::User)
                .into_iter()
                .map(|f| (f, 1))
                .chain(plan.minus.iter().map(|f| (f.clone(), -1)))
                .collect();
            // Over all models and outcomes, the dense users' UTC hours (migration 000025) stand
            // for most of their rows in a part: the heaviest users' rows are most of the rows
            // a few hundred users have on a partial day.
            let dense = match level_of_total(filter) && !parts.is_empty() {
                true => rollup::dense_users(&txn).await?,
                false => Default::default(),
            };
            // Without a user filter, other transactions on the request's snapshot, one for each
            // part (at most two): the chosen users' rows of each part are read on its own while
            // the request's transaction reads their cells.
            let besides = match filter.user_id {
                None => crate::db::snapshot_txns(db, &txn, parts.len().min(2)).await?,
                Some(_) => Vec::new(),
            };
            // Every sum of the rows of `part` (with its sign) for the users `users` names (all
            // without it), read on `txn`.
            let part_edges = async |txn: &DatabaseTransaction,
                                    (part, sign): &(UsageFilter, i64),
                                    users: Option<&[i64]>|
                   -> Result<Vec<UserGroup>, DbErr> {
                let split = users
                    .filter(|_| !dense.is_empty())
                    .and_then(|keys| Some((keys, rollup::hour_split(part)?)));
                let Some((keys, (hours, around))) = split else {
                    return Ok(signed(raw_user_groups_of(txn, part, users).await?, *sign).collect());
                };
                let mut edges = Vec::new();
                let (hourly, others): (Vec<i64>, Vec<i64>) = keys.iter().partition(|k| {
                    dense
                        .get(k)
                        .is_some_and(|w| w.holds(hours.first, hours.end))
                });
                if !others.is_empty() {
                    edges.extend(signed(
                        raw_user_groups_of(txn, part, Some(&others)).await?,
                        *sign,
                    ));
                }
                if hourly.is_empty() {
                    return Ok(edges);
                }
                let hours = rollup::hours_plan(hours);
                let cells = user_cell_groups(txn, &hours, filter, Some(&hourly)).await?;
                edges.extend(signed(cells, *sign));
                for (rows, rows_sign) in &around {
                    edges.extend(signed(
                        raw_user_groups_of(txn, rows, Some(&hourly)).await?,
                        sign * rows_sign,
                    ));
                }
                Ok(edges)
            };
            // The parts' sums for `users`: in turn on `txn`, or each on one of `besides` (in
            // turn where two share one), all at once.
            let edges_of = async |users: Option<&[i64]>| -> Result<Vec<UserGroup>, DbErr> {
                let chains: Vec<&DatabaseTransaction> = match besides.is_empty() {
                    true => vec![&txn],
                    false => besides.iter().collect(),
                };
                let n = chains.len();
                let runs = chains.into_iter().enumerate().map(|(i, on)| {
                    let part_edges = &part_edges;
                    let parts = &parts;
                    async move {
                        let mut out = Vec::new();
                        for part in parts.iter().skip(i).step_by(n) {
                            out.extend(part_edges(on, part, users).await?);
                        }
                        Ok::<_, DbErr>(out)
                    }
                });
                let all = futures_util::future::try_join_all(runs).await?;
                Ok(all.into_iter().flatten().collect())
            };
            // Per model or outcome, the rows of users' light months inside the plan's whole
            // months (migration 000030).
            let light = match filter.user_id {
                None if plan.light_months => light_month_groups(&txn, &plan, filter).await?,
                _ => Vec::new(),
            };
            // Every sum of the users `users` names (all without it): cells, pending
            // contributions and the raw rows of `parts`.
            // (The edge rows on the other transactions where there are any, at the same time.)
            let exact_of = async |users: Option<&[i64]>| -> Result<Vec<UserGroup>, DbErr> {
                let cells = async {
                    let mut out = user_cell_groups(&txn, &plan, filter, users).await?;
                    if !matches!(users, Some([])) {
                        out.extend(light_day_groups(&txn, &plan, filter, users).await?);
                        out.extend(light_year_groups(&txn, &plan, filter, users).await?);
                    }
                    Ok::<_, DbErr>(out)
                };
                // Only the chosen users' edge rows: another user's partial sums must not rank.
                let edges = async {
                    match users {
                        Some([]) => Ok(Vec::new()),
                        users => edges_of(users).await,
                    }
                };
                let (mut out, edges) = match besides.is_empty() {
                    false => futures_util::try_join!(cells, edges)?,
                    true => {
                        let out = cells.await?;
                        (out, edges.await?)
                    }
                };
                out.extend(
                    light
                        .iter()
                        .filter(|g| users.is_none_or(|keys| keys.contains(&rollup::key_of(g.user))))
                        .map(|g| UserGroup {
                            user: g.user,
                            sums: g.sums,
                        }),
                );
                out.extend(edges);
                Ok(out)
            };
            let users = match filter.user_id {
                Some(_) => merge_users(&exact_of(None).await?),
                // Without a user filter: first the users whose upper bounds can reach the
                // first `limit` (see `rollup::UserBounds`), exact, when that decides; else
                // every user ranked on calls and tokens (cells, pending contributions and the
                // edges' calls and tokens: exact). Then every sum of the `limit` first only —
                // the edges' too (their other sums, cost above all, cost an aggregate over a
                // partial day's rows three times as much as the ranking's two).
                None => {
                    // In two steps: the first `2 × limit` users, which decide on skewed use
                    // (96 users' bounds reach the 50th total of 30 days from mid-month at
                    // 10,000 Zipf users), then the rest of the bounded users.
                    let bounded = match user_bounds(&txn, filter, &plan, limit).await? {
                        Some(bounds) if bounds.may_decide(limit) => {
                            let first = usize::try_from(first_bounded_users(limit))
                                .unwrap_or(usize::MAX)
                                .min(bounds.keys.len());
                            let mut groups = exact_of(Some(&bounds.keys[..first])).await?;
                            let exact = merge_users(&groups);
                            if bounds_decide(&bounds.first(first), &exact, limit) {
                                Some(exact)
                            } else if first < bounds.keys.len() {
                                groups.extend(exact_of(Some(&bounds.keys[first..])).await?);
                                let exact = merge_users(&groups);
                                bounds_decide(&bounds, &exact, limit).then_some(exact)
                            } else {
                                None
                            }
                        }
                        _ => None,
                    };
                    match bounded {
                        Some(exact) => exact,
                        None => {
                            let keys =
                                rank_every_user(&txn, &plan, filter, &parts, &light, limit).await?;
                            merge_users(&exact_of(Some(&keys)).await?)
                        }
                    }
                }
            };
            for other in besides {
                other.commit().await?;
            }
            users
        }
    };
    let users = finish_by_user(&txn, users, limit).await?;
    txn.commit().await?;
    Ok(users)
}

/// Every user ranked on calls and tokens over `plan`, the raw rows of `parts` (each with its
/// sign) and the light months' groups `light`, the first `limit` keys in `by_user`'s order.
async fn rank_every_user(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
    filter: &UsageFilter,
    parts: &[(UsageFilter, i64)],
    light: &[UserGroup],
    limit: u64,
) -> Result<Vec<i64>, DbErr> {
    let stmt = rank_statement(txn.get_database_backend(), plan, filter);
    // One line per cell, summed here and read by position (see `rollup::Sums::Rank`): 30,000
    // cells by column name took longer than their sum.
    let cells = txn.query_all_raw(stmt).await?;
    let mut rank: std::collections::HashMap<i64, (i64, i64)> =
        std::collections::HashMap::with_capacity(cells.len());
    for r in &cells {
        let (key, calls, tokens) = (int8_at(r, 0)?, int8_at(r, 1)?, int8_at(r, 2)?);
        let e = rank.entry(key).or_default();
        e.0 += calls;
        e.1 += tokens;
    }
    drop(cells);
    for g in light {
        let e = rank.entry(rollup::key_of(g.user)).or_default();
        e.0 += g.sums.total_calls;
        e.1 += g.sums.total_tokens;
    }
    for (part, sign) in parts {
        for (key, calls, tokens) in raw_user_ranks(txn, part, *sign).await? {
            let e = rank.entry(key).or_default();
            e.0 += calls;
            e.1 += tokens;
        }
    }
    // The users whose months in the plan's day runs are light (migration 000031), or whose
    // years in its month runs are (000032), still lack those runs' folded contributions:
    // added exactly for the users that may rank, or for all.
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // The light users who cannot reach the first `limit`: left out, uncounted.
    let mut left_out: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let light_of = async |users: Option<&[i64]>| -> Result<Vec<UserGroup>, DbErr> {
        let mut out = light_day_groups(txn, plan, filter, users).await?;
        out.extend(light_year_groups(txn, plan, filter, users).await?);
        Ok(out)
    };
    let corrections = match light_bounds(txn, plan).await? {
        None => light_of(None).await?,
        Some(bounds) if bounds.is_empty() => Vec::new(),
        Some(bounds) => match undecided_light_users(&rank, &bounds, limit) {
            None => light_of(None).await?,
            Some((undecided, decided)) => {
                left_out = decided;
                match undecided.len() {
                    0 => Vec::new(),
                    n if n > LIGHT_USERS_BY_KEY => light_of(None).await?,
                    _ => light_of(Some(&undecided)).await?,
                }
            }
        },
    };
    for g in &corrections {
        let e = rank.entry(rollup::key_of(g.user)).or_default();
        e.0 += g.sums.total_calls;
        e.1 += g.sums.total_tokens;
    }
    rank.retain(|k, _| !left_out.contains(k));
    let mut keys: Vec<(i64, i64)> = rank
        .into_iter()
        .filter(|(_, (calls, _))| *calls > 0)
        .map(|(k, (_, tokens))| (k, tokens))
        .collect();
    // The order of finish_by_user.
    keys.sort_by_key(|(k, tokens)| by_user_order(rollup::user_of(*k), *tokens));
    keys.truncate(limit);
    Ok(keys.into_iter().map(|(k, _)| k).collect())
}

/// Beyond this many light users to count exactly, [`rank_every_user`] reads every light
/// month's rows in the day runs at once instead of each user's.
const LIGHT_USERS_BY_KEY: usize = 5_000;

/// A UTC month of the day runs of a plan with [`rollup::Plan::light_days`], or a UTC year of
/// the month runs of a plan with [`rollup::Plan::light_years`], as [`rank_every_user`]
/// bounds what its light users' missing day or month cells would add.
struct LightBound {
    /// The users whose month (year) it is full (the others may be light).
    full: std::collections::HashSet<i64>,
    /// How many of the plan's day runs in the month add (rather than take away); for a year,
    /// 1 when any of its month runs adds (together they hold at most the year).
    adds: i64,
    /// The most tokens a light user month (year) holds there (folded): what one adding run's
    /// missing cells can hold at most, rows holding no negative tokens.
    top: i64,
}

/// The most tokens a light user year starting at slot `year` holds (folded): the first of
/// the index of year cells of fewer than `FULL_YEAR_CALLS` calls by tokens (migration 000032).
async fn light_year_top<C: ConnectionTrait>(txn: &C, year: i64) -> Result<i64, DbErr> {
    use migration::rollup::{ALL_USERS, Calendar, FULL_YEAR_CALLS, TOTALS_TABLE};
    Ok(txn
        .query_one_raw(Statement::from_string(
            txn.get_database_backend(),
            format!(
                "SELECT total_tokens FROM {TOTALS_TABLE} WHERE grain = {} AND user_key < {ALL_USERS} \
                 AND calls < {FULL_YEAR_CALLS} AND slot = {year} ORDER BY total_tokens DESC LIMIT 1",
                Calendar::Year.code()
            ),
        ))
        .await?
        .map(|r| int8_at(&r, 0))
        .transpose()?
        .unwrap_or(0)
        .max(0))
}

/// The bounds of [`rank_every_user`]'s light users: the months of the plan's day runs
/// ([`light_day_months`]) and the years of its month runs (migration 000032); `None` where a
/// row holds negative tokens (bounds do not hold: every light user is counted exactly).
async fn light_bounds(
    txn: &DatabaseTransaction,
    plan: &rollup::Plan,
) -> Result<Option<Vec<LightBound>>, DbErr> {
    use migration::rollup::{Calendar, FULL_YEAR_TABLE};
    let day_runs = rollup::light_day_runs(plan);
    let year_runs = rollup::light_year_runs(plan);
    if day_runs.is_empty() && year_runs.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let backend = txn.get_database_backend();
    if txn
        .query_one_raw(negative_tokens_statement(backend))
        .await?
        .is_some()
    {
        return Ok(None);
    }
    // The most tokens a light year holds, once per year that either kind of run reaches.
    let mut years: Vec<i64> = year_runs.iter().map(|(_, _, y)| *y).collect();
    if plan.light_years {
        years.extend(
            day_runs
                .iter()
                .filter_map(|(_, _, m)| rollup::calendar_cell(Calendar::Year, *m))
                .map(|(y, _)| y),
        );
    }
    years.sort_unstable();
    years.dedup();
    let mut year_tops = std::collections::HashMap::new();
    for year in &years {
        year_tops.insert(*year, light_year_top(txn, *year).await?);
    }
    let mut out = light_day_months(txn, &day_runs, &year_tops).await?;
    let mut run_years: Vec<i64> = year_runs.iter().map(|(_, _, y)| *y).collect();
    run_years.sort_unstable();
    run_years.dedup();
    for year in run_years {
        let full = txn
            .query_all_raw(Statement::from_string(
                backend,
                format!("SELECT user_key FROM {FULL_YEAR_TABLE} WHERE slot = {year}"),
            ))
            .await?
            .iter()
            .map(|r| int8_at(r, 0))
            .collect::<Result<_, _>>()?;
        let adds = i64::from(year_runs.iter().any(|(_, sign, y)| *y == year && *sign > 0));
        let top = year_tops.get(&year).copied().unwrap_or(0);
        out.push(LightBound { full, adds, top });
    }
    Ok(Some(out))
}

/// The months of the plan's day runs `runs` ([`rollup::light_day_runs`]). Each month's light
/// users with the most tokens come first in the month cells' index by tokens (migration
/// 000026), so its `top` is read past the full months above it only; a light year's months
/// have no month cell (migration 000032), and hold at most what its year cell does: the most
/// tokens a light year holds, `year_tops` (by year; none before migration 000032).
async fn light_day_months(
    txn: &DatabaseTransaction,
    runs: &[(rollup::Slots, i64, i64)],
    year_tops: &std::collections::HashMap<i64, i64>,
) -> Result<Vec<LightBound>, DbErr> {
    use migration::rollup::{ALL_USERS, Calendar, FULL_MONTH_TABLE, TOTALS_TABLE};
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let mut slots: Vec<i64> = runs.iter().map(|(_, _, m)| *m).collect();
    slots.sort_unstable();
    slots.dedup();
    let mut out = Vec::new();
    for month in slots {
        let full = txn
            .query_all_raw(Statement::from_string(
                backend,
                format!("SELECT user_key FROM {FULL_MONTH_TABLE} WHERE slot = {month}"),
            ))
            .await?
            .iter()
            .map(|r| int8_at(r, 0))
            .collect::<Result<_, _>>()?;
        let top = txn
            .query_one_raw(Statement::from_string(
                backend,
                format!(
                    "SELECT t.total_tokens FROM {TOTALS_TABLE} t WHERE t.grain = {} AND t.slot = {month} \
                     AND t.user_key < {ALL_USERS} AND NOT EXISTS (SELECT 1 FROM {FULL_MONTH_TABLE} f \
                     WHERE f.user_key = t.user_key AND f.slot = {month}) ORDER BY t.total_tokens DESC LIMIT 1",
                    Calendar::Month.code()
                ),
            ))
            .await?
            .map(|r| int8_at(&r, 0))
            .transpose()?
            .unwrap_or(0)
            .max(0);
        let year_top = rollup::calendar_cell(Calendar::Year, month)
            .and_then(|(year, _)| year_tops.get(&year).copied())
            .unwrap_or(0);
        let top = top.max(year_top);
        let adds = runs
            .iter()
            .filter(|(_, sign, m)| *m == month && *sign > 0)
            .count() as i64;
        out.push(LightBound { full, adds, top });
    }
    Ok(out)
}

/// Which users of `rank` may be among the first `limit` once the missing day and month cells of
/// their light months and years ([`light_bounds`]) are counted (`undecided`), and which cannot
/// (`decided`: left out). A user full in every month is exact already; any other can gain at
/// most each adding run's `top` where the month is not full (a run that takes away only
/// lowers the total), so it is undecided when its total plus that reaches the `limit`-th total
/// of the exact users. `None` when a user with no cell in the runs could reach it, or the exact
/// users are too few: then every light user is counted.
fn undecided_light_users(
    rank: &std::collections::HashMap<i64, (i64, i64)>,
    months: &[LightBound],
    limit: usize,
) -> Option<(Vec<i64>, std::collections::HashSet<i64>)> {
    use migration::rollup::ALL_USERS;
    let gain = |key: i64| -> Option<i64> {
        if key >= ALL_USERS {
            return None;
        }
        let mut gain = None;
        for m in months.iter().filter(|m| !m.full.contains(&key)) {
            let g: &mut i64 = gain.get_or_insert(0);
            *g = g.saturating_add(m.adds.saturating_mul(m.top));
        }
        gain
    };
    let mut exact: Vec<i64> = rank
        .iter()
        .filter(|(k, (calls, _))| *calls > 0 && gain(**k).is_none())
        .map(|(_, (_, tokens))| *tokens)
        .collect();
    let nth = limit.checked_sub(1).filter(|n| *n < exact.len())?;
    let (_, &mut cut, _) = exact.select_nth_unstable_by(nth, |a, b| b.cmp(a));
    // A user with nothing in the runs' cells gains at most every month's.
    let most = months
        .iter()
        .fold(0i64, |a, m| a.saturating_add(m.adds.saturating_mul(m.top)));
    if most >= cut {
        return None;
    }
    let mut undecided = Vec::new();
    let mut decided = std::collections::HashSet::new();
    for (key, (_, tokens)) in rank {
        if let Some(g) = gain(*key) {
            match tokens.saturating_add(g) >= cut {
                true => undecided.push(*key),
                false => {
                    decided.insert(*key);
                }
            }
        }
    }
    Some((undecided, decided))
}

/// Whether `filter`'s sums over all users come from the totals table (all models and
/// outcomes): where the dense users' hours can stand for their rows.
fn level_of_total(filter: &UsageFilter) -> bool {
    rollup::level_of(filter, rollup::GroupBy::User) == migration::rollup::Level::Total
}

/// The largest `user_limit` ranked through bounds (beyond it, bounds would read most users).
const BOUNDED_LIMIT: u64 = 250;

/// How many users `by_user` reads exactly through bounds for `limit` shown.
pub fn bounded_users(limit: u64) -> u64 {
    (limit * 4).max(20)
}

/// How many of the [`bounded_users`] `by_user` reads exactly first (the rest only when these
/// do not decide).
pub(crate) fn first_bounded_users(limit: u64) -> u64 {
    (limit * 2).max(20)
}

/// The cover of `filter` ([`rollup::month_cover`]) and its plan, where `by_user` (no user
/// filter, all models and outcomes, at most [`BOUNDED_LIMIT`] shown) ranks through bounds
/// over it: `None` where bounds do not hold (a row with negative tokens, a cover reaching
/// before the retention horizon) or would read no fewer cells per user than `plan` and no
/// fewer raw rows (a range of whole months, all time) without the calendar cells' lists of
/// top users ([`rollup::top_bound_statement`]).
pub async fn bound_plan<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    plan: &rollup::Plan,
    limit: u64,
) -> Result<Option<(UsageFilter, rollup::Plan)>, DbErr> {
    if limit == 0
        || limit > BOUNDED_LIMIT
        || filter.user_id.is_some()
        || rollup::level_of(filter, rollup::GroupBy::User) != migration::rollup::Level::Total
    {
        return Ok(None);
    }
    let Some(cover) = rollup::month_cover(filter) else {
        return Ok(None);
    };
    let Some(cover_plan) = rollup::plan(db, &cover, None, true).await? else {
        return Ok(None);
    };
    let raw_parts = !plan.edges.is_empty() || !plan.minus.is_empty();
    // Each calendar cell's top users bound far fewer cells than every user's, even where the
    // cover is the range itself (all time, whole months).
    let lists = rollup::top_bound_statement(
        db.get_database_backend(),
        &cover_plan,
        top_listed_users(bounded_users(limit)),
    )
    .is_some();
    if !cover_plan.edges.is_empty()
        || !cover_plan.minus.is_empty()
        || (!raw_parts
            && !lists
            && rollup::cells_per_user(plan) <= rollup::cells_per_user(&cover_plan))
    {
        return Ok(None);
    }
    if let Some(horizon) = crate::retention::horizon_slot(db).await?
        && cover_plan.slots.first < horizon
    {
        return Ok(None);
    }
    if db
        .query_one_raw(negative_tokens_statement(db.get_database_backend()))
        .await?
        .is_some()
    {
        return Ok(None);
    }
    Ok(Some((cover, cover_plan)))
}

/// Whether any row holds negative tokens (a line if so), read through the partial index of
/// migration 000024, normally empty.
pub fn negative_tokens_statement(backend: DbBackend) -> Statement {
    Statement::from_string(
        backend,
        "SELECT 1 FROM llm_tracker_usage WHERE total_tokens < 0 LIMIT 1",
    )
}

/// The users whose exact sums may decide `by_user`'s first `limit` over `filter` (see
/// [`bound_plan`]): the `max(4 × limit, 20)` highest upper bounds over the range's
/// [`rollup::month_cover`], and the highest one left out.
pub async fn user_bounds<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    plan: &rollup::Plan,
    limit: u64,
) -> Result<Option<rollup::UserBounds>, DbErr> {
    let Some((cover, cover_plan)) = bound_plan(db, filter, plan, limit).await? else {
        return Ok(None);
    };
    // The share of the cover's time inside the range, both cut at the first and last slot
    // with a cell or pending contribution (an open end reaches the end of its year).
    let share = match rollup::extent(db).await? {
        None => 1.0,
        Some((first, last)) => {
            let slot =
                |t: DateTime<Utc>| t.timestamp().div_euclid(migration::rollup::SLOT_SECONDS) as f64;
            let (first, end) = (first as f64, (last + 1) as f64);
            let lo = filter.start.map_or(first, slot).max(first);
            let hi = filter.end.map_or(end, |e| slot(e) + 1.0).min(end);
            let cover_lo = (cover_plan.slots.first as f64).max(first);
            let cover_hi = (cover_plan.slots.end as f64).min(end);
            if cover_hi > cover_lo {
                ((hi - lo) / (cover_hi - cover_lo)).clamp(0.0, 1.0)
            } else {
                1.0
            }
        }
    };
    let n = bounded_users(limit);
    let backend = db.get_database_backend();
    // A user's light years have no month cells (migration 000032): a listed user's months
    // of a light year in the cover are bounded by its year cell, and any other user's by the
    // most tokens a light year holds.
    // A year whose largest light year holds no tokens adds nothing to anyone's bound, so its
    // users' year cells are not looked up: at 10,000 users, where no year is light, that
    // lookup of the ~400 listed users was 5 ms of every bounded `by_user` (its parse, plan and
    // run).
    let mut years = Vec::new();
    let mut missing = 0i64;
    for year in cover_light_years(&cover_plan) {
        let top = light_year_top(db, year).await?;
        if top > 0 {
            years.push(year);
        }
        missing = missing.saturating_add(top);
    }
    let stmt = match bounds_query(backend, &cover, &cover_plan, n) {
        BoundsQuery::Top { statement, k } => {
            let (unlisted, mut users) = top_lists(db.query_all_raw(statement).await?, k)?;
            let unlisted = match missing {
                0 => unlisted,
                m => Some(unlisted.unwrap_or(0) + i128::from(m)),
            };
            let keys: Vec<i64> = users.keys().copied().collect();
            for (key, tokens) in light_year_tokens(db, Some(&keys), &years).await? {
                *users.entry(key).or_default() += i128::from(tokens);
            }
            return Ok(Some(ranked_bounds(users, unlisted, n, share)));
        }
        BoundsQuery::Sum(statement) => statement,
    };
    let mut bounds = rollup::UserBounds {
        keys: Vec::new(),
        bounds: Vec::new(),
        rest: None,
        share,
    };
    for r in db.query_all_raw(stmt).await? {
        let (key, tokens): (i64, f64) = (r.try_get_by_index(0)?, r.try_get_by_index(1)?);
        if (bounds.keys.len() as u64) < n {
            bounds.keys.push(key);
            bounds.bounds.push(tokens);
        } else {
            bounds.rest = Some(tokens);
        }
    }
    if !years.is_empty() {
        let light = light_year_tokens(db, Some(&bounds.keys), &years).await?;
        let mut pairs: Vec<(i64, f64)> = bounds
            .keys
            .iter()
            .zip(&bounds.bounds)
            .map(|(k, b)| (*k, b + light.get(k).copied().unwrap_or(0) as f64))
            .collect();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        (bounds.keys, bounds.bounds) = pairs.into_iter().unzip();
        if missing > 0 {
            bounds.rest = Some(bounds.rest.unwrap_or(0.0) + missing as f64);
        }
    }
    Ok(Some(bounds))
}

/// The years of a cover plan's month runs that add ([`rollup::light_year_runs`]): where a
/// user's light year has no month cells to bound it by (migration 000032).
pub fn cover_light_years(cover_plan: &rollup::Plan) -> Vec<i64> {
    let mut years: Vec<i64> = rollup::light_year_runs(cover_plan)
        .iter()
        .filter(|(_, sign, _)| *sign > 0)
        .map(|(_, _, y)| *y)
        .collect();
    years.sort_unstable();
    years.dedup();
    years
}

/// Each user's tokens in its light years among `years` (year cells without a
/// [`migration::rollup::FULL_YEAR_TABLE`] line): the users `keys` (rollup keys), every user
/// without it. What a user's months of those years hold at most, rows holding no negative
/// tokens.
pub async fn light_year_tokens<C: ConnectionTrait>(
    db: &C,
    keys: Option<&[i64]>,
    years: &[i64],
) -> Result<std::collections::HashMap<i64, i64>, DbErr> {
    use migration::rollup::{ALL_USERS, Calendar, FULL_YEAR_TABLE, TOTALS_TABLE};
    let mut out = std::collections::HashMap::new();
    if years.is_empty() || matches!(keys, Some([])) {
        return Ok(out);
    }
    let list = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    let backend = db.get_database_backend();
    let lateral = Dialect::of(backend).lateral_joins();
    let year = Calendar::Year.code();
    let not_full = format!(
        "t.user_key < {ALL_USERS} AND NOT EXISTS \
         (SELECT 1 FROM {FULL_YEAR_TABLE} y WHERE y.user_key = t.user_key AND y.slot = t.slot)"
    );
    let sql = match keys {
        // Where `LATERAL` joins exist (PostgreSQL): one key lookup per listed user. Given
        // `user_key IN (…)` PostgreSQL walked the year's cells by tokens instead and filtered
        // the list out of them: 20–24 ms for 400 users at 100,000 (every user's year cell),
        // 2.2 ms this way (`EXPLAIN ANALYZE`).
        Some(keys) if lateral => format!(
            "SELECT t.user_key, t.total_tokens FROM (VALUES {}) u (k) CROSS JOIN LATERAL \
             (SELECT c.user_key, c.slot, c.total_tokens FROM {TOTALS_TABLE} c \
             WHERE c.grain = {year} AND c.user_key = u.k AND c.slot IN ({}) OFFSET 0) t \
             WHERE {not_full}",
            keys.iter()
                .map(|k| format!("({k})"))
                .collect::<Vec<_>>()
                .join(", "),
            list(years),
        ),
        _ => format!(
            "SELECT t.user_key, t.total_tokens FROM {TOTALS_TABLE} t WHERE t.grain = {year} \
             AND t.slot IN ({}){} AND {not_full}",
            list(years),
            match keys {
                Some(keys) => format!(" AND t.user_key IN ({})", list(keys)),
                None => String::new(),
            },
        ),
    };
    let rows = db
        .query_all_raw(Statement::from_string(backend, sql))
        .await?;
    for r in &rows {
        let (key, tokens) = (int8_at(r, 0)?, int8_at(r, 1)?);
        *out.entry(key).or_default() += tokens.max(0);
    }
    Ok(out)
}

/// The statement [`user_bounds`] bounds users with over `cover` (a [`bound_plan`]'s) for `limit`
/// shown: each month's users with the most tokens where the cover is whole months, else every
/// user's cells summed.
pub fn bounds_statement(
    backend: DbBackend,
    cover: &UsageFilter,
    cover_plan: &rollup::Plan,
    limit: u64,
) -> Statement {
    match bounds_query(backend, cover, cover_plan, bounded_users(limit)) {
        BoundsQuery::Top { statement, .. } | BoundsQuery::Sum(statement) => statement,
    }
}

/// How [`user_bounds`] bounds `n` users over a cover.
enum BoundsQuery {
    /// Each month's `k` users with the most tokens ([`rollup::top_bound_statement`]).
    Top { statement: Statement, k: u64 },
    /// Every user's cells summed, the `n + 1` highest ([`rollup::bound_statement`]).
    Sum(Statement),
}

fn bounds_query(
    backend: DbBackend,
    cover: &UsageFilter,
    cover_plan: &rollup::Plan,
    n: u64,
) -> BoundsQuery {
    let k = top_listed_users(n);
    match rollup::top_bound_statement(backend, cover_plan, k) {
        Some(statement) => BoundsQuery::Top { statement, k },
        None => BoundsQuery::Sum(rollup::bound_statement(backend, cover_plan, cover, n + 1)),
    }
}

/// How many users of each month cell [`rollup::top_bound_statement`] lists when `by_user`
/// bounds `n` users: twice as many, so that the tokens of a user in no list (at most the sum
/// of the lists' last tokens) fall well below the `n`-th bound on skewed use (30 days from
/// mid-month at 10,000 Zipf users: the 400th tokens of the two months sum to 631,053, the
/// 201st bound is 1,273,340).
pub fn top_listed_users(n: u64) -> u64 {
    n.saturating_mul(2).max(40)
}

/// What a user in no list can have, and each listed user's bound ([`top_lists`]).
type TopLists = (Option<i128>, std::collections::HashMap<i64, i128>);

/// The lines of [`rollup::top_bound_statement`] (lists of `k` users per calendar cell): what a
/// user in no list can have at most (`None`: no list is full), and each listed user's bound.
fn top_lists(rows: Vec<sea_orm::QueryResult>, k: u64) -> Result<TopLists, DbErr> {
    let k = i64::try_from(k).unwrap_or(i64::MAX);
    let mut unlisted: Option<i128> = None;
    let mut users: std::collections::HashMap<i64, i128> = std::collections::HashMap::new();
    for r in rows {
        let (kind, key, v, len): (i32, i64, i64, i64) = (
            r.try_get_by_index(0)?,
            r.try_get_by_index(1)?,
            r.try_get_by_index(2)?,
            r.try_get_by_index(3)?,
        );
        match kind {
            // A full list: a user left out of it has at most its last tokens there.
            0 if len >= k => *unlisted.get_or_insert(0) += i128::from(v),
            0 => {}
            _ => *users.entry(key).or_default() += i128::from(v),
        }
    }
    Ok((unlisted, users))
}

/// The bounds of the `n` users with the highest of `users` (from [`top_lists`], with their
/// light years, migration 000032): every listed user's exact bound over the cover (a light
/// year's months by its year cell), and as `rest` the highest of the next listed user's and
/// of what a user in no list can have, `unlisted` (`None`: every user with a cell is among the
/// `n`).
fn ranked_bounds(
    users: std::collections::HashMap<i64, i128>,
    unlisted: Option<i128>,
    n: u64,
    share: f64,
) -> rollup::UserBounds {
    let mut ranked: Vec<(i64, f64)> = users.into_iter().map(|(key, b)| (key, b as f64)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let cut = usize::try_from(n).unwrap_or(usize::MAX).min(ranked.len());
    let rest = ranked
        .get(cut)
        .map(|(_, b)| *b)
        .into_iter()
        .chain(unlisted.map(|b| b as f64))
        .reduce(f64::max);
    ranked.truncate(cut);
    let (keys, bounds) = ranked.into_iter().unzip();
    rollup::UserBounds {
        keys,
        bounds,
        rest,
        share,
    }
}

/// Whether the exact sums of the bounded users decide `by_user`'s first `limit`: every user
/// left out has tokens at most `rest`, below the `limit`-th highest exact tokens. (A bound
/// of 2^52 or more may have lost its last digits as a double: then it decides nothing.)
fn bounds_decide(
    bounds: &rollup::UserBounds,
    exact: &[(Option<i32>, TokenSums)],
    limit: u64,
) -> bool {
    let Some(rest) = bounds.rest else {
        return true;
    };
    if rest.is_nan() || rest >= 4_503_599_627_370_496.0 {
        return false;
    }
    let mut tokens: Vec<i64> = exact.iter().map(|(_, s)| s.total_tokens).collect();
    let Some(nth) = usize::try_from(limit).ok().and_then(|l| l.checked_sub(1)) else {
        return false;
    };
    if tokens.len() <= nth {
        return false;
    }
    let (_, &mut limit_th, _) = tokens.select_nth_unstable_by(nth, |a, b| b.cmp(a));
    rest < limit_th as f64
}

/// Each user's calls and tokens in the rows of `filter`, as `(rollup key, calls, tokens)`
/// times `sign` (what [`stats_by_user`] ranks on).
async fn raw_user_ranks(
    txn: &DatabaseTransaction,
    filter: &UsageFilter,
    sign: i64,
) -> Result<Vec<(i64, i64, i64)>, DbErr> {
    let backend = txn.get_database_backend();
    let stmt = usage::Entity::find()
        .select_only()
        .column(usage::Column::UserId)
        .column_as(Expr::cust(raw_sum_sql(backend, Sum::Calls)), "calls")
        .column_as(Expr::cust(raw_sum_sql(backend, Sum::Total)), "tokens")
        .filter(filter.condition(backend))
        .group_by(usage::Column::UserId)
        .build(backend);
    txn.query_all_raw(stmt)
        .await?
        .iter()
        .map(|r| {
            let user: Option<i32> = r.try_get_by_index(0)?;
            let calls: i64 = r.try_get_by_index(1)?;
            let tokens: i64 = r.try_get_by_index(2)?;
            Ok((rollup::key_of(user), sign * calls, sign * tokens))
        })
        .collect()
}

/// The ranking statement of [`stats_by_user`] without a user filter: every user's calls and
/// tokens over the plan's cells and pending contributions (on PostgreSQL an index-only scan of
/// the totals table's `(grain, slot, user_key) INCLUDE (calls, total_tokens)` index).
pub(crate) fn rank_statement(
    backend: DbBackend,
    plan: &rollup::Plan,
    filter: &UsageFilter,
) -> Statement {
    rollup::statement_with(
        backend,
        plan,
        filter,
        rollup::GroupBy::User,
        rollup::Sums::Rank,
        None,
    )
}

/// [`stats_by_user`] from the raw rows only.
pub async fn stats_by_user_raw(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    limit: u64,
) -> Result<Vec<UserStats>, DbErr> {
    let groups = raw_user_groups(db, filter).await?;
    finish_by_user(db, merge_users(&groups), limit).await
}

/// The order of `by_user`: tokens descending, then users by id, the calls made for no user
/// last.
fn by_user_order(user: Option<i32>, tokens: i64) -> (std::cmp::Reverse<i64>, bool, Option<i32>) {
    (std::cmp::Reverse(tokens), user.is_none(), user)
}

/// Each user's groups summed, the users with a call only.
fn merge_users(groups: &[UserGroup]) -> Vec<(Option<i32>, TokenSums)> {
    let mut merged: BTreeMap<Option<i32>, TokenSums> = BTreeMap::new();
    for g in groups {
        *merged.entry(g.user).or_default() += g.sums;
    }
    merged
        .into_iter()
        .filter(|(_, s)| s.total_calls > 0)
        .collect()
}

/// Users ([`merge_users`]) ordered and cut, with their usernames.
async fn finish_by_user<C: ConnectionTrait>(
    db: &C,
    mut users: Vec<(Option<i32>, TokenSums)>,
    limit: u64,
) -> Result<Vec<UserStats>, DbErr> {
    use crate::db::entities::auth_user;
    use sea_orm::ColumnTrait;
    users.sort_by_key(|(u, s)| by_user_order(*u, s.total_tokens));
    users.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let ids: Vec<i32> = users.iter().filter_map(|(u, _)| *u).collect();
    let names: BTreeMap<i32, String> = if ids.is_empty() {
        BTreeMap::new()
    } else {
        auth_user::Entity::find()
            .select_only()
            .column(auth_user::Column::Id)
            .column(auth_user::Column::Username)
            .filter(auth_user::Column::Id.is_in(ids))
            .into_tuple::<(i32, String)>()
            .all(db)
            .await?
            .into_iter()
            .collect()
    };
    Ok(users
        .into_iter()
        .map(|(user_id, sums)| {
            UserStats::new(user_id, user_id.and_then(|u| names.get(&u).cloned()), sums)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use sea_orm::{Database, Statement};

    use super::*;

    /// `rank_every_user` over light months' days (migration 000031): a user full in every
    /// month is exact; another can gain at most each adding run's largest light month where it
    /// is not full, and is left out when even that stays below the `limit`-th exact total.
    #[test]
    fn light_users_that_cannot_reach_the_cut_are_left_out() {
        use std::collections::{HashMap, HashSet};
        let month = |full: &[i64], adds: i64, top: i64| LightBound {
            full: full.iter().copied().collect(),
            adds,
            top,
        };
        // Users 1–3 full in every month; 4 light in the second (gains at most 2 × 50), 5 light
        // in the first two (30 + 2 × 50), 6 light in the second and in a third whose only run
        // takes days away (2 × 50 + 0).
        let months = [
            month(&[1, 2, 3, 4, 6], 1, 30),
            month(&[1, 2, 3], 2, 50),
            month(&[1, 2, 3, 4, 5], 0, 1_000),
        ];
        let rank: HashMap<i64, (i64, i64)> = [
            (1, (5, 1_000)),
            (2, (4, 400)),
            (3, (3, 300)),
            (4, (2, 201)),
            (5, (1, 150)),
            (6, (1, 199)),
        ]
        .into_iter()
        .collect();
        // Limit 2: the cut is user 2's 400; 4 reaches 301, 5 reaches 280, 6 reaches 299.
        let (undecided, decided) = undecided_light_users(&rank, &months, 2).unwrap();
        assert!(undecided.is_empty());
        assert_eq!(decided, HashSet::from([4, 5, 6]));
        // Limit 3: the cut is 300; only 4 (201 + 100) may reach it. A user with nothing in the
        // cells gains up to 130 < 300.
        let (undecided, decided) = undecided_light_users(&rank, &months, 3).unwrap();
        assert_eq!(undecided, vec![4]);
        assert_eq!(decided, HashSet::from([5, 6]));
        // Too few exact users for the limit, or a light month large enough for a user with no
        // cell to reach the cut: every light user is counted.
        assert!(undecided_light_users(&rank, &months, 4).is_none());
        let big = [month(&[1, 2, 3], 1, 400)];
        assert!(undecided_light_users(&rank, &big, 2).is_none());
        // The calls made for no user are never light.
        let no_user: HashMap<i64, (i64, i64)> =
            [(1, (1, 10)), (migration::rollup::NO_USER, (1, 5))]
                .into_iter()
                .collect();
        let (undecided, decided) = undecided_light_users(&no_user, &[month(&[], 1, 1)], 1).unwrap();
        assert_eq!((undecided, decided), (vec![1], HashSet::new()));
    }

    #[test]
    fn a_series_item_writes_serde_s_json() {
        let labels = [
            "2025-01-31T10:00:00+00:00",
            "2024-03-10T03:00:00-04:00",
            "2025-01-31T10:15:00+05:45",
            "2025-01-31",
            "",
            "a \"quoted\" \\ label\n\u{7}é",
        ];
        let numbers = [0, 1, -1, 42, 1_000_000, i64::MAX, i64::MIN];
        let costs = [
            0,
            1,
            1280,
            1_000_000,
            1_500_000,
            -5,
            75_003_911_637,
            i64::MAX,
        ];
        let mut n = 0;
        for label in labels {
            for (i, &x) in numbers.iter().enumerate() {
                for &cost in &costs {
                    let pick = |k: usize| numbers[(i + k) % numbers.len()];
                    let item = SeriesItem {
                        bucket: label.to_owned(),
                        total_calls: x,
                        total_prompt_tokens: pick(1),
                        total_completion_tokens: pick(2),
                        total_tokens: pick(3),
                        total_cached_tokens: pick(4),
                        total_reasoning_tokens: pick(5),
                        total_cost: Usd(cost),
                        successful_calls: pick(6),
                    };
                    let mut out = b"[".to_vec();
                    item.write_json(&mut out).unwrap();
                    assert_eq!(
                        String::from_utf8(out[1..].to_vec()).unwrap(),
                        serde_json::to_string(&item).unwrap(),
                        "{item:?}"
                    );
                    assert_eq!(out[0], b'[', "appended, not written over");
                    n += 1;
                }
            }
        }
        assert_eq!(n, 6 * 7 * 8);
    }

    #[test]
    fn a_users_gaps_are_halved_by_their_calls_at_a_slot_boundary() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let slot = |s: &str| at(s).timestamp() / 900;
        let micro = chrono::Duration::microseconds(1);
        let gap = |a: &str, b: &str| UsageFilter {
            start: Some(at(a)),
            end: Some(at(b) - micro),
            user_id: Some(7),
            ..Default::default()
        };
        let month = |a: &str, b: &str, calls| (slot(a), slot(b), calls);
        // January (100 calls) and March (300) read from rows; February's 1,000 are in cells.
        let gaps = [
            gap("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
            gap("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
        ];
        let months = [
            month("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 100),
            month("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", 1_000),
            month("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z", 300),
        ];
        let (early, late) = row_halves(&gaps, &months).unwrap();
        // Half of 400 is January's 100 and a third of March: 10 days 8 hours, on a slot.
        let cut = at("2026-03-11T08:00:00Z");
        assert_eq!(
            early,
            vec![
                gaps[1].clone(),
                UsageFilter {
                    end: Some(cut - micro),
                    ..gaps[0].clone()
                }
            ]
        );
        assert_eq!(
            late,
            vec![UsageFilter {
                start: Some(cut),
                ..gaps[0].clone()
            }]
        );
        // All the calls in the later gap: the cut is inside it, the first gap early whole.
        let (early, late) = row_halves(&gaps, &months[1..]).unwrap();
        assert_eq!(early.len(), 2);
        assert_eq!(early[0], gaps[1]);
        assert_eq!(late[0].start, Some(at("2026-03-16T12:00:00Z")));
        // A cut that falls inside a slot goes down to the slot's start: three slots, halved
        // at 00:22:30.
        let three = [gap("2026-03-01T00:00:00Z", "2026-03-01T00:45:00Z")];
        let (early, late) = row_halves(&three, &months).unwrap();
        let cut = at("2026-03-01T00:15:00Z");
        assert_eq!(early[0].end, Some(cut - micro));
        assert_eq!((late[0].start, late[0].end), (Some(cut), three[0].end));
        // No calls known in the gaps, or nothing before the cut: no halves.
        assert_eq!(row_halves(&gaps, &months[1..2]), None);
        assert_eq!(row_halves(&gaps, &[]), None);
        let first_slot_only = [month("2026-03-01T00:00:00Z", "2026-03-01T00:15:00Z", 2)];
        assert_eq!(row_halves(&gaps[..1], &first_slot_only), None);
    }

    /// A row written with the aliases of [`col`] and [`TokenSums::select`] reads back into a
    /// [`Group`] field by field, whatever the order of the columns: an alias cannot drift from
    /// its field, and a statement need not list them in one order.
    #[tokio::test]
    async fn a_group_reads_back_the_columns_named_here() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        let sums = TokenSums::select(|s| {
            (10 + TokenSums::COLUMNS
                .iter()
                .position(|(c, _)| *c == s)
                .unwrap())
            .to_string()
        });
        let mut columns: Vec<String> = vec![
            format!("'gpt' AS {}", col::MODEL),
            format!("'7' AS {}", col::BUCKET),
            sums,
            format!("2 AS {}", col::SUCCESSFUL),
            format!("3 AS {}", col::UNPRICED),
            format!("4 AS {}", col::LATENCY_US),
            format!("5 AS {}", col::LATENCY_N),
            format!("6 AS {}", col::USER_KEY),
            format!("8 AS {}", col::TTFT_US),
            format!("9 AS {}", col::TTFT_N),
        ];
        let forward = format!("SELECT {}", columns.join(", "));
        columns.reverse();
        let backward = format!("SELECT {}", columns.join(", "));
        let read = |sql: String| {
            let db = &db;
            async move {
                let mut groups = all_groups(db, Statement::from_string(DbBackend::Sqlite, sql))
                    .await
                    .unwrap();
                assert_eq!(groups.len(), 1);
                groups.remove(0)
            }
        };
        let (g, b) = (read(forward).await, read(backward).await);
        assert_eq!(format!("{g:?}"), format!("{b:?}"));
        assert_eq!(
            g.sums,
            TokenSums::try_from_fn(|k| Ok::<i64, ()>(10 + k as i64)).unwrap()
        );
        assert_eq!(g.model.as_deref(), Some("gpt"));
        assert_eq!(g.bucket, Some(7 * 900));
        assert_eq!(
            (
                g.successful_calls,
                g.unpriced_calls,
                g.latency_us,
                g.latency_n,
                g.ttft_us,
                g.ttft_n
            ),
            (2, 3, 4, 5, 8, 9)
        );
        assert_eq!(g.sums.total_calls, 10);
        assert_eq!(g.sums.cost_micros, 16);
    }
}
