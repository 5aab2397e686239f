//! token-stats: summary, per-model breakdown and time series, each one SQL aggregate.

use sea_orm::sea_query::Expr;
use sea_orm::{
    DatabaseConnection, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;
use utoipa::ToSchema;

use super::UsageFilter;
use crate::db::entities::usage;

/// Sums over the matching rows; zeros when nothing matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, FromQueryResult, ToSchema)]
pub struct Summary {
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
    pub total_calls: i64,
    pub successful_calls: i64,
    pub failed_calls: i64,
}

/// One model's totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromQueryResult, ToSchema)]
pub struct ModelStats {
    pub model: String,
    pub total_calls: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_tokens: i64,
    pub total_cached_tokens: i64,
    pub total_reasoning_tokens: i64,
}

/// One bucket of the time series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromQueryResult, ToSchema)]
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

    /// The bucket label as SQL text, the one place the two backends differ.
    fn bucket_sql(self, backend: DbBackend) -> &'static str {
        match (backend, self) {
            (DbBackend::Postgres, Self::Day) => {
                "to_char(date_trunc('hour', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:00:00') || '+00:00'"
            }
            (DbBackend::Postgres, Self::Month) => {
                "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            (DbBackend::Postgres, Self::Year) => {
                "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM') || '-01T00:00:00+00:00'"
            }
            (_, Self::Day) => "strftime('%Y-%m-%dT%H:00:00', created_at) || '+00:00'",
            (_, Self::Month) => "strftime('%Y-%m-%d', created_at)",
            (_, Self::Year) => "strftime('%Y-%m', created_at) || '-01T00:00:00+00:00'",
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

fn with_sums<S: QuerySelect>(mut q: S) -> S {
    q = q.column_as(Expr::cust("COUNT(*)"), "total_calls");
    for (sql, alias) in SUMS {
        // PostgreSQL's SUM(integer) is bigint; the cast keeps SQLite and PostgreSQL alike.
        q = q.column_as(Expr::cust(format!("CAST({sql} AS BIGINT)")), alias);
    }
    q
}

/// Sums over every matching row, in one pass.
pub async fn summary_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<Summary, DbErr> {
    let q = with_sums(usage::Entity::find().select_only())
        .column_as(
            Expr::cust("CAST(COALESCE(SUM(CASE WHEN success THEN 1 ELSE 0 END), 0) AS BIGINT)"),
            "successful_calls",
        )
        .column_as(
            Expr::cust("CAST(COALESCE(SUM(CASE WHEN success THEN 0 ELSE 1 END), 0) AS BIGINT)"),
            "failed_calls",
        )
        .filter(filter.condition());
    Ok(q.into_model::<Summary>().one(db).await?.unwrap_or_default())
}

/// One item per model, by total tokens descending, then model ascending.
pub async fn stats_by_model(
    db: &DatabaseConnection,
    filter: &UsageFilter,
) -> Result<Vec<ModelStats>, DbErr> {
    with_sums(
        usage::Entity::find()
            .select_only()
            .column(usage::Column::Model),
    )
    .filter(filter.condition())
    .group_by(usage::Column::Model)
    .order_by_desc(Expr::cust("CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT)"))
    .order_by_asc(usage::Column::Model)
    .into_model::<ModelStats>()
    .all(db)
    .await
}

/// Buckets that have rows, in order.
pub async fn time_series_stats(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    granularity: Granularity,
) -> Result<Vec<SeriesItem>, DbErr> {
    let bucket = granularity.bucket_sql(db.get_database_backend());
    with_sums(
        usage::Entity::find()
            .select_only()
            .column_as(Expr::cust(bucket), "bucket"),
    )
    .filter(filter.condition())
    .group_by(Expr::cust(bucket))
    .order_by_asc(Expr::cust(bucket))
    .into_model::<SeriesItem>()
    .all(db)
    .await
}
