//! What the gateway adds to a call: `POST /v1/chat/completions` through llm-tracker to a local
//! mock provider (an actix server answering the OpenAI fixture at once), against the same
//! requests sent to the mock directly; rows committed to PostgreSQL (or SQLite).
//!
//! `BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:55432/bench_gateway cargo bench --bench gateway`
//! (`BENCH_CALLS`, default 4000 per line; `BENCH_CONCURRENCY`, default `1,64`;
//! `USAGE_WRITE_MODE=queued` to measure the queued write mode).
//!
//! A third line per concurrency, "bare forwarder", is the floor any HTTP gateway pays here: an
//! actix server with the gateway's two workers that forwards each body to the mock with reqwest
//! and returns the reply, with no key, no parsing and no row.

mod common;

use std::time::{Duration, Instant};

use llm_tracker::Settings;
use llm_tracker::api_keys::Scope;

const REPLY: &str = include_str!("../tests/fixtures/providers/openai_success.json");

/// Streamed replies: this many events, one every `GAP`.
const CHUNKS: usize = 10;
const GAP: Duration = Duration::from_millis(20);

/// The arrival times of a streamed reply's events, from the request's start.
async fn chunk_times(http: &reqwest::Client, url: &str, key: Option<&str>) -> Vec<Duration> {
    use futures_util::StreamExt;
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut times = Vec::new();
    let mut stream = res.bytes_stream();
    let mut pending = Vec::new();
    while let Some(Ok(bytes)) = stream.next().await {
        pending.extend_from_slice(&bytes);
        while let Some(at) = pending.windows(2).position(|w| w == b"\n\n") {
            pending.drain(..at + 2);
            times.push(started.elapsed());
        }
    }
    times
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` on an actix system of its own in a thread; returns what it sends back.
fn spawn_server<F>(f: F) -> String
where
    F: FnOnce(
            std::sync::mpsc::Sender<String>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        + Send
        + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || actix_web::rt::System::new().block_on(f(tx)));
    rx.recv().unwrap()
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn run(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    calls: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let body = r#"{"model":"o4-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let per = calls / concurrency;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, key) = (http.clone(), url.to_owned(), key.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let mut req = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(k) = &key {
                    req = req.bearer_auth(k);
                }
                let res = req.send().await.unwrap();
                assert_eq!(res.status(), 200);
                let _ = res.bytes().await.unwrap();
                times.push(t.elapsed());
            }
            times
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (all, started.elapsed())
}

fn q(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (db, url, label, key) =
        common::database_with_key(dir.path(), "gateway", Scope::Gateway).await;

    let mock = spawn_server(|tx| {
        Box::pin(async move {
            let server = actix_web::HttpServer::new(|| {
                actix_web::App::new().route(
                    "/v1/chat/completions",
                    actix_web::web::post().to(|body: actix_web::web::Bytes| async move {
                        if !body.windows(13).any(|w| w == b"\"stream\":true") {
                            return actix_web::HttpResponse::Ok()
                                .content_type("application/json")
                                .body(REPLY);
                        }
                        // A stream of CHUNKS events, one every GAP.
                        let events = futures_util::stream::unfold(0usize, |i| async move {
                            if i > CHUNKS {
                                return None;
                            }
                            tokio::time::sleep(GAP).await;
                            let data = if i == CHUNKS {
                                "data: [DONE]\n\n".to_owned()
                            } else {
                                format!("data: {{\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}],\"usage\":null}}\n\n")
                            };
                            Some((Ok::<_, actix_web::Error>(actix_web::web::Bytes::from(data)), i + 1))
                        });
                        actix_web::HttpResponse::Ok()
                            .content_type("text/event-stream")
                            .streaming(events)
                    }),
                )
            })
            .workers(1)
            .bind(("127.0.0.1", 0))
            .unwrap();
            let addr = server.addrs()[0];
            tx.send(format!("http://{addr}/v1")).unwrap();
            server.run().await.unwrap();
        })
    });
    let vars = std::collections::HashMap::from([
        ("DATABASE_URL".to_owned(), url.clone()),
        (
            "JWT_SECRET".to_owned(),
            "gateway-bench-secret-0123456789".to_owned(),
        ),
        (
            "OPENAI_API_KEY".to_owned(),
            "sk-bench-0123456789".to_owned(),
        ),
        ("OPENAI_BASE_URL".to_owned(), mock.clone()),
        (
            "USAGE_WRITE_MODE".to_owned(),
            std::env::var("USAGE_WRITE_MODE").unwrap_or_else(|_| "committed".into()),
        ),
    ]);
    let settings = Settings::from_map(&vars).unwrap();
    let gateway = format!(
        "{}/v1",
        common::serve_with_store(db, settings, dir.path().join("spool.jsonl"))
    );
    let bare = spawn_server({
        let upstream = format!("{mock}/chat/completions");
        move |tx| {
            Box::pin(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(256)
                    .build()
                    .unwrap();
                let server = actix_web::HttpServer::new(move || {
                    let (client, upstream) = (client.clone(), upstream.clone());
                    actix_web::App::new().route(
                        "/v1/chat/completions",
                        actix_web::web::post().to(move |body: actix_web::web::Bytes| {
                            let (client, upstream) = (client.clone(), upstream.clone());
                            async move {
                                let res = client
                                    .post(&upstream)
                                    .header("content-type", "application/json")
                                    .body(body)
                                    .send()
                                    .await
                                    .unwrap();
                                let status = res.status().as_u16();
                                let bytes = res.bytes().await.unwrap();
                                actix_web::HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(status).unwrap(),
                                )
                                .content_type("application/json")
                                .body(bytes)
                            }
                        }),
                    )
                })
                .workers(2)
                .bind(("127.0.0.1", 0))
                .unwrap();
                let addr = server.addrs()[0];
                tx.send(format!("http://{addr}/v1")).unwrap();
                server.run().await.unwrap();
            })
        }
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let calls: usize = env_or("BENCH_CALLS", 4000);
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    // Warm every path (connections, the key's last_used_at).
    run(&http, &format!("{mock}/chat/completions"), None, 200, 4).await;
    run(&http, &format!("{bare}/chat/completions"), None, 200, 4).await;
    run(
        &http,
        &format!("{gateway}/chat/completions"),
        Some(&key),
        200,
        4,
    )
    .await;
    println!(
        "# gateway benchmark: {label}, {calls} calls per line, one process (client, mock, gateway)"
    );
    println!();
    println!(
        "| database | concurrency | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 | gateway calls/s | process RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let us = |d: Duration| format!("{} µs", d.as_micros());
    // Streams: when each event reaches the client, direct and through the gateway.
    let mut added = Vec::new();
    for _ in 0..20 {
        let direct = chunk_times(&http, &format!("{mock}/chat/completions"), None).await;
        let through = chunk_times(&http, &format!("{gateway}/chat/completions"), Some(&key)).await;
        // Each event after the first, measured from the first: what forwarding adds to an
        // event (the first event's delay is the request's own overhead, in the table below).
        for i in 1..CHUNKS.min(direct.len()).min(through.len()) {
            let (d, t) = (direct[i] - direct[0], through[i] - through[0]);
            added.push(t.saturating_sub(d));
        }
    }
    added.sort();
    println!(
        "streamed events ({CHUNKS} per reply, {} ms apart, 20 replies): after the first, each reaches the client later through the gateway than directly by p50 {} µs, p99 {} µs",
        GAP.as_millis(),
        q(&added, 0.5).as_micros(),
        q(&added, 0.99).as_micros()
    );
    println!();
    for c in levels {
        let (direct, _) = run(&http, &format!("{mock}/chat/completions"), None, calls, c).await;
        let (through, elapsed) = run(
            &http,
            &format!("{gateway}/chat/completions"),
            Some(&key),
            calls,
            c,
        )
        .await;
        let (forwarded, bare_elapsed) =
            run(&http, &format!("{bare}/chat/completions"), None, calls, c).await;
        for (name, through, elapsed) in [
            (label, &through, elapsed),
            ("bare forwarder", &forwarded, bare_elapsed),
        ] {
            let added = |p: f64| q(through, p).saturating_sub(q(&direct, p));
            println!(
                "| {name} | {c} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} MB |",
                us(q(&direct, 0.5)),
                us(q(&direct, 0.99)),
                us(q(through, 0.5)),
                us(q(through, 0.99)),
                us(added(0.5)),
                us(added(0.99)),
                through.len() as f64 / elapsed.as_secs_f64(),
                rss_mb()
            );
        }
    }
}
