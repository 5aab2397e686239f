//! Issue 2, item 3: a database created by Django (its own DDL, its own rows) survives our
//! migrations unchanged, and our entities read and write its rows. Required on PostgreSQL.

use std::collections::BTreeMap;

use llm_tracker::auth::password::check_password;
use llm_tracker::db::entities::{auth_user, usage};
use llm_tracker::users::{NewUser, create_user};
use migration::{Migrator, MigratorTrait};
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, QueryOrder, Statement};
use serde_json::json;

use crate::helpers::{Backend, TestDb, fixture};

const DJANGO_USER_INSERT: &str = "INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined) VALUES ";
const DJANGO_USAGE_INSERT: &str = "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, success, error, metadata, created_at, user_id) VALUES ";

/// One column as information_schema describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    data_type: String,
    max_length: Option<i32>,
    nullable: bool,
    default: Option<String>,
}

async fn columns(t: &TestDb, table: &str) -> BTreeMap<String, Column> {
    let rows =
        t.db.query_all_raw(Statement::from_sql_and_values(
            t.db_backend(),
            "SELECT column_name::text, data_type::text, character_maximum_length::int4, \
             is_nullable::text, column_default::text \
             FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1",
            [table.into()],
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let name: String = r.try_get_by_index(0).unwrap();
            let column = Column {
                data_type: r.try_get_by_index(1).unwrap(),
                max_length: r.try_get_by_index(2).unwrap(),
                nullable: r.try_get_by_index::<String>(3).unwrap() == "YES",
                default: r.try_get_by_index(4).unwrap(),
            };
            (name, column)
        })
        .collect()
}

async fn indexes(t: &TestDb) -> Vec<String> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db_backend(),
            "SELECT indexdef::text FROM pg_indexes WHERE schemaname = 'public' AND tablename IN ('auth_user', 'llm_tracker_usage') ORDER BY 1",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect()
}

async fn constraints(t: &TestDb) -> Vec<String> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db_backend(),
            "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid IN ('auth_user'::regclass, 'llm_tracker_usage'::regclass) ORDER BY 1",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect()
}

/// The given columns of every row, as JSON text, in id order.
async fn rows_as_json(t: &TestDb, table: &str, cols: &[&String]) -> String {
    let list = cols
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT COALESCE(json_agg(json_build_array({list}) ORDER BY id)::text, '[]') FROM {table}"
    );
    let row =
        t.db.query_one_raw(Statement::from_string(t.db_backend(), sql))
            .await
            .unwrap()
            .unwrap();
    row.try_get_by_index(0).unwrap()
}

pub(crate) async fn exec(t: &TestDb, sql: &str) {
    t.db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn insert_django_rows(t: &TestDb) {
    let hash =
        "pbkdf2_sha256$1000000$Qm9vdHN0cmFwU2FsdA$cr/JHnsF3Lhf5XCW8Vyc4tCmuI3J1pCieEWUESmRwgY=";
    exec(t, &format!("{DJANGO_USER_INSERT}('{hash}', NULL, false, 'admin', 'Ada', 'Min', 'a@example.com', true, true, '2024-01-01 00:00:00+00')")).await;
    exec(t, &format!("{DJANGO_USER_INSERT}('!unusable', '2024-02-01 10:00:00.5+00', false, 'alice', '', '', '', false, true, '2024-01-02 00:00:00+00')")).await;
    exec(t, &format!("{DJANGO_USAGE_INSERT}('6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11', 'gpt-4o', 10, 5, 15, 0, 0, true, NULL, '{{\"node_name\": \"interpret\"}}', '2025-01-31 10:00:00.123456+00', 2)")).await;
    exec(t, &format!("{DJANGO_USAGE_INSERT}('00000000-0000-4000-8000-000000000002', 'gemini-2.5-flash', 2048, 420, 2468, 1536, 384, false, 'LLM returned empty response', '{{}}', '2025-02-01 00:00:00+00', NULL)")).await;
    exec(t, &format!("{DJANGO_USAGE_INSERT}('00000000-0000-4000-8000-000000000003', 'o4-mini', 1, 2, 3, 0, 1, true, NULL, '{{\"source_type\": \"task\", \"caller\": {{\"k\": [1, 2]}}}}', '2025-02-02 23:59:59.999999+00', 1)")).await;
}

mod django_tables_survive_our_migrations_and_stay_usable {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::empty(Backend::Postgres).await;
        exec(&t, &fixture("django/postgres_ddl.sql")).await;
        insert_django_rows(&t).await;

        let users_before = columns(&t, "auth_user").await;
        let usage_before = columns(&t, "llm_tracker_usage").await;
        let indexes_before = indexes(&t).await;
        let constraints_before = constraints(&t).await;
        let user_cols: Vec<&String> = users_before.keys().collect();
        let usage_cols: Vec<&String> = usage_before.keys().collect();
        let users_json = rows_as_json(&t, "auth_user", &user_cols).await;
        let usage_json = rows_as_json(&t, "llm_tracker_usage", &usage_cols).await;

        llm_tracker::db::migrate(&t.db)
            .await
            .expect("migrate over Django's tables");

        // No Django column changed; every added column is nullable or defaulted.
        for (before, table) in [
            (&users_before, "auth_user"),
            (&usage_before, "llm_tracker_usage"),
        ] {
            let after = columns(&t, table).await;
            for (name, column) in before {
                assert_eq!(after.get(name), Some(column), "{table}.{name} changed");
            }
            for (name, column) in after.iter().filter(|(n, _)| !before.contains_key(*n)) {
                assert!(
                    column.nullable || column.default.is_some(),
                    "added column {table}.{name} would break Django's inserts: {column:?}"
                );
            }
        }
        // Django's indexes and constraints are all still there, unchanged.
        let indexes_after = indexes(&t).await;
        for index in &indexes_before {
            assert!(indexes_after.contains(index), "index lost: {index}");
        }
        assert!(
            indexes_after
                .iter()
                .any(|i| i.contains("(user_id, created_at)"))
        );
        assert!(
            indexes_after
                .iter()
                .any(|i| i.contains("(model, created_at)"))
        );
        assert_eq!(constraints(&t).await, constraints_before);
        // No row changed.
        assert_eq!(rows_as_json(&t, "auth_user", &user_cols).await, users_json);
        assert_eq!(
            rows_as_json(&t, "llm_tracker_usage", &usage_cols).await,
            usage_json
        );

        // Our entities read Django's rows (integer ids, jsonb, uuid, timestamptz).
        let users = auth_user::Entity::find()
            .order_by_asc(auth_user::Column::Id)
            .all(&t.db)
            .await
            .unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].username, "admin");
        assert!(check_password("s3cret-Pass", &users[0].password));
        assert_eq!(
            users[1].last_login.unwrap().to_rfc3339(),
            "2024-02-01T10:00:00.500+00:00"
        );
        let rows = usage::Entity::find()
            .order_by_asc(usage::Column::CreatedAt)
            .all(&t.db)
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0].id.to_string(),
            "6f1c2a0e-8d4b-4c36-9a57-0e0f8b7b1c11"
        );
        assert_eq!(rows[0].user_id, Some(2));
        assert_eq!(rows[0].metadata, json!({"node_name": "interpret"}));
        assert_eq!(
            rows[0].created_at.to_rfc3339(),
            "2025-01-31T10:00:00.123456+00:00"
        );
        assert_eq!(
            (
                rows[1].cached_tokens,
                rows[1].reasoning_tokens,
                rows[1].success
            ),
            (1536, 384, false)
        );
        assert_eq!(
            rows[2].metadata,
            json!({"source_type": "task", "caller": {"k": [1, 2]}})
        );

        // ... and write rows Django can read, next to rows Django itself still writes.
        let mine = create_user(
            &t.db,
            NewUser {
                username: "ours".into(),
                ..Default::default()
            },
        )
        .await
        .expect("create user in Django's table");
        assert_eq!(mine.id, 3, "identity sequence continues after Django's ids");
        let mut row = rows[0].clone();
        row.id = uuid::Uuid::new_v4().into();
        row.user_id = Some(mine.id);
        usage::ActiveModel::from(row)
            .insert(&t.db)
            .await
            .expect("entity insert");
        exec(&t, &format!("{DJANGO_USAGE_INSERT}('00000000-0000-4000-8000-000000000004', 'gpt-4o', 1, 1, 2, 0, 0, true, NULL, '{{}}', now(), 1)")).await;
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            5
        );

        // Rolling our migrations back never drops the tables Django owns.
        Migrator::down(&t.db, None).await.expect("down");
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            5
        );
        assert_eq!(t.scalar_i64("SELECT COUNT(*) FROM auth_user").await, 3);
        assert_eq!(indexes(&t).await, indexes_before);
    }
}

mod our_schema_has_djangos_column_types {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let django = TestDb::empty(Backend::Postgres).await;
        exec(&django, &fixture("django/postgres_ddl.sql")).await;
        let ours = TestDb::migrated(Backend::Postgres).await;
        for table in ["auth_user", "llm_tracker_usage"] {
            let theirs = columns(&django, table).await;
            let mine = columns(&ours, table).await;
            for (name, column) in &theirs {
                let m = mine
                    .get(name)
                    .unwrap_or_else(|| panic!("{table}.{name} missing"));
                assert_eq!(
                    (&m.data_type, m.max_length, m.nullable),
                    (&column.data_type, column.max_length, column.nullable),
                    "{table}.{name}"
                );
            }
            for (name, column) in mine.iter().filter(|(n, _)| !theirs.contains_key(*n)) {
                assert!(
                    column.nullable || column.default.is_some(),
                    "{table}.{name}"
                );
            }
        }
    }
}
