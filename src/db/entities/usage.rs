//! The `llm_tracker_usage` table: one row per LLM call.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Serializable so that a row can wait in the spool file while the database is away.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "llm_tracker_usage")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: RowId,
    pub user_id: Option<i32>,
    pub model: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub total_tokens: i32,
    pub cached_tokens: i32,
    pub reasoning_tokens: i32,
    pub success: bool,
    pub error: Option<String>,
    pub metadata: Json,
    pub created_at: DateTimeUtc,
    /// When the request started; null on rows written by the Django app.
    pub started_at: Option<DateTimeUtc>,
    /// USD, exact to the micro-dollar; null when the model has no price (or the row predates
    /// pricing, or the Django app wrote it).
    #[sea_orm(column_type = "Decimal(Some((12, 6)))", nullable)]
    pub cost: Option<Cost>,
    /// Always `USD` for rows we write (the successor's column, default `'USD'`).
    pub cost_currency: String,
    /// Whether the reply was streamed (the successor's column, default false; migration
    /// 000016). Spooled rows written before it read as not streamed.
    #[serde(default)]
    pub is_streaming: bool,
    /// When the first streamed chunk arrived (null for unstreamed calls and streams that
    /// produced nothing). Time to first token = `first_chunk_at − started_at`.
    #[serde(default)]
    pub first_chunk_at: Option<DateTimeUtc>,
}

/// `end − start` in seconds, in whole microseconds, negative (clock skew) as 0: a row's
/// latency (`created_at − started_at`) and time to first token (`first_chunk_at −
/// started_at`), for the listing and the metrics alike.
pub fn seconds_between(start: DateTimeUtc, end: DateTimeUtc) -> f64 {
    (end - start).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

/// A usage row's id, a UUID. PostgreSQL stores it as `uuid`; SQLite as Django does, 32
/// lowercase hex characters. Reads also take the 16-byte blobs versions before migration
/// 000012 wrote on SQLite; writes and comparisons bind [`crate::db::Dialect::uuid`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RowId(pub Uuid);

impl From<Uuid> for RowId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl From<RowId> for Uuid {
    fn from(id: RowId) -> Self {
        id.0
    }
}

impl std::ops::Deref for RowId {
    type Target = Uuid;
    fn deref(&self) -> &Uuid {
        &self.0
    }
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq<Uuid> for RowId {
    fn eq(&self, other: &Uuid) -> bool {
        self.0 == *other
    }
}

/// The PostgreSQL form; SQLite statements bind [`crate::db::Dialect::uuid`] instead.
impl From<RowId> for sea_orm::Value {
    fn from(id: RowId) -> Self {
        sea_orm::Value::Uuid(Some(id.0))
    }
}

impl sea_orm::TryGetable for RowId {
    fn try_get_by<I: sea_orm::ColIdx>(
        res: &sea_orm::QueryResult,
        index: I,
    ) -> Result<Self, sea_orm::TryGetError> {
        if res.try_as_sqlite_row().is_none() {
            return Uuid::try_get_by(res, index).map(RowId);
        }
        // SQLite hands text and blobs alike as bytes: 16 of a blob, 32 (or 36) of text.
        let bytes = Vec::<u8>::try_get_by(res, index)?;
        let id = match bytes.len() {
            16 => Uuid::from_slice(&bytes).ok(),
            _ => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| Uuid::parse_str(s).ok()),
        };
        id.map(RowId).ok_or_else(|| {
            sea_orm::TryGetError::DbErr(DbErr::Type(format!(
                "usage id: {} bytes that are not a UUID",
                bytes.len()
            )))
        })
    }
}

impl sea_orm::sea_query::ValueType for RowId {
    fn try_from(v: sea_orm::Value) -> Result<Self, sea_orm::sea_query::ValueTypeErr> {
        match v {
            sea_orm::Value::Uuid(Some(id)) => Ok(RowId(id)),
            sea_orm::Value::String(Some(s)) => Uuid::parse_str(&s)
                .map(RowId)
                .map_err(|_| sea_orm::sea_query::ValueTypeErr),
            _ => Err(sea_orm::sea_query::ValueTypeErr),
        }
    }

    fn type_name() -> String {
        "RowId".into()
    }

    fn array_type() -> sea_orm::sea_query::ArrayType {
        sea_orm::sea_query::ArrayType::Uuid
    }

    fn column_type() -> sea_orm::sea_query::ColumnType {
        sea_orm::sea_query::ColumnType::Uuid
    }
}

impl sea_orm::sea_query::Nullable for RowId {
    fn null() -> sea_orm::Value {
        sea_orm::Value::Uuid(None)
    }
}

impl sea_orm::TryFromU64 for RowId {
    fn try_from_u64(_: u64) -> Result<Self, DbErr> {
        Err(DbErr::ConvertFromU64("RowId"))
    }
}

/// A cost in whole micro-dollars (`Cost(1280)` is 0.001280 USD).
///
/// PostgreSQL stores it as `numeric(12,6)` USD, SQLite as an integer count of micro-dollars
/// (exact sums). Reading handles both; writing through [`insert_statement`] (the one write
/// path) binds the backend's form. A plain `ActiveModel` insert binds the
/// PostgreSQL form, which SQLite would store inexactly: rows are never written that way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cost(pub i64);

impl Cost {
    /// Exact USD with six decimals.
    pub fn usd(self) -> rust_decimal::Decimal {
        rust_decimal::Decimal::new(self.0, 6)
    }

    /// Whole micro-dollars from USD, half to even past the sixth decimal.
    pub fn from_usd(usd: rust_decimal::Decimal) -> Option<Self> {
        let micros = (usd * rust_decimal::Decimal::from(1_000_000))
            .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointNearestEven);
        i64::try_from(micros).ok().map(Self)
    }

    /// The value to bind for `backend` ([`crate::db::Dialect::cost`]).
    pub fn to_value(cost: Option<Self>, backend: sea_orm::DbBackend) -> sea_orm::Value {
        crate::db::Dialect::of(backend).cost(cost.map(|c| c.0))
    }
}

impl From<Cost> for sea_orm::Value {
    fn from(c: Cost) -> Self {
        sea_orm::Value::Decimal(Some(c.usd()))
    }
}

impl sea_orm::TryGetable for Cost {
    fn try_get_by<I: sea_orm::ColIdx>(
        res: &sea_orm::QueryResult,
        index: I,
    ) -> Result<Self, sea_orm::TryGetError> {
        if res.try_as_sqlite_row().is_some() {
            return i64::try_get_by(res, index).map(Cost);
        }
        let usd = rust_decimal::Decimal::try_get_by(res, index)?;
        Cost::from_usd(usd).ok_or_else(|| {
            sea_orm::TryGetError::DbErr(DbErr::Type(format!("cost {usd} out of range")))
        })
    }
}

impl sea_orm::sea_query::ValueType for Cost {
    fn try_from(v: sea_orm::Value) -> Result<Self, sea_orm::sea_query::ValueTypeErr> {
        match v {
            sea_orm::Value::Decimal(Some(d)) => {
                Cost::from_usd(d).ok_or(sea_orm::sea_query::ValueTypeErr)
            }
            sea_orm::Value::BigInt(Some(i)) => Ok(Cost(i)),
            _ => Err(sea_orm::sea_query::ValueTypeErr),
        }
    }

    fn type_name() -> String {
        "Cost".into()
    }

    fn array_type() -> sea_orm::sea_query::ArrayType {
        sea_orm::sea_query::ArrayType::Decimal
    }

    fn column_type() -> sea_orm::sea_query::ColumnType {
        sea_orm::sea_query::ColumnType::Decimal(Some((12, 6)))
    }
}

impl sea_orm::sea_query::Nullable for Cost {
    fn null() -> sea_orm::Value {
        sea_orm::Value::Decimal(None)
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::auth_user::Entity",
        from = "Column::UserId",
        to = "super::auth_user::Column::Id",
        on_delete = "SetNull"
    )]
    User,
}

impl Related<super::auth_user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

/// `INSERT … ON CONFLICT (id) DO NOTHING` of `rows`, with `cost`, `id` and the datetimes bound
/// in the backend's form (see [`Cost`], [`crate::db::Dialect`]). Every usage row this product
/// writes to SQLite goes through here; PostgreSQL's go through the same statement with the rows
/// in one JSON parameter ([`insert_rows`], [`insert_rows_returning`]).
pub fn insert_statement(
    backend: sea_orm::DbBackend,
    rows: &[Model],
) -> sea_orm::sea_query::InsertStatement {
    use sea_orm::Iterable;
    insert_columns_statement(backend, rows, &Column::iter().collect::<Vec<_>>())
}

/// [`insert_statement`] writing only `columns` (the others take their defaults): for a
/// database whose schema predates a column, such as the migration tests' older schemas.
pub fn insert_columns_statement(
    backend: sea_orm::DbBackend,
    rows: &[Model],
    columns: &[Column],
) -> sea_orm::sea_query::InsertStatement {
    use sea_orm::ActiveModelTrait;
    use sea_orm::sea_query::{OnConflict, Query};
    let mut q = Query::insert();
    q.into_table(Entity)
        .columns(columns.iter().copied())
        .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned());
    for row in rows {
        let active = ActiveModel::from(row.clone());
        let values = columns.iter().map(|&c| match c {
            Column::Cost => Cost::to_value(row.cost, backend).into(),
            Column::Id => crate::db::Dialect::of(backend).uuid(row.id.0).into(),
            Column::CreatedAt => crate::db::Dialect::of(backend)
                .datetime(row.created_at)
                .into(),
            Column::StartedAt => crate::db::Dialect::of(backend)
                .datetime_opt(row.started_at)
                .into(),
            Column::FirstChunkAt => crate::db::Dialect::of(backend)
                .datetime_opt(row.first_chunk_at)
                .into(),
            c => active
                .get(c)
                .into_value()
                .unwrap_or(sea_orm::Value::Bool(None))
                .into(),
        });
        q.values_panic(values);
    }
    q
}

/// One row of [`postgres_insert_statement`]'s JSON parameter, borrowed from the [`Model`].
#[derive(Serialize)]
struct JsonRow<'a> {
    id: Uuid,
    user_id: Option<i32>,
    model: &'a str,
    prompt_tokens: i32,
    completion_tokens: i32,
    total_tokens: i32,
    cached_tokens: i32,
    reasoning_tokens: i32,
    success: bool,
    error: Option<&'a str>,
    metadata: &'a Json,
    created_at: String,
    started_at: Option<String>,
    cost: Option<String>,
    cost_currency: &'a str,
    is_streaming: bool,
    first_chunk_at: Option<String>,
}

/// A datetime as PostgreSQL's text input reads it, cut (not rounded) to microseconds, as the
/// binary binding of a `DateTime` is.
fn pg_datetime(at: DateTimeUtc) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// PostgreSQL: the same `INSERT … ON CONFLICT (id) DO NOTHING` as [`insert_statement`], with
/// the rows in one JSON parameter (`json_to_recordset`) instead of fifteen parameters a row: a
/// batch of 1,000 rows binds one text instead of 15,000 values, and the statement's text and
/// plan are the same for every batch size. Values keep their exact meaning: costs are decimal
/// text (PostgreSQL rounds to the column's six decimals, as it does a bound decimal), datetimes
/// RFC 3339 text cut to microseconds.
fn postgres_insert_statement(rows: &[Model], returning: bool) -> sea_orm::Statement {
    let json = serde_json::to_string(
        &rows
            .iter()
            .map(|r| JsonRow {
                id: r.id.0,
                user_id: r.user_id,
                model: &r.model,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                total_tokens: r.total_tokens,
                cached_tokens: r.cached_tokens,
                reasoning_tokens: r.reasoning_tokens,
                success: r.success,
                error: r.error.as_deref(),
                metadata: &r.metadata,
                created_at: pg_datetime(r.created_at),
                started_at: r.started_at.map(pg_datetime),
                cost: r.cost.map(|c| c.usd().to_string()),
                cost_currency: &r.cost_currency,
                is_streaming: r.is_streaming,
                first_chunk_at: r.first_chunk_at.map(pg_datetime),
            })
            .collect::<Vec<_>>(),
    )
    .expect("usage rows serialize to JSON");
    let sql = format!(
        "INSERT INTO llm_tracker_usage ({columns}) SELECT {columns} \
         FROM json_to_recordset($1::json) AS r(id uuid, user_id integer, model varchar(255), \
         prompt_tokens integer, completion_tokens integer, total_tokens integer, \
         cached_tokens integer, reasoning_tokens integer, success boolean, error text, \
         metadata jsonb, created_at timestamptz, started_at timestamptz, cost numeric(12,6), \
         cost_currency varchar(10), is_streaming boolean, first_chunk_at timestamptz) \
         ON CONFLICT (id) DO NOTHING{returning}",
        columns = JSON_INSERT_COLUMNS,
        returning = if returning { " RETURNING id" } else { "" },
    );
    sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        sql,
        [sea_orm::Value::from(json)],
    )
}

/// The columns [`postgres_insert_statement`] writes: every column of the table.
const JSON_INSERT_COLUMNS: &str = "id, user_id, model, prompt_tokens, completion_tokens, \
     total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, created_at, \
     started_at, cost, cost_currency, is_streaming, first_chunk_at";

/// Inserts `rows` (`ON CONFLICT (id) DO NOTHING`) and returns the ids it inserted (not those
/// already stored).
pub async fn insert_rows_returning<C: ConnectionTrait>(
    db: &C,
    rows: &[Model],
) -> Result<Vec<Uuid>, DbErr> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let stmt = match backend {
        sea_orm::DbBackend::Postgres => postgres_insert_statement(rows, true),
        _ => {
            let mut q = insert_statement(backend, rows);
            q.returning_col(Column::Id);
            let (sql, values) = q.build(sea_orm::sea_query::SqliteQueryBuilder);
            sea_orm::Statement::from_sql_and_values(backend, sql, values)
        }
    };
    db.query_all_raw(stmt)
        .await?
        .iter()
        .map(|r| r.try_get::<RowId>("", "id").map(|id| id.0))
        .collect()
}

/// Inserts `rows` (`ON CONFLICT (id) DO NOTHING`); nothing to do for no rows.
pub async fn insert_rows<C: ConnectionTrait>(db: &C, rows: &[Model]) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    let backend = db.get_database_backend();
    match backend {
        sea_orm::DbBackend::Postgres => {
            db.execute_raw(postgres_insert_statement(rows, false))
                .await?
        }
        _ => db.execute(&insert_statement(backend, rows)).await?,
    };
    Ok(())
}
