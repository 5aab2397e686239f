//! Issue 15: the tracker never slows the app it observes and never loses a row. A tracked call
//! returns within the provider's time plus a bound whatever the database does (locked by
//! another session, crashed, hung, down at start), and its row is stored exactly once.
//!
//! The bound in the README and `docs/benchmarks.md` is 10 ms (commit deadline) plus one spool
//! write; these tests assert an order of magnitude below the faults they inject (a 10 s lock,
//! a crash) so that a loaded CI machine does not make them flaky; the benchmark measures the
//! real figures.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llm_tracker::db::entities::usage;
use llm_tracker::tracker::{StoreOptions, Stored, TrackerOptions, UsageStore, WriteMode};
use llm_tracker::{LlmTracker, llm_service};
use sea_orm::{DatabaseConnection, EntityTrait};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::db_test;
use crate::helpers::{Backend, Blackhole, PrivatePg, TestDb, fixture, free_port, http_get};
use crate::tracker::{hello, settings};

/// What a caller would never accept: a tracked call that takes this much longer than the
/// provider (the faults injected last 10 s).
pub(crate) const NEVER: Duration = Duration::from_secs(1);

/// A mock OpenAI answering every call with the success fixture after `delay`.
pub(crate) async fn provider(delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    let body: serde_json::Value =
        serde_json::from_str(&fixture("providers/openai_success.json")).unwrap();
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(body)
                .set_delay(delay),
        )
        .mount(&server)
        .await;
    server
}

fn openai_settings(server: &MockServer, database_url: &str) -> llm_tracker::Settings {
    settings(&[
        ("LLM_PROVIDER", "openai".into()),
        ("OPENAI_BASE_URL", format!("{}/v1", server.uri())),
        ("DATABASE_URL", database_url.to_owned()),
    ])
}

/// A tracker with the default store options (10 ms commit deadline), its spool in `dir`.
pub(crate) async fn tracker_at(
    db: &DatabaseConnection,
    server: &MockServer,
    dir: &std::path::Path,
    migrate: bool,
) -> LlmTracker {
    let settings = openai_settings(server, "sqlite::memory:");
    let mut store = StoreOptions::new(dir.join("spool.jsonl"));
    store.migrate = migrate;
    let options = TrackerOptions {
        store,
        secrets: vec![],
        prices: Arc::new(llm_tracker::pricing::PriceTable::builtin()),
    };
    LlmTracker::new(llm_service(&settings).unwrap(), db.clone(), options).await
}

/// One call as a caller saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) started: Instant,
    pub(crate) took: Duration,
    pub(crate) stored: Option<Stored>,
    pub(crate) ok: bool,
    pub(crate) row_id: uuid::Uuid,
}

/// `n` callers calling in a loop until `stop` is set.
pub(crate) fn callers(
    tracker: &Arc<LlmTracker>,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    (0..n)
        .map(|_| {
            let (tracker, stop) = (tracker.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let tracked = tracker.track(hello()).await;
                    seen.push(Seen {
                        started,
                        took: started.elapsed(),
                        stored: tracked.stored,
                        ok: tracked.result.is_ok(),
                        row_id: tracked.row_id.unwrap(),
                    });
                }
                seen
            })
        })
        .collect()
}

pub(crate) async fn joined(handles: Vec<tokio::task::JoinHandle<Vec<Seen>>>) -> Vec<Seen> {
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

async fn row_ids(db: &DatabaseConnection) -> Vec<uuid::Uuid> {
    usage::Entity::find()
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.0)
        .collect()
}

/// Waits (up to 60 s) until the tracker's spool is empty and `want` rows are stored.
pub(crate) async fn drained(
    tracker: &LlmTracker,
    db: &DatabaseConnection,
    want: usize,
) -> Vec<uuid::Uuid> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = row_ids(db).await;
        if (ids.len() >= want && tracker.store().pending().await == 0) || Instant::now() > deadline
        {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every call has exactly one row, and nothing else is there.
pub(crate) fn assert_each_stored_once(seen: &[Seen], ids: &[uuid::Uuid]) {
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no row stored twice");
    let calls: HashSet<_> = seen.iter().map(|s| &s.row_id).collect();
    assert_eq!(calls.len(), seen.len());
    assert_eq!(unique, calls, "every call's row, and only those");
}

pub(crate) fn p99(seen: &[Seen]) -> Duration {
    let mut t: Vec<Duration> = seen.iter().map(|s| s.took).collect();
    t.sort();
    t[(t.len() * 99 / 100).min(t.len() - 1)]
}

/// The strongest lock another session can take on the usage table: PostgreSQL `LOCK TABLE …
/// IN ACCESS EXCLUSIVE MODE`, SQLite `BEGIN EXCLUSIVE` (the write lock of the whole file).
enum TableLock {
    Postgres(sea_orm::sqlx::PgConnection),
    Sqlite(sea_orm::sqlx::SqliteConnection),
}

impl TableLock {
    /// Returns once the lock is held.
    async fn take(t: &TestDb) -> Self {
        use sea_orm::sqlx::Connection;
        match t.backend {
            Backend::Postgres => {
                let mut conn = sea_orm::sqlx::PgConnection::connect(t.url.expose())
                    .await
                    .unwrap();
                sea_orm::sqlx::query("BEGIN")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sea_orm::sqlx::query("LOCK TABLE llm_tracker_usage IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Self::Postgres(conn)
            }
            Backend::Sqlite => Self::Sqlite(crate::helpers::sqlite_write_lock(t).await),
        }
    }

    async fn release(self) {
        match self {
            Self::Postgres(mut c) => {
                sea_orm::sqlx::query("COMMIT")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Self::Sqlite(mut c) => {
                sea_orm::sqlx::query("COMMIT")
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }
}

/// Spool files of `spool`: the spool itself and the claims being replayed (not the lock file
/// nor the rejected lines).
pub(crate) fn spool_files(spool: &std::path::Path) -> Vec<std::path::PathBuf> {
    let name = spool.file_name().unwrap().to_string_lossy().into_owned();
    let mut files: Vec<_> = std::fs::read_dir(spool.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n == name || n.starts_with(&format!("{name}.replay-"))
        })
        .collect();
    files.sort();
    files
}

/// Every line of every spool file of `spool`.
pub(crate) fn spooled_lines(spool: &std::path::Path) -> Vec<String> {
    spool_files(spool)
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Runs blocking work (a child process, `pg_ctl`) off the test's single-threaded runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

db_test!(
    async fn a_table_lock_held_by_another_session_holds_no_call_and_loses_no_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = provider(Duration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let tracker = Arc::new(tracker_at(&t.db, &server, dir.path(), false).await);
        let stop = Arc::new(AtomicBool::new(false));
        let run = callers(&tracker, 8, &stop);

        tokio::time::sleep(Duration::from_secs(1)).await;
        let lock = TableLock::take(&t).await;
        let locked_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let released = Instant::now();
        lock.release().await;
        tokio::time::sleep(Duration::from_secs(7)).await;
        stop.store(true, Ordering::SeqCst);
        let seen = joined(run).await;

        assert!(seen.iter().all(|s| s.ok), "every caller got its reply");
        if std::env::var_os("RESILIENCE_DEBUG").is_some() {
            let t0 = seen.iter().map(|s| s.started).min().unwrap();
            for s in &seen {
                eprintln!(
                    "{:>8.1} {:>8.1} {:?}",
                    (s.started - t0).as_secs_f64() * 1e3,
                    s.took.as_secs_f64() * 1e3,
                    s.stored
                );
            }
            eprintln!("lock {:?} .. {:?}", locked_at - t0, released - t0);
        }
        // Calls whose provider answered while the lock was held (20 ms each; those started
        // just before the release may be committed after it).
        let during: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.started >= locked_at && s.started + Duration::from_millis(100) < released)
            .collect();
        assert!(
            during.len() > 100,
            "calls went on during the lock: {}",
            during.len()
        );
        assert!(
            during.iter().all(|s| s.stored == Some(Stored::Deferred)),
            "rows of calls during the lock go to the spool"
        );
        let slowest = seen.iter().map(|s| s.took).max().unwrap();
        assert!(
            slowest < NEVER,
            "a call waited for the lock: {slowest:?} (p99 {:?})",
            p99(&seen)
        );
        // Back to normal within 5 s of the lock's end: the database takes the rows directly.
        let after: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.started >= released + Duration::from_secs(5))
            .collect();
        assert!(!after.is_empty());
        let direct = after
            .iter()
            .filter(|s| s.stored == Some(Stored::Inserted))
            .count();
        // (A commit now and then still takes longer than the 10 ms deadline on a loaded
        // machine, and its row goes to the spool: that is the deadline working.)
        assert!(
            direct * 2 >= after.len(),
            "{direct} of {} calls stored directly 5 s after the lock",
            after.len()
        );

        let ids = drained(&tracker, &t.db, seen.len()).await;
        assert_each_stored_once(&seen, &ids);
        tracker.shutdown().await;
        crate::rollup::assert_verified(&t.db).await;
    }
);

/// PostgreSQL crashes (`pg_ctl stop -m immediate`) under 8 callers and comes back.
mod a_server_crash_mid_run_loses_no_row_and_duplicates_none {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let pg = Arc::new(blocking(PrivatePg::start).await);
        let url = llm_tracker::config::DatabaseUrl::parse("DATABASE_URL", &pg.url()).unwrap();
        let db = llm_tracker::db::connect(&url).await.unwrap();
        llm_tracker::db::migrate(&db).await.unwrap();
        let server = provider(Duration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let tracker = Arc::new(tracker_at(&db, &server, dir.path(), false).await);
        let stop = Arc::new(AtomicBool::new(false));
        let run = callers(&tracker, 8, &stop);

        tokio::time::sleep(Duration::from_secs(1)).await;
        let crashed = Instant::now();
        let p = pg.clone();
        blocking(move || p.stop_immediate()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let p = pg.clone();
        blocking(move || p.start_again()).await;
        let back = Instant::now();
        tokio::time::sleep(Duration::from_secs(6)).await;
        stop.store(true, Ordering::SeqCst);
        let seen = joined(run).await;

        assert!(seen.iter().all(|s| s.ok));
        assert!(
            seen.iter().any(|s| s.started > crashed
                && s.started < back
                && s.stored == Some(Stored::Deferred)),
            "calls went on while the server was down"
        );
        let slowest = seen.iter().map(|s| s.took).max().unwrap();
        assert!(
            slowest < NEVER,
            "slowest call {slowest:?}, p99 {:?}",
            p99(&seen)
        );
        let ids = drained(&tracker, &db, seen.len()).await;
        assert_each_stored_once(&seen, &ids);
        assert_eq!(tracker.store().pending().await, 0, "spool drained");
        tracker.shutdown().await;
    }
}

/// A tracker (and so `from_env`) starts while PostgreSQL is down, makes its calls, and stores
/// their rows, migrating a database it never saw, once the server is up.
mod a_tracker_starts_with_the_database_down_and_stores_its_rows_later {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let pg = Arc::new(blocking(PrivatePg::start).await);
        let p = pg.clone();
        blocking(move || p.stop_immediate()).await;
        let server = provider(Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let mut settings = openai_settings(&server, &pg.url());
        settings.usage_spool_path = dir.path().join("spool.jsonl");
        let started = Instant::now();
        let tracker = LlmTracker::from_settings(&settings).await.expect("starts");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "start took {:?}",
            started.elapsed()
        );
        let tracked = tracker.track(hello()).await;
        assert!(tracked.result.is_ok(), "the call is made");
        assert_eq!(tracked.stored, Some(Stored::Deferred), "its row is spooled");
        assert_eq!(tracker.store().pending().await, 1);

        let p = pg.clone();
        blocking(move || p.start_again()).await;
        let url = llm_tracker::config::DatabaseUrl::parse("DATABASE_URL", &pg.url()).unwrap();
        let db = llm_tracker::db::connect(&url).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ids = loop {
            // Before the tracker migrates there is no table to read.
            let ids = match usage::Entity::find().all(&db).await {
                Ok(rows) => rows.into_iter().map(|r| r.id).collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            };
            if !ids.is_empty() || Instant::now() > deadline {
                break ids;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            ids,
            vec![tracked.row_id.unwrap()],
            "stored once the database answers"
        );
        // Once it answers, calls go straight to it again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tracker.store().is_healthy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // (A commit slower than the 10 ms deadline is spooled by design, and the first ones
        // after the restart can be, on a loaded machine: so the first of a few.)
        let mut stored = Vec::new();
        for _ in 0..20 {
            let s = tracker.track(hello()).await.stored;
            stored.push(s);
            if s == Some(Stored::Inserted) {
                break;
            }
        }
        assert_eq!(stored.last(), Some(&Some(Stored::Inserted)), "{stored:?}");
        tracker.shutdown().await;
        assert_eq!(tracker.store().pending().await, 0);
    }
}

/// `llm-tracker serve` starts while PostgreSQL is down: `/healthz` 200, `/readyz` and the admin
/// routes 503 in the JSON error shape; it migrates when the server comes up, then serves.
mod serve_starts_with_the_database_down_and_migrates_when_it_answers {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let pg = PrivatePg::start();
        pg.stop_immediate();
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-tracker"))
            .arg("serve")
            .current_dir(dir.path())
            .env_clear()
            .env("DATABASE_URL", pg.url())
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("JWT_SECRET", "serve-down-test-key-0123456789")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait_for = |path: &str, status: u16| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match http_get(port, path) {
                    Ok((s, body)) if s == status => return body,
                    _ if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    other => panic!("{path}: wanted {status}, got {other:?}"),
                }
            }
        };
        wait_for("/healthz", 200);
        let body = wait_for("/readyz", 503);
        assert!(body.contains("service_unavailable"), "{body}");
        for path in [
            "/api/v1/admin/token-stats/",
            "/api/v1/admin/llm-usage/",
            "/admin/",
        ] {
            let started = Instant::now();
            let (status, body) = http_get(port, path).unwrap();
            assert_eq!(status, 503, "{path}");
            let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
            assert_eq!(doc["code"], "service_unavailable", "{path}: {body}");
            assert!(started.elapsed() < NEVER, "{path} answered at once");
        }

        pg.start_again();
        wait_for("/readyz", 200);
        // Migrated: the admin API now asks for a token instead of answering 503.
        assert_eq!(http_get(port, "/api/v1/admin/token-stats/").unwrap().0, 401);
        child.kill().ok();
        child.wait().ok();
    }
}

/// Which outage the killed child meets: a hung PostgreSQL (accepts, never answers) or a
/// SQLite file whose write lock another connection holds.
#[allow(dead_code)] // held for what dropping it does
enum ChildOutage {
    Hung(Blackhole),
    Locked(sea_orm::sqlx::SqliteConnection),
}

db_test!(
    async fn a_call_killed_right_after_its_provider_answered_in_an_outage_keeps_its_row(
        backend: Backend,
    ) {
        let t = TestDb::migrated(backend).await;
        let server = provider(Duration::ZERO).await;
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_dir.path().join("spool.jsonl");
        let (outage, outage_url) = match backend {
            Backend::Postgres => {
                let hole = Blackhole::start();
                let url = format!("postgres://postgres@127.0.0.1:{}/postgres", hole.port);
                (ChildOutage::Hung(hole), url)
            }
            Backend::Sqlite => (
                ChildOutage::Locked(crate::helpers::sqlite_write_lock(&t).await),
                t.url.expose().to_owned(),
            ),
        };
        let base = format!("{}/v1", server.uri());
        let run = |database_url: &str| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_llm-tracker"));
            c.args(["call", "hello"])
                .current_dir(spool_dir.path())
                .env_clear()
                .env("DATABASE_URL", database_url)
                .env("OPENAI_API_KEY", "sk-test-kill-0123456789")
                .env("OPENAI_BASE_URL", &base)
                .env("USAGE_SPOOL_PATH", &spool)
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            c
        };
        let mut child = run(&outage_url).spawn().unwrap();
        // Wait for the provider to be asked (it answers at once), then give the row the
        // durability bound with room for a loaded machine, and kill the process outright.
        let deadline = Instant::now() + Duration::from_secs(30);
        while server
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the child never called the provider"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child must still be running (it tries the database at shutdown) for the kill to mean something"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // In the spool, or in the claim a replay took of it (that replay waits on the outage).
        let spooled = spooled_lines(&spool);
        assert_eq!(spooled.len(), 1, "the row is in the spool: {spooled:?}");
        drop(outage);

        // The next process over the working database stores it (and its own row).
        let out = run(t.url.expose()).output().unwrap();
        assert!(out.status.success());
        let ids = row_ids(&t.db).await;
        assert_eq!(ids.len(), 2, "the killed call's row and the new one");
        let killed: usage::Model = serde_json::from_str(&spooled[0]).unwrap();
        assert!(ids.contains(&killed.id));
        assert!(spool_files(&spool).is_empty(), "spool drained");
    }
);

db_test!(
    async fn the_write_mode_setting_reaches_the_store(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = provider(Duration::ZERO).await;
        for (mode, want, stored) in [
            ("committed", WriteMode::Committed, Stored::Inserted),
            ("queued", WriteMode::Queued, Stored::Queued),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = settings(&[
                ("LLM_PROVIDER", "openai".into()),
                ("OPENAI_BASE_URL", format!("{}/v1", server.uri())),
                ("DATABASE_URL", t.url.expose().to_owned()),
                ("USAGE_WRITE_MODE", mode.into()),
                // Generous for a debug build on a busy machine: this test is about the mode.
                ("USAGE_COMMIT_DEADLINE_MS", "2000".into()),
            ]);
            s.usage_spool_path = dir.path().join("spool.jsonl");
            // What `serve`, `call` and `from_env` build their stores from.
            assert_eq!(llm_tracker::tracker::store_options(&s).write_mode, want);
            assert_eq!(
                llm_tracker::tracker::store_options(&s).commit_deadline,
                Duration::from_secs(2)
            );
            assert_eq!(
                llm_tracker::tracker::options_from_settings(&s)
                    .store
                    .write_mode,
                want
            );
            let tracker = LlmTracker::from_settings(&s).await.unwrap();
            let tracked = tracker.track(hello()).await;
            assert_eq!(tracked.stored, Some(stored), "USAGE_WRITE_MODE={mode}");
            tracker.shutdown().await;
            assert!(row_ids(&t.db).await.contains(&tracked.row_id.unwrap()));
        }
    }
);

db_test!(
    async fn torn_spool_lines_go_to_the_rejected_file_named_after_the_spool(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("x.usage-spool.jsonl");
        let row = crate::usage_read::row(
            7,
            None,
            "gpt-4o-mini",
            (10, 5, 0, 0),
            true,
            crate::usage_read::at("2026-11-01T10:00:00Z"),
        );
        let good = serde_json::to_string(&row).unwrap();
        // A crash cut the last append short.
        std::fs::write(&spool, format!("{good}\n{{\"id\": \"a2f")).unwrap();
        let store = UsageStore::open(t.db.clone(), StoreOptions::new(&spool)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while row_ids(&t.db).await.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.shutdown().await;
        assert_eq!(row_ids(&t.db).await, vec![row.id.0]);
        let rejected = dir.path().join("x.usage-spool.jsonl.rejected");
        assert_eq!(
            std::fs::read_to_string(&rejected).unwrap(),
            "{\"id\": \"a2f\n",
            "README: `<spool>.rejected`"
        );
        assert!(!spool.exists());
    }
);

/// Eight `llm-tracker call` processes at a time, each with its own fold and replay over one
/// PostgreSQL database and one spool file, while another session locks the usage table: every
/// row stored once, the spool drained, `rollup verify` clean.
mod many_processes_share_one_database_and_one_spool {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        let server = provider(Duration::from_millis(5)).await;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.jsonl");
        let base = format!("{}/v1", server.uri());
        let url = t.url.expose().to_owned();
        let processes = 8;
        let rounds = 6;
        let run_chain = |chain: usize| {
            let (base, url, spool) = (base.clone(), url.clone(), spool.clone());
            let cwd = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut ok = 0;
                for round in 0..rounds {
                    let out = Command::new(env!("CARGO_BIN_EXE_llm-tracker"))
                        .args(["call", &format!("chain {chain} round {round}")])
                        .current_dir(&cwd)
                        .env_clear()
                        .env("DATABASE_URL", &url)
                        .env("OPENAI_API_KEY", "sk-test-many-0123456789")
                        .env("OPENAI_BASE_URL", &base)
                        .env("USAGE_SPOOL_PATH", &spool)
                        .env("RUST_LOG", "error")
                        .output()
                        .unwrap();
                    if out.status.success() {
                        ok += 1;
                    }
                }
                ok
            })
        };
        let chains: Vec<_> = (0..processes).map(run_chain).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lock = TableLock::take(&t).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        lock.release().await;
        let mut calls = 0;
        for c in chains {
            calls += blocking(move || c.join().unwrap()).await;
        }
        assert_eq!(calls, processes * rounds, "every call succeeded");
        // Whatever the last processes left in the shared spool, the next start stores.
        let store = UsageStore::open(t.db.clone(), StoreOptions::new(&spool)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while (row_ids(&t.db).await.len() < calls || store.pending().await > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        store.shutdown().await;
        let ids = row_ids(&t.db).await;
        assert_eq!(ids.len(), calls, "each call stored once");
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), calls);
        let leftovers = spool_files(&spool);
        assert!(leftovers.is_empty(), "spool files left: {leftovers:?}");
        crate::rollup::assert_verified(&t.db).await;
    }
}

/// The fold never vacuums: with another session holding the lock every VACUUM needs (SHARE
/// UPDATE EXCLUSIVE, which inserts and the fold's DELETE do not conflict with), folds still
/// finish at once. Autovacuum looks after the delta table and never truncates it (000008).
mod the_fold_never_vacuums_and_autovacuum_never_truncates_the_delta {
    use super::*;
    use sea_orm::{ConnectionTrait, Statement};

    #[actix_web::test]
    async fn postgres() {
        use sea_orm::sqlx::Connection;
        let t = TestDb::migrated(Backend::Postgres).await;
        let options = t
            .scalar_string(
                "SELECT array_to_string(reloptions, ',') FROM pg_class \
                 WHERE relname = 'llm_tracker_usage_rollup_delta'",
            )
            .await;
        for want in [
            "vacuum_truncate=false",
            "autovacuum_vacuum_threshold=1000",
            "autovacuum_vacuum_scale_factor=0",
        ] {
            assert!(options.contains(want), "{want} not in {options}");
        }
        let mut other = sea_orm::sqlx::PgConnection::connect(t.url.expose())
            .await
            .unwrap();
        sea_orm::sqlx::query("BEGIN")
            .execute(&mut other)
            .await
            .unwrap();
        sea_orm::sqlx::query(
            "LOCK TABLE llm_tracker_usage_rollup_delta IN SHARE UPDATE EXCLUSIVE MODE",
        )
        .execute(&mut other)
        .await
        .unwrap();
        for round in 0..3u128 {
            let rows: Vec<usage::Model> = (0..50)
                .map(|i| {
                    crate::usage_read::row(
                        round * 100 + i,
                        None,
                        "gpt-4o-mini",
                        (10, 5, 0, 0),
                        true,
                        crate::usage_read::at("2026-11-01T10:00:00Z"),
                    )
                })
                .collect();
            crate::usage_read::insert(&t.db, &rows).await;
            let fold = llm_tracker::usage::rollup::fold(&t.db);
            let folded = tokio::time::timeout(Duration::from_secs(5), fold)
                .await
                .expect("a fold waited for the VACUUM lock")
                .unwrap();
            assert!(folded);
        }
        sea_orm::sqlx::query("COMMIT")
            .execute(&mut other)
            .await
            .unwrap();
        let pending =
            t.db.query_one_raw(Statement::from_string(
                t.db_backend(),
                "SELECT COUNT(*) FROM llm_tracker_usage_rollup_delta",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap();
        assert_eq!(pending, 0);
        crate::rollup::assert_verified(&t.db).await;
    }
}

db_test!(
    async fn an_exhausted_pool_holds_no_call_and_loses_no_row(backend: Backend) {
        use sea_orm::TransactionTrait;
        let t = TestDb::migrated(backend).await;
        let server = provider(Duration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let tracker = Arc::new(tracker_at(&t.db, &server, dir.path(), false).await);
        let stop = Arc::new(AtomicBool::new(false));
        let run = callers(&tracker, 8, &stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Every connection of the pool the tracker writes through, held by someone else (the
        // pool's size: 4 on SQLite, 16 on PostgreSQL).
        let size = match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 16,
        };
        let mut held = Vec::new();
        while held.len() < size {
            match tokio::time::timeout(Duration::from_secs(10), t.db.begin()).await {
                Ok(Ok(txn)) => held.push(txn),
                other => panic!("could not take connection {}: {other:?}", held.len()),
            }
        }
        let exhausted = Instant::now();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let freed = Instant::now();
        drop(held);
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::SeqCst);
        let seen = joined(run).await;
        assert!(seen.iter().all(|s| s.ok));
        let during: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.started > exhausted && s.started + Duration::from_millis(100) < freed)
            .collect();
        assert!(!during.is_empty());
        assert!(during.iter().all(|s| s.stored == Some(Stored::Deferred)));
        let slowest = seen.iter().map(|s| s.took).max().unwrap();
        assert!(
            slowest < NEVER,
            "slowest call {slowest:?}, p99 {:?}",
            p99(&seen)
        );
        let ids = drained(&tracker, &t.db, seen.len()).await;
        assert_each_stored_once(&seen, &ids);
        tracker.shutdown().await;
    }
);

/// A database that answers, slowly: 150 ms on every packet each way.
mod a_slow_database_holds_no_call_and_loses_no_row {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        let (proxy, db) = crate::helpers::ToggleProxy::in_front_of(&t).await;
        let server = provider(Duration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let tracker = Arc::new(tracker_at(&db, &server, dir.path(), false).await);
        let stop = Arc::new(AtomicBool::new(false));
        let run = callers(&tracker, 8, &stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.set_delay(Duration::from_millis(150));
        tokio::time::sleep(Duration::from_secs(5)).await;
        proxy.set_delay(Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        let seen = joined(run).await;
        assert!(seen.iter().all(|s| s.ok));
        let slowest = seen.iter().map(|s| s.took).max().unwrap();
        assert!(
            slowest < NEVER,
            "slowest call {slowest:?}, p99 {:?}",
            p99(&seen)
        );
        assert!(
            seen.iter().any(|s| s.stored == Some(Stored::Deferred)),
            "slow commits went to the spool"
        );
        let ids = drained(&tracker, &t.db, seen.len()).await;
        assert_each_stored_once(&seen, &ids);
        tracker.shutdown().await;
    }
}
