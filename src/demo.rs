//! Demo data for `serve --demo`: realistic usage rows over the last 90 days, on an empty
//! database only.

use chrono::{Duration, SubsecRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{DatabaseConnection, DbErr, EntityTrait, PaginatorTrait};
use serde_json::json;

use crate::db::entities::usage;
use crate::pricing::{PriceTable, Tokens};
use crate::users::{NewUser, create_user, find_by_username};

/// Rows `serve --demo` writes.
pub const DEMO_ROWS: usize = 50_000;

/// (model, provider, weight, mean prompt tokens, mean completion tokens, reasoning share,
/// cache hit rate)
const MODELS: &[(&str, &str, u32, u32, u32, f64, f64)] = &[
    ("gpt-4o-mini-2024-07-18", "openai", 30, 900, 180, 0.0, 0.35),
    (
        "gpt-4o-2024-11-20",
        "azure_openai",
        14,
        1400,
        260,
        0.0,
        0.45,
    ),
    ("gpt-4.1-2025-04-14", "openai", 10, 2200, 400, 0.0, 0.5),
    ("o4-mini-2025-04-16", "openai", 9, 2000, 700, 0.6, 0.4),
    ("o3-2025-04-16", "openai", 3, 3000, 1500, 0.7, 0.3),
    ("gemini-2.5-flash", "gemini", 25, 1100, 350, 0.45, 0.25),
    ("gemini-2.5-pro", "gemini", 9, 2600, 900, 0.6, 0.2),
];

const NODES: &[&str] = &[
    "interpret",
    "classify",
    "summarize",
    "extract",
    "answer",
    "translate",
];
const ERRORS: &[&str] = &[
    "Rate limit reached for requests. Please try again in 84ms.",
    "LLM returned empty response",
    "LLM call timed out after 120s",
    "The server had an error while processing your request.",
    "You exceeded your current quota, please check your plan and billing details.",
];

/// Fills an empty usage table with `rows` demo rows (and 12 demo users); returns how many
/// rows it wrote (0 when the table already had rows).
/// Costs come from `prices` (the demo's models are all in the built-in table).
pub async fn seed(
    db: &DatabaseConnection,
    prices: &PriceTable,
    rows: usize,
    seed: u64,
) -> Result<usize, DbErr> {
    if usage::Entity::find().count(db).await? > 0 {
        return Ok(0);
    }
    let mut users = Vec::new();
    for i in 1..=12 {
        let name = format!("demo-user-{i:02}");
        let user = match find_by_username(db, &name).await? {
            Some(u) => u,
            None => create_user(
                db,
                NewUser {
                    username: name,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DbErr::Custom(e.to_string()))?,
        };
        users.push(user.id);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let total_weight: u32 = MODELS.iter().map(|m| m.2).sum();
    let now = Utc::now().trunc_subsecs(6);
    let span_us = 90 * 86_400 * 1_000_000i64;
    let mut batch = Vec::with_capacity(500);
    for _ in 0..rows {
        let mut pick = rng.random_range(0..total_weight);
        let &(model, provider, _, prompt_mean, completion_mean, reasoning_share, cache_rate) =
            MODELS
                .iter()
                .find(|m| {
                    if pick < m.2 {
                        true
                    } else {
                        pick -= m.2;
                        false
                    }
                })
                .unwrap_or(&MODELS[0]);
        // Skewed users: a few heavy users, a long tail, some calls without a user.
        let user_id = if rng.random_bool(0.1) {
            None
        } else {
            let r: f64 = rng.random();
            Some(users[((r * r * r) * users.len() as f64) as usize % users.len()])
        };
        let prompt = (prompt_mean as f64 * rng.random_range(0.2..1.8)) as i32;
        let completion = (completion_mean as f64 * rng.random_range(0.2..1.8)) as i32;
        let reasoning = (completion as f64 * reasoning_share * rng.random_range(0.5..1.0)) as i32;
        let cached = if rng.random_bool(cache_rate) {
            (prompt as f64 * rng.random_range(0.3..0.9)) as i32 / 128 * 128
        } else {
            0
        };
        let failed = rng.random_bool(0.03);
        // More traffic on weekdays and in working hours; slightly growing over time.
        let mut offset = (rng.random::<f64>().sqrt() * span_us as f64) as i64;
        if rng.random_bool(0.3) {
            offset -= offset % (86_400 * 1_000_000) - rng.random_range(8..19) * 3_600_000_000;
        }
        let created_at = now - Duration::microseconds(span_us - offset.clamp(0, span_us - 1));
        let latency_ms = 300 + (completion as i64) * rng.random_range(5..25);
        // About 3 calls in 10 streamed, the first token 150–850 ms after the start (from the
        // row's own time, so the seeded sequence of the other values stays as it was).
        let spread =
            (created_at.timestamp_micros() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let micros = (spread % 100_000) as i64;
        let streamed = !failed && spread % 10 < 3;
        let started_at = created_at - Duration::milliseconds(latency_ms);
        let first_chunk_at = streamed
            .then(|| started_at + Duration::milliseconds((150 + micros % 700).min(latency_ms)));
        let (p, c, ca, re) = if failed {
            (0, 0, 0, 0)
        } else {
            (prompt, completion, cached, reasoning)
        };
        let cost = prices.cost_micros(
            model,
            Tokens {
                prompt: p.into(),
                completion: c.into(),
                cached: ca.into(),
                reasoning: re.into(),
            },
        );
        batch.push(usage::Model {
            id: uuid::Uuid::new_v4().into(),
            user_id,
            model: model.into(),
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            cached_tokens: ca,
            reasoning_tokens: re,
            success: !failed,
            error: failed.then(|| ERRORS[rng.random_range(0..ERRORS.len())].to_owned()),
            metadata: {
                let mut m = json!({
                    "node_name": NODES[rng.random_range(0..NODES.len())],
                    "source_type": if rng.random_bool(0.7) { "task" } else { "request" },
                    "provider": provider,
                    "attempts": if failed { 3 } else { 1 },
                    "demo": true,
                });
                if streamed {
                    m["stream"] = json!(true);
                }
                m
            },
            created_at,
            started_at: Some(started_at),
            cost: cost.map(usage::Cost),
            cost_currency: "USD".into(),
            is_streaming: streamed,
            first_chunk_at,
        });
        if batch.len() == 500 {
            usage::insert_rows(db, &std::mem::take(&mut batch)).await?;
        }
    }
    usage::insert_rows(db, &batch).await?;
    Ok(rows)
}
