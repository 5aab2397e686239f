//! The OpenAPI document: the committed `openapi/openapi.json` is what the server serves, and
//! Swagger UI loads from assets inside the binary.

use actix_web::test;
use serde_json::Value;

use crate::db_test;
use crate::helpers::TestDb;

db_test!(
    async fn the_committed_openapi_file_is_what_the_server_serves(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let vars = std::collections::HashMap::from([(
            "DATABASE_URL".to_owned(),
            t.url.expose().to_owned(),
        )]);
        let state = llm_tracker::http::AppState::new(
            t.db.clone(),
            llm_tracker::Settings::from_map(&vars).unwrap(),
        );
        let svc = test::init_service(llm_tracker::http::app(state)).await;
        let res = test::call_service(
            &svc,
            test::TestRequest::get()
                .uri("/api/openapi.json")
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), 200);
        let served: Value = test::read_body_json(res).await;
        let committed: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            served, committed,
            "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
        );
        assert_eq!(committed["openapi"], "3.1.0");
        assert!(
            committed.get("servers").is_none(),
            "deterministic: no servers"
        );
        assert_eq!(
            committed["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        for path in ["/api/v1/admin/token-stats/", "/api/v1/admin/llm-usage/"] {
            let op = &committed["paths"][path]["get"];
            assert_eq!(op["security"][0]["bearer"], serde_json::json!([]), "{path}");
            for code in ["200", "400", "401", "403", "503"] {
                assert!(op["responses"][code].is_object(), "{path} {code}");
            }
        }
        let params: Vec<&str> = committed["paths"]["/api/v1/admin/llm-usage/"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            params,
            [
                "page",
                "page_size",
                "user_id",
                "model",
                "success",
                "start_date",
                "end_date",
                "tz",
                "cursor"
            ]
        );

        // Swagger UI, with its assets served by the binary itself.
        let res = test::call_service(
            &svc,
            test::TestRequest::get().uri("/api/docs/").to_request(),
        )
        .await;
        assert_eq!(res.status(), 200);
        let html = String::from_utf8(test::read_body(res).await.to_vec()).unwrap();
        assert!(html.contains("swagger-ui"), "{html}");
        let res = test::call_service(
            &svc,
            test::TestRequest::get()
                .uri("/api/docs/swagger-ui-bundle.js")
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), 200);
        assert!(test::read_body(res).await.len() > 100_000);
    }
);
