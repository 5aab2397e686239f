//! What a Prometheus scrape of `/metrics` costs (issue 20: ≤ 1 ms, no database query): the
//! registry filled to a realistic shape — `BENCH_MODELS` (50) models, each served by one of 3
//! providers (`BENCH_PROVIDERS_PER_MODEL`=3 gives every model all three), both outcomes, every
//! token kind and a cost; `BENCH_ROUTES` (30) routes × 4 statuses; every histogram observed —
//! then rendered `BENCH_SCRAPES` (2000) times (what `serve` does in the background every
//! second), and scraped as many times (the handler's answer from the latest rendering).
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
    // What the background task does every second: gather and encode every series.
    let mut render = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let out = m.render();
        render.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    // What a scrape under `serve` does: the handler's response from the latest rendering.
    m.prerender();
    let mut scrape = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let out = llm_tracker::http::routes::metrics::exposition();
        scrape.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    render.sort_by(|a, b| a.total_cmp(b));
    scrape.sort_by(|a, b| a.total_cmp(b));
    println!(
        "# /metrics: {series} series, {} bytes, {scrapes} renders and {scrapes} scrapes",
        text.len()
    );
    println!();
    println!("| series | bytes | render p50 | render p99 | scrape p50 | scrape p99 | scrape max |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {series} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
        text.len(),
        percentile(&render, 0.5),
        percentile(&render, 0.99),
        percentile(&scrape, 0.5),
        percentile(&scrape, 0.99),
        scrape[scrape.len() - 1]
    );
}
