//! SPEC §2: the migrator builds both tables on both backends, idempotently and reversibly.

use chrono::{SubsecRound, TimeZone, Utc};
use llm_tracker::db::entities::{auth_user, usage};
use llm_tracker::users::{NewUser, create_user};
use migration::{Migrator, MigratorTrait};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveModelTrait, EntityTrait, ModelTrait, QueryFilter, Set};
use serde_json::json;

use crate::db_test;
use crate::helpers::{Backend, TestDb};

const OUR_TABLES: [&str; 2] = ["auth_user", "llm_tracker_usage"];

fn has_all(tables: &[String]) -> bool {
    OUR_TABLES.iter().all(|t| tables.iter().any(|x| x == t))
}

fn has_none(tables: &[String]) -> bool {
    OUR_TABLES.iter().all(|t| !tables.iter().any(|x| x == t))
}

db_test!(
    async fn migrations_go_up_down_and_up_again(backend: Backend) {
        let t = TestDb::empty(backend).await;
        assert!(has_none(&t.tables().await));

        Migrator::up(&t.db, None).await.expect("up");
        assert!(
            has_all(&t.tables().await),
            "after up: {:?}",
            t.tables().await
        );

        Migrator::down(&t.db, None).await.expect("down");
        assert!(
            has_none(&t.tables().await),
            "after down: {:?}",
            t.tables().await
        );

        Migrator::up(&t.db, None).await.expect("up again");
        assert!(has_all(&t.tables().await));
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            0
        );
    }
);

db_test!(
    async fn migrating_twice_changes_nothing(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let user = create_user(
            &t.db,
            NewUser {
                username: "keep".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        llm_tracker::db::migrate(&t.db)
            .await
            .expect("second migrate");
        assert!(
            auth_user::Entity::find_by_id(user.id)
                .one(&t.db)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            Migrator::get_pending_migrations(&t.db)
                .await
                .unwrap()
                .is_empty()
        );
    }
);

db_test!(
    async fn usage_rows_round_trip_and_lose_their_user_on_delete(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let user = create_user(
            &t.db,
            NewUser {
                username: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let row = usage::Model {
            id: uuid::Uuid::new_v4().into(),
            user_id: Some(user.id),
            model: "gpt-4o-mini-2024-07-18".into(),
            prompt_tokens: 2048,
            completion_tokens: 420,
            total_tokens: 2468,
            cached_tokens: 1536,
            reasoning_tokens: 384,
            success: false,
            error: Some("LLM returned empty response".into()),
            metadata: json!({"node_name": "interpret", "nested": {"ü": [1, 2.5, null]}}),
            created_at: Utc::now().trunc_subsecs(6),
            started_at: Some(Utc::now().trunc_subsecs(6) - chrono::Duration::milliseconds(1500)),
            cost: Some(usage::Cost(1_234_567)),
            cost_currency: "USD".into(),
            is_streaming: false,
            first_chunk_at: None,
        };
        usage::insert_rows(&t.db, std::slice::from_ref(&row))
            .await
            .expect("insert");
        // The cost column holds the successor's numeric(12,6) USD on PostgreSQL and exact
        // integer micro-dollars on SQLite (issue 5).
        let stored = match backend {
            Backend::Postgres => "SELECT cost::text FROM llm_tracker_usage",
            Backend::Sqlite => "SELECT typeof(cost) || ':' || cost FROM llm_tracker_usage",
        };
        let stored = t.scalar_string(stored).await;
        match backend {
            Backend::Postgres => assert_eq!(stored, "1.234567"),
            Backend::Sqlite => assert_eq!(stored, "integer:1234567"),
        }
        let back = usage::Entity::find()
            .filter(
                Expr::col(usage::Column::Id)
                    .eq(llm_tracker::db::Dialect::of(t.db.get_database_backend()).uuid(row.id.0)),
            )
            .one(&t.db)
            .await
            .unwrap()
            .expect("row");
        assert_eq!(back, row);

        // Nulls, quotes, a NUL-free control character, nanoseconds (cut to microseconds, as a
        // bound datetime is) and the largest cost through the batch insert, which on
        // PostgreSQL sends the rows as one JSON parameter; a second insert of the same id
        // stores nothing and returns nothing.
        let at = Utc.with_ymd_and_hms(2026, 3, 29, 1, 59, 59).unwrap()
            + chrono::Duration::nanoseconds(999_999_999);
        let odd = usage::Model {
            id: uuid::Uuid::new_v4().into(),
            user_id: None,
            model: "o'brien \"quoted\" \\ model".into(),
            prompt_tokens: i32::MAX,
            completion_tokens: 0,
            total_tokens: i32::MAX,
            cached_tokens: 0,
            reasoning_tokens: 0,
            success: true,
            error: Some("line\nbreak\ttab \u{1} é 𝄞".into()),
            metadata: json!({"big": 9_007_199_254_740_993_i64, "f": 0.1, "s": "\u{1}", "a": []}),
            created_at: at,
            started_at: None,
            cost: Some(usage::Cost(999_999_999_999)),
            cost_currency: "EUR".into(),
            is_streaming: false,
            first_chunk_at: None,
        };
        let first = usage::insert_rows_returning(&t.db, std::slice::from_ref(&odd))
            .await
            .unwrap();
        assert_eq!(first, vec![odd.id.0]);
        let again = usage::insert_rows_returning(&t.db, std::slice::from_ref(&odd))
            .await
            .unwrap();
        assert!(again.is_empty());
        let back = usage::Entity::find()
            .filter(
                Expr::col(usage::Column::Id)
                    .eq(llm_tracker::db::Dialect::of(t.db.get_database_backend()).uuid(odd.id.0)),
            )
            .one(&t.db)
            .await
            .unwrap()
            .expect("row");
        let mut expected = odd.clone();
        expected.created_at = at.trunc_subsecs(6);
        assert_eq!(back, expected);
        usage::Entity::delete_many()
            .filter(
                Expr::col(usage::Column::Id)
                    .eq(llm_tracker::db::Dialect::of(t.db.get_database_backend()).uuid(odd.id.0)),
            )
            .exec(&t.db)
            .await
            .unwrap();

        // SPEC §2: user_id is ON DELETE SET NULL (SQLite needs foreign keys switched on).
        user.delete(&t.db).await.expect("delete user");
        let back = usage::Entity::find()
            .filter(
                Expr::col(usage::Column::Id)
                    .eq(llm_tracker::db::Dialect::of(t.db.get_database_backend()).uuid(row.id.0)),
            )
            .one(&t.db)
            .await
            .unwrap()
            .expect("row");
        assert_eq!(back.user_id, None);
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            1
        );
    }
);

db_test!(
    async fn usage_rows_need_an_existing_user(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let orphan = usage::ActiveModel {
            id: Set(uuid::Uuid::new_v4().into()),
            user_id: Set(Some(999_999)),
            model: Set("m".into()),
            prompt_tokens: Set(0),
            completion_tokens: Set(0),
            total_tokens: Set(0),
            cached_tokens: Set(0),
            reasoning_tokens: Set(0),
            success: Set(true),
            error: Set(None),
            metadata: Set(json!({})),
            created_at: Set(Utc::now()),
            started_at: Set(None),
            cost: Set(None),
            cost_currency: Set("USD".into()),
            is_streaming: Set(false),
            first_chunk_at: Set(None),
        };
        assert!(
            orphan.insert(&t.db).await.is_err(),
            "foreign key not enforced"
        );
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            0
        );
    }
);

db_test!(
    async fn the_spec_indexes_exist(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let sql = match backend {
            Backend::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'llm_tracker_usage' AND name IN ('llm_tracker_usage_created_at_f9de3faa', 'llm_tracker_usage_user_created_idx', 'llm_tracker_usage_model_created_idx')"
            }
            Backend::Postgres => {
                // The `(user_id, created_at)` index carries payload columns since migration
                // 000033 (`INCLUDE (…)`): its keys are the SPEC's.
                "SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'llm_tracker_usage' AND (indexdef IN ('CREATE INDEX llm_tracker_usage_created_at_f9de3faa ON public.llm_tracker_usage USING btree (created_at)', 'CREATE INDEX llm_tracker_usage_model_created_idx ON public.llm_tracker_usage USING btree (model, created_at)') OR indexdef LIKE 'CREATE INDEX llm_tracker_usage_user_created_idx ON public.llm_tracker_usage USING btree (user_id, created_at) INCLUDE (%')"
            }
        };
        assert_eq!(t.scalar_i64(sql).await, 3);
    }
);

/// SQLite is opened in WAL mode with a busy timeout and foreign keys on (issue 2, item 5).
mod sqlite_connection_uses_wal_busy_timeout_and_foreign_keys {
    use super::*;

    #[actix_web::test]
    async fn sqlite() {
        let t = TestDb::migrated(Backend::Sqlite).await;
        let mode = {
            use sea_orm::{ConnectionTrait, Statement};
            let row =
                t.db.query_one_raw(Statement::from_string(
                    t.db_backend(),
                    "PRAGMA journal_mode",
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get_by_index::<String>(0).unwrap()
        };
        assert_eq!(mode.to_lowercase(), "wal");
        assert_eq!(t.scalar_i64("PRAGMA busy_timeout").await, 5000);
        assert_eq!(t.scalar_i64("PRAGMA foreign_keys").await, 1);
        // The page cache (issue 17, item 11): SQLITE_CACHE_MIB (default 16) shared out between
        // the pool's 4 connections, in KiB (negative).
        assert_eq!(t.scalar_i64("PRAGMA cache_size").await, -4096);
        let bigger = llm_tracker::db::connect_with(&t.url, 64).await.unwrap();
        let row = {
            use sea_orm::{ConnectionTrait, Statement};
            bigger
                .query_one_raw(Statement::from_string(t.db_backend(), "PRAGMA cache_size"))
                .await
                .unwrap()
                .unwrap()
        };
        assert_eq!(row.try_get_by_index::<i64>(0).unwrap(), -16384);
    }
}

/// Migration 000009: the usage and rollup tables have planner statistics when `migrate`
/// returns (PostgreSQL marks a never-analyzed table with `reltuples = -1`), so the first
/// token-stats request is as fast as the later ones.
mod the_usage_and_rollup_tables_are_analyzed_when_migrate_returns {
    use crate::helpers::{Backend, TestDb};

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::empty(Backend::Postgres).await;
        // Rows the Django app wrote before our migrations (the backfill fills the rollup).
        <migration::Migrator as migration::MigratorTrait>::up(&t.db, Some(2))
            .await
            .unwrap();
        let rows: Vec<_> = (0..300u128)
            .map(|n| {
                crate::usage_read::row(
                    n,
                    None,
                    "gpt-4o-mini",
                    (10, 5, 0, 0),
                    true,
                    crate::usage_read::at("2026-11-01T10:00:00Z")
                        + chrono::Duration::minutes(n as i64),
                )
            })
            .collect();
        for r in &rows {
            sea_orm::ConnectionTrait::execute_unprepared(
                &t.db,
                &format!(
                    "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, \
                     total_tokens, cached_tokens, reasoning_tokens, success, metadata, created_at) \
                     VALUES ('{}', 'gpt-4o-mini', 10, 5, 15, 0, 0, true, '{{}}', '{}')",
                    r.id,
                    r.created_at.to_rfc3339()
                ),
            )
            .await
            .unwrap();
        }
        llm_tracker::db::migrate(&t.db).await.unwrap();
        for table in [
            "llm_tracker_usage",
            "llm_tracker_usage_rollup",
            "llm_tracker_usage_rollup_total",
        ] {
            let tuples = t
                .scalar_string(&format!(
                    "SELECT reltuples::text FROM pg_class WHERE relname = '{table}'"
                ))
                .await;
            let tuples: f64 = tuples.parse().unwrap();
            assert!(
                tuples > 0.0,
                "{table}: reltuples {tuples} (never analyzed: -1)"
            );
        }
    }
}

/// PostgreSQL: whether the valid index `{stem}_idx` has `keys` key columns and 12 columns in
/// all (the payload of migrations 000033–000034), and how many indexes of the usage table
/// have names starting with `stem` (the index and any left beside it by a swap).
async fn index_shape(t: &TestDb, stem: &str, keys: i64) -> (i64, i64) {
    let covering = t
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = '{stem}_idx' AND i.indisvalid \
             AND i.indnkeyatts = {keys} AND i.indnatts = 12"
        ))
        .await;
    let indexes = t
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'llm_tracker_usage' \
             AND indexname LIKE '{stem}%'"
        ))
        .await;
    (covering, indexes)
}

/// Migration 000033 (PostgreSQL): the `(user_id, created_at)` index carries the columns one
/// user's reads take, under its own name and keys; the table is vacuumed after fewer inserts;
/// `down` puts the plain index back and resets the table; a run cut off after the covering
/// index was built (the plain one still there) finishes the swap when it runs again.
mod the_user_index_covers_the_rows_reads {
    use super::*;

    async fn state(t: &TestDb) -> (i64, i64, String) {
        let (covering, indexes) = index_shape(t, "llm_tracker_usage_user_created", 2).await;
        let options: Option<Vec<String>> = sea_orm::ConnectionTrait::query_one_raw(
            &t.db,
            sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT reloptions FROM pg_class WHERE relname = 'llm_tracker_usage'",
            ),
        )
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
        (covering, indexes, options.unwrap_or_default().join(","))
    }

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        let vacuumed = "autovacuum_vacuum_insert_threshold=10000,\
                        autovacuum_vacuum_insert_scale_factor=0.001";
        assert_eq!(state(&t).await, (1, 1, vacuumed.to_owned()));

        crate::helpers::down_through(&t.db, "m20261213_000033").await;
        assert_eq!(state(&t).await, (0, 1, String::new()));
        assert_eq!(
            t.scalar_i64(
                "SELECT COUNT(*) FROM pg_indexes WHERE indexdef = 'CREATE INDEX \
                 llm_tracker_usage_user_created_idx ON public.llm_tracker_usage USING btree \
                 (user_id, created_at)'"
            )
            .await,
            1
        );

        // Cut off after the build: the covering index beside the plain one.
        sea_orm::ConnectionTrait::execute_unprepared(
            &t.db,
            &format!(
                "CREATE INDEX llm_tracker_usage_user_created_cover_idx ON llm_tracker_usage \
                 (user_id, created_at) INCLUDE ({})",
                migration::m20261213_000033_usage_user_rows_cover::INCLUDED
            ),
        )
        .await
        .unwrap();
        Migrator::up(&t.db, None).await.unwrap();
        assert_eq!(state(&t).await, (1, 1, vacuumed.to_owned()));
        Migrator::up(&t.db, None).await.unwrap();
        assert_eq!(state(&t).await, (1, 1, vacuumed.to_owned()));
    }
}

/// Migration 000034 (PostgreSQL): the partial index of the calls made for no user carries the
/// columns their reads take (and `user_id`), under its own name, key and predicate; `down` puts
/// the plain index back; a run cut off after the covering index was built (the plain one still
/// there) finishes the swap when it runs again.
mod the_no_user_index_covers_the_rows_reads {
    use super::*;

    /// (the index covers, indexes of that name's stem, its predicate)
    async fn state(t: &TestDb) -> (i64, i64, i64) {
        let (covering, indexes) = index_shape(t, "llm_tracker_usage_no_user_created", 1).await;
        let predicate = t
            .scalar_i64(
                "SELECT COUNT(*) FROM pg_indexes WHERE indexname = \
                 'llm_tracker_usage_no_user_created_idx' AND indexdef LIKE \
                 '% USING btree (created_at) %WHERE (user_id IS NULL)'",
            )
            .await;
        (covering, indexes, predicate)
    }

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        assert_eq!(state(&t).await, (1, 1, 1));

        crate::helpers::down_through(&t.db, "m20261214_000034").await;
        assert_eq!(state(&t).await, (0, 1, 1));
        assert_eq!(
            t.scalar_i64(
                "SELECT COUNT(*) FROM pg_indexes WHERE indexdef = 'CREATE INDEX \
                 llm_tracker_usage_no_user_created_idx ON public.llm_tracker_usage USING btree \
                 (created_at) WHERE (user_id IS NULL)'"
            )
            .await,
            1
        );

        // Cut off after the build: the covering index beside the plain one.
        sea_orm::ConnectionTrait::execute_unprepared(
            &t.db,
            &format!(
                "CREATE INDEX llm_tracker_usage_no_user_created_cover_idx ON llm_tracker_usage \
                 (created_at) INCLUDE ({}) WHERE user_id IS NULL",
                migration::m20261214_000034_usage_no_user_rows_cover::INCLUDED
            ),
        )
        .await
        .unwrap();
        Migrator::up(&t.db, None).await.unwrap();
        assert_eq!(state(&t).await, (1, 1, 1));
        Migrator::up(&t.db, None).await.unwrap();
        assert_eq!(state(&t).await, (1, 1, 1));
    }
}

/// `migrate` vacuums the usage table too when it applied a migration (PostgreSQL), so that the
/// `(user_id, created_at)` index's reads are index-only from the first request after an
/// upgrade (migration 000033), and leaves it alone when nothing was pending.
mod migrate_vacuums_the_usage_table {
    use super::*;

    async fn vacuums(t: &TestDb) -> i64 {
        t.scalar_i64(
            "SELECT CAST(vacuum_count AS BIGINT) FROM pg_stat_user_tables \
             WHERE relname = 'llm_tracker_usage'",
        )
        .await
    }

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::migrated(Backend::Postgres).await;
        crate::helpers::down_through(&t.db, "m20261213_000033").await;
        let before = vacuums(&t).await;
        llm_tracker::db::migrate(&t.db).await.unwrap();
        assert_eq!(
            vacuums(&t).await,
            before + 1,
            "vacuumed after applying 000033"
        );
        llm_tracker::db::migrate(&t.db).await.unwrap();
        assert_eq!(
            vacuums(&t).await,
            before + 1,
            "nothing pending, nothing vacuumed"
        );
    }
}
