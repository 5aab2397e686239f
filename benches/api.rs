//! The admin API at scale: loads N demo rows (default 1,000,000) into SQLite and, when
//! `BENCH_DATABASE_URL` names a PostgreSQL server, into PostgreSQL; serves the real application
//! (`llm_tracker::http::app`) on a loopback port; then measures p50/p99 latency and requests/s
//! at concurrency 1 and 16 for token-stats and llm-usage, and prints the query plans (`EXPLAIN`)
//! of the statements behind them, checking that those an index can serve use one.
//!
//! ```sh
//! BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:55432/postgres cargo bench --bench api
//! ```
//!
//! Environment: `BENCH_ROWS` (default 1000000), `BENCH_SECONDS` per scenario and concurrency
//! (default 5), `BENCH_MAX_REQUESTS` (default 2000), `BENCH_BACKENDS` (default
//! `sqlite,postgres`), `BENCH_ONLY` (lines whose name contains one of these, comma-separated),
//! `BENCH_CONCURRENCY` (the client counts, default `1,16`). On PostgreSQL a reused database
//! that `migrate` changed is vacuumed first, as autovacuum would have done on a live one.
//! SQLite data is kept in `target/bench-api/` and PostgreSQL data in the database
//! `llm_tracker_bench_api` (created on the server), so a second run with the same `BENCH_ROWS`
//! skips the load.
//!
//! `BENCH_USERS=10000` (PostgreSQL only) loads another shape instead of the demo's 12 users:
//! that many users with Zipf-distributed calls (user k makes ~1/k of the top user's), 10%
//! without a user, 20 models (also Zipf), one year, ~3% failures, generated in SQL, into the
//! database `llm_tracker_bench_api_u<N>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use llm_tracker::config::DatabaseUrl;
use llm_tracker::db::entities::usage;
use llm_tracker::http::{AppState, app};
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::list::Cursor;
use llm_tracker::usage::plans::{
    by_user_bound_statements, explain, list_usage_statements, token_stats_settings,
    token_stats_statements,
};
use llm_tracker::usage::stats::Granularity;
use llm_tracker::users::{NewUser, create_user, find_by_username};
use llm_tracker::{Settings, auth};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, TransactionTrait,
};
use tokio::sync::Mutex;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-bench-secret-0123456789";

struct Config {
    rows: usize,
    users: Option<usize>,
    seconds: f64,
    max_requests: usize,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Connects, migrates and makes sure the table holds exactly `rows` demo rows.
/// What the PostgreSQL bench database gets after a load or a migration.
const VACUUM: &str = "VACUUM ANALYZE llm_tracker_usage, llm_tracker_usage_rollup, \
     llm_tracker_usage_rollup_total, llm_tracker_usage_latency, llm_tracker_usage_latency_user";

async fn prepare(label: &str, url: &str, rows: usize, users: Option<usize>) -> DatabaseConnection {
    let db = llm_tracker::db::connect(&DatabaseUrl::parse("DATABASE_URL", url).unwrap())
        .await
        .unwrap();
    use migration::MigratorTrait;
    let pending = migration::Migrator::get_pending_migrations(&db)
        .await
        .unwrap()
        .len();
    llm_tracker::db::migrate(&db).await.unwrap();
    let have = usage::Entity::find().count(&db).await.unwrap() as usize;
    if have != rows {
        eprintln!("[{label}] loading {rows} rows (table had {have})");
        let backend = db.get_database_backend();
        // A bulk load: the demo rows are spread at random over 90 days, so each 500-row batch
        // touches ~3,000 rollup cells of its own (live traffic touches a handful), and the
        // triggers would make the load the slowest part of the benchmark (PostgreSQL: from
        // 9,000 rows/s falling to ~2,500/s as the rollup outgrows the cache). The rows are
        // loaded without the triggers and the rollup is rebuilt once (the code of
        // `llm-tracker rollup rebuild`); the triggers' cost on live writes is measured by
        // `cargo bench --bench tracker`.
        for sql in migration::rollup::drop_triggers_sql(backend) {
            db.execute_unprepared(&sql).await.unwrap();
        }
        db.execute_unprepared("DELETE FROM llm_tracker_usage")
            .await
            .unwrap();
        let started = Instant::now();
        match users {
            None => {
                let written = llm_tracker::demo::seed(
                    &db,
                    &llm_tracker::pricing::PriceTable::builtin(),
                    rows,
                    42,
                )
                .await
                .unwrap();
                assert_eq!(written, rows);
            }
            Some(users) => load_zipf(&db, rows, users).await,
        }
        eprintln!(
            "[{label}] rows loaded in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let rebuilding = Instant::now();
        let cells = llm_tracker::usage::rollup::rebuild(&db).await.unwrap();
        for sql in migration::rollup::create_triggers_sql(backend) {
            db.execute_unprepared(&sql).await.unwrap();
        }
        eprintln!(
            "[{label}] rollup rebuilt: {cells} cells in {:.1} s",
            rebuilding.elapsed().as_secs_f64()
        );
        eprintln!(
            "[{label}] loaded in {:.1} s ({:.0} rows/s)",
            started.elapsed().as_secs_f64(),
            rows as f64 / started.elapsed().as_secs_f64()
        );
        let analyze = match db.get_database_backend() {
            DbBackend::Postgres => VACUUM,
            _ => "ANALYZE",
        };
        db.execute_unprepared(analyze).await.unwrap();
    } else {
        eprintln!("[{label}] reusing {rows} rows");
        // Migrations that rewrote cells leave pages that are not all-visible: index-only scans
        // then visit the heap for every cell, until autovacuum comes (it would, on a live
        // database); the benchmark measures that steady state at once.
        if pending > 0 && db.get_database_backend() == DbBackend::Postgres {
            eprintln!("[{label}] {pending} migrations applied: VACUUM ANALYZE");
            db.execute_unprepared(VACUUM).await.unwrap();
        }
    }
    db
}

/// The `BENCH_USERS` shape (PostgreSQL): `users` users named `zipf-<k>`, user k making about
/// 1/k of the calls of user 1, 10% of calls without a user, 20 models (Zipf too), spread
/// uniformly over the last 365 days, ~3% failures; loaded in statements of 1M rows, in time
/// order as a tracker writes them (the heap's order decides what reading a range of rows costs:
/// a load in random order made every raw read of an hour or a day a random heap visit per row).
async fn load_zipf(db: &DatabaseConnection, rows: usize, users: usize) {
    db.execute_unprepared("DELETE FROM auth_user WHERE username LIKE 'zipf-%'")
        .await
        .unwrap();
    db.execute_unprepared(&format!(
        "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
         is_staff, is_active, date_joined) SELECT '!', false, 'zipf-' || g, '', '', '', false, true, now() \
         FROM generate_series(1, {users}) g"
    ))
    .await
    .unwrap();
    let first: i64 = db
        .query_one_raw(sea_orm::Statement::from_string(
            DbBackend::Postgres,
            "SELECT MIN(id)::bigint FROM auth_user WHERE username LIKE 'zipf-%'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    let models = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o3",
        "o4-mini",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.0-flash",
        "azure/gpt-4o",
        "azure/gpt-4o-mini",
        "azure/o3-mini",
        "claude-sonnet-4",
        "claude-haiku-4",
        "mistral-large",
    ];
    let array: Vec<String> = models.iter().map(|m| format!("'{m}'")).collect();
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(1_000_000);
        db.execute_unprepared(&format!(
            "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, total_tokens, \
             cached_tokens, reasoning_tokens, success, error, metadata, created_at, user_id, started_at, cost, cost_currency) \
             SELECT gen_random_uuid(), (ARRAY[{models}])[least(20, floor(exp(mm * ln(21)))::int)], p, c, p + c, \
               (p * 0.3)::int, (c * 0.1)::int, ok, \
               CASE WHEN ok THEN NULL ELSE 'upstream error 503: the model is overloaded' END, \
               jsonb_build_object('node_name', 'node-' || (g % 7), 'source_type', \
                 CASE WHEN g % 10 < 7 THEN 'task' ELSE 'request' END, 'provider', 'openai', 'attempts', 1), \
               ts, CASE WHEN u < 0.1 THEN NULL ELSE {first} - 1 + least({users}, floor(exp(k * ln({users})))::int) END, \
               ts - interval '1 second' * (0.3 + c / 100.0), round(((p * 2.5 + c * 10) / 1000000.0)::numeric, 6), 'USD' \
             FROM (SELECT g, random() AS u, random() AS k, random() AS mm, \
                     now() - interval '365 days' + interval '365 days' * (({done} + g - random()) / {rows}::float8) AS ts, \
                     (200 + random() * 2000)::int AS p, (50 + random() * 800)::int AS c, random() > 0.03 AS ok \
                   FROM generate_series(1, {n}) g) r ORDER BY ts",
            models = array.join(", "),
        ))
        .await
        .unwrap();
        done += n;
        eprintln!("  {done} rows");
    }
}

/// The user with the most rows and the one at rank `rank` (by the rollup's year cells), with
/// their row counts.
async fn users_by_rank(db: &DatabaseConnection, rank: u64) -> [(i32, i64); 2] {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT user_key, CAST(SUM(calls) AS BIGINT) AS calls FROM llm_tracker_usage_rollup_total \
                 WHERE grain = {} AND user_key < {} GROUP BY user_key ORDER BY 2 DESC, 1",
                migration::rollup::Calendar::Year.code(),
                migration::rollup::ALL_USERS
            ),
        ))
        .await
        .unwrap();
    let at = |i: usize| {
        let r = &rows[i.min(rows.len() - 1)];
        (
            r.try_get_by_index::<i64>(0).unwrap() as i32,
            r.try_get_by_index::<i64>(1).unwrap(),
        )
    };
    [at(0), at(rank as usize - 1)]
}

/// A staff user and a token for it.
/// A session cookie of the admin pages for `bench-admin` (as a sign-in makes it), recorded.
async fn admin_cookie(db: &DatabaseConnection) -> String {
    use llm_tracker::http::pages::session::{SESSION_COOKIE, Session, Signer, records};
    let user = find_by_username(db, "bench-admin").await.unwrap().unwrap();
    let signer = Signer::new(SECRET);
    let now = Utc::now().timestamp();
    let session = Session {
        user_id: user.id,
        expires: now + 7200,
        csrf: signer.new_csrf(),
        password_tag: signer.password_tag(&user.password),
    };
    records::open(
        db,
        &signer.record_key(&session),
        user.id,
        session.expires,
        now,
    )
    .await
    .unwrap();
    format!("{SESSION_COOKIE}={}", signer.encode(&session))
}

async fn admin_token(db: &DatabaseConnection) -> String {
    let user = match find_by_username(db, "bench-admin").await.unwrap() {
        Some(u) => u,
        None => create_user(
            db,
            NewUser {
                username: "bench-admin".into(),
                is_staff: true,
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    };
    auth::jwt::mint_access_token(SECRET, user.id, Duration::from_secs(7200))
}

/// The cursor of the row at depth min(1,000,000, rows / 2) of the listing, and that depth.
async fn deep_cursor(db: &DatabaseConnection, rows: usize) -> (u64, String) {
    use sea_orm::{QueryOrder, QuerySelect};
    let depth = (rows as u64 / 2).min(1_000_000);
    let (created_at, id) = usage::Entity::find()
        .select_only()
        .column(usage::Column::CreatedAt)
        .column(usage::Column::Id)
        .order_by_desc(usage::Column::CreatedAt)
        .order_by_desc(usage::Column::Id)
        .offset(depth - 1)
        .limit(1)
        .into_tuple::<(chrono::DateTime<Utc>, usage::RowId)>()
        .one(db)
        .await
        .unwrap()
        .unwrap();
    (
        depth,
        Cursor {
            created_at,
            id: id.0,
        }
        .encode(),
    )
}

/// Serves the application on a loopback port in its own actix system; returns the base URL.
fn serve(db: DatabaseConnection, url: &str) -> (String, actix_web::dev::ServerHandle) {
    let vars = std::collections::HashMap::from([
        ("DATABASE_URL".to_owned(), url.to_owned()),
        ("JWT_SECRET".to_owned(), SECRET.to_owned()),
    ]);
    let settings = Settings::from_map(&vars).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = AppState::new(db, settings);
            let server = actix_web::HttpServer::new(move || app(state.clone()))
                .workers(2)
                .bind(("127.0.0.1", 0))
                .unwrap();
            let addr = server.addrs()[0];
            let server = server.run();
            tx.send((format!("http://{addr}"), server.handle()))
                .unwrap();
            server.await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Outcome {
    requests: usize,
    errors: usize,
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `concurrency` clients in a closed loop until the time or request budget is spent.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    concurrency: usize,
    cfg: &Config,
) -> Outcome {
    // The token opens the API, the cookie (in `token` after a newline) the admin pages.
    let get = |client: reqwest::Client, url: String, token: String| async move {
        let started = Instant::now();
        let (bearer, cookie) = token.split_once('\n').unwrap_or((&token, ""));
        let response = client
            .get(&url)
            .bearer_auth(bearer)
            .header(reqwest::header::COOKIE, cookie)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.bytes().await.unwrap();
        // Anything but 200 is counted as an error (an overloaded pool answers 503 after its
        // 5 s acquire timeout); a 4xx means the benchmark itself is wrong.
        assert!(
            status.is_success() || status.is_server_error(),
            "{url}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        (started.elapsed(), status.is_success())
    };
    for _ in 0..2 {
        get(client.clone(), url.to_owned(), token.to_owned()).await;
    }
    let budget = Duration::from_secs_f64(cfg.seconds);
    let issued = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let (client, url, token, issued) = (
            client.clone(),
            url.to_owned(),
            token.to_owned(),
            issued.clone(),
        );
        let max = cfg.max_requests;
        tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                {
                    let mut n = issued.lock().await;
                    // At least 10 requests, then until the budget is spent.
                    if *n >= max || (*n >= 10 && started.elapsed() >= budget) {
                        break;
                    }
                    *n += 1;
                }
                times.push(get(client.clone(), url.clone(), token.clone()).await);
            }
            times
        })
    });
    let mut all = Vec::new();
    let mut errors = 0;
    for w in futures_util::future::join_all(workers).await {
        for (time, ok) in w.unwrap() {
            all.push(time);
            errors += usize::from(!ok);
        }
    }
    let wall = started.elapsed();
    all.sort();
    Outcome {
        requests: all.len(),
        errors,
        p50: quantile(&all, 0.5),
        p99: quantile(&all, 0.99),
        per_second: all.len() as f64 / wall.as_secs_f64(),
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// Prints each statement's plan; returns whether some plan line uses an index.
async fn plan(
    db: &DatabaseConnection,
    name: &str,
    statements: Vec<sea_orm::Statement>,
    settings: Option<&str>,
) -> bool {
    let backend = db.get_database_backend();
    let mut uses_index = false;
    println!("\n`{name}`:\n\n```");
    let txn = db.begin().await.unwrap();
    if let Some(settings) = settings {
        println!("{settings}");
        txn.execute_unprepared(settings).await.unwrap();
    }
    for statement in statements {
        println!("{}", statement.sql);
        for row in txn
            .query_all_raw(explain(backend, &statement))
            .await
            .unwrap()
        {
            let line: String = match backend {
                DbBackend::Postgres => row.try_get_by_index(0).unwrap(),
                _ => row.try_get("", "detail").unwrap(),
            };
            uses_index |= line.contains("Index")
                || line.contains("USING INDEX")
                || line.contains("USING COVERING INDEX");
            println!("  {line}");
        }
    }
    println!("```");
    txn.rollback().await.unwrap();
    uses_index
}

async fn bench_backend(label: &str, url: &str, cfg: &Config) {
    let db = prepare(label, url, cfg.rows, cfg.users).await;
    let token = format!("{}\n{}", admin_token(&db).await, admin_cookie(&db).await);
    // The heaviest user, and a typical one: the demo's 6th of 12, or the 100th of thousands.
    let rank = if cfg.users.is_some() { 100 } else { 6 };
    let [(heavy, heavy_rows), (user, user_rows)] = users_by_rank(&db, rank).await;
    let backend = db.get_database_backend();

    // Plans first: a missing index is worth knowing before any figure.
    println!("\n### {label}: query plans at {} rows\n", cfg.rows);
    let week = UsageFilter {
        start: Some(Utc::now() - chrono::Duration::days(7)),
        ..Default::default()
    };
    let by_user = UsageFilter {
        user_id: Some(user),
        ..Default::default()
    };
    let model = UsageFilter {
        model: Some("gemini".into()),
        ..Default::default()
    };
    let all = UsageFilter::default();
    let mid_month = UsageFilter {
        start: Some(mid_month_start()),
        end: Some(mid_month_start() + chrono::Duration::days(30)),
        ..Default::default()
    };
    let stats_settings = token_stats_settings(backend);
    let stats = stats_settings.as_deref();
    let checks: Vec<(&str, Vec<sea_orm::Statement>, Option<&str>, bool)> = vec![
        (
            "token-stats granularity=month",
            token_stats_statements(&db, &all, Some(Granularity::Month))
                .await
                .unwrap(),
            stats,
            false,
        ),
        (
            "token-stats user_id (a few % of rows)",
            token_stats_statements(&db, &by_user, None).await.unwrap(),
            stats,
            true,
        ),
        (
            "token-stats last 7 days",
            token_stats_statements(&db, &week, Some(Granularity::Day))
                .await
                .unwrap(),
            stats,
            true,
        ),
        (
            "token-stats include=by_user, 30 days from mid-month: the bounds",
            by_user_bound_statements(&db, &mid_month, 50)
                .await
                .unwrap()
                .unwrap_or_default(),
            stats,
            true,
        ),
        (
            "llm-usage page 1",
            list_usage_statements(&db, &all, 1, 20).await.unwrap(),
            None,
            true,
        ),
        (
            "llm-usage page 1000",
            list_usage_statements(&db, &all, 1000, 20).await.unwrap(),
            None,
            true,
        ),
        (
            "llm-usage user_id",
            list_usage_statements(&db, &by_user, 1, 20).await.unwrap(),
            None,
            true,
        ),
        (
            "llm-usage model=gemini",
            list_usage_statements(&db, &model, 1, 20).await.unwrap(),
            None,
            true,
        ),
    ];
    let mut missing = Vec::new();
    for (name, statements, settings, wants_index) in checks {
        let uses = plan(&db, name, statements, settings).await;
        println!("uses an index: {}", if uses { "yes" } else { "no" });
        if wants_index && !uses {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        println!("\n**No index used where one helps: {missing:?}**");
    }

    let (depth, deep_cursor) = deep_cursor(&db, cfg.rows).await;
    let (base, handle) = serve(db, url);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(32)
        .build()
        .unwrap();
    let scenarios: Vec<(String, String)> = vec![
        ("token-stats".into(), "/api/v1/admin/token-stats/".into()),
        (
            "token-stats granularity=day".into(),
            "/api/v1/admin/token-stats/?granularity=day".into(),
        ),
        (
            "token-stats granularity=month".into(),
            "/api/v1/admin/token-stats/?granularity=month".into(),
        ),
        (
            "token-stats granularity=year".into(),
            "/api/v1/admin/token-stats/?granularity=year".into(),
        ),
        (
            "token-stats month tz=America/New_York".into(),
            "/api/v1/admin/token-stats/?granularity=month&tz=America/New_York".into(),
        ),
        (
            "token-stats day tz=Asia/Kolkata, last 7 days, zero-filled".into(),
            format!(
                "/api/v1/admin/token-stats/?granularity=day&tz=Asia/Kolkata&start_date={}&end_date={}",
                (Utc::now() - chrono::Duration::days(7)).format("%Y-%m-%d"),
                Utc::now().format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=by_user".into(),
            "/api/v1/admin/token-stats/?include=by_user".into(),
        ),
        (
            format!("token-stats user_id ({user_rows} rows)"),
            format!("/api/v1/admin/token-stats/?user_id={user}&granularity=month"),
        ),
        (
            "token-stats day tz=Asia/Kathmandu (+05:45)".into(),
            "/api/v1/admin/token-stats/?granularity=day&tz=Asia/Kathmandu".into(),
        ),
        (
            "token-stats year tz=Pacific/Chatham".into(),
            "/api/v1/admin/token-stats/?granularity=year&tz=Pacific/Chatham".into(),
        ),
        (
            format!("token-stats user_id + day tz=Asia/Kolkata ({user_rows} rows)"),
            format!("/api/v1/admin/token-stats/?user_id={user}&granularity=day&tz=Asia/Kolkata"),
        ),
        (
            format!("token-stats user_id + month tz=America/New_York ({user_rows} rows)"),
            format!(
                "/api/v1/admin/token-stats/?user_id={user}&granularity=month&tz=America/New_York"
            ),
        ),
        (
            "token-stats month, range with partial slots at both ends".into(),
            format!(
                "/api/v1/admin/token-stats/?granularity=month&start_date={}&end_date={}",
                (Utc::now() - chrono::Duration::days(60)).format("%Y-%m-%dT%H:%M:%S.123456Z"),
                (Utc::now() - chrono::Duration::days(3)).format("%Y-%m-%dT%H:%M:%S.654321Z"),
            ),
        ),
        (
            format!("token-stats user_id, heaviest user ({heavy_rows} rows)"),
            format!("/api/v1/admin/token-stats/?user_id={heavy}&granularity=month"),
        ),
        (
            format!("token-stats user_id, heaviest user, last 30 days, daily ({heavy_rows} rows)"),
            format!(
                "/api/v1/admin/token-stats/?user_id={heavy}&granularity=month&start_date={}",
                (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%dT%H:%M:%SZ")
            ),
        ),
        (
            format!(
                "token-stats user_id, heaviest user, month tz=America/New_York ({heavy_rows} rows)"
            ),
            format!(
                "/api/v1/admin/token-stats/?user_id={heavy}&granularity=month&tz=America/New_York"
            ),
        ),
        (
            format!(
                "token-stats user_id, heaviest user, day (hourly, all time) ({heavy_rows} rows)"
            ),
            format!("/api/v1/admin/token-stats/?user_id={heavy}&granularity=day"),
        ),
        (
            format!("token-stats user_id, heaviest user, day tz=Asia/Kolkata ({heavy_rows} rows)"),
            format!("/api/v1/admin/token-stats/?user_id={heavy}&granularity=day&tz=Asia/Kolkata"),
        ),
        (
            format!("token-stats user_id, heaviest user, day, last 24 h ({heavy_rows} rows)"),
            format!(
                "/api/v1/admin/token-stats/?user_id={heavy}&granularity=day&start_date={}",
                (Utc::now() - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ")
            ),
        ),
        (
            "token-stats include=by_user, last 30 days".into(),
            format!(
                "/api/v1/admin/token-stats/?include=by_user&start_date={}",
                (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%dT%H:%M:%SZ")
            ),
        ),
        (
            "token-stats include=by_user, last 30 days by date".into(),
            format!(
                "/api/v1/admin/token-stats/?include=by_user&start_date={}",
                (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=by_user, 30 days from the middle of last month".into(),
            format!(
                "/api/v1/admin/token-stats/?include=by_user&start_date={}&end_date={}",
                mid_month_start().format("%Y-%m-%dT%H:%M:%SZ"),
                (mid_month_start() + chrono::Duration::days(30)).format("%Y-%m-%dT%H:%M:%SZ")
            ),
        ),
        ("token-stats include=by_user, last calendar month".into(), {
            use chrono::Datelike;
            let now = Utc::now().date_naive();
            let this = now.with_day(1).unwrap();
            let last = (this - chrono::Duration::days(1)).with_day(1).unwrap();
            format!(
                "/api/v1/admin/token-stats/?include=by_user&start_date={last}&end_date={}",
                this - chrono::Duration::days(1)
            )
        }),
        // (token-stats takes no model filter, SPEC: these lines once passed `model=gpt-4o`,
        // which the server ignored; the by_user one duplicated "last 30 days by date".)
        (
            format!(
                "token-stats user_id, heaviest user, last 30 days by date, monthly ({heavy_rows} rows)"
            ),
            format!(
                "/api/v1/admin/token-stats/?user_id={heavy}&granularity=month&start_date={}",
                (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%d")
            ),
        ),
        (
            format!("token-stats user_id ({user_rows} rows), last 30 days by date"),
            format!(
                "/api/v1/admin/token-stats/?user_id={user}&start_date={}",
                (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=latency, last 90 days".into(),
            format!(
                "/api/v1/admin/token-stats/?include=latency&start_date={}",
                (Utc::now() - chrono::Duration::days(90)).format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=latency, all time".into(),
            "/api/v1/admin/token-stats/?include=latency".into(),
        ),
        (
            "token-stats include=latency, last 7 days tz=America/New_York".into(),
            format!(
                "/api/v1/admin/token-stats/?include=latency&tz=America/New_York&start_date={}",
                (Utc::now() - chrono::Duration::days(7)).format("%Y-%m-%d")
            ),
        ),
        (
            format!("token-stats include=latency user_id ({user_rows} rows)"),
            format!("/api/v1/admin/token-stats/?include=latency&user_id={user}"),
        ),
        (
            format!("token-stats include=latency user_id, heaviest user ({heavy_rows} rows)"),
            format!("/api/v1/admin/token-stats/?include=latency&user_id={heavy}"),
        ),
        // Parts of months: the user's rows around the whole months (migration 000023).
        (
            format!("token-stats include=latency user_id ({user_rows} rows), last 90 days"),
            format!(
                "/api/v1/admin/token-stats/?include=latency&user_id={user}&start_date={}",
                (Utc::now() - chrono::Duration::days(90)).format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=latency user_id, heaviest user, last 90 days".into(),
            format!(
                "/api/v1/admin/token-stats/?include=latency&user_id={heavy}&start_date={}",
                (Utc::now() - chrono::Duration::days(90)).format("%Y-%m-%d")
            ),
        ),
        (
            "token-stats include=latency user_id, heaviest user, last 7 days".into(),
            format!(
                "/api/v1/admin/token-stats/?include=latency&user_id={heavy}&start_date={}",
                (Utc::now() - chrono::Duration::days(7)).format("%Y-%m-%d")
            ),
        ),
        (
            "admin overview page, last 90 days by day".into(),
            format!(
                "/admin/?granularity=month&start_date={}",
                (Utc::now() - chrono::Duration::days(90)).format("%Y-%m-%d")
            ),
        ),
        (
            "admin overview page, last 90 days by day, metric=cost, tz=America/New_York".into(),
            format!(
                "/admin/?granularity=month&metric=cost&tz=America/New_York&start_date={}",
                (Utc::now() - chrono::Duration::days(90)).format("%Y-%m-%d")
            ),
        ),
        (
            "admin overview page, all time by month".into(),
            "/admin/?granularity=year".into(),
        ),
        ("llm-usage page 1".into(), "/api/v1/admin/llm-usage/".into()),
        (
            format!("llm-usage page 1 user_id, heaviest user ({heavy_rows} rows)"),
            format!("/api/v1/admin/llm-usage/?user_id={heavy}"),
        ),
        (
            format!("llm-usage keyset page at depth {depth}"),
            format!("/api/v1/admin/llm-usage/?cursor={deep_cursor}"),
        ),
        (
            "llm-usage page 1000".into(),
            "/api/v1/admin/llm-usage/?page=1000".into(),
        ),
        (
            "llm-usage model=gemini".into(),
            "/api/v1/admin/llm-usage/?model=gemini".into(),
        ),
    ];
    // BENCH_ONLY=kathmandu,kolkata: only the lines whose name contains one of these.
    let only: Vec<String> = std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect())
        .unwrap_or_default();
    // BENCH_CONCURRENCY=1: only these client counts (default 1,16).
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 16]);
    println!("\n### {label}: {} rows\n", cfg.rows);
    println!("| request | concurrency | requests | errors | p50 | p99 | requests/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, path) in &scenarios {
        let lower = name.to_lowercase();
        if !only.is_empty() && !only.iter().any(|o| lower.contains(o.as_str())) {
            continue;
        }
        for &concurrency in &levels {
            let o = measure(&client, &format!("{base}{path}"), &token, concurrency, cfg).await;
            println!(
                "| {name} | {concurrency} | {} | {} | {} | {} | {:.1} |",
                o.requests,
                o.errors,
                ms(o.p50),
                ms(o.p99),
                o.per_second
            );
        }
    }
    handle.stop(true).await;
}

/// The PostgreSQL URL of the bench database on the server `BENCH_DATABASE_URL` names.
async fn bench_database(server: &str, name: &str) -> String {
    let db = sea_orm::Database::connect(server).await.unwrap();
    let exists = db
        .query_one_raw(sea_orm::Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
        ))
        .await
        .unwrap()
        .is_some();
    if !exists {
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
    let mut url = url::Url::parse(server).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = Config {
        rows: env_or("BENCH_ROWS", 1_000_000),
        users: std::env::var("BENCH_USERS")
            .ok()
            .and_then(|v| v.parse().ok()),
        seconds: env_or("BENCH_SECONDS", 5.0),
        max_requests: env_or("BENCH_MAX_REQUESTS", 2000),
    };
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    println!(
        "# admin API benchmark, {} rows, {} s or {} requests per line",
        cfg.rows, cfg.seconds, cfg.max_requests
    );
    if backends.contains("sqlite") && cfg.users.is_some() {
        eprintln!("BENCH_USERS is a PostgreSQL shape: SQLite skipped");
    } else if backends.contains("sqlite") {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-api");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("usage-{}.sqlite3", cfg.rows));
        bench_backend(
            "SQLite",
            &format!("sqlite://{}?mode=rwc", path.display()),
            &cfg,
        )
        .await;
    }
    if backends.contains("postgres") {
        match std::env::var("BENCH_DATABASE_URL") {
            Ok(server) => {
                let name = match cfg.users {
                    None => "llm_tracker_bench_api".to_owned(),
                    Some(n) => format!("llm_tracker_bench_api_u{n}"),
                };
                let url = bench_database(&server, &name).await;
                bench_backend("PostgreSQL", &url, &cfg).await;
            }
            Err(_) => eprintln!("BENCH_DATABASE_URL not set: PostgreSQL skipped"),
        }
    }
}

/// 14:00 UTC on the 15th of last month: a 30-day range from there reads the most day cells of
/// every user (half of each month), the worst case of a rolling `by_user` range.
fn mid_month_start() -> chrono::DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    let now = Utc::now().date_naive();
    let last = (now.with_day(1).unwrap() - chrono::Duration::days(1))
        .with_day(15)
        .unwrap();
    Utc.from_utc_datetime(&last.and_hms_opt(14, 0, 0).unwrap())
}
