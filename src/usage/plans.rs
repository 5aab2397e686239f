//! The SQL behind the read side, for `EXPLAIN`: the API benchmark prints each statement's plan
//! and checks that the ones an index can serve use one. The statements are built by the same
//! functions the endpoints run, so a plan shown is the plan served.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, QueryTrait, Statement};

use super::UsageFilter;
use super::list::{count_query, page_query};
use super::rollup::{self, GroupBy};
use super::stats::{Granularity, gap_query, token_stats_query};

/// The statements one token-stats request (in UTC) runs: the rollup's per-model and (with a
/// granularity) per-slot sums and the raw aggregate of each edge; or, when the rollup cannot
/// answer, the raw aggregate of the whole range.
pub async fn token_stats_statements<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
) -> Result<Vec<Statement>, DbErr> {
    let backend = db.get_database_backend();
    let tz = chrono_tz::Tz::UTC;
    let raw = |f: &UsageFilter| token_stats_query(backend, f, granularity, tz).build(backend);
    Ok(
        match rollup::plan(db, filter, granularity.map(|g| (g, tz)), false).await? {
            None => vec![raw(filter)],
            Some(plan) => {
                let mut out = vec![rollup::statement(backend, &plan, filter, GroupBy::Model)];
                if granularity.is_some() {
                    out.push(rollup::series_statement(backend, &plan, filter));
                }
                out.extend(
                    plan.model_gap_filters(filter, GroupBy::Model)
                        .iter()
                        .map(|f| token_stats_query(backend, f, None, tz).build(backend)),
                );
                out.extend(plan.edges.iter().map(raw));
                if let Some(g) = granularity {
                    out.extend(
                        plan.gap_filters(filter)
                            .iter()
                            .map(|f| gap_query(backend, &plan, f, g, tz).build(backend)),
                    );
                }
                out
            }
        },
    )
}

/// The statements one llm-usage request runs: the total (from the rollup and the edges' rows,
/// or counted in the rows), then the page (when it is not past the end).
pub async fn list_usage_statements<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    page: u64,
    page_size: u64,
) -> Result<Vec<Statement>, DbErr> {
    let backend = db.get_database_backend();
    let offset = page.saturating_sub(1).saturating_mul(page_size);
    let mut out = match rollup::plan(db, filter, None, false).await? {
        None => vec![count_query(backend, filter).build(backend)],
        Some(plan) => {
            let mut out = vec![rollup::statement(backend, &plan, filter, GroupBy::Nothing)];
            out.extend(
                plan.raw(filter, GroupBy::Nothing)
                    .iter()
                    .map(|f| count_query(backend, f).build(backend)),
            );
            out
        }
    };
    out.push(page_query(backend, filter, offset, page_size).build(backend));
    Ok(out)
}

/// The statement that ranks every user for `include=by_user` (no user filter), when the rollup
/// answers `filter`.
pub async fn by_user_rank_statement<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
) -> Result<Option<Statement>, DbErr> {
    let backend = db.get_database_backend();
    Ok(rollup::plan(db, filter, None, true)
        .await?
        .map(|plan| super::stats::rank_statement(backend, &plan, filter)))
}

/// The statements that rank users through bounds for `include=by_user` with `limit` shown
/// (the check for rows with negative tokens, then the bounds over the range's whole months:
/// each month's users with the most tokens where the cover is whole months),
/// when bounds apply to `filter` (see `stats::bound_plan`); the exact sums of the users they
/// name are [`by_user_rank_statement`]'s cells for those users.
pub async fn by_user_bound_statements<C: ConnectionTrait>(
    db: &C,
    filter: &UsageFilter,
    limit: u64,
) -> Result<Option<Vec<Statement>>, DbErr> {
    let backend = db.get_database_backend();
    let Some(plan) = rollup::plan(db, filter, None, true).await? else {
        return Ok(None);
    };
    Ok(super::stats::bound_plan(db, filter, &plan, limit)
        .await?
        .map(|(cover, cover_plan)| {
            vec![
                super::stats::negative_tokens_statement(backend),
                super::stats::bounds_statement(backend, &cover, &cover_plan, limit),
            ]
        }))
}

/// Planner settings the token-stats statements run under (in their read transaction), if
/// any: run them before explaining its statements to see the plans that are served. (The
/// statements over one user's rows, edges and gaps of a plan with a `user_id`, are served
/// under their filter's [`super::UsageFilter::rows_settings`] instead.)
pub fn token_stats_settings(backend: DbBackend) -> Option<String> {
    let dialect = crate::db::Dialect::of(backend);
    match (dialect.aggregate_settings(), dialect.rollup_settings()) {
        (Some(a), Some(r)) => Some(format!("{a}; {r}")),
        (a, r) => a.or(r).map(str::to_owned),
    }
}

/// `statement` prefixed for the backend's plan output: `EXPLAIN` on PostgreSQL, `EXPLAIN QUERY
/// PLAN` on SQLite.
pub fn explain(backend: DbBackend, statement: &Statement) -> Statement {
    let prefix = crate::db::Dialect::of(backend).explain_prefix();
    Statement {
        sql: format!("{prefix}{}", statement.sql),
        values: statement.values.clone(),
        db_backend: backend,
    }
}
