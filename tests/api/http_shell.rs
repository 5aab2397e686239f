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

/// Sends `head` on a fresh connection to `addr` and returns what came back until the server
/// closed it (the server may stop reading early: write errors are expected and ignored).
async fn raw_exchange(addr: std::net::SocketAddr, head: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let writing = async {
        let _ = write.write_all(&head).await;
    };
    let mut answer = Vec::new();
    let reading = async {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            read.read_to_end(&mut answer),
        )
        .await;
    };
    tokio::join!(writing, reading);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Status, lower-cased headers and body of a raw HTTP/1.1 answer.
fn parse_answer(answer: &str) -> (u16, HashMap<String, String>, String) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {answer:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

db_test!(
    async fn requests_the_http_parser_refuses_get_the_json_error_shape_too(backend: Backend) {
        // Issue 17 items 6 and 12: these answers are written by actix-http before any middleware.
        let t = TestDb::migrated(backend).await;
        let state = state(&t, "");
        llm_tracker::http::error::install_dispatcher_error_bodies();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = actix_web::HttpServer::new(move || app(state.clone()))
            .workers(1)
            .listen(listener)
            .unwrap()
            .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);

        let secret = "s3cr3t".repeat(200 * 1024 / 6);
        let cases = [
            // A token header over 128 KiB (item 6).
            (
                format!(
                    "GET /api/v1/admin/llm-usage/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n"
                ),
                431,
                "request_header_fields_too_large",
            ),
            // A 70 KB URI: longer than the URI parser takes (item 12).
            (
                format!(
                    "GET /api/v1/admin/llm-usage/?model={} HTTP/1.1\r\nHost: x\r\n\r\n",
                    "m".repeat(70 * 1024)
                ),
                400,
                "bad_request",
            ),
            // A 200 KB URI: over the head limit (item 12).
            (
                format!(
                    "GET /api/v1/admin/llm-usage/?model={} HTTP/1.1\r\nHost: x\r\n\r\n",
                    "m".repeat(200 * 1024)
                ),
                431,
                "request_header_fields_too_large",
            ),
            // A request line that is not HTTP at all.
            ("NOT HTTP\r\n\r\n".to_owned(), 400, "bad_request"),
        ];
        for (head, status, code) in cases {
            let answer = raw_exchange(addr, head.into_bytes()).await;
            let (got, headers, body) = parse_answer(&answer);
            assert_eq!(got, status, "{answer:.300}");
            assert_eq!(
                headers.get("content-type").map(String::as_str),
                Some("application/json"),
                "{headers:?}"
            );
            assert!(
                headers.get("x-request-id").is_some_and(|id| id.len() == 32),
                "{headers:?}"
            );
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["code"], code, "{body}");
            assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
            assert!(!answer.contains("s3cr3t"));
        }

        // An ordinary request on the same server is untouched.
        let answer = raw_exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        )
        .await;
        assert_eq!(parse_answer(&answer).0, 200, "{answer}");
        handle.stop(false).await;
    }
);
