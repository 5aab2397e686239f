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

fn state(t: &TestDb) -> AppState {
    let vars = HashMap::from([
        ("DATABASE_URL".to_owned(), t.url.expose().to_owned()),
        ("JWT_SECRET".to_owned(), key()),
    ]);
    AppState {
        db: t.db.clone(),
        settings: Settings::from_map(&vars).unwrap(),
    }
}

/// The fixture's users: 1 admin (staff), 2 alice (not staff); plus 3 inactive staff and
/// 4 a superuser who is not staff.
async fn fixture_users(t: &TestDb) {
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

fn staff_token() -> String {
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
            "/api/v1/admin/token-stats/?granularity=%20Month%20&start_date=2025-01-01&end_date=2025-01-31",
            auth.clone()
        );
        assert_eq!(status, 200, "{body}");
        // A row written as Django writes it has no cost: unpriced, 0 USD in the sums.
        let item = json!({"total_calls": 1, "total_prompt_tokens": 10, "total_completion_tokens": 5, "total_tokens": 15, "total_cached_tokens": 0, "total_reasoning_tokens": 0, "total_cost": 0.0});
        let mut by_model = item.clone();
        let m = by_model.as_object_mut().unwrap();
        m.insert("model".into(), json!("gpt-4o"));
        m.insert("total_cost_currency".into(), json!("USD"));
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
            "metadata": {"node_name": "interpret"}, "cost": null, "cost_currency": "USD"}], "total": 1, "page": 1, "page_size": 20})
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
