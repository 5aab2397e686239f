//! Issue 18: one SQLite file shared with the Django app. Rows written in Django's SQLite formats
//! (by plain SQL, as its ORM writes them: `tests/fixtures/django/sqlite_ddl.sql`) and ours sit
//! side by side; every read returns both in the right order and ranges, and what we write is
//! Django's format byte for byte. A file written by an earlier version converts on `migrate`.

use actix_web::{App, test};
use llm_tracker::db::entities::usage;
use llm_tracker::http::configure;
use llm_tracker::users::{NewUser, create_user};
use migration::{Migrator, MigratorTrait};
use regex::Regex;
use serde_json::Value;

use crate::admin_api::{staff_token, state};
use crate::django_compat::exec;
use crate::helpers::{Backend, TestDb, fixture};
use crate::rollup::assert_verified;
use crate::usage_read::{at, insert, row};

/// Django's SQLite text of a `DateTimeField`: naive UTC, the fraction only when not zero.
const DJANGO_DATETIME: &str = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?$";
/// Django's SQLite text of a `UUIDField`.
const DJANGO_UUID: &str = r"^[0-9a-f]{32}$";

/// Django's tables and rows, in Django's formats: user 1 (`admin`, staff; the JWT fixture's
/// user), user 2 (`alice`), and three usage rows.
pub(crate) async fn django_file(t: &TestDb) {
    let ddl: String = fixture("django/sqlite_ddl.sql")
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        exec(t, statement).await;
    }
    let users = "INSERT INTO auth_user (id, password, last_login, is_superuser, username, \
                 first_name, last_name, email, is_staff, is_active, date_joined) VALUES";
    exec(t, &format!("{users} (1, '!', '2026-11-26 05:00:00.250000', 0, 'admin', '', '', '', 1, 1, '2024-01-01 00:00:00')")).await;
    exec(
        t,
        &format!("{users} (2, '!', NULL, 0, 'alice', '', '', '', 0, 1, '2024-01-02 08:30:00')"),
    )
    .await;
    let rows = "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, \
                total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, \
                created_at, user_id) VALUES";
    exec(t, &format!("{rows} ('d0000000000040008000000000000001', 'gpt-4o', 10, 5, 15, 0, 0, 1, NULL, '{{\"node_name\": \"django\"}}', '2026-11-26 06:00:00', 2)")).await;
    exec(t, &format!("{rows} ('d0000000000040008000000000000002', 'gemini-2.5-flash', 20, 4, 24, 0, 0, 0, 'boom', '{{}}', '2026-11-26 05:35:23.500000', NULL)")).await;
    exec(t, &format!("{rows} ('d0000000000040008000000000000003', 'gpt-4o', 7, 1, 8, 0, 0, 1, NULL, '{{}}', '2026-11-25 23:59:59.999999', 2)")).await;
}

/// Our rows, through the one write path: at 05:35:23.712809, 06:30:00 (started 1.5 s before)
/// and exactly 05:50:00.
pub(crate) async fn our_rows(t: &TestDb) -> Vec<usage::Model> {
    let mut rows = vec![
        row(
            1,
            Some(2),
            "gpt-4o",
            (100, 50, 0, 0),
            true,
            at("2026-11-26T05:35:23.712809Z"),
        ),
        row(
            2,
            Some(1),
            "gpt-4o-mini",
            (30, 3, 0, 0),
            true,
            at("2026-11-26T06:30:00Z"),
        ),
        row(
            3,
            None,
            "gpt-4o",
            (1, 1, 0, 0),
            false,
            at("2026-11-26T05:50:00Z"),
        ),
    ];
    rows[1].started_at = Some(at("2026-11-26T06:29:58.5Z"));
    insert(&t.db, &rows).await;
    rows
}

fn hex(n: u128) -> String {
    uuid::Uuid::from_u128(n).simple().to_string()
}

/// Newest first: ours at 06:30, Django's at 06:00, ours at 05:50, ours at 05:35:23.712809,
/// Django's at 05:35:23.5, Django's the day before.
fn newest_first() -> Vec<String> {
    vec![
        hex(2),
        "d0000000000040008000000000000001".into(),
        hex(3),
        hex(1),
        "d0000000000040008000000000000002".into(),
        "d0000000000040008000000000000003".into(),
    ]
}

macro_rules! get {
    ($app:expr, $uri:expr) => {{
        let req = test::TestRequest::get()
            .uri($uri)
            .insert_header(("Authorization", format!("Bearer {}", staff_token())))
            .to_request();
        let res = test::call_service(&$app, req).await;
        assert_eq!(res.status(), 200, "{}", $uri);
        test::read_body(res).await
    }};
}

fn ids_of(page: &Value) -> Vec<String> {
    page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().replace('-', ""))
        .collect()
}

#[actix_web::test]
async fn a_file_django_and_llm_tracker_write_reads_right_everywhere() {
    let t = TestDb::empty(Backend::Sqlite).await;
    django_file(&t).await;
    Migrator::up(&t.db, None).await.unwrap();
    our_rows(&t).await;
    // And one call tracked end to end (a mock OpenAI), stored by the tracker's own store.
    let server = crate::resilience::provider(std::time::Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = crate::resilience::tracker_at(&t.db, &server, dir.path(), false).await;
    let tracked = tracker.track(crate::tracker::hello()).await;
    tracker.shutdown().await;
    let tracked_id = tracked.row_id.expect("a row").simple().to_string();
    let carol = create_user(
        &t.db,
        NewUser {
            username: "carol".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // What we wrote is what Django writes.
    let datetime = Regex::new(DJANGO_DATETIME).unwrap();
    let uuid = Regex::new(DJANGO_UUID).unwrap();
    for id in [hex(1), hex(2), hex(3), tracked_id.clone()] {
        let stored = t
            .scalar_string(&format!(
                "SELECT typeof(id) || '|' || id || '|' || created_at || '|' || \
                 COALESCE(started_at, '') || '|' || typeof(success) || '|' || \
                 typeof(metadata) || '|' || typeof(user_id) || '|' || typeof(cost) \
                 FROM llm_tracker_usage WHERE id = '{id}'"
            ))
            .await;
        let f: Vec<&str> = stored.split('|').collect();
        assert_eq!(f[0], "text", "{stored}");
        assert!(uuid.is_match(f[1]), "{stored}");
        assert!(datetime.is_match(f[2]), "{stored}");
        assert!(f[3].is_empty() || datetime.is_match(f[3]), "{stored}");
        assert_eq!(f[4], "integer", "{stored}");
        assert_eq!(f[5], "text", "{stored}");
        assert!(["integer", "null"].contains(&f[6]), "{stored}");
        // Not a Django column: integer micro-dollars, exact (README).
        assert!(["integer", "null"].contains(&f[7]), "{stored}");
    }
    assert_eq!(
        t.scalar_string(&format!(
            "SELECT created_at || '|' || started_at FROM llm_tracker_usage WHERE id = '{}'",
            hex(2)
        ))
        .await,
        "2026-11-26 06:30:00|2026-11-26 06:29:58.500000"
    );
    assert_eq!(
        t.scalar_string(&format!(
            "SELECT created_at FROM llm_tracker_usage WHERE id = '{}'",
            hex(1)
        ))
        .await,
        "2026-11-26 05:35:23.712809"
    );
    // The tracked row is "now": out of the fixed rows' ranges below; its format is checked.
    exec(
        &t,
        &format!("DELETE FROM llm_tracker_usage WHERE id = '{tracked_id}'"),
    )
    .await;
    let joined = t
        .scalar_string(&format!(
            "SELECT date_joined || '|' || typeof(is_staff) FROM auth_user WHERE id = {}",
            carol.id
        ))
        .await;
    let (joined, staff) = joined.split_once('|').unwrap();
    assert!(datetime.is_match(joined), "{joined}");
    assert_eq!(staff, "integer");

    let app = test::init_service(App::new().configure(configure(state(&t)))).await;
    // The listing: both writers' rows, newest first.
    let page: Value =
        serde_json::from_slice(&get!(app, "/api/v1/admin/llm-usage/?page_size=100")).unwrap();
    assert_eq!(ids_of(&page), newest_first());
    assert_eq!(page["total"], 6);
    let django_row = &page["results"][1];
    assert_eq!(django_row["created_at"], "2026-11-26T06:00:00+00:00");
    assert_eq!(django_row["username"], "alice");
    assert_eq!(
        page["results"][0]["created_at"],
        "2026-11-26T06:30:00+00:00"
    );
    // Ranges across both writers' rows, the total (rollup and edges) equal to the rows.
    for (query, want) in [
        (
            "start_date=2026-11-26T05:50:00&end_date=2026-11-26T07:00:00",
            newest_first()[..3].to_vec(),
        ),
        (
            "end_date=2026-11-26T05:35:23.6",
            newest_first()[4..].to_vec(),
        ),
        (
            "start_date=2026-11-26T05:35:23.6&end_date=2026-11-26T05:59:59",
            vec![hex(3), hex(1)],
        ),
        (
            "start_date=2026-11-26&end_date=2026-11-26",
            newest_first()[..5].to_vec(),
        ),
        (
            "user_id=2",
            vec![newest_first()[1].clone(), hex(1), newest_first()[5].clone()],
        ),
    ] {
        let page: Value = serde_json::from_slice(&get!(
            app,
            &format!("/api/v1/admin/llm-usage/?page_size=100&{query}")
        ))
        .unwrap();
        assert_eq!(ids_of(&page), want, "{query}");
        assert_eq!(page["total"], want.len(), "{query}");
        let stats: Value = serde_json::from_slice(&get!(
            app,
            &format!(
                "/api/v1/admin/token-stats/?granularity=day&fill=none&include=by_user&{query}"
            )
        ))
        .unwrap();
        assert_eq!(
            stats["summary"]["total_calls"],
            want.len(),
            "{query} {stats}"
        );
        let series_calls: i64 = stats["series"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["total_calls"].as_i64().unwrap())
            .sum();
        assert_eq!(series_calls, want.len() as i64, "{query}");
        let by_user_calls: i64 = stats["by_user"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["total_calls"].as_i64().unwrap())
            .sum();
        assert_eq!(by_user_calls, want.len() as i64, "{query}");
    }
    // Keyset cursors walk the mixed rows in order, once each.
    let mut seen = Vec::new();
    let mut uri = "/api/v1/admin/llm-usage/?page_size=1".to_owned();
    loop {
        let page: Value = serde_json::from_slice(&get!(app, &uri)).unwrap();
        seen.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/admin/llm-usage/?page_size=1&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, newest_first());
    // Detail by id, for each writer's rows.
    for id in newest_first() {
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        let one: Value =
            serde_json::from_slice(&get!(app, &format!("/api/v1/admin/llm-usage/{uuid}/")))
                .unwrap();
        assert_eq!(one["id"], uuid.to_string());
    }
    // The export: every row, newest first.
    let csv = get!(app, "/api/v1/admin/llm-usage/export.csv");
    let ids: Vec<String> = csv::Reader::from_reader(&csv[..])
        .records()
        .map(|r| r.unwrap()[0].replace('-', ""))
        .collect();
    assert_eq!(ids, newest_first());
    // The rollup counted Django's rows (its triggers) and ours alike.
    assert_verified(&t.db).await;
}

#[actix_web::test]
async fn a_file_an_earlier_version_wrote_converts_on_migrate_and_answers_the_same() {
    let t = TestDb::empty(Backend::Sqlite).await;
    // The schema before migration 000012, and rows as versions before it wrote them: 16-byte
    // blob ids, RFC 3339 text with an offset (sqlx's form: 0, 3, 6 or 9 fraction digits).
    Migrator::up(&t.db, Some(11)).await.unwrap();
    exec(&t, "INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined) VALUES ('!', '2026-11-26T05:00:00.250+00:00', 0, 'admin', '', '', '', 1, 1, '2024-01-01T00:00:00+00:00')").await;
    let old = "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, \
               total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, \
               created_at, user_id, started_at, cost, cost_currency) VALUES";
    exec(&t, &format!("{old} (x'{}', 'gpt-4o', 10, 5, 15, 0, 0, 1, NULL, '{{}}', '2026-11-26T05:35:23.712809+00:00', 1, '2026-11-26T05:35:22.120+00:00', 12, 'USD')", hex(1))).await;
    exec(&t, &format!("{old} (x'{}', 'gpt-4o', 1, 1, 2, 0, 0, 0, 'boom', '{{}}', '2026-11-26T06:00:00+00:00', NULL, NULL, NULL, 'USD')", hex(2))).await;
    exec(&t, &format!("{old} (x'{}', 'o4-mini', 3, 3, 6, 0, 1, 1, NULL, '{{}}', '2026-11-26T06:00:00.000000001+00:00', 1, NULL, NULL, 'USD')", hex(3))).await;
    // Enough more rows for several batches of the conversion.
    exec(
        &t,
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10050) \
             {} SELECT randomblob(16), 'gpt-4o-mini', i, 1, i + 1, 0, 0, i % 2, NULL, '{{}}', \
             strftime('%Y-%m-%dT%H:%M:%S', '2026-01-01', '+' || (i * 7) || ' minutes') || '.' || \
             substr('000000' || ((i * 7919) % 1000000), -6) || '+00:00', \
             CASE WHEN i % 3 = 0 THEN NULL ELSE 1 END, NULL, i, 'USD' FROM n",
            old.trim_end_matches(" VALUES")
        ),
    )
    .await;
    // Today's reader also reads the columns of migration 000016: added for the "before"
    // answers, dropped again before the way up (which adds them itself).
    let streaming = [
        (
            "llm_tracker_usage",
            "is_streaming",
            "bool NOT NULL DEFAULT 0",
        ),
        ("llm_tracker_usage", "first_chunk_at", "datetime NULL"),
        (
            "llm_tracker_usage_rollup",
            "ttft_us",
            "integer NOT NULL DEFAULT 0",
        ),
        (
            "llm_tracker_usage_rollup",
            "ttft_calls",
            "integer NOT NULL DEFAULT 0",
        ),
        (
            "llm_tracker_usage_rollup_total",
            "ttft_us",
            "integer NOT NULL DEFAULT 0",
        ),
        (
            "llm_tracker_usage_rollup_total",
            "ttft_calls",
            "integer NOT NULL DEFAULT 0",
        ),
        (
            "llm_tracker_usage_rollup_delta",
            "ttft_us",
            "integer NOT NULL DEFAULT 0",
        ),
        (
            "llm_tracker_usage_rollup_delta",
            "ttft_calls",
            "integer NOT NULL DEFAULT 0",
        ),
    ];
    for (table, column, kind) in streaming {
        exec(
            &t,
            &format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"),
        )
        .await;
    }
    // And the retention state of migration 000018 (no horizon yet), likewise.
    exec(
        &t,
        "CREATE TABLE llm_tracker_usage_retention (id integer PRIMARY KEY NOT NULL, \
         horizon_slot integer NULL, deleting bool NOT NULL DEFAULT 0, \
         rows_deleted integer NOT NULL DEFAULT 0)",
    )
    .await;
    exec(
        &t,
        "INSERT INTO llm_tracker_usage_retention (id) VALUES (1)",
    )
    .await;
    let app = test::init_service(App::new().configure(configure(state(&t)))).await;
    let before_page = get!(app, "/api/v1/admin/llm-usage/?page_size=100");
    let before_stats = get!(
        app,
        "/api/v1/admin/token-stats/?granularity=year&include=by_user"
    );
    for (table, column, _) in streaming {
        exec(&t, &format!("ALTER TABLE {table} DROP COLUMN {column}")).await;
    }
    exec(&t, "DROP TABLE llm_tracker_usage_retention").await;

    Migrator::up(&t.db, None).await.unwrap();

    assert_eq!(
        t.scalar_i64(
            "SELECT COUNT(*) FROM llm_tracker_usage WHERE typeof(id) <> 'text' OR length(id) <> 32 \
             OR id <> lower(id) OR created_at GLOB '*[T+Z]*' OR started_at GLOB '*[T+Z]*'"
        )
        .await,
        0
    );
    assert_eq!(
        t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
        10053
    );
    for (n, created, started) in [
        (
            1,
            "2026-11-26 05:35:23.712809",
            "2026-11-26 05:35:22.120000",
        ),
        (2, "2026-11-26 06:00:00", ""),
        (3, "2026-11-26 06:00:00", ""),
    ] {
        assert_eq!(
            t.scalar_string(&format!(
                "SELECT created_at || '|' || COALESCE(started_at, '') FROM llm_tracker_usage WHERE id = '{}'",
                hex(n)
            ))
            .await,
            format!("{created}|{started}")
        );
    }
    assert_eq!(
        t.scalar_string("SELECT date_joined || '|' || last_login FROM auth_user WHERE id = 1")
            .await,
        "2024-01-01 00:00:00|2026-11-26 05:00:00.250000"
    );
    // The same answers as before, ids unchanged.
    let app = test::init_service(App::new().configure(configure(state(&t)))).await;
    let json = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    assert_eq!(
        json(&get!(app, "/api/v1/admin/llm-usage/?page_size=100")),
        json(&before_page)
    );
    // Detail by id (the listing's keys) finds the converted rows.
    for n in 1..=3 {
        let id = uuid::Uuid::from_u128(n).to_string();
        let listed = json(&before_page)["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap();
        assert_eq!(
            json(&get!(app, &format!("/api/v1/admin/llm-usage/{id}/"))),
            listed
        );
    }
    assert_eq!(
        json(&get!(
            app,
            "/api/v1/admin/token-stats/?granularity=year&include=by_user"
        )),
        json(&before_stats)
    );
    assert_verified(&t.db).await;
    // Migrating again changes nothing.
    crate::helpers::down_through(&t.db, "m20261127_000012").await;
    Migrator::up(&t.db, None).await.unwrap();
    assert_eq!(
        json(&get!(app, "/api/v1/admin/llm-usage/?page_size=100")),
        json(&before_page)
    );
}
