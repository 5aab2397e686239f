//! The one filter every read uses, and the parsing of its query parameters (SPEC §5): every
//! value trimmed, empty means not given, dates strict (a typo is a 400, never "all time").

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr};
use sea_orm::{ColumnTrait, Condition, DbBackend, Value};

use crate::db::entities::usage;

/// Which rows a read covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    /// `created_at >= start`.
    pub start: Option<DateTime<Utc>>,
    /// `created_at <= end`.
    pub end: Option<DateTime<Utc>>,
    pub user_id: Option<i32>,
    /// Case-insensitive substring of the model name; `%`, `_`, `\` are literal.
    pub model: Option<String>,
    pub success: Option<bool>,
}

/// A parameter that could not be read, with the message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct FilterError {
    pub param: &'static str,
    pub message: String,
}

/// The filter's query parameters as given: one type for every reader of them, the admin API
/// (token-stats, llm-usage, the export) and the admin pages, so each turns the same text into
/// the same [`UsageFilter`]. Unknown parameters are ignored here (the readers refuse theirs).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct FilterParams {
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub success: Option<String>,
    /// IANA time zone of naive and date-only dates.
    pub tz: Option<String>,
}

impl FilterParams {
    /// The time zone (`default_tz` when not given) and the filter; an unknown zone or a bad
    /// value is a [`FilterError`] naming its parameter.
    pub fn parse(&self, default_tz: Tz) -> Result<(Tz, UsageFilter), FilterError> {
        let tz = match given(self.tz.as_deref()) {
            None => default_tz,
            Some(name) => name.parse().map_err(|_| FilterError {
                param: "tz",
                message: format!(
                    "unknown time zone {name:?}; use an IANA name such as UTC or Asia/Shanghai"
                ),
            })?,
        };
        let filter = UsageFilter::from_params_in(
            tz,
            self.start_date.as_deref(),
            self.end_date.as_deref(),
            self.user_id.as_deref(),
            self.model.as_deref(),
            self.success.as_deref(),
        )?;
        Ok((tz, filter))
    }

    /// Without `model` and `success`: statistics filter on neither.
    pub fn without_row_filters(self) -> Self {
        Self {
            model: None,
            success: None,
            ..self
        }
    }
}

impl UsageFilter {
    /// Builds the filter from raw query values (`None` = parameter absent), reading naive and
    /// date-only dates as UTC.
    pub fn from_params(
        start_date: Option<&str>,
        end_date: Option<&str>,
        user_id: Option<&str>,
        model: Option<&str>,
        success: Option<&str>,
    ) -> Result<Self, FilterError> {
        Self::from_params_in(Tz::UTC, start_date, end_date, user_id, model, success)
    }

    /// As [`Self::from_params`], reading naive and date-only dates as local times in `tz`
    /// (a date-only `end_date` is the end of that local day, 23 or 25 hours long across DST).
    pub fn from_params_in(
        tz: Tz,
        start_date: Option<&str>,
        end_date: Option<&str>,
        user_id: Option<&str>,
        model: Option<&str>,
        success: Option<&str>,
    ) -> Result<Self, FilterError> {
        Ok(Self {
            start: parse_date(start_date, Bound::Start, tz).map_err(|message| FilterError {
                param: "start_date",
                message,
            })?,
            end: parse_date(end_date, Bound::End, tz).map_err(|message| FilterError {
                param: "end_date",
                message,
            })?,
            user_id: match given(user_id) {
                None => None,
                Some(v) => Some(v.parse::<i32>().map_err(|_| FilterError {
                    param: "user_id",
                    message: format!("must be an integer, got {v:?}"),
                })?),
            },
            model: given(model).map(str::to_owned),
            success: match given(success).map(str::to_ascii_lowercase).as_deref() {
                Some("true") => Some(true),
                Some("false") => Some(false),
                // As the Django app: any other value (`all`, `any`) is no filter.
                _ => None,
            },
        })
    }

    /// The SQL condition for this filter on `backend` (instants bound in its stored form,
    /// see [`crate::db::Dialect`]).
    pub fn condition(&self, backend: DbBackend) -> Condition {
        let datetime = |t| crate::db::Dialect::of(backend).datetime(t);
        let mut c = Condition::all();
        if let Some(start) = self.start {
            c = c.add(Expr::col((usage::Entity, usage::Column::CreatedAt)).gte(datetime(start)));
        }
        if let Some(end) = self.end {
            c = c.add(Expr::col((usage::Entity, usage::Column::CreatedAt)).lte(datetime(end)));
        }
        if let Some(user_id) = self.user_id {
            c = c.add(usage::Column::UserId.eq(user_id));
        }
        self.row_condition(c)
    }

    /// [`Self::condition`] with the user and both ends of the range as one range of the
    /// `(user_id, created_at)` index, `(user_id, created_at) BETWEEN (user, start) AND (user,
    /// end)` in row comparisons: no other index can serve them, so a plain index scan of one
    /// user's rows (PostgreSQL, [`crate::db::Dialect::user_range_settings`]) cannot turn into
    /// a scan of the `created_at` index that filters every other user's rows out. `None`
    /// without a user or either end, and on SQLite (its planner needs no such help: the plain
    /// condition serves it).
    ///
    /// `(user_id = user) IS TRUE` goes with them, for the planner's estimate only: it reads a
    /// row comparison's selectivity from its first column, so without it a range of one
    /// user's rows was estimated at every row from that user id up (2M of 10M), and an
    /// aggregate by bucket above it sized its hash table for that many groups: 70–100 ms
    /// for an empty month under a large `work_mem` (`EXPLAIN ANALYZE` at 10M rows, 10,000
    /// users), where the same read estimated from the user's rows takes under 1 ms. A plain
    /// `user_id = user` would give the same estimate but an index key too: the B-tree then
    /// starts the scan at the user's first entry instead of the range's (an empty December
    /// of the heaviest user read 2,601 pages, 19 ms). The `IS TRUE` form is no index key,
    /// and its selectivity is that of the comparison inside.
    pub fn user_range_condition(&self, backend: DbBackend) -> Option<Condition> {
        if backend != DbBackend::Postgres {
            return None;
        }
        let (user, start, end) = (self.user_id?, self.start?, self.end?);
        let dialect = crate::db::Dialect::of(backend);
        let c = Condition::all()
            .add(Expr::cust_with_values(
                "(user_id = $1) IS TRUE",
                [Value::from(user)],
            ))
            .add(Expr::cust_with_values(
                "(user_id, created_at) >= ($1, $2)",
                [Value::from(user), dialect.datetime(start)],
            ))
            .add(Expr::cust_with_values(
                "(user_id, created_at) <= ($1, $2)",
                [Value::from(user), dialect.datetime(end)],
            ));
        Some(self.row_condition(c))
    }

    /// The condition of an aggregate over this filter's rows: [`Self::user_range_condition`]
    /// where [`Self::reads_user_range`], otherwise [`Self::condition`] (the same rows either
    /// way).
    pub fn rows_condition(&self, backend: DbBackend) -> Condition {
        match self.reads_user_range(backend) {
            true => self
                .user_range_condition(backend)
                .unwrap_or_else(|| self.condition(backend)),
            false => self.condition(backend),
        }
    }

    /// The planner settings an aggregate over [`Self::rows_condition`] runs under, local to its
    /// transaction: for one user, a plain index scan of the `(user_id, created_at)` range
    /// ([`crate::db::Dialect::user_range_settings`]) where the condition is that range, else a
    /// bitmap scan of the same index ([`crate::db::Dialect::user_rows_settings`]); none over
    /// all users.
    pub fn rows_settings(&self, backend: DbBackend) -> Option<&'static str> {
        self.user_id?;
        let dialect = crate::db::Dialect::of(backend);
        match self.reads_user_range(backend) {
            true => dialect.user_range_settings(),
            false => dialect.user_rows_settings(),
        }
    }

    /// Runs [`Self::rows_settings`], if any, in `txn` (they are `SET LOCAL`: they last until
    /// it ends or the next settings).
    pub async fn set_rows_settings(
        &self,
        txn: &sea_orm::DatabaseTransaction,
    ) -> Result<(), sea_orm::DbErr> {
        use sea_orm::ConnectionTrait;
        if let Some(sql) = self.rows_settings(txn.get_database_backend()) {
            txn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    /// Whether an aggregate reads this filter's rows as [`Self::user_range_condition`]: on
    /// PostgreSQL, for one user, over a range that ends less than a day ago or later. Only the
    /// row comparison's user bounds where a scan of the index stops (PostgreSQL 15 marks a row
    /// comparison required on its first column only): the scan begins exactly at `(user,
    /// start)` but walks on past `end` to the user's last entry — nothing for a range that
    /// reaches the present (a day of the heaviest user is ~2,800 entries), but all of the
    /// heaviest user's 677,035 entries, 28 ms, for a range ending a year ago. Such ranges keep
    /// the plain condition under a bitmap scan.
    pub fn reads_user_range(&self, backend: DbBackend) -> bool {
        backend == DbBackend::Postgres
            && self.user_id.is_some()
            && self.start.is_some()
            && self
                .end
                .is_some_and(|end| end >= Utc::now() - chrono::Duration::days(1))
    }

    /// `c` and the conditions of this filter on a row's own columns (model, outcome).
    fn row_condition(&self, mut c: Condition) -> Condition {
        if let Some(model) = &self.model {
            let pattern = format!("%{}%", escape_like(&model.to_lowercase()));
            c = c.add(
                Expr::expr(Func::lower(Expr::col((
                    usage::Entity,
                    usage::Column::Model,
                ))))
                .like(LikeExpr::new(pattern).escape('\\')),
            );
        }
        if let Some(success) = self.success {
            c = c.add(usage::Column::Success.eq(success));
        }
        c
    }

    /// True when `row` passes this filter (the same rule as [`Self::condition`], in Rust).
    pub fn matches(&self, row: &usage::Model) -> bool {
        self.start.is_none_or(|s| row.created_at >= s)
            && self.end.is_none_or(|e| row.created_at <= e)
            && self.user_id.is_none_or(|u| row.user_id == Some(u))
            && self
                .model
                .as_ref()
                .is_none_or(|m| row.model.to_lowercase().contains(&m.to_lowercase()))
            && self.success.is_none_or(|s| row.success == s)
    }
}

/// The trimmed value, or `None` when absent or empty.
pub fn given(raw: Option<&str>) -> Option<&str> {
    raw.map(str::trim).filter(|v| !v.is_empty())
}

pub(crate) fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Clone, Copy)]
enum Bound {
    Start,
    End,
}

/// RFC 3339 (`…+08:00`, `…Z`), a naive date-time (local in `tz`), or a date (start of the
/// local day; for `end`, its last microsecond). A `+` that arrived as a space is read as `+`.
fn parse_date(raw: Option<&str>, bound: Bound, tz: Tz) -> Result<Option<DateTime<Utc>>, String> {
    let Some(raw) = given(raw) else {
        return Ok(None);
    };
    let fixed = restore_plus(raw);
    let s = fixed.as_str();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(Some(local_instant(tz, t)));
        }
    }
    // An offset without RFC 3339's seconds or with a space separator: `2024-01-01 08:00+08:00`.
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M%:z",
        "%Y-%m-%d %H:%M%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Ok(Some(t.with_timezone(&Utc)));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Some(match bound {
            Bound::Start => day_start(tz, d),
            Bound::End => match d.succ_opt() {
                Some(next) => day_start(tz, next) - chrono::Duration::microseconds(1),
                None => day_start(tz, d),
            },
        }));
    }
    Err(format!(
        "{raw:?} is not a valid date or date-time (use e.g. 2024-01-01, 2024-01-01T08:00:00 or 2024-01-01T08:00:00+08:00)"
    ))
}

/// The instant a local wall-clock time in `tz` names: the earlier one when the time occurs
/// twice (autumn), the first instant after the gap when it does not occur (spring).
pub fn local_instant(tz: Tz, t: NaiveDateTime) -> DateTime<Utc> {
    // DST gaps last at most a few hours: step through one a minute at a time.
    let mut probe = t;
    for _ in 0..(6 * 60) {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(x) => return x.with_timezone(&Utc),
            LocalResult::Ambiguous(a, b) => return a.min(b).with_timezone(&Utc),
            LocalResult::None => {
                probe = (probe + chrono::Duration::minutes(1))
                    .with_second(0)
                    .and_then(|p| p.with_nanosecond(0))
                    .unwrap_or(probe + chrono::Duration::minutes(1));
            }
        }
    }
    Utc.from_utc_datetime(&t)
}

/// The first instant of local date `d` in `tz`.
pub fn day_start(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    local_instant(tz, d.and_time(NaiveTime::MIN))
}

/// `2024-01-01T08:00:00 08:00` (a `+` decoded as a space) → `2024-01-01T08:00:00+08:00`. Only
/// a space after a time, followed by `HH:MM`, is an offset; `2024-01-01 08:00` stays as it is.
fn restore_plus(raw: &str) -> String {
    if let Some(i) = raw.rfind(' ') {
        let (before, after) = (&raw[..i], &raw[i + 1..]);
        let looks_like_offset = after.len() == 5
            && after.as_bytes()[2] == b':'
            && after
                .bytes()
                .enumerate()
                .all(|(k, b)| k == 2 || b.is_ascii_digit());
        if looks_like_offset && before.contains(':') {
            return format!("{before}+{after}");
        }
    }
    raw.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(raw: &str) -> String {
        parse_date(Some(raw), Bound::Start, Tz::UTC)
            .unwrap()
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn every_spec_date_form_parses() {
        assert_eq!(
            start("2024-01-01T08:00:00+08:00"),
            "2024-01-01T00:00:00+00:00"
        );
        assert_eq!(
            start("2024-01-01T08:00:00 08:00"),
            "2024-01-01T00:00:00+00:00"
        );
        assert_eq!(start("2024-01-01T08:00:00Z"), "2024-01-01T08:00:00+00:00");
        assert_eq!(start("2024-01-01T08:00:00"), "2024-01-01T08:00:00+00:00");
        assert_eq!(start("2024-01-01 08:00"), "2024-01-01T08:00:00+00:00");
        assert_eq!(start(" 2024-01-01 "), "2024-01-01T00:00:00+00:00");
        assert_eq!(
            start("2024-01-01T05:30:00-04:00"),
            "2024-01-01T09:30:00+00:00"
        );
        let end = parse_date(Some("2024-01-01"), Bound::End, Tz::UTC)
            .unwrap()
            .unwrap();
        assert_eq!(end.to_rfc3339(), "2024-01-01T23:59:59.999999+00:00");
        assert_eq!(parse_date(Some("  "), Bound::Start, Tz::UTC), Ok(None));
    }

    #[test]
    fn impossible_or_garbled_dates_are_refused() {
        for bad in [
            "2025-02-30",
            "2024-13-01",
            "yesterday",
            "2024-01-01T25:00:00",
            "2024/01/01",
            "1704067200",
        ] {
            assert!(
                parse_date(Some(bad), Bound::Start, Tz::UTC).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn lenient_parameters_behave_as_the_django_app() {
        let f =
            UsageFilter::from_params(None, None, Some(" 7 "), Some(" gpt "), Some("ALL")).unwrap();
        assert_eq!(
            (f.user_id, f.model.as_deref(), f.success),
            (Some(7), Some("gpt"), None)
        );
        let f = UsageFilter::from_params(None, None, Some(""), None, Some(" False ")).unwrap();
        assert_eq!((f.user_id, f.success), (None, Some(false)));
        let err = UsageFilter::from_params(None, None, Some("abc"), None, None).unwrap_err();
        assert_eq!(err.param, "user_id");
        let err = UsageFilter::from_params(None, Some("2025-02-30"), None, None, None).unwrap_err();
        assert_eq!(err.param, "end_date");
    }

    #[test]
    fn like_metacharacters_are_literal() {
        assert_eq!(escape_like(r"a%b_c\d"), r"a\%b\_c\\d");
    }
}
