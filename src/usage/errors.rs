//! The top error messages of a range (issue 21): failed calls grouped by their message with
//! secrets and ids masked (so "request req_8f3a… timed out" and "request req_91bc… timed out"
//! are one line), each with its count and when it was last seen, most frequent first.
//!
//! Read from the newest [`MAX_SCANNED`] failures of the range at most (through the partial index
//! of failed calls, migration 000019), grouped by the database by raw message, so the cost stays
//! bounded however many calls failed; the answer says when it was capped.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use regex::Regex;
use sea_orm::sea_query::Expr;
use sea_orm::{
    DatabaseConnection, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement,
};

use super::UsageFilter;
use crate::db::entities::usage;

/// The most failures one answer reads (the newest of the range).
pub const MAX_SCANNED: u64 = 5_000;

/// The longest message shown (in characters), after masking.
const MAX_MESSAGE: usize = 300;

/// One message and how often it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorGroup {
    /// The message with secrets and ids masked; `(no message)` for failures without one.
    pub message: String,
    pub count: u64,
    pub last_seen: DateTime<Utc>,
}

/// The most frequent messages, and how many failures they were counted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopErrors {
    pub groups: Vec<ErrorGroup>,
    /// Failures read.
    pub scanned: u64,
    /// Whether the range holds more failures than were read ([`MAX_SCANNED`]).
    pub capped: bool,
}

static IDS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        // UUIDs, with or without dashes.
        (
            r"(?i)\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b",
            "<id>",
        ),
        // Provider request and object ids: req_…, chatcmpl-…, resp_…, call_…
        (
            r"\b(?:req|chatcmpl|resp|call|run|msg|file)[_-][A-Za-z0-9]{6,}\b",
            "<id>",
        ),
        // Long hexadecimal or base64-like tokens.
        (r"\b[0-9a-fA-F]{16,}\b", "<id>"),
        (r"\b[A-Za-z0-9_\-]{32,}\b", "<id>"),
        // IP addresses, then numbers of four digits or more (ports, counts, durations; HTTP
        // statuses, three digits, stay: a 429 is not a 500).
        (r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b", "<ip>"),
        (r"\b\d{4,}(?:\.\d+)?\b", "<n>"),
    ]
    .into_iter()
    .map(|(re, with)| (Regex::new(re).expect("static pattern"), with))
    .collect()
});

/// `message` with secrets (key-shaped tokens) and ids masked, whitespace collapsed, cut to
/// [`MAX_MESSAGE`] characters.
pub fn mask(message: &str) -> String {
    let mut out = crate::redact::redact(message, &[]);
    for (re, with) in IDS.iter() {
        out = re.replace_all(&out, *with).into_owned();
    }
    let mut out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.is_empty() {
        return "(no message)".to_owned();
    }
    if out.chars().count() > MAX_MESSAGE {
        out = out.chars().take(MAX_MESSAGE - 1).collect::<String>() + "…";
    }
    out
}

#[derive(Debug, FromQueryResult)]
struct Group {
    error: Option<String>,
    n: i64,
    last_seen: DateTime<Utc>,
}

/// The `limit` most frequent masked messages of the failed calls `filter` selects (its
/// `success` is ignored: only failures count), ties broken by the latest seen.
///
/// The database groups the newest [`MAX_SCANNED`] failures by their raw message; each distinct
/// message is then masked once and the groups that mask alike merged.
pub async fn top_errors(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    limit: usize,
) -> Result<TopErrors, DbErr> {
    let backend = db.get_database_backend();
    // The partial index's own predicate, written out (a bound parameter would hide it from the
    // planner).
    let failed = match backend {
        DbBackend::Postgres => "NOT llm_tracker_usage.success",
        _ => "llm_tracker_usage.success = 0",
    };
    let filter = UsageFilter {
        success: None,
        ..filter.clone()
    };
    let newest = || {
        usage::Entity::find()
            .select_only()
            .filter(filter.condition(backend))
            .filter(Expr::cust(failed))
            .order_by_desc(usage::Column::CreatedAt)
    };
    let inner = newest()
        .column(usage::Column::Error)
        .column(usage::Column::CreatedAt)
        .limit(MAX_SCANNED)
        .build(backend);
    let grouped = Statement::from_sql_and_values(
        backend,
        format!(
            "SELECT error, COUNT(*) AS n, MAX(created_at) AS last_seen FROM ({}) s GROUP BY error",
            inner.sql
        ),
        inner.values.map(|v| v.0).unwrap_or_default(),
    );
    let rows = Group::find_by_statement(grouped).all(db).await?;
    // One more failure than was read?
    let capped = newest()
        .column(usage::Column::CreatedAt)
        .offset(MAX_SCANNED)
        .limit(1)
        .into_tuple::<DateTime<Utc>>()
        .one(db)
        .await?
        .is_some();
    let mut scanned = 0u64;
    let mut groups: HashMap<String, ErrorGroup> = HashMap::new();
    for row in rows {
        let count = row.n.max(0) as u64;
        scanned += count;
        let message = mask(row.error.as_deref().unwrap_or_default());
        let g = groups.entry(message.clone()).or_insert(ErrorGroup {
            message,
            count: 0,
            last_seen: row.last_seen,
        });
        g.count += count;
        g.last_seen = g.last_seen.max(row.last_seen);
    }
    let mut groups: Vec<ErrorGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.message.cmp(&b.message))
    });
    groups.truncate(limit);
    Ok(TopErrors {
        groups,
        scanned,
        capped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_numbers_and_secrets_are_masked() {
        assert_eq!(
            mask("Request req_8f3aB29xQ timed out after 30000 ms"),
            "Request <id> timed out after <n> ms"
        );
        assert_eq!(
            mask("row 5b1c3a52-7a0f-4a8e-9c61-0f2d1e3c4b5a not found"),
            "row <id> not found"
        );
        assert_eq!(
            mask("Incorrect API key provided: sk-proj-abcdefghijklmnop. See docs"),
            "Incorrect API key provided: sk-***. See docs"
        );
        assert_eq!(
            mask("connect to 10.0.0.12:5432 refused"),
            "connect to <ip> refused"
        );
        assert_eq!(mask("  rate   limited\n(429) "), "rate limited (429)");
        assert_eq!(mask(""), "(no message)");
        assert_eq!(mask(&"x ".repeat(400)).chars().count(), MAX_MESSAGE);
        // Small numbers stay: they tell messages apart ("HTTP 5" is not "HTTP 4").
        assert_eq!(mask("retry 2 of 3"), "retry 2 of 3");
    }
}
