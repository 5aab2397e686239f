//! Latency percentiles (token-stats `include=latency`): p50, p95 and p99 of `created_at −
//! started_at` over the matching calls that know it, per model and in all, from histograms of
//! fixed log-spaced buckets ([`migration::rollup::latency_bounds`]).
//!
//! The counts per bucket are exact for any range, zone and filter: the histogram cells (UTC
//! months, days and quarter days of all users, per model and outcome, kept by the rollup's
//! triggers and fold, see [`migration::rollup::LATENCY_TABLE`]) cover the whole quarter days of
//! the range, the contributions not folded yet are added, and the rows answer the rest — under
//! six hours at each end. For one user (`user_id`), that user's month cells
//! ([`migration::rollup::USER_LATENCY_TABLE`], migration 000023) cover the whole UTC months of
//! the range and the user's rows the rest, through the `(user_id, created_at)` index (with the
//! day cells that keep what retention deleted there).
//!
//! A percentile is the bucket holding the nearest-rank value (`⌈p·n⌉`-th smallest), reported as
//! `2·lo·hi / (lo + hi)` of that bucket's bounds: within 5 % of the true value (see
//! [`RELATIVE_ERROR_BOUND`]) for latencies up to about 27.8 hours (the last bucket is open).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use migration::rollup::{
    Calendar, DELTA_TABLE, FULL_MONTH_TABLE, LATENCY_TABLE, SLOT_SECONDS, TOTALS_TABLE,
    USER_LATENCY_TABLE, latency_bounds, latency_bucket_sql, latency_us_sql,
    user_latency_stored_sql,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
    FromQueryResult, QueryFilter, QuerySelect, Statement, Value,
};

use super::UsageFilter;
use super::filters::escape_like;
use crate::db::Dialect;
use crate::db::entities::usage;
use crate::db::read_txn;
use crate::usage::rollup::{calendar_cell, first_and_last};

/// The largest relative error of a reported percentile: `(hi − lo) / (hi + lo)` for a bucket
/// whose upper bound is at most 1.105 times its lower bound.
pub const RELATIVE_ERROR_BOUND: f64 = 0.05;

/// Slots in a quarter day (the finer histogram cell) and in a day.
const QUARTER: i64 = 24;
const DAY: i64 = 96;

/// p50, p95 and p99 of the latency in seconds; null when no call in the set knows its latency.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencyPercentiles {
    pub latency_p50_sec: Option<f64>,
    pub latency_p95_sec: Option<f64>,
    pub latency_p99_sec: Option<f64>,
}

/// How many calls fell in each latency bucket (buckets with no call are absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram(BTreeMap<i64, i64>);

impl Histogram {
    /// Adds `calls` (negative: takes away) to `bucket`.
    pub fn add(&mut self, bucket: i64, calls: i64) {
        let n = self.0.entry(bucket).or_default();
        *n += calls;
        if *n == 0 {
            self.0.remove(&bucket);
        }
    }

    /// Adds every bucket of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.0 {
            self.add(*b, *n);
        }
    }

    /// The counts per bucket.
    pub fn counts(&self) -> &BTreeMap<i64, i64> {
        &self.0
    }

    /// The calls counted.
    pub fn calls(&self) -> i64 {
        self.0.values().sum()
    }

    /// The `pct`-th percentile (1–100) in microseconds: the representative value of the bucket
    /// of the `⌈pct·n/100⌉`-th smallest latency; `None` without calls.
    pub fn percentile_us(&self, pct: i64) -> Option<f64> {
        let n = self.calls();
        if n <= 0 {
            return None;
        }
        let rank = (n * pct + 99) / 100;
        let mut seen = 0;
        for (bucket, calls) in &self.0 {
            seen += calls;
            if seen >= rank {
                return Some(representative_us(*bucket));
            }
        }
        self.0.keys().next_back().map(|b| representative_us(*b))
    }

    /// p50, p95 and p99 in seconds.
    pub fn percentiles(&self) -> LatencyPercentiles {
        // Rounded to the nanosecond: far below the bound, and no long binary fractions.
        let sec = |pct| {
            self.percentile_us(pct)
                .map(|us| (us * 1000.0).round() / 1e9)
        };
        LatencyPercentiles {
            latency_p50_sec: sec(50),
            latency_p95_sec: sec(95),
            latency_p99_sec: sec(99),
        }
    }
}

/// The bucket of a latency of `us` microseconds (what the database computes with
/// [`latency_bucket_sql`]): 0 for 0, else the number of lower bounds at or below it.
pub fn bucket_of(us: i64) -> i64 {
    let bounds = bounds();
    bounds.partition_point(|lo| *lo <= us) as i64
}

fn bounds() -> &'static [i64] {
    static BOUNDS: std::sync::OnceLock<Vec<i64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(latency_bounds)
}

/// The value reported for `bucket`, in microseconds: `2·lo·hi / (lo + hi)` of its smallest and
/// largest whole microsecond (the last, open bucket: its lower bound).
pub fn representative_us(bucket: i64) -> f64 {
    let bounds = bounds();
    if bucket <= 0 {
        return 0.0;
    }
    let k = bucket as usize;
    let lo = bounds[(k - 1).min(bounds.len() - 1)] as f64;
    let hi = match bounds.get(k) {
        Some(next) => (*next - 1) as f64,
        None => lo,
    };
    2.0 * lo * hi / (lo + hi)
}

/// The histograms of the matching calls, per model (as `by_model` names them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistograms {
    pub by_model: BTreeMap<String, Histogram>,
}

impl LatencyHistograms {
    fn add(&mut self, row: &BucketRow) {
        let h = self.by_model.entry(row.model.clone()).or_default();
        h.add(row.bucket, row.calls);
        if h.0.is_empty() {
            self.by_model.remove(&row.model);
        }
    }

    /// Every model's calls together.
    pub fn total(&self) -> Histogram {
        let mut out = Histogram::default();
        for h in self.by_model.values() {
            out.merge(h);
        }
        out
    }
}

#[derive(Debug, FromQueryResult)]
struct BucketRow {
    model: String,
    bucket: i64,
    calls: i64,
}

/// How a request is answered: histogram cells over whole quarter days `[a, b)` (slots) —
/// months and days where whole ones fit — the pending contributions there, and the rows of the
/// rest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cover {
    /// The slots `[first, end)` whose pending contributions are added to the cells (for one
    /// user, the full months read from cells).
    pending: Vec<(i64, i64)>,
    /// Cells read: `(grain, first slot, end slot, sign)`; a month less its days outside the
    /// range reads the days with sign -1.
    runs: Vec<(i64, i64, i64, i64)>,
    /// The filter narrowed to each end outside `[a, b)`.
    edges: Vec<UsageFilter>,
    /// One user's cells ([`USER_LATENCY_TABLE`]: `runs` are that user's whole months, and the
    /// day cells of retention's deleted rows within the edges), or all users' (`None`).
    user: Option<i64>,
}

fn ceil_to(x: i64, n: i64) -> i64 {
    x.div_euclid(n) * n + if x.rem_euclid(n) == 0 { 0 } else { n }
}

fn floor_to(x: i64, n: i64) -> i64 {
    x.div_euclid(n) * n
}

fn slot_start(slot: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(slot.checked_mul(SLOT_SECONDS)?, 0)
}

/// The first whole slot at or after `t`.
fn slot_at_or_after(t: DateTime<Utc>) -> i64 {
    let slot_micros = SLOT_SECONDS * 1_000_000;
    let us = t.timestamp_micros();
    us.div_euclid(slot_micros) + i64::from(us.rem_euclid(slot_micros) != 0)
}

/// The end of the last whole slot up to `t` (inclusive, to the microsecond).
fn slot_end_through(t: DateTime<Utc>) -> i64 {
    (t.timestamp_micros() + 1).div_euclid(SLOT_SECONDS * 1_000_000)
}

/// The cover of one user's calls (`filter.user_id` is `user`): the user's month cells over the
/// whole UTC months of the range that are full ([`migration::rollup::FULL_MONTH_TABLE`]);
/// elsewhere — outside whole months, and over light months, which have no cells — the rows,
/// and the day cells that keep what retention deleted over the whole UTC days there.
/// `extent`: the first and last slot of the user's cells and pending contributions, for open
/// ends. `light`: whether the month starting at a slot is light. `None` when the rows answer
/// it all (no whole UTC day in the range, or nothing counted for the user).
fn user_cover(
    filter: &UsageFilter,
    user: i64,
    extent: Option<(i64, i64)>,
    light: &dyn Fn(i64) -> bool,
) -> Option<Cover> {
    let (first, end, ma, mb) = user_months(filter, extent)?;
    let mut runs = Vec::new();
    let mut pending: Vec<(i64, i64)> = Vec::new();
    // Before the whole months, then each light month, then after them: rows.
    let mut outside: Vec<(i64, i64)> = vec![(first, ma)];
    let extend = |spans: &mut Vec<(i64, i64)>, lo: i64, hi: i64| match spans.last_mut() {
        Some(last) if last.1 == lo => last.1 = hi,
        _ => spans.push((lo, hi)),
    };
    let mut m = ma;
    while m < mb {
        let next = calendar_cell(Calendar::Month, m)?.1;
        if light(m) {
            extend(&mut outside, m, next);
        } else {
            extend(&mut pending, m, next);
        }
        m = next;
    }
    extend(&mut outside, mb.max(first), end);
    runs.extend(
        pending
            .iter()
            .map(|&(lo, hi)| (Calendar::Month.code(), lo, hi, 1)),
    );
    let mut edges = Vec::new();
    for (lo, hi) in outside {
        if lo >= hi {
            continue;
        }
        edges.push(UsageFilter {
            start: if lo == first {
                filter.start
            } else {
                Some(slot_start(lo)?)
            },
            end: if hi == end {
                filter.end
            } else {
                Some(slot_start(hi)? - Duration::microseconds(1))
            },
            ..filter.clone()
        });
        let (d0, d1) = (ceil_to(lo, DAY), floor_to(hi, DAY));
        if d0 < d1 {
            runs.push((DAY, d0, d1, 1));
        }
    }
    if runs.is_empty() {
        return None;
    }
    Some(Cover {
        pending,
        runs,
        edges,
        user: Some(user),
    })
}

/// One user's range in slots `[first, end)` and its whole UTC months `[ma, mb)` (`ma == mb`
/// when it holds none), with open ends at the user's first and last month (`extent`).
fn user_months(filter: &UsageFilter, extent: Option<(i64, i64)>) -> Option<(i64, i64, i64, i64)> {
    let month = Calendar::Month;
    let first = match (filter.start, extent) {
        (Some(s), _) => slot_at_or_after(s),
        (None, Some((f, _))) => calendar_cell(month, f)?.0,
        (None, None) => return None,
    };
    let end = match (filter.end, extent) {
        (Some(e), _) => slot_end_through(e),
        (None, Some((_, l))) => calendar_cell(month, l)?.1,
        (None, None) => return None,
    };
    if first >= end {
        return None;
    }
    let (m0, m1) = calendar_cell(month, first)?;
    let ma = if m0 == first { first } else { m1 };
    let mb = calendar_cell(month, end)?.0;
    Some(if ma < mb {
        (first, end, ma, mb)
    } else {
        (first, end, first, first)
    })
}

/// Whole days `[d0, d1)` as month and day cells, coarsest first: a month inside the range is
/// one cell; a month the range covers in part is its cell less the days outside when that
/// reads fewer cells than the days inside (the current month of "the last 90 days").
fn day_runs(d0: i64, d1: i64) -> Vec<(i64, i64, i64, i64)> {
    let mut runs: Vec<(i64, i64, i64, i64)> = Vec::new();
    let mut push = |run: (i64, i64, i64, i64)| match runs.last_mut() {
        Some(last) if last.0 == run.0 && last.2 == run.1 && last.3 == run.3 => last.2 = run.2,
        _ => runs.push(run),
    };
    let mut p = d0;
    while p < d1 {
        let Some((m0, m1)) = calendar_cell(Calendar::Month, p) else {
            push((DAY, p, d1, 1));
            break;
        };
        let inside_end = m1.min(d1);
        let inside = (inside_end - p) / DAY;
        let outside = (p - m0 + m1 - inside_end) / DAY;
        if m0 == p && m1 <= d1 {
            push((Calendar::Month.code(), m0, m1, 1));
        } else if 1 + outside < inside {
            push((Calendar::Month.code(), m0, m1, 1));
            for (lo, hi) in [(m0, p), (inside_end, m1)] {
                if lo < hi {
                    push((DAY, lo, hi, -1));
                }
            }
        } else {
            push((DAY, p, inside_end, 1));
        }
        p = inside_end;
    }
    runs
}

/// The cover of `filter`, or `None` when the rows answer it all (a range without a whole
/// quarter day; for one user, see [`user_cover`]). `extent`: the first and last slot with a
/// histogram cell or a pending contribution, for open ends (`None`: there is none).
fn cover(
    filter: &UsageFilter,
    extent: Option<(i64, i64)>,
    light: &dyn Fn(i64) -> bool,
) -> Option<Cover> {
    if let Some(user) = filter.user_id {
        return user_cover(filter, i64::from(user), extent, light);
    }
    let a = match (filter.start, extent) {
        (Some(s), _) => ceil_to(slot_at_or_after(s), QUARTER),
        (None, Some((first, _))) => floor_to(first, DAY),
        (None, None) => 0,
    };
    let b = match (filter.end, extent) {
        (Some(e), _) => floor_to(slot_end_through(e), QUARTER),
        (None, Some((_, last))) => floor_to(last, DAY) + DAY,
        (None, None) => 0,
    };
    let mut edges = Vec::new();
    if a >= b {
        // No whole quarter day: the rows answer (an open range here means no cell and nothing
        // pending, so the rows answer that too).
        return None;
    }
    if let Some(start) = filter.start {
        let at = slot_start(a)?;
        if start < at {
            edges.push(UsageFilter {
                start: Some(start),
                end: Some(at - Duration::microseconds(1)),
                ..filter.clone()
            });
        }
    }
    if let Some(end) = filter.end {
        let at = slot_start(b)?;
        if at <= end {
            edges.push(UsageFilter {
                start: Some(at),
                end: Some(end),
                ..filter.clone()
            });
        }
    }
    let (d0, d1) = (ceil_to(a, DAY), floor_to(b, DAY));
    let mut runs = Vec::new();
    if d0 < d1 {
        if a < d0 {
            runs.push((QUARTER, a, d0, 1));
        }
        runs.extend(day_runs(d0, d1));
        if d1 < b {
            runs.push((QUARTER, d1, b, 1));
        }
    } else {
        runs.push((QUARTER, a, b, 1));
    }
    Some(Cover {
        pending: vec![(a, b)],
        runs,
        edges,
        user: None,
    })
}

/// The first and last slot of the histograms' quarter-day cells and pending contributions
/// (with `user`: of that user's cells, month and day, and pending contributions).
async fn extent(txn: &DatabaseTransaction, user: Option<i64>) -> Result<Option<(i64, i64)>, DbErr> {
    if let Some(u) = user {
        // Each grain's end of the primary key's range `(user_key, grain, slot)`, of the user's
        // month cells in the totals table (a light month has no histogram cell), and of the
        // user's year cells there (a light year has no month cell, migration 000032: its
        // last slot stands for its end).
        let month = Calendar::Month.code();
        let year = Calendar::Year.code();
        let ends = |f: &str| {
            let year_end = match f {
                "MIN" => "MIN(slot)".to_owned(),
                _ => format!(
                    "MAX({}) - 1",
                    Calendar::Year.next_sql(txn.get_database_backend(), "slot")
                ),
            };
            format!(
                "SELECT {f}(slot) AS slot FROM {USER_LATENCY_TABLE} WHERE user_key = {u} AND grain = {month} \
                 UNION ALL SELECT {f}(slot) FROM {USER_LATENCY_TABLE} WHERE user_key = {u} AND grain = {DAY} \
                 UNION ALL SELECT {f}(slot) FROM {TOTALS_TABLE} WHERE grain = {month} AND user_key = {u} \
                 UNION ALL SELECT {year_end} FROM {TOTALS_TABLE} WHERE grain = {year} AND user_key = {u} \
                 UNION ALL SELECT {f}(slot) FROM {DELTA_TABLE} WHERE user_key = {u} AND latency_bucket IS NOT NULL"
            )
        };
        let sql = format!(
            "SELECT (SELECT MIN(slot) FROM ({}) f), (SELECT MAX(slot) FROM ({}) l)",
            ends("MIN"),
            ends("MAX")
        );
        return first_and_last(txn, sql).await;
    }
    let sql = format!(
        "SELECT (SELECT MIN(slot) FROM (SELECT MIN(slot) AS slot FROM {LATENCY_TABLE} WHERE grain = {QUARTER} \
         UNION ALL SELECT MIN(slot) FROM {DELTA_TABLE} WHERE latency_bucket IS NOT NULL) f), \
         (SELECT MAX(slot) FROM (SELECT MAX(slot) AS slot FROM {LATENCY_TABLE} WHERE grain = {QUARTER} \
         UNION ALL SELECT MAX(slot) FROM {DELTA_TABLE} WHERE latency_bucket IS NOT NULL) l)"
    );
    first_and_last(txn, sql).await
}

/// The histogram cells and pending contributions of `cover` that `filter` selects, summed per
/// model and bucket.
fn cells_statement(backend: DbBackend, cover: &Cover, filter: &UsageFilter) -> Statement {
    // The model and outcome filters, on each part (SQLite's `?` binds one value each).
    let mut params: Vec<Value> = Vec::new();
    let dialect = Dialect::of(backend);
    let mut narrow = || {
        let mut conditions = String::new();
        if let Some(model) = &filter.model {
            params.push(format!("%{}%", escape_like(&model.to_lowercase())).into());
            conditions.push_str(&format!(
                " AND lower(r.model) LIKE {} ESCAPE '\\'",
                dialect.placeholder(params.len())
            ));
        }
        if let Some(success) = filter.success {
            params.push(success.into());
            conditions.push_str(&format!(
                " AND r.success = {}",
                dialect.placeholder(params.len())
            ));
        }
        conditions
    };
    let (table, whose) = match cover.user {
        Some(u) => (
            user_latency_stored_sql(backend, "r"),
            format!("r.user_key = {u} AND "),
        ),
        None => (format!("{LATENCY_TABLE} r"), String::new()),
    };
    let mut parts: Vec<String> = Vec::new();
    for (g, lo, hi, sign) in &cover.runs {
        let calls = if *sign < 0 { "-r.calls" } else { "r.calls" };
        parts.push(format!(
            "SELECT r.model AS model, r.bucket AS bucket, {calls} AS calls FROM {table} \
             WHERE {whose}r.grain = {g} AND r.slot >= {lo} AND r.slot < {hi}{}",
            narrow()
        ));
    }
    for (a, b) in &cover.pending {
        if a < b {
            parts.push(format!(
                "SELECT r.model AS model, r.latency_bucket AS bucket, r.latency_calls AS calls FROM {DELTA_TABLE} r \
                 WHERE {whose}r.latency_bucket IS NOT NULL AND r.slot >= {a} AND r.slot < {b}{}",
                narrow()
            ));
        }
    }
    let sql = format!(
        "SELECT c.model AS model, CAST(c.bucket AS BIGINT) AS bucket, CAST(SUM(c.calls) AS BIGINT) AS calls \
         FROM ({}) c GROUP BY c.model, c.bucket",
        parts.join(" UNION ALL ")
    );
    Statement::from_sql_and_values(backend, sql, params)
}

/// A row's latency in µs for the reads over rows: the value of the triggers'
/// [`latency_us_sql`], computed on PostgreSQL in `double precision` (`date_part`) instead of
/// `EXTRACT`'s `numeric`, a fifth of reading the heaviest user's week of rows (14.5 →
/// 11.5 ms for 13,810 rows). The same integer for every latency under 2^51 µs (71 years): the
/// quotient by 10^6 and the product by it are each within half an ulp, and the cast rounds to
/// the nearest integer (the 10M rows of the benchmark: not one differs).
fn row_latency_us_sql(backend: DbBackend) -> String {
    match backend {
        DbBackend::Postgres => "CASE WHEN started_at IS NULL THEN NULL ELSE \
             CAST(date_part('epoch', GREATEST(created_at - started_at, INTERVAL '0')) * 1000000 \
             AS BIGINT) END"
            .to_owned(),
        _ => latency_us_sql(backend, "created_at", "started_at"),
    }
}

/// The rows of `filter` that know their latency, counted per model and bucket.
async fn raw_rows(
    txn: &DatabaseTransaction,
    filter: &UsageFilter,
) -> Result<Vec<BucketRow>, DbErr> {
    let backend = txn.get_database_backend();
    let latency = row_latency_us_sql(backend);
    let bucket = format!("CAST({} AS BIGINT)", latency_bucket_sql(backend, &latency));
    usage::Entity::find()
        .select_only()
        .column(usage::Column::Model)
        .column_as(Expr::cust(bucket), "bucket")
        .column_as(Expr::cust("CAST(COUNT(*) AS BIGINT)"), "calls")
        .filter(filter.rows_condition(backend))
        .filter(Expr::cust("started_at IS NOT NULL"))
        .group_by(Expr::cust(Dialect::of(backend).model_group()))
        .group_by(Expr::cust("bucket"))
        .into_model::<BucketRow>()
        .all(txn)
        .await
}

/// One user's calls from which a request counts the rows in two halves at once (PostgreSQL):
/// below it one statement on the request's transaction costs less than a second transaction.
/// The heaviest user of the 10,000-user benchmark has ~1,900 calls a day, so its last 7 days
/// are 14,186 rows: 12–14 ms of one statement, on one core of the database.
pub const HALVES_FROM_CALLS: i64 = 4_000;

/// `parts` (ranges of one user's rows, in time order) as two groups of about the same calls,
/// by the user's UTC day cells `days` (`(slot, calls)`, the totals table's grain 96): several
/// parts dealt out, the most calls first, each to the group with fewer; one part cut at the
/// UTC midnight inside it that leaves the closest to half of its calls before. A day's calls
/// count for every part that touches the day (an estimate: the rows decide the sums). `None`
/// under [`HALVES_FROM_CALLS`] calls, or where no cut leaves calls on both sides.
pub fn halves(parts: &[UsageFilter], days: &[(i64, i64)]) -> Option<[Vec<UsageFilter>; 2]> {
    let micros = |slot: i64| slot.checked_mul(SLOT_SECONDS * 1_000_000);
    // The calls of the days that touch `part` (`[start, end]`, open ends unbounded).
    let touches = |part: &UsageFilter, slot: i64| {
        let (Some(first), Some(next)) = (micros(slot), micros(slot + DAY)) else {
            return false;
        };
        part.start.is_none_or(|s| s.timestamp_micros() < next)
            && part.end.is_none_or(|e| e.timestamp_micros() >= first)
    };
    let calls = |part: &UsageFilter| -> i64 {
        days.iter()
            .filter(|(slot, _)| touches(part, *slot))
            .map(|(_, c)| c)
            .sum()
    };
    let total: i64 = parts.iter().map(calls).sum();
    if total < HALVES_FROM_CALLS {
        return None;
    }
    if let [part] = parts {
        // The UTC midnights strictly inside the part, each with the calls before it.
        let mut before = 0;
        let mut best: Option<(i64, i64)> = None;
        let mut inside: Vec<&(i64, i64)> = days.iter().filter(|(s, _)| touches(part, *s)).collect();
        inside.sort_unstable();
        for (slot, c) in inside {
            let cut = micros(*slot)?;
            let after_start = part.start.is_none_or(|s| s.timestamp_micros() < cut);
            let before_end = part.end.is_none_or(|e| e.timestamp_micros() >= cut);
            if after_start && before_end && before > 0 && before < total {
                let off = (2 * before - total).abs();
                if best.is_none_or(|(_, o)| off < o) {
                    best = Some((*slot, off));
                }
            }
            before += c;
        }
        let at = DateTime::from_timestamp_micros(micros(best?.0)?)?;
        return Some([
            vec![UsageFilter {
                end: Some(at - Duration::microseconds(1)),
                ..part.clone()
            }],
            vec![UsageFilter {
                start: Some(at),
                ..part.clone()
            }],
        ]);
    }
    let mut order: Vec<(i64, &UsageFilter)> = parts.iter().map(|p| (calls(p), p)).collect();
    order.sort_by_key(|(c, _)| std::cmp::Reverse(*c));
    let mut groups: [(i64, Vec<UsageFilter>); 2] = Default::default();
    for (c, part) in order {
        let lighter = usize::from(groups[1].0 < groups[0].0);
        groups[lighter].0 += c;
        groups[lighter].1.push(part.clone());
    }
    let [(a, first), (b, second)] = groups;
    (a > 0 && b > 0).then_some([first, second])
}

/// One user's UTC day cells `(slot, calls)` over the UTC days that `parts` touch (the totals
/// table's primary key: one index range).
async fn user_day_calls(
    txn: &DatabaseTransaction,
    user: i64,
    parts: &[UsageFilter],
) -> Result<Vec<(i64, i64)>, DbErr> {
    let lo = match parts.iter().map(|p| p.start).collect::<Option<Vec<_>>>() {
        Some(starts) => starts
            .iter()
            .min()
            .map_or(i64::MIN / 2, |s| floor_to(slot_at_or_after(*s) - 1, DAY)),
        None => i64::MIN / 2,
    };
    let hi = match parts.iter().map(|p| p.end).collect::<Option<Vec<_>>>() {
        Some(ends) => ends
            .iter()
            .max()
            .map_or(i64::MAX / 2, |e| ceil_to(slot_end_through(*e) + 1, DAY)),
        None => i64::MAX / 2,
    };
    txn.query_all_raw(Statement::from_string(
        txn.get_database_backend(),
        format!(
            "SELECT slot, calls FROM {TOTALS_TABLE} WHERE grain = {DAY} AND user_key = {user} \
             AND slot >= {lo} AND slot < {hi}"
        ),
    ))
    .await?
    .iter()
    .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?)))
    .collect()
}

/// The rows of `parts` (ranges of the request's rows), counted per model and bucket, each
/// under its planner settings after `settings`: in turn on `txn`, or — one user's many calls
/// on PostgreSQL ([`halves`]) with a connection to spare ([`crate::db::snapshot_txns`]) — half
/// of them on a transaction of the same snapshot at the same time, on another core of the
/// database.
async fn rows_of_parts(
    db: &DatabaseConnection,
    txn: &DatabaseTransaction,
    parts: &[UsageFilter],
    settings: Option<&str>,
) -> Result<Vec<BucketRow>, DbErr> {
    let in_turn = async |on: &DatabaseTransaction, parts: &[UsageFilter]| {
        if let Some(settings) = settings {
            on.execute_unprepared(settings).await?;
        }
        let mut rows = Vec::new();
        for part in parts {
            part.set_rows_settings(on).await?;
            rows.extend(raw_rows(on, part).await?);
        }
        Ok::<_, DbErr>(rows)
    };
    let user = parts.first().and_then(|p| p.user_id);
    // (One range with no UTC midnight inside cannot be cut: its day cells are not asked for.)
    let day_us = DAY * SLOT_SECONDS * 1_000_000;
    let cuttable = match parts {
        [part] => match (part.start, part.end) {
            (Some(s), Some(e)) => {
                (s.timestamp_micros().div_euclid(day_us) + 1) * day_us <= e.timestamp_micros()
            }
            _ => true,
        },
        _ => true,
    };
    let split = match user {
        Some(user) if cuttable && txn.get_database_backend() == DbBackend::Postgres => {
            halves(parts, &user_day_calls(txn, i64::from(user), parts).await?)
        }
        _ => None,
    };
    let Some([mine, theirs]) = split else {
        return in_turn(txn, parts).await;
    };
    let Some(other) = crate::db::snapshot_txns(db, txn, 1).await?.pop() else {
        return in_turn(txn, parts).await;
    };
    let (mut rows, more) = futures_util::try_join!(in_turn(txn, &mine), in_turn(&other, &theirs))?;
    other.commit().await?;
    rows.extend(more);
    Ok(rows)
}

/// The full months of `user` ([`FULL_MONTH_TABLE`]) among the whole UTC months `[ma, mb)` of
/// `months` ([`user_months`]); every other month there is light. `None` where no month is
/// light: no whole month, or a database before migration 000029 (every month kept its cells).
async fn full_months(
    txn: &DatabaseTransaction,
    user: i64,
    months: Option<(i64, i64, i64, i64)>,
) -> Result<Option<std::collections::HashSet<i64>>, DbErr> {
    let Some((_, _, ma, mb)) = months.filter(|m| m.2 < m.3) else {
        return Ok(None);
    };
    if !crate::usage::rollup::table_exists(txn, FULL_MONTH_TABLE).await? {
        return Ok(None);
    }
    crate::usage::rollup::full_months_of(txn, user, ma, mb)
        .await
        .map(Some)
}

/// The latency histograms of the calls `filter` selects, per model, in one snapshot: cells for
/// the whole quarter days of all users' calls, the rows for the rest.
pub async fn latency_histograms(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<LatencyHistograms, DbErr> {
    let txn = read_txn(db).await?;
    let backend = txn.get_database_backend();
    let mut out = LatencyHistograms::default();
    let extent = if filter.start.is_none() || filter.end.is_none() {
        extent(&txn, filter.user_id.map(i64::from)).await?
    } else {
        None
    };
    let full = match filter.user_id {
        Some(user) => full_months(&txn, i64::from(user), user_months(filter, extent)).await?,
        None => None,
    };
    let light = |m: i64| full.as_ref().is_some_and(|f| !f.contains(&m));
    let rows = match cover(filter, extent, &light) {
        None => {
            // One user's rows: through the `(user_id, created_at)` index.
            let aggregate = Dialect::of(backend).aggregate_settings();
            rows_of_parts(db, &txn, std::slice::from_ref(filter), aggregate).await?
        }
        Some(cover) => {
            // The rollup's planner settings: the cells are index ranges; above all no parallel
            // workers, whose start-up took 17 of the 22 ms of a 90-day read of 6,400 cells
            // (`EXPLAIN ANALYZE` at 10M rows; the edges' rows are a few hours, an index range
            // on `created_at` either way).
            if let Some(settings) = Dialect::of(backend).rollup_settings() {
                txn.execute_unprepared(settings).await?;
            }
            let mut rows = BucketRow::find_by_statement(cells_statement(backend, &cover, filter))
                .all(&txn)
                .await?;
            rows.extend(rows_of_parts(db, &txn, &cover.edges, None).await?);
            rows
        }
    };
    txn.commit().await?;
    for row in &rows {
        out.add(row);
    }
    Ok(out)
}

/// [`latency_histograms`] from the rows alone (the reference the cells are checked against).
pub async fn latency_histograms_raw(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<LatencyHistograms, DbErr> {
    let txn = read_txn(db).await?;
    let rows = raw_rows(&txn, filter).await?;
    txn.commit().await?;
    let mut out = LatencyHistograms::default();
    for row in &rows {
        out.add(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bucket_reports_a_value_within_five_percent_of_its_latencies() {
        let bounds = latency_bounds();
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        for (k, lo) in bounds.iter().enumerate() {
            let bucket = k as i64 + 1;
            assert_eq!(bucket_of(*lo), bucket);
            assert_eq!(bucket_of(*lo - 1), bucket - 1);
            let Some(next) = bounds.get(k + 1) else {
                break;
            };
            let r = representative_us(bucket);
            for v in [*lo, (*lo + *next) / 2, *next - 1] {
                let err = (r - v as f64).abs() / v as f64;
                assert!(
                    err <= 0.0499,
                    "bucket {bucket} [{lo}, {next}): {v} as {r}: {err}"
                );
            }
        }
        // 10 ms to a minute: a few dozen buckets, not hundreds.
        assert!(bucket_of(60_000_000) - bucket_of(10_000) < 100);
        assert!(*bounds.last().unwrap() > 100_000_000_000);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut h = Histogram::default();
        // 100 calls: 1..=100 ms.
        for ms in 1..=100 {
            h.add(bucket_of(ms * 1000), 1);
        }
        let p = h.percentiles();
        for (got, want) in [
            (p.latency_p50_sec, 0.050),
            (p.latency_p95_sec, 0.095),
            (p.latency_p99_sec, 0.099),
        ] {
            let got = got.unwrap();
            assert!(
                (got - want).abs() / want <= RELATIVE_ERROR_BOUND,
                "{got} vs {want}"
            );
        }
        assert_eq!(
            Histogram::default().percentiles(),
            LatencyPercentiles::default()
        );
        h.add(bucket_of(1000), -1);
        assert_eq!(h.calls(), 99);
    }

    #[test]
    fn many_calls_of_one_user_are_cut_in_two_halves() {
        let at = |day: i64, hour: i64| {
            DateTime::from_timestamp((day * DAY) * SLOT_SECONDS + hour * 3600, 0).unwrap()
        };
        let d0 = 20_000;
        let user = |start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>| UsageFilter {
            start,
            end,
            user_id: Some(7),
            model: Some("4o".into()),
            ..Default::default()
        };
        // Seven days of 1,000 calls.
        let days: Vec<(i64, i64)> = (0..7).map(|k| ((d0 + k) * DAY, 1_000)).collect();
        // One part from 05:00 of the first day on: cut at the midnight nearest half of the
        // calls (3,000 or 4,000 before: the first found), the filter otherwise kept.
        let part = user(Some(at(d0, 5)), None);
        let [a, b] = halves(std::slice::from_ref(&part), &days).unwrap();
        assert_eq!(
            a,
            vec![user(
                Some(at(d0, 5)),
                Some(at(d0 + 3, 0) - Duration::microseconds(1))
            )]
        );
        assert_eq!(b, vec![user(Some(at(d0 + 3, 0)), None)]);
        // Bounded at both ends: the cut stays inside.
        // (2,000 calls touch it: under the threshold.)
        let part = user(Some(at(d0 + 1, 0)), Some(at(d0 + 2, 23)));
        assert_eq!(halves(std::slice::from_ref(&part), &days), None);
        let heavy: Vec<(i64, i64)> = days.iter().map(|&(s, _)| (s, 5_000)).collect();
        let [a, b] = halves(std::slice::from_ref(&part), &heavy).unwrap();
        assert_eq!(a[0].end, Some(at(d0 + 2, 0) - Duration::microseconds(1)));
        assert_eq!(b[0].start, Some(at(d0 + 2, 0)));
        // No midnight inside a part of one day: not cut, however many calls.
        let day = user(Some(at(d0 + 1, 1)), Some(at(d0 + 1, 22)));
        assert_eq!(halves(std::slice::from_ref(&day), &heavy), None);
        // Under the threshold: one statement.
        let few: Vec<(i64, i64)> = days.iter().map(|&(s, _)| (s, 100)).collect();
        assert_eq!(halves(&[user(None, None)], &few), None);
        // Several parts: dealt out, the most calls first, to the group with fewer.
        // (5,000, 5,000 and 10,000 calls: the last alone, the first two together.)
        let parts = [
            user(Some(at(d0, 0)), Some(at(d0, 23))),
            user(Some(at(d0 + 3, 6)), Some(at(d0 + 3, 9))),
            user(Some(at(d0 + 5, 0)), None),
        ];
        let [a, b] = halves(&parts, &heavy).unwrap();
        assert_eq!(a, vec![parts[2].clone()]);
        assert_eq!(b, vec![parts[0].clone(), parts[1].clone()]);
        // A part with no calls leaves nothing to read beside the other.
        let lone = [
            user(Some(at(d0, 0)), Some(at(d0 + 6, 0))),
            user(Some(at(d0 + 9, 0)), None),
        ];
        assert_eq!(halves(&lone, &heavy), None);
    }

    #[test]
    fn the_cover_keeps_whole_quarter_days_and_leaves_the_ends_to_the_rows() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let slot = |s: &str| t(s).timestamp() / SLOT_SECONDS;
        let f = UsageFilter {
            start: Some(t("2025-01-01T05:00:00Z")),
            end: Some(t("2025-01-03T13:59:59.999999Z")),
            ..UsageFilter::default()
        };
        let c = cover(&f, None, &|_| false).unwrap();
        let (a, b) = (slot("2025-01-01T06:00:00Z"), slot("2025-01-03T12:00:00Z"));
        assert_eq!(c.pending, vec![(a, b)]);
        assert_eq!(
            c.runs,
            vec![
                (QUARTER, a, slot("2025-01-02T00:00:00Z"), 1),
                (
                    DAY,
                    slot("2025-01-02T00:00:00Z"),
                    slot("2025-01-03T00:00:00Z"),
                    1
                ),
                (QUARTER, slot("2025-01-03T00:00:00Z"), b, 1),
            ]
        );
        assert_eq!(c.edges.len(), 2);
        assert_eq!(c.edges[0].end, Some(t("2025-01-01T05:59:59.999999Z")));
        assert_eq!(c.edges[1].start, Some(t("2025-01-03T12:00:00Z")));
        // One user within a month: the rows, and the day cells of retention's deletions over
        // the whole UTC days (2 January); under six hours: rows only.
        let one = UsageFilter {
            user_id: Some(1),
            ..f.clone()
        };
        let c = cover(&one, None, &|_| false).unwrap();
        assert_eq!(c.user, Some(1));
        assert_eq!(
            c.runs,
            vec![(
                DAY,
                slot("2025-01-02T00:00:00Z"),
                slot("2025-01-03T00:00:00Z"),
                1
            )]
        );
        assert_eq!(c.edges, vec![one.clone()]);
        assert!(
            c.pending.is_empty(),
            "no pending contributions: the rows answer"
        );
        let short = UsageFilter {
            start: Some(t("2025-01-01T01:00:00Z")),
            end: Some(t("2025-01-01T06:30:00Z")),
            ..UsageFilter::default()
        };
        assert_eq!(cover(&short, None, &|_| false), None);
        // Open ends reach the histograms' extent, with no edge there; nothing at all: rows.
        let extent = (slot("2024-12-30T06:00:00Z"), slot("2025-03-02T18:00:00Z"));
        let open = cover(&UsageFilter::default(), Some(extent), &|_| false).unwrap();
        assert!(open.edges.is_empty());
        assert_eq!(
            open.pending,
            vec![(slot("2024-12-30T00:00:00Z"), slot("2025-03-03T00:00:00Z"))]
        );
        assert_eq!(cover(&UsageFilter::default(), None, &|_| false), None);
    }

    #[test]
    fn one_users_cover_is_the_whole_utc_months_and_the_rows_around_them() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let slot = |s: &str| t(s).timestamp() / SLOT_SECONDS;
        let month = Calendar::Month.code();
        // 29 January 10:07 to 3 April 06:00: February and March as cells; the rows before and
        // after, with the day cells of 30–31 January and 1–2 April.
        let f = UsageFilter {
            start: Some(t("2025-01-29T10:07:00Z")),
            end: Some(t("2025-04-03T06:00:00Z")),
            user_id: Some(7),
            model: Some("gpt".into()),
            ..UsageFilter::default()
        };
        let c = cover(&f, None, &|_| false).unwrap();
        assert_eq!(c.user, Some(7));
        let (a, b) = (slot("2025-02-01T00:00:00Z"), slot("2025-04-01T00:00:00Z"));
        assert_eq!(c.pending, vec![(a, b)]);
        assert_eq!(
            c.runs,
            vec![
                (month, a, b, 1),
                (
                    DAY,
                    slot("2025-01-30T00:00:00Z"),
                    slot("2025-02-01T00:00:00Z"),
                    1
                ),
                (
                    DAY,
                    slot("2025-04-01T00:00:00Z"),
                    slot("2025-04-03T00:00:00Z"),
                    1
                ),
            ]
        );
        assert_eq!(
            c.edges,
            vec![
                UsageFilter {
                    end: Some(t("2025-01-31T23:59:59.999999Z")),
                    ..f.clone()
                },
                UsageFilter {
                    start: Some(t("2025-04-01T00:00:00Z")),
                    ..f.clone()
                },
            ]
        );
        // Open ends: the months of the user's cells, whole; no edges.
        let open = UsageFilter {
            user_id: Some(7),
            ..UsageFilter::default()
        };
        let c = cover(
            &open,
            Some((slot("2025-01-30T00:00:00Z"), slot("2025-03-02T18:00:00Z"))),
            &|_| false,
        )
        .unwrap();
        assert_eq!(
            c.runs,
            vec![(
                month,
                slot("2025-01-01T00:00:00Z"),
                slot("2025-04-01T00:00:00Z"),
                1
            )]
        );
        assert!(c.edges.is_empty());
        // Nothing counted for the user: the rows (none with a latency).
        assert_eq!(cover(&open, None, &|_| false), None);
        // A month exactly: one cell, no edge.
        let march = UsageFilter {
            start: Some(t("2025-03-01T00:00:00Z")),
            end: Some(t("2025-03-31T23:59:59.999999Z")),
            user_id: Some(7),
            ..UsageFilter::default()
        };
        let c = cover(&march, None, &|_| false).unwrap();
        assert_eq!(
            c.runs,
            vec![(
                month,
                slot("2025-03-01T00:00:00Z"),
                slot("2025-04-01T00:00:00Z"),
                1
            )]
        );
        assert!(c.edges.is_empty());
        // A light March (no cell, migration 000029): its rows and day cells, no pending.
        let c = cover(&march, None, &|_| true).unwrap();
        assert_eq!(
            c.runs,
            vec![(
                DAY,
                slot("2025-03-01T00:00:00Z"),
                slot("2025-04-01T00:00:00Z"),
                1
            )]
        );
        assert_eq!(c.edges, vec![march.clone()]);
        assert!(c.pending.is_empty());
        // The first range with February light: March's cell (and its pending contributions);
        // the rows from the start to March, and April's.
        let feb = slot("2025-02-01T00:00:00Z");
        let c = cover(&f, None, &|m| m == feb).unwrap();
        let mar = slot("2025-03-01T00:00:00Z");
        assert_eq!(c.pending, vec![(mar, b)]);
        assert_eq!(
            c.runs,
            vec![
                (month, mar, b, 1),
                (DAY, slot("2025-01-30T00:00:00Z"), mar, 1),
                (
                    DAY,
                    slot("2025-04-01T00:00:00Z"),
                    slot("2025-04-03T00:00:00Z"),
                    1
                ),
            ]
        );
        assert_eq!(
            c.edges,
            vec![
                UsageFilter {
                    end: Some(t("2025-02-28T23:59:59.999999Z")),
                    ..f.clone()
                },
                UsageFilter {
                    start: Some(t("2025-04-01T00:00:00Z")),
                    ..f.clone()
                },
            ]
        );
    }

    #[test]
    fn whole_months_read_one_cell_and_mostly_covered_months_less_their_other_days() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp() / SLOT_SECONDS;
        let month = Calendar::Month.code();
        // 2025-01-29 to 2025-04-26: three days of January, February and March whole, April
        // less its last four days (one run of month cells, February to April).
        let runs = day_runs(t("2025-01-29T00:00:00Z"), t("2025-04-27T00:00:00Z"));
        assert_eq!(
            runs,
            vec![
                (DAY, t("2025-01-29T00:00:00Z"), t("2025-02-01T00:00:00Z"), 1),
                (
                    month,
                    t("2025-02-01T00:00:00Z"),
                    t("2025-05-01T00:00:00Z"),
                    1
                ),
                (
                    DAY,
                    t("2025-04-27T00:00:00Z"),
                    t("2025-05-01T00:00:00Z"),
                    -1
                ),
            ]
        );
        // Within one month: days.
        assert_eq!(
            day_runs(t("2025-02-03T00:00:00Z"), t("2025-02-05T00:00:00Z")),
            vec![(DAY, t("2025-02-03T00:00:00Z"), t("2025-02-05T00:00:00Z"), 1)]
        );
    }
}
