//! SPEC §5 over HTTP: the auth matrix (simplejwt fixture tokens included), the JSON of both
//! endpoints, and their parameter edges — on both databases.

use std::collections::HashMap;

use actix_web::{App, test};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use llm_tracker::http::{AppState, configure};
use llm_tracker::users::{NewUser, create_user};
use llm_tracker::{Settings, auth::jwt::mint_access_token};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::db_test;
use crate::helpers::{TestDb, fixture};

fn jwt_fixture() -> Value {
    serde_json::from_str(&fixture("django/simplejwt_tokens.json")).unwrap()
}

fn key() -> String {
    jwt_fixture()["signing_key"].as_str().unwrap().to_owned()
}

pub(crate) fn state(t: &TestDb) -> AppState {
    let vars = HashMap::from([
        ("DATABASE_URL".to_owned(), t.url.expose().to_owned()),
        ("JWT_SECRET".to_owned(), key()),
    ]);
    AppState::new(t.db.clone(), Settings::from_map(&vars).unwrap())
}

/// The fixture's users: 1 admin (staff), 2 alice (not staff); plus 3 inactive staff and
/// 4 a superuser who is not staff.
pub(crate) async fn fixture_users(t: &TestDb) {
    create_user(
        &t.db,
        NewUser {
            username: "admin".into(),
            is_staff: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    create_user(
        &t.db,
        NewUser {
            username: "alice".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    create_user(
        &t.db,
        NewUser {
            username: "gone".into(),
            is_staff: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    create_user(
        &t.db,
        NewUser {
            username: "root".into(),
            is_superuser: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    t.db.execute_unprepared("UPDATE auth_user SET is_active = false WHERE id = 3")
        .await
        .unwrap();
}

pub(crate) fn staff_token() -> String {
    jwt_fixture()["tokens"]["staff_access"]["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

macro_rules! get {
    ($app:expr, $uri:expr, $auth:expr) => {{
        let mut req = test::TestRequest::get().uri($uri);
        if let Some(auth) = $auth {
            req = req.insert_header(("Authorization", auth));
        }
        let res = test::call_service(&$app, req.to_request()).await;
        let status = res.status().as_u16();
        let www = res
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = test::read_body_json(res).await;
        (status, body, www)
    }};
}

db_test!(
    async fn the_auth_matrix_answers_as_drf_and_simplejwt(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let doc = jwt_fixture();
        let tok = |name: &str| format!("Bearer {}", doc["tokens"][name]["token"].as_str().unwrap());
        let mint = |id: i32| {
            format!(
                "Bearer {}",
                mint_access_token(&key(), id, std::time::Duration::from_secs(600))
            )
        };
        let none_alg = {
            use base64::Engine;
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "Bearer {}.{}.",
                e.encode(br#"{"alg":"none","typ":"JWT"}"#),
                e.encode(br#"{"token_type":"access","exp":4002906644,"user_id":"1"}"#)
            )
        };
        let hs512 = format!(
            "Bearer {}",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &json!({"token_type": "access", "exp": 4_002_906_644_i64, "user_id": "1"}),
                &EncodingKey::from_secret(key().as_bytes())
            )
            .unwrap()
        );
        let cases: Vec<(Option<String>, u16, &str)> = vec![
            (None, 401, "not_authenticated"),
            (Some("Basic YWRtaW46cHc=".into()), 401, "not_authenticated"),
            (Some("Bearer".into()), 401, "bad_authorization_header"),
            (Some("Bearer a b".into()), 401, "bad_authorization_header"),
            (Some("Bearer not.a.jwt".into()), 401, "token_not_valid"),
            (Some(tok("staff_access_wrong_key")), 401, "token_not_valid"),
            (Some(none_alg), 401, "token_not_valid"),
            (Some(hs512), 401, "token_not_valid"),
            (Some(tok("staff_access_expired")), 401, "token_not_valid"),
            (Some(tok("staff_refresh")), 401, "token_not_valid"),
            (Some(mint(99)), 401, "user_not_found"),
            (Some(mint(3)), 401, "user_inactive"),
            (Some(tok("non_staff_access")), 403, "permission_denied"),
            (Some(tok("staff_access")), 200, ""),
            (Some(mint(4)), 200, ""),
        ];
        for (auth, status, code) in cases {
            for uri in ["/api/v1/admin/token-stats/", "/api/v1/admin/llm-usage"] {
                let (got, body, www) = get!(app, uri, auth.clone());
                assert_eq!(got, status, "{auth:?} {uri}: {body}");
                if status != 200 {
                    assert_eq!(body["code"], code, "{auth:?}: {body}");
                    assert!(body["detail"].is_string());
                }
                assert_eq!(www.is_some(), status == 401, "WWW-Authenticate only on 401");
            }
        }
        let (_, body, www) = get!(app, "/api/v1/admin/token-stats", None::<String>);
        assert_eq!(
            body,
            json!({"detail": "Authentication credentials were not provided.", "code": "not_authenticated"})
        );
        assert_eq!(www.as_deref(), Some(r#"Bearer realm="api""#));
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage/",
            Some(tok("non_staff_access"))
        );
        assert_eq!(
            body["detail"],
            "You do not have permission to perform this action."
        );
    }
);

db_test!(
    async fn token_stats_and_llm_usage_answer_the_django_json(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        t.db.execute_unprepared(match backend {
            crate::helpers::Backend::Postgres => "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, created_at, user_id) VALUES \
                ('6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11', 'gpt-4o', 10, 5, 15, 0, 0, true, NULL, '{\"node_name\": \"interpret\"}', '2025-01-31T10:00:00.123456Z', 2)",
            crate::helpers::Backend::Sqlite => "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, created_at, user_id) VALUES \
                (X'6f1c2a0e8d4b4c369a570e0f8b7b1c11', 'gpt-4o', 10, 5, 15, 0, 0, 1, NULL, '{\"node_name\": \"interpret\"}', '2025-01-31T10:00:00.123456+00:00', 2)",
        }).await.unwrap();
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));

        let (status, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=%20Month%20&start_date=2025-01-01&end_date=2025-01-31&fill=none",
            auth.clone()
        );
        assert_eq!(status, 200, "{body}");
        // (Written into a buffer of its own, still sent as JSON.)
        let res = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/api/v1/admin/token-stats/?granularity=month")
                .insert_header(("Authorization", auth.clone().unwrap()))
                .to_request(),
        )
        .await;
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/json"
        );
        // Issue 6: by default a range with both ends is zero-filled, every other key unchanged.
        let (_, filled, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=month&start_date=2025-01-01&end_date=2025-01-31",
            auth.clone()
        );
        let items = filled["series"]["items"].as_array().unwrap();
        assert_eq!(items.len(), 31);
        assert_eq!(items[0]["bucket"], "2025-01-01");
        assert_eq!(items[0]["total_calls"], 0);
        assert_eq!(items[30]["bucket"], "2025-01-31");
        assert_eq!(items[30]["total_tokens"], 15);
        assert_eq!(filled["summary"], body["summary"]);
        // A row written as Django writes it has no cost: unpriced, 0 USD in the sums.
        let item = json!({"total_calls": 1, "total_prompt_tokens": 10, "total_completion_tokens": 5, "total_tokens": 15, "total_cached_tokens": 0, "total_reasoning_tokens": 0, "total_cost": 0.0});
        let mut by_model = item.clone();
        let m = by_model.as_object_mut().unwrap();
        m.insert("model".into(), json!("gpt-4o"));
        m.insert("total_cost_currency".into(), json!("USD"));
        // Issue 6: Django's rows have no started_at, so no latency.
        m.insert("avg_latency_sec".into(), Value::Null);
        // Issue 20: nor a time to first token.
        m.insert("avg_ttft_sec".into(), Value::Null);
        let mut bucket = item.clone();
        bucket
            .as_object_mut()
            .unwrap()
            .insert("bucket".into(), json!("2025-01-31"));
        assert_eq!(
            body,
            json!({
                "summary": {"total_prompt_tokens": 10, "total_completion_tokens": 5, "total_tokens": 15, "total_cached_tokens": 0,
                            "total_reasoning_tokens": 0, "total_calls": 1, "successful_calls": 1, "failed_calls": 0,
                            "total_cost": 0.0, "total_cost_currency": "USD", "unpriced_calls": 1},
                "by_model": [by_model],
                "series": {"granularity": "month", "items": [bucket]}
            })
        );
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats?user_id=&granularity=",
            auth.clone()
        );
        assert_eq!(body["series"], Value::Null);

        let (status, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage/?success=all&model=GPT",
            auth.clone()
        );
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"results": [{"id": "6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11", "user_id": 2, "username": "alice",
            "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cached_tokens": 0,
            "reasoning_tokens": 0, "success": true, "error": null, "created_at": "2025-01-31T10:00:00.123456+00:00",
            "metadata": {"node_name": "interpret"}, "cost": null, "cost_currency": "USD", "started_at": null,
            "latency_sec": null, "is_streaming": false, "first_chunk_at": null, "ttft_sec": null}],
            "total": 1, "page": 1, "page_size": 20, "next_cursor": null})
        );
        // An unencoded `+` arrives as a space and is read as `+`.
        let (status, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage?start_date=2025-01-31T18:00:00+08:00",
            auth.clone()
        );
        assert_eq!((status, body["total"].clone()), (200, json!(1)), "{body}");
    }
);

db_test!(
    async fn bad_parameters_get_a_400_naming_them(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        let bad: Vec<(&str, &str)> = vec![
            ("/api/v1/admin/token-stats/?granularity=week", "granularity"),
            (
                "/api/v1/admin/token-stats/?start_date=2025-02-30",
                "start_date",
            ),
            ("/api/v1/admin/token-stats/?end_date=yesterday", "end_date"),
            ("/api/v1/admin/token-stats/?user_id=abc", "user_id"),
            ("/api/v1/admin/llm-usage/?page=0", "page"),
            ("/api/v1/admin/llm-usage/?page=-1", "page"),
            ("/api/v1/admin/llm-usage/?page=abc", "page"),
            ("/api/v1/admin/llm-usage/?page=99999999999999999999", "page"),
            ("/api/v1/admin/llm-usage/?page_size=1e9", "page_size"),
            ("/api/v1/admin/llm-usage/?page_size=ten", "page_size"),
        ];
        for (uri, param) in bad {
            let (status, body, _) = get!(app, uri, auth.clone());
            assert_eq!(status, 400, "{uri}: {body}");
            assert_eq!(body["code"], "invalid_query");
            assert!(body["errors"][param].is_array(), "{uri}: {body}");
        }
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=week",
            auth.clone()
        );
        assert_eq!(
            body["detail"],
            "Unsupported granularity. Use one of: day, month, year."
        );
        let (status, body, _) = get!(app, "/api/v1/admin/llm-usage/?page=%zz", auth.clone());
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_query")),
            "{body}"
        );
        for (size, want) in [
            ("0", 1),
            ("-5", 1),
            ("101", 100),
            ("99999999999999999999", 100),
            (" 7 ", 7),
        ] {
            let (status, body, _) = get!(
                app,
                &format!(
                    "/api/v1/admin/llm-usage/?page_size={}",
                    size.replace(' ', "%20")
                ),
                auth.clone()
            );
            assert_eq!(
                (status, body["page_size"].clone()),
                (200, json!(want)),
                "page_size={size}"
            );
        }
        let (status, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage/?page=9223372036854775807&page_size=100",
            auth.clone()
        );
        assert_eq!(
            (status, body["results"].clone(), body["total"].clone()),
            (200, json!([]), json!(0))
        );
    }
);

db_test!(
    async fn the_prices_endpoint_lists_the_active_table_to_admins_only(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let (status, _, _) = get!(app, "/api/v1/admin/prices/", None::<String>);
        assert_eq!(status, 401);
        let (status, _, _) = get!(
            app,
            "/api/v1/admin/prices",
            Some(format!(
                "Bearer {}",
                jwt_fixture()["tokens"]["non_staff_access"]["token"]
                    .as_str()
                    .unwrap()
            ))
        );
        assert_eq!(status, 403);
        let (status, body, _) = get!(
            app,
            "/api/v1/admin/prices",
            Some(format!("Bearer {}", staff_token()))
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["currency"], &body["per"]),
            (&json!("USD"), &json!("1M tokens"))
        );
        let models = body["models"].as_array().unwrap();
        let gpt4o = models.iter().find(|m| m["model"] == "gpt-4o").unwrap();
        assert_eq!(
            (
                &gpt4o["input"],
                &gpt4o["cached_input"],
                &gpt4o["output"],
                &gpt4o["reasoning"]
            ),
            (&json!("2.5"), &json!("1.25"), &json!("10"), &json!("10"))
        );
        assert_eq!(gpt4o["origin"], "builtin");
        assert!(gpt4o["source"].as_str().unwrap().starts_with("https://"));
        let names: Vec<&str> = models
            .iter()
            .map(|m| m["model"].as_str().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "by model name");
    }
);

/// Usage rows at the given instants (RFC 3339), 1 prompt + 1 completion token each, for
/// user `user` (None: no user); inserted through the product's write path.
async fn rows_at(t: &TestDb, user: Option<i32>, instants: &[&str]) {
    use llm_tracker::db::entities::usage;
    let rows: Vec<usage::Model> = instants
        .iter()
        .map(|s| usage::Model {
            id: uuid::Uuid::new_v4().into(),
            user_id: user,
            model: "gpt-4o".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            total_tokens: 2,
            cached_tokens: 0,
            reasoning_tokens: 0,
            success: true,
            error: None,
            metadata: json!({}),
            created_at: chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc),
            started_at: None,
            cost: Some(usage::Cost(30)),
            cost_currency: "USD".into(),
            is_streaming: false,
            first_chunk_at: None,
        })
        .collect();
    usage::insert_rows(&t.db, &rows).await.unwrap();
}

/// `(bucket, total_calls)` of a token-stats series.
fn series(body: &Value) -> Vec<(String, i64)> {
    body["series"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no series: {body}"))
        .iter()
        .map(|i| {
            (
                i["bucket"].as_str().unwrap().to_owned(),
                i["total_calls"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, i64)]) -> Vec<(String, i64)> {
    v.iter().map(|(b, n)| (b.to_string(), *n)).collect()
}

db_test!(
    async fn local_buckets_follow_dst_and_half_hour_offsets(backend: Backend) {
        // Issue 6: hand-computed buckets; the same on SQLite and PostgreSQL.
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        rows_at(
            &t,
            None,
            &[
                // New York, spring forward 2024-03-10 (02:00 EST → 03:00 EDT at 07:00Z).
                "2024-03-10T06:30:00Z", // 01:30 EST
                "2024-03-10T07:10:00Z", // 03:10 EDT
                "2024-03-10T07:50:00Z", // 03:50 EDT
                // Fall back 2024-11-03: 01:00–02:00 twice (EDT at 05:xxZ, EST at 06:xxZ).
                "2024-11-03T05:15:00Z",
                "2024-11-03T06:15:00Z",
                "2024-11-03T06:45:00Z",
                // Late on 2024-11-03 local (25-hour day) and just after midnight.
                "2024-11-04T04:59:59Z", // 23:59:59 EST, still 3 November
                "2024-11-04T05:00:00Z", // 00:00 EST, 4 November
            ],
        )
        .await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        let get_series = |uri: String| {
            let app = &app;
            let auth = auth.clone();
            async move {
                let (status, body, _) = get!(app, &uri, auth);
                assert_eq!(status, 200, "{uri}: {body}");
                body
            }
        };

        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=day&tz=America/New_York&start_date=2024-03-10T01:00:00&end_date=2024-03-10T03:59:59".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-03-10T01:00:00-05:00", 1),
                ("2024-03-10T03:00:00-04:00", 2)
            ]),
            "02:00 does not exist; naive dates are New York times"
        );
        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=day&tz=America/New_York&start_date=2024-11-03T05:00:00Z&end_date=2024-11-03T06:59:59Z&fill=none".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-11-03T01:00:00-04:00", 1),
                ("2024-11-03T01:00:00-05:00", 2)
            ]),
            "the repeated hour appears once per instant"
        );
        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=month&tz=America/New_York&start_date=2024-11-03&end_date=2024-11-04".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[("2024-11-03", 4), ("2024-11-04", 1)]),
            "date-only dates are local days; 3 November has 25 hours"
        );
        assert_eq!(body["summary"]["total_calls"], 5);
        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=year&tz=America/New_York&start_date=2024-02-01&end_date=2024-04-30".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-02-01T00:00:00-05:00", 0),
                ("2024-03-01T00:00:00-05:00", 3),
                ("2024-04-01T00:00:00-04:00", 0)
            ])
        );

        // Kolkata is +05:30: its local hours start at :30 UTC.
        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=day&tz=Asia/Kolkata&start_date=2024-03-10T12:00:00&end_date=2024-03-10T13:59:59".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-03-10T12:00:00+05:30", 2), // 06:30Z and 07:10Z
                ("2024-03-10T13:00:00+05:30", 1)  // 07:50Z
            ])
        );
        // The same rows in UTC keep SPEC §5's labels.
        let body = get_series(
            "/api/v1/admin/token-stats/?granularity=day&start_date=2024-03-10T06:00:00&end_date=2024-03-10T07:59:59".into(),
        )
        .await;
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-03-10T06:00:00+00:00", 1),
                ("2024-03-10T07:00:00+00:00", 2)
            ])
        );
        // llm-usage reads its naive dates in the zone too.
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage/?tz=America/New_York&start_date=2024-11-03&end_date=2024-11-03",
            auth.clone()
        );
        assert_eq!(body["total"], 4, "{body}");
    }
);

db_test!(
    async fn zero_fill_by_user_and_their_limits(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        rows_at(
            &t,
            Some(2),
            &["2024-12-31T23:30:00Z", "2025-01-02T10:00:00Z"],
        )
        .await;
        rows_at(&t, Some(1), &["2025-01-01T10:00:00Z"]).await;
        rows_at(
            &t,
            None,
            &[
                "2025-01-01T11:00:00Z",
                "2025-01-01T12:00:00Z",
                "2025-01-01T13:00:00Z",
            ],
        )
        .await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));

        // Zero-filled day buckets across a year end; hours over a day.
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=month&start_date=2024-12-30&end_date=2025-01-03",
            auth.clone()
        );
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-12-30", 0),
                ("2024-12-31", 1),
                ("2025-01-01", 4),
                ("2025-01-02", 1),
                ("2025-01-03", 0)
            ])
        );
        assert_eq!(body["series"]["items"][0]["total_cost"], json!(0.0));
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=day&start_date=2025-01-01&end_date=2025-01-01",
            auth.clone()
        );
        assert_eq!(series(&body).len(), 24);
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=year&start_date=2024-11-15&end_date=2025-02-01&fill=none",
            auth.clone()
        );
        assert_eq!(
            series(&body),
            pairs(&[
                ("2024-12-01T00:00:00+00:00", 1),
                ("2025-01-01T00:00:00+00:00", 5)
            ])
        );
        // Without both dates there is nothing to fill.
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=month&start_date=2024-12-30",
            auth.clone()
        );
        assert_eq!(series(&body).len(), 3);
        assert!(body.get("by_user").is_none(), "by_user only when asked");

        // by_user: tokens descending; users without rows absent; the no-user group too.
        let (status, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?include=by_user",
            auth.clone()
        );
        assert_eq!(status, 200, "{body}");
        let users: Vec<(Value, Value, i64)> = body["by_user"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["user_id"].clone(),
                    u["username"].clone(),
                    u["total_tokens"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            users,
            [
                (json!(null), json!(null), 6),
                (json!(2), json!("alice"), 4),
                (json!(1), json!("admin"), 2)
            ]
        );
        assert_eq!(body["by_user"][1]["total_cost"], json!(0.00006));
        assert_eq!(body["by_user"][1]["total_cost_currency"], "USD");
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?include=by_user&user_limit=2&user_id=2",
            auth.clone()
        );
        assert_eq!(body["by_user"].as_array().unwrap().len(), 1);
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?include=by_user&user_limit=99999",
            auth.clone()
        );
        assert_eq!(
            body["by_user"].as_array().unwrap().len(),
            3,
            "clamped to 1000"
        );

        // Refusals name their parameter.
        for (uri, param) in [
            ("/api/v1/admin/token-stats/?tz=Mars/Olympus", "tz"),
            ("/api/v1/admin/llm-usage/?tz=UTC%2B8", "tz"),
            ("/api/v1/admin/token-stats/?fill=some", "fill"),
            ("/api/v1/admin/token-stats/?include=by_model", "include"),
            (
                "/api/v1/admin/token-stats/?include=by_user&user_limit=0",
                "user_limit",
            ),
            (
                "/api/v1/admin/token-stats/?include=by_user&user_limit=x",
                "user_limit",
            ),
            (
                "/api/v1/admin/token-stats/?granularity=day&start_date=2020-01-01&end_date=2025-01-01",
                "granularity",
            ),
        ] {
            let (status, body, _) = get!(app, uri, auth.clone());
            assert_eq!(status, 400, "{uri}: {body}");
            assert!(body["errors"][param].is_array(), "{uri}: {body}");
        }
        // The same long range is fine without zero-fill.
        let (status, _, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=day&start_date=2020-01-01&end_date=2025-01-01&fill=none",
            auth.clone()
        );
        assert_eq!(status, 200);
    }
);

db_test!(
    async fn default_timezone_applies_when_no_tz_is_given(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        rows_at(&t, None, &["2025-01-01T20:00:00Z"]).await;
        let mut st = state(&t);
        st.settings.default_timezone = "Asia/Shanghai".parse().unwrap();
        let app = test::init_service(App::new().configure(configure(st))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=month&start_date=2025-01-02&end_date=2025-01-02",
            auth.clone()
        );
        assert_eq!(
            series(&body),
            pairs(&[("2025-01-02", 1)]),
            "04:00 in Shanghai"
        );
        let (_, body, _) = get!(
            app,
            "/api/v1/admin/token-stats/?granularity=month&tz=UTC&start_date=2025-01-02&end_date=2025-01-02",
            auth.clone()
        );
        assert_eq!(series(&body), pairs(&[("2025-01-02", 0)]));
    }
);

db_test!(
    async fn one_row_latency_and_the_csv_export(backend: Backend) {
        use llm_tracker::db::entities::usage;
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let base = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        // 2,500 rows, three per second (ties on created_at cross the export's batches).
        let rows: Vec<usage::Model> = (0..2500u128)
            .map(|n| {
                let created_at = base + chrono::Duration::seconds((n / 3) as i64);
                usage::Model {
                    id: uuid::Uuid::from_u128(n * 7919 % 2503 + 1).into(),
                    user_id: (n % 2 == 0).then_some(2),
                    model: match n {
                        7 => "=HYPERLINK(\"http://x\")".into(),
                        _ => "gpt-4o".into(),
                    },
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    total_tokens: 15,
                    cached_tokens: 0,
                    reasoning_tokens: 0,
                    success: n != 8,
                    error: (n == 8).then(|| "-boom, \"quoted\"\nsecond line".to_owned()),
                    metadata: json!({"node_name": format!("step,{n}")}),
                    created_at,
                    started_at: (n % 5 == 0)
                        .then(|| created_at - chrono::Duration::milliseconds(1500)),
                    cost: Some(usage::Cost(75)),
                    cost_currency: "USD".into(),
                    is_streaming: false,
                    first_chunk_at: None,
                }
            })
            .collect();
        for chunk in rows.chunks(500) {
            usage::insert_rows(&t.db, chunk).await.unwrap();
        }
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));

        // One row.
        let known = &rows[10];
        let (status, body, _) = get!(
            app,
            &format!("/api/v1/admin/llm-usage/{}/", known.id),
            auth.clone()
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], known.id.to_string());
        assert_eq!(body["username"], "alice");
        assert_eq!(body["latency_sec"], json!(1.5));
        assert_eq!(body["started_at"], "2025-01-01T00:00:01.500000+00:00");
        assert_eq!(body["cost"], json!(0.000075));
        let (status, body, _) = get!(
            app,
            &format!("/api/v1/admin/llm-usage/{}", rows[11].id),
            auth.clone()
        );
        assert_eq!((status, &body["latency_sec"]), (200, &Value::Null));
        let (status, body, _) = get!(
            app,
            "/api/v1/admin/llm-usage/00000000-0000-0000-0000-000000000000/",
            auth.clone()
        );
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
        let (status, body, _) = get!(app, "/api/v1/admin/llm-usage/nope/", auth.clone());
        assert_eq!(status, 400);
        assert!(body["errors"]["id"].is_array(), "{body}");
        let (status, _, _) = get!(
            app,
            &format!("/api/v1/admin/llm-usage/{}/", known.id),
            None::<String>
        );
        assert_eq!(status, 401);

        // Average latency per model: only rows that know their start count.
        let (_, body, _) = get!(app, "/api/v1/admin/token-stats/", auth.clone());
        let gpt = body["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == "gpt-4o")
            .unwrap();
        assert_eq!(gpt["avg_latency_sec"], json!(1.5), "{gpt}");
        let odd = body["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] != "gpt-4o")
            .unwrap();
        assert_eq!(odd["avg_latency_sec"], Value::Null);

        // The export: every row, newest first, through a real CSV parser.
        let export = |uri: &'static str| {
            let app = &app;
            let auth = auth.clone();
            async move {
                let req = test::TestRequest::get()
                    .uri(uri)
                    .insert_header(("Authorization", auth.unwrap()))
                    .to_request();
                let res = test::call_service(app, req).await;
                assert_eq!(res.status().as_u16(), 200, "{uri}");
                let headers = res.headers().clone();
                let body = test::read_body(res).await;
                (headers, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let (headers, text) = export("/api/v1/admin/llm-usage/export.csv").await;
        assert_eq!(
            headers.get("content-type").unwrap(),
            "text/csv; charset=utf-8"
        );
        assert_eq!(
            headers
                .get("content-disposition")
                .unwrap()
                .to_str()
                .unwrap(),
            format!(
                "attachment; filename=\"llm-usage-{}.csv\"",
                chrono::Utc::now().format("%Y-%m-%d")
            )
        );
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, llm_tracker::usage::export::COLUMNS);
        let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), 2500);
        let mut expected = rows.clone();
        expected.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let got_ids: Vec<String> = records.iter().map(|r| r[0].to_owned()).collect();
        let want_ids: Vec<String> = expected.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(got_ids, want_ids, "every row once, in listing order");
        let find = |id: uuid::Uuid| {
            records
                .iter()
                .find(|r| r[0] == id.to_string())
                .unwrap()
                .clone()
        };
        let formula = find(rows[7].id.0);
        assert_eq!(&formula[6], "'=HYPERLINK(\"http://x\")", "formula defused");
        let error = find(rows[8].id.0);
        assert_eq!(&error[13], "'-boom, \"quoted\"\nsecond line");
        assert_eq!(&error[12], "false");
        let first = find(rows[10].id.0);
        assert_eq!(&first[3], "1.5");
        assert_eq!(&first[5], "alice");
        assert_eq!(&first[14], "0.000075");
        assert_eq!(&first[17], "step,10");
        let meta: Value = serde_json::from_str(&first[16]).unwrap();
        assert_eq!(meta, json!({"node_name": "step,10"}));

        let (_, text) = export("/api/v1/admin/llm-usage/export.csv?user_id=2&success=true").await;
        let n = csv::Reader::from_reader(text.as_bytes()).records().count();
        assert_eq!(
            n,
            rows.iter()
                .filter(|r| r.user_id == Some(2) && r.success)
                .count()
        );
        let (_, text) = export("/api/v1/admin/llm-usage/export.csv?model=nothing-like-this").await;
        assert_eq!(text.lines().count(), 1, "header only");
    }
);

db_test!(
    async fn cursor_paging_walks_every_row_once(backend: Backend) {
        // Issue 7: keyset paging with `cursor` / `next_cursor`, ties on created_at included.
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let instants: Vec<String> = (0..45)
            .map(|n| format!("2025-01-01T00:00:{:02}Z", n / 4))
            .collect();
        let refs: Vec<&str> = instants.iter().map(String::as_str).collect();
        rows_at(&t, Some(2), &refs).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));

        let (_, first, _) = get!(app, "/api/v1/admin/llm-usage/?page_size=10", auth.clone());
        let by_offset: Vec<Value> = {
            let mut all = Vec::new();
            for page in 1..=5 {
                let (_, body, _) = get!(
                    app,
                    &format!("/api/v1/admin/llm-usage/?page_size=10&page={page}"),
                    auth.clone()
                );
                all.extend(
                    body["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["id"].clone()),
                );
            }
            all
        };
        let mut by_cursor: Vec<Value> = first["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect();
        let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
        let mut pages = 1;
        while let Some(c) = cursor {
            let (status, body, _) = get!(
                app,
                &format!("/api/v1/admin/llm-usage/?page_size=10&cursor={c}"),
                auth.clone()
            );
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["total"], 45);
            by_cursor.extend(
                body["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["id"].clone()),
            );
            cursor = body["next_cursor"].as_str().map(str::to_owned);
            pages += 1;
        }
        assert_eq!(pages, 5);
        assert_eq!(by_cursor, by_offset, "the same rows in the same order");
        let (_, last, _) = get!(
            app,
            "/api/v1/admin/llm-usage/?page_size=10&page=5",
            auth.clone()
        );
        assert_eq!(last["next_cursor"], Value::Null);

        for bad in ["nope", "MTIz", "%zz"] {
            let (status, body, _) = get!(
                app,
                &format!("/api/v1/admin/llm-usage/?cursor={bad}"),
                auth.clone()
            );
            assert_eq!(status, 400, "{bad}: {body}");
            if bad != "%zz" {
                assert!(body["errors"]["cursor"].is_array(), "{body}");
            }
        }
    }
);

db_test!(
    async fn admin_reads_go_to_database_read_url(backend: Backend) {
        // Issue 7: with DATABASE_READ_URL set, usage reads come from it (here a second
        // database holding different rows), while users still come from the primary.
        let primary = TestDb::migrated(backend).await;
        let replica = TestDb::migrated(backend).await;
        fixture_users(&primary).await;
        fixture_users(&replica).await;
        rows_at(&primary, None, &["2025-01-01T00:00:00Z"]).await;
        rows_at(
            &replica,
            None,
            &[
                "2025-01-01T00:00:00Z",
                "2025-01-01T00:00:01Z",
                "2025-01-01T00:00:02Z",
            ],
        )
        .await;
        let vars = HashMap::from([
            ("DATABASE_URL".to_owned(), primary.url.expose().to_owned()),
            (
                "DATABASE_READ_URL".to_owned(),
                replica.url.expose().to_owned(),
            ),
            ("JWT_SECRET".to_owned(), key()),
        ]);
        let settings = Settings::from_map(&vars).unwrap();
        let st = AppState::open(
            primary.db.clone(),
            settings,
            std::sync::Arc::new(true.into()),
        )
        .await
        .unwrap();
        let app = test::init_service(App::new().configure(configure(st))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        let (_, body, _) = get!(app, "/api/v1/admin/token-stats/", auth.clone());
        assert_eq!(body["summary"]["total_calls"], 3, "{body}");
        let (_, body, _) = get!(app, "/api/v1/admin/llm-usage/", auth.clone());
        assert_eq!(body["total"], 3);

        // Without it, the primary serves the reads.
        let vars = HashMap::from([
            ("DATABASE_URL".to_owned(), primary.url.expose().to_owned()),
            ("JWT_SECRET".to_owned(), key()),
        ]);
        let st = AppState::open(
            primary.db.clone(),
            Settings::from_map(&vars).unwrap(),
            std::sync::Arc::new(true.into()),
        )
        .await
        .unwrap();
        let app = test::init_service(App::new().configure(configure(st))).await;
        let (_, body, _) = get!(app, "/api/v1/admin/token-stats/", auth.clone());
        assert_eq!(body["summary"]["total_calls"], 1);
    }
);

// Issue 17, items 1 and 7: a NUL byte (or another control character) in any parameter, or a
// malformed parameter name or escape, is a 400 naming the parameter on both databases, before
// any query runs (PostgreSQL answered 503, SQLite's LIKE matched every row), on the API, the
// CSV export and the admin pages; ordinary parameters still work.
db_test!(
    async fn control_characters_and_malformed_escapes_in_parameters_are_400(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        crate::usage_read::insert(
            &t.db,
            &[crate::usage_read::row(
                1,
                None,
                "gemini-2.5-flash",
                (10, 5, 0, 0),
                true,
                crate::usage_read::at("2026-11-01T10:00:00Z"),
            )],
        )
        .await;
        let app = test::init_service(llm_tracker::http::app(state(&t))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        for (uri, param) in [
            ("/api/v1/admin/llm-usage/?model=%00", "model"),
            ("/api/v1/admin/llm-usage/?model=gpt%00", "model"),
            ("/api/v1/admin/llm-usage/?model=flash%00zzz", "model"),
            ("/api/v1/admin/llm-usage/export.csv?model=%00", "model"),
            ("/api/v1/admin/token-stats/?model=a%0Db", "model"),
            (
                "/api/v1/admin/token-stats/?start_date=2026-01-01%00",
                "start_date",
            ),
            ("/api/v1/admin/llm-usage/?%zz=1", "%zz"),
            ("/api/v1/admin/llm-usage/?model=%C3%28", "model"),
            ("/admin/llm-usage/?model=%00", "model"),
        ] {
            let (status, body, _) = get!(app, uri, auth.clone());
            assert_eq!(status, 400, "{uri}: {body}");
            assert_eq!(body["code"], "invalid_query", "{uri}: {body}");
            assert!(body["errors"][param].is_array(), "{uri}: {body}");
        }
        let (status, body, _) = get!(app, "/api/v1/admin/llm-usage/?model=flash", auth.clone());
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["total"], 1);
    }
);

// Issue 17, item 8: a cursor the API did not issue — a position before 1970 or in year
// 9999/±200000 (PostgreSQL answered 503), another spelling — is a 400 naming `cursor`.
db_test!(
    async fn forged_cursors_are_400(backend: Backend) {
        use base64::Engine;
        let t = TestDb::migrated(backend).await;
        fixture_users(&t).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        let auth = Some(format!("Bearer {}", staff_token()));
        let id = uuid::Uuid::from_u128(7).simple().to_string();
        for raw in [
            format!("-1.{id}"),
            format!("253402214400000000.{id}"),
            format!("-6311390400000000000.{id}"),
            format!("+1764000000000000.{id}"),
        ] {
            let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
            let (status, body, _) = get!(
                app,
                &format!("/api/v1/admin/llm-usage/?cursor={cursor}"),
                auth.clone()
            );
            assert_eq!(status, 400, "{raw}: {body}");
            assert!(body["errors"]["cursor"].is_array(), "{raw}: {body}");
        }
    }
);
