//! token-stats: summary, per-model breakdown and time series, from one SQL aggregate.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QuerySelect, Select, TransactionTrait,
};
use serde::Serialize;
use utoipa::ToSchema;

use super::UsageFilter;
use super::buckets::{bucket_of, buckets_between};
use crate::db::entities::usage;
use crate::pricing::{CURRENCY, Usd};

/// Sums over the matching rows; zeros when nothing matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
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
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            total_prompt_tokens: 0,
            total_completion_tokens: 0,
            total_tokens: 0,
            total_cached_tokens: 0,
            total_reasoning_tokens: 0,
            total_calls: 0,
            successful_calls: 0,
            failed_calls: 0,
            total_cost: Usd(0),
            total_cost_currency: CURRENCY,
            unpriced_calls: 0,
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
}

/// Series granularity: `day` → hourly buckets, `month` → daily, `year` → monthly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Day,
    Month,
    Year,
}

impl Granularity {
    /// Case-insensitive, trimmed; `None` for anything else.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "year" => Some(Self::Year),
            _ => None,
        }
    }

    /// The bucket's start as SQL text `YYYY-MM-DD HH:MM:SS` (UTC), the one place the two
    /// backends differ. Grouping on PostgreSQL's `date_trunc` (not on a formatted string) keeps
    /// the per-row work small; the label is formatted once per bucket, in Rust.
    fn bucket_start_sql(self, backend: DbBackend) -> (&'static str, &'static str) {
        // (grouping expression, its text form)
        match (backend, self) {
            (DbBackend::Postgres, Self::Day) => (
                "date_trunc('hour', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('hour', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (DbBackend::Postgres, Self::Month) => (
                "date_trunc('day', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('day', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (DbBackend::Postgres, Self::Year) => (
                "date_trunc('month', created_at AT TIME ZONE 'UTC')",
                "CAST(date_trunc('month', created_at AT TIME ZONE 'UTC') AS TEXT)",
            ),
            (_, Self::Day) => (
                "strftime('%Y-%m-%d %H:00:00', created_at)",
                "strftime('%Y-%m-%d %H:00:00', created_at)",
            ),
            (_, Self::Month) => (
                "strftime('%Y-%m-%d 00:00:00', created_at)",
                "strftime('%Y-%m-%d 00:00:00', created_at)",
            ),
            (_, Self::Year) => (
                "strftime('%Y-%m-01 00:00:00', created_at)",
                "strftime('%Y-%m-01 00:00:00', created_at)",
            ),
        }
    }
}

/// The 15-minute UTC slot of each row (`epoch seconds / 900`), as text: every real time-zone
/// offset is a whole number of slots, so local buckets are unions of slots.
fn slot_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => {
            "CAST(CAST(floor(extract(epoch FROM created_at) / 900) AS BIGINT) AS TEXT)"
        }
        _ => "CAST(CAST(strftime('%s', created_at) AS INTEGER) / 900 AS TEXT)",
    }
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

const SUMS: [(&str, &str); 5] = [
    ("COALESCE(SUM(prompt_tokens), 0)", "total_prompt_tokens"),
    (
        "COALESCE(SUM(completion_tokens), 0)",
        "total_completion_tokens",
    ),
    ("COALESCE(SUM(total_tokens), 0)", "total_tokens"),
    ("COALESCE(SUM(cached_tokens), 0)", "total_cached_tokens"),
    (
        "COALESCE(SUM(reasoning_tokens), 0)",
        "total_reasoning_tokens",
    ),
];

/// The sum of `cost` in micro-dollars: PostgreSQL sums `numeric` USD exactly, SQLite sums
/// integer micro-dollars exactly; NULLs (unpriced) are skipped.
fn cost_sum_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "CAST(COALESCE(SUM(cost), 0) * 1000000 AS BIGINT)",
        _ => "CAST(COALESCE(SUM(cost), 0) AS BIGINT)",
    }
}

/// Latency in whole microseconds summed over the rows that have `started_at` (negative clock
/// skew counts as 0), and how many rows those are.
fn latency_sum_sql(backend: DbBackend) -> &'static str {
    match backend {
        // Summing intervals and converting once per group: EXTRACT on every row is numeric
        // arithmetic per row (about 120 ms more at 1M rows).
        DbBackend::Postgres => {
            "CAST(COALESCE(EXTRACT(EPOCH FROM SUM(GREATEST(created_at - started_at, INTERVAL '0'))) * 1000000, 0) AS BIGINT)"
        }
        _ => {
            "CAST(COALESCE(SUM(MAX(0, (unixepoch(created_at, 'subsec') - unixepoch(started_at, 'subsec')) * 1000000)), 0) AS INTEGER)"
        }
    }
}

fn with_sums<S: QuerySelect>(mut q: S, backend: DbBackend) -> S {
    q = q.column_as(Expr::cust("COUNT(*)"), "total_calls");
    for (sql, alias) in SUMS {
        // PostgreSQL's SUM(integer) is bigint; the cast keeps SQLite and PostgreSQL alike.
        q = q.column_as(Expr::cust(format!("CAST({sql} AS BIGINT)")), alias);
    }
    q.column_as(Expr::cust(cost_sum_sql(backend)), "cost_micros")
        .column_as(Expr::cust(latency_sum_sql(backend)), "latency_us")
        .column_as(Expr::cust("CAST(COUNT(started_at) AS BIGINT)"), "latency_n")
        .column_as(
            Expr::cust("CAST(COUNT(*) - COUNT(cost) AS BIGINT)"),
            "unpriced_calls",
        )
        .column_as(
            Expr::cust("CAST(COUNT(*) FILTER (WHERE success) AS BIGINT)"),
            "successful_calls",
        )
}

/// Sums over every matching row, in one pass.
pub async fn summary_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<Summary, DbErr> {
    let backend = db.get_database_backend();
    let q = with_sums(usage::Entity::find().select_only(), backend)
        .column_as(Expr::cust("CAST(NULL AS TEXT)"), "model")
        .column_as(Expr::cust("CAST(NULL AS TEXT)"), "bucket")
        .filter(filter.condition());
    let mut summary = Summary::default();
    if let Some(row) = q.into_model::<Group>().one(db).await? {
        summary.add(&row);
    }
    Ok(summary)
}

impl Summary {
    fn add(&mut self, g: &Group) {
        self.total_calls += g.total_calls;
        self.successful_calls += g.successful_calls;
        self.failed_calls += g.total_calls - g.successful_calls;
        self.total_prompt_tokens += g.total_prompt_tokens;
        self.total_completion_tokens += g.total_completion_tokens;
        self.total_tokens += g.total_tokens;
        self.total_cached_tokens += g.total_cached_tokens;
        self.total_reasoning_tokens += g.total_reasoning_tokens;
        self.total_cost.0 += g.cost_micros;
        self.unpriced_calls += g.unpriced_calls;
    }
}

/// Everything token-stats shows, from one pass over the matching rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStatsData {
    pub summary: Summary,
    pub by_model: Vec<ModelStats>,
    /// `Some` when a granularity was asked for.
    pub series: Option<Vec<SeriesItem>>,
}

/// One `(model, bucket)` group of the single aggregate query behind [`token_stats`].
#[derive(Debug, FromQueryResult)]
struct Group {
    model: Option<String>,
    bucket: Option<String>,
    total_calls: i64,
    successful_calls: i64,
    cost_micros: i64,
    unpriced_calls: i64,
    latency_us: i64,
    latency_n: i64,
    total_prompt_tokens: i64,
    total_completion_tokens: i64,
    total_tokens: i64,
    total_cached_tokens: i64,
    total_reasoning_tokens: i64,
}

/// Calls and the five token sums, added up in Rust from the groups.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    calls: i64,
    prompt: i64,
    completion: i64,
    total: i64,
    cached: i64,
    reasoning: i64,
    cost: i64,
    latency_us: i64,
    latency_n: i64,
}

impl Totals {
    fn add(&mut self, g: &Group) {
        self.calls += g.total_calls;
        self.prompt += g.total_prompt_tokens;
        self.completion += g.total_completion_tokens;
        self.total += g.total_tokens;
        self.cached += g.total_cached_tokens;
        self.reasoning += g.total_reasoning_tokens;
        self.cost += g.cost_micros;
        self.latency_us += g.latency_us;
        self.latency_n += g.latency_n;
    }

    /// Mean latency in seconds (microsecond precision), if any row knows it.
    fn avg_latency_sec(&self) -> Option<f64> {
        (self.latency_n > 0).then(|| (self.latency_us as f64 / self.latency_n as f64).round() / 1e6)
    }
}

/// The model as a grouping key. On SQLite `+model` (a no-op) keeps the planner from walking
/// the `(model, created_at)` index to save a sort: that turns a scan into a million random
/// row lookups (3.2 s instead of 0.95 s for token-stats over 1M rows, measured).
fn model_group(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "model",
        _ => "+model",
    }
}

/// Planner settings for the token-stats aggregate, local to its transaction (PostgreSQL only).
///
/// PostgreSQL cannot estimate how many groups `GROUP BY model, date_trunc(…)` makes (it
/// guesses 10% of the rows, 100,000 at 1M rows, where there are a few hundred), so it sorts a
/// million rows on disk instead of hashing them, and will not aggregate in parallel; JIT then
/// adds ~60 ms of compiling to a query that runs once. The groups are bounded by models ×
/// buckets, so hashing them always fits. Measured at 1M rows (`cargo bench --bench api`):
/// `granularity=month` 735 ms with the defaults, ~300 ms with these.
pub(crate) fn aggregate_settings(backend: DbBackend) -> Option<&'static str> {
    match backend {
        DbBackend::Postgres => Some(
            "SET LOCAL jit = off; SET LOCAL enable_sort = off; \
             SET LOCAL work_mem = '64MB'; SET LOCAL parallel_tuple_cost = 0",
        ),
        _ => None,
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
    .filter(filter.condition())
    .group_by(Expr::cust(model_group(backend)));
    match granularity {
        // In UTC the buckets themselves are grouped in SQL (fewest groups); in any other zone,
        // 15-minute UTC slots, mapped to local buckets in Rust.
        Some(g) if tz == Tz::UTC => {
            let (group, text) = g.bucket_start_sql(backend);
            q.column_as(Expr::cust(text), "bucket")
                .group_by(Expr::cust(group))
        }
        Some(_) => q
            .column_as(Expr::cust(slot_sql(backend)), "bucket")
            .group_by(Expr::cust(slot_sql(backend))),
        None => q.column_as(Expr::cust("CAST(NULL AS TEXT)"), "bucket"),
    }
}

/// The instant a group's bucket text stands for: a UTC bucket start, or a 15-minute slot.
fn group_instant(text: &str, tz: Tz) -> Result<DateTime<Utc>, DbErr> {
    let bad = |e: String| DbErr::Custom(format!("bucket {text:?}: {e}"));
    if tz == Tz::UTC {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
            .map(|t| t.and_utc())
            .map_err(|e| bad(e.to_string()))
    } else {
        let slot: i64 = text
            .parse()
            .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?;
        DateTime::from_timestamp(slot * 900, 0).ok_or_else(|| bad("out of range".into()))
    }
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

/// [`token_stats`] with local buckets in `options.tz` and, with `options.fill` and both ends
/// of the range in `filter`, every bucket of the range (empty ones with zeros). The caller
/// checks the range against [`super::buckets::MAX_BUCKETS`] first.
pub async fn token_stats_in(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
    options: SeriesOptions,
) -> Result<TokenStatsData, DbErr> {
    let backend = db.get_database_backend();
    let tz = options.tz;
    let q = token_stats_query(backend, filter, granularity, tz);
    let groups = match aggregate_settings(backend) {
        Some(settings) => {
            let txn = db.begin().await?;
            txn.execute_unprepared(settings).await?;
            let groups = q.into_model::<Group>().all(&txn).await?;
            txn.commit().await?;
            groups
        }
        None => q.into_model::<Group>().all(db).await?,
    };

    let mut summary = Summary::default();
    let mut models: BTreeMap<&str, Totals> = BTreeMap::new();
    // Local buckets by start instant (labels with offsets do not sort by time across DST).
    let mut buckets: BTreeMap<DateTime<Utc>, (String, Totals)> = BTreeMap::new();
    for g in &groups {
        summary.add(g);
        models
            .entry(g.model.as_deref().unwrap_or_default())
            .or_default()
            .add(g);
        if let (Some(text), Some(gran)) = (&g.bucket, granularity) {
            let b = bucket_of(gran, tz, group_instant(text, tz)?);
            buckets
                .entry(b.start)
                .or_insert_with(|| (b.label, Totals::default()))
                .1
                .add(g);
        }
    }
    if let (Some(gran), true, Some(start), Some(end)) =
        (granularity, options.fill, filter.start, filter.end)
    {
        for b in buckets_between(gran, tz, start, end).unwrap_or_default() {
            buckets
                .entry(b.start)
                .or_insert_with(|| (b.label, Totals::default()));
        }
    }

    let mut by_model: Vec<ModelStats> = models
        .into_iter()
        .map(|(model, t)| ModelStats {
            model: model.to_owned(),
            total_calls: t.calls,
            total_prompt_tokens: t.prompt,
            total_completion_tokens: t.completion,
            total_tokens: t.total,
            total_cached_tokens: t.cached,
            total_reasoning_tokens: t.reasoning,
            total_cost: Usd(t.cost),
            total_cost_currency: CURRENCY,
            avg_latency_sec: t.avg_latency_sec(),
        })
        .collect();
    // Total tokens descending, then model ascending (the map already gave model order).
    by_model.sort_by_key(|m| std::cmp::Reverse(m.total_tokens));

    let series = granularity.map(|_| {
        buckets
            .into_values()
            .map(|(label, t)| SeriesItem {
                bucket: label,
                total_calls: t.calls,
                total_prompt_tokens: t.prompt,
                total_completion_tokens: t.completion,
                total_tokens: t.total,
                total_cached_tokens: t.cached,
                total_reasoning_tokens: t.reasoning,
                total_cost: Usd(t.cost),
            })
            .collect()
    });
    Ok(TokenStatsData {
        summary,
        by_model,
        series,
    })
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

#[derive(Debug, FromQueryResult)]
struct UserGroup {
    user_id: Option<i32>,
    username: Option<String>,
    total_calls: i64,
    total_prompt_tokens: i64,
    total_completion_tokens: i64,
    total_tokens: i64,
    total_cached_tokens: i64,
    total_reasoning_tokens: i64,
    cost_micros: i64,
}

/// Per-user totals, by total tokens descending (then user id, no-user last), at most `limit`.
pub async fn stats_by_user(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    limit: u64,
) -> Result<Vec<UserStats>, DbErr> {
    use sea_orm::{JoinType, QueryOrder, RelationTrait};
    let backend = db.get_database_backend();
    let tokens = "CAST(COALESCE(SUM(llm_tracker_usage.total_tokens), 0) AS BIGINT)";
    let rows = with_sums(usage::Entity::find().select_only(), backend)
        .column(usage::Column::UserId)
        .column_as(crate::db::entities::auth_user::Column::Username, "username")
        .join(JoinType::LeftJoin, usage::Relation::User.def())
        .filter(filter.condition())
        .group_by(usage::Column::UserId)
        .group_by(crate::db::entities::auth_user::Column::Username)
        .order_by_desc(Expr::cust(tokens))
        .order_by_asc(Expr::cust("llm_tracker_usage.user_id IS NULL"))
        .order_by_asc(usage::Column::UserId)
        .limit(limit)
        .into_model::<UserGroup>()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| UserStats {
            user_id: r.user_id,
            username: r.username,
            total_calls: r.total_calls,
            total_prompt_tokens: r.total_prompt_tokens,
            total_completion_tokens: r.total_completion_tokens,
            total_tokens: r.total_tokens,
            total_cached_tokens: r.total_cached_tokens,
            total_reasoning_tokens: r.total_reasoning_tokens,
            total_cost: Usd(r.cost_micros),
            total_cost_currency: CURRENCY,
        })
        .collect())
}
