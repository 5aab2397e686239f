//! llm-usage: the paginated listing, newest first, with each row's username.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, JoinType, QueryFilter,
    QueryOrder, QuerySelect, RelationTrait, Select,
};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{UsageFilter, isoformat};
use crate::db::entities::{auth_user, usage};
use crate::pricing::Usd;

/// Rows per page: default 20, at most 100, at least 1.
pub const DEFAULT_PAGE_SIZE: u64 = 20;
pub const MAX_PAGE_SIZE: u64 = 100;

/// One listed row, keys and order as the Django app's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UsageRow {
    pub id: Uuid,
    pub user_id: Option<i32>,
    pub username: Option<String>,
    pub model: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub total_tokens: i32,
    pub cached_tokens: i32,
    pub reasoning_tokens: i32,
    pub success: bool,
    pub error: Option<String>,
    /// As Python's `isoformat()`: `2025-01-31T10:00:00.123456+00:00`.
    pub created_at: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// USD, exact to the micro-dollar; null when the model has no price.
    #[schema(value_type = Option<f64>, example = 0.00128)]
    pub cost: Option<Usd>,
    #[schema(example = "USD")]
    pub cost_currency: String,
    /// When the request started (`isoformat()`), null on rows that do not know it.
    pub started_at: Option<String>,
    /// `created_at − started_at` in seconds (≥ 0), null when `started_at` is unknown.
    #[schema(example = 1.25)]
    pub latency_sec: Option<f64>,
    /// Whether the reply was streamed.
    pub is_streaming: bool,
    /// When the first streamed token arrived (`isoformat()`), null when not streamed or unknown.
    pub first_chunk_at: Option<String>,
    /// Time to first token, `first_chunk_at − started_at` in seconds (≥ 0), null when either
    /// is unknown.
    #[schema(example = 0.42)]
    pub ttft_sec: Option<f64>,
}

/// One page of the listing and the true total.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UsagePage {
    pub results: Vec<UsageRow>,
    pub total: u64,
    pub page: u64,
    pub page_size: u64,
    /// Pass as `cursor` for the rows after this page (keyset paging); null on the last page.
    pub next_cursor: Option<String>,
}

/// A position in the listing (`created_at` descending, then `id`): the last row seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// Opaque URL-safe text: base64url of `<microseconds since the epoch>.<uuid>`.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let raw = format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    fn of(r: &RowWithUser) -> Self {
        Self {
            created_at: r.created_at,
            id: r.id.0,
        }
    }

    /// The cursor `encode` wrote; `None` for anything else: text that does not re-encode to
    /// itself (another uuid spelling, `+1`, leading zeros…) or an instant outside 1970–2199
    /// (no row is there; years like −200000 or 9999 only reached the database to fail there).
    pub fn decode(text: &str) -> Option<Self> {
        use base64::Engine;
        let text = text.trim();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (micros, id) = raw.split_once('.')?;
        let micros: i64 = micros.parse().ok()?;
        // 2200-01-01T00:00:00Z in µs.
        if !(0..7_258_118_400_000_000).contains(&micros) {
            return None;
        }
        let cursor = Self {
            created_at: chrono::DateTime::from_timestamp_micros(micros)?,
            id: Uuid::parse_str(id).ok()?,
        };
        (cursor.encode() == text).then_some(cursor)
    }
}

/// `page` ≥ 1 and `page_size` already clamped to 1..=100 by the caller's parsing.
pub async fn list_usage(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    page: u64,
    page_size: u64,
) -> Result<UsagePage, DbErr> {
    list_usage_ordered(db, filter, page, page_size, false).await
}

/// [`list_usage`], newest first or (`oldest_first`) oldest first; `next_cursor` only in the
/// newest-first order (the one cursors walk).
pub async fn list_usage_ordered(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    page: u64,
    page_size: u64,
    oldest_first: bool,
) -> Result<UsagePage, DbErr> {
    let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
    let total = count_matching(db, filter).await?;
    let offset = page.saturating_sub(1).saturating_mul(page_size);
    let rows = if offset >= total {
        Vec::new()
    } else {
        page_query_ordered(
            db.get_database_backend(),
            filter,
            offset,
            page_size,
            oldest_first,
        )
        .into_model::<RowWithUser>()
        .all(db)
        .await?
    };
    let more = offset.saturating_add(rows.len() as u64) < total;
    let next_cursor = rows
        .last()
        .filter(|_| more && !oldest_first)
        .map(|r| Cursor::of(r).encode());
    Ok(UsagePage {
        results: rows.into_iter().map(UsageRow::from).collect(),
        total,
        page,
        page_size,
        next_cursor,
    })
}

/// The `page_size` rows after `cursor` (keyset paging: O(page size) however deep), with the
/// true total and the next cursor. `page` is only echoed.
pub async fn list_usage_after(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    cursor: Cursor,
    page: u64,
    page_size: u64,
) -> Result<UsagePage, DbErr> {
    let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
    let total = count_matching(db, filter).await?;
    let mut rows = keyset_batch(db, filter, Some(cursor), page_size + 1).await?;
    let more = rows.len() as u64 > page_size;
    rows.truncate(page_size as usize);
    let next_cursor = rows.last().filter(|_| more).map(|(c, _)| c.encode());
    Ok(UsagePage {
        results: rows.into_iter().map(|(_, r)| r).collect(),
        total,
        page,
        page_size,
        next_cursor,
    })
}

/// One row by id, with its username; `None` when there is no such row.
pub async fn get_usage(db: &DatabaseConnection, id: Uuid) -> Result<Option<UsageRow>, DbErr> {
    use sea_orm::sea_query::ExprTrait;
    let backend = db.get_database_backend();
    Ok(usage::Entity::find()
        .filter(
            Expr::col((usage::Entity, usage::Column::Id))
                .eq(crate::db::Dialect::of(backend).uuid(id)),
        )
        .join(JoinType::LeftJoin, usage::Relation::User.def())
        .column_as(auth_user::Column::Username, "username")
        .into_model::<RowWithUser>()
        .one(db)
        .await?
        .map(UsageRow::from))
}

/// Up to `limit` matching rows after `after` in listing order, each with its cursor: the
/// export walks the whole listing with these, in constant memory.
pub async fn keyset_batch(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    after: Option<Cursor>,
    limit: u64,
) -> Result<Vec<(Cursor, UsageRow)>, DbErr> {
    use sea_orm::sea_query::ExprTrait;
    use sea_orm::{Condition, QueryFilter};
    let backend = db.get_database_backend();
    let mut q = usage::Entity::find()
        .filter(filter.condition(backend))
        .join(JoinType::LeftJoin, usage::Relation::User.def())
        .column_as(auth_user::Column::Username, "username")
        .order_by_desc(usage::Column::CreatedAt)
        .order_by_desc(usage::Column::Id)
        .limit(limit);
    if let Some(Cursor { created_at: at, id }) = after {
        // `(created_at, id) < (at, id)`, written so that `created_at <= at` is a plain range
        // on the `created_at` index: each batch starts where the last one ended instead of
        // skipping every newer row again (an OR of the two cases made a 1M-row export
        // quadratic: 584 s on PostgreSQL).
        let created_at = || Expr::col((usage::Entity, usage::Column::CreatedAt));
        q = q.filter(
            Condition::all()
                .add(created_at().lte(crate::db::Dialect::of(backend).datetime(at)))
                .add(
                    Condition::any()
                        .add(created_at().lt(crate::db::Dialect::of(backend).datetime(at)))
                        .add(
                            Expr::col((usage::Entity, usage::Column::Id))
                                .lt(crate::db::Dialect::of(backend).uuid(id)),
                        ),
                ),
        );
    }
    Ok(q.into_model::<RowWithUser>()
        .all(db)
        .await?
        .into_iter()
        .map(|r| (Cursor::of(&r), UsageRow::from(r)))
        .collect())
}

/// How many rows match (the listing's `total`): whole slots from the rollup's call counts,
/// the partial slots at the edges counted in the rows (see [`super::rollup`]). Before the
/// retention horizon the cells also count rows retention deleted, so the rows there are
/// counted one by one (few: only rows written since with an old date); see
/// [`crate::retention`].
async fn count_matching(db: &DatabaseConnection, filter: &UsageFilter) -> Result<u64, DbErr> {
    let txn = crate::db::read_txn(db).await?;
    let mut total = 0u64;
    let horizon = crate::retention::horizon(&txn).await?;
    let (before, from) = match horizon {
        Some(h) if filter.start.is_none_or(|s| s < h) => (
            Some(UsageFilter {
                end: Some(match filter.end {
                    Some(e) if e < h => e,
                    _ => h - chrono::Duration::microseconds(1),
                }),
                ..filter.clone()
            }),
            filter.end.is_none_or(|e| e >= h).then(|| UsageFilter {
                start: Some(h),
                ..filter.clone()
            }),
        ),
        _ => (None, Some(filter.clone())),
    };
    if let Some(f) = before {
        total += count_matching_raw(&txn, &f).await?;
    }
    if let Some(f) = from {
        total += count_from_rollup(&txn, &f).await?;
    }
    txn.commit().await?;
    Ok(total)
}

/// [`count_matching`] where every row the cells count is still there.
async fn count_from_rollup<C: ConnectionTrait>(
    txn: &C,
    filter: &UsageFilter,
) -> Result<u64, DbErr> {
    let plan = super::rollup::plan(txn, filter, None, false).await?;
    let mut total = 0u64;
    let raw: Vec<UsageFilter> = match &plan {
        None => vec![filter.clone()],
        Some(plan) => {
            if let Some(sql) = crate::db::Dialect::of(txn.get_database_backend()).rollup_settings()
            {
                txn.execute_unprepared(sql).await?;
            }
            let stmt = super::rollup::statement(
                txn.get_database_backend(),
                plan,
                filter,
                super::rollup::GroupBy::Nothing,
            );
            // The cells' count, then the pending contributions' count.
            for row in txn.query_all_raw(stmt).await? {
                let calls = super::TokenSums::alias(super::Sum::Calls);
                total = total.saturating_add_signed(row.try_get::<i64>("", calls)?);
            }
            plan.raw(filter, super::rollup::GroupBy::Nothing)
        }
    };
    for f in &raw {
        total += count_matching_raw(txn, f).await?;
    }
    Ok(total)
}

/// The raw row count: the edges of [`count_matching`], and the reference its total is
/// checked against.
pub async fn count_matching_raw<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
) -> Result<u64, DbErr> {
    Ok(count_query(db.get_database_backend(), filter)
        .into_tuple::<i64>()
        .one(db)
        .await?
        .unwrap_or(0)
        .max(0) as u64)
}

/// `SELECT COUNT(*)` over the matching rows (see [`super::plans`]).
pub(crate) fn count_query(backend: DbBackend, filter: &UsageFilter) -> Select<usage::Entity> {
    usage::Entity::find()
        .select_only()
        .column_as(Expr::cust("COUNT(*)"), "total")
        .filter(filter.condition(backend))
}

/// One page, newest first, with each row's username (see [`super::plans`]).
pub(crate) fn page_query(
    backend: DbBackend,
    filter: &UsageFilter,
    offset: u64,
    limit: u64,
) -> Select<usage::Entity> {
    page_query_ordered(backend, filter, offset, limit, false)
}

fn page_query_ordered(
    backend: DbBackend,
    filter: &UsageFilter,
    offset: u64,
    limit: u64,
    oldest_first: bool,
) -> Select<usage::Entity> {
    let order = if oldest_first {
        sea_orm::Order::Asc
    } else {
        sea_orm::Order::Desc
    };
    usage::Entity::find()
        .filter(filter.condition(backend))
        .join(JoinType::LeftJoin, usage::Relation::User.def())
        .column_as(auth_user::Column::Username, "username")
        .order_by(usage::Column::CreatedAt, order.clone())
        .order_by(usage::Column::Id, order)
        .offset(offset)
        .limit(limit)
}

#[derive(Debug, sea_orm::FromQueryResult)]
struct RowWithUser {
    id: usage::RowId,
    user_id: Option<i32>,
    username: Option<String>,
    model: String,
    prompt_tokens: i32,
    completion_tokens: i32,
    total_tokens: i32,
    cached_tokens: i32,
    reasoning_tokens: i32,
    success: bool,
    error: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    metadata: Value,
    cost: Option<usage::Cost>,
    cost_currency: String,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    is_streaming: bool,
    first_chunk_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<RowWithUser> for UsageRow {
    fn from(r: RowWithUser) -> Self {
        Self {
            id: r.id.0,
            user_id: r.user_id,
            username: r.username,
            model: r.model,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
            cached_tokens: r.cached_tokens,
            reasoning_tokens: r.reasoning_tokens,
            success: r.success,
            error: r.error,
            created_at: isoformat(&r.created_at),
            metadata: r.metadata,
            cost: r.cost.map(|c| Usd(c.0)),
            cost_currency: r.cost_currency,
            started_at: r.started_at.as_ref().map(isoformat),
            latency_sec: r
                .started_at
                .map(|s| usage::seconds_between(s, r.created_at)),
            is_streaming: r.is_streaming,
            first_chunk_at: r.first_chunk_at.as_ref().map(isoformat),
            ttft_sec: r
                .started_at
                .zip(r.first_chunk_at)
                .map(|(s, f)| usage::seconds_between(s, f)),
        }
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::Cursor;
    use base64::Engine;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn only_cursors_the_api_could_have_issued_decode() {
        let real = Cursor {
            created_at: chrono::DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: uuid::Uuid::from_u128(42),
        };
        assert_eq!(Cursor::decode(&real.encode()), Some(real));
        let id = uuid::Uuid::from_u128(42);
        // Issue 17, item 8: forged positions and spellings.
        for forged in [
            format!("-1.{}", id.simple()),
            format!("253402300800000000.{}", id.simple()), // year 10000
            format!("6311390400000000000.{}", id.simple()), // year ~200000
            format!("-6311390400000000000.{}", id.simple()),
            format!("+1764000000123456.{}", id.simple()),
            format!("01764000000123456.{}", id.simple()),
            format!("1764000000123456.{}", id.hyphenated()),
            format!(
                "1764000000123456.{}",
                id.simple().to_string().to_uppercase()
            ),
            "1764000000123456".to_owned(),
        ] {
            assert_eq!(Cursor::decode(&b64(&forged)), None, "{forged}");
        }
        assert_eq!(Cursor::decode("not base64!"), None);
    }
}
