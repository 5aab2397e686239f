//! Overhead of `call_and_track` over a bare provider call, against a local mock provider that
//! answers at once, with rows written to SQLite and (when `BENCH_DATABASE_URL` names a
//! PostgreSQL server) to PostgreSQL.
//!
//! `cargo bench --bench tracker` (optionally `BENCH_CALLS=20000`,
//! `BENCH_DATABASE_URL=postgres://user@127.0.0.1:5432/postgres`, `BENCH_BACKENDS=sqlite,postgres`,
//! and `BENCH_ROLLUP=off` to
//! measure without the rollup's triggers, `BENCH_ROLLUP=compare` for rounds alternating
//! without and with them, `BENCH_ROLLUP=compare-delta-index` for rounds alternating without
//! and with the delta table's slot index (PostgreSQL), `BENCH_ROUNDS=3`).
//!
//! Added latency per call = the tracked call's time minus the provider's own time in that call
//! (measured by a wrapping provider, so the mock's latency cancels out exactly).
//!
//! `BENCH_FAULT=lock` measures instead what a tracked call adds while another session holds
//! the usage table's strongest lock for 10 s (PostgreSQL `LOCK TABLE … IN ACCESS EXCLUSIVE
//! MODE`, SQLite `BEGIN EXCLUSIVE`): 8 callers, each pausing `BENCH_GAP_MS` (20) between calls,
//! 5 s before the lock, 10 s under it, 10 s after; figures per phase, both write modes.
//! `BENCH_FAULT=retention` does the same around a retention run instead of the lock: first
//! `BENCH_RETENTION_ROWS` (500,000) rows from a year ago, then the run deletes them all while
//! the callers go on.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_tracker::config::DatabaseUrl;
use llm_tracker::tracker::{StoreOptions, Stored, TrackerOptions, WriteMode};
use llm_tracker::{
    CallRequest, ChatRequest, ChatResponse, LlmTracker, Message, Provider, ProviderError, Settings,
};
use sea_orm::ConnectionTrait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

tokio::task_local! {
    static PROVIDER_TIME: Cell<Duration>;
}

/// Times the inner provider for the current task.
struct Timed(Arc<dyn Provider>);

#[async_trait::async_trait]
impl Provider for Timed {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn default_model(&self) -> &str {
        self.0.default_model()
    }
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        let started = Instant::now();
        let result = self.0.chat(request).await;
        let _ = PROVIDER_TIME.try_with(|t| t.set(started.elapsed()));
        result
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// One configuration at concurrency 1 and 64; returns tracked calls/s for each.
async fn run(
    label: &str,
    url: &str,
    base_url: &str,
    calls: usize,
    mode: WriteMode,
    rollup: bool,
) -> Vec<f64> {
    let db = fresh_database(url, rollup).await;
    let label = &if rollup {
        label.to_owned()
    } else {
        format!("{label}, no rollup")
    };
    // The store folds the rollup every second (the default; BENCH_FOLD_MS, 0 = never) only
    // when there is a rollup.
    let fold_ms: u64 = std::env::var("BENCH_FOLD_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let fold = (rollup && fold_ms > 0).then(|| Duration::from_millis(fold_ms));
    let (tracker, _spool) = timed_tracker(base_url, &db, mode, fold).await;
    let request = CallRequest::new(vec![Message::user("hi")]).node_name("bench");

    let mut rates = Vec::new();
    for concurrency in [1usize, 64] {
        // Warm-up: connections, caches.
        for _ in 0..200 {
            let _ = tracker.track(request.clone()).await;
        }
        let per_worker = calls / concurrency;
        let started = Instant::now();
        // Spawn every worker before awaiting any (a lazy iterator would run them one by one).
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let tracker = tracker.clone();
                let request = request.clone();
                tokio::spawn(async move {
                    let mut added = Vec::with_capacity(per_worker);
                    let mut prov = Vec::with_capacity(per_worker);
                    let mut spooled = 0usize;
                    for _ in 0..per_worker {
                        let (elapsed, provider_time, stored) = PROVIDER_TIME
                            .scope(Cell::new(Duration::ZERO), async {
                                let t = Instant::now();
                                let tracked = tracker.track(request.clone()).await;
                                assert!(tracked.result.is_ok());
                                (t.elapsed(), PROVIDER_TIME.with(Cell::get), tracked.stored)
                            })
                            .await;
                        added.push(elapsed.saturating_sub(provider_time));
                        prov.push(provider_time);
                        spooled += usize::from(stored == Some(Stored::Deferred));
                    }
                    (added, prov, spooled)
                })
            })
            .collect();
        let mut added: Vec<Duration> = Vec::new();
        let mut prov: Vec<Duration> = Vec::new();
        let mut spooled = 0;
        for w in workers {
            let (a, p, s) = w.await.unwrap();
            added.extend(a);
            prov.extend(p);
            spooled += s;
        }
        // Rows whose commit missed the deadline went to the spool (and were replayed).
        eprintln!(
            "{label} {mode:?} {concurrency}: {spooled} rows spooled past the commit deadline"
        );
        prov.sort();
        eprintln!(
            "provider time inside tracked calls: p50 {} p99 {}",
            us(quantile(&prov, 0.5)),
            us(quantile(&prov, 0.99))
        );
        let wall = started.elapsed();
        added.sort();
        let rows = added.len();
        let rate = rows as f64 / wall.as_secs_f64();
        rates.push(rate);
        println!(
            "| {label} | {mode:?} | {concurrency} | {rows} | {} | {} | {} | {rate:.0} |",
            us(quantile(&added, 0.5)),
            us(quantile(&added, 0.99)),
            us(quantile(&added, 0.999)),
        );
    }
    tracker.shutdown().await;
    assert_eq!(
        tracker.store().pending().await,
        0,
        "nothing left in the spool"
    );
    rates
}

/// Settings for the local mock provider at `base_url`, without retries.
fn settings(base_url: &str) -> Settings {
    let vars = HashMap::from([
        (
            "OPENAI_API_KEY".to_owned(),
            "sk-bench-0123456789".to_owned(),
        ),
        ("OPENAI_BASE_URL".to_owned(), base_url.to_owned()),
        ("LLM_MAX_RETRIES".to_owned(), "0".to_owned()),
    ]);
    Settings::from_map(&vars).unwrap()
}

/// A tracker over `db` whose provider is timed (see [`Timed`]), spooling into a temp dir that
/// lives as long as the returned guard.
async fn timed_tracker(
    base_url: &str,
    db: &sea_orm::DatabaseConnection,
    mode: WriteMode,
    fold_interval: Option<Duration>,
) -> (Arc<LlmTracker>, tempfile::TempDir) {
    let spool = tempfile::tempdir().unwrap();
    let mut store = StoreOptions::new(spool.path().join("spool.jsonl"));
    store.write_mode = mode;
    store.fold_interval = fold_interval;
    let options = TrackerOptions {
        store,
        secrets: vec![],
        prices: std::sync::Arc::new(llm_tracker::pricing::PriceTable::builtin()),
    };
    let provider: Arc<dyn Provider> = Arc::new(Timed(
        llm_tracker::llm_service(&settings(base_url)).unwrap(),
    ));
    let tracker = Arc::new(LlmTracker::new(provider, db.clone(), options).await);
    (tracker, spool)
}

/// Whether the delta table has its slot index in the next fresh database (on unless
/// `BENCH_ROLLUP=compare-delta-index` alternates it).
static DELTA_INDEX: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The benchmark database, emptied, with the rollup's triggers or without them.
async fn fresh_database(url: &str, rollup: bool) -> sea_orm::DatabaseConnection {
    let db = llm_tracker::db::connect(&DatabaseUrl::parse("DATABASE_URL", url).unwrap())
        .await
        .unwrap();
    llm_tracker::db::migrate(&db).await.unwrap();
    // Without the rollup: the write path before issue 7 (no triggers); with it, the triggers
    // are (re)created as the migrations made them.
    let backend = db.get_database_backend();
    // A clean start: the last run's rows go without the triggers (deleting them with the
    // triggers on would queue a contribution per row), then the triggers come back if wanted.
    for sql in migration::rollup::drop_triggers_sql(backend) {
        db.execute_unprepared(&sql).await.unwrap();
    }
    let mut tables = vec!["llm_tracker_usage", migration::rollup::DELTA_TABLE];
    tables.extend(migration::rollup::Level::ALL.iter().map(|l| l.table()));
    for table in tables {
        db.execute_unprepared(&format!("DELETE FROM {table}"))
            .await
            .unwrap();
        if backend == sea_orm::DbBackend::Postgres {
            db.execute_unprepared(&format!("VACUUM {table}"))
                .await
                .unwrap();
        }
    }
    if backend == sea_orm::DbBackend::Postgres {
        // BENCH_ROLLUP=compare-delta-index: runs with and without migration 000013's index on
        // the delta table, to measure what it costs each tracked call.
        let sql = if DELTA_INDEX.load(std::sync::atomic::Ordering::Relaxed) {
            "CREATE INDEX IF NOT EXISTS llm_tracker_usage_rollup_delta_slot_idx \
             ON llm_tracker_usage_rollup_delta (slot)"
        } else {
            "DROP INDEX IF EXISTS llm_tracker_usage_rollup_delta_slot_idx"
        };
        db.execute_unprepared(sql).await.unwrap();
    }
    if rollup {
        for sql in migration::rollup::create_triggers_sql(backend) {
            db.execute_unprepared(&sql).await.unwrap();
        }
    }
    db
}

/// The strongest lock another session can take on the usage table, held until dropped or
/// released.
enum TableLock {
    Postgres(sea_orm::sqlx::PgConnection),
    Sqlite(sea_orm::sqlx::SqliteConnection),
}

impl TableLock {
    async fn take(url: &str) -> Self {
        use sea_orm::sqlx::Connection;
        if url.starts_with("sqlite") {
            let mut c = sea_orm::sqlx::SqliteConnection::connect(&url.replace("?mode=rwc", ""))
                .await
                .unwrap();
            sea_orm::sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut c)
                .await
                .unwrap();
            Self::Sqlite(c)
        } else {
            let mut c = sea_orm::sqlx::PgConnection::connect(url).await.unwrap();
            sea_orm::sqlx::query("BEGIN").execute(&mut c).await.unwrap();
            sea_orm::sqlx::query("LOCK TABLE llm_tracker_usage IN ACCESS EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .unwrap();
            Self::Postgres(c)
        }
    }

    async fn release(self) {
        match self {
            Self::Postgres(mut c) => drop(sea_orm::sqlx::query("COMMIT").execute(&mut c).await),
            Self::Sqlite(mut c) => drop(sea_orm::sqlx::query("COMMIT").execute(&mut c).await),
        }
    }
}

/// What disturbs the tracked calls in the middle phase of [`fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The usage table's strongest lock, held 10 s (`BENCH_FAULT=lock`).
    Lock,
    /// A retention run deleting this many old rows (`BENCH_FAULT=retention`,
    /// `BENCH_RETENTION_ROWS`).
    Retention(usize),
}

/// Rows from a year ago, before the calls start: what a retention run then deletes.
async fn seed_old_rows(db: &sea_orm::DatabaseConnection, n: usize) {
    use llm_tracker::db::entities::usage;
    let from = chrono::Utc::now() - chrono::Duration::days(400);
    let started = Instant::now();
    let mut i = 0usize;
    while i < n {
        let rows: Vec<usage::Model> = (i..(i + 1000).min(n))
            .map(|k| usage::Model {
                id: uuid::Uuid::new_v4().into(),
                user_id: None,
                model: ["gpt-4o", "gpt-4o-mini", "o4-mini"][k % 3].into(),
                prompt_tokens: 100,
                completion_tokens: 20,
                total_tokens: 120,
                cached_tokens: 0,
                reasoning_tokens: 0,
                success: k % 20 != 0,
                error: None,
                metadata: serde_json::json!({"node_name": "seed"}),
                created_at: from + chrono::Duration::seconds((k as i64 * 30) % (300 * 86_400)),
                started_at: None,
                cost: None,
                cost_currency: "USD".into(),
                is_streaming: false,
                first_chunk_at: None,
            })
            .collect();
        usage::insert_rows(db, &rows).await.unwrap();
        i += rows.len();
    }
    migration::rollup::fold(db).await.unwrap();
    eprintln!(
        "seeded {n} old rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// What a tracked call adds before, during and after a fault: a 10 s table lock, or a
/// retention run.
async fn fault(label: &str, url: &str, base_url: &str, mode: WriteMode, kind: Fault) {
    let db = fresh_database(url, true).await;
    if let Fault::Retention(n) = kind {
        seed_old_rows(&db, n).await;
    }
    let default_fold = StoreOptions::new("").fold_interval;
    let (tracker, _spool) = timed_tracker(base_url, &db, mode, default_fold).await;
    let request = CallRequest::new(vec![Message::user("hi")]).node_name("bench");
    let gap = Duration::from_millis(
        std::env::var("BENCH_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (tracker, request, stop) = (tracker.clone(), request.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (started, added, stored) = PROVIDER_TIME
                        .scope(Cell::new(Duration::ZERO), async {
                            let t = Instant::now();
                            let tracked = tracker.track(request.clone()).await;
                            assert!(tracked.result.is_ok());
                            let provider = PROVIDER_TIME.with(Cell::get);
                            (t, t.elapsed().saturating_sub(provider), tracked.stored)
                        })
                        .await;
                    seen.push((started, added, stored));
                    tokio::time::sleep(gap).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let locked = Instant::now();
    let middle = match kind {
        Fault::Lock => {
            let lock = TableLock::take(url).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            lock.release().await;
            "10 s lock".to_owned()
        }
        Fault::Retention(n) => {
            let report = llm_tracker::retention::run(&db, 30, false, chrono::Utc::now())
                .await
                .unwrap();
            assert_eq!(report.rows as usize, n);
            let took = locked.elapsed().as_secs_f64();
            eprintln!(
                "{label} {mode:?}: retention deleted {} rows in {} batches, {took:.1} s ({:.0} rows/s)",
                report.rows,
                report.batches,
                report.rows as f64 / took
            );
            format!("retention ({took:.0} s)")
        }
    };
    let released = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    let calls = seen.len();
    // Back to normal: the first call after the release from which on every call's row went
    // straight to the database.
    let mut by_start = seen.clone();
    by_start.sort_by_key(|s| s.0);
    let after_release = |s: &(Instant, Duration, Option<Stored>)| s.0 >= released;
    let normal_from = match by_start
        .iter()
        .rposition(|s| after_release(s) && s.2 == Some(Stored::Deferred))
    {
        Some(i) => by_start.get(i + 1),
        None => by_start.iter().find(|s| after_release(s)),
    }
    .map(|s| s.0.saturating_duration_since(released));
    // Each phase as [from, to).
    let secs = Duration::from_secs;
    let phases = [
        ("before", None, Some(locked)),
        (middle.as_str(), Some(locked), Some(released)),
        ("0–5 s after", Some(released), Some(released + secs(5))),
        ("5–10 s after", Some(released + secs(5)), None),
    ];
    for (phase, from, to) in phases {
        let within = |t: Instant| from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e);
        let mut added: Vec<Duration> = seen.iter().filter(|s| within(s.0)).map(|s| s.1).collect();
        let spooled = seen
            .iter()
            .filter(|s| within(s.0) && s.2 == Some(Stored::Deferred))
            .count();
        if added.is_empty() {
            continue;
        }
        if let Some(slowest) = seen.iter().filter(|s| within(s.0)).max_by_key(|s| s.1) {
            eprintln!(
                "{label} {mode:?} {phase}: slowest call added {:?}, stored {:?}",
                slowest.1, slowest.2
            );
        }
        added.sort();
        println!(
            "| {label} | {mode:?} | {phase} | {} | {} | {} | {} | {} | {spooled} |",
            added.len(),
            us(quantile(&added, 0.5)),
            us(quantile(&added, 0.99)),
            us(quantile(&added, 0.999)),
            us(*added.last().unwrap()),
        );
    }
    match (mode, normal_from) {
        (WriteMode::Committed, Some(d)) => eprintln!(
            "{label} {mode:?}: every call stored directly from {:.1} s after the release",
            d.as_secs_f64()
        ),
        (WriteMode::Committed, None) => eprintln!("{label} {mode:?}: not back to direct writes"),
        _ => {}
    }
    tracker.shutdown().await;
    assert_eq!(tracker.store().pending().await, 0, "spool drained");
    let stored = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) FROM llm_tracker_usage".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap();
    // Warm-up calls of none; every call's row once.
    assert_eq!(stored as usize, calls, "every row stored once");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The baseline: provider calls with no tracker.
async fn bare(base_url: &str, calls: usize) {
    let provider = llm_tracker::llm_service(&settings(base_url)).unwrap();
    let request = ChatRequest {
        messages: vec![Message::user("hi")],
        ..Default::default()
    };
    for concurrency in [1usize, 64] {
        let per_worker = calls / concurrency;
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let provider = provider.clone();
                let request = request.clone();
                tokio::spawn(async move {
                    for _ in 0..per_worker {
                        provider.chat(request.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let rate = (per_worker * concurrency) as f64 / started.elapsed().as_secs_f64();
        println!(
            "| none (bare provider call) | – | {concurrency} | {} | – | – | – | {rate:.0} |",
            per_worker * concurrency
        );
    }
}

/// A keep-alive HTTP/1.1 server on loopback answering every request with `body` at once
/// (wiremock's matching and bookkeeping capped throughput at ~2,400 requests/s here).
async fn instant_provider(body: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let response: Arc<[u8]> = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    // One request: headers, then content-length bytes of body.
                    let (head_end, length) = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length);
                        }
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    while buf.len() < head_end + length {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + length);
                    if socket.write_all(&response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let body = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/providers/openai_success.json"
    ))
    .unwrap();
    let base_url = instant_provider(body).await;
    let fault_kind = match std::env::var("BENCH_FAULT").as_deref() {
        Ok("lock") => Some(Fault::Lock),
        Ok("retention") => Some(Fault::Retention(
            std::env::var("BENCH_RETENTION_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500_000),
        )),
        _ => None,
    };
    if let Some(kind) = fault_kind {
        let dir = tempfile::tempdir().unwrap();
        // BENCH_BACKENDS=sqlite,postgres (both, by default; PostgreSQL needs BENCH_DATABASE_URL).
        let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
        let mut databases = Vec::new();
        if backends.contains("sqlite") {
            databases.push((
                "SQLite",
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                ),
            ));
        }
        if backends.contains("postgres")
            && let Ok(url) = std::env::var("BENCH_DATABASE_URL")
        {
            databases.push(("PostgreSQL", url));
        }
        println!(
            "| database | write mode | phase | calls | added p50 | added p99 | added p99.9 | added max | spooled |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (label, url) in &databases {
            for mode in [WriteMode::Committed, WriteMode::Queued] {
                fault(label, url, &base_url, mode, kind).await;
            }
        }
        return;
    }
    println!(
        "| database | write mode | concurrency | calls | added p50 | added p99 | added p99.9 | tracked calls/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    bare(&base_url, calls).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.db").display()
    );
    // BENCH_BACKENDS=sqlite,postgres (both, by default).
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut databases = Vec::new();
    if backends.contains("sqlite") {
        databases.push(("SQLite", sqlite));
    }
    if backends.contains("postgres") {
        match std::env::var("BENCH_DATABASE_URL") {
            Ok(url) => databases.push(("PostgreSQL", url)),
            Err(_) => eprintln!("BENCH_DATABASE_URL not set: PostgreSQL skipped"),
        }
    }
    // BENCH_ROLLUP=off: without the rollup; =compare: BENCH_ROUNDS (3) rounds alternating
    // without and with it, then the medians side by side (this machine's throughput drifts
    // by tens of percent between runs minutes apart, so one run of each says little).
    let setting = std::env::var("BENCH_ROLLUP").unwrap_or_default();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut compared = Vec::new();
    for (label, url) in &databases {
        for mode in [WriteMode::Committed, WriteMode::Queued] {
            match setting.as_str() {
                "compare" | "compare-delta-index" => {
                    let index_only = setting == "compare-delta-index";
                    let (mut without, mut with) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
                    for _ in 0..rounds {
                        for (on, out) in [(false, &mut without), (true, &mut with)] {
                            // compare: without and with the rollup; compare-delta-index: the
                            // rollup both times, without and with the delta's slot index.
                            DELTA_INDEX
                                .store(!index_only || on, std::sync::atomic::Ordering::Relaxed);
                            let rollup = index_only || on;
                            let rates = run(label, url, &base_url, calls, mode, rollup).await;
                            for (i, r) in rates.into_iter().enumerate() {
                                out[i].push(r);
                            }
                        }
                    }
                    for (i, concurrency) in [1, 64].into_iter().enumerate() {
                        let (a, b) = (median(without[i].clone()), median(with[i].clone()));
                        compared.push(format!(
                            "| {label} | {mode:?} | {concurrency} | {a:.0} | {b:.0} | {:+.0} % |",
                            (b / a - 1.0) * 100.0
                        ));
                    }
                }
                "off" => {
                    run(label, url, &base_url, calls, mode, false).await;
                }
                _ => {
                    run(label, url, &base_url, calls, mode, true).await;
                }
            }
        }
    }
    if !compared.is_empty() {
        println!();
        let (a, b) = if setting == "compare-delta-index" {
            ("rollup, no delta index", "rollup with delta index")
        } else {
            ("no rollup", "rollup")
        };
        println!(
            "| database | write mode | concurrency | {a} calls/s (median of {rounds}) | {b} calls/s (median of {rounds}) | change |"
        );
        println!("|---|---|---|---|---|---|");
        for line in compared {
            println!("{line}");
        }
    }
}
