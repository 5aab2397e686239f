//! What a Prometheus scrape of `/metrics` costs (issue 20: ≤ 1 ms, no database query): the
//! registry filled to a realistic shape — `BENCH_MODELS` (50) models, each served by one of 3
//! providers (`BENCH_PROVIDERS_PER_MODEL`=3 gives every model all three), both outcomes, every
//! token kind and a cost; `BENCH_ROUTES` (30) routes × 4 statuses; every histogram observed —
//! then rendered `BENCH_SCRAPES` (2000) times.
//!
//! `cargo bench --bench metrics`

use std::time::Instant;

use chrono::{Duration, Utc};
use llm_tracker::db::entities::usage;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let models = env_or("BENCH_MODELS", 50);
    let scrapes = env_or("BENCH_SCRAPES", 2000);
    let per_model = env_or("BENCH_PROVIDERS_PER_MODEL", 1).clamp(1, 3);
    let routes = env_or("BENCH_ROUTES", 30);
    let m = llm_tracker::metrics::metrics();
    let now = Utc::now();
    for i in 0..models {
        for k in 0..per_model {
            let provider = ["openai", "azure_openai", "gemini"][(i + k) % 3];
            let row = usage::Model {
                id: uuid::Uuid::new_v4().into(),
                user_id: None,
                model: format!("model-{i}"),
                prompt_tokens: 1200,
                completion_tokens: 300,
                total_tokens: 1500,
                cached_tokens: 100,
                reasoning_tokens: 50,
                success: true,
                error: None,
                metadata: json!({"provider": provider}),
                created_at: now,
                started_at: Some(now - Duration::milliseconds(1500)),
                cost: Some(usage::Cost(1234)),
                cost_currency: "USD".into(),
                is_streaming: true,
                first_chunk_at: Some(now - Duration::milliseconds(1100)),
            };
            m.observe_call(&row);
            m.observe_call(&usage::Model {
                success: false,
                ..row
            });
        }
    }
    for r in 0..routes {
        let route = format!("/api/v1/route-{r}/{{id}}/");
        for status in ["200", "400", "401", "404"] {
            m.http_requests
                .with_label_values(&[route.as_str(), "GET", status])
                .inc();
        }
        m.http_duration
            .with_label_values(&[route.as_str()])
            .observe(0.004);
    }
    let text = m.render();
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    let mut times = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let out = m.render();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "# /metrics render: {series} series, {} bytes, {scrapes} scrapes",
        text.len()
    );
    println!();
    println!("| series | bytes | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| {series} | {} | {:.3} ms | {:.3} ms | {:.3} ms |",
        text.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}
