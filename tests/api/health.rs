//! `/healthz`, `/readyz` (503 when the database is gone) and the JSON 404.

use std::collections::HashMap;

use actix_web::{App, test};
use llm_tracker::http::{AppState, configure};
use llm_tracker::{Settings, db};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;

use crate::db_test;
use crate::helpers::{Backend, TestDb, pg_admin_url};

fn state(t: &TestDb) -> AppState {
    let vars = HashMap::from([("DATABASE_URL".to_owned(), t.url.expose().to_owned())]);
    AppState::new(t.db.clone(), Settings::from_map(&vars).unwrap())
}

db_test!(
    async fn health_and_readiness_answer_200_and_unknown_routes_404_in_json(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        for path in ["/healthz", "/readyz"] {
            let res =
                test::call_service(&app, test::TestRequest::get().uri(path).to_request()).await;
            assert_eq!(res.status(), 200, "{path}");
        }
        let res = test::call_service(
            &app,
            test::TestRequest::get().uri("/no/such/route").to_request(),
        )
        .await;
        assert_eq!(res.status(), 404);
        let body: Value = test::read_body_json(res).await;
        assert_eq!(
            body,
            serde_json::json!({"detail": "Not found.", "code": "not_found"})
        );
    }
);

db_test!(
    async fn readiness_is_503_when_the_database_is_gone(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let app = test::init_service(App::new().configure(configure(state(&t)))).await;
        match backend {
            Backend::Postgres => {
                // The database disappears under a running server.
                let name = t.url.expose().rsplit('/').next().unwrap().to_owned();
                let admin = Database::connect(pg_admin_url()).await.unwrap();
                admin
                    .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .await
                    .unwrap();
            }
            Backend::Sqlite => t.db.close_by_ref().await.unwrap(),
        }
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(res.status(), 503);
        let body: Value = test::read_body_json(res).await;
        assert_eq!(body["code"], "service_unavailable");
        assert!(!body["detail"].as_str().unwrap().is_empty());
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(
            res.status(),
            200,
            "liveness does not depend on the database"
        );
        // A brand-new pool for the dropped database connects lazily, and fails on first use.
        if backend == Backend::Postgres {
            let fresh = db::connect(&t.url).await.expect("a lazy pool is made");
            assert!(fresh.ping().await.is_err());
        }
    }
);
