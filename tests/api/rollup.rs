//! The usage rollup (issue 7): token-stats, by_user and the llm-usage total read from whole
//! 15-minute slots of `llm_tracker_usage_rollup` plus the raw rows of the partial slots at the
//! range edges, and must equal the raw-row computation exactly, key for key — whoever wrote,
//! updated or deleted the rows (our insert path, plain SQL as the Django app writes, the
//! foreign key's `ON DELETE SET NULL`), for any range, filter, granularity and time zone.

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use llm_tracker::db::entities::{auth_user, usage};
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::buckets::buckets_between;
use llm_tracker::usage::list::{count_matching_raw, list_usage};
use llm_tracker::usage::plans;
use llm_tracker::usage::rollup;
use llm_tracker::usage::stats;
use llm_tracker::usage::stats::{
    Granularity, SeriesOptions, stats_by_model, stats_by_user, stats_by_user_raw, token_stats_in,
    token_stats_raw,
};
use llm_tracker::users::{NewUser, create_user};
use migration::MigratorTrait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    TransactionTrait,
};

use crate::cli::{cmd, stderr, stdout};
use crate::db_test;
use crate::helpers::TestDb;
use crate::usage_read::{insert, row};

const ZONES: [&str; 7] = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",        // +05:30
    "Asia/Kathmandu",      // +05:45
    "Australia/Lord_Howe", // +10:30, and a 30-minute DST shift
    "Pacific/Chatham",     // +12:45 / +13:45
    "Europe/Berlin",
];

/// An instant near the slot grid: on a boundary, a microsecond either side, or anywhere.
fn near_grid(rng: &mut StdRng, base: DateTime<Utc>, days: i64) -> DateTime<Utc> {
    let slot = base + Duration::seconds(900 * rng.random_range(0..days * 96));
    match rng.random_range(0..4) {
        0 => slot,
        1 => slot + Duration::microseconds(1),
        2 => slot - Duration::microseconds(1),
        _ => slot + Duration::microseconds(rng.random_range(0..900_000_000)),
    }
}

/// The rows `uuid::Uuid::from_u128(n)` for `n` in `ns`, their ids bound as the database stores
/// them.
pub(crate) fn ids_in(
    db: &DatabaseConnection,
    ns: std::ops::Range<u128>,
) -> sea_orm::sea_query::Expr {
    let backend = db.get_database_backend();
    sea_orm::sea_query::ExprTrait::is_in(
        Expr::col(usage::Column::Id),
        ns.map(|n| llm_tracker::db::Dialect::of(backend).uuid(uuid::Uuid::from_u128(n))),
    )
}

/// The row as the Django app would write it: one plain SQL `INSERT` in its formats (on SQLite
/// 32-hex-character ids and naive UTC datetime text, see `llm_tracker::db::Dialect`).
fn plain_insert(backend: DbBackend, r: &usage::Model) -> String {
    let text = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let time = |t: &DateTime<Utc>| match backend {
        DbBackend::Postgres => text(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()),
        _ => text(&llm_tracker::db::dialect::django_datetime(t)),
    };
    let (id, cost) = match backend {
        DbBackend::Postgres => (
            text(&r.id.to_string()),
            r.cost
                .map(|c| c.usd().to_string())
                .unwrap_or_else(|| "NULL".into()),
        ),
        _ => (
            text(&r.id.simple().to_string()),
            r.cost
                .map(|c| c.0.to_string())
                .unwrap_or_else(|| "NULL".into()),
        ),
    };
    format!(
        "INSERT INTO llm_tracker_usage (id, model, prompt_tokens, completion_tokens, total_tokens, \
         cached_tokens, reasoning_tokens, success, error, metadata, created_at, user_id, started_at, \
         cost, cost_currency) VALUES ({id}, {model}, {p}, {c}, {t}, {ca}, {re}, {ok}, {err}, '{{}}', \
         {created}, {user}, {started}, {cost}, 'USD')",
        model = text(&r.model),
        p = r.prompt_tokens,
        c = r.completion_tokens,
        t = r.total_tokens,
        ca = r.cached_tokens,
        re = r.reasoning_tokens,
        ok = if r.success { "TRUE" } else { "FALSE" },
        err = r
            .error
            .as_deref()
            .map(text)
            .unwrap_or_else(|| "NULL".into()),
        created = time(&r.created_at),
        user = r
            .user_id
            .map(|u| u.to_string())
            .unwrap_or_else(|| "NULL".into()),
        started = r
            .started_at
            .as_ref()
            .map(time)
            .unwrap_or_else(|| "NULL".into()),
    )
}

/// Makes the PostgreSQL pool hold `n` idle connections: spare connections are idle ones, or
/// new ones made within 250 ms, which on a loaded machine (the suite's other tests) can take
/// longer — and a read then rightly goes on with its own.
pub(crate) async fn idle_connections(db: &DatabaseConnection, n: usize) {
    let pool = db.get_postgres_connection_pool();
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.acquire().await.unwrap());
    }
    drop(held);
    // (sqlx puts them back in tasks of their own.)
    for _ in 0..500 {
        if llm_tracker::db::pool_connections(db).1 >= n as i64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A read transaction as a request opens one on PostgreSQL: `REPEATABLE READ`, read only.
async fn request_txn(db: &DatabaseConnection) -> sea_orm::DatabaseTransaction {
    db.begin_with_config(
        Some(sea_orm::IsolationLevel::RepeatableRead),
        Some(sea_orm::AccessMode::ReadOnly),
    )
    .await
    .unwrap()
}

pub(crate) async fn users(db: &DatabaseConnection, names: &[&str]) -> Vec<i32> {
    let mut ids = Vec::new();
    for name in names {
        let u = NewUser {
            username: (*name).into(),
            ..Default::default()
        };
        ids.push(create_user(db, u).await.unwrap().id);
    }
    ids
}

/// `n` users named `{prefix}0`, `{prefix}1`, …: their ids.
pub(crate) async fn numbered_users(db: &DatabaseConnection, prefix: &str, n: usize) -> Vec<i32> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Random rows around the slot grid over `days` days from `base`, with latencies (and clock
/// skew), failures, unpriced models, and calls made for no user.
pub(crate) fn random_rows(
    rng: &mut StdRng,
    users: &[i32],
    base: DateTime<Utc>,
    days: i64,
    n: u128,
    first_id: u128,
) -> Vec<usage::Model> {
    let models = [
        "gpt-4o",
        "gpt-4o-mini",
        "o4-mini",
        "gemini-2.5-flash",
        "Local_%x",
    ];
    (0..n)
        .map(|i| {
            let user = (!rng.random_bool(0.2)).then(|| users[rng.random_range(0..users.len())]);
            let model = models[rng.random_range(0..models.len())];
            let p = rng.random_range(0..3000);
            let c = rng.random_range(0..1000);
            let created = near_grid(rng, base, days);
            let mut r = row(
                first_id + i,
                user,
                model,
                (p, c, rng.random_range(0..=p), rng.random_range(0..=c)),
                rng.random_bool(0.9),
                created,
            );
            r.started_at = match rng.random_range(0..4) {
                0 => None,
                1 => Some(created + Duration::microseconds(rng.random_range(1..2_000_000))),
                _ => Some(created - Duration::microseconds(rng.random_range(0..30_000_000))),
            };
            r
        })
        .collect()
}

/// A random filter; its dates are often exactly the time of a row (`times`), or a
/// microsecond off, so rows sit on the range's edges.
pub(crate) fn random_filter(
    rng: &mut StdRng,
    users: &[i32],
    times: &[DateTime<Utc>],
    base: DateTime<Utc>,
    days: i64,
) -> UsageFilter {
    let on_a_row = |rng: &mut StdRng| {
        let t = times[rng.random_range(0..times.len())];
        t + Duration::microseconds(rng.random_range(-1..=1))
    };
    let start = rng.random_bool(0.75).then(|| match rng.random_bool(0.5) {
        true => on_a_row(rng),
        false => near_grid(rng, base - Duration::days(1), days + 2),
    });
    let end = rng.random_bool(0.75).then(|| {
        let from = start.unwrap_or(base);
        match rng.random_range(0..6) {
            5 => on_a_row(rng).max(from),
            // Shorter than a slot, or a few slots.
            0 => from + Duration::microseconds(rng.random_range(0..900_000_000)),
            1 => from + Duration::seconds(rng.random_range(0..4 * 3600)),
            _ => near_grid(rng, from, days),
        }
    });
    UsageFilter {
        start,
        end,
        user_id: rng
            .random_bool(0.25)
            .then(|| users[rng.random_range(0..users.len())]),
        model: rng
            .random_bool(0.25)
            .then(|| ["gpt", "MINI", "_%x", "flash", "nothing"][rng.random_range(0..5)].to_owned()),
        success: [None, None, Some(true), Some(false)][rng.random_range(0..4)],
    }
}

/// token-stats (every granularity, the given zone, zero fill when possible), by_user and the
/// llm-usage total from the rollup equal the raw computation. Returns whether the rollup
/// answered (a plan with whole slots).
pub(crate) async fn assert_same(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    tz: Tz,
    fill: bool,
) -> bool {
    let mut used = false;
    for granularity in [
        None,
        Some(Granularity::Day),
        Some(Granularity::Month),
        Some(Granularity::Year),
    ] {
        let fill = match (granularity, filter.start, filter.end) {
            (Some(g), Some(s), Some(e)) => fill && buckets_between(g, tz, s, e).is_ok(),
            _ => false,
        };
        let options = SeriesOptions { tz, fill };
        let plan = rollup::plan(db, filter, granularity.map(|g| (g, tz)), false)
            .await
            .unwrap();
        used |= plan.is_some_and(|p| !p.ranges.is_empty());
        let fast = token_stats_in(db, filter, granularity, options)
            .await
            .unwrap();
        let raw = token_stats_raw(db, filter, granularity, options)
            .await
            .unwrap();
        assert_eq!(fast, raw, "{filter:?} {granularity:?} {tz} fill={fill}");
    }
    for limit in [3, 1000] {
        assert_eq!(
            stats_by_user(db, filter, limit).await.unwrap(),
            stats_by_user_raw(db, filter, limit).await.unwrap(),
            "by_user {filter:?}"
        );
    }
    let page = list_usage(db, filter, 1, 5).await.unwrap();
    assert_eq!(
        page.total,
        count_matching_raw(db, filter).await.unwrap(),
        "total {filter:?}"
    );
    used
}

/// Contributions written and not folded into the cells yet.
async fn pending(t: &TestDb) -> i64 {
    t.scalar_i64(&format!(
        "SELECT COUNT(*) FROM {}",
        migration::rollup::DELTA_TABLE
    ))
    .await
}

/// Calls written and not folded yet (on PostgreSQL a multi-row statement appends one delta row
/// per key, migration 000015, so this is not [`pending`]).
async fn pending_calls(t: &TestDb) -> i64 {
    t.scalar_i64(&format!(
        "SELECT CAST(COALESCE(SUM(calls), 0) AS BIGINT) FROM {}",
        migration::rollup::DELTA_TABLE
    ))
    .await
}

/// Folds what is pending (a fold that finds something must leave nothing).
pub(crate) async fn fold(t: &TestDb) {
    let had = pending(t).await;
    assert_eq!(rollup::fold(&t.db).await.unwrap(), had > 0);
    assert_eq!(pending(t).await, 0);
}

/// Calls counted in the cells (not what is pending).
async fn counted(t: &TestDb) -> i64 {
    t.scalar_i64(&format!(
        "SELECT CAST(COALESCE(SUM(calls), 0) AS BIGINT) FROM llm_tracker_usage_rollup_total WHERE grain = 96 AND user_key = {}",
        migration::rollup::ALL_USERS
    ))
    .await
}

pub(crate) async fn assert_verified(db: &DatabaseConnection) {
    let report = rollup::verify(db, None, None).await.unwrap();
    assert_eq!(report.differing_cells, 0, "{:?}", report.examples);
    assert!(report.expected_cells > 0);
}

db_test!(
    async fn rollup_answers_equal_raw_rows_after_inserts_updates_and_deletes(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["r1", "r2", "r3", "r4"]).await;
        let mut rng = StdRng::seed_from_u64(20_261_123);
        // Around the 2025 DST changes of New York, Berlin and Lord Howe.
        let base = Utc.with_ymd_and_hms(2025, 3, 5, 0, 0, 0).unwrap();
        let days = 35;
        let rows = random_rows(&mut rng, &ids, base, days, 2400, 1);
        let (ours, django) = rows.split_at(1600);
        // Our path: multi-row inserts (the tracker's group commit); Django's: one row per
        // plain SQL statement.
        insert(db, ours).await;
        // Ours folded into the cells, Django's still pending: reads and verify add them.
        fold(&t).await;
        for r in django {
            db.execute_unprepared(&plain_insert(db.get_database_backend(), r))
                .await
                .unwrap();
        }
        assert_eq!(pending(&t).await, 800);
        assert_verified(db).await;

        // Updates: a reprice, a model rename, rows moved across slots, a user deleted (the
        // foreign key sets user_id to NULL); and deletes.
        usage::Entity::update_many()
            .col_expr(usage::Column::Cost, Expr::cust("NULL"))
            .filter(usage::Column::Model.eq("gpt-4o-mini"))
            .exec(db)
            .await
            .unwrap();
        usage::Entity::update_many()
            .col_expr(usage::Column::Model, Expr::value("o4-mini"))
            .filter(ids_in(db, 1..200))
            .exec(db)
            .await
            .unwrap();
        // Updates of folded and of pending rows, folded; the rest stays pending.
        fold(&t).await;
        for n in 300..340u128 {
            usage::Entity::update_many()
                .col_expr(
                    usage::Column::CreatedAt,
                    Expr::value(
                        llm_tracker::db::Dialect::of(db.get_database_backend())
                            .datetime(near_grid(&mut rng, base, days)),
                    ),
                )
                .filter(ids_in(db, n..n + 1))
                .exec(db)
                .await
                .unwrap();
        }
        // A change of tokens only: its pending contribution counts no call.
        usage::Entity::update_many()
            .col_expr(usage::Column::TotalTokens, Expr::cust("total_tokens + 7"))
            .filter(ids_in(db, 400..450))
            .exec(db)
            .await
            .unwrap();
        auth_user::Entity::delete_by_id(ids[3])
            .exec(db)
            .await
            .unwrap();
        usage::Entity::delete_many()
            .filter(ids_in(db, 1000..1300))
            .exec(db)
            .await
            .unwrap();
        // Everything of one model gone: it must not show with zeros.
        usage::Entity::delete_many()
            .filter(usage::Column::Model.eq("gemini-2.5-flash"))
            .exec(db)
            .await
            .unwrap();
        assert_verified(db).await;

        let times: Vec<DateTime<Utc>> = usage::Entity::find()
            .all(db)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| (r.created_at.timestamp_micros() + 1).rem_euclid(900_000_000) <= 2)
            .map(|r| r.created_at)
            .collect();
        let mut answered = 0;
        let cases = 60;
        assert!(pending(&t).await > 0);
        for case in 0..cases {
            if case == cases / 2 {
                // The second half with everything folded, and a few pending rows after every
                // folded cell (an open-ended range must reach them).
                fold(&t).await;
                insert(
                    db,
                    &random_rows(
                        &mut rng,
                        &ids[..3],
                        base + Duration::days(days + 2),
                        1,
                        20,
                        50_000,
                    ),
                )
                .await;
                assert_eq!(pending(&t).await, 20);
            }
            let filter = random_filter(&mut rng, &ids, &times, base, days);
            let tz: Tz = ZONES[case % ZONES.len()].parse().unwrap();
            if assert_same(db, &filter, tz, rng.random_bool(0.5)).await {
                answered += 1;
            }
        }
        // Ranges that start or end exactly on a row that sits exactly on a slot boundary.
        let exact: Vec<DateTime<Utc>> = times
            .iter()
            .copied()
            .filter(|t| t.timestamp_micros().rem_euclid(900_000_000) == 0)
            .take(4)
            .collect();
        assert_eq!(exact.len(), 4);
        let (slot, us) = (Duration::seconds(900), Duration::microseconds(1));
        for t in exact {
            for (start, end) in [
                (t, t),
                (t - slot, t),
                (t, t + slot),
                (t - us, t + us),
                (t - slot * 8, t - us),
                (t + us, t + slot * 8),
            ] {
                let filter = UsageFilter {
                    start: Some(start),
                    end: Some(end),
                    ..Default::default()
                };
                assert_same(db, &filter, Tz::UTC, false).await;
            }
        }
        // The whole range, in every zone.
        for zone in ZONES {
            assert_same(db, &UsageFilter::default(), zone.parse().unwrap(), false).await;
        }
        assert!(
            answered * 2 > cases,
            "the rollup answered only {answered} of {cases} random cases"
        );
    }
);

db_test!(
    async fn many_users_over_fourteen_months_read_their_own_days_months_and_years(
        backend: Backend,
    ) {
        // Issue 16: a user's own cells are UTC days, months and years only (see
        // migration::rollup::per_user). 300 users, Zipf-skewed, over 14 months across a year
        // boundary: every per-user read (user_id filters, by_user, the listing's total) equals
        // the raw rows, for ranges on month and year boundaries too.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let n_users = 300;
        db.execute_unprepared(&format!(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
             is_staff, is_active, date_joined) SELECT '!', {f}, 'zipf' || g, '', '', '', {f}, {tr}, \
             '2025-01-01T00:00:00+00:00' FROM ({series}) s",
            f = if backend == crate::helpers::Backend::Postgres { "false" } else { "0" },
            tr = if backend == crate::helpers::Backend::Postgres { "true" } else { "1" },
            series = match backend {
                crate::helpers::Backend::Postgres =>
                    format!("SELECT generate_series(1, {n_users}) AS g"),
                _ => format!(
                    "WITH RECURSIVE c(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM c WHERE g < {n_users}) SELECT g FROM c"
                ),
            }
        ))
        .await
        .unwrap();
        let ids: Vec<i32> = auth_user::Entity::find()
            .filter(auth_user::Column::Username.starts_with("zipf"))
            .all(db)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.id)
            .collect();
        // User k appears about n/k times: a few heavy users, a long tail of one-call users.
        let weighted: Vec<i32> = ids
            .iter()
            .enumerate()
            .flat_map(|(k, id)| std::iter::repeat_n(*id, n_users / (k + 1)))
            .collect();
        let mut rng = StdRng::seed_from_u64(16);
        let base = Utc.with_ymd_and_hms(2024, 11, 20, 0, 0, 0).unwrap();
        let days = 430;
        let mut rows = random_rows(&mut rng, &weighted, base, days, 2500, 1);
        // The tail: one call each.
        for (i, id) in ids.iter().enumerate().skip(200) {
            let mut r = random_rows(&mut rng, &[*id], base, days, 1, 100_000 + i as u128);
            rows.append(&mut r);
        }
        let (folded, pending_rows) = rows.split_at(rows.len() - 300);
        insert(db, folded).await;
        fold(&t).await;
        insert(db, pending_rows).await;
        assert_verified(db).await;
        // The layout: per user, days, months and years in the totals table; months per model
        // and outcome (migration 000021).
        for (table, grains) in [
            ("llm_tracker_usage_rollup", "2976"),
            ("llm_tracker_usage_rollup_total", "96, 2976, 35040"),
        ] {
            assert_eq!(
                t.scalar_i64(&format!(
                    "SELECT COUNT(*) FROM {table} WHERE user_key <> {} AND grain NOT IN ({grains})",
                    migration::rollup::ALL_USERS
                ))
                .await,
                0,
                "{table}"
            );
        }
        let months = t
            .scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE grain = 2976")
            .await;
        let years = t
            .scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE grain = 35040")
            .await;
        assert!(months > 300 && years > 200, "months {months} years {years}");
        // A verify over a range checks the month and year cells inside it.
        let report = rollup::verify(
            db,
            Some(Utc.with_ymd_and_hms(2025, 2, 10, 0, 0, 0).unwrap()),
            Some(Utc.with_ymd_and_hms(2025, 7, 3, 0, 0, 0).unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(report.differing_cells, 0, "{:?}", report.examples);
        db.execute_unprepared(&format!(
            "UPDATE llm_tracker_usage_rollup_total SET calls = calls + 1 WHERE grain = 2976 \
             AND slot = {}",
            Utc.with_ymd_and_hms(2025, 4, 1, 0, 0, 0)
                .unwrap()
                .timestamp()
                / 900
        ))
        .await
        .unwrap();
        let report = rollup::verify(
            db,
            Some(Utc.with_ymd_and_hms(2025, 3, 10, 0, 0, 0).unwrap()),
            Some(Utc.with_ymd_and_hms(2025, 5, 3, 0, 0, 0).unwrap()),
        )
        .await
        .unwrap();
        assert!(report.differing_cells > 0);
        assert!(rollup::rebuild(db).await.unwrap() > 0);
        assert_verified(db).await;

        let heavy = ids[0];
        let light = ids[250];
        let month = |y: i32, m: u32| Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap();
        let us = Duration::microseconds(1);
        let ranges = [
            (None, None),
            (Some(month(2025, 1)), Some(month(2026, 1) - us)),
            (Some(month(2025, 3)), Some(month(2025, 6) - us)),
            (Some(month(2025, 3) + us), Some(month(2025, 6))),
            (Some(month(2025, 2) + Duration::hours(5)), None),
            (None, Some(month(2025, 8) - Duration::minutes(20))),
            (
                Some(month(2025, 5) + Duration::hours(30)),
                Some(month(2025, 5) + Duration::hours(50)),
            ),
        ];
        // A user's all time reads years, a quarter months (the plans the reads below use).
        let plan = rollup::plan(
            db,
            &UsageFilter {
                user_id: Some(heavy),
                ..Default::default()
            },
            None,
            false,
        )
        .await
        .unwrap()
        .unwrap();
        assert!(plan.coarse.iter().all(|r| r.grain == 35040), "{plan:?}");
        let quarter = UsageFilter {
            start: Some(month(2025, 3)),
            end: Some(month(2025, 6) - us),
            ..Default::default()
        };
        let plan = rollup::plan(db, &quarter, None, true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            plan.coarse,
            vec![rollup::Run {
                grain: 2976,
                first: month(2025, 3).timestamp() / 900,
                end: month(2025, 6).timestamp() / 900,
                subtract: false,
            }]
        );
        assert!(plan.edges.is_empty());
        // A rolling 30 days that ends inside a month: the month's cell less its days after the
        // range (one month cell and a few days instead of 24 days per user), for by_user and
        // the listing's total; exact all the same, with and without a user.
        for user_id in [None, Some(heavy), Some(light)] {
            let rolling = UsageFilter {
                start: Some(
                    month(2025, 4) - chrono::Duration::days(5) + chrono::Duration::hours(7),
                ),
                end: Some(month(2025, 4) + chrono::Duration::days(24) + chrono::Duration::hours(3)),
                user_id,
                ..Default::default()
            };
            let plan = rollup::plan(db, &rolling, None, true)
                .await
                .unwrap()
                .unwrap();
            let subtracted: Vec<_> = plan.coarse.iter().filter(|r| r.subtract).collect();
            if user_id == Some(light) {
                // A light user's April has no day cells (fewer than 10 calls, migration
                // 000031): its days are that user's rows.
                assert!(subtracted.is_empty(), "{plan:?}");
                assert!(!plan.coarse_gaps.is_empty(), "{plan:?}");
                assert_same(db, &rolling, Tz::UTC, true).await;
                continue;
            }
            assert_eq!(subtracted.len(), 1, "{plan:?}");
            assert_eq!(
                subtracted[0].first,
                (month(2025, 4) + chrono::Duration::days(24)).timestamp() / 900
            );
            assert_eq!(subtracted[0].end, month(2025, 5).timestamp() / 900);
            assert_same(db, &rolling, Tz::UTC, true).await;
        }
        let mut answered = 0;
        for (i, (start, end)) in ranges.into_iter().enumerate() {
            for user_id in [None, Some(heavy), Some(light)] {
                for (model, success) in [(None, None), (Some("gpt".to_owned()), Some(true))] {
                    let filter = UsageFilter {
                        start,
                        end,
                        user_id,
                        model: model.clone(),
                        success,
                    };
                    if assert_same(db, &filter, ZONES[i % ZONES.len()].parse().unwrap(), true).await
                    {
                        answered += 1;
                    }
                }
            }
        }
        assert!(answered > 20, "the rollup answered {answered}");
        for _ in 0..20 {
            let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
            let filter = random_filter(&mut rng, &ids[..20], &times, base, days);
            assert_same(db, &filter, Tz::UTC, true).await;
        }
        // Migration 000011 over the old layout (a user's cells at every grain, no months or
        // years): down drops the calendar cells; old per-user hour cells put back by hand go
        // again on the way up, and the months and years come back from the days.
        crate::helpers::down_through(db, "m20261126_000011").await;
        assert_eq!(
            t.scalar_i64(
                "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE grain IN (2976, 35040)"
            )
            .await,
            0
        );
        for table in ["llm_tracker_usage_rollup", "llm_tracker_usage_rollup_total"] {
            db.execute_unprepared(&format!(
                "INSERT INTO {table} SELECT * FROM {table} WHERE grain = 96 AND user_key <> {all}",
                all = migration::rollup::ALL_USERS
            ).replace("SELECT *", &format!("SELECT 4 AS grain, {}", if table.ends_with("total") {
                "user_key, slot, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls, successful_calls"
            } else {
                "user_key, slot, model, success, calls, prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens, cost_micros, priced_calls, latency_us, latency_calls"
            })))
            .await
            .unwrap();
        }
        // (Today's `rollup verify` reads columns of migration 000016, so the old cells are
        // counted here and verified after the way up.)
        let old_user_hours = format!(
            "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE grain = 4 AND user_key <> {}",
            migration::rollup::ALL_USERS
        );
        assert!(t.scalar_i64(&old_user_hours).await > 0);
        migration::Migrator::up(db, None).await.unwrap();
        assert_eq!(t.scalar_i64(&old_user_hours).await, 0);
        assert_verified(db).await;
    }
);

db_test!(
    async fn by_user_ranks_through_upper_bounds_only_while_they_hold(backend: Backend) {
        // Issue 16: without a user filter, by_user reads exact sums only for the users whose
        // tokens over the range's whole UTC months (an upper bound while no row holds negative
        // tokens and no cell keeps deleted rows) can reach its first `limit`
        // (stats::user_bounds); elsewhere it ranks every user. Exact either way.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let names: Vec<String> = (0..60).map(|i| format!("bound{i}")).collect();
        let ids = users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        // User k calls about 60 / (k + 1) times as often as the last one.
        let weighted: Vec<i32> = ids
            .iter()
            .enumerate()
            .flat_map(|(k, id)| std::iter::repeat_n(*id, 60 / (k + 1)))
            .collect();
        let mut rng = StdRng::seed_from_u64(24);
        let march = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        let rows = random_rows(&mut rng, &weighted, march, 61, 3000, 1);
        let (folded, pending_rows) = rows.split_at(rows.len() - 100);
        insert(db, folded).await;
        fold(&t).await;
        insert(db, pending_rows).await;
        // A rolling 30 days across the two months: 20 days and 9 days of cells and two
        // partial days per user, against each user's two month cells.
        let range = UsageFilter {
            start: Some(march + Duration::days(11) + Duration::hours(7)),
            end: Some(march + Duration::days(39) + Duration::hours(13)),
            ..Default::default()
        };
        let plan = rollup::plan(db, &range, None, true).await.unwrap().unwrap();
        assert!(rollup::cells_per_user(&plan) > 20, "{plan:?}");
        let cover = rollup::month_cover(&range).unwrap();
        assert_eq!(cover.start, Some(march));
        assert_eq!(
            cover.end,
            Some(Utc.with_ymd_and_hms(2025, 5, 1, 0, 0, 0).unwrap() - Duration::microseconds(1))
        );
        let bounds = stats::user_bounds(db, &range, &plan, 3)
            .await
            .unwrap()
            .expect("bounds hold here");
        assert_eq!(bounds.keys.len(), 20);
        assert!(bounds.rest.is_some() && bounds.may_decide(3), "{bounds:?}");
        for limit in [1, 3, 10, 50, 1000] {
            assert_eq!(
                stats_by_user(db, &range, limit).await.unwrap(),
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "limit {limit}"
            );
        }
        // Whole months are their own cover: bounded all the same, through each month's top
        // users (migration 000026), which read far fewer cells than every user's month cell.
        let april = UsageFilter {
            start: Some(march + Duration::days(31)),
            end: Some(march + Duration::days(61) - Duration::microseconds(1)),
            ..Default::default()
        };
        let plan_april = rollup::plan(db, &april, None, true).await.unwrap().unwrap();
        let (_, april_cover) = stats::bound_plan(db, &april, &plan_april, 3)
            .await
            .unwrap()
            .expect("bounds through the month's list");
        assert_eq!(april_cover.coarse, plan_april.coarse);
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &april, limit).await.unwrap(),
                stats_by_user_raw(db, &april, limit).await.unwrap(),
                "April, limit {limit}"
            );
        }
        // A user who called most inside the range, but whose month holds a row of negative
        // tokens before it: their cover's tokens are no bound. Bounded, they would be left out
        // and the ranking wrong; with such a row anywhere, every user is ranked.
        let odd = users(db, &["bound-negative"]).await[0];
        let mut heavy = row(
            900_001,
            Some(odd),
            "gpt-4o",
            (900_000, 100_000, 0, 0),
            true,
            march + Duration::days(20),
        );
        heavy.total_tokens = 1_000_000;
        let mut negative = row(
            900_002,
            Some(odd),
            "gpt-4o",
            (0, 0, 0, 0),
            true,
            march + Duration::days(2),
        );
        negative.prompt_tokens = -2_000_000;
        negative.total_tokens = -2_000_000;
        insert(db, &[heavy, negative]).await;
        fold(&t).await;
        assert!(
            stats::user_bounds(db, &range, &plan, 3)
                .await
                .unwrap()
                .is_none()
        );
        let top = stats_by_user(db, &range, 3).await.unwrap();
        assert_eq!(top, stats_by_user_raw(db, &range, 3).await.unwrap());
        assert_eq!(top[0].user_id, Some(odd));
        // Without that row the bounds hold again (and decide without the odd user's month).
        db.execute_unprepared(&format!(
            "DELETE FROM llm_tracker_usage WHERE total_tokens < 0 AND user_id = {odd}"
        ))
        .await
        .unwrap();
        assert!(
            stats::user_bounds(db, &range, &plan, 3)
                .await
                .unwrap()
                .is_some()
        );
        for limit in [1, 3, 10] {
            assert_eq!(
                stats_by_user(db, &range, limit).await.unwrap(),
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "limit {limit}"
            );
        }
        // Bounds that do not decide: 20 users with ~20M tokens in March before the range (10
        // inside it) hold the 20 highest bounds, and the user with most tokens inside the range
        // is not among them; the one left out (a 21st such user) bounds at 5M: below the
        // highest bound times the range's share of its cover (so the bounded users' exact
        // sums are read) but above the 10 tokens they have: every user is ranked.
        let outside: Vec<String> = (0..21).map(|i| format!("bound-outside{i}")).collect();
        let outside = users(db, &outside.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let inside = users(db, &["bound-inside"]).await[0];
        let mut rows = Vec::new();
        for (i, id) in outside.iter().enumerate() {
            let n = 910_000 + 2 * i as u128;
            rows.push(row(
                n,
                Some(*id),
                "gpt-4o",
                if i < 20 {
                    (19_000_000 + 1000 * (20 - i as i32), 1_000_000, 0, 0)
                } else {
                    (4_000_000, 1_000_000, 0, 0)
                },
                true,
                march + Duration::days(3),
            ));
            rows.push(row(
                n + 1,
                Some(*id),
                "gpt-4o",
                (6, 4, 0, 0),
                true,
                march + Duration::days(15),
            ));
        }
        // (Eight calls of no tokens each, before the range, make their years full: a light
        // year, of fewer than 10 calls, has no month cell to be listed by; migration 000032.)
        for (i, id) in outside.iter().chain([&inside]).enumerate() {
            for k in 0..8 {
                rows.push(row(
                    930_000 + 10 * i as u128 + k,
                    Some(*id),
                    "gpt-4o",
                    (0, 0, 0, 0),
                    true,
                    march + Duration::days(1),
                ));
            }
        }
        rows.push(row(
            920_000,
            Some(inside),
            "gpt-4o",
            (2_000_000, 1_000_000, 0, 0),
            true,
            march + Duration::days(16),
        ));
        insert(db, &rows).await;
        fold(&t).await;
        let bounds = stats::user_bounds(db, &range, &plan, 1)
            .await
            .unwrap()
            .unwrap();
        assert!(!bounds.keys.contains(&i64::from(inside)));
        assert_eq!(bounds.rest, Some(5_000_010.0));
        assert_eq!(bounds.bounds[0], 20_020_010.0);
        assert!(bounds.share > 0.4 && bounds.share < 0.6, "{}", bounds.share);
        assert!(bounds.may_decide(1));
        for limit in [1, 3] {
            let top = stats_by_user(db, &range, limit).await.unwrap();
            assert_eq!(top, stats_by_user_raw(db, &range, limit).await.unwrap());
            assert_eq!(top[0].user_id, Some(inside));
        }
        // A retention horizon after the cover's start: its cells may keep deleted rows.
        db.execute_unprepared(&format!(
            "UPDATE llm_tracker_usage_retention SET horizon_slot = {} WHERE id = 1",
            (march + Duration::days(5)).timestamp() / 900
        ))
        .await
        .unwrap();
        assert!(
            llm_tracker::retention::horizon_slot(db)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            stats::user_bounds(db, &range, &plan, 3)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            stats_by_user(db, &range, 3).await.unwrap(),
            stats_by_user_raw(db, &range, 3).await.unwrap()
        );
    }
);

db_test!(
    async fn by_user_bounds_from_each_months_top_users_hold_for_every_user_left_out(
        backend: Backend,
    ) {
        // Issue 16, migration 000026: where the cover of a by_user range is whole months, the
        // bounds come from each month's users with the most tokens (rollup::top_bound_statement,
        // `k` per month) and those users' exact cover tokens; a user in no list has at most the
        // sum of the full lists' last tokens. 400 Zipf users over March and April: the lists
        // of 40 hold a tenth of each month's users.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let names: Vec<String> = (0..400).map(|i| format!("top{i}")).collect();
        let ids = users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let weighted: Vec<i32> = ids
            .iter()
            .enumerate()
            .flat_map(|(k, id)| std::iter::repeat_n(*id, 400 / (k + 1)))
            .collect();
        let mut rng = StdRng::seed_from_u64(26);
        let march = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        let mut rows = random_rows(&mut rng, &weighted, march, 61, 4000, 1);
        // Every user at least once a month.
        for (i, id) in ids.iter().enumerate() {
            for (m, day) in [3, 40].into_iter().enumerate() {
                let n = 50_000 + 2 * i as u128 + m as u128;
                rows.push(row(
                    n,
                    Some(*id),
                    "gpt-4o",
                    (7, 3, 0, 0),
                    true,
                    march + Duration::days(day) + Duration::minutes(i as i64),
                ));
            }
        }
        insert(db, &rows).await;
        fold(&t).await;
        // Pending, not folded: a tail user's one heavy call inside the range (in no month's
        // list, bounded through the pending contributions), and a few more rows.
        let tail = ids[390];
        let mut pending_rows = random_rows(&mut rng, &weighted, march, 61, 50, 60_000);
        pending_rows.push(row(
            70_000,
            Some(tail),
            "gpt-4o",
            (4_000_000, 1_000_000, 0, 0),
            true,
            march + Duration::days(20),
        ));
        insert(db, &pending_rows).await;
        let range = UsageFilter {
            start: Some(march + Duration::days(11) + Duration::hours(7)),
            end: Some(march + Duration::days(39) + Duration::hours(13)),
            ..Default::default()
        };
        let backend = db.get_database_backend();
        let plan = rollup::plan(db, &range, None, true).await.unwrap().unwrap();
        let (cover, cover_plan) = stats::bound_plan(db, &range, &plan, 3)
            .await
            .unwrap()
            .expect("bounds hold");
        let k = stats::top_listed_users(stats::bounded_users(3));
        assert_eq!(k, 40);
        let top = rollup::top_bound_statement(backend, &cover_plan, k).expect("whole months");
        assert_eq!(
            stats::bounds_statement(backend, &cover, &cover_plan, 3),
            top
        );
        let exact_bounds = async || exact_cover_bounds(db, &cover, &cover_plan).await;
        let exact = exact_bounds().await;
        assert!(exact.len() > 400, "{}", exact.len());
        for limit in [1, 3, 10] {
            let bounds = stats::user_bounds(db, &range, &plan, limit)
                .await
                .unwrap()
                .unwrap();
            let n = usize::try_from(stats::bounded_users(limit)).unwrap();
            assert_eq!(bounds.keys.len(), n);
            // The listed users' bounds are exact, highest first; `rest` bounds every user left
            // out, and every user above it is in.
            assert_bounds_hold(&bounds, &exact);
            let rest = bounds.rest.unwrap();
            assert!(bounds.bounds[n - 1] >= rest);
            // Short lists, and still the same n highest bounds as every user's cells give.
            let mut all: Vec<f64> = exact.values().copied().collect();
            all.sort_by(|a, b| b.total_cmp(a));
            assert!(rest >= all[n], "{rest} {}", all[n]);
            assert_eq!(bounds.bounds[n - 1], all[n - 1]);
        }
        // The tail user's pending call makes them the first.
        let bounds = stats::user_bounds(db, &range, &plan, 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bounds.keys[0], i64::from(tail));
        for limit in [1, 3, 10, 50] {
            let fast = stats_by_user(db, &range, limit).await.unwrap();
            assert_eq!(
                fast,
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "{limit}"
            );
            assert_eq!(fast[0].user_id, Some(tail));
        }
        // Pending deletes: the heaviest user's rows go, their contributions taken away and not
        // folded yet. Still listed by their month cells, that user's bound is exact: 0.
        db.execute_unprepared(&format!(
            "DELETE FROM llm_tracker_usage WHERE user_id = {}",
            ids[0]
        ))
        .await
        .unwrap();
        let exact = exact_bounds().await;
        assert_eq!(exact.get(&i64::from(ids[0])).copied().unwrap_or(0.0), 0.0);
        let bounds = stats::user_bounds(db, &range, &plan, 3)
            .await
            .unwrap()
            .unwrap();
        assert_bounds_hold(&bounds, &exact);
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &range, limit).await.unwrap(),
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "{limit}"
            );
        }
        // Folded, the same.
        fold(&t).await;
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &range, limit).await.unwrap(),
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "{limit}"
            );
        }
        // A user in neither month's list whose two months still add up to the most: 40 users
        // call 10M tokens in March before the range, 40 others 10M in April after it (the
        // two lists), and one user 9M in each month, inside the range. The 21st listed bound
        // is about 10M; `rest` is the lists' last tokens, 20M, above that user's 18M.
        let (both, rows) = in_neither_list(db, "top-side", march, [3, 58], [20, 36]).await;
        insert(db, &rows).await;
        fold(&t).await;
        let exact = exact_bounds().await;
        assert_eq!(exact[&i64::from(both)], 18_000_000.0);
        let bounds = stats::user_bounds(db, &range, &plan, 1)
            .await
            .unwrap()
            .unwrap();
        assert!(!bounds.keys.contains(&i64::from(both)), "{bounds:?}");
        assert!(bounds.bounds[19] < 10_100_000.0, "{bounds:?}");
        assert!(bounds.rest.unwrap() >= 20_000_000.0, "{bounds:?}");
        for limit in [1, 3, 50] {
            let fast = stats_by_user(db, &range, limit).await.unwrap();
            assert_eq!(
                fast,
                stats_by_user_raw(db, &range, limit).await.unwrap(),
                "{limit}"
            );
            assert_eq!(fast[0].user_id, Some(both));
        }
        // The lists come from the month cells' index; on PostgreSQL each listed user's cells
        // are read by key (a join filter over every month cell took 100 ms for a month range
        // of 2025 at 10,000 users).
        let explained = plan_of(db, &top).await;
        assert!(
            explained.contains("llm_tracker_usage_rollup_total_month_top_idx"),
            "{explained}"
        );
        if backend == DbBackend::Postgres {
            assert!(!explained.contains("Join Filter"), "{explained}");
        }
        // A cover with a whole year in it holds a year cell: that cell's list comes from the
        // year cells' index (migration 000028), the months' from theirs.
        let long = UsageFilter {
            start: Some(Utc.with_ymd_and_hms(2023, 12, 15, 0, 0, 0).unwrap()),
            end: Some(march + Duration::days(20)),
            ..Default::default()
        };
        let long_cover = rollup::month_cover(&long).unwrap();
        let long_plan = rollup::plan(db, &long_cover, None, true)
            .await
            .unwrap()
            .unwrap();
        assert!(
            long_plan
                .coarse
                .iter()
                .any(|r| r.grain == migration::rollup::Calendar::Year.code()),
            "{long_plan:?}"
        );
        assert!(rollup::top_bound_statement(backend, &long_plan, k).is_some());
        for limit in [1, 3] {
            assert_eq!(
                stats_by_user(db, &long, limit).await.unwrap(),
                stats_by_user_raw(db, &long, limit).await.unwrap(),
                "{limit}"
            );
        }
        // Down drops the index; the lists are then read from the table, the same.
        bounds_without_index(
            &t,
            "m20261206_000026",
            "llm_tracker_usage_rollup_total_month_top_idx",
            &top,
            (&range, &plan),
        )
        .await;
    }
);

db_test!(
    async fn by_user_over_all_time_ranks_through_each_years_top_users(backend: Backend) {
        // Issue 16, migration 000028: "all time" is widened to whole years, so its cover is the
        // range itself, each user's year cells. The bounds come from each year's users with the
        // most tokens (rollup::top_bound_statement over year cells, from the year cells'
        // index), not from every user's cells: exact for the listed users, `rest` above every
        // user left out, and by_user the raw rows' answer. So does a range of one whole month.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let backend = db.get_database_backend();
        let names: Vec<String> = (0..300).map(|i| format!("year{i}")).collect();
        let ids = users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let weighted: Vec<i32> = ids
            .iter()
            .enumerate()
            .flat_map(|(k, id)| std::iter::repeat_n(*id, 300 / (k + 1)))
            .collect();
        let mut rng = StdRng::seed_from_u64(28);
        // November 2024 to February 2025: two calendar years.
        let november = Utc.with_ymd_and_hms(2024, 11, 1, 0, 0, 0).unwrap();
        let mut rows = random_rows(&mut rng, &weighted, november, 120, 3000, 1);
        for (i, id) in ids.iter().enumerate() {
            for (m, day) in [5, 70].into_iter().enumerate() {
                rows.push(row(
                    50_000 + 2 * i as u128 + m as u128,
                    Some(*id),
                    "gpt-4o",
                    (7, 3, 0, 0),
                    true,
                    november + Duration::days(day) + Duration::minutes(i as i64),
                ));
            }
        }
        // 40 users with 10M tokens in 2024, 40 others in 2025 (each year's list at limit 1),
        // and one user with 9M in each year: in neither list, the most of all.
        let (both, side_rows) =
            in_neither_list(db, "year-side", november, [10, 100], [20, 80]).await;
        rows.extend(side_rows);
        insert(db, &rows).await;
        fold(&t).await;
        // Pending, not folded: a few rows, and a tail user's call that lifts them over the rest
        // but not over `both`.
        let tail = ids[290];
        let mut pending_rows = random_rows(&mut rng, &weighted, november, 120, 40, 60_000);
        pending_rows.push(row(
            70_000,
            Some(tail),
            "gpt-4o",
            (11_000_000, 1_000_000, 0, 0),
            true,
            november + Duration::days(90),
        ));
        insert(db, &pending_rows).await;
        let all = UsageFilter::default();
        let plan = rollup::plan(db, &all, None, true).await.unwrap().unwrap();
        let year = migration::rollup::Calendar::Year.code();
        assert!(plan.coarse.iter().all(|r| r.grain == year), "{plan:?}");
        let (cover, cover_plan) = stats::bound_plan(db, &all, &plan, 1)
            .await
            .unwrap()
            .expect("bounds over the year cells");
        let k = stats::top_listed_users(stats::bounded_users(1));
        let top = rollup::top_bound_statement(backend, &cover_plan, k).expect("whole years");
        assert_eq!(
            stats::bounds_statement(backend, &cover, &cover_plan, 1),
            top
        );
        let exact = exact_cover_bounds(db, &cover, &cover_plan).await;
        assert_eq!(exact[&i64::from(both)], 18_000_000.0);
        assert!(exact[&i64::from(tail)] > 12_000_000.0);
        for limit in [1, 3, 10] {
            let bounds = stats::user_bounds(db, &all, &plan, limit)
                .await
                .unwrap()
                .unwrap();
            let n = usize::try_from(stats::bounded_users(limit)).unwrap();
            assert_eq!(bounds.keys.len(), n);
            assert_bounds_hold(&bounds, &exact);
        }
        let bounds = stats::user_bounds(db, &all, &plan, 1)
            .await
            .unwrap()
            .unwrap();
        assert!(!bounds.keys.contains(&i64::from(both)), "{bounds:?}");
        assert!(bounds.rest.unwrap() >= 20_000_000.0, "{bounds:?}");
        for limit in [1, 3, 10, 50] {
            let fast = stats_by_user(db, &all, limit).await.unwrap();
            assert_eq!(
                fast,
                stats_by_user_raw(db, &all, limit).await.unwrap(),
                "{limit}"
            );
            assert_eq!(fast[0].user_id, Some(both));
            if limit > 1 {
                assert_eq!(fast[1].user_id, Some(tail));
            }
        }
        // One whole month: its cover is the range itself too, bounded through its month cell.
        let january = UsageFilter {
            start: Some(Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()),
            end: Some(
                Utc.with_ymd_and_hms(2025, 2, 1, 0, 0, 0).unwrap() - Duration::microseconds(1),
            ),
            ..Default::default()
        };
        let month_plan = rollup::plan(db, &january, None, true)
            .await
            .unwrap()
            .unwrap();
        assert!(
            stats::bound_plan(db, &january, &month_plan, 3)
                .await
                .unwrap()
                .is_some()
        );
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &january, limit).await.unwrap(),
                stats_by_user_raw(db, &january, limit).await.unwrap(),
                "{limit}"
            );
        }
        // A cover of 2024's year cell and January 2025's month cell, which start at the same
        // slot as 2025's year cell: the listed users' bounds are their tokens over those two
        // cells alone.
        let mixed = UsageFilter {
            start: Some(Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()),
            end: january.end,
            ..Default::default()
        };
        let mixed_plan = rollup::plan(db, &mixed, None, true).await.unwrap().unwrap();
        let (mixed_cover, mixed_cover_plan) = stats::bound_plan(db, &mixed, &mixed_plan, 3)
            .await
            .unwrap()
            .expect("bounds over a year and a month");
        let month = migration::rollup::Calendar::Month.code();
        let grains: Vec<i64> = mixed_cover_plan.coarse.iter().map(|r| r.grain).collect();
        assert_eq!(grains, vec![year, month], "{mixed_cover_plan:?}");
        let mixed_exact = exact_cover_bounds(db, &mixed_cover, &mixed_cover_plan).await;
        let bounds = stats::user_bounds(db, &mixed, &mixed_plan, 3)
            .await
            .unwrap()
            .unwrap();
        assert_bounds_hold(&bounds, &mixed_exact);
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &mixed, limit).await.unwrap(),
                stats_by_user_raw(db, &mixed, limit).await.unwrap(),
                "{limit}"
            );
        }
        // Folded, the same.
        fold(&t).await;
        for limit in [1, 3, 50] {
            assert_eq!(
                stats_by_user(db, &all, limit).await.unwrap(),
                stats_by_user_raw(db, &all, limit).await.unwrap(),
                "{limit}"
            );
        }
        // The lists come from the year cells' index; down drops it, and the bounds are then
        // read from the table, the same.
        let index = "llm_tracker_usage_rollup_total_year_top_idx";
        let explained = plan_of(db, &top).await;
        assert!(explained.contains(index), "{explained}");
        // On PostgreSQL each listed user's cells are a subquery of their own (`OFFSET 0`), read
        // by key, not a join whose filter tests every year cell against the list.
        if backend == DbBackend::Postgres {
            assert!(!explained.contains("Join Filter"), "{explained}");
        }
        bounds_without_index(&t, "m20261208_000028", index, &top, (&all, &plan)).await;
    }
);

db_test!(
    async fn the_chosen_users_rows_are_index_ranges_with_or_without_a_user(backend: Backend) {
        // Issue 16, migration 000027: by_user reads the rows of the users it chose on a partial
        // day as a list joined to the (user_id, created_at) index, and the calls made for no
        // user through their own partial index, never the whole time range's rows tested
        // against a list (stats::raw_user_statement).
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["e1", "e2", "e3", "e4"]).await;
        let mut rng = StdRng::seed_from_u64(27);
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        insert(db, &random_rows(&mut rng, &ids, base, 10, 1500, 1)).await;
        db.execute_unprepared("ANALYZE").await.unwrap();
        let part = UsageFilter {
            start: Some(base + Duration::days(2) + Duration::hours(5)),
            end: Some(base + Duration::days(4) + Duration::hours(15)),
            ..Default::default()
        };
        let backend = db.get_database_backend();
        let raw = stats_by_user_raw(db, &part, 1000).await.unwrap();
        let of = |user: Option<i32>| raw.iter().find(|u| u.user_id == user).unwrap();
        assert!(raw.len() == 5 && raw.iter().all(|u| u.total_calls > 0));
        // Two users, one of them twice, and the calls made for no user.
        let keys = [
            rollup::key_of(Some(ids[0])),
            rollup::key_of(Some(ids[2])),
            rollup::key_of(None),
            rollup::key_of(Some(ids[2])),
        ];
        let read = |stmt: sea_orm::Statement| async move {
            let mut got: Vec<(Option<i32>, i64, i64)> = db
                .query_all_raw(stmt)
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.try_get("", "user_id").unwrap(),
                        r.try_get("", "total_calls").unwrap(),
                        r.try_get("", "total_tokens").unwrap(),
                    )
                })
                .collect();
            got.sort();
            got
        };
        let mut want: Vec<(Option<i32>, i64, i64)> = [None, Some(ids[0]), Some(ids[2])]
            .into_iter()
            .map(|u| (u, of(u).total_calls, of(u).total_tokens))
            .collect();
        want.sort();
        let stmt = stats::raw_user_statement(backend, &part, Some(&keys));
        assert_eq!(read(stmt.clone()).await, want);
        // (SQLite reads the calls made for no user as a range of the (user_id, created_at)
        // index: the partial index is PostgreSQL's only.)
        let pg = backend == DbBackend::Postgres;
        let explained = plan_of(db, &stmt).await;
        assert!(
            explained.contains("llm_tracker_usage_user_created_idx")
                && (!pg || explained.contains("llm_tracker_usage_no_user_created_idx"))
                && !explained.contains("llm_tracker_usage_created_at_f9de3faa")
                && !explained
                    .lines()
                    .any(|l| l.starts_with("SCAN llm_tracker_usage")),
            "{explained}"
        );
        // Migration 000034: once the table is vacuumed, the calls made for no user are read
        // from their index alone, as the users' rows from theirs (000033) — on the statement's
        // generic plan too, which the statistics run it on (the list is one parameter).
        if pg {
            vacuum_until_all_visible(&t).await;
            let explained = plan_of(db, &stmt).await;
            let generic = generic_plan_of(db, &stmt).await;
            assert!(
                explained.contains("Index Only Scan using llm_tracker_usage_no_user_created_idx")
                    && explained
                        .contains("Index Only Scan using llm_tracker_usage_user_created_idx"),
                "not read from the indexes alone:\n{explained}"
            );
            // The generic plan reads each part as a range of an index, alone: the no-user
            // calls from their partial index or as the `user_id IS NULL` range of the user
            // index, whichever the planner prices lower (on this small table, the latter).
            let scans: Vec<&str> = generic
                .lines()
                .filter(|l| l.contains(" on llm_tracker_usage"))
                .collect();
            assert!(
                generic.contains("$1")
                    && scans.len() == 2
                    && scans.iter().all(|l| l.contains("Index Only Scan using"))
                    && !generic.contains("llm_tracker_usage_created_at_f9de3faa"),
                "not read from the indexes alone on the generic plan:\n{generic}"
            );
            // The statement's text does not depend on the list's length.
            let more =
                stats::raw_user_statement(backend, &part, Some(&[keys[0], keys[1], keys[2], 7, 8]));
            assert_eq!(more.sql, stmt.sql);
        }
        // Users only; no user only; nobody.
        let users_only = stats::raw_user_statement(backend, &part, Some(&keys[..2]));
        assert_eq!(read(users_only).await, want[1..].to_vec());
        let nobody = stats::raw_user_statement(backend, &part, Some(&keys[2..3]));
        assert_eq!(read(nobody).await, want[..1].to_vec());
        let none = stats::raw_user_statement(backend, &part, Some(&[]));
        assert!(read(none).await.is_empty());
        // Down drops the index, the sums stay.
        let index = "llm_tracker_usage_no_user_created_idx";
        assert_eq!(index_count(&t, index).await, i64::from(pg));
        crate::helpers::down_through(db, "m20261207_000027").await;
        assert_eq!(index_count(&t, index).await, 0);
        assert_eq!(read(stmt.clone()).await, want);
        migration::Migrator::up(db, None).await.unwrap();
        assert_eq!(index_count(&t, index).await, i64::from(pg));
    }
);

db_test!(
    async fn a_rebuild_makes_dense_the_users_whose_rows_hold_a_busy_day(backend: Backend) {
        // Issue 16: rows written for past days (a bulk load, an import through the ingest API)
        // hold busy days that the fold's promotion (yesterday and today only) never looks at. A
        // rebuild makes dense every user with a UTC day of DENSE_DAY_CALLS calls, from their
        // first day, as migration 000025 did; a user dense already keeps their window.
        use migration::rollup::{DENSE_TABLE, TOTALS_TABLE};
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["busy", "calm"]).await;
        let mut rng = StdRng::seed_from_u64(2511);
        let base = Utc.with_ymd_and_hms(2025, 5, 1, 0, 0, 0).unwrap();
        // About 240 calls a day for the busy user, 16 for the calm one.
        let mut rows = random_rows(&mut rng, &[ids[0]], base, 10, 3000, 1);
        rows.extend(random_rows(&mut rng, &[ids[1]], base, 10, 200, 10_000));
        insert(db, &rows).await;
        fold(&t).await;
        let dense = format!("SELECT COUNT(*) FROM {DENSE_TABLE}");
        let hours = format!(
            "SELECT COUNT(*) FROM {TOTALS_TABLE} WHERE grain = 4 AND user_key = {}",
            ids[0]
        );
        assert_eq!(t.scalar_i64(&dense).await, 0);
        assert_eq!(t.scalar_i64(&hours).await, 0);
        rollup::rebuild(db).await.unwrap();
        assert_eq!(t.scalar_i64(&dense).await, 1);
        assert_eq!(
            t.scalar_i64(&format!("SELECT user_key FROM {DENSE_TABLE}"))
                .await,
            i64::from(ids[0])
        );
        let first_day = t
            .scalar_i64(&format!(
                "SELECT MIN(slot) FROM {TOTALS_TABLE} WHERE grain = 96 AND user_key = {}",
                ids[0]
            ))
            .await;
        assert_eq!(
            t.scalar_i64(&format!("SELECT since FROM {DENSE_TABLE}"))
                .await,
            first_day
        );
        assert!(t.scalar_i64(&hours).await > 100);
        assert_verified(db).await;
        let busy = UsageFilter {
            user_id: Some(ids[0]),
            ..Default::default()
        };
        assert_same(db, &busy, "Asia/Kolkata".parse().unwrap(), false).await;
        // Again: nothing new, the same cells.
        let cells = t.scalar_i64(&hours).await;
        rollup::rebuild(db).await.unwrap();
        assert_eq!(t.scalar_i64(&dense).await, 1);
        assert_eq!(t.scalar_i64(&hours).await, cells);
        assert_verified(db).await;
    }
);

/// The plan `stmt` gets under token-stats' planner settings: PostgreSQL's `EXPLAIN` lines, or
/// SQLite's `EXPLAIN QUERY PLAN` details, one per line.
/// Users for a user in neither of two calendar cells' lists of top users (at `user_limit` 1,
/// 40 long): 40 users with ~10M tokens each on day `lists[0]` after `base` and 40 others on day
/// `lists[1]`, and one user (returned) with 9M tokens on each of `both_days`, 18M in all, the
/// most of anyone; user names start with `prefix`, row ids at 80,000.
async fn in_neither_list(
    db: &DatabaseConnection,
    prefix: &str,
    base: DateTime<Utc>,
    lists: [i64; 2],
    both_days: [i64; 2],
) -> (i32, Vec<usage::Model>) {
    let side: Vec<String> = (0..81).map(|i| format!("{prefix}{i}")).collect();
    let side = users(db, &side.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let both = side[80];
    let mut rows = Vec::new();
    for (i, id) in side[..80].iter().enumerate() {
        let (day, extra) = if i < 40 {
            (lists[0], i)
        } else {
            (lists[1], i - 40)
        };
        rows.push(row(
            80_000 + i as u128,
            Some(*id),
            "gpt-4o",
            (9_000_000 + 1000 * extra as i32, 1_000_000, 0, 0),
            true,
            base + Duration::days(day),
        ));
    }
    for (i, day) in both_days.into_iter().enumerate() {
        rows.push(row(
            80_100 + i as u128,
            Some(both),
            "gpt-4o",
            (8_000_000, 1_000_000, 0, 0),
            true,
            base + Duration::days(day),
        ));
    }
    // Nine calls of no tokens each, on the same days, make every year full (10 calls or
    // more): a light year has no month cell to be listed by (migration 000032).
    let extra: Vec<usage::Model> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            (0..9).map(move |k| {
                row(
                    80_200 + 10 * i as u128 + k,
                    r.user_id,
                    "gpt-4o",
                    (0, 0, 0, 0),
                    true,
                    r.created_at,
                )
            })
        })
        .collect();
    rows.extend(extra);
    (both, rows)
}

/// Every user's exact bound over `cover` (its plan `cover_plan`): their cover's cells and
/// pending contributions, summed (`rollup::bound_statement` over all users).
async fn exact_cover_bounds(
    db: &DatabaseConnection,
    cover: &UsageFilter,
    cover_plan: &rollup::Plan,
) -> std::collections::HashMap<i64, f64> {
    let backend = db.get_database_backend();
    let mut exact: std::collections::HashMap<i64, f64> = db
        .query_all_raw(rollup::bound_statement(backend, cover_plan, cover, 100_000))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get_by_index(0).unwrap(),
                r.try_get_by_index(1).unwrap(),
            )
        })
        .collect();
    // A light year's months have no cells (migration 000032): bounded by its year cell.
    let years = stats::cover_light_years(cover_plan);
    for (key, tokens) in stats::light_year_tokens(db, None, &years).await.unwrap() {
        *exact.entry(key).or_default() += tokens as f64;
    }
    exact
}

/// `bounds` against every user's exact bound: the listed users' are exact and in order, and
/// `rest` is at least every bound left out.
fn assert_bounds_hold(bounds: &rollup::UserBounds, exact: &std::collections::HashMap<i64, f64>) {
    for (key, bound) in bounds.keys.iter().zip(&bounds.bounds) {
        assert_eq!(
            exact.get(key).copied().unwrap_or(0.0),
            *bound,
            "user key {key}"
        );
    }
    assert!(bounds.bounds.windows(2).all(|w| w[0] >= w[1]), "{bounds:?}");
    let rest = bounds.rest.expect("users are left out");
    for (key, bound) in exact {
        if !bounds.keys.contains(key) {
            assert!(*bound <= rest, "user key {key}: {bound} > {rest}");
        }
    }
}

/// Down through the migration `through` drops `index`: the lists statement `top` no longer reads it, and
/// `by_user`'s bounds over `range` (its plan) are the same without it (both before migration
/// 000032, which changes them); up brings the index back and `top` reads it again.
async fn bounds_without_index(
    t: &TestDb,
    through: &str,
    index: &str,
    top: &sea_orm::Statement,
    (range, plan): (&UsageFilter, &rollup::Plan),
) {
    let db = &t.db;
    // (Light years first: the bounds below compare one layout with and without the index.)
    crate::helpers::down_through(db, "m20261212_000032_rollup_light_years").await;
    let before = stats::user_bounds(db, range, plan, 3).await.unwrap();
    crate::helpers::down_through(db, through).await;
    assert_eq!(index_count(t, index).await, 0);
    let explained = plan_of(db, top).await;
    assert!(!explained.contains(index), "{explained}");
    assert_eq!(
        stats::user_bounds(db, range, plan, 3).await.unwrap(),
        before
    );
    migration::Migrator::up(db, None).await.unwrap();
    assert_eq!(index_count(t, index).await, 1);
    assert!(plan_of(db, top).await.contains(index));
}

/// How many indexes named `name` the database has.
async fn index_count(t: &TestDb, name: &str) -> i64 {
    let sql = match t.db.get_database_backend() {
        DbBackend::Postgres => {
            format!("SELECT COUNT(*) FROM pg_indexes WHERE indexname = '{name}'")
        }
        _ => format!("SELECT COUNT(*) FROM sqlite_master WHERE name = '{name}'"),
    };
    t.scalar_i64(&sql).await
}

/// PostgreSQL's `EXPLAIN` lines for `stmt` under the planner settings of one user's index
/// range (`Dialect::user_range_settings`).
async fn user_range_plan(db: &DatabaseConnection, stmt: &sea_orm::Statement) -> String {
    let txn = db.begin().await.unwrap();
    let settings = llm_tracker::db::Dialect::Postgres
        .user_range_settings()
        .unwrap();
    txn.execute_unprepared(settings).await.unwrap();
    let plan: Vec<String> = txn
        .query_all_raw(plans::explain(DbBackend::Postgres, stmt))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect();
    txn.rollback().await.unwrap();
    plan.join("\n")
}

/// `VACUUM (ANALYZE)` of the usage table (PostgreSQL) until `pg_class` says every page is
/// all-visible: a vacuum leaves a page unmarked while another session pins it or while a
/// transaction older than its rows runs, as under the whole suite's load, so it runs again
/// (at most 100 times, 100 ms apart).
async fn vacuum_until_all_visible(t: &TestDb) {
    let mut vacuums = 0;
    loop {
        t.db.execute_unprepared("VACUUM (ANALYZE) llm_tracker_usage")
            .await
            .unwrap();
        vacuums += 1;
        let marked = t
            .scalar_i64(
                "SELECT CAST(CAST(relallvisible = relpages AS INTEGER) AS BIGINT) FROM pg_class \
                 WHERE relname = 'llm_tracker_usage'",
            )
            .await;
        if marked == 1 {
            return;
        }
        assert!(
            vacuums < 100,
            "pages still not all-visible after {vacuums} vacuums"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// PostgreSQL: the generic plan of `stmt` (`PREPARE`, then `EXPLAIN EXECUTE` under
/// `plan_cache_mode = force_generic_plan`, the statement's values given as literals), under
/// the statistics' planner settings.
async fn generic_plan_of(db: &DatabaseConnection, stmt: &sea_orm::Statement) -> String {
    use sea_orm::sea_query::{PostgresQueryBuilder, QueryBuilder};
    let args: Vec<String> = stmt
        .values
        .iter()
        .flat_map(|v| v.0.iter())
        .map(|v| PostgresQueryBuilder.value_to_string(v))
        .collect();
    let txn = db.begin().await.unwrap();
    if let Some(settings) = plans::token_stats_settings(DbBackend::Postgres) {
        txn.execute_unprepared(&settings).await.unwrap();
    }
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    txn.execute_unprepared(&format!("PREPARE generic_plan_of AS {}", stmt.sql))
        .await
        .unwrap();
    let rows = txn
        .query_all_raw(sea_orm::Statement::from_string(
            DbBackend::Postgres,
            format!("EXPLAIN EXECUTE generic_plan_of({})", args.join(", ")),
        ))
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    rows.iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn plan_of(db: &DatabaseConnection, stmt: &sea_orm::Statement) -> String {
    let backend = db.get_database_backend();
    let txn = db.begin().await.unwrap();
    if let Some(settings) = plans::token_stats_settings(backend) {
        txn.execute_unprepared(&settings).await.unwrap();
    }
    let mut explain = plans::explain(backend, stmt);
    if backend == DbBackend::Sqlite {
        // A SQLite connection checks that its schema is current when a statement reads a
        // table, which `EXPLAIN QUERY PLAN` does not, and a statement it prepared before keeps
        // its plan: an index made or dropped since would be missed. So the schema is read
        // first, and each explanation is a text of its own.
        static EXPLAINED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        txn.execute_unprepared("SELECT COUNT(*) FROM sqlite_master")
            .await
            .unwrap();
        let n = EXPLAINED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        explain.sql = format!("{} -- {n}", explain.sql);
    }
    let rows = txn.query_all_raw(explain).await.unwrap();
    txn.rollback().await.unwrap();
    let column = if backend == DbBackend::Postgres { 0 } else { 3 };
    rows.iter()
        .map(|r| r.try_get_by_index::<String>(column).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

db_test!(
    async fn the_bounds_check_for_negative_tokens_through_the_partial_index(backend: Backend) {
        // Migration 000024: "is there a row with negative tokens?" (asked before every bounded
        // by_user ranking) reads the partial index, never the usage table; down drops it.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["n1", "n2", "n3"]).await;
        let mut rng = StdRng::seed_from_u64(2424);
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        insert(db, &random_rows(&mut rng, &ids, base, 60, 500, 1)).await;
        fold(&t).await;
        let filter = UsageFilter {
            start: Some(base + Duration::days(14) + Duration::hours(14)),
            end: Some(base + Duration::days(44) + Duration::hours(14)),
            ..Default::default()
        };
        let pg = db.get_database_backend() == DbBackend::Postgres;
        let statements = plans::by_user_bound_statements(db, &filter, 50)
            .await
            .unwrap()
            .expect("bounds apply to 30 days from mid-month");
        assert_eq!(statements.len(), 2);
        let plan = plan_of(db, &statements[0]).await;
        assert!(
            plan.contains("llm_tracker_usage_negative_tokens_idx"),
            "{plan}"
        );
        // (SQLite scans the partial index, which holds only such rows.)
        assert!(
            !plan.contains("Seq Scan")
                && !plan.lines().any(|l| l.trim() == "SCAN llm_tracker_usage"),
            "{plan}"
        );
        crate::helpers::down_through(db, "m20261204_000024").await;
        let index_count = |sql: &'static str| t.scalar_i64(sql);
        let sql = if pg {
            "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'llm_tracker_usage_negative_tokens_idx'"
        } else {
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'llm_tracker_usage_negative_tokens_idx'"
        };
        assert_eq!(index_count(sql).await, 0);
        migration::Migrator::up(db, None).await.unwrap();
        assert_eq!(index_count(sql).await, 1);
        if pg {
            // A build cut off midway leaves an invalid index and the migration unrecorded: run
            // again, it builds a valid one.
            db.execute_unprepared(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = \
                 'llm_tracker_usage_negative_tokens_idx'::regclass",
            )
            .await
            .unwrap();
            db.execute_unprepared(
                "DELETE FROM seaql_migrations WHERE version = 'm20261204_000024_negative_tokens_index'",
            )
            .await
            .unwrap();
            migration::Migrator::up(db, None).await.unwrap();
            assert_eq!(
                t.scalar_i64(
                    "SELECT COUNT(*) FROM pg_index WHERE indisvalid AND indexrelid = \
                     'llm_tracker_usage_negative_tokens_idx'::regclass"
                )
                .await,
                1
            );
        }
    }
);

db_test!(
    async fn the_migration_backfills_existing_rows(backend: Backend) {
        let t = TestDb::empty(backend).await;
        let db = &t.db;
        // The schema as it was before the rollup, with rows in it.
        migration::Migrator::up(db, Some(4)).await.unwrap();
        let ids = users(db, &["b1", "b2"]).await;
        let mut rng = StdRng::seed_from_u64(99);
        let base = Utc.with_ymd_and_hms(2025, 10, 20, 0, 0, 0).unwrap();
        let rows = random_rows(&mut rng, &ids, base, 10, 500, 1);
        for r in &rows {
            db.execute_unprepared(&plain_insert(db.get_database_backend(), r))
                .await
                .unwrap();
        }
        // Migration 000005: the cells, backfilled, kept by direct upserts in the triggers.
        migration::Migrator::up(db, Some(1)).await.unwrap();
        assert_eq!(counted(&t).await, 500);
        insert(db, &random_rows(&mut rng, &ids, base, 10, 50, 5_000)).await;
        assert_eq!(counted(&t).await, 550);
        // Migration 000006: writes go to the delta table; the cells stay as they were.
        migration::Migrator::up(db, None).await.unwrap();
        assert_verified(db).await;
        assert_eq!(pending(&t).await, 0);
        for zone in ["UTC", "Asia/Kathmandu"] {
            assert!(assert_same(db, &UsageFilter::default(), zone.parse().unwrap(), false).await);
        }
        // And it is kept from then on.
        let more = random_rows(&mut rng, &ids, base, 10, 100, 10_000);
        insert(db, &more).await;
        assert_eq!(pending(&t).await, 100);
        assert_eq!(counted(&t).await, 550);
        assert_verified(db).await;
        let all = list_usage(db, &UsageFilter::default(), 1, 1).await.unwrap();
        assert_eq!(all.total, 650);
        // 000007 down (after 000012, 000011, 000010, 000009 and 000008) drops the :15/:30 hour cells; up sums them again from
        // the slot cells.
        let phased = "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE grain IN (5, 6)";
        assert!(t.scalar_i64(phased).await > 0);
        crate::helpers::down_through(db, "m20261123_000007").await;
        assert_eq!(t.scalar_i64(phased).await, 0);
        migration::Migrator::up(db, None).await.unwrap();
        assert_verified(db).await;
        // Down to 000005 folds what is pending and puts the direct triggers back.
        crate::helpers::down_through(db, "m20251215_000006").await;
        assert!(
            !t.tables()
                .await
                .contains(&migration::rollup::DELTA_TABLE.to_owned())
        );
        assert_eq!(counted(&t).await, 650);
        insert(db, &random_rows(&mut rng, &ids, base, 1, 5, 15_000)).await;
        assert_eq!(counted(&t).await, 655);
        migration::Migrator::up(db, None).await.unwrap();
        assert_verified(db).await;
        if backend == crate::helpers::Backend::Postgres {
            insert(db, &random_rows(&mut rng, &ids, base, 1, 5, 17_000)).await;
            db.execute_unprepared("TRUNCATE llm_tracker_usage")
                .await
                .unwrap();
            for table in [
                "llm_tracker_usage_rollup",
                "llm_tracker_usage_rollup_total",
                migration::rollup::DELTA_TABLE,
                migration::rollup::LATENCY_TABLE,
                migration::rollup::USER_LATENCY_TABLE,
            ] {
                assert_eq!(
                    t.scalar_i64(&format!("SELECT COUNT(*) FROM {table}")).await,
                    0
                );
            }
        }
        // Down removes the tables and their triggers; rows can still be written.
        crate::helpers::down_through(db, "m20251201_000005").await;
        insert(db, &random_rows(&mut rng, &ids, base, 1, 3, 20_000)).await;
        let tables = t.tables().await;
        assert!(!tables.contains(&"llm_tracker_usage_rollup".to_owned()));
        assert!(!tables.contains(&"llm_tracker_usage_rollup_total".to_owned()));
    }
);

/// `db::migrate` vacuums the rollup tables after the migrations that filled them (PostgreSQL:
/// without it their pages are not all-visible and every index-only read visits the heap).
mod migrate_vacuums_the_rollup_tables_it_filled {
    use super::*;

    #[actix_web::test]
    async fn postgres() {
        let t = TestDb::empty(crate::helpers::Backend::Postgres).await;
        let db = &t.db;
        migration::Migrator::up(db, Some(4)).await.unwrap();
        let ids = users(db, &["v1", "v2"]).await;
        let mut rng = StdRng::seed_from_u64(7);
        let base = Utc.with_ymd_and_hms(2025, 10, 20, 0, 0, 0).unwrap();
        for r in &random_rows(&mut rng, &ids, base, 60, 3_000, 1) {
            db.execute_unprepared(&plain_insert(db.get_database_backend(), r))
                .await
                .unwrap();
        }
        llm_tracker::db::migrate(db).await.unwrap();
        // Whether each page ends up marked depends on the snapshots open meanwhile (an
        // autoanalyze of the rows just written holds one: a run of the whole suite saw 115 of
        // 317 pages marked); that `migrate` vacuumed is what the statistics say.
        for table in [
            "llm_tracker_usage_rollup",
            "llm_tracker_usage_rollup_total",
            "llm_tracker_usage_latency",
            "llm_tracker_usage_latency_user",
        ] {
            let vacuums = t
                .scalar_i64(&format!(
                    "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = '{table}'"
                ))
                .await;
            assert_eq!(vacuums, 1, "{table}");
        }
        let pages = t
            .scalar_i64(
                "SELECT CAST(relpages AS BIGINT) FROM pg_class \
                 WHERE relname = 'llm_tracker_usage_rollup'",
            )
            .await;
        assert!(pages > 1, "{pages} pages");
        assert_verified(db).await;
    }
}

db_test!(
    async fn eight_writers_and_readers_at_once_leave_exact_totals(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let ids = users(&t.db, &["c1", "c2"]).await;
        let base = Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (db, stop) = (t.db.clone(), stop.clone());
            readers.push(tokio::spawn(async move {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let filter = UsageFilter::default();
                    token_stats_in(
                        &db,
                        &filter,
                        Some(Granularity::Day),
                        SeriesOptions::default(),
                    )
                    .await
                    .unwrap();
                    reads += 1;
                }
                reads
            }));
        }
        // Two folders at once, as two servers would run them.
        let mut folders = Vec::new();
        for _ in 0..2 {
            let (db, stop) = (t.db.clone(), stop.clone());
            folders.push(tokio::spawn(async move {
                let mut folds = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if rollup::fold(&db).await.unwrap() {
                        folds += 1;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                folds
            }));
        }
        let mut writers = Vec::new();
        for w in 0..8u128 {
            let (db, ids) = (t.db.clone(), ids.clone());
            writers.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w as u64);
                // The same few cells for everyone (a busy hour), single rows and batches.
                let rows = random_rows(&mut rng, &ids, base, 1, 240, w * 1_000_000 + 1);
                let mut rest = &rows[..];
                while !rest.is_empty() {
                    let n = rng.random_range(1..=12).min(rest.len());
                    usage::insert_rows(&db, &rest[..n]).await.unwrap();
                    rest = &rest[n..];
                }
                rows.iter().map(|r| i64::from(r.total_tokens)).sum::<i64>()
            }));
        }
        let mut tokens = 0;
        for w in writers {
            tokens += w.await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            assert!(r.await.unwrap() > 0);
        }
        let mut folds = 0;
        for f in folders {
            folds += f.await.unwrap();
        }
        assert!(folds > 0);
        let all = UsageFilter::default();
        let stats = token_stats_in(&t.db, &all, None, SeriesOptions::default())
            .await
            .unwrap();
        assert_eq!(stats.summary.total_calls, 8 * 240);
        assert_eq!(stats.summary.total_tokens, tokens);
        assert_verified(&t.db).await;
        assert!(assert_same(&t.db, &all, Tz::UTC, false).await);
    }
);

db_test!(
    async fn rollup_verify_finds_drift_and_rebuild_repairs_it(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let ids = users(&t.db, &["v1"]).await;
        let mut rng = StdRng::seed_from_u64(5);
        let base = Utc.with_ymd_and_hms(2025, 1, 10, 0, 0, 0).unwrap();
        insert(&t.db, &random_rows(&mut rng, &ids, base, 3, 200, 1)).await;

        let ok = cmd(&t, &["rollup", "verify"], &[]);
        assert!(ok.status.success(), "{}", stderr(&ok));
        assert!(stdout(&ok).contains(", 0 differ"), "{}", stdout(&ok));

        // `rollup fold` moves the pending rows into the cells; nothing differs after it.
        assert_eq!(pending_calls(&t).await, 200);
        let folded = cmd(&t, &["rollup", "fold"], &[]);
        assert!(folded.status.success(), "{}", stderr(&folded));
        assert!(
            stdout(&folded).contains("pending rows folded"),
            "{}",
            stdout(&folded)
        );
        assert_eq!(pending(&t).await, 0);
        let ok = cmd(&t, &["rollup", "verify"], &[]);
        assert!(stdout(&ok).contains(", 0 differ"), "{}", stdout(&ok));

        // Drift: someone edits the rollup by hand.
        t.db.execute_unprepared(
            "UPDATE llm_tracker_usage_rollup SET calls = calls + 1 WHERE grain = 4",
        )
        .await
        .unwrap();
        t.db.execute_unprepared("DELETE FROM llm_tracker_usage_rollup_total WHERE grain = 1")
            .await
            .unwrap();
        let bad = cmd(
            &t,
            &[
                "rollup",
                "verify",
                "--since",
                "2025-01-11",
                "--until",
                "2025-01-11",
            ],
            &[],
        );
        assert!(!bad.status.success());
        assert!(
            stdout(&bad).contains("differs: llm_tracker_usage_rollup: grain=4"),
            "{}",
            stdout(&bad)
        );
        assert!(
            stdout(&bad).contains("differs: llm_tracker_usage_rollup_total: grain=1"),
            "{}",
            stdout(&bad)
        );
        assert!(stderr(&bad).contains("rollup rebuild"), "{}", stderr(&bad));
        // Outside the drifted days nothing differs.
        let before = cmd(&t, &["rollup", "verify", "--until", "2025-01-05"], &[]);
        assert!(before.status.success(), "{}", stdout(&before));

        let rebuilt = cmd(&t, &["rollup", "rebuild"], &[]);
        assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
        assert!(stdout(&rebuilt).contains("rollup rebuilt"));
        assert_verified(&t.db).await;

        let bad_date = cmd(&t, &["rollup", "verify", "--since", "yesterday"], &[]);
        assert!(!bad_date.status.success());
        assert!(
            stderr(&bad_date).contains("--since"),
            "{}",
            stderr(&bad_date)
        );
    }
);

db_test!(
    async fn a_usage_store_folds_every_interval_and_once_more_at_shutdown(backend: Backend) {
        use llm_tracker::tracker::{StoreOptions, UsageStore};
        let t = TestDb::migrated(backend).await;
        let ids = users(&t.db, &["f1"]).await;
        let base = Utc.with_ymd_and_hms(2025, 2, 1, 0, 0, 0).unwrap();
        let mut rng = StdRng::seed_from_u64(8);
        let dir = tempfile::tempdir().unwrap();

        // Every 50 ms: rows stored through the store (and rows it did not write, as the Django
        // app's) are folded soon after, without anyone asking.
        let mut opts = StoreOptions::new(dir.path().join("a.jsonl"));
        opts.fold_interval = Some(std::time::Duration::from_millis(50));
        let store = UsageStore::open(t.db.clone(), opts).await;
        for r in random_rows(&mut rng, &ids, base, 2, 30, 1) {
            store.record(r).await;
        }
        for r in random_rows(&mut rng, &ids, base, 2, 10, 100) {
            t.db.execute_unprepared(&plain_insert(t.db.get_database_backend(), &r))
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pending(&t).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing folded the delta"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(counted(&t).await, 40);
        store.shutdown().await;

        // Once an hour: only the fold at shutdown runs, after the last row.
        let mut opts = StoreOptions::new(dir.path().join("b.jsonl"));
        opts.fold_interval = Some(std::time::Duration::from_secs(3600));
        // Committed before `record` returns, however loaded the machine (a row that missed the
        // usual 10 ms deadline would reach the table later, through the spool).
        opts.commit_deadline = std::time::Duration::from_secs(30);
        let store = UsageStore::open(t.db.clone(), opts).await;
        for r in random_rows(&mut rng, &ids, base, 2, 5, 200) {
            store.record(r).await;
        }
        assert_eq!(pending(&t).await, 5);
        store.shutdown().await;
        assert_eq!(pending(&t).await, 0);
        assert_eq!(counted(&t).await, 45);

        // None: this store never folds.
        let mut opts = StoreOptions::new(dir.path().join("c.jsonl"));
        opts.fold_interval = None;
        opts.commit_deadline = std::time::Duration::from_secs(30);
        let store = UsageStore::open(t.db.clone(), opts).await;
        for r in random_rows(&mut rng, &ids, base, 2, 3, 300) {
            store.record(r).await;
        }
        store.shutdown().await;
        assert_eq!(pending(&t).await, 3);
        assert_verified(&t.db).await;
    }
);

db_test!(
    async fn the_by_user_ranking_reads_the_rank_index_and_the_delta_by_slot(backend: Backend) {
        // Migration 000013: on PostgreSQL the ranking of `include=by_user` is an index-only
        // scan of (grain, slot, user_key) INCLUDE (calls, total_tokens), and the pending
        // contributions are found through the delta's slot index (not a scan of its pages);
        // SQLite keeps 000011's index.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["k1", "k2", "k3", "k4", "k5", "k6"]).await;
        let mut rng = StdRng::seed_from_u64(13);
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        insert(db, &random_rows(&mut rng, &ids, base, 60, 3000, 1)).await;
        fold(&t).await;
        let pg = db.get_database_backend() == DbBackend::Postgres;
        if pg {
            // What autovacuum does after folds: the visibility map lets the scan skip the heap.
            for table in [
                "llm_tracker_usage_rollup_total",
                "llm_tracker_usage_rollup_delta",
            ] {
                db.execute_unprepared(&format!("VACUUM ANALYZE {table}"))
                    .await
                    .unwrap();
            }
        }
        // A calendar month and three days: the month cell and three day cells of every user
        // (two runs, as most ranges read; with a single run and this little data the planner
        // takes the primary key, where at 10,000 users it takes the rank index either way).
        let filter = UsageFilter {
            start: Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()),
            end: Some(
                Utc.with_ymd_and_hms(2026, 5, 4, 0, 0, 0).unwrap() - Duration::microseconds(1),
            ),
            ..Default::default()
        };
        let plan_text = |db: DatabaseConnection| {
            let filter = filter.clone();
            async move {
                let stmt = plans::by_user_rank_statement(&db, &filter)
                    .await
                    .unwrap()
                    .expect("the rollup answers a calendar month");
                plan_of(&db, &stmt).await
            }
        };
        let plan = plan_text(db.clone()).await;
        if pg {
            assert!(
                plan.contains("Index Only Scan using llm_tracker_usage_rollup_total_rank_idx")
                    && plan.contains("llm_tracker_usage_rollup_delta_slot_idx"),
                "{plan}"
            );
            // 000013 down puts 000011's index back, up again the covering one.
            crate::helpers::down_through(db, "m20261128_000013").await;
            let before = plan_text(db.clone()).await;
            assert!(
                before.contains("llm_tracker_usage_rollup_total_slot_idx")
                    && !before.contains("Index Only Scan")
                    && before.contains("Seq Scan on llm_tracker_usage_rollup_delta"),
                "{before}"
            );
            migration::Migrator::up(db, None).await.unwrap();
            // The same plan (its cost estimates move with the pages the way down and up left).
            let shape = |text: &str| -> String {
                text.split("(cost=")
                    .enumerate()
                    .map(|(i, part)| {
                        if i == 0 {
                            part
                        } else {
                            part.split_once(')').map_or(part, |(_, rest)| rest)
                        }
                    })
                    .collect()
            };
            assert_eq!(shape(&plan_text(db.clone()).await), shape(&plan));
        } else {
            assert!(
                plan.contains("llm_tracker_usage_rollup_total_slot_idx"),
                "{plan}"
            );
        }
        // And the ranking still ranks right: by_user equals the rows.
        assert_eq!(
            stats_by_user(db, &filter, 3).await.unwrap(),
            stats_by_user_raw(db, &filter, 3).await.unwrap()
        );
    }
);

db_test!(
    async fn a_statements_rows_reach_the_delta_summed_per_key(backend: Backend) {
        // Migration 000015: on PostgreSQL a statement's rows reach the delta summed per key
        // (slot, user, model, outcome, and since 000020 latency bucket), for inserts and deletes; SQLite's row triggers append
        // one delta row per row. Either way the cells and the reads stay exact, and 000015's
        // `down` brings back one delta row per row.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["s1", "s2"]).await;
        let mut rng = StdRng::seed_from_u64(15);
        let base = Utc.with_ymd_and_hms(2025, 9, 1, 0, 0, 0).unwrap();
        let keys = |rows: &[usage::Model]| {
            rows.iter()
                .map(|r| {
                    (
                        r.created_at.timestamp().div_euclid(900),
                        r.user_id,
                        r.model.clone(),
                        r.success,
                        // The latency bucket (migration 000020).
                        r.started_at.map(|s| {
                            llm_tracker::usage::latency::bucket_of(
                                (r.created_at - s).num_microseconds().unwrap().max(0),
                            )
                        }),
                    )
                })
                .collect::<std::collections::HashSet<_>>()
                .len() as i64
        };
        let postgres = backend == crate::helpers::Backend::Postgres;
        // Rows within one hour: many share a slot, user, model and outcome.
        let in_an_hour = |rng: &mut StdRng, rows: Vec<usage::Model>| {
            rows.into_iter()
                .map(|mut r| {
                    let to = base + Duration::seconds(rng.random_range(0..3600));
                    let shift = to - r.created_at;
                    r.created_at = to;
                    r.started_at = r.started_at.map(|s| s + shift);
                    r
                })
                .collect::<Vec<_>>()
        };
        let rows = random_rows(&mut rng, &ids, base, 1, 400, 1);
        let rows = in_an_hour(&mut rng, rows);
        insert(db, &rows).await;
        let appended = pending(&t).await;
        // `insert` writes in statements of several hundred rows; each sums its own.
        if postgres {
            assert!(appended < 400, "{appended} delta rows for 400 rows");
            assert!(appended >= keys(&rows), "{appended} < {} keys", keys(&rows));
        } else {
            assert_eq!(appended, 400);
        }
        assert_eq!(pending_calls(&t).await, 400);
        assert_verified(db).await;
        fold(&t).await;
        // One DELETE of 150 rows: their contributions, negative, summed per key too.
        let gone = &rows[..150];
        usage::Entity::delete_many()
            .filter(ids_in(db, 1..151))
            .exec(db)
            .await
            .unwrap();
        let appended = pending(&t).await;
        if postgres {
            assert_eq!(appended, keys(gone));
        } else {
            assert_eq!(appended, 150);
        }
        assert_eq!(pending_calls(&t).await, -150);
        assert_verified(db).await;
        fold(&t).await;
        assert_eq!(counted(&t).await, 250);
        if postgres {
            // 000015 down: 000006's triggers, one delta row per row.
            crate::helpers::down_through(db, "m20261129_000015").await;
            let more = random_rows(&mut rng, &ids, base, 1, 100, 1_000);
            insert(db, &more).await;
            assert_eq!(pending(&t).await, 100);
            // (Verified after the way up: today's verify reads migration 000016's columns.)
            migration::Migrator::up(db, None).await.unwrap();
            assert_verified(db).await;
            fold(&t).await;
            let again = random_rows(&mut rng, &ids, base, 1, 100, 2_000);
            let again = in_an_hour(&mut rng, again);
            insert(db, &again).await;
            assert!(pending(&t).await < 100);
            assert_verified(db).await;
        }
    }
);

db_test!(
    async fn migration_000016_counts_the_first_chunks_already_there(backend: Backend) {
        // A database the successor app wrote streamed rows into (its `is_streaming` and
        // `first_chunk_at` columns), before this product's rollup knew the time to first
        // token: 000016 keeps those columns and counts their ttft into the cells.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["f1", "f2"]).await;
        let mut rng = StdRng::seed_from_u64(16);
        let base = Utc.with_ymd_and_hms(2025, 11, 1, 0, 0, 0).unwrap();
        crate::helpers::down_through(db, "m20261129_000016").await;
        // `down` leaves the usage table's two columns (the successor may own them) and drops
        // the rollup's.
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage WHERE is_streaming")
                .await,
            0
        );
        let rows = random_rows(&mut rng, &ids, base, 20, 300, 1);
        for r in &rows {
            db.execute_unprepared(&plain_insert(db.get_database_backend(), r))
                .await
                .unwrap();
        }
        // The successor marks some rows streamed, with a first chunk 0–600 ms after the start.
        let mark = match backend {
            crate::helpers::Backend::Postgres => {
                "UPDATE llm_tracker_usage SET is_streaming = TRUE, \
                first_chunk_at = started_at + (prompt_tokens % 7) * INTERVAL '100 milliseconds' \
                WHERE started_at IS NOT NULL AND prompt_tokens % 2 = 0"
            }
            crate::helpers::Backend::Sqlite => {
                "UPDATE llm_tracker_usage SET is_streaming = 1, \
                first_chunk_at = strftime('%Y-%m-%d %H:%M:%f', started_at, '+' || ((prompt_tokens % 7) * 0.1) || ' seconds') \
                WHERE started_at IS NOT NULL AND prompt_tokens % 2 = 0"
            }
        };
        db.execute_unprepared(mark).await.unwrap();
        let streamed = t
            .scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage WHERE first_chunk_at IS NOT NULL")
            .await;
        assert!(streamed > 50, "{streamed}");
        migration::Migrator::up(db, None).await.unwrap();
        assert_verified(db).await;
        fold(&t).await;
        assert_verified(db).await;
        let counted = t
            .scalar_i64(&format!(
                "SELECT CAST(SUM(ttft_calls) AS BIGINT) FROM llm_tracker_usage_rollup_total \
                 WHERE grain = 96 AND user_key = {}",
                migration::rollup::ALL_USERS
            ))
            .await;
        assert_eq!(counted, streamed);
        // The mean per model is the rows' own mean, as read back.
        let stored = usage::Entity::find().all(db).await.unwrap();
        assert_eq!(
            stored.iter().filter(|r| r.is_streaming).count() as i64,
            streamed
        );
        let by_model = stats_by_model(db, &UsageFilter::default()).await.unwrap();
        for m in by_model {
            let ttfts: Vec<i64> = stored
                .iter()
                .filter(|r| r.model == m.model)
                .filter_map(|r| {
                    Some(
                        (r.first_chunk_at? - r.started_at?)
                            .num_microseconds()?
                            .max(0),
                    )
                })
                .collect();
            let want = (!ttfts.is_empty())
                .then(|| (ttfts.iter().sum::<i64>() as f64 / ttfts.len() as f64).round() / 1e6);
            assert_eq!(m.avg_ttft_sec, want, "{}", m.model);
        }
    }
);

db_test!(
    async fn by_user_over_most_of_a_day_reads_the_day_less_its_rows_outside(backend: Backend) {
        // A range that cuts a UTC day at an end, more than half of it inside (a range from a
        // local midnight in New York: 19–20 hours of that day), reads the day's per-user cells
        // and takes away the day's rows outside the range (`Plan::minus`, 4–5 hours of rows,
        // instead of ranking 19–20 hours of rows for every user): exact, folded or pending;
        // never over a day before the retention horizon.
        use llm_tracker::retention;
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["lm1", "lm2", "lm3", "lm4"]).await;
        let mut rng = StdRng::seed_from_u64(2122);
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let rows = random_rows(&mut rng, &ids, base, 20, 1500, 1);
        insert(db, &rows[..900]).await;
        fold(&t).await;
        insert(db, &rows[900..]).await;
        let midnight = |zone: &str, day: u32| {
            let tz: Tz = zone.parse().unwrap();
            tz.with_ymd_and_hms(2026, 3, day, 0, 0, 0)
                .unwrap()
                .with_timezone(&Utc)
        };
        let micro = Duration::microseconds(1);
        let widened = std::cell::Cell::new(0);
        let check = async |filter: UsageFilter| {
            let plan = rollup::plan(db, &filter, None, true).await.unwrap();
            if plan.as_ref().is_some_and(|p| !p.minus.is_empty()) {
                widened.set(widened.get() + 1);
            }
            for limit in [2, 1000] {
                assert_eq!(
                    stats_by_user(db, &filter, limit).await.unwrap(),
                    stats_by_user_raw(db, &filter, limit).await.unwrap(),
                    "{filter:?}"
                );
            }
            plan
        };
        for zone in [
            "America/New_York",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "Pacific/Chatham",
        ] {
            for (d0, d1) in [(2, 9), (3, 17), (5, 6)] {
                for user_id in [None, Some(ids[0])] {
                    // Local days; local days ending at an instant; from an instant.
                    for (start, end) in [
                        (midnight(zone, d0), midnight(zone, d1) - micro),
                        (midnight(zone, d0), midnight(zone, d1) - Duration::hours(3)),
                        (
                            midnight(zone, d0) + Duration::minutes(7),
                            midnight(zone, d1) - micro,
                        ),
                    ] {
                        check(UsageFilter {
                            start: Some(start),
                            end: Some(end),
                            user_id,
                            ..Default::default()
                        })
                        .await;
                    }
                }
            }
        }
        // Random ranges, often exactly at a row's time.
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
        for _ in 0..40 {
            check(random_filter(&mut rng, &ids, &times, base, 20)).await;
        }
        let plans = widened.get();
        assert!(plans > 20, "the day less its rows outside: {plans} plans");
        fold(&t).await;
        let ny = UsageFilter {
            start: Some(midnight("America/New_York", 4)),
            end: Some(midnight("America/New_York", 12) - micro),
            ..Default::default()
        };
        assert!(!check(ny.clone()).await.unwrap().minus.is_empty());
        // Retention up to 8 March: the 7th's rows are gone, its cells kept. A range from 05:00
        // on the 7th reads no cell of the 7th (its 19 hours of rows are gone: nothing of them
        // is counted, as for any partial day there), so it equals the range from the 8th.
        let now = Utc.with_ymd_and_hms(2026, 3, 11, 12, 0, 0).unwrap();
        retention::run(db, 3, false, now).await.unwrap();
        let horizon = Utc.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap();
        assert_eq!(retention::horizon(db).await.unwrap(), Some(horizon));
        let end = midnight("UTC", 15) - micro;
        let from_evening = UsageFilter {
            start: Some(horizon - Duration::hours(19)),
            end: Some(end),
            ..Default::default()
        };
        let plan = rollup::plan(db, &from_evening, None, true)
            .await
            .unwrap()
            .unwrap();
        assert!(plan.minus.is_empty(), "{plan:?}");
        let from_horizon = UsageFilter {
            start: Some(horizon),
            ..from_evening.clone()
        };
        assert_eq!(
            stats_by_user(db, &from_evening, 1000).await.unwrap(),
            stats_by_user(db, &from_horizon, 1000).await.unwrap()
        );
        // After the horizon the day is read less its rows outside, and exact.
        let after = UsageFilter {
            start: Some(horizon + Duration::hours(5)),
            end: Some(end),
            ..Default::default()
        };
        assert!(!check(after).await.unwrap().minus.is_empty());
    }
);

db_test!(
    async fn the_series_of_each_model_equals_the_raw_rows(backend: Backend) {
        // Issue 21: the overview's bars stacked by model read the per-model cells.
        use llm_tracker::usage::stats::{series_by_model, series_by_model_raw};
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["sm1", "sm2", "sm3"]).await;
        let mut rng = StdRng::seed_from_u64(2121);
        let base = Utc.with_ymd_and_hms(2026, 2, 20, 0, 0, 0).unwrap();
        let rows = random_rows(&mut rng, &ids, base, 40, 900, 1);
        insert(db, &rows[..600]).await;
        fold(&t).await;
        insert(db, &rows[600..]).await;
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
        let mut rollup_used = 0;
        let mut around_days = 0;
        for i in 0..60 {
            let mut filter = random_filter(&mut rng, &ids, &times, base, 40);
            if i % 3 != 0 {
                filter.user_id = None;
            }
            let granularity =
                [Granularity::Day, Granularity::Month, Granularity::Year][rng.random_range(0..3)];
            let tz: Tz = ZONES[rng.random_range(0..ZONES.len())].parse().unwrap();
            if let (Some(s), Some(e)) = (filter.start, filter.end)
                && buckets_between(granularity, tz, s, e).is_err()
            {
                continue;
            }
            let fast = series_by_model(db, &filter, granularity, tz, None)
                .await
                .unwrap();
            let raw = series_by_model_raw(db, &filter, granularity, tz, None)
                .await
                .unwrap();
            assert_eq!(fast, raw, "{filter:?} {granularity:?} {tz}");
            // Only some models (what the chart reads: the largest few), by exact name.
            let some: Vec<String> = vec!["gpt-4o".into(), "Local_%x".into(), "nothing".into()];
            let fast_some = series_by_model(db, &filter, granularity, tz, Some(&some))
                .await
                .unwrap();
            assert_eq!(
                fast_some,
                series_by_model_raw(db, &filter, granularity, tz, Some(&some))
                    .await
                    .unwrap(),
                "{filter:?} {granularity:?} {tz}"
            );
            assert!(fast_some.iter().all(|m| some.contains(&m.model)));
            assert_eq!(
                fast_some,
                fast.iter()
                    .filter(|m| some.contains(&m.model))
                    .cloned()
                    .collect::<Vec<_>>()
            );
            if let Some(p) = rollup::plan(db, &filter, Some((granularity, tz)), false)
                .await
                .unwrap()
                .filter(|p| !p.ranges.is_empty() && filter.user_id.is_none())
            {
                rollup_used += 1;
                // Local days outside UTC: UTC days less their hours outside the bucket.
                if p.per_bucket.iter().any(|b| b.run.subtract) {
                    around_days += 1;
                }
            }
            // The models' buckets add up to the series of all models.
            let all = token_stats_in(
                db,
                &filter,
                Some(granularity),
                SeriesOptions { tz, fill: false },
            )
            .await
            .unwrap()
            .series
            .unwrap();
            let mut summed: std::collections::BTreeMap<String, (i64, i64, i64)> =
                Default::default();
            for m in &fast {
                for item in &m.series {
                    let e = summed.entry(item.bucket.clone()).or_default();
                    e.0 += item.total_calls;
                    e.1 += item.total_tokens;
                    e.2 += item.successful_calls;
                }
            }
            let expected: std::collections::BTreeMap<String, (i64, i64, i64)> = all
                .iter()
                .map(|i| {
                    (
                        i.bucket.clone(),
                        (i.total_calls, i.total_tokens, i.successful_calls),
                    )
                })
                .collect();
            assert_eq!(summed, expected, "{filter:?} {granularity:?} {tz}");
        }
        assert!(rollup_used > 10, "the rollup answered {rollup_used} times");
        assert!(
            around_days > 3,
            "UTC days less hours read {around_days} times"
        );
    }
);

/// The plan of `filter`'s series in `gran` and `tz` (one the rollup serves).
async fn series_plan(
    db: &DatabaseConnection,
    filter: &UsageFilter,
    gran: Granularity,
    tz: Tz,
) -> rollup::Plan {
    rollup::plan(db, filter, Some((gran, tz)), false)
        .await
        .unwrap()
        .unwrap()
}

/// Whether `plan` reads cells of `grain`.
fn reads_grain(plan: &rollup::Plan, grain: i64) -> bool {
    plan.ranges.iter().any(|r| r.grain == grain)
}

db_test!(
    async fn a_dense_users_series_reads_hour_cells_exactly(backend: Backend) {
        // Issue 16, migration 000025: a user with a UTC day of 100 calls or more becomes dense,
        // and from then on the totals table keeps that user's UTC hours, so the user's hourly
        // series and daily series outside UTC read hour cells instead of the user's rows. The
        // cells must equal the rows whoever wrote them, pending or folded, after a promotion
        // that finds rows pending, and after a rebuild; `rollup verify` checks them too.
        // Migration 000035: the user's days per model and outcome too, which the user's sums
        // per model read over the days outside whole months instead of the rows.
        use migration::rollup::{DENSE_MODEL_DAY, DENSE_TABLE, TABLE, TOTALS_TABLE, promote_dense};
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["dense", "light1", "light2"]).await;
        let (heavy, light) = (ids[0], &ids[1..]);
        let mut rng = StdRng::seed_from_u64(25);
        // Ten days across New York's change to summer time (2025-03-09).
        let base = Utc.with_ymd_and_hms(2025, 3, 4, 0, 0, 0).unwrap();
        let mut rows = random_rows(&mut rng, &[heavy], base, 10, 3600, 1);
        rows.extend(random_rows(&mut rng, light, base, 10, 300, 10_000));
        // Calls made for no user stay out of every user's hours.
        let (first, rest) = rows.split_at(2700);
        insert(db, first).await;
        fold(&t).await;
        // Written by the Django app, not folded yet when the user becomes dense.
        for r in &rest[..300] {
            db.execute_unprepared(&plain_insert(db.get_database_backend(), r))
                .await
                .unwrap();
        }
        assert!(pending(&t).await > 0);
        // Promoted as of the day before `base`: dense from `base` on (the day after "today").
        let dense = promote_dense(db, (base - Duration::days(1)).timestamp())
            .await
            .unwrap();
        assert_eq!(
            dense,
            vec![i64::from(heavy)],
            "only the heavy user has 100 calls a day"
        );
        let hours =
            format!("SELECT COUNT(*) FROM {TOTALS_TABLE} WHERE grain = 4 AND user_key = {heavy}");
        assert!(t.scalar_i64(&hours).await > 100);
        let model_days = format!(
            "SELECT COUNT(*) FROM {TABLE} WHERE grain = {} AND user_key = {heavy}",
            DENSE_MODEL_DAY.code
        );
        assert!(t.scalar_i64(&model_days).await > 20);
        assert_eq!(
            t.scalar_i64(&format!("SELECT since FROM {DENSE_TABLE}"))
                .await,
            base.timestamp() / 900
        );
        assert_verified(db).await;
        insert(db, &rest[300..]).await;
        let user = |start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>| UsageFilter {
            start,
            end,
            user_id: Some(heavy),
            ..Default::default()
        };
        let ranges = [
            user(None, None),
            user(
                Some(base + Duration::hours(30)),
                Some(base + Duration::days(8) + Duration::minutes(7)),
            ),
            user(
                Some(base - Duration::days(3)),
                Some(base + Duration::days(4)),
            ),
        ];
        // by_user over ranges whose partial days read the dense user's hours, and the rows of
        // the partial hours around them (or the hour less its rows outside the range).
        let everyone = [
            (
                base + Duration::days(1) + Duration::minutes(433),
                base + Duration::days(8) + Duration::hours(15),
            ),
            (
                base + Duration::days(2) + Duration::minutes(20),
                base + Duration::days(6) + Duration::minutes(211),
            ),
            (
                base + Duration::days(3),
                base + Duration::days(4) - Duration::microseconds(1),
            ),
            (
                base + Duration::days(3) + Duration::hours(5),
                base + Duration::days(3) + Duration::minutes(400),
            ),
        ];
        let check_by_user = async || {
            for (start, end) in everyone {
                let filter = UsageFilter {
                    start: Some(start),
                    end: Some(end),
                    ..Default::default()
                };
                for limit in [1, 2, 50] {
                    assert_eq!(
                        stats_by_user(db, &filter, limit).await.unwrap(),
                        stats_by_user_raw(db, &filter, limit).await.unwrap(),
                        "by_user {filter:?} {limit}"
                    );
                }
            }
        };
        let check = async || {
            check_by_user().await;
            for filter in &ranges {
                for zone in [
                    "UTC",
                    "America/New_York",
                    "Asia/Kolkata",
                    "Asia/Kathmandu",
                    "Australia/Lord_Howe",
                ] {
                    assert_same(db, filter, zone.parse().unwrap(), true).await;
                }
                // Per model and outcome throughout: a model or an outcome asked for.
                for narrowed in [
                    UsageFilter {
                        model: Some("4o".into()),
                        ..filter.clone()
                    },
                    UsageFilter {
                        success: Some(false),
                        ..filter.clone()
                    },
                ] {
                    assert_same(db, &narrowed, Tz::UTC, true).await;
                }
            }
        };
        // Pending, folded, and after a rebuild.
        check().await;
        // An hourly series in UTC reads the hour cells, not the rows.
        let plan = series_plan(db, &ranges[0], Granularity::Day, Tz::UTC).await;
        assert!(reads_grain(&plan, 4), "{:?}", plan.ranges);
        // Where it reads rows (before it became dense), they are grouped in SQL: a dense
        // user's day holds many rows per slot.
        assert!(!plan.gaps_by_row);
        // (Rows only before the user became dense, and after the newest row: no cells yet.)
        let (from, to) = (
            base.timestamp() / 900,
            (base + Duration::days(10)).timestamp() / 900,
        );
        assert!(
            plan.gaps.iter().all(|g| g.end <= from || g.first >= to),
            "{:?}",
            plan.gaps
        );
        // The user's sums per model read the day cells per model over the whole days outside
        // whole months, and no rows there (the rows of the partial days at the ends only).
        let model_plan = rollup::plan(db, &ranges[1], None, false)
            .await
            .unwrap()
            .unwrap();
        assert!(
            model_plan
                .totals
                .iter()
                .any(|r| r.grain == DENSE_MODEL_DAY.code),
            "{:?}",
            model_plan.totals
        );
        assert!(
            model_plan.model_gaps.is_empty(),
            "{:?}",
            model_plan.model_gaps
        );
        // Before the user became dense, rows as before.
        let model_plan = rollup::plan(db, &ranges[2], None, false)
            .await
            .unwrap()
            .unwrap();
        assert!(
            !model_plan.model_gaps.is_empty()
                && model_plan.model_gaps.iter().all(|g| g.end <= from),
            "{:?}",
            model_plan.model_gaps
        );
        // So does a daily series in New York.
        let ny: Tz = "America/New_York".parse().unwrap();
        let plan = series_plan(db, &ranges[0], Granularity::Month, ny).await;
        assert!(reads_grain(&plan, 4), "{:?}", plan.ranges);
        assert!(
            plan.moved.iter().all(|m| m.day < from || m.day >= to)
                && plan.gaps.iter().all(|g| g.end <= from || g.first >= to),
            "{:?} {:?}",
            plan.moved,
            plan.gaps
        );
        // An hourly series in India reads the :30 hours, and the rows of the first and last
        // half hour of the days it reads them for.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let plan = series_plan(db, &ranges[1], Granularity::Day, kolkata).await;
        assert!(reads_grain(&plan, 6), "{:?}", plan.ranges);
        assert!(
            plan.gaps.iter().all(|g| g.end - g.first == 2),
            "{:?}",
            plan.gaps
        );
        // A light user still reads rows for an hourly series.
        let light_plan = series_plan(
            db,
            &UsageFilter {
                user_id: Some(light[0]),
                ..Default::default()
            },
            Granularity::Day,
            Tz::UTC,
        )
        .await;
        assert!(!reads_grain(&light_plan, 4));
        assert_eq!(
            light_plan.gaps_by_row,
            db.get_database_backend() == DbBackend::Postgres,
            "a light user's rows one by one on PostgreSQL"
        );
        fold(&t).await;
        assert_verified(db).await;
        check().await;
        // Updates and deletes of the user's rows, as the Django app writes them.
        db.execute_unprepared(&format!(
            "UPDATE llm_tracker_usage SET total_tokens = total_tokens + 7 WHERE user_id = {heavy} AND prompt_tokens < 500"
        ))
        .await
        .unwrap();
        db.execute_unprepared(&format!(
            "DELETE FROM llm_tracker_usage WHERE user_id = {heavy} AND completion_tokens < 50"
        ))
        .await
        .unwrap();
        check().await;
        fold(&t).await;
        assert_verified(db).await;
        rollup::rebuild(db).await.unwrap();
        assert!(t.scalar_i64(&hours).await > 100);
        assert_verified(db).await;
        check().await;
        // The reads use the cells: one corrupted, and the answer and `verify` both show it.
        db.execute_unprepared(&format!(
            "UPDATE {TOTALS_TABLE} SET calls = calls + 1 WHERE grain = 4 AND user_key = {heavy} \
             AND slot = (SELECT MIN(slot) FROM {TOTALS_TABLE} WHERE grain = 4 AND user_key = {heavy})"
        ))
        .await
        .unwrap();
        let options = SeriesOptions {
            tz: Tz::UTC,
            fill: false,
        };
        assert_ne!(
            token_stats_in(db, &ranges[0], Some(Granularity::Day), options)
                .await
                .unwrap(),
            token_stats_raw(db, &ranges[0], Some(Granularity::Day), options)
                .await
                .unwrap()
        );
        // An hour inside the first range's partial first day, which by_user takes from the
        // hour cells (the day's cell less its hours before the range).
        let inside = (base + Duration::days(1) + Duration::hours(3)).timestamp() / 900;
        db.execute_unprepared(&format!(
            "UPDATE {TOTALS_TABLE} SET calls = calls + 1 WHERE grain = 4 AND user_key = {heavy} \
             AND slot = {inside}"
        ))
        .await
        .unwrap();
        let first = UsageFilter {
            start: Some(everyone[0].0),
            end: Some(everyone[0].1),
            ..Default::default()
        };
        assert_ne!(
            stats_by_user(db, &first, 50).await.unwrap(),
            stats_by_user_raw(db, &first, 50).await.unwrap()
        );
        assert_eq!(
            rollup::verify(db, None, None)
                .await
                .unwrap()
                .differing_cells,
            2
        );
        // A day cell per model inside the second range: its sums per model and `verify` show
        // it.
        let day = (base + Duration::days(3)).timestamp() / 900;
        let day_cells = format!(
            "SELECT COUNT(*) FROM {TABLE} WHERE grain = {} AND user_key = {heavy} AND slot = {day}",
            DENSE_MODEL_DAY.code
        );
        let corrupted = t.scalar_i64(&day_cells).await;
        assert!(corrupted > 0);
        db.execute_unprepared(&format!(
            "UPDATE {TABLE} SET total_tokens = total_tokens + 3 WHERE grain = {} \
             AND user_key = {heavy} AND slot = {day}",
            DENSE_MODEL_DAY.code
        ))
        .await
        .unwrap();
        assert_ne!(
            token_stats_in(db, &ranges[1], None, options).await.unwrap(),
            token_stats_raw(db, &ranges[1], None, options)
                .await
                .unwrap()
        );
        assert_eq!(
            rollup::verify(db, None, None)
                .await
                .unwrap()
                .differing_cells,
            2 + corrupted as u64
        );
        // Migration 000025 down and up again: the hours come back from the rows.
        crate::helpers::down_through(db, "m20261205_000025").await;
        assert_eq!(t.scalar_i64(&hours).await, 0);
        assert_eq!(t.scalar_i64(&model_days).await, 0);
        migration::Migrator::up(db, None).await.unwrap();
        assert!(t.scalar_i64(&hours).await > 100);
        assert!(t.scalar_i64(&model_days).await > 20);
        assert_verified(db).await;
        check().await;
        // A retention horizon inside the dense days: hours only from there (a rebuild cannot
        // refill them before it), and a rebuild moves `since` up to it.
        let horizon = (base + Duration::days(5)).timestamp() / 900;
        db.execute_unprepared(&format!(
            "UPDATE llm_tracker_usage_retention SET horizon_slot = {horizon} WHERE id = 1"
        ))
        .await
        .unwrap();
        let plan = series_plan(db, &ranges[0], Granularity::Day, Tz::UTC).await;
        assert!(
            plan.ranges
                .iter()
                .filter(|r| r.grain == 4)
                .all(|r| r.first >= horizon),
            "{:?}",
            plan.ranges
        );
        check().await;
        rollup::rebuild(db).await.unwrap();
        assert_eq!(
            t.scalar_i64(&format!("SELECT since FROM {DENSE_TABLE}"))
                .await,
            horizon
        );
        assert_verified(db).await;
        check().await;
        // Retention deletes the rows before a later horizon, and the hours there with them.
        let later = base + Duration::days(6);
        llm_tracker::retention::run(db, 1, false, later + Duration::days(1) + Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(
            llm_tracker::retention::horizon(db).await.unwrap(),
            Some(later)
        );
        let before_later = format!(
            "SELECT COUNT(*) FROM {TOTALS_TABLE} WHERE grain IN (4, 6) AND user_key = {heavy} \
             AND slot < {}",
            later.timestamp() / 900
        );
        assert_eq!(t.scalar_i64(&before_later).await, 0);
        assert!(t.scalar_i64(&hours).await > 50);
        // And the days per model before it.
        assert_eq!(
            t.scalar_i64(&format!(
                "{model_days} AND slot < {}",
                later.timestamp() / 900
            ))
            .await,
            0
        );
        assert!(t.scalar_i64(&model_days).await > 0);
        assert_verified(db).await;
        let after = user(
            Some(later + Duration::hours(5)),
            Some(later + Duration::hours(75)),
        );
        for zone in ["UTC", "America/New_York", "Asia/Kolkata"] {
            assert_same(db, &after, zone.parse().unwrap(), true).await;
        }
        // PostgreSQL: a TRUNCATE empties the hours with the totals table; the user stays
        // dense, and the next rows count in the hours again.
        if backend == crate::helpers::Backend::Postgres {
            db.execute_unprepared("TRUNCATE llm_tracker_usage")
                .await
                .unwrap();
            assert_eq!(t.scalar_i64(&hours).await, 0);
            assert_eq!(t.scalar_i64(&model_days).await, 0);
            insert(db, &rows[..500]).await;
            fold(&t).await;
            assert!(t.scalar_i64(&hours).await > 50);
            assert!(t.scalar_i64(&model_days).await > 0);
            assert_verified(db).await;
            for zone in ["UTC", "Asia/Kolkata"] {
                assert_same(db, &after, zone.parse().unwrap(), true).await;
            }
        }
    }
);

db_test!(
    async fn by_user_reads_the_bounded_users_in_two_steps(backend: Backend) {
        // by_user through bounds reads the first 2 × limit bounded users exactly, and the rest
        // of the 4 × limit only when those do not decide: the first step's "left out" is the
        // next user's bound, not the last one's. Here 20 users have the highest bounds from
        // calls outside the range, and the user with most tokens inside it is 21st by bound.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let names: Vec<String> = (0..45).map(|i| format!("step{i}")).collect();
        let ids = users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let march = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        let inside = march + Duration::days(20);
        let outside = march + Duration::days(2);
        let mut rows = Vec::new();
        let mut n = 1u128;
        let mut add = |user: i32, tokens: i32, at: DateTime<Utc>| {
            rows.push(row(n, Some(user), "gpt-4o", (tokens, 0, 0, 0), true, at));
            n += 1;
        };
        for (k, id) in ids.iter().enumerate() {
            match k {
                // High bounds, little inside the range.
                0..20 => {
                    add(*id, 1_000_000 - k as i32, outside);
                    add(*id, 10 + k as i32, inside);
                }
                // The 21st bound, all of it inside.
                20 => add(*id, 500_000, inside),
                // Between: bounds below it, little inside.
                21..40 => add(*id, 400_000 - k as i32, outside),
                _ => add(*id, 5, inside),
            }
            // Nine calls of no tokens: a full year, with month cells to be listed by (a
            // light year has none, migration 000032).
            for _ in 0..9 {
                add(*id, 0, outside);
            }
        }
        insert(db, &rows).await;
        fold(&t).await;
        let range = UsageFilter {
            start: Some(march + Duration::days(11) + Duration::hours(7)),
            end: Some(march + Duration::days(39) + Duration::hours(13)),
            ..Default::default()
        };
        let plan = rollup::plan(db, &range, None, true).await.unwrap().unwrap();
        let bounds = stats::user_bounds(db, &range, &plan, 10)
            .await
            .unwrap()
            .expect("bounds hold here");
        assert_eq!(bounds.keys.len(), 40);
        assert_eq!(bounds.keys[20], i64::from(ids[20]));
        let top = stats_by_user(db, &range, 10).await.unwrap();
        assert_eq!(top, stats_by_user_raw(db, &range, 10).await.unwrap());
        assert_eq!(top[0].user_id, Some(ids[20]));
    }
);

db_test!(
    async fn a_dense_user_idle_for_four_weeks_stops_and_starts_again(backend: Backend) {
        // A dense user whose days of the last 28 all stayed under 75 calls stops being dense
        // from the next UTC midnight (the hours so far stay; what was counted after it, rows
        // written ahead of time, is taken out), and becomes dense again on a day of 150 calls,
        // its hours since then filled from the rows less what is pending. Exact throughout;
        // likewise its days per model (migration 000035).
        use migration::rollup::{DENSE_MODEL_DAY, DENSE_TABLE, TABLE, TOTALS_TABLE, promote_dense};
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["burst", "other"]).await;
        let (heavy, other) = (ids[0], ids[1]);
        let base = Utc.with_ymd_and_hms(2025, 5, 5, 0, 0, 0).unwrap();
        let mut n = 0u128;
        let mut calls = |user: i32, day: DateTime<Utc>, count: i64| -> Vec<usage::Model> {
            (0..count)
                .map(|i| {
                    n += 1;
                    row(
                        n,
                        Some(user),
                        "gpt-4o",
                        (100 + i as i32, 10, 5, 0),
                        true,
                        day + Duration::seconds(i * 86_400 / count + 7),
                    )
                })
                .collect()
        };
        let mut rows = calls(heavy, base, 200);
        for d in 1..4 {
            rows.extend(calls(heavy, base + Duration::days(d), 20));
            rows.extend(calls(other, base + Duration::days(d), 20));
        }
        insert(db, &rows).await;
        fold(&t).await;
        assert_eq!(
            promote_dense(db, base.timestamp()).await.unwrap(),
            vec![i64::from(heavy)]
        );
        // Written ahead of time, counted in the hours while the user is dense: one in the first
        // quarter hour of the day the user will stop being dense (its :30 hour cell straddles
        // that midnight), three later.
        insert(db, &calls(heavy, base + Duration::days(36), 1)).await;
        insert(
            db,
            &calls(heavy, base + Duration::days(40) + Duration::hours(2), 3),
        )
        .await;
        fold(&t).await;
        let window = format!("SELECT COALESCE(until, -1) FROM {DENSE_TABLE}");
        let slot = |t: DateTime<Utc>| t.timestamp() / 900;
        let hours_from = |t: DateTime<Utc>| {
            format!(
                "SELECT COUNT(*) FROM {TOTALS_TABLE} WHERE grain IN (4, 6) AND user_key = {heavy} AND slot >= {}",
                slot(t)
            )
        };
        assert!(t.scalar_i64(&hours_from(base + Duration::days(40))).await > 0);
        assert_verified(db).await;
        let hourly = |start: DateTime<Utc>, end: DateTime<Utc>| UsageFilter {
            start: Some(start),
            end: Some(end),
            user_id: Some(heavy),
            ..Default::default()
        };
        let model_days_from = |t: DateTime<Utc>| {
            format!(
                "SELECT COUNT(*) FROM {TABLE} WHERE grain = {} AND user_key = {heavy} AND slot >= {}",
                DENSE_MODEL_DAY.code,
                slot(t)
            )
        };
        assert!(
            t.scalar_i64(&model_days_from(base + Duration::days(40)))
                .await
                > 0
        );
        let check = async |end: DateTime<Utc>| {
            for zone in ["UTC", "Asia/Kolkata", "America/New_York"] {
                assert_same(db, &hourly(base, end), zone.parse().unwrap(), true).await;
            }
            // Per model over part of the days (edges, whole days, days past the window).
            for (from, to) in [(1, 41), (33, 52), (36, 37)] {
                assert_same(
                    db,
                    &hourly(
                        base + Duration::days(from) + Duration::minutes(97),
                        base + Duration::days(to) + Duration::minutes(13),
                    ),
                    Tz::UTC,
                    false,
                )
                .await;
            }
        };
        check(base + Duration::days(42)).await;
        // Four weeks later, idle: not dense from the next midnight on.
        let idle_day = base + Duration::days(35);
        assert!(
            promote_dense(db, idle_day.timestamp())
                .await
                .unwrap()
                .is_empty()
        );
        let until = idle_day + Duration::days(1);
        assert_eq!(t.scalar_i64(&window).await, slot(until));
        assert_eq!(t.scalar_i64(&hours_from(until)).await, 0);
        assert!(t.scalar_i64(&hours_from(base)).await > 0);
        assert_eq!(t.scalar_i64(&model_days_from(until)).await, 0);
        assert!(t.scalar_i64(&model_days_from(base)).await > 0);
        assert_verified(db).await;
        check(base + Duration::days(42)).await;
        let plan = series_plan(
            db,
            &hourly(until, until + Duration::days(6)),
            Granularity::Day,
            Tz::UTC,
        )
        .await;
        assert!(!reads_grain(&plan, 4), "{:?}", plan.ranges);
        // Busy again: dense again, its hours since `until` filled (some rows still pending).
        let busy = base + Duration::days(50);
        let again = calls(heavy, busy, 200);
        insert(db, &again[..150]).await;
        fold(&t).await;
        insert(db, &again[150..]).await;
        assert!(
            promote_dense(db, busy.timestamp())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(t.scalar_i64(&window).await, -1);
        assert!(t.scalar_i64(&hours_from(until)).await > 0);
        assert!(t.scalar_i64(&model_days_from(until)).await > 0);
        check(base + Duration::days(51)).await;
        fold(&t).await;
        assert_verified(db).await;
        check(base + Duration::days(51)).await;
        let plan = series_plan(
            db,
            &hourly(until, busy + Duration::days(1)),
            Granularity::Day,
            Tz::UTC,
        )
        .await;
        assert!(reads_grain(&plan, 4), "{:?}", plan.ranges);
    }
);

db_test!(
    async fn each_folder_looks_for_dense_users_on_its_own_clock(backend: Backend) {
        // Issue 16, migration 000025: the fold looks for new dense users at most once a minute
        // per clock (the look reads two days of day cells). A clock shared by the folders of
        // two databases lets one database's folds take every turn; each store keeps its own.
        use migration::rollup::DENSE_TABLE;
        use rollup::{PromotionClock, fold_with};
        let today = Utc::now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        // 160 calls of one user in the first minutes of today (UTC): a dense day.
        let busy_day = |user: i32, first: u128| -> Vec<usage::Model> {
            (0..160)
                .map(|i| {
                    let at = today + Duration::seconds(i as i64);
                    row(first + i, Some(user), "gpt-4o", (10, 5, 0, 0), true, at)
                })
                .collect()
        };
        let dense = format!("SELECT COUNT(*) FROM {DENSE_TABLE}");
        let (a, b) = (
            TestDb::migrated(backend).await,
            TestDb::migrated(backend).await,
        );
        let (ua, ub) = (
            users(&a.db, &["busy"]).await[0],
            users(&b.db, &["busy"]).await[0],
        );
        insert(&a.db, &busy_day(ua, 1)).await;
        insert(&b.db, &busy_day(ub, 1)).await;

        let shared = PromotionClock::new();
        assert!(fold_with(&a.db, &shared).await.unwrap());
        assert_eq!(
            a.scalar_i64(&dense).await,
            1,
            "the first fold on a clock looks"
        );
        assert!(fold_with(&b.db, &shared).await.unwrap());
        assert_eq!(
            b.scalar_i64(&dense).await,
            0,
            "the shared clock's minute is not over"
        );

        insert(&b.db, &busy_day(ub, 1_000)[..1]).await;
        assert!(fold_with(&b.db, &PromotionClock::new()).await.unwrap());
        assert_eq!(
            b.scalar_i64(&dense).await,
            1,
            "its own clock lets the second database look"
        );
        assert_verified(&b.db).await;
    }
);

db_test!(
    async fn a_light_users_hourly_series_reads_its_rows_one_by_one(backend: Backend) {
        // Issue 16: the hourly series of a user who is not dense reads the user's days that no
        // cell fits from the rows. On PostgreSQL it reads them one by one (`Plan::gaps_by_row`):
        // each row's slot found in Rust from `created_at`, its cost in micro-dollars per row,
        // summed by the reader; through one range of the `(user_id, created_at)` index in row
        // comparisons. The answers must be the raw aggregate's, key for key, for rows on slot
        // boundaries and a microsecond either side (before the epoch too), costs of whole
        // dollars with six decimals, unpriced and failed calls, and any zone.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let backend = db.get_database_backend();
        let postgres = backend == DbBackend::Postgres;
        let ids = users(db, &["light", "other"]).await;
        let (light, other) = (ids[0], ids[1]);
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let micro = Duration::microseconds(1);
        let boundaries = [
            at("1969-12-31T23:45:00Z"),
            at("1970-01-01T00:00:00Z"),
            at("2025-03-09T07:00:00Z"), // New York's change to summer time
            at("2025-06-15T18:30:00Z"), // midnight in India
            at("2025-06-15T18:15:00Z"), // midnight in Nepal
            at("2025-06-16T00:00:00Z"),
            at("2025-12-31T23:45:00Z"),
        ];
        let mut rows = Vec::new();
        for (i, t0) in boundaries.iter().enumerate() {
            for (j, t) in [*t0 - micro, *t0, *t0 + micro, *t0 + Duration::minutes(7)]
                .into_iter()
                .enumerate()
            {
                let n = (i * 4 + j) as u128 + 1;
                let user = if j == 3 && i % 2 == 0 { other } else { light };
                let mut r = row(
                    n,
                    Some(user),
                    if n.is_multiple_of(2) {
                        "gpt-4o"
                    } else {
                        "o4-mini"
                    },
                    (100 + n as i32, 10, 3, 2),
                    !n.is_multiple_of(3),
                    t,
                );
                r.cost = match n % 4 {
                    0 => None,
                    1 => Some(usage::Cost(1_234_567_891)),
                    2 => Some(usage::Cost(999_999)),
                    _ => Some(usage::Cost(500_000 + n as i64)),
                };
                rows.push(r);
            }
        }
        insert(db, &rows).await;
        let light_filter = |start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>| UsageFilter {
            start,
            end,
            user_id: Some(light),
            ..Default::default()
        };
        let all_time = light_filter(None, None);
        let plan = series_plan(db, &all_time, Granularity::Day, Tz::UTC).await;
        assert!(!plan.gaps.is_empty(), "an hourly series reads rows");
        assert_eq!(plan.gaps_by_row, postgres, "one by one on PostgreSQL only");
        let daily = series_plan(db, &all_time, Granularity::Month, Tz::UTC).await;
        assert!(!daily.gaps_by_row, "a daily series groups its rows in SQL");
        if postgres {
            // A gap that reaches the present is one range of the user's index, read by a plain
            // index scan; one that ended before yesterday keeps the plain condition (a scan of
            // the range would walk on to the user's last entry).
            let gap = &plan.gap_filters(&all_time)[0];
            assert!(!gap.reads_user_range(backend), "{gap:?}");
            let recent = UsageFilter {
                end: Some(Utc::now() + Duration::days(1)),
                ..gap.clone()
            };
            assert!(recent.reads_user_range(backend));
            assert_eq!(
                recent.rows_settings(backend),
                llm_tracker::db::Dialect::of(backend).user_range_settings()
            );
            let stmt = sea_orm::QueryTrait::build(
                &stats::gap_query(backend, &plan, &recent, Granularity::Day, Tz::UTC),
                backend,
            );
            assert!(
                stmt.sql.contains("(user_id, created_at) >="),
                "{}",
                stmt.sql
            );
            let explained = user_range_plan(db, &stmt).await;
            // (An index-only scan since migration 000033, where the table's pages are
            // known all-visible.)
            assert!(
                (explained.contains("Index Scan using llm_tracker_usage_user_created_idx")
                    || explained
                        .contains("Index Only Scan using llm_tracker_usage_user_created_idx"))
                    && !explained.contains("Bitmap"),
                "{explained}"
            );
        }
        // (A span of 56 years makes every read of it plan 20,000 days: fewer zones there.)
        let checks = [
            (all_time.clone(), &["UTC", "Asia/Kolkata"][..]),
            (
                light_filter(
                    Some(at("1969-12-31T23:45:00Z")),
                    Some(at("1970-01-01T00:00:00Z")),
                ),
                &["UTC", "Asia/Kathmandu"][..],
            ),
            (
                light_filter(
                    Some(at("2025-03-08T07:00:00Z") - micro),
                    Some(at("2025-06-16T00:00:00Z") - micro),
                ),
                &ZONES[..],
            ),
            (
                UsageFilter {
                    model: Some("gpt".into()),
                    success: Some(true),
                    start: Some(at("2025-01-01T00:00:00Z")),
                    ..all_time.clone()
                },
                &["UTC", "America/New_York", "Asia/Kolkata"][..],
            ),
            (
                UsageFilter {
                    success: Some(false),
                    ..all_time.clone()
                },
                &["Asia/Kathmandu"][..],
            ),
        ];
        let check = async || {
            for (filter, zones) in &checks {
                for zone in *zones {
                    assert_same(db, filter, zone.parse().unwrap(), true).await;
                }
            }
        };
        // The aggregates over one user's rows may select them through the user's index range
        // (`user_range_condition`): the very rows of the plain condition, at every bound.
        for t0 in boundaries.into_iter().filter(|_| postgres) {
            for (start, end) in [
                (t0 - micro, t0),
                (t0, t0 + Duration::minutes(7)),
                (t0 - Duration::days(1), t0 - micro),
                (t0 + micro, t0 + Duration::days(1)),
            ] {
                for user in [light, other] {
                    let filter = UsageFilter {
                        start: Some(start),
                        end: Some(end),
                        user_id: Some(user),
                        ..Default::default()
                    };
                    let count = async |c: sea_orm::Condition| {
                        sea_orm::PaginatorTrait::count(usage::Entity::find().filter(c), db)
                            .await
                            .unwrap()
                    };
                    assert_eq!(
                        count(filter.user_range_condition(backend).unwrap()).await,
                        count(filter.condition(backend)).await,
                        "{filter:?}"
                    );
                }
            }
        }
        // Pending, then folded.
        check().await;
        fold(&t).await;
        check().await;
        assert_verified(db).await;
    }
);

db_test!(
    async fn a_light_users_long_series_copies_its_rows_on_spare_connections(backend: Backend) {
        // Issue 16: a light user's hourly series over a range that reaches the present reads
        // the user's rows by `COPY` on spare connections of the pool that share the request's
        // snapshot, the two halves of the user's calls at once (`stats::copied_gap_rows`).
        // The copied rows must be exactly the rows of the gaps as the request's snapshot has
        // them, each in its slot (rows a microsecond either side of the cut, a row written
        // after the snapshot left out), and the answers the raw aggregate's. With no spare
        // connection, or on SQLite, the rows are read on the request's connection as before.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let backend = db.get_database_backend();
        let postgres = backend == DbBackend::Postgres;
        let ids = users(db, &["light", "other"]).await;
        let (light, other) = (ids[0], ids[1]);
        let now = Utc::now();
        let micro = Duration::microseconds(1);
        let mut rows = Vec::new();
        // One call every 97 minutes for 120 days (18 a day: not dense), the other user's
        // between them; costs of whole dollars, unpriced and failed calls.
        for i in 0..1_780u128 {
            let at = now - Duration::days(120) + Duration::minutes(97 * i as i64);
            let mut r = row(
                i + 1,
                Some(if i % 5 == 4 { other } else { light }),
                if i % 2 == 0 { "gpt-4o" } else { "o4-mini" },
                (100 + i as i32, 10 + (i % 7) as i32, 3, (i % 3) as i32),
                i % 11 != 0,
                at,
            );
            r.cost = match i % 4 {
                0 => None,
                1 => Some(usage::Cost(1_234_567_891)),
                _ => r.cost,
            };
            rows.push(r);
        }
        insert(db, &rows).await;
        fold(&t).await;
        let filter = UsageFilter {
            user_id: Some(light),
            ..Default::default()
        };
        let plan = series_plan(db, &filter, Granularity::Day, Tz::UTC).await;
        let gaps = plan.gap_filters(&filter);
        assert_eq!(
            stats::copies_rows(backend, &plan, &gaps),
            postgres,
            "{gaps:?}"
        );
        // Not for a short range, nor for one that ended before yesterday.
        let month_ago = UsageFilter {
            start: Some(now - Duration::days(30)),
            end: Some(now - Duration::days(3)),
            ..filter.clone()
        };
        let week = UsageFilter {
            start: Some(now - Duration::days(7)),
            end: Some(now),
            ..filter.clone()
        };
        for short in [&month_ago, &week] {
            let plan = series_plan(db, short, Granularity::Day, Tz::UTC).await;
            assert!(!stats::copies_rows(
                backend,
                &plan,
                &plan.gap_filters(short)
            ));
        }
        let read = async |db: &DatabaseConnection, f: &UsageFilter| {
            let plan = series_plan(db, f, Granularity::Day, Tz::UTC).await;
            let txn = db.begin().await.unwrap();
            let copied = stats::copied_gap_rows(db, &txn, &plan, &plan.gap_filters(f))
                .await
                .unwrap();
            txn.rollback().await.unwrap();
            copied
        };
        // The user's calls per month, which place the cut: every folded call of the user.
        let (first, last) = (gaps[0].start.unwrap(), gaps[gaps.len() - 1].end.unwrap());
        let slot = |at: DateTime<Utc>| at.timestamp().div_euclid(900);
        let months = rollup::user_month_calls(db, light, slot(first) - 31 * 96, slot(last) + 1)
            .await
            .unwrap();
        assert!(months.len() >= 4, "{months:?}");
        let light_rows = rows.iter().filter(|r| r.user_id == Some(light)).count();
        assert_eq!(months.iter().map(|m| m.2).sum::<i64>(), light_rows as i64);
        assert!(months.windows(2).all(|w| w[0].1 == w[1].0), "{months:?}");
        if !postgres {
            assert!(read(db, &filter).await.is_none());
            assert_same(db, &filter, Tz::UTC, true).await;
            return;
        }
        // Rows a microsecond either side of the cut between the halves (pending: the month
        // cells that place the cut stay as they are).
        let (early, late) = stats::row_halves(&gaps, &months).expect("two halves");
        let cut = late[0].start.unwrap();
        assert_eq!(early[early.len() - 1].end.unwrap(), cut - micro);
        assert_eq!(cut.timestamp() % 900, 0);
        let in_early: i64 = months
            .iter()
            .map(|&(m0, m1, calls)| {
                let c = slot(cut);
                calls * (c.min(m1) - m0).max(0) / (m1 - m0)
            })
            .sum();
        let all: i64 = months.iter().map(|m| m.2).sum();
        assert!(
            (in_early - all / 2).abs() <= all / 20,
            "{in_early} of {all}"
        );
        let mut around = Vec::new();
        for (k, at) in [cut - micro, cut, cut + micro].into_iter().enumerate() {
            around.push(row(
                10_000 + k as u128,
                Some(light),
                "gpt-4o",
                (7_000 + k as i32, 1, 0, 0),
                k != 1,
                at,
            ));
        }
        // A model whose name the copy's statement must quote and escape (found by the pattern
        // `o'4\%-mini` below: quote, backslash and percent literal).
        around.push(row(
            10_003,
            Some(light),
            "o'4\\%-mini-2025",
            (5, 5, 0, 0),
            true,
            cut + Duration::hours(1),
        ));
        insert(db, &around).await;

        // Spare connections are idle ones, or new ones made within 250 ms: on a loaded machine
        // (the suite's other tests) making one can take longer, and the read then rightly
        // reads on its own connection (tested below). So the pool holds three idle ones first
        // (the read's own and two spare), and the reads below test the copy itself.
        idle_connections(db, 3).await;
        // The request's snapshot, then a row written after it: not among the copied rows.
        let txn = request_txn(db).await;
        let per_slot_sql = format!(
            "SELECT CAST(floor(date_part('epoch', created_at) / 900) * 900 AS BIGINT), \
             CAST(COUNT(*) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT), \
             CAST(SUM(total_tokens) AS BIGINT), CAST(SUM(reasoning_tokens) AS BIGINT), \
             CAST(SUM(COALESCE(cost, 0) * 1000000) AS BIGINT), \
             CAST(SUM(CASE WHEN success THEN 1 ELSE 0 END) AS BIGINT) \
             FROM llm_tracker_usage WHERE user_id = {light} \
             AND created_at >= '{}' AND created_at <= '{}' GROUP BY 1",
            first.to_rfc3339(),
            last.to_rfc3339()
        );
        let per_slot_stmt = sea_orm::Statement::from_string(DbBackend::Postgres, per_slot_sql);
        let per_slot = |rows: Vec<sea_orm::QueryResult>| {
            rows.iter()
                .map(|r| {
                    let v = |i| r.try_get_by_index::<i64>(i).unwrap();
                    (v(0), [v(1), v(2), v(3), v(4), v(5), v(6)])
                })
                .collect::<std::collections::BTreeMap<i64, [i64; 6]>>()
        };
        let seen = per_slot(txn.query_all_raw(per_slot_stmt.clone()).await.unwrap());
        insert(
            db,
            &[row(
                20_000,
                Some(light),
                "gpt-4o",
                (9, 9, 0, 0),
                true,
                now - Duration::hours(1),
            )],
        )
        .await;
        let plan = series_plan(db, &filter, Granularity::Day, Tz::UTC).await;
        // (Spare connections may all be busy for a moment on a loaded machine: the read then
        // rightly reads on its own; asked again, it copies.)
        let mut copied = None;
        for _ in 0..50 {
            copied = stats::copied_gap_rows(db, &txn, &plan, &gaps)
                .await
                .unwrap();
            if copied.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let copied = copied.expect("copied on two spare connections");
        let mut got = std::collections::BTreeMap::<i64, [i64; 6]>::new();
        for r in &copied {
            let s = got.entry(r.slot_start).or_default();
            s[0] += r.sums.total_calls;
            s[1] += r.sums.total_prompt_tokens;
            s[2] += r.sums.total_tokens;
            s[3] += r.sums.total_reasoning_tokens;
            s[4] += r.sums.cost_micros;
            s[5] += i64::from(r.success);
        }
        assert_eq!(got, seen, "the copied rows, slot by slot");
        assert_eq!(
            per_slot(txn.query_all_raw(per_slot_stmt.clone()).await.unwrap()),
            seen
        );
        txn.rollback().await.unwrap();
        let after: i64 = per_slot(db.query_all_raw(per_slot_stmt).await.unwrap())
            .values()
            .map(|v| v[0])
            .sum();
        assert_eq!(after, seen.values().map(|v| v[0]).sum::<i64>() + 1);
        for slot_of_cut in [cut - micro, cut] {
            let s = slot(slot_of_cut) * 900;
            assert!(
                got.contains_key(&s),
                "the rows around the cut: {slot_of_cut}"
            );
        }

        // The answers through the copies, pending and folded; with a model and outcome, and a
        // model pattern whose quote, backslash and `%` are written into the copy's statement.
        let by_model = UsageFilter {
            model: Some("gpt".into()),
            success: Some(true),
            ..filter.clone()
        };
        let odd_model = UsageFilter {
            model: Some("o'4\\%-mini".into()),
            ..filter.clone()
        };
        assert!(stats::copies_rows(
            backend,
            &series_plan(db, &odd_model, Granularity::Day, Tz::UTC).await,
            &gaps
        ));
        let check = async |db: &DatabaseConnection| {
            for zone in ["UTC", "Asia/Kolkata", "Asia/Kathmandu"] {
                assert_same(db, &filter, zone.parse().unwrap(), true).await;
            }
            assert_same(db, &week, Tz::UTC, true).await;
            assert_same(db, &by_model, "Asia/Kolkata".parse().unwrap(), true).await;
            assert_same(db, &odd_model, Tz::UTC, true).await;
            let odd = token_stats_in(
                db,
                &odd_model,
                Some(Granularity::Day),
                SeriesOptions::default(),
            )
            .await
            .unwrap();
            assert_eq!(odd.summary.total_calls, 1, "the odd model's one row");
            assert_eq!(odd.series.map(|s| s.len()), Some(1));
        };
        let mut copies = false;
        for _ in 0..50 {
            idle_connections(db, 3).await;
            if read(db, &filter).await.is_some() {
                copies = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(copies, "copied on two spare connections");
        check(db).await;
        fold(&t).await;
        check(db).await;
        // No spare connection: the rows are read on the request's own, the same answers.
        let mut opts = sea_orm::ConnectOptions::new(t.url.expose().to_owned());
        opts.max_connections(1).sqlx_logging(false);
        let single = sea_orm::Database::connect(opts).await.unwrap();
        assert!(read(&single, &filter).await.is_none());
        check(&single).await;
        single.close().await.unwrap();
        assert_verified(db).await;
    }
);

db_test!(
    async fn by_user_reads_each_partial_day_on_its_own_transaction_of_the_same_snapshot(
        backend: Backend,
    ) {
        // Issue 16: `by_user` without a user filter reads the chosen users' rows of each partial
        // day at an end of the range on a transaction of its own (`db::snapshot_txns`: another
        // connection of the pool, the request's exported snapshot) while the request's
        // transaction reads their cells. That transaction sees exactly the request's rows — not
        // a row written after the request's snapshot — and cannot write; the answers are the
        // raw aggregate's, with spare connections and with none. On SQLite there is no such
        // transaction.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let postgres = db.get_database_backend() == DbBackend::Postgres;
        let ids = numbered_users(db, "edge", 30).await;
        let mut rng = StdRng::seed_from_u64(4646);
        let base = Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
        let rows = random_rows(&mut rng, &ids, base, 30, 3_000, 1);
        insert(db, &rows[..2_000]).await;
        fold(&t).await;
        insert(db, &rows[2_000..]).await;
        let count = async |txn: &sea_orm::DatabaseTransaction| {
            txn.query_one_raw(sea_orm::Statement::from_string(
                txn.get_database_backend(),
                "SELECT CAST(COUNT(*) AS BIGINT) FROM llm_tracker_usage",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap()
        };

        if postgres {
            let txn = request_txn(db).await;
            let seen = count(&txn).await;
            assert_eq!(seen, 3_000);
            let late = row(
                9_999,
                Some(ids[0]),
                "gpt-4o",
                (7, 7, 0, 0),
                true,
                base + Duration::days(3),
            );
            insert(db, &[late]).await;
            idle_connections(db, 3).await;
            let others = llm_tracker::db::snapshot_txns(db, &txn, 2).await.unwrap();
            assert_eq!(others.len(), 2, "two spare connections");
            for other in others {
                assert_eq!(count(&other).await, seen, "the request's snapshot");
                let write = other
                    .execute_unprepared("DELETE FROM llm_tracker_usage WHERE id IS NULL")
                    .await;
                assert!(write.is_err(), "a read-only transaction");
                other.rollback().await.unwrap();
            }
            assert_eq!(count(&txn).await, seen);
            txn.rollback().await.unwrap();
        } else {
            let txn = db.begin().await.unwrap();
            assert!(
                llm_tracker::db::snapshot_txns(db, &txn, 2)
                    .await
                    .unwrap()
                    .is_empty()
            );
            txn.rollback().await.unwrap();
        }

        // Ranges cut inside days at both ends: two partial days, each on its own transaction.
        let ranges = [
            (
                Duration::hours(30) + Duration::minutes(7),
                Duration::days(20) + Duration::hours(9),
            ),
            (Duration::hours(14), Duration::days(27) + Duration::hours(2)),
            (
                Duration::days(3) + Duration::hours(20),
                Duration::days(9) + Duration::hours(3),
            ),
        ];
        let check = async |db: &DatabaseConnection| {
            for (from, to) in ranges {
                for model in [None, Some("gpt".to_owned())] {
                    let filter = UsageFilter {
                        start: Some(base + from),
                        end: Some(base + to),
                        model,
                        ..Default::default()
                    };
                    let plan = rollup::plan(db, &filter, None, true)
                        .await
                        .unwrap()
                        .unwrap();
                    // (The rows of an edge to add, or of a mostly covered day's rest to take
                    // away: `Plan::minus`.)
                    let parts = plan.raw(&filter, rollup::GroupBy::User).len() + plan.minus.len();
                    assert!(parts >= 2, "{plan:?}");
                    for limit in [3, 50] {
                        assert_eq!(
                            stats_by_user(db, &filter, limit).await.unwrap(),
                            stats_by_user_raw(db, &filter, limit).await.unwrap(),
                            "{filter:?} {limit}"
                        );
                    }
                }
            }
        };
        if postgres {
            idle_connections(db, 3).await;
        }
        check(db).await;
        fold(&t).await;
        check(db).await;
        if postgres {
            // No spare connection: every part in turn on the request's own transaction.
            let mut opts = sea_orm::ConnectOptions::new(t.url.expose().to_owned());
            opts.max_connections(1).sqlx_logging(false);
            let single = sea_orm::Database::connect(opts).await.unwrap();
            let txn = single.begin().await.unwrap();
            assert!(
                llm_tracker::db::snapshot_txns(&single, &txn, 2)
                    .await
                    .unwrap()
                    .is_empty()
            );
            txn.rollback().await.unwrap();
            check(&single).await;
            single.close().await.unwrap();
        }
        assert_verified(db).await;
    }
);

mod a_copy_that_fails_leaves_its_connection_clean {
    use super::*;
    use crate::helpers::Backend;
    use llm_tracker::usage::row_copy::copy_rows;
    use sea_orm::sqlx::postgres::PgConnection;

    #[actix_web::test]
    async fn postgres() {
        // Issue 16: a copy of a user's rows on a spare connection that fails — a snapshot that
        // cannot be imported, or an error after some rows were sent — is an error, not rows,
        // and the connection goes back outside any transaction, ready for the next copy.
        let t = TestDb::migrated(Backend::Postgres).await;
        let settings = llm_tracker::db::Dialect::Postgres
            .user_range_settings()
            .unwrap();
        let mut conn = t.db.get_postgres_connection_pool().acquire().await.unwrap();
        // Inside a transaction `now()` is its start, not this statement's; in an aborted one
        // the query fails. (One simple-protocol query: outside a transaction it is its own.)
        let outside = async |conn: &mut PgConnection| {
            use sea_orm::sqlx::Row;
            sea_orm::sqlx::raw_sql("SELECT now() = statement_timestamp()")
                .fetch_one(conn)
                .await
                .unwrap()
                .get::<bool, _>(0)
        };
        assert!(outside(&mut conn).await);
        {
            use sea_orm::sqlx::Connection;
            let mut open = conn.begin().await.unwrap();
            sea_orm::sqlx::raw_sql("SELECT 1")
                .execute(&mut *open)
                .await
                .unwrap();
            assert!(
                !outside(&mut open).await,
                "the probe sees an open transaction"
            );
        }
        assert!(outside(&mut conn).await);
        let one = "SELECT now() AS created_at, 1, 2, 3, 4, 5, CAST(6 AS BIGINT), true";
        let exported = t.db.begin().await.unwrap();
        exported
            .execute_unprepared("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        let snapshot: String = exported
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                "SELECT pg_export_snapshot()",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index(0)
            .unwrap();

        let missing = copy_rows(&mut conn, "00000003-0000001B-1", settings, &[one.into()]).await;
        assert!(missing.is_err(), "{missing:?}");
        assert!(outside(&mut conn).await);
        assert!(
            copy_rows(
                &mut conn,
                "x'; DROP TABLE llm_tracker_usage; --",
                settings,
                &[]
            )
            .await
            .is_err()
        );
        // Division by zero at the third row, after two were sent.
        let failing = "SELECT now() AS created_at, 1, 2, 3, 4, 5, \
                       CAST(10 / (3 - g) AS BIGINT), true FROM generate_series(1, 1000) g";
        let midway = copy_rows(&mut conn, &snapshot, settings, &[failing.into()]).await;
        assert!(midway.is_err(), "{midway:?}");
        assert!(outside(&mut conn).await);
        let three = "SELECT now() AS created_at, 1, 2, 3, 4, 5, CAST(6 AS BIGINT), g > 1 \
                     FROM generate_series(1, 3) g";
        let rows = copy_rows(&mut conn, &snapshot, settings, &[three.into(), one.into()])
            .await
            .unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows.iter().map(|r| r.success).collect::<Vec<_>>(),
            [false, true, true, true]
        );
        assert!(
            rows.iter()
                .all(|r| r.sums.total_calls == 1 && r.sums.cost_micros == 6)
        );
        assert!(outside(&mut conn).await);
        exported.rollback().await.unwrap();
        assert_eq!(
            t.scalar_i64("SELECT COUNT(*) FROM llm_tracker_usage").await,
            0,
            "the table is still there"
        );
    }
}

mod one_users_range_is_estimated_as_that_users_rows {
    use super::*;
    use crate::helpers::Backend;
    use sea_orm::{QuerySelect, QueryTrait};

    #[actix_web::test]
    async fn postgres() {
        // Issue 16: one user's rows read as a range of the `(user_id, created_at)` index
        // (`UsageFilter::user_range_condition`) are estimated as that user's rows, not as
        // every row from that user id up (the row comparisons' selectivity is their first
        // column's): an aggregate by bucket above the scan sized its hash table for the
        // estimate, 70–100 ms for an empty month at 10M rows. And the user is no index key
        // of its own, which would start the scan at the user's first entry, not the range's.
        let t = TestDb::migrated(Backend::Postgres).await;
        let db = &t.db;
        let ids = numbered_users(db, "est", 40).await;
        let mut rng = StdRng::seed_from_u64(1616);
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        insert(db, &random_rows(&mut rng, &ids, base, 60, 4000, 1)).await;
        db.execute_unprepared("ANALYZE llm_tracker_usage")
            .await
            .unwrap();
        // A user in the middle of the ids: half of the rows lie on either side of it.
        let user = ids[20];
        let filter = UsageFilter {
            start: Some(base),
            end: Some(base + Duration::days(60)),
            user_id: Some(user),
            ..Default::default()
        };
        let backend = DbBackend::Postgres;
        let actual = sea_orm::PaginatorTrait::count(
            usage::Entity::find().filter(filter.condition(backend)),
            db,
        )
        .await
        .unwrap();
        assert!(actual > 50, "{actual}");
        let stmt = usage::Entity::find()
            .select_only()
            .expr(Expr::cust("COUNT(*)"))
            .filter(filter.user_range_condition(backend).unwrap())
            .group_by(Expr::cust("date_trunc('day', created_at)"))
            .build(backend);
        let plan = user_range_plan(db, &stmt).await;
        let scan = plan
            .lines()
            .find(|l| l.contains("Index Scan") || l.contains("Index Only Scan"))
            .unwrap_or_else(|| panic!("no index scan:\n{plan}"));
        assert!(scan.contains("user_created"), "{plan}");
        let estimated: u64 = scan
            .split("rows=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no estimate:\n{plan}"));
        assert!(
            estimated <= 2 * actual,
            "estimated {estimated} rows of the user's {actual}:\n{plan}"
        );
        let index_cond = plan
            .lines()
            .find(|l| l.contains("Index Cond:"))
            .unwrap_or_else(|| panic!("no index condition:\n{plan}"));
        assert!(
            !index_cond.contains("(user_id = "),
            "the user is an index key of its own:\n{plan}"
        );
    }
}

mod one_users_rows_are_read_from_the_index_alone {
    use super::*;
    use crate::helpers::Backend;

    /// The plan lines that scan the usage table itself (not a rollup table).
    fn usage_scans(plan: &str) -> Vec<&str> {
        plan.lines()
            .filter(|l| {
                l.split(" on llm_tracker_usage")
                    .skip(1)
                    .any(|rest| rest.is_empty() || rest.starts_with(' '))
            })
            .collect()
    }

    /// `EXPLAIN ANALYZE` of every statement of a token-stats request that reads the user's
    /// rows, each under the settings its read runs under (`UsageFilter::rows_settings`: a
    /// range of the index, or the plain condition for a range that ended before yesterday),
    /// as (whether it is a range of the index, the plan).
    async fn user_row_plans(db: &DatabaseConnection, filter: &UsageFilter) -> Vec<(bool, String)> {
        let dialect = llm_tracker::db::Dialect::Postgres;
        let mut out = Vec::new();
        for stmt in plans::token_stats_statements(db, filter, Some(Granularity::Day))
            .await
            .unwrap()
        {
            if !stmt.sql.contains("FROM \"llm_tracker_usage\"") {
                continue;
            }
            let range = stmt.sql.contains("(user_id, created_at) >=");
            let settings = match range {
                true => dialect.user_range_settings(),
                false => dialect.user_rows_settings(),
            };
            let txn = db.begin().await.unwrap();
            txn.execute_unprepared(settings.unwrap()).await.unwrap();
            let plan: Vec<String> = txn
                .query_all_raw(sea_orm::Statement {
                    sql: format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {}", stmt.sql),
                    values: stmt.values.clone(),
                    db_backend: DbBackend::Postgres,
                })
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get_by_index::<String>(0).unwrap())
                .collect();
            txn.rollback().await.unwrap();
            out.push((range, plan.join("\n")));
        }
        out
    }

    #[actix_web::test]
    async fn postgres() {
        // Issue 16, migration 000033: the `(user_id, created_at)` index carries the columns
        // the statistics read of a row, so every read of one user's rows — the edges, a
        // series' days the cells do not fit, the per-model days outside whole months — is an
        // index-only scan that visits no heap page once the table is vacuumed (the user's rows
        // lie one or two to a heap page; the user's entries lie together in the index).
        let t = TestDb::migrated(Backend::Postgres).await;
        let db = &t.db;
        let ids = numbered_users(db, "cov", 20).await;
        let mut rng = StdRng::seed_from_u64(3300);
        let now = Utc::now();
        let base = now - Duration::days(60);
        insert(db, &random_rows(&mut rng, &ids, base, 60, 3000, 1)).await;
        let user = ids[3];
        let start = base + Duration::days(10) + Duration::minutes(13 * 60 + 7);
        let filters = [
            // Reaching the present: read as ranges of the index, but for the start's partial
            // day (the plain condition, since it ended in the past).
            UsageFilter {
                start: Some(start),
                user_id: Some(user),
                ..Default::default()
            },
            // Ending in the past: the plain condition throughout.
            UsageFilter {
                start: Some(start),
                end: Some(now - Duration::days(5) - Duration::minutes(7 * 60 + 30)),
                user_id: Some(user),
                ..Default::default()
            },
        ];

        // Analyzed, not vacuumed (a table just loaded): no page is known all-visible, so the
        // plain condition is read by a bitmap scan of the user's index, never through the
        // `created_at` index (`Dialect::user_rows_settings`).
        db.execute_unprepared("ANALYZE llm_tracker_usage")
            .await
            .unwrap();
        let mut plain = 0;
        for filter in &filters {
            for (range, plan) in user_row_plans(db, filter).await {
                if !range {
                    plain += 1;
                    for scan in usage_scans(&plan) {
                        assert!(scan.contains("Bitmap Heap Scan"), "{plan}");
                    }
                    assert!(
                        plan.contains("Bitmap Index Scan on llm_tracker_usage_user_created_idx"),
                        "{plan}"
                    );
                }
            }
        }
        assert!(plain >= 3, "{plain} reads under the plain condition");

        // Vacuumed: every read of the user's rows is an index-only scan of its index. (A
        // vacuum leaves a page unmarked while another session pins it or while a transaction
        // older than its rows runs, as under the whole suite's load: it is run again until
        // every page is marked.)
        vacuum_until_all_visible(&t).await;
        let mut ranges = 0;
        for filter in &filters {
            let plans = user_row_plans(db, filter).await;
            assert!(plans.len() >= 3, "{filter:?}: {} reads", plans.len());
            for (range, plan) in &plans {
                ranges += usize::from(*range);
                let scans = usage_scans(plan);
                assert!(!scans.is_empty(), "{plan}");
                for scan in scans {
                    assert!(
                        scan.contains("Index Only Scan using llm_tracker_usage_user_created_idx"),
                        "not read from the index alone:\n{plan}"
                    );
                }
                for fetches in plan.lines().filter(|l| l.contains("Heap Fetches:")) {
                    assert!(fetches.trim().ends_with(": 0"), "{plan}");
                }
            }
        }
        assert!(ranges >= 2, "{ranges} reads as a range of the index");
    }
}
