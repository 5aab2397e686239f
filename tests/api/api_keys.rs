//! API keys (issue 19 item 1): stored as hashes only; refused when unknown, revoked, expired,
//! of an inactive user or out of scope; `last_used_at` recorded; the admin API, the CLI.

use actix_web::{App, test};
use chrono::{Duration, Utc};
use llm_tracker::api_keys::{self, KeyRef, NewKey, Refused, Scope};
use llm_tracker::auth::jwt::mint_access_token;
use llm_tracker::db::entities::{api_key, auth_user};
use llm_tracker::http::configure;
use llm_tracker::users::{NewUser, create_user};
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, Set};
use serde_json::{Value, json};

use crate::admin_api::state;
use crate::cli::{cmd, stderr, stdout};
use crate::db_test;
use crate::helpers::TestDb;

pub(crate) async fn user(t: &TestDb, name: &str, staff: bool) -> auth_user::Model {
    create_user(
        &t.db,
        NewUser {
            username: name.into(),
            is_staff: staff,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// A new key of `username` with `scopes`, the key itself.
pub(crate) async fn key_for(t: &TestDb, username: &str, scopes: &[Scope]) -> String {
    api_keys::create(&t.db, new_key(username, scopes))
        .await
        .unwrap()
        .key
}

/// A usage store over the test database, its spool in a temporary directory (kept alive by
/// the returned guard).
pub(crate) async fn store_for(
    t: &TestDb,
) -> (
    std::sync::Arc<llm_tracker::tracker::UsageStore>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = llm_tracker::tracker::StoreOptions::new(dir.path().join("spool.jsonl"));
    // Committed before the answer even on a loaded machine: these tests read the rows right
    // after the requests (the 10 ms deadline and the spool have tests of their own).
    opts.commit_deadline = std::time::Duration::from_secs(5);
    let store = llm_tracker::tracker::UsageStore::open(t.db.clone(), opts).await;
    (std::sync::Arc::new(store), dir)
}

fn new_key(username: &str, scopes: &[Scope]) -> NewKey {
    NewKey {
        username: username.into(),
        name: "worker".into(),
        scopes: scopes.iter().copied().collect(),
        lifetime: None,
    }
}

/// Every column of every key row, as text.
async fn stored_text(t: &TestDb) -> String {
    let rows = api_key::Entity::find().all(&t.db).await.unwrap();
    format!("{rows:?}")
}

fn well_formed(key: &str) -> bool {
    regex::Regex::new(r"^ltk_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}$")
        .unwrap()
        .is_match(key)
}

db_test!(
    async fn keys_are_stored_as_hashes_and_refused_unless_valid_for_the_scope(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let owner = user(&t, "svc", false).await;
        let gw = api_keys::create(db, new_key("svc", &[Scope::Gateway]))
            .await
            .unwrap();
        assert!(well_formed(&gw.key), "{}", gw.key);
        assert_eq!(gw.info.prefix, gw.key[..12]);
        assert_eq!(gw.info.scopes, vec![Scope::Gateway]);
        assert_eq!(gw.info.status, "active");
        // Only the hash is at rest: no column holds the key or its secret part.
        let stored = stored_text(&t).await;
        assert!(!stored.contains(&gw.key) && !stored.contains(&gw.key[13..]));
        let row = api_key::Entity::find_by_id(gw.info.id)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.key_hash.len(), 64);
        assert!(row.last_used_at.is_none());

        // The right scope: the key's user, last_used_at set.
        let who = api_keys::authenticate(db, Some(&gw.key), Scope::Gateway)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (who.user_id, who.prefix.as_str(), who.is_staff),
            (owner.id, gw.info.prefix.as_str(), false)
        );
        let used = api_key::Entity::find_by_id(gw.info.id)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        let first_use = used.last_used_at.expect("last_used_at set");
        assert!((Utc::now() - first_use).num_seconds() < 60);
        // Within a minute it is not written again; after it, it is.
        api_keys::authenticate(db, Some(&gw.key), Scope::Gateway)
            .await
            .unwrap()
            .unwrap();
        let again = api_key::Entity::find_by_id(gw.info.id)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.last_used_at, Some(first_use));
        let mut older: api_key::ActiveModel = again.into();
        older.last_used_at = Set(Some(first_use - Duration::minutes(5)));
        older.update(db).await.unwrap();
        api_keys::authenticate(db, Some(&gw.key), Scope::Gateway)
            .await
            .unwrap()
            .unwrap();
        let later = api_key::Entity::find_by_id(gw.info.id)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        assert!(later.last_used_at.unwrap() > first_use - Duration::minutes(5));

        // Refusals.
        let refused = |key: Option<String>, scope: Scope| {
            let db = db.clone();
            async move {
                api_keys::authenticate(&db, key.as_deref(), scope)
                    .await
                    .unwrap()
                    .unwrap_err()
            }
        };
        assert_eq!(refused(None, Scope::Gateway).await, Refused::Missing);
        assert_eq!(
            refused(Some("  ".into()), Scope::Gateway).await,
            Refused::Missing
        );
        assert_eq!(
            refused(Some(gw.key.clone()), Scope::Ingest).await,
            Refused::Scope("ingest")
        );
        let mut tampered = gw.key.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'a' { 'b' } else { 'a' });
        assert_eq!(
            refused(Some(tampered), Scope::Gateway).await,
            Refused::Unknown
        );
        for bad in [
            "ltk_",
            "Bearer x",
            "ltk_\u{e9}\u{e9}\u{e9}\u{e9}_x",
            &gw.key[..40],
        ] {
            assert_eq!(
                refused(Some(bad.into()), Scope::Gateway).await,
                Refused::Unknown,
                "{bad}"
            );
        }
        // Expired.
        let short = api_keys::create(
            db,
            NewKey {
                lifetime: Some(Duration::minutes(1)),
                ..new_key("svc", &Scope::ALL)
            },
        )
        .await
        .unwrap();
        assert!(short.info.expires_at.is_some());
        api_keys::authenticate(db, Some(&short.key), Scope::Ingest)
            .await
            .unwrap()
            .unwrap();
        db.execute_unprepared(&format!(
            "UPDATE llm_tracker_api_key SET expires_at = created_at WHERE id = {}",
            short.info.id
        ))
        .await
        .unwrap();
        assert_eq!(
            refused(Some(short.key.clone()), Scope::Ingest).await,
            Refused::Expired
        );
        // Revoked (by prefix), and revoking again keeps the first time.
        let revoked = api_keys::revoke(db, KeyRef::Prefix(&gw.info.prefix))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked.status, "revoked");
        assert_eq!(
            refused(Some(gw.key.clone()), Scope::Gateway).await,
            Refused::Revoked
        );
        let twice = api_keys::revoke(db, KeyRef::Id(gw.info.id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(twice.revoked_at, revoked.revoked_at);
        assert!(
            api_keys::revoke(db, KeyRef::Prefix("ltk_nothere"))
                .await
                .unwrap()
                .is_none()
        );
        // A deactivated user's keys stop working.
        let other = api_keys::create(db, new_key("svc", &Scope::ALL))
            .await
            .unwrap();
        db.execute_unprepared(&format!(
            "UPDATE auth_user SET is_active = false WHERE id = {}",
            owner.id
        ))
        .await
        .unwrap();
        assert_eq!(
            refused(Some(other.key.clone()), Scope::Gateway).await,
            Refused::Unknown
        );
        // No keys for unknown or inactive users; bad names refused.
        assert!(
            api_keys::create(db, new_key("svc", &[Scope::Gateway]))
                .await
                .is_err()
        );
        assert!(
            api_keys::create(db, new_key("nobody", &[Scope::Gateway]))
                .await
                .is_err()
        );
        user(&t, "svc2", false).await;
        for name in ["", "   ", "a\u{0}b", &"x".repeat(101)] {
            let e = api_keys::create(
                db,
                NewKey {
                    name: name.into(),
                    ..new_key("svc2", &[Scope::Gateway])
                },
            )
            .await;
            assert!(e.is_err(), "{name:?}");
        }
        // Listing: newest first, per user, never the key.
        let all = api_keys::list(db, None).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].id > w[1].id));
        assert_eq!(
            all.iter().map(|k| k.status.as_str()).collect::<Vec<_>>(),
            ["active", "expired", "revoked"]
        );
        assert!(api_keys::list(db, Some("svc2")).await.unwrap().is_empty());
        // Deleting the user deletes its keys.
        db.execute_unprepared(&format!("DELETE FROM auth_user WHERE id = {}", owner.id))
            .await
            .unwrap();
        assert!(api_keys::list(db, None).await.unwrap().is_empty());
    }
);

macro_rules! call {
    ($app:expr, $req:expr) => {{
        let res = test::call_service(&$app, $req.to_request()).await;
        let status = res.status().as_u16();
        let body = test::read_body(res).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, json, text)
    }};
}

db_test!(
    async fn the_admin_api_creates_lists_and_revokes_keys(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let st = state(&t);
        let secret = st.settings.jwt_secret.clone().unwrap();
        let admin = user(&t, "admin", true).await;
        let plain = user(&t, "alice", false).await;
        user(&t, "svc", false).await;
        let token =
            |id: i32| mint_access_token(secret.expose(), id, std::time::Duration::from_secs(600));
        let (admin_token, alice_token) = (token(admin.id), token(plain.id));
        let app = test::init_service(App::new().configure(configure(st))).await;
        let url = "/api/v1/admin/api-keys/";
        let auth = |tok: &str| ("Authorization", format!("Bearer {tok}"));

        // Only staff.
        let (s, _, _) = call!(app, test::TestRequest::get().uri(url));
        assert_eq!(s, 401);
        let (s, _, _) = call!(
            app,
            test::TestRequest::get()
                .uri(url)
                .insert_header(auth(&alice_token))
        );
        assert_eq!(s, 403);
        let (s, _, _) = call!(
            app,
            test::TestRequest::post()
                .uri(url)
                .insert_header(auth(&alice_token))
                .set_json(json!({"username": "svc"}))
        );
        assert_eq!(s, 403);

        // Bad bodies: 400 in the error shape, nothing created.
        for (body, field) in [
            (json!({"username": "nobody"}), "username"),
            (json!({"username": "svc", "scopes": ["admin"]}), "scopes"),
            (json!({"username": "svc", "scopes": []}), "scopes"),
            (
                json!({"username": "svc", "expires_in_days": 0}),
                "expires_in_days",
            ),
            (
                json!({"username": "svc", "expires_in_days": 3651}),
                "expires_in_days",
            ),
            (json!({"username": "svc", "name": ""}), "name"),
        ] {
            let (s, j, _) = call!(
                app,
                test::TestRequest::post()
                    .uri(url)
                    .insert_header(auth(&admin_token))
                    .set_json(&body)
            );
            assert_eq!(s, 400, "{body}");
            assert_eq!(j["code"], "invalid_query", "{j}");
            assert!(j["errors"][field].is_array(), "{body}: {j}");
        }
        for raw in [
            "{",
            "[]",
            "{\"username\": 1}",
            "{\"username\": \"svc\", \"extra\": 1}",
        ] {
            let (s, j, _) = call!(
                app,
                test::TestRequest::post()
                    .uri(url)
                    .insert_header(auth(&admin_token))
                    .insert_header(("Content-Type", "application/json"))
                    .set_payload(raw)
            );
            assert_eq!(s, 400, "{raw}");
            assert!(j["detail"].is_string(), "{raw}: {j}");
        }
        assert_eq!(api_keys::list(&t.db, None).await.unwrap().len(), 0);

        // Create: 201, the key once.
        let (s, created, _) = call!(
            app,
            test::TestRequest::post()
                .uri(url)
                .insert_header(auth(&admin_token))
                .set_json(json!({"username": "svc", "name": "billing worker", "scopes": ["ingest"], "expires_in_days": 90}))
        );
        assert_eq!(s, 201, "{created}");
        let key = created["key"].as_str().unwrap().to_owned();
        assert!(well_formed(&key));
        assert_eq!(created["username"], "svc");
        assert_eq!(created["name"], "billing worker");
        assert_eq!(created["scopes"], json!(["ingest"]));
        assert_eq!(created["status"], "active");
        let expires =
            chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().unwrap()).unwrap();
        assert!(
            (expires.with_timezone(&Utc) - Utc::now() - Duration::days(90))
                .num_seconds()
                .abs()
                < 60
        );
        api_keys::authenticate(&t.db, Some(&key), Scope::Ingest)
            .await
            .unwrap()
            .unwrap();
        // Defaults: both scopes, no expiry.
        let (s, second, _) = call!(
            app,
            test::TestRequest::post()
                .uri(url)
                .insert_header(auth(&admin_token))
                .set_json(json!({"username": " svc "}))
        );
        assert_eq!(s, 201);
        assert_eq!(second["scopes"], json!(["gateway", "ingest"]));
        assert_eq!(second["expires_at"], Value::Null);
        assert_eq!(second["name"], "default");

        // List: both, newest first, never a key or a hash.
        let (s, list, text) = call!(
            app,
            test::TestRequest::get()
                .uri(url)
                .insert_header(auth(&admin_token))
        );
        assert_eq!(s, 200);
        assert_eq!(list["count"], 2);
        assert_eq!(list["results"][0]["id"], second["id"]);
        assert!(list["results"][1]["last_used_at"].is_string());
        assert!(!text.contains(&key) && !text.contains(&key[13..]) && !text.contains("key_hash"));
        let (_, only, _) = call!(
            app,
            test::TestRequest::get()
                .uri("/api/v1/admin/api-keys/?username=alice")
                .insert_header(auth(&admin_token))
        );
        assert_eq!(only["count"], 0);

        // Revoke: 200 with the key revoked; unknown 404, not an id 400.
        let id = created["id"].as_i64().unwrap();
        let (s, revoked, _) = call!(
            app,
            test::TestRequest::delete()
                .uri(&format!("{url}{id}/"))
                .insert_header(auth(&admin_token))
        );
        assert_eq!(s, 200);
        assert_eq!(revoked["status"], "revoked");
        assert_eq!(
            api_keys::authenticate(&t.db, Some(&key), Scope::Ingest)
                .await
                .unwrap(),
            Err(Refused::Revoked)
        );
        let (s, _, _) = call!(
            app,
            test::TestRequest::delete()
                .uri(&format!("{url}99999/"))
                .insert_header(auth(&admin_token))
        );
        assert_eq!(s, 404);
        let (s, j, _) = call!(
            app,
            test::TestRequest::delete()
                .uri(&format!("{url}abc/"))
                .insert_header(auth(&admin_token))
        );
        assert_eq!((s, j["errors"]["id"].is_array()), (400, true));
        let (s, _, _) = call!(
            app,
            test::TestRequest::delete()
                .uri(&format!("{url}{id}/"))
                .insert_header(auth(&alice_token))
        );
        assert_eq!(s, 403);
    }
);

db_test!(
    async fn the_cli_creates_a_key_printed_once_lists_and_revokes_it(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        user(&t, "svc", false).await;
        // Bad arguments: one line, nothing written.
        for args in [
            vec!["key", "create", "--username", "svc", "--scopes", "admin"],
            vec!["key", "create", "--username", "svc", "--expires", "soon"],
            vec!["key", "create", "--username", "nobody"],
        ] {
            let o = cmd(&t, &args, &[]);
            assert!(!o.status.success(), "{args:?}");
            assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
        }
        assert!(api_keys::list(&t.db, None).await.unwrap().is_empty());

        let o = cmd(
            &t,
            &[
                "key",
                "create",
                "--username",
                "svc",
                "--name",
                "etl",
                "--scopes",
                "ingest",
                "--expires",
                "90d",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let key = out.trim_end_matches('\n');
        assert!(well_formed(key) && out.lines().count() == 1, "{out:?}");
        assert!(stderr(&o).contains(&key[..12]) && !stderr(&o).contains(&key[13..]));
        api_keys::authenticate(&t.db, Some(key), Scope::Ingest)
            .await
            .unwrap()
            .unwrap();

        let o = cmd(&t, &["key", "list", "--username", "svc"], &[]);
        assert!(o.status.success());
        let listed = stdout(&o);
        assert!(listed.contains(&key[..12]) && listed.contains("etl") && listed.contains("active"));
        assert!(!listed.contains(&key[13..]));

        let o = cmd(&t, &["key", "revoke", &key[..12]], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&cmd(&t, &["key", "list"], &[])).contains("revoked"));
        assert_eq!(
            api_keys::authenticate(&t.db, Some(key), Scope::Ingest)
                .await
                .unwrap(),
            Err(Refused::Revoked)
        );
        let o = cmd(&t, &["key", "revoke", "ltk_nothere"], &[]);
        assert!(!o.status.success());
    }
);
