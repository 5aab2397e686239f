//! The SQL behind the read side, for `EXPLAIN`: the API benchmark prints each statement's plan
//! and checks that the ones an index can serve use one. The statements are built by the same
//! functions the endpoints run, so a plan shown is the plan served.

use sea_orm::{DbBackend, QueryTrait, Statement};

use super::UsageFilter;
use super::list::{count_query, page_query};
use super::stats::{Granularity, token_stats_query};

/// The statements one token-stats request runs.
pub fn token_stats_statements(
    backend: DbBackend,
    filter: &UsageFilter,
    granularity: Option<Granularity>,
) -> Vec<Statement> {
    vec![token_stats_query(backend, filter, granularity, chrono_tz::Tz::UTC).build(backend)]
}

/// The statements one llm-usage request runs: the count, then the page (when it is not past
/// the end).
pub fn list_usage_statements(
    backend: DbBackend,
    filter: &UsageFilter,
    page: u64,
    page_size: u64,
) -> Vec<Statement> {
    let offset = page.saturating_sub(1).saturating_mul(page_size);
    vec![
        count_query(filter).build(backend),
        page_query(filter, offset, page_size).build(backend),
    ]
}

/// Planner settings the token-stats aggregate runs under (in its own transaction), if any:
/// run them before explaining its statement to see the plan that is served.
pub fn token_stats_settings(backend: DbBackend) -> Option<&'static str> {
    super::stats::aggregate_settings(backend)
}

/// `statement` prefixed for the backend's plan output: `EXPLAIN` on PostgreSQL, `EXPLAIN QUERY
/// PLAN` on SQLite.
pub fn explain(backend: DbBackend, statement: &Statement) -> Statement {
    let prefix = match backend {
        DbBackend::Postgres => "EXPLAIN ",
        _ => "EXPLAIN QUERY PLAN ",
    };
    Statement {
        sql: format!("{prefix}{}", statement.sql),
        values: statement.values.clone(),
        db_backend: backend,
    }
}
