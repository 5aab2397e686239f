//! `llm-tracker reprice`: recompute `cost` from the active price table, in batches.
//!
//! Rows are visited in `id` order, one batch (one transaction) at a time, and only rows whose
//! cost changes are written; an interrupted run has committed its finished batches and a rerun
//! finds nothing left to change in them, so it is safe to stop and start again.

use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::UsageFilter;
use crate::db::entities::usage::{self, Cost};
use crate::pricing::{PriceTable, Tokens};

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepriceReport {
    /// Rows looked at (those the filters select).
    pub scanned: u64,
    /// Rows whose `cost` was written.
    pub changed: u64,
    /// Rows left (or set) NULL because their model has no price.
    pub unpriced: u64,
}

/// Which rows to reprice.
#[derive(Debug, Clone, Default)]
pub struct RepriceScope {
    /// `created_at` range (as the API's `start_date`/`end_date`).
    pub filter: UsageFilter,
    /// Only rows whose cost is NULL.
    pub missing_only: bool,
}

#[derive(Debug, FromQueryResult)]
struct Priced {
    id: usage::RowId,
    model: String,
    prompt_tokens: i32,
    completion_tokens: i32,
    cached_tokens: i32,
    reasoning_tokens: i32,
    cost: Option<Cost>,
}

/// Recomputes `cost` for the rows in `scope`, `batch` rows per transaction.
pub async fn reprice(
    db: &DatabaseConnection,
    prices: &PriceTable,
    scope: &RepriceScope,
    batch: u64,
    mut progress: impl FnMut(&RepriceReport),
) -> Result<RepriceReport, DbErr> {
    let backend = db.get_database_backend();
    let mut report = RepriceReport::default();
    let mut after: Option<Uuid> = None;
    loop {
        let mut q = usage::Entity::find()
            .select_only()
            .columns([
                usage::Column::Id,
                usage::Column::Model,
                usage::Column::PromptTokens,
                usage::Column::CompletionTokens,
                usage::Column::CachedTokens,
                usage::Column::ReasoningTokens,
                usage::Column::Cost,
            ])
            .filter(scope.filter.condition(backend))
            .order_by_asc(usage::Column::Id)
            .limit(batch.max(1));
        if scope.missing_only {
            q = q.filter(usage::Column::Cost.is_null());
        }
        if let Some(last) = after {
            q = q.filter(sea_orm::sea_query::ExprTrait::gt(
                Expr::col((usage::Entity, usage::Column::Id)),
                crate::db::Dialect::of(backend).uuid(last),
            ));
        }
        let rows = q.into_model::<Priced>().all(db).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id.0);
        let txn = db.begin().await?;
        for row in &rows {
            report.scanned += 1;
            let cost = prices
                .cost_micros(
                    &row.model,
                    Tokens {
                        prompt: row.prompt_tokens.into(),
                        completion: row.completion_tokens.into(),
                        cached: row.cached_tokens.into(),
                        reasoning: row.reasoning_tokens.into(),
                    },
                )
                .map(Cost);
            if cost.is_none() {
                report.unpriced += 1;
            }
            if cost != row.cost {
                let update = Query::update()
                    .table(usage::Entity)
                    .value(usage::Column::Cost, Cost::to_value(cost, backend))
                    .and_where(sea_orm::sea_query::ExprTrait::eq(
                        Expr::col((usage::Entity, usage::Column::Id)),
                        crate::db::Dialect::of(backend).uuid(row.id.0),
                    ))
                    .to_owned();
                txn.execute(&update).await?;
                report.changed += 1;
            }
        }
        txn.commit().await?;
        progress(&report);
    }
    Ok(report)
}
