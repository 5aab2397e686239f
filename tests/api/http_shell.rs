//! What wraps every route (SPEC §5 "Also served"): CORS for the configured origins only, JSON
//! bodies for every error (also those actix writes itself), the request id header.

use std::collections::HashMap;

use actix_web::test;
use llm_tracker::Settings;
use llm_tracker::http::{AppState, app};
use serde_json::Value;

use crate::db_test;
use crate::helpers::TestDb;

const DASH: &str = "https://dash.example.com";

fn state(t: &TestDb, origins: &str) -> AppState {
    let vars = HashMap::from([
        ("DATABASE_URL".to_owned(), t.url.expose().to_owned()),
        (
            "JWT_SECRET".to_owned(),
            "http-shell-test-key-0123456789".to_owned(),
        ),
        ("CORS_ALLOWED_ORIGINS".to_owned(), origins.to_owned()),
    ]);
    AppState::new(t.db.clone(), Settings::from_map(&vars).unwrap())
}

fn header(
    res: &actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
    name: &str,
) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

db_test!(
    async fn cors_answers_the_configured_origins_only(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let svc =
            test::init_service(app(state(&t, &format!("{DASH}, http://localhost:5173")))).await;

        let preflight = test::TestRequest::default()
            .method(actix_web::http::Method::OPTIONS)
            .uri("/api/v1/admin/token-stats/")
            .insert_header(("Origin", DASH))
            .insert_header(("Access-Control-Request-Method", "GET"))
            .insert_header(("Access-Control-Request-Headers", "authorization"))
            .to_request();
        let res = test::call_service(&svc, preflight).await;
        assert!(res.status().is_success(), "{}", res.status());
        assert_eq!(
            header(&res, "access-control-allow-origin").as_deref(),
            Some(DASH)
        );
        assert!(
            header(&res, "access-control-allow-headers")
                .unwrap()
                .to_lowercase()
                .contains("authorization")
        );

        let get = test::TestRequest::get()
            .uri("/healthz")
            .insert_header(("Origin", DASH))
            .to_request();
        let res = test::call_service(&svc, get).await;
        assert_eq!(
            header(&res, "access-control-allow-origin").as_deref(),
            Some(DASH)
        );

        // Another origin: the request runs, but gets no CORS headers at all.
        let get = test::TestRequest::get()
            .uri("/healthz")
            .insert_header(("Origin", "https://evil.example"))
            .to_request();
        let res = test::call_service(&svc, get).await;
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-")),
            "{:?}",
            res.headers()
        );
        let preflight = test::TestRequest::default()
            .method(actix_web::http::Method::OPTIONS)
            .uri("/api/v1/admin/token-stats/")
            .insert_header(("Origin", "https://evil.example"))
            .insert_header(("Access-Control-Request-Method", "GET"))
            .to_request();
        let res = test::call_service(&svc, preflight).await;
        assert!(res.status().is_client_error());
        assert!(
            res.headers()
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-"))
        );
        let body: Value = test::read_body_json(res).await;
        assert!(
            body["detail"].is_string() && body["code"].is_string(),
            "{body}"
        );

        // Nothing configured: no origin gets CORS headers.
        let svc = test::init_service(app(state(&t, ""))).await;
        let get = test::TestRequest::get()
            .uri("/healthz")
            .insert_header(("Origin", DASH))
            .to_request();
        let res = test::call_service(&svc, get).await;
        assert!(
            res.headers()
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-"))
        );
    }
);

db_test!(
    async fn errors_actix_writes_itself_are_json_too(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let svc = test::init_service(app(state(&t, ""))).await;
        let res = test::call_service(
            &svc,
            test::TestRequest::post()
                .uri("/api/v1/admin/llm-usage/")
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), 405);
        assert!(header(&res, "x-request-id").is_some());
        let body: Value = test::read_body_json(res).await;
        assert_eq!(body["code"], "method_not_allowed");
        assert_eq!(body["detail"], "Method Not Allowed.");
        let res =
            test::call_service(&svc, test::TestRequest::get().uri("/nope").to_request()).await;
        assert_eq!(res.status(), 404);
        let body: Value = test::read_body_json(res).await;
        assert_eq!(body["code"], "not_found");
    }
);
