//! Issue 20 item 1: `GET /metrics` in the Prometheus text format — refused without its
//! token, absent when not configured, and counting tracked calls, spooled rows and HTTP
//! requests by route template. The text is read back with a Prometheus text-format parser
//! (`prometheus-parse`).

use std::collections::HashMap;

use actix_web::test;
use llm_tracker::Settings;
use llm_tracker::http::{AppState, app};
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::db_test;
use crate::helpers::{TestDb, fixture};

const TOKEN: &str = "metrics-token-0123456789";

fn state(t: &TestDb, token: Option<&str>) -> AppState {
    let mut vars = HashMap::from([
        ("DATABASE_URL".to_owned(), t.url.expose().to_owned()),
        (
            "JWT_SECRET".to_owned(),
            "metrics-test-secret-0123456789".to_owned(),
        ),
    ]);
    if let Some(token) = token {
        vars.insert("METRICS_TOKEN".to_owned(), token.to_owned());
    }
    AppState::new(t.db.clone(), Settings::from_map(&vars).unwrap())
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The sum of the samples of `name` whose labels include `labels` (counters, gauges; for a
/// histogram, its observation count).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            Metric::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count)
                .unwrap_or(0.0),
            Metric::Summary(_) => 0.0,
        })
        .sum()
}

macro_rules! scrape {
    ($app:expr) => {{
        let req = test::TestRequest::get()
            .uri("/metrics")
            .insert_header(("Authorization", format!("Bearer {TOKEN}")))
            .to_request();
        let res = test::call_service(&$app, req).await;
        assert_eq!(res.status().as_u16(), 200);
        let body = test::read_body(res).await;
        parse(std::str::from_utf8(&body).unwrap())
    }};
}

db_test!(
    async fn metrics_are_refused_without_the_token_and_count_calls_and_requests(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        // Off when neither METRICS_TOKEN nor METRICS_BIND_ADDR is set.
        let off = test::init_service(app(state(&t, None))).await;
        let res =
            test::call_service(&off, test::TestRequest::get().uri("/metrics").to_request()).await;
        assert_eq!(res.status().as_u16(), 404);

        let app = test::init_service(app(state(&t, Some(TOKEN)))).await;
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789".to_owned()),
            Some(format!("Basic {TOKEN}")),
        ] {
            let mut req = test::TestRequest::get().uri("/metrics");
            if let Some(a) = auth {
                req = req.insert_header(("Authorization", a));
            }
            let res = test::call_service(&app, req.to_request()).await;
            assert_eq!(res.status().as_u16(), 401);
            let body: Value = test::read_body_json(res).await;
            assert!(body["code"].is_string(), "{body}");
            assert!(!body.to_string().contains(TOKEN));
        }
        let req = test::TestRequest::get()
            .uri("/metrics")
            .insert_header(("Authorization", format!("Bearer {TOKEN}")))
            .to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status().as_u16(), 200);
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "text/plain; version=0.0.4; charset=utf-8"
        );

        // Three tracked calls of a model no other test uses, against a mock provider.
        let probe = format!("metrics-probe-{backend:?}").to_lowercase();
        let mut answer: Value =
            serde_json::from_str(&fixture("providers/openai_success.json")).unwrap();
        answer["model"] = json!(probe);
        let prompt = answer["usage"]["prompt_tokens"].as_f64().unwrap();
        let provider = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .mount(&provider)
            .await;
        let settings = crate::tracker::settings(&[
            ("LLM_PROVIDER", "openai".into()),
            ("OPENAI_BASE_URL", format!("{}/v1", provider.uri())),
        ]);
        let (tracker, _dir) = crate::tracker::new_tracker(&t.db, &settings).await;
        let before = scrape!(app);
        for _ in 0..3 {
            tracker
                .call_and_track(crate::tracker::hello())
                .await
                .unwrap();
        }
        // An HTTP 400 (a malformed query, refused before any handler).
        let res = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/api/v1/admin/token-stats/?granularity=%ZZ")
                .to_request(),
        )
        .await;
        assert_eq!(res.status().as_u16(), 400);
        let after = scrape!(app);
        let call = [
            ("provider", "openai"),
            ("model", probe.as_str()),
            ("outcome", "success"),
        ];
        assert_eq!(value(&before, "llm_tracker_calls_total", &call), 0.0);
        assert_eq!(value(&after, "llm_tracker_calls_total", &call), 3.0);
        let prompt_tokens = [("model", probe.as_str()), ("kind", "prompt")];
        assert_eq!(
            value(&after, "llm_tracker_tokens_total", &prompt_tokens),
            3.0 * prompt
        );
        // Counted by every test of this process too: at least ours.
        let grew = |name: &str, labels: &[(&str, &str)], by: f64| {
            let (b, a) = (value(&before, name, labels), value(&after, name, labels));
            assert!(a - b >= by, "{name} {labels:?}: {b} -> {a}");
        };
        grew("llm_tracker_rows_committed_total", &[], 3.0);
        grew(
            "llm_tracker_call_duration_seconds",
            &[("provider", "openai")],
            3.0,
        );
        grew(
            "llm_tracker_http_requests_total",
            &[
                ("route", "/api/v1/admin/token-stats/"),
                ("method", "GET"),
                ("status", "400"),
            ],
            1.0,
        );
        grew(
            "llm_tracker_http_requests_total",
            &[("route", "/metrics"), ("status", "200")],
            1.0,
        );
        // No raw path, query or token in any label.
        for s in &after.samples {
            for v in s.labels.values() {
                assert!(!v.contains('?') && !v.contains(TOKEN), "{}: {v}", s.metric);
            }
        }
        assert_eq!(
            value(
                &after,
                "llm_tracker_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
        assert!(value(&after, "process_resident_memory_bytes", &[]) > 0.0);
        // Every family the issue names is there, with its help text.
        for family in [
            "llm_tracker_http_requests_total",
            "llm_tracker_http_request_duration_seconds",
            "llm_tracker_calls_total",
            "llm_tracker_call_duration_seconds",
            "llm_tracker_time_to_first_token_seconds",
            "llm_tracker_tokens_total",
            "llm_tracker_rows_committed_total",
            "llm_tracker_rows_spooled_total",
            "llm_tracker_rows_replayed_total",
            "llm_tracker_rows_rejected_total",
            "llm_tracker_spool_rows",
            "llm_tracker_spool_bytes",
            "llm_tracker_rollup_pending_rows",
            "llm_tracker_rollup_fold_duration_seconds",
            "llm_tracker_retention_deleted_rows_total",
            "llm_tracker_db_connections",
            "llm_tracker_build_info",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(after.docs.contains_key(family), "{family} missing");
        }
        tracker.shutdown().await;
    }
);

/// A row the database cannot take goes to the spool: counted, and the background refresh
/// shows the spool's depth and size.
#[actix_web::test]
async fn a_spooled_row_is_counted_and_the_spool_gauges_follow() {
    let dir = tempfile::tempdir().unwrap();
    // A database nobody answers at.
    let url = llm_tracker::config::DatabaseUrl::parse(
        "DATABASE_URL",
        &format!(
            "postgres://postgres@127.0.0.1:{}/none",
            crate::helpers::free_port()
        ),
    )
    .unwrap();
    let db = llm_tracker::db::connect(&url).await.unwrap();
    let mut opts = llm_tracker::tracker::StoreOptions::new(dir.path().join("spool.jsonl"));
    opts.commit_deadline = std::time::Duration::from_millis(200);
    let store = llm_tracker::tracker::UsageStore::open(db.clone(), opts).await;
    let m = llm_tracker::metrics::metrics();
    let spooled = m.rows_spooled.get();
    let mut row = crate::usage_read::row(
        1,
        None,
        "metrics-spool-probe",
        (1, 1, 0, 0),
        true,
        chrono::Utc::now(),
    );
    row.metadata = json!({"provider": "gemini"});
    row.cost = Some(llm_tracker::db::entities::usage::Cost(1_250));
    let stored = store.record(row).await;
    assert!(
        matches!(stored, llm_tracker::tracker::Stored::Deferred),
        "{stored:?}"
    );
    assert!(m.rows_spooled.get() > spooled);
    llm_tracker::server::refresh_metrics_once(&db, &store, std::time::Duration::from_millis(200))
        .await;
    let text = m.render();
    let scrape = parse(&text);
    assert_eq!(value(&scrape, "llm_tracker_spool_rows", &[]), 1.0);
    assert!(value(&scrape, "llm_tracker_spool_bytes", &[]) > 100.0);
    assert_eq!(
        value(
            &scrape,
            "llm_tracker_calls_total",
            &[("model", "metrics-spool-probe"), ("provider", "gemini")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "llm_tracker_cost_usd_total",
            &[("model", "metrics-spool-probe")]
        ),
        0.00125
    );
}

/// `docs/grafana-dashboard.json` is valid JSON and every metric its queries name is one the
/// server exposes (a renamed family would leave a panel empty).
#[actix_web::test]
async fn the_grafana_dashboard_reads_only_families_we_serve() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Families with labels show only once they have a series: record a call first, so the
    // test does not depend on which tests ran before it in this process.
    let mut call =
        crate::usage_read::row(1, None, "gpt-4o", (10, 5, 1, 1), true, chrono::Utc::now());
    call.cost = Some(llm_tracker::db::entities::usage::Cost(100));
    let m = llm_tracker::metrics::metrics();
    m.observe_call(&call);
    m.http_requests
        .with_label_values(&["/healthz", "GET", "200"])
        .inc();
    m.http_duration
        .with_label_values(&["/healthz"])
        .observe(0.001);
    let served = parse(&llm_tracker::metrics::metrics().render()).docs;
    let mut named = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !(word.starts_with("llm_tracker_") || word.starts_with("process_")) {
                    continue;
                }
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                // Histograms are documented under their family name; counters under theirs.
                assert!(
                    served.contains_key(family) || served.contains_key(word),
                    "{word} in {:?} is not served",
                    panel["title"]
                );
                named += 1;
            }
        }
    }
    assert!(named >= 20, "{named}");
}
