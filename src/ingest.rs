//! The ingest API's rows (issue 19 item 3): usage recorded by code that calls providers itself
//! (any language), sent in batches of up to 1,000 and stored through the tracker's write path
//! (committed, or spooled when the database does not take them in time).
//!
//! Each row is checked on its own; a refused row does not stop the others. A row's `id` is its
//! idempotency key: a row whose id is already stored, or repeated in the batch, is reported as
//! already there and stored once.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use sea_orm::{ConnectionTrait, DbErr};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::entities::usage;
use crate::pricing::{PriceTable, Tokens};
use crate::tracker::{BatchStored, UsageStore};

/// Rows per request, at most.
pub const MAX_ROWS: usize = 1000;

/// How long a batch waits for its commit before it is spooled instead (the answer waits for
/// it: the ingest API answers once every row is safe).
pub const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// How far in the future a row's `created_at` may lie (clients' clocks drift).
pub const FUTURE_TOLERANCE: Duration = Duration::minutes(5);

const MAX_ERROR_CHARS: usize = 10_000;

const FIELDS: [&str; 15] = [
    "id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "success",
    "error",
    "metadata",
    "created_at",
    "started_at",
    "first_chunk_at",
    "is_streaming",
    "cost",
];

/// Who sends the rows: the API key's user, and whether that user is staff (who may name
/// another user per row with `user_id`).
#[derive(Debug, Clone)]
pub struct Sender {
    pub user_id: i32,
    pub is_staff: bool,
    pub key_prefix: String,
}

/// A refused row: its position in the batch, its id when it had a readable one, and what is
/// wrong with each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RefusedRow {
    pub index: usize,
    pub id: Option<String>,
    pub errors: BTreeMap<String, Vec<String>>,
}

/// What became of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct IngestResult {
    /// Ids stored by this request (committed, or spooled: see `spooled`).
    pub stored: Vec<Uuid>,
    /// Of `stored`, the ids written to the local spool because the database did not take them
    /// in time; they are stored as soon as it does (exactly once).
    pub spooled: Vec<Uuid>,
    /// Ids that were already stored, or repeated in this batch: stored once, not an error.
    pub duplicates: Vec<Uuid>,
    pub refused: Vec<RefusedRow>,
}

struct Problems(BTreeMap<String, Vec<String>>);

impl Problems {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0
            .entry(field.to_owned())
            .or_default()
            .push(message.into());
    }
}

fn time(row: &Map<String, Value>, field: &str, p: &mut Problems) -> Option<DateTime<Utc>> {
    match row.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s.trim()) {
            Ok(t) => Some(chrono::SubsecRound::trunc_subsecs(t.with_timezone(&Utc), 6)),
            Err(_) => {
                p.add(
                    field,
                    "an RFC 3339 date-time with an offset, e.g. 2026-11-26T14:00:00.123Z",
                );
                None
            }
        },
        Some(_) => {
            p.add(field, "a string (RFC 3339 date-time)");
            None
        }
    }
}

fn count(row: &Map<String, Value>, field: &str, p: &mut Problems) -> Option<i32> {
    match row.get(field) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
            Some(n) if n >= 0 => Some(n),
            _ => {
                p.add(field, "a whole number from 0 to 2147483647");
                None
            }
        },
    }
}

/// A cost in USD (a JSON number or a decimal string), 0 to 999999.999999, at most six decimals.
fn cost(v: &Value, p: &mut Problems) -> Option<i64> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => {
            p.add("cost", "a number or a decimal string (USD)");
            return None;
        }
    };
    let parsed = text
        .parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(&text));
    match parsed {
        Ok(d) if d.is_sign_negative() && !d.is_zero() => {
            p.add("cost", "not negative");
            None
        }
        Ok(d) if d.normalize().scale() > 6 => {
            p.add("cost", "at most six decimals (micro-dollars)");
            None
        }
        Ok(d) => match i64::try_from(d * Decimal::from(1_000_000)) {
            Ok(micros) if micros < 1_000_000_000_000 => Some(micros),
            _ => {
                p.add("cost", "at most 999999.999999");
                None
            }
        },
        Err(_) => {
            p.add("cost", "a number or a decimal string (USD)");
            None
        }
    }
}

/// A refused row's id (when it had a readable one) and each field's problems.
pub type RowProblems = (Option<String>, BTreeMap<String, Vec<String>>);

/// One row checked and turned into a usage row (its `user_id` still to be confirmed when a
/// staff sender named another user). `Err` holds each field's problems.
pub fn check_row(
    raw: &Value,
    sender: &Sender,
    prices: &PriceTable,
    now: DateTime<Utc>,
) -> Result<usage::Model, RowProblems> {
    let mut p = Problems(BTreeMap::new());
    let Some(row) = raw.as_object() else {
        p.add("row", "a JSON object");
        return Err((None, p.0));
    };
    let raw_id = row.get("id").and_then(Value::as_str).map(str::to_owned);
    for key in row.keys() {
        if !FIELDS.contains(&key.as_str()) && key != "user_id" {
            p.add(key, "unknown field");
        }
    }
    let id = match row.get("id") {
        Some(Value::String(s)) => match Uuid::parse_str(s.trim()) {
            Ok(id) => Some(id),
            Err(_) => {
                p.add("id", "a UUID");
                None
            }
        },
        None | Some(Value::Null) => {
            p.add("id", "required: a UUID, the row's idempotency key");
            None
        }
        Some(_) => {
            p.add("id", "a UUID string");
            None
        }
    };
    let model = match row.get("model") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= 255 => {
            if s.contains('\0') {
                p.add("model", "no NUL characters");
            }
            Some(s.trim().to_owned())
        }
        Some(Value::String(_)) => {
            p.add("model", "1 to 255 characters");
            None
        }
        _ => {
            p.add("model", "required: the model's name");
            None
        }
    };
    let prompt = count(row, "prompt_tokens", &mut p).unwrap_or(0);
    let completion = count(row, "completion_tokens", &mut p).unwrap_or(0);
    let cached = count(row, "cached_tokens", &mut p).unwrap_or(0);
    let reasoning = count(row, "reasoning_tokens", &mut p).unwrap_or(0);
    let total =
        count(row, "total_tokens", &mut p).unwrap_or_else(|| prompt.saturating_add(completion));
    let error = match row.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.contains('\0') => {
            p.add("error", "no NUL characters");
            None
        }
        Some(Value::String(s)) => Some(s.chars().take(MAX_ERROR_CHARS).collect::<String>()),
        Some(_) => {
            p.add("error", "a string or null");
            None
        }
    };
    let success = match row.get("success") {
        None | Some(Value::Null) => error.is_none(),
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            p.add("success", "true or false");
            true
        }
    };
    let mut metadata = match row.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            p.add("metadata", "a JSON object");
            Map::new()
        }
    };
    if serde_json::to_string(&metadata).is_ok_and(|s| s.contains("\\u0000")) {
        p.add("metadata", "no NUL characters");
    }
    let created_at = match time(row, "created_at", &mut p) {
        Some(t) if t > now + FUTURE_TOLERANCE => {
            p.add(
                "created_at",
                "not in the future (5 minutes of clock skew allowed)",
            );
            None
        }
        Some(t) => Some(t),
        None => {
            if !p.0.contains_key("created_at") {
                p.add("created_at", "required: when the call ended (RFC 3339)");
            }
            None
        }
    };
    let started_at = time(row, "started_at", &mut p);
    let first_chunk_at = time(row, "first_chunk_at", &mut p);
    if let (Some(s), Some(c)) = (started_at, created_at)
        && s > c
    {
        p.add("started_at", "not after created_at");
    }
    if let Some(f) = first_chunk_at {
        if created_at.is_some_and(|c| f > c) {
            p.add("first_chunk_at", "not after created_at");
        }
        if started_at.is_some_and(|s| f < s) {
            p.add("first_chunk_at", "not before started_at");
        }
    }
    // Streamed when it says so, else when it names a first chunk.
    let is_streaming = match row.get("is_streaming") {
        None | Some(Value::Null) => first_chunk_at.is_some(),
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            p.add("is_streaming", "true or false");
            false
        }
    };
    if !is_streaming && first_chunk_at.is_some() {
        p.add(
            "first_chunk_at",
            "only for a streamed call (is_streaming false)",
        );
    }
    let given_cost = match row.get("cost") {
        None | Some(Value::Null) => None,
        Some(v) => cost(v, &mut p),
    };
    let user_id = match row.get("user_id") {
        None | Some(Value::Null) => sender.user_id,
        Some(v) => match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
            Some(u) if u == sender.user_id => u,
            Some(u) if sender.is_staff && u > 0 => u,
            Some(_) if !sender.is_staff => {
                p.add(
                    "user_id",
                    "only a staff user's key may record calls for another user",
                );
                sender.user_id
            }
            _ => {
                p.add("user_id", "a user id (a positive whole number)");
                sender.user_id
            }
        },
    };
    if !p.0.is_empty() {
        return Err((raw_id, p.0));
    }
    let (Some(id), Some(model), Some(created_at)) = (id, model, created_at) else {
        return Err((raw_id, p.0));
    };
    metadata
        .entry("source_type")
        .or_insert_with(|| Value::String("ingest".into()));
    metadata.insert("api_key".into(), Value::String(sender.key_prefix.clone()));
    let cost = given_cost.or_else(|| {
        prices.cost_micros(
            &model,
            Tokens {
                prompt: prompt.into(),
                completion: completion.into(),
                cached: cached.into(),
                reasoning: reasoning.into(),
            },
        )
    });
    Ok(usage::Model {
        id: id.into(),
        user_id: Some(user_id),
        model,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        success,
        error,
        metadata: Value::Object(metadata),
        created_at,
        started_at,
        cost: cost.map(usage::Cost),
        cost_currency: crate::pricing::CURRENCY.into(),
        is_streaming,
        first_chunk_at,
    })
}

/// Which of `ids` are users.
async fn user_ids<C: ConnectionTrait>(db: &C, ids: &[i32]) -> Result<HashSet<i32>, DbErr> {
    use crate::db::entities::auth_user;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    let found: Vec<i32> = auth_user::Entity::find()
        .select_only()
        .column(auth_user::Column::Id)
        .filter(auth_user::Column::Id.is_in(ids.iter().copied()))
        .into_tuple()
        .all(db)
        .await?;
    Ok(found.into_iter().collect())
}

/// Checks every row, then stores the good ones in one transaction (`ON CONFLICT (id) DO
/// NOTHING … RETURNING id`: the ids it skipped were already stored, and are reported as
/// duplicates), or, when the database does not commit it within [`COMMIT_DEADLINE`], spools
/// the batch — before this returns either way. A spooled batch's ids are reported as stored
/// and spooled (the replay skips any already there). A staff sender's rows for other users
/// need the database to confirm the user: while it is down they are refused, to be sent again.
pub async fn ingest<C: ConnectionTrait>(
    db: &C,
    store: &UsageStore,
    prices: &PriceTable,
    sender: &Sender,
    rows: &[Value],
) -> IngestResult {
    let now = Utc::now();
    let mut out = IngestResult::default();
    let mut good: Vec<(usize, usage::Model)> = Vec::new();
    let mut seen = HashSet::new();
    for (index, raw) in rows.iter().enumerate() {
        match check_row(raw, sender, prices, now) {
            Ok(row) => {
                if seen.insert(row.id.0) {
                    good.push((index, row));
                } else {
                    out.duplicates.push(row.id.0);
                }
            }
            Err((id, errors)) => out.refused.push(RefusedRow { index, id, errors }),
        }
    }
    // Other users named by a staff sender must exist.
    let others: Vec<i32> = good
        .iter()
        .filter_map(|(_, r)| r.user_id.filter(|u| *u != sender.user_id))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !others.is_empty() {
        let known = user_ids(db, &others).await;
        good.retain(|(index, r)| {
            let user = r.user_id.unwrap_or(sender.user_id);
            if user == sender.user_id {
                return true;
            }
            let message = match &known {
                Ok(k) if k.contains(&user) => return true,
                Ok(_) => "no such user",
                Err(_) => "the database could not confirm this user now; send the row again",
            };
            out.refused.push(RefusedRow {
                index: *index,
                id: Some(r.id.0.to_string()),
                errors: BTreeMap::from([("user_id".to_owned(), vec![message.to_owned()])]),
            });
            false
        });
    }
    let fresh: Vec<usage::Model> = good.into_iter().map(|(_, r)| r).collect();
    let ids: Vec<Uuid> = fresh.iter().map(|r| r.id.0).collect();
    match store.record_batch(fresh, COMMIT_DEADLINE).await {
        BatchStored::Inserted(inserted) => {
            // What the insert skipped was already stored (by an earlier request, or a
            // concurrent one).
            let new: HashSet<Uuid> = inserted.into_iter().collect();
            for id in ids {
                if new.contains(&id) {
                    out.stored.push(id);
                } else {
                    out.duplicates.push(id);
                }
            }
        }
        BatchStored::Deferred => {
            // Nothing is known about these ids until the replay: reported as stored (they
            // will be, once each) and spooled.
            out.spooled = ids.clone();
            out.stored = ids;
        }
    }
    out.refused.sort_by_key(|r| r.index);
    crate::metrics::metrics()
        .rows_rejected
        .with_label_values(&["ingest"])
        .inc_by(out.refused.len() as u64);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sender(staff: bool) -> Sender {
        Sender {
            user_id: 7,
            is_staff: staff,
            key_prefix: "ltk_abcdefgh".into(),
        }
    }

    fn check(v: Value, staff: bool) -> Result<usage::Model, BTreeMap<String, Vec<String>>> {
        let now = "2026-11-26T12:00:00Z".parse().unwrap();
        check_row(&v, &sender(staff), &PriceTable::builtin(), now).map_err(|(_, e)| e)
    }

    fn good() -> Value {
        json!({"id": "6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11", "model": "gpt-4o",
               "prompt_tokens": 1000, "completion_tokens": 200, "cached_tokens": 100,
               "created_at": "2026-11-26T11:59:59.1234567Z", "started_at": "2026-11-26T11:59:58+00:00"})
    }

    #[test]
    fn a_good_row_is_priced_defaulted_and_marked() {
        let r = check(good(), false).unwrap();
        assert_eq!(r.total_tokens, 1200);
        assert_eq!(r.user_id, Some(7));
        assert!(r.success && r.error.is_none());
        assert_eq!(
            r.created_at.to_rfc3339(),
            "2026-11-26T11:59:59.123456+00:00"
        );
        assert!(r.cost.is_some(), "gpt-4o has a price");
        assert_eq!(r.metadata["source_type"], "ingest");
        assert_eq!(r.metadata["api_key"], "ltk_abcdefgh");
        let mut given = good();
        given["cost"] = json!("0.001250");
        given["metadata"] = json!({"source_type": "batch-job", "api_key": "forged"});
        let r = check(given, false).unwrap();
        assert_eq!(r.cost, Some(usage::Cost(1250)));
        assert_eq!(r.metadata["source_type"], "batch-job");
        assert_eq!(r.metadata["api_key"], "ltk_abcdefgh");
        let mut failed = good();
        failed["error"] = json!("upstream 503");
        assert!(!check(failed, false).unwrap().success);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"id": "x"}), "id"),
            (json!({"model": ""}), "model"),
            (json!({"prompt_tokens": -1}), "prompt_tokens"),
            (json!({"prompt_tokens": 3_000_000_000i64}), "prompt_tokens"),
            (json!({"completion_tokens": "5"}), "completion_tokens"),
            (json!({"success": "yes"}), "success"),
            (json!({"metadata": [1]}), "metadata"),
            (json!({"created_at": "2026-11-26 11:00:00"}), "created_at"),
            (json!({"created_at": "2026-11-26T13:00:00Z"}), "created_at"),
            (json!({"started_at": "2026-11-26T12:30:00Z"}), "started_at"),
            (
                json!({"first_chunk_at": "2026-11-26T11:00:00Z"}),
                "first_chunk_at",
            ),
            (json!({"is_streaming": "yes"}), "is_streaming"),
            (
                json!({"is_streaming": false, "first_chunk_at": "2026-11-26T11:59:59Z"}),
                "first_chunk_at",
            ),
            (json!({"cost": -1}), "cost"),
            (json!({"cost": "0.0000001"}), "cost"),
            (json!({"cost": 1e12}), "cost"),
            (json!({"user_id": 8}), "user_id"),
            (json!({"prompt_token": 5}), "prompt_token"),
        ];
        for (patch, field) in cases {
            let mut row = good();
            for (k, v) in patch.as_object().unwrap() {
                row[k] = v.clone();
            }
            let errors = check(row.clone(), false).expect_err(field);
            assert!(errors.contains_key(field), "{row}: {errors:?}");
        }
        let mut missing = good();
        missing.as_object_mut().unwrap().remove("id");
        assert!(check(missing, false).unwrap_err().contains_key("id"));
        assert!(check(json!([1]), false).unwrap_err().contains_key("row"));
    }

    #[test]
    fn staff_may_name_another_user() {
        let mut row = good();
        row["user_id"] = json!(8);
        assert_eq!(check(row.clone(), true).unwrap().user_id, Some(8));
        assert!(check(row, false).is_err());
    }
}
