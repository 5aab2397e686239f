//! SPEC §4 / issue 3: `call_and_track` over each provider's real wire format (wiremock serving
//! the fixtures), one row per call with the SPEC's row rules, and no row ever lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_tracker::db::entities::usage;
use llm_tracker::tracker::{
    StoreOptions, Stored, TrackerOptions, WriteMode, options_from_settings,
};
use llm_tracker::users::{NewUser, create_user};
use llm_tracker::{
    CallRequest, CallState, LlmTracker, Message, ProviderErrorKind, Settings, TrackerError, Usage,
    llm_service,
};
use sea_orm::{DatabaseConnection, EntityTrait};
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::db_test;
use crate::helpers::{Backend, TestDb, ToggleProxy, fixture};

const OPENAI_KEY: &str = "sk-test-1234567890abcd";
const AZURE_KEY: &str = "azure-test-key-0123456789";
const GEMINI_KEY: &str = "AIzaTestKey0123456789abcdef";

pub(crate) fn settings(pairs: &[(&str, String)]) -> Settings {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("OPENAI_API_KEY".into(), OPENAI_KEY.into()),
        ("AZURE_OPENAI_API_KEY".into(), AZURE_KEY.into()),
        ("GEMINI_API_KEY".into(), GEMINI_KEY.into()),
        ("LLM_MAX_RETRIES".into(), "0".into()),
        ("LLM_TIMEOUT_SECS".into(), "10".into()),
    ]);
    for (k, v) in pairs {
        vars.insert(k.to_string(), v.clone());
    }
    Settings::from_map(&vars).expect("settings")
}

fn openai(server: &MockServer) -> Settings {
    settings(&[
        ("LLM_PROVIDER", "openai".into()),
        ("OPENAI_BASE_URL", format!("{}/v1", server.uri())),
    ])
}

fn azure(server: &MockServer) -> Settings {
    settings(&[
        ("LLM_PROVIDER", "azure_openai".into()),
        ("AZURE_OPENAI_API_BASE", server.uri()),
        ("AZURE_OPENAI_DEPLOYMENT", "gpt-4o-prod".into()),
    ])
}

fn gemini(server: &MockServer) -> Settings {
    settings(&[
        ("LLM_PROVIDER", "gemini".into()),
        ("GEMINI_BASE_URL", server.uri()),
    ])
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_str(&fixture(&format!("providers/{name}"))).unwrap()
}

/// A tracker over `db` for `settings`, spooling into its own temp dir.
pub(crate) async fn new_tracker(
    db: &DatabaseConnection,
    settings: &Settings,
) -> (LlmTracker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_from_settings(settings);
    options.store = fast_store(dir.path().join("spool.jsonl"));
    let provider = llm_service(settings).expect("provider");
    (LlmTracker::new(provider, db.clone(), options).await, dir)
}

fn fast_store(path: std::path::PathBuf) -> StoreOptions {
    let mut store = StoreOptions::new(path);
    // These tests are about rows, not the deadline: a debug build on a busy machine may take
    // longer than 10 ms to commit, and a test expecting `Stored::Inserted` would then see
    // its row spooled (tests/api/resilience.rs covers the deadline).
    store.commit_deadline = Duration::from_secs(2);
    store.insert_timeout = Duration::from_millis(500);
    store.retry_min = Duration::from_millis(50);
    store.retry_max = Duration::from_millis(200);
    store
}

pub(crate) async fn rows(db: &DatabaseConnection) -> Vec<usage::Model> {
    usage::Entity::find().all(db).await.unwrap()
}

pub(crate) async fn only_row(db: &DatabaseConnection) -> usage::Model {
    let mut all = rows(db).await;
    assert_eq!(all.len(), 1, "exactly one row expected: {all:?}");
    all.remove(0)
}

pub(crate) fn tokens(r: &usage::Model) -> (i32, i32, i32, i32, i32) {
    (
        r.prompt_tokens,
        r.completion_tokens,
        r.total_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
    )
}

/// A mock provider answering every POST with `fixture_name`, status 200.
async fn answering(fixture_name: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json_fixture(fixture_name)))
        .mount(&server)
        .await;
    server
}

pub(crate) fn hello() -> CallRequest {
    CallRequest::new(vec![Message::system("Classify."), Message::user("hi")])
}

db_test!(
    async fn openai_success_fixture_produces_its_row_and_request(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let user = create_user(
            &t.db,
            NewUser {
                username: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("authorization", format!("Bearer {OPENAI_KEY}").as_str()))
            .and(body_partial_json(json!({
                "model": "o4-mini",
                "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "hi"}],
                "max_completion_tokens": 300,
                "temperature": 0.5,
                "response_format": {"type": "json_object"}
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json_fixture("openai_success.json")))
            .expect(1)
            .mount(&server)
            .await;
        let (tracker, _spool) = new_tracker(&t.db, &openai(&server)).await;
        let mut extra = serde_json::Map::new();
        extra.insert("ticket".into(), json!(42));
        extra.insert("node_name".into(), json!("overridden by ours"));
        let (content, usage) = tracker
            .call_and_track(
                hello()
                    .model("o4-mini")
                    .json_mode(true)
                    .max_tokens(300)
                    .temperature(0.5)
                    .node_name("interpret")
                    .state(CallState {
                        user_id: Some(user.id),
                        source_type: Some("task".into()),
                        source_task_id: Some("celery-uuid".into()),
                        metadata: extra,
                        ..Default::default()
                    }),
            )
            .await
            .expect("success");
        assert_eq!(content, r#"{"category":"billing","confidence":0.92}"#);
        let expected = Usage {
            model: "o4-mini-2025-04-16".into(),
            prompt_tokens: 2048,
            completion_tokens: 420,
            total_tokens: 2468,
            cached_tokens: 1536,
            reasoning_tokens: 384,
        };
        assert_eq!(usage, expected);
        assert_eq!(
            serde_json::to_value(&usage).unwrap(),
            json!({"model": "o4-mini-2025-04-16", "prompt_tokens": 2048, "completion_tokens": 420,
                   "total_tokens": 2468, "cached_tokens": 1536, "reasoning_tokens": 384})
        );
        let row = only_row(&t.db).await;
        assert!(row.success && row.error.is_none());
        assert_eq!(row.model, "o4-mini-2025-04-16");
        assert_eq!(tokens(&row), (2048, 420, 2468, 1536, 384));
        // Issue 5, o4-mini (snapshot → base name) at 1.10 / 0.275 / 4.40 per 1M tokens:
        // 512 uncached · 1.10 + 1536 cached · 0.275 + 36 visible · 4.40 + 384 reasoning · 4.40
        // = 563.2 + 422.4 + 158.4 + 1689.6 = 2833.6 µ$ → 2834 µ$.
        assert_eq!(row.cost, Some(usage::Cost(2834)));
        assert_eq!(row.cost_currency, "USD");
        assert_eq!(row.user_id, Some(user.id));
        assert_eq!(
            row.metadata,
            json!({"node_name": "interpret", "source_type": "task", "source_task_id": "celery-uuid",
                   "ticket": 42, "provider": "openai", "attempts": 1})
        );
        let started = row.started_at.expect("started_at recorded");
        assert!(started <= row.created_at);
        assert!(row.created_at - started < chrono::Duration::seconds(5));
        tracker.shutdown().await;
    }
);

db_test!(
    async fn azure_success_fixture_produces_its_row_and_request(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/openai/deployments/gpt-4o-prod/chat/completions"))
            .and(query_param("api-version", "2024-10-21"))
            .and(header("api-key", AZURE_KEY))
            .and(body_partial_json(
                json!({"max_tokens": 64, "messages": [{"role": "system", "content": "Classify."}]}),
            ))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json_fixture("azure_success.json")),
            )
            .expect(1)
            .mount(&server)
            .await;
        let (tracker, _spool) = new_tracker(&t.db, &azure(&server)).await;
        let (content, usage) = tracker
            .call_and_track(hello().max_tokens(64))
            .await
            .expect("success");
        assert_eq!(content, r#"{"category":"billing","confidence":0.88}"#);
        assert_eq!(usage.model, "gpt-4o-2024-11-20");
        let row = only_row(&t.db).await;
        assert_eq!(row.model, "gpt-4o-2024-11-20");
        assert_eq!(tokens(&row), (1320, 14, 1334, 1024, 0));
        // gpt-4o at 2.50 / 1.25 / 10: 296 · 2.50 + 1024 · 1.25 + 14 · 10 = 2160 µ$.
        assert_eq!(row.cost, Some(usage::Cost(2160)));
        assert_eq!(row.metadata["provider"], "azure_openai");
        assert_eq!(row.metadata["node_name"], "unknown");
    }
);

db_test!(
    async fn gemini_success_fixture_produces_its_row_and_request(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        let schema = json!({"type": "object", "properties": {"category": {"type": "string"}}});
        Mock::given(method("POST"))
            .and(path("/v1beta/models/gemini-2.5-flash:generateContent"))
            .and(header("x-goog-api-key", GEMINI_KEY))
            .and(body_partial_json(json!({
                "systemInstruction": {"parts": [{"text": "Classify."}]},
                "contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "earlier"}]}],
                "generationConfig": {"maxOutputTokens": 50, "temperature": 0.0,
                                     "responseMimeType": "application/json", "responseJsonSchema": schema}
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json_fixture("gemini_success.json")))
            .expect(1)
            .mount(&server)
            .await;
        let (tracker, _spool) = new_tracker(&t.db, &gemini(&server)).await;
        let request = CallRequest::new(vec![
            Message::system("Classify."),
            Message::user("hi"),
            Message::assistant("earlier"),
        ])
        .max_tokens(50)
        .temperature(0.0)
        .response_format(
            json!({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
        );
        let (content, usage) = tracker.call_and_track(request).await.expect("success");
        assert_eq!(content, r#"{"category": "billing", "confidence": 0.9}"#);
        assert_eq!(
            (usage.completion_tokens, usage.reasoning_tokens),
            (420, 384)
        );
        let row = only_row(&t.db).await;
        assert!(row.success);
        assert_eq!(row.model, "gemini-2.5-flash");
        assert_eq!(tokens(&row), (2048, 420, 2468, 1536, 384));
        // gemini-2.5-flash at 0.30 / 0.03 / 2.50 (thinking at the output price):
        // 512 · 0.30 + 1536 · 0.03 + 36 · 2.50 + 384 · 2.50 = 153.6 + 46.08 + 90 + 960
        // = 1249.68 µ$ → 1250 µ$.
        assert_eq!(row.cost, Some(usage::Cost(1250)));
        assert_eq!(row.metadata["provider"], "gemini");
    }
);

db_test!(
    async fn empty_gemini_replies_are_failures_with_the_reported_tokens(backend: Backend) {
        for (fixture_name, expected) in [
            ("gemini_blocked.json", (9, 0, 9, 0, 0)),
            ("gemini_finish_safety.json", (31, 112, 143, 0, 112)),
        ] {
            let t = TestDb::migrated(backend).await;
            let server = answering(fixture_name).await;
            let (tracker, _spool) = new_tracker(&t.db, &gemini(&server)).await;
            let err = tracker.call_and_track(hello()).await.unwrap_err();
            assert_eq!(err.to_string(), "LLM returned empty response");
            assert!(
                matches!(err, TrackerError::EmptyResponse { ref usage } if usage.prompt_tokens as i32 == expected.0)
            );
            let row = only_row(&t.db).await;
            assert!(!row.success, "{fixture_name}");
            assert_eq!(row.error.as_deref(), Some("LLM returned empty response"));
            assert_eq!(tokens(&row), expected, "{fixture_name}");
            // Billed tokens are priced even when the reply was empty:
            // blocked 9 · 0.30 = 2.7 → 3 µ$; safety 31 · 0.30 + 112 · 2.50 = 289.3 → 289 µ$.
            let want = if expected.0 == 9 { 3 } else { 289 };
            assert_eq!(row.cost, Some(usage::Cost(want)), "{fixture_name}");
        }
    }
);

db_test!(
    async fn unknown_models_are_unpriced_until_a_prices_file_names_them(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let mut body = json_fixture("openai_success.json");
        body["model"] = json!("acme-large-2025-01-01");
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
        let (tracker, _spool) = new_tracker(&t.db, &openai(&server)).await;
        tracker.call_and_track(hello()).await.expect("success");
        tracker.shutdown().await;
        let row = only_row(&t.db).await;
        assert_eq!(
            (row.model.as_str(), row.cost),
            ("acme-large-2025-01-01", None)
        );

        // A user prices file extends the table; the dated name falls back to it.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prices.toml");
        std::fs::write(
            &file,
            "[models.\"acme-large\"]\ninput = \"1\"\ncached_input = \"0.5\"\noutput = 2\nreasoning = 3\n",
        )
        .unwrap();
        let mut with_file = openai(&server);
        with_file.prices = std::sync::Arc::new(
            llm_tracker::pricing::PriceTable::load(Some(&file)).expect("prices file"),
        );
        let (tracker, _spool) = new_tracker(&t.db, &with_file).await;
        tracker.call_and_track(hello()).await.expect("success");
        tracker.shutdown().await;
        let priced = rows(&t.db)
            .await
            .into_iter()
            .find_map(|r| r.cost)
            .expect("a priced row");
        // 512 · 1 + 1536 · 0.5 + 36 · 2 + 384 · 3 = 512 + 768 + 72 + 1152 = 2504 µ$.
        assert_eq!(priced, usage::Cost(2504));
    }
);

db_test!(
    async fn each_provider_failure_writes_one_failure_row_with_its_message(backend: Backend) {
        let cases: Vec<(&str, u16, &str, ProviderErrorKind, &str)> = vec![
            (
                "openai",
                429,
                "openai_429.json",
                ProviderErrorKind::RateLimited,
                "Rate limit reached",
            ),
            (
                "openai",
                401,
                "openai_401.json",
                ProviderErrorKind::Authentication,
                "Incorrect API key provided",
            ),
            (
                "azure",
                429,
                "azure_429.json",
                ProviderErrorKind::RateLimited,
                "exceeded token rate limit",
            ),
            (
                "gemini",
                400,
                "gemini_400.json",
                ProviderErrorKind::InvalidRequest,
                "API key not valid",
            ),
            (
                "gemini",
                429,
                "gemini_429.json",
                ProviderErrorKind::RateLimited,
                "exceeded your current quota",
            ),
        ];
        for (provider, status, body, kind, text) in cases {
            let t = TestDb::migrated(backend).await;
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(status)
                        .insert_header("Retry-After", "1")
                        .set_body_json(json_fixture(body)),
                )
                .expect(1)
                .mount(&server)
                .await;
            let settings = match provider {
                "openai" => openai(&server),
                "azure" => azure(&server),
                _ => gemini(&server),
            };
            let (tracker, _spool) = new_tracker(&t.db, &settings).await;
            let err = tracker.call_and_track(hello()).await.unwrap_err();
            let TrackerError::Provider(e) = &err else {
                panic!("{body}: {err:?}")
            };
            assert_eq!(e.kind, kind, "{body}");
            assert_eq!(e.status, Some(status));
            assert!(e.message.contains(text), "{body}: {}", e.message);
            let row = only_row(&t.db).await;
            assert!(!row.success);
            assert_eq!(tokens(&row), (0, 0, 0, 0, 0), "{body}");
            let stored = row.error.expect("error text");
            assert!(stored.contains(text), "{body}: {stored}");
            for secret in [OPENAI_KEY, AZURE_KEY, GEMINI_KEY, "sk-test-"] {
                assert!(!stored.contains(secret), "{body}: secret in {stored}");
            }
            assert_eq!(row.metadata["attempts"], 1);
        }
    }
);

db_test!(
    async fn transient_errors_are_retried_into_one_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("Retry-After", "1")
                    .set_body_json(json_fixture("openai_429.json")),
            )
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json_fixture("openai_success.json")),
            )
            .expect(1)
            .mount(&server)
            .await;
        let mut s = openai(&server);
        s.llm_max_retries = 2;
        let (tracker, _spool) = new_tracker(&t.db, &s).await;
        let started = Instant::now();
        tracker
            .call_and_track(hello())
            .await
            .expect("second attempt succeeds");
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "Retry-After: 1 honoured"
        );
        let row = only_row(&t.db).await;
        assert!(row.success);
        assert_eq!(row.metadata["attempts"], 2);

        // insufficient_quota is not transient: one request, one failure row.
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).set_body_json(json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}})))
            .expect(1)
            .mount(&server)
            .await;
        let mut s = openai(&server);
        s.llm_max_retries = 2;
        let (tracker, _spool) = new_tracker(&t.db, &s).await;
        let err = tracker.call_and_track(hello()).await.unwrap_err();
        assert!(
            matches!(err, TrackerError::Provider(ref e) if e.kind == ProviderErrorKind::QuotaExceeded)
        );
        assert_eq!(only_row(&t.db).await.metadata["attempts"], 1);
    }
);

db_test!(
    async fn a_call_slower_than_the_timeout_is_cut_off_and_recorded(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json_fixture("openai_success.json"))
                    .set_delay(Duration::from_secs(5)),
            )
            .mount(&server)
            .await;
        let mut s = openai(&server);
        s.llm_timeout = Duration::from_secs(1);
        let (tracker, _spool) = new_tracker(&t.db, &s).await;
        let started = Instant::now();
        let err = tracker.call_and_track(hello()).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "cut off at the timeout"
        );
        assert!(
            matches!(err, TrackerError::Provider(ref e) if e.kind == ProviderErrorKind::Timeout),
            "{err:?}"
        );
        let row = only_row(&t.db).await;
        assert!(!row.success);
        assert!(row.error.unwrap().contains("timed out"));
        assert_eq!(
            row.model, "gpt-4o-mini",
            "configured model when the provider never answered"
        );
    }
);

db_test!(
    async fn empty_messages_make_no_call_and_no_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .expect(0)
            .mount(&server)
            .await;
        let (tracker, _spool) = new_tracker(&t.db, &openai(&server)).await;
        let err = tracker
            .call_and_track(CallRequest::new(vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "Messages cannot be empty");
        assert!(rows(&t.db).await.is_empty());
    }
);

db_test!(
    async fn two_hundred_concurrent_calls_make_two_hundred_exact_rows(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = answering("openai_success.json").await;
        let (tracker, _spool) = new_tracker(&t.db, &openai(&server)).await;
        let tracker = Arc::new(tracker);
        let calls = (0..200).map(|i| {
            let tracker = tracker.clone();
            async move { tracker.track(hello().node_name(format!("n{i}"))).await }
        });
        let results = futures_util::future::join_all(calls).await;
        assert!(results.iter().all(|r| r.result.is_ok()));
        // Rows whose commit took longer than the deadline (a burst of 200 on a pool that
        // connects lazily) are spooled and stored by the replay: all there shortly.
        let all = wait_for_rows(&t.db, 200).await;
        assert_eq!(all.len(), 200);
        let sum = |f: fn(&usage::Model) -> i32| all.iter().map(|r| i64::from(f(r))).sum::<i64>();
        assert_eq!(sum(|r| r.prompt_tokens), 200 * 2048);
        assert_eq!(sum(|r| r.completion_tokens), 200 * 420);
        assert_eq!(sum(|r| r.total_tokens), 200 * 2468);
        assert_eq!(sum(|r| r.cached_tokens), 200 * 1536);
        assert_eq!(sum(|r| r.reasoning_tokens), 200 * 384);
        let ids: HashSet<_> = results.iter().map(|r| r.row_id.unwrap()).collect();
        assert_eq!(ids, all.iter().map(|r| r.id.0).collect::<HashSet<_>>());
    }
);

db_test!(
    async fn a_user_that_does_not_exist_does_not_lose_the_row(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = answering("openai_success.json").await;
        let (tracker, _spool) = new_tracker(&t.db, &openai(&server)).await;
        let tracked = tracker
            .track(hello().state(CallState {
                user_id: Some(424_242),
                ..Default::default()
            }))
            .await;
        assert!(tracked.result.is_ok());
        assert_eq!(tracked.stored, Some(Stored::Inserted));
        let row = only_row(&t.db).await;
        assert_eq!(row.user_id, None);
        assert_eq!(row.metadata["unknown_user_id"], 424_242);
    }
);

/// Makes storage unavailable for the tracker: SQLite by an exclusive lock held by another
/// connection, PostgreSQL by cutting the TCP path to the server.
enum Outage {
    Sqlite(sea_orm::sqlx::SqliteConnection),
    Postgres(ToggleProxy),
    None,
}

async fn tracker_db(t: &TestDb) -> (DatabaseConnection, Outage) {
    match t.backend {
        Backend::Sqlite => (t.db.clone(), Outage::None),
        Backend::Postgres => {
            let (proxy, db) = ToggleProxy::in_front_of(t).await;
            (db, Outage::Postgres(proxy))
        }
    }
}

async fn break_storage(t: &TestDb, outage: Outage) -> Outage {
    match outage {
        Outage::None => Outage::Sqlite(crate::helpers::sqlite_write_lock(t).await),
        Outage::Postgres(proxy) => {
            proxy.set_up(false);
            Outage::Postgres(proxy)
        }
        other => other,
    }
}

async fn restore_storage(outage: Outage) -> Outage {
    match outage {
        Outage::Sqlite(mut conn) => {
            sea_orm::sqlx::query("COMMIT")
                .execute(&mut conn)
                .await
                .unwrap();
            Outage::None
        }
        Outage::Postgres(proxy) => {
            proxy.set_up(true);
            Outage::Postgres(proxy)
        }
        other => other,
    }
}

async fn wait_for_rows(db: &DatabaseConnection, n: usize) -> Vec<usage::Model> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = rows(db).await;
        if all.len() >= n || Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

db_test!(
    async fn a_storage_outage_loses_no_row_and_duplicates_none(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = answering("openai_success.json").await;
        let (db, outage) = tracker_db(&t).await;
        let (tracker, _spool) = new_tracker(&db, &openai(&server)).await;
        let tracker = Arc::new(tracker);
        tracker
            .call_and_track(hello())
            .await
            .expect("before the outage");
        // That first row may have been spooled (its commit paid for the lazy pool's first
        // connection, past the deadline): stored before the outage starts.
        wait_for_rows(&t.db, 1).await;
        while tracker.store().pending().await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let outage = break_storage(&t, outage).await;
        let calls = (0..100).map(|_| {
            let tracker = tracker.clone();
            async move { tracker.track(hello()).await }
        });
        let results = futures_util::future::join_all(calls).await;
        assert!(
            results.iter().all(|r| r.result.is_ok()),
            "callers still get their replies"
        );
        assert!(results.iter().all(|r| r.stored == Some(Stored::Deferred)));
        assert_eq!(tracker.store().pending().await, 100);

        let _outage = restore_storage(outage).await;
        let all = wait_for_rows(&t.db, 101).await;
        assert_eq!(all.len(), 101, "every row stored once storage is back");
        let ids: HashSet<_> = all.iter().map(|r| r.id.0).collect();
        assert_eq!(ids.len(), 101, "no duplicates");
        assert!(results.iter().all(|r| ids.contains(&r.row_id.unwrap())));
        // The rows can reach the table before the spool is emptied: the writers' own inserts,
        // cut off by the timeout, may still commit once the lock goes, and the spool's replay
        // (which finds them already there) follows within its backoff.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracker.store().pending().await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(tracker.store().pending().await, 0, "the spool drains");
        assert_eq!(rows(&t.db).await.len(), 101, "and adds nothing twice");
        tracker.shutdown().await;
    }
);

db_test!(
    async fn spooled_rows_survive_a_restart_and_are_stored_once(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = answering("openai_success.json").await;
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_dir.path().join("spool.jsonl");
        let settings = openai(&server);
        let make = |db: DatabaseConnection| {
            let settings = settings.clone();
            let spool = spool.clone();
            async move {
                let options = TrackerOptions {
                    store: fast_store(spool),
                    secrets: vec![],
                    prices: std::sync::Arc::new(llm_tracker::pricing::PriceTable::builtin()),
                };
                LlmTracker::new(llm_service(&settings).unwrap(), db, options).await
            }
        };
        let (db, outage) = tracker_db(&t).await;
        let first = make(db.clone()).await;
        let outage = break_storage(&t, outage).await;
        let calls = (0..100).map(|_| first.track(hello()));
        let results = futures_util::future::join_all(calls).await;
        assert!(
            results
                .iter()
                .all(|r| r.result.is_ok() && r.stored == Some(Stored::Deferred))
        );
        let ids: HashSet<_> = results.iter().map(|r| r.row_id.unwrap()).collect();
        // The process stops while the database is still away.
        first.shutdown().await;
        drop(first);
        // In the spool, or in the claim of a replay that the outage cut short.
        assert_eq!(crate::resilience::spooled_lines(&spool).len(), 100);
        assert!(rows(&t.db).await.is_empty());

        let _outage = restore_storage(outage).await;
        let second = make(db).await;
        // Replayed at start, in the background (a start never waits for the database).
        let all = wait_for_rows(&t.db, 100).await;
        assert_eq!(all.len(), 100, "replayed at start");
        assert_eq!(all.iter().map(|r| r.id.0).collect::<HashSet<_>>(), ids);
        let deadline = Instant::now() + Duration::from_secs(10);
        while second.store().pending().await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            crate::resilience::spool_files(&spool).is_empty(),
            "spool emptied"
        );
        second.shutdown().await;
        // A second replay of the same records (say, a copy of the spool) adds nothing.
        let third = make(t.db.clone()).await;
        assert_eq!(rows(&t.db).await.len(), 100);
        third.shutdown().await;
    }
);

db_test!(
    async fn queued_writes_return_at_once_and_still_lose_nothing(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let server = answering("openai_success.json").await;
        let (db, outage) = tracker_db(&t).await;
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = spool_dir.path().join("spool.jsonl");
        let make = |db: DatabaseConnection| {
            let settings = openai(&server);
            let spool = spool.clone();
            async move {
                let mut store = fast_store(spool);
                store.write_mode = WriteMode::Queued;
                let options = TrackerOptions {
                    store,
                    secrets: vec![],
                    prices: std::sync::Arc::new(llm_tracker::pricing::PriceTable::builtin()),
                };
                Arc::new(LlmTracker::new(llm_service(&settings).unwrap(), db, options).await)
            }
        };
        let tracker = make(db.clone()).await;
        let calls = (0..200).map(|_| {
            let tracker = tracker.clone();
            async move { tracker.track(hello()).await }
        });
        let results = futures_util::future::join_all(calls).await;
        assert!(
            results
                .iter()
                .all(|r| r.result.is_ok() && r.stored == Some(Stored::Queued))
        );
        // Storage goes away while rows may still be in flight; later calls are queued too.
        let outage = break_storage(&t, outage).await;
        let late = futures_util::future::join_all((0..50).map(|_| tracker.track(hello()))).await;
        assert!(late.iter().all(|r| r.stored == Some(Stored::Queued)));
        // A graceful stop waits for every queued row to be committed or spooled.
        tracker.shutdown().await;
        drop(tracker);
        let expected: HashSet<_> = results
            .iter()
            .chain(&late)
            .map(|r| r.row_id.unwrap())
            .collect();
        assert_eq!(expected.len(), 250);
        let stored_now: HashSet<_> = rows(&t.db).await.iter().map(|r| r.id.0).collect();
        let spooled: HashSet<_> = crate::resilience::spooled_lines(&spool)
            .iter()
            .map(|l| serde_json::from_str::<usage::Model>(l).unwrap().id.0)
            .collect();
        // Every row is in the database or the spool. A commit whose acknowledgement the outage
        // cut off is in both (its insert is in doubt, so it is spooled); replay dedupes it below.
        let either: HashSet<_> = stored_now.union(&spooled).copied().collect();
        assert_eq!(
            either,
            expected,
            "{} stored + {} spooled",
            stored_now.len(),
            spooled.len()
        );

        let _outage = restore_storage(outage).await;
        let again = make(db).await;
        let all = wait_for_rows(&t.db, 250).await;
        let ids: HashSet<_> = all.iter().map(|r| r.id.0).collect();
        assert_eq!((all.len(), ids.len()), (250, 250));
        assert!(
            results
                .iter()
                .chain(&late)
                .all(|r| ids.contains(&r.row_id.unwrap()))
        );
        again.shutdown().await;
    }
);
