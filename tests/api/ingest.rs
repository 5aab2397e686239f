//! The ingest API (issue 19 item 3, SPEC-style contract in the README): rows from any language,
//! stored once by id, checked one by one, through the tracker's never-lose write path.

use std::sync::Arc;

use actix_web::{App, test};
use chrono::{Duration, SubsecRound, Utc};
use llm_tracker::api_keys::{self, KeyRef, Scope};
use llm_tracker::db::entities::usage;
use llm_tracker::http::configure;
use llm_tracker::tracker::{StoreOptions, UsageStore};
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::admin_api::state;
use crate::db_test;
use crate::helpers::{Backend, TestDb};

async fn user(t: &TestDb, name: &str, staff: bool) -> i32 {
    crate::api_keys::user(t, name, staff).await.id
}

async fn key(t: &TestDb, username: &str, scopes: &[Scope]) -> String {
    crate::api_keys::key_for(t, username, scopes).await
}

fn row(id: Uuid, model: &str, minutes_ago: i64) -> Value {
    let end = Utc::now().trunc_subsecs(6) - Duration::minutes(minutes_ago);
    json!({
        "id": id, "model": model, "prompt_tokens": 1000, "completion_tokens": 200,
        "cached_tokens": 100, "reasoning_tokens": 50, "success": true,
        "metadata": {"node_name": "py-worker"},
        "started_at": (end - Duration::milliseconds(1500)).to_rfc3339(),
        "created_at": end.to_rfc3339(),
    })
}

async fn stored(t: &TestDb) -> u64 {
    usage::Entity::find().count(&t.db).await.unwrap()
}

macro_rules! post {
    ($app:expr, $key:expr, $body:expr) => {{
        let mut req = test::TestRequest::post()
            .uri("/api/v1/usage/")
            .insert_header(("content-type", "application/json"))
            .set_payload($body.to_string());
        if let Some(k) = $key {
            req = req.insert_header(("authorization", format!("Bearer {k}")));
        }
        let res = test::call_service(&$app, req.to_request()).await;
        let status = res.status().as_u16();
        let body: Value =
            serde_json::from_slice(&test::read_body(res).await).unwrap_or(Value::Null);
        (status, body)
    }};
}

db_test!(
    async fn ingested_rows_are_checked_one_by_one_stored_once_and_counted(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let svc = user(&t, "svc", false).await;
        let admin = user(&t, "ops", true).await;
        let other = user(&t, "alice", false).await;
        let ingest_key = key(&t, "svc", &[Scope::Ingest]).await;
        let gateway_key = key(&t, "svc", &[Scope::Gateway]).await;
        let staff_key = key(&t, "ops", &[Scope::Ingest]).await;
        let (store, _spool) = crate::api_keys::store_for(&t).await;
        let app = test::init_service(
            App::new().configure(configure(state(&t).with_store(store.clone()))),
        )
        .await;

        // Keys: missing, wrong scope, unknown, revoked.
        let body = json!({"rows": [row(Uuid::new_v4(), "gpt-4o", 5)]});
        let (s, j) = post!(app, None::<&str>, &body);
        assert_eq!((s, j["code"].as_str()), (401, Some("not_authenticated")));
        let (s, j) = post!(app, Some(&gateway_key), &body);
        assert_eq!((s, j["code"].as_str()), (403, Some("permission_denied")));
        let (s, j) = post!(
            app,
            Some("ltk_AAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"),
            &body
        );
        assert_eq!((s, j["code"].as_str()), (401, Some("key_not_valid")));
        assert!(!j.to_string().contains("BBBBBBBB"), "the key is not echoed");
        let revoked = key(&t, "svc", &[Scope::Ingest]).await;
        api_keys::revoke(&t.db, KeyRef::Prefix(&revoked[..12]))
            .await
            .unwrap();
        let (s, j) = post!(app, Some(&revoked), &body);
        assert_eq!((s, j["code"].as_str()), (401, Some("key_revoked")));

        // Envelopes: not JSON, no rows, 1,001 rows: nothing stored.
        for (raw, want) in [
            ("{".to_string(), 400),
            ("{\"rows\": []}".to_string(), 400),
            ("{\"rows\": {}}".to_string(), 400),
            (
                json!({"rows": vec![row(Uuid::new_v4(), "gpt-4o", 1); 1001]}).to_string(),
                413,
            ),
        ] {
            let (s, j) = post!(app, Some(&ingest_key), raw);
            assert_eq!(s, want, "{j}");
            assert!(j["detail"].is_string() && j["code"].is_string(), "{j}");
        }
        assert_eq!(stored(&t).await, 0);

        // A mixed batch: three good rows (one repeated), two bad ones.
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut priced = row(c, "gpt-4o-mini", 3);
        priced["cost"] = json!("0.000500");
        let mut failed = row(b, "gemini-2.5-flash", 4);
        failed["success"] = json!(false);
        failed["error"] = json!("upstream 503");
        failed["first_chunk_at"] = failed["created_at"].clone();
        let mut bad_tokens = row(Uuid::new_v4(), "gpt-4o", 2);
        bad_tokens["prompt_tokens"] = json!(-5);
        bad_tokens["created_at"] = json!("yesterday");
        let mut foreign = row(Uuid::new_v4(), "gpt-4o", 2);
        foreign["user_id"] = json!(other);
        let batch = json!({"rows": [row(a, "gpt-4o", 5), failed, bad_tokens, priced, row(a, "gpt-4o", 5), foreign]});
        let (s, j) = post!(app, Some(&ingest_key), &batch);
        assert_eq!(s, 200, "{j}");
        let ids = |v: &Value| {
            let mut out: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect();
            out.sort();
            out
        };
        let mut want = vec![a.to_string(), b.to_string(), c.to_string()];
        want.sort();
        assert_eq!(ids(&j["stored"]), want);
        assert_eq!(ids(&j["duplicates"]), vec![a.to_string()]);
        assert_eq!(j["spooled"], json!([]));
        let refused = j["refused"].as_array().unwrap();
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0]["index"], 2);
        assert!(
            refused[0]["errors"]["prompt_tokens"].is_array()
                && refused[0]["errors"]["created_at"].is_array(),
            "{j}"
        );
        assert_eq!(refused[1]["index"], 5);
        assert!(refused[1]["errors"]["user_id"].is_array(), "{j}");
        assert_eq!(stored(&t).await, 3);

        // What was stored: the key's user, the prefix, the price, the given cost.
        let got = |id: Uuid| {
            let db = t.db.clone();
            // Every row, then the one (find_by_id binds the PostgreSQL form of the id).
            async move {
                usage::Entity::find()
                    .all(&db)
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|r| r.id.0 == id)
                    .expect("stored")
            }
        };
        let ra = got(a).await;
        assert_eq!(ra.user_id, Some(svc));
        assert_eq!(ra.metadata["api_key"], ingest_key[..12]);
        assert_eq!(ra.metadata["source_type"], "ingest");
        assert_eq!(ra.metadata["node_name"], "py-worker");
        assert_eq!(
            (ra.prompt_tokens, ra.total_tokens, ra.cached_tokens),
            (1000, 1200, 100)
        );
        let want_cost = llm_tracker::pricing::PriceTable::builtin().cost_micros(
            "gpt-4o",
            llm_tracker::pricing::Tokens {
                prompt: 1000,
                completion: 200,
                cached: 100,
                reasoning: 50,
            },
        );
        assert_eq!(ra.cost.map(|c| c.0), want_cost);
        assert!(ra.cost.is_some());
        assert_eq!(got(c).await.cost, Some(usage::Cost(500)));
        let rb = got(b).await;
        assert!(!rb.success && rb.error.as_deref() == Some("upstream 503"));
        // Issue 20: a first chunk makes the row a streamed one, in the columns.
        assert!(rb.is_streaming);
        assert_eq!(rb.first_chunk_at, Some(rb.created_at));
        assert!(rb.metadata.get("first_chunk_at").is_none());
        assert!(!got(a).await.is_streaming);

        // Sent again: all duplicates, nothing new.
        let again = json!({"rows": [row(a, "gpt-4o", 5), row(b, "gemini-2.5-flash", 4)]});
        let (s, j) = post!(app, Some(&ingest_key), &again);
        assert_eq!(s, 200);
        assert_eq!(j["stored"], json!([]));
        assert_eq!(j["duplicates"].as_array().unwrap().len(), 2);
        assert_eq!(stored(&t).await, 3);

        // A staff key may record for another existing user, not a missing one.
        let (d, missing) = (Uuid::new_v4(), Uuid::new_v4());
        let mut for_alice = row(d, "gpt-4o", 1);
        for_alice["user_id"] = json!(other);
        let mut for_nobody = row(missing, "gpt-4o", 1);
        for_nobody["user_id"] = json!(999_999);
        let (s, j) = post!(
            app,
            Some(&staff_key),
            json!({"rows": [for_alice, for_nobody, row(Uuid::new_v4(), "o4-mini", 1)]})
        );
        assert_eq!(s, 200, "{j}");
        assert_eq!(j["stored"].as_array().unwrap().len(), 2);
        assert_eq!(j["refused"][0]["errors"]["user_id"][0], "no such user");
        assert_eq!(got(d).await.user_id, Some(other));
        assert_eq!(stored(&t).await, 5);
        let _ = admin;

        // The statistics count ingested rows like tracked ones.
        store.shutdown().await;
        llm_tracker::usage::rollup::fold(&t.db).await.unwrap();
        let stats = llm_tracker::usage::stats::token_stats(&t.db, &Default::default(), None)
            .await
            .unwrap();
        assert_eq!(stats.summary.total_calls, 5);
        crate::rollup::assert_verified(&t.db).await;
    }
);

/// With the database unreachable, a key that authenticated in the last minutes still works and
/// the rows are spooled, then stored once when it is back.
mod ingest_spools_rows_while_the_database_is_down {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        user(&t, "svc", false).await;
        let k = key(&t, "svc", &[Scope::Ingest]).await;
        let (proxy, db) = crate::helpers::ToggleProxy::in_front_of(&t).await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = StoreOptions::new(dir.path().join("spool.jsonl"));
        opts.fold_interval = None;
        let store = Arc::new(UsageStore::open(db.clone(), opts).await);
        let mut st = state(&t);
        st.db = db.clone();
        st.read_db = db.clone();
        let app =
            test::init_service(App::new().configure(configure(st.with_store(store.clone())))).await;
        let first = Uuid::new_v4();
        let (s, j) = post!(app, Some(&k), json!({"rows": [row(first, "gpt-4o", 2)]}));
        assert_eq!((s, j["spooled"].clone()), (200, json!([])), "{j}");

        proxy.set_up(false);
        let down: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let rows: Vec<Value> = down.iter().map(|id| row(*id, "gpt-4o", 1)).collect();
        let (s, j) = post!(app, Some(&k), json!({"rows": rows}));
        assert_eq!(s, 200, "{j}");
        assert_eq!(j["stored"].as_array().unwrap().len(), 3, "{j}");
        assert_eq!(j["spooled"].as_array().unwrap().len(), 3, "{j}");
        assert_eq!(stored(&t).await, 1);
        // An unknown key is not let in by the outage.
        let (s, _) = post!(
            app,
            Some("ltk_AAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"),
            json!({"rows": [row(Uuid::new_v4(), "gpt-4o", 1)]})
        );
        assert_eq!(s, 503);

        proxy.set_up(true);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while stored(&t).await < 4 && std::time::Instant::now() < deadline {
            let _ = store.flush().await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(stored(&t).await, 4);
        // Sent again after the outage: duplicates, stored once.
        let (s, j) = post!(
            app,
            Some(&k),
            json!({"rows": down.iter().map(|id| row(*id, "gpt-4o", 1)).collect::<Vec<_>>()})
        );
        assert_eq!(s, 200);
        assert_eq!(j["duplicates"].as_array().unwrap().len(), 3, "{j}");
        assert_eq!(stored(&t).await, 4);
        store.shutdown().await;
        let _ = t.db.execute_unprepared("SELECT 1").await;
    }
}
