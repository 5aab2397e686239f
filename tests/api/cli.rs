//! The `llm-tracker` binary: create-user, token, serve; bad input fails in one line and
//! writes nothing.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::credentials::assert_simplejwt_access_claims;
use crate::db_test;
use sea_orm::EntityTrait;

use crate::helpers::{TestDb, free_port, http_get};

const KEY: &str = "cli-test-signing-key-0123456789";

/// Runs the binary in an empty directory (no stray `.env`) with only the given variables.
pub(crate) fn cmd(t: &TestDb, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-tracker"));
    cmd.args(args)
        .current_dir(dir.path())
        .env_clear()
        .env("DATABASE_URL", t.url.expose())
        .env("RUST_LOG", "warn");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run llm-tracker")
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_line_failure(o: &Output, mentions: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one-line error expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        err.contains(mentions),
        "{err:?} does not mention {mentions:?}"
    );
}

db_test!(
    async fn create_user_then_token_gives_a_simplejwt_access_token(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let out = cmd(
            &t,
            &[
                "create-user",
                "--username",
                "admin",
                "--password",
                "s3cret",
                "--staff",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("\"admin\""));
        let user = llm_tracker::users::find_by_username(&t.db, "admin")
            .await
            .unwrap()
            .unwrap();
        assert!(user.is_staff && !user.is_superuser && user.is_active);
        assert!(llm_tracker::auth::password::check_password(
            "s3cret",
            &user.password
        ));

        let out = cmd(
            &t,
            &["token", "--username", "admin", "--ttl", "2h"],
            &[("JWT_SECRET", KEY)],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let printed = stdout(&out);
        assert_eq!(printed.lines().count(), 1, "the token alone on stdout");
        let token = printed.trim();
        assert_simplejwt_access_claims(token, user.id, 7200);
        assert_eq!(
            llm_tracker::auth::jwt::decode_access_token(KEY, token),
            Ok(user.id)
        );

        // Without --password the user exists but cannot sign in (Django's unusable password).
        let out = cmd(
            &t,
            &["create-user", "--username", "bob", "--superuser"],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let bob = llm_tracker::users::find_by_username(&t.db, "bob")
            .await
            .unwrap()
            .unwrap();
        assert!(bob.password.starts_with('!') && bob.is_superuser);
    }
);

db_test!(
    async fn bad_cli_input_fails_in_one_line_and_writes_nothing(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let ok = cmd(
            &t,
            &["create-user", "--username", "taken", "--password", "x"],
            &[],
        );
        assert!(ok.status.success(), "{}", stderr(&ok));
        let users = || t.scalar_i64("SELECT COUNT(*) FROM auth_user");
        assert_eq!(users().await, 1);

        let jwt = [("JWT_SECRET", KEY)];
        type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a str);
        let cases: Vec<Case> = vec![
            (
                vec!["create-user", "--username", "taken", "--password", "y"],
                &[],
                "already exists",
            ),
            (
                vec!["create-user", "--username", "bad name"],
                &[],
                "invalid username",
            ),
            (
                vec!["create-user", "--username", ""],
                &[],
                "invalid username",
            ),
            (
                vec!["create-user", "--username", "new", "--password", ""],
                &[],
                "password",
            ),
            (vec!["create-user"], &[], "--username"),
            (
                vec!["create-user", "--username", "new", "--bogus"],
                &[],
                "--bogus",
            ),
            (vec!["token", "--username", "nobody"], &jwt, "no user named"),
            (
                vec!["token", "--username", "taken", "--ttl", "5y"],
                &jwt,
                "TTL",
            ),
            (
                vec!["token", "--username", "taken", "--ttl", "0"],
                &jwt,
                "TTL",
            ),
            (vec!["token", "--username", "taken"], &[], "JWT_SECRET"),
            (
                vec!["token", "--username", "taken"],
                &[("JWT_SECRET", "short")],
                "JWT_SECRET",
            ),
            (
                vec!["migrate"],
                &[("DATABASE_URL", "mysql://x/y")],
                "DATABASE_URL",
            ),
            (
                vec!["create-user", "--username", "new"],
                &[("LLM_TIMEOUT_SECS", "soon")],
                "LLM_TIMEOUT_SECS",
            ),
            (vec!["frobnicate"], &[], "frobnicate"),
            (vec!["serve"], &[], "JWT_SECRET"),
        ];
        for (args, env, mentions) in cases {
            let out = cmd(&t, &args, env);
            assert_one_line_failure(&out, mentions);
            assert_eq!(users().await, 1, "{args:?} wrote a user");
        }
    }
);

db_test!(
    async fn serve_answers_health_and_readiness_and_stops_on_sigterm(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        // Issue 20: with USAGE_RETENTION_DAYS, `serve` applies retention at start (then daily).
        let old = chrono::Utc::now() - chrono::Duration::days(100);
        let rows: Vec<_> = (0..4u128)
            .map(|i| {
                let at = if i < 3 { old } else { chrono::Utc::now() };
                crate::usage_read::row(i + 1, None, "gpt-4o", (10, 5, 0, 0), true, at)
            })
            .collect();
        crate::usage_read::insert(&t.db, &rows).await;
        let port = free_port();
        let metrics_port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-tracker"))
            .arg("serve")
            .current_dir(dir.path())
            .env_clear()
            .env("DATABASE_URL", t.url.expose())
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_BIND_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("JWT_SECRET", KEY)
            .env("USAGE_RETENTION_DAYS", "30")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its log read as it comes (a pipe nobody reads would stop the server once full), for
        // the failure messages below.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = {
            let log = log.clone();
            let mut stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        // (Generous: the suite runs it beside a browser and other servers on two cores.)
        let deadline = Instant::now() + Duration::from_secs(60);
        let health = loop {
            match http_get(port, "/healthz") {
                Ok(r) => break r,
                Err(_) if Instant::now() < deadline && child.try_wait().unwrap().is_none() => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    let exited = child.try_wait().unwrap();
                    child.kill().ok();
                    child.wait().ok();
                    reader.join().ok();
                    panic!(
                        "server never answered: {e}; exited: {exited:?}; its log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        };
        assert_eq!(health.0, 200);
        assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
        // Issue 20: `/metrics` on METRICS_BIND_ADDR without a token; not on the main address
        // (no METRICS_TOKEN).
        let (status, text) = http_get(metrics_port, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(text.contains("llm_tracker_build_info{version="), "{text}");
        assert!(text.contains("llm_tracker_rollup_pending_rows "), "{text}");
        assert_eq!(http_get(port, "/metrics").unwrap().0, 404);
        // Retention ran: the three old rows are gone, their statistics kept, and counted.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await;
            let text = http_get(metrics_port, "/metrics").unwrap().1;
            if left == 1 && text.contains("llm_tracker_retention_deleted_rows_total 3") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "retention did not run: {left} rows"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let stats = llm_tracker::usage::stats::token_stats(
            &t.db,
            &llm_tracker::usage::UsageFilter::default(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(stats.summary.total_calls, 4);

        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
        assert!(
            http_get(port, "/healthz").is_err(),
            "port closed after shutdown"
        );
        assert!(
            http_get(metrics_port, "/metrics").is_err(),
            "metrics port closed after shutdown"
        );
    }
);

// `llm-tracker call` against a mock OpenAI: prints reply, usage and row id; one row.
db_test!(
    async fn call_prints_the_reply_usage_and_row_id(backend: Backend) {
        use wiremock::matchers::{body_partial_json, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        let body: serde_json::Value =
            serde_json::from_str(&crate::helpers::fixture("providers/openai_success.json"))
                .unwrap();
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(body_partial_json(serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], "response_format": {"type": "json_object"}})))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .expect(1)
            .mount(&server)
            .await;
        let base = format!("{}/v1", server.uri());
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_dir.path().join("s.jsonl");
        let env = [
            ("OPENAI_API_KEY", "sk-test-cli-0123456789"),
            ("OPENAI_BASE_URL", base.as_str()),
            ("USAGE_SPOOL_PATH", spool.to_str().unwrap()),
        ];
        let out = cmd(
            &t,
            &[
                "call",
                "hello",
                "--system",
                "Be brief.",
                "--node-name",
                "cli-test",
                "--json",
            ],
            &env,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: serde_json::Value =
            serde_json::from_str(stdout(&out).trim()).expect("one JSON document");
        assert_eq!(
            doc["content"],
            r#"{"category":"billing","confidence":0.92}"#
        );
        assert_eq!(doc["usage"]["cached_tokens"], 1536);
        let row_id = doc["row_id"].as_str().unwrap().to_owned();
        let rows = llm_tracker::db::entities::usage::Entity::find()
            .all(&t.db)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id.to_string(), row_id);
        assert_eq!(rows[0].metadata["node_name"], "cli-test");

        // A provider error: one line, exit ≠ 0, no key echoed, and still a row.
        server.reset().await;
        let err_body: serde_json::Value =
            serde_json::from_str(&crate::helpers::fixture("providers/openai_401.json")).unwrap();
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(401).set_body_json(err_body))
            .mount(&server)
            .await;
        let out = cmd(&t, &["call", "hello"], &env);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("Incorrect API key provided") && !err.contains("sk-test-"),
            "{err}"
        );
        let rows = llm_tracker::db::entities::usage::Entity::find()
            .all(&t.db)
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);

        // Missing provider key: named, no call, no row.
        let out = cmd(
            &t,
            &["call", "hello"],
            &[("OPENAI_BASE_URL", base.as_str())],
        );
        assert_one_line_failure(&out, "OPENAI_API_KEY");
    }
);

db_test!(
    async fn demo_data_is_realistic_and_only_fills_an_empty_table(backend: Backend) {
        use llm_tracker::db::entities::usage;
        let t = TestDb::migrated(backend).await;
        assert_eq!(
            llm_tracker::demo::seed(&t.db, &llm_tracker::pricing::PriceTable::builtin(), 3000, 7)
                .await
                .unwrap(),
            3000
        );
        let rows = usage::Entity::find().all(&t.db).await.unwrap();
        assert_eq!(rows.len(), 3000);
        let failed = rows.iter().filter(|r| !r.success).count();
        assert!((30..=180).contains(&failed), "~3% failures, got {failed}");
        let models: std::collections::HashSet<_> = rows.iter().map(|r| r.model.as_str()).collect();
        assert!(models.len() >= 6, "{models:?}");
        let providers: std::collections::HashSet<_> = rows
            .iter()
            .map(|r| r.metadata["provider"].as_str().unwrap())
            .collect();
        assert_eq!(providers.len(), 3);
        assert!(
            rows.iter().any(|r| r.cached_tokens > 0) && rows.iter().any(|r| r.reasoning_tokens > 0)
        );
        assert!(
            rows.iter()
                .filter(|r| r.model.starts_with("gpt-4o"))
                .all(|r| r.reasoning_tokens == 0)
        );
        let now = chrono::Utc::now();
        for r in &rows {
            assert!(
                r.cached_tokens <= r.prompt_tokens && r.reasoning_tokens <= r.completion_tokens
            );
            assert_eq!(r.total_tokens, r.prompt_tokens + r.completion_tokens);
            assert!(r.created_at <= now && now - r.created_at <= chrono::Duration::days(90));
            assert!(r.started_at.unwrap() <= r.created_at);
            // Issue 20: streamed rows carry their first chunk, within the call.
            assert_eq!(r.is_streaming, r.first_chunk_at.is_some());
            if let Some(first) = r.first_chunk_at {
                assert!(r.started_at.unwrap() <= first && first <= r.created_at);
                assert_eq!(r.metadata["stream"], true);
            }
        }
        let streamed = rows.iter().filter(|r| r.is_streaming).count();
        assert!(
            (600..=1200).contains(&streamed),
            "~3 in 10 streamed, got {streamed}"
        );
        let with_user = rows.iter().filter(|r| r.user_id.is_some()).count();
        assert!(with_user > 2400 && with_user < 3000);
        assert_eq!(
            llm_tracker::demo::seed(&t.db, &llm_tracker::pricing::PriceTable::builtin(), 3000, 8)
                .await
                .unwrap(),
            0,
            "never over existing rows"
        );
    }
);

db_test!(
    async fn serve_demo_prints_urls_and_a_working_admin_token(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llm-tracker"))
            .args(["serve", "--demo"])
            .current_dir(dir.path())
            .env_clear()
            .env("DATABASE_URL", t.url.expose())
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while http_get(port, "/healthz").is_err() {
            assert!(Instant::now() < deadline, "serve --demo never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(http_get(port, "/api/docs/").unwrap().0, 200);
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            printed.contains(&format!("http://127.0.0.1:{port}/api/docs/")),
            "{printed}"
        );
        assert!(printed.contains("50000 usage rows"), "{printed}");
        let token = printed
            .lines()
            .find(|l| l.starts_with("eyJ"))
            .expect("a token line");
        let admin = llm_tracker::users::find_by_username(&t.db, "admin")
            .await
            .unwrap()
            .unwrap();
        assert!(admin.is_staff && admin.is_superuser);
        let (_, claims) = crate::credentials::claims_of(token);
        assert_eq!(claims["user_id"], admin.id.to_string());
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            12 * 3600
        );
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            50_000
        );
    }
);

fn priced_row(n: u128, model: &str, cost: Option<i64>) -> llm_tracker::db::entities::usage::Model {
    use chrono::TimeZone;
    llm_tracker::db::entities::usage::Model {
        id: uuid::Uuid::from_u128(n).into(),
        user_id: None,
        model: model.into(),
        prompt_tokens: 2048,
        completion_tokens: 420,
        total_tokens: 2468,
        cached_tokens: 1536,
        reasoning_tokens: 384,
        success: true,
        error: None,
        metadata: serde_json::json!({}),
        created_at: chrono::Utc
            .with_ymd_and_hms(2025, 3, 1 + n as u32, 12, 0, 0)
            .unwrap(),
        started_at: None,
        cost: cost.map(llm_tracker::db::entities::usage::Cost),
        cost_currency: "USD".into(),
        is_streaming: false,
        first_chunk_at: None,
    }
}

db_test!(
    async fn reprice_fills_and_fixes_costs_and_a_rerun_changes_nothing(backend: Backend) {
        use llm_tracker::db::entities::usage;
        let t = TestDb::migrated(backend).await;
        // o4-mini-2025-04-16 with these tokens costs 2834 µ$ (see the tracker tests).
        let rows = [
            priced_row(1, "o4-mini-2025-04-16", None), // written by Django: no cost
            priced_row(2, "o4-mini-2025-04-16", Some(1)), // priced with an old table
            priced_row(3, "o4-mini-2025-04-16", Some(2834)),
            priced_row(4, "acme-unknown", None),
        ];
        usage::insert_rows(&t.db, &rows).await.unwrap();
        let costs = || async {
            let mut all = usage::Entity::find().all(&t.db).await.unwrap();
            all.sort_by_key(|r| r.id);
            all.into_iter()
                .map(|r| r.cost.map(|c| c.0))
                .collect::<Vec<_>>()
        };

        let out = cmd(&t, &["reprice", "--missing-only"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            "repriced: 2 rows scanned, 1 changed, 1 without a price"
        );
        assert_eq!(costs().await, [Some(2834), Some(1), Some(2834), None]);

        let out = cmd(&t, &["reprice", "--since", "2025-03-04"], &[]);
        assert_eq!(
            stdout(&out).trim(),
            "repriced: 2 rows scanned, 0 changed, 1 without a price",
            "rows 3 and 4 (4 and 5 March)"
        );
        let out = cmd(&t, &["reprice", "--until", "2025-03-03"], &[]);
        assert_eq!(
            stdout(&out).trim(),
            "repriced: 2 rows scanned, 1 changed, 0 without a price"
        );
        assert_eq!(costs().await, [Some(2834), Some(2834), Some(2834), None]);
        let out = cmd(&t, &["reprice"], &[]);
        assert_eq!(
            stdout(&out).trim(),
            "repriced: 4 rows scanned, 0 changed, 1 without a price",
            "a rerun finds nothing to change"
        );

        assert_one_line_failure(
            &cmd(&t, &["reprice", "--since", "yesterday"], &[]),
            "--since",
        );
    }
);

db_test!(
    async fn a_bad_prices_file_stops_start_up_naming_file_line_and_reason(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prices.toml");
        std::fs::write(
            &file,
            "[models.\"a\"]\ninput = 1\noutput = 2\n\n[models.\"b\"]\ninput = \"cheap\"\noutput = 2\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        for args in [&["migrate"][..], &["serve"][..], &["reprice"][..]] {
            let out = cmd(&t, args, &[("LLM_PRICES_PATH", path), ("JWT_SECRET", KEY)]);
            assert_one_line_failure(&out, &format!("LLM_PRICES_PATH is invalid: {path}:5:"));
            assert!(stderr(&out).contains("`input`"), "{}", stderr(&out));
        }
        let missing = dir.path().join("nope.toml");
        let out = cmd(
            &t,
            &["migrate"],
            &[("LLM_PRICES_PATH", missing.to_str().unwrap())],
        );
        assert_one_line_failure(&out, "nope.toml");
    }
);
