//! The ingest API's throughput: `POST /api/v1/usage/` batches of 1,000 rows through a real
//! server on a loopback port, committed to PostgreSQL (or SQLite), `BENCH_CLIENTS` (1,4)
//! clients in a closed loop for `BENCH_BATCHES` (60) batches each.
//!
//! `BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:55432/bench_ingest cargo bench --bench ingest`
//! (without it: a SQLite file in a temporary directory). Rows stay in the database; each run
//! uses new ids.

mod common;

use std::time::{Duration, Instant};

use llm_tracker::Settings;
use llm_tracker::api_keys::Scope;
use serde_json::{Value, json};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn batch(n: usize) -> Value {
    let end = chrono::Utc::now();
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": uuid::Uuid::new_v4(), "model": if i % 3 == 0 { "gpt-4o-mini" } else { "gemini-2.5-flash" },
                "prompt_tokens": 1200, "completion_tokens": 300, "cached_tokens": 1024,
                "success": i % 50 != 0, "metadata": {"node_name": "bench", "source_type": "task"},
                "started_at": (end - chrono::Duration::milliseconds(1500)).to_rfc3339(),
                "created_at": end.to_rfc3339(),
            })
        })
        .collect();
    json!({ "rows": rows })
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (db, url, label, key) =
        common::database_with_key(dir.path(), "ingest", Scope::Ingest).await;
    let vars = std::collections::HashMap::from([
        ("DATABASE_URL".to_owned(), url.clone()),
        (
            "JWT_SECRET".to_owned(),
            "ingest-bench-secret-0123456789".to_owned(),
        ),
    ]);
    let settings = Settings::from_map(&vars).unwrap();
    let endpoint = format!(
        "{}/api/v1/usage/",
        common::serve_with_store(db, settings, dir.path().join("spool.jsonl"))
    );
    let batches: usize = env_or("BENCH_BATCHES", 60);
    let size: usize = env_or("BENCH_BATCH_ROWS", 1000);
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let http = reqwest::Client::new();
    println!(
        "# ingest API benchmark: {label}, batches of {size} rows, {batches} batches per client"
    );
    println!();
    println!("| database | clients | rows | spooled | batch p50 | batch p99 | rows/s |");
    println!("|---|---|---|---|---|---|---|");
    for c in clients {
        // Bodies made before the clock starts: the client's JSON is not the server's time.
        let bodies: Vec<Vec<String>> = (0..c)
            .map(|_| (0..batches).map(|_| batch(size).to_string()).collect())
            .collect();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for mine in bodies {
            let (http, endpoint, key) = (http.clone(), endpoint.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for body in mine {
                    let t = Instant::now();
                    let res = http
                        .post(&endpoint)
                        .bearer_auth(&key)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 200);
                    let answer: Value = res.json().await.unwrap();
                    let stored = answer["stored"].as_array().map_or(0, Vec::len);
                    let spooled = answer["spooled"].as_array().map_or(0, Vec::len);
                    out.push((t.elapsed(), stored, spooled));
                }
                out
            }));
        }
        let mut times = Vec::new();
        let (mut rows, mut spooled) = (0, 0);
        for t in tasks {
            for (d, s, sp) in t.await.unwrap() {
                times.push(d);
                rows += s;
                spooled += sp;
            }
        }
        let elapsed = started.elapsed();
        times.sort();
        let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| {label} | {c} | {rows} | {spooled} | {} | {} | {:.0} |",
            ms(q(0.5)),
            ms(q(0.99)),
            rows as f64 / elapsed.as_secs_f64()
        );
    }
}
