//! Latency percentiles (issue 21, SPEC token-stats `include=latency`): the histograms kept with
//! the rollup (migration 000020) count exactly the rows' latency buckets for any range, zone
//! and filter, whoever wrote, updated or deleted the rows and whether or not the fold ran; the
//! reported p50/p95/p99 lie within 5 % of the nearest-rank percentiles of the raw rows.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use llm_tracker::db::entities::usage;
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::latency::{
    Histogram, LatencyHistograms, RELATIVE_ERROR_BOUND, bucket_of, latency_histograms,
    latency_histograms_raw,
};
use llm_tracker::usage::list::{count_matching_raw, list_usage};
use llm_tracker::usage::stats::Granularity;
use llm_tracker::usage::{rollup, stats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::sea_query::Expr;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Statement};

use crate::db_test;
use crate::helpers::TestDb;
use crate::rollup::{assert_verified, fold, ids_in, random_filter, random_rows, users};
use crate::usage_read::insert;
use migration::MigratorTrait;

/// A latency from a wide spread: zero, microseconds, milliseconds, seconds, minutes, past the
/// last bucket (over 27.8 hours), or none (no `started_at`).
fn latency(rng: &mut StdRng) -> Option<i64> {
    match rng.random_range(0..10) {
        0 => None,
        1 => Some(0),
        2 => Some(rng.random_range(1..1_000)),
        3 => Some(rng.random_range(1_000..1_000_000)),
        4..=6 => Some(rng.random_range(200_000..30_000_000)),
        7 => Some(rng.random_range(30_000_000..900_000_000)),
        8 => Some(rng.random_range(1_000_000_000..10_000_000_000)),
        _ => Some(rng.random_range(100_000_000_000..200_000_000_000)),
    }
}

fn with_latencies(rng: &mut StdRng, rows: Vec<usage::Model>) -> Vec<usage::Model> {
    rows.into_iter()
        .map(|mut r| {
            r.started_at = match latency(rng) {
                None => None,
                // Clock skew now and then: started after created counts as 0.
                Some(_) if rng.random_bool(0.03) => Some(r.created_at + Duration::seconds(2)),
                Some(us) => Some(r.created_at - Duration::microseconds(us)),
            };
            r
        })
        .collect()
}

/// The rows' latency in microseconds as the database computes it (`created_at − started_at`,
/// negative as 0).
fn latency_of(r: &usage::Model) -> Option<i64> {
    r.started_at
        .map(|s| (r.created_at - s).num_microseconds().unwrap().max(0))
}

/// The histograms of `rows` that `filter` selects, computed in Rust.
fn expected(rows: &[usage::Model], filter: &UsageFilter) -> LatencyHistograms {
    let mut out = LatencyHistograms::default();
    for r in rows.iter().filter(|r| filter.matches(r)) {
        if let Some(us) = latency_of(r) {
            out.by_model
                .entry(r.model.clone())
                .or_insert_with(Histogram::default)
                .add(bucket_of(us), 1);
        }
    }
    out
}

/// The nearest-rank `pct`-th percentile of `values` (sorted), in microseconds.
fn nearest_rank(values: &[i64], pct: i64) -> i64 {
    let n = values.len() as i64;
    values[((n * pct + 99) / 100 - 1) as usize]
}

async fn all_rows(db: &DatabaseConnection) -> Vec<usage::Model> {
    usage::Entity::find().all(db).await.unwrap()
}

/// Cells, pending contributions and edge rows together equal the rows, bucket for bucket; the
/// percentiles are within the bound of the true ones.
async fn assert_exact(db: &DatabaseConnection, rows: &[usage::Model], filter: &UsageFilter) {
    let fast = latency_histograms(db, filter).await.unwrap();
    let raw = latency_histograms_raw(db, filter).await.unwrap();
    let want = expected(rows, filter);
    assert_eq!(raw, want, "raw rows vs Rust, {filter:?}");
    assert_eq!(fast, want, "histograms vs rows, {filter:?}");
    let mut per_set: Vec<(Option<String>, Histogram)> = vec![(None, fast.total())];
    per_set.extend(
        fast.by_model
            .iter()
            .map(|(m, h)| (Some(m.clone()), h.clone())),
    );
    for (model, h) in per_set {
        let mut values: Vec<i64> = rows
            .iter()
            .filter(|r| filter.matches(r) && model.as_ref().is_none_or(|m| *m == r.model))
            .filter_map(latency_of)
            .collect();
        values.sort_unstable();
        let p = h.percentiles();
        if values.is_empty() {
            assert_eq!(p.latency_p50_sec, None);
            continue;
        }
        for (pct, got) in [
            (50, p.latency_p50_sec),
            (95, p.latency_p95_sec),
            (99, p.latency_p99_sec),
        ] {
            let truth = nearest_rank(&values, pct);
            let got_us = got.unwrap() * 1e6;
            // Past the last bucket's bound the value is reported as that bound.
            if truth > 100_000_000_000 {
                assert!(got_us >= 1e11 * 0.95, "{pct}: {got_us} for {truth}");
                continue;
            }
            let err = if truth == 0 {
                got_us.abs()
            } else {
                (got_us - truth as f64).abs() / truth as f64
            };
            assert!(
                err <= RELATIVE_ERROR_BOUND,
                "p{pct} of {model:?} {filter:?}: {got_us} µs for {truth} µs ({err})"
            );
        }
    }
}

db_test!(
    async fn latency_percentiles_equal_the_raw_rows_within_the_bound(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["lat1", "lat2", "lat3"]).await;
        let mut rng = StdRng::seed_from_u64(21);
        // 75 days from 20 May: whole months (June), months mostly covered (read as the month
        // less its other days) and partial ones, whichever the random ranges pick.
        let base = Utc.with_ymd_and_hms(2025, 5, 20, 0, 0, 0).unwrap();
        let days = 75;
        let first = random_rows(&mut rng, &ids, base, days, 1_500, 1);
        let first = with_latencies(&mut rng, first);
        insert(db, &first).await;
        fold(&t).await;
        // More rows, not folded; some updated (new latencies, new model) and some deleted by
        // plain SQL, as the Django app would.
        let second = random_rows(&mut rng, &ids, base, days, 1_000, 10_000);
        let second = with_latencies(&mut rng, second);
        insert(db, &second).await;
        let dialect = llm_tracker::db::Dialect::of(db.get_database_backend());
        usage::Entity::update_many()
            .col_expr(
                usage::Column::StartedAt,
                Expr::value(dialect.datetime(base - Duration::hours(1))),
            )
            .col_expr(usage::Column::Model, Expr::value("o4-mini"))
            .filter(ids_in(db, 1..130))
            .exec(db)
            .await
            .unwrap();
        usage::Entity::delete_many()
            .filter(ids_in(db, 10_000..10_060))
            .exec(db)
            .await
            .unwrap();
        let rows = all_rows(db).await;
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
        let mut filters = vec![
            UsageFilter::default(),
            UsageFilter {
                start: Some(base + Duration::hours(5)),
                end: Some(base + Duration::days(4) + Duration::hours(13)),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(base + Duration::days(1)),
                end: Some(base + Duration::days(3) - Duration::microseconds(1)),
                model: Some("gpt".into()),
                success: Some(true),
                ..UsageFilter::default()
            },
            // June whole; 3 June to 28 July (July as its month less its last days).
            UsageFilter {
                start: Some(Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap()),
                end: Some(
                    Utc.with_ymd_and_hms(2025, 7, 1, 0, 0, 0).unwrap() - Duration::microseconds(1),
                ),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(Utc.with_ymd_and_hms(2025, 6, 3, 7, 30, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 28, 13, 0, 0).unwrap()),
                success: Some(false),
                ..UsageFilter::default()
            },
        ];
        // One user (migration 000023): all of their calls (open ends: their months' cells),
        // June whole, and the rows around June and July with a model filter.
        filters.extend([
            UsageFilter {
                user_id: Some(ids[0]),
                ..UsageFilter::default()
            },
            UsageFilter {
                user_id: Some(ids[1]),
                start: Some(Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap()),
                end: Some(
                    Utc.with_ymd_and_hms(2025, 7, 1, 0, 0, 0).unwrap() - Duration::microseconds(1),
                ),
                ..UsageFilter::default()
            },
            UsageFilter {
                user_id: Some(ids[2]),
                start: Some(Utc.with_ymd_and_hms(2025, 5, 23, 7, 30, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 28, 13, 0, 0).unwrap()),
                model: Some("gpt".into()),
                ..UsageFilter::default()
            },
        ]);
        for _ in 0..40 {
            filters.push(random_filter(&mut rng, &ids, &times, base, days));
        }
        for f in &filters {
            assert_exact(db, &rows, f).await;
        }
        assert_verified(db).await;
        // After the fold: the same.
        fold(&t).await;
        for f in filters.iter().take(20) {
            assert_exact(db, &rows, f).await;
        }
        assert_verified(db).await;
        // A histogram cell off by one: verify names it; rebuild repairs it.
        db.execute_raw(Statement::from_string(
            db.get_database_backend(),
            "INSERT INTO llm_tracker_usage_latency (grain, slot, model, success, bucket, calls) VALUES (96, 0, 'gpt-4o', true, 5, 1)".to_owned(),
        ))
        .await
        .unwrap();
        // And one in a user's month (through the upsert the fold uses: on PostgreSQL an array
        // element, on SQLite a row).
        db.execute_raw(Statement::from_string(
            db.get_database_backend(),
            migration::rollup::user_latency_upsert_sql(
                db.get_database_backend(),
                &format!(
                    "SELECT 0 AS slot, {} AS user_key, 'gpt-4o' AS model, true AS success, \
                     5 AS latency_bucket, 1 AS latency_calls",
                    ids[0]
                ),
                migration::rollup::Calendar::Month.code(),
            ),
        ))
        .await
        .unwrap();
        let report = rollup::verify(db, None, None).await.unwrap();
        assert_eq!(report.differing_cells, 2, "{:?}", report.examples);
        assert!(
            report
                .examples
                .iter()
                .any(|e| e.contains("llm_tracker_usage_latency ")
                    || e.contains("llm_tracker_usage_latency:")),
            "{:?}",
            report.examples
        );
        assert!(
            report
                .examples
                .iter()
                .any(|e| e.contains("llm_tracker_usage_latency_user")),
            "{:?}",
            report.examples
        );
        rollup::rebuild(db).await.unwrap();
        assert_verified(db).await;
        for f in filters.iter().take(10) {
            assert_exact(db, &rows, f).await;
        }
        // Retention deletes rows but keeps their histograms: all users' percentiles over the
        // deleted days stay, and a rebuild afterwards keeps them too. So do a user's, over
        // all time, a whole month and whole UTC days of a month the horizon cuts (the day
        // cells retention adds to), with or without a model filter.
        let day = |d: u32| Utc.with_ymd_and_hms(2025, 6, d, 0, 0, 0).unwrap();
        let kept_filters = [
            filters[0].clone(),
            UsageFilter {
                user_id: Some(ids[0]),
                ..UsageFilter::default()
            },
            UsageFilter {
                user_id: Some(ids[1]),
                start: Some(Utc.with_ymd_and_hms(2025, 5, 1, 0, 0, 0).unwrap()),
                end: Some(day(1) - Duration::microseconds(1)),
                ..UsageFilter::default()
            },
            UsageFilter {
                user_id: Some(ids[1]),
                start: Some(day(3)),
                end: Some(day(20) - Duration::microseconds(1)),
                ..UsageFilter::default()
            },
            UsageFilter {
                user_id: Some(ids[2]),
                start: Some(Utc.with_ymd_and_hms(2025, 5, 25, 0, 0, 0).unwrap()),
                end: Some(day(25) - Duration::microseconds(1)),
                model: Some("mini".into()),
                ..UsageFilter::default()
            },
        ];
        let mut before: Vec<BTreeMap<String, Histogram>> = Vec::new();
        for f in &kept_filters {
            before.push(latency_histograms(db, f).await.unwrap().by_model);
        }
        assert!(before.iter().all(|h| !h.is_empty()));
        // The horizon falls inside a month: its month cell keeps the deleted days' counts.
        let report = llm_tracker::retention::run(db, 2, false, base + Duration::days(40))
            .await
            .unwrap();
        assert!(report.rows > 0);
        let still_kept = async |when: &str| {
            for (f, want) in kept_filters.iter().zip(&before) {
                assert_eq!(
                    &latency_histograms(db, f).await.unwrap().by_model,
                    want,
                    "{when}: {f:?}"
                );
            }
        };
        still_kept("after retention").await;
        rollup::rebuild(db).await.unwrap();
        still_kept("after rebuild").await;
        fold(&t).await;
        still_kept("after a fold").await;
        let left = all_rows(db).await;
        let horizon = llm_tracker::retention::horizon(db).await.unwrap().unwrap();
        let after = UsageFilter {
            start: Some(horizon),
            ..UsageFilter::default()
        };
        assert_exact(db, &left, &after).await;
        assert_verified(db).await;
    }
);

db_test!(
    async fn every_bucket_bound_counts_where_rust_puts_it(backend: Backend) {
        // The reads over rows compute a row's latency in `double precision` on PostgreSQL
        // (`date_part`, `usage::latency::row_latency_us_sql`), the triggers in `numeric`: both
        // must give the whole microseconds Rust's `bucket_of` sees, at every bucket's bound and
        // a microsecond either side, and for latencies of days (an interval with a day part),
        // whatever the fraction of a second the row was written at.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let user = users(db, &["bounds"]).await[0];
        let base = Utc.with_ymd_and_hms(2025, 4, 7, 10, 0, 0).unwrap();
        let mut latencies: Vec<i64> = migration::rollup::latency_bounds()
            .iter()
            .flat_map(|&b| [b - 1, b, b + 1])
            .collect();
        latencies.extend([
            86_400_000_000 - 1,
            86_400_000_000,
            3 * 86_400_000_000 + 1,
            40 * 86_400_000_000 + 999_999,
            400 * 86_400_000_000 + 123_457,
        ]);
        let rows: Vec<usage::Model> = latencies
            .iter()
            .enumerate()
            .map(|(i, &us)| {
                let created = base
                    + Duration::seconds(i as i64)
                    + Duration::microseconds((i as i64 * 7_919) % 1_000_000);
                let mut r = crate::usage_read::row(
                    i as u128 + 1,
                    Some(user),
                    ["gpt-4o", "o4-mini"][i % 2],
                    (1, 1, 0, 0),
                    true,
                    created,
                );
                r.started_at = Some(created - Duration::microseconds(us));
                r
            })
            .collect();
        insert(db, &rows).await;
        let rows = all_rows(db).await;
        assert_eq!(rows.len(), latencies.len());
        // Rows only; then the cells (the triggers' values) for whole days and rows for the rest.
        let filters = [
            UsageFilter::default(),
            UsageFilter {
                user_id: Some(user),
                ..UsageFilter::default()
            },
        ];
        for f in &filters {
            let want = expected(&rows, f);
            assert_eq!(
                latency_histograms_raw(db, f).await.unwrap(),
                want,
                "rows, {f:?}"
            );
            assert_exact(db, &rows, f).await;
        }
        fold(&t).await;
        for f in &filters {
            assert_exact(db, &rows, f).await;
        }
        assert_verified(db).await;
    }
);

db_test!(
    async fn token_stats_adds_percentiles_only_when_asked(backend: Backend) {
        use actix_web::{App, test};
        use serde_json::{Value, json};
        let t = TestDb::migrated(backend).await;
        crate::admin_api::fixture_users(&t).await;
        let db = &t.db;
        let base = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        // gpt-4o: 100 calls of 10, 20, …, 1000 ms, spread over two days; o4-mini: one call
        // without a start time (no latency known).
        let mut rows = Vec::new();
        for i in 0..100u128 {
            let created = base + Duration::minutes(29 * i as i64);
            let mut r =
                crate::usage_read::row(i + 1, Some(2), "gpt-4o", (1, 1, 0, 0), true, created);
            r.started_at = Some(created - Duration::milliseconds(10 * (i as i64 + 1)));
            rows.push(r);
        }
        rows.push(crate::usage_read::row(
            500,
            None,
            "o4-mini",
            (1, 1, 0, 0),
            false,
            base,
        ));
        insert(db, &rows).await;
        fold(&t).await;
        let app = test::init_service(
            App::new().configure(llm_tracker::http::configure(crate::admin_api::state(&t))),
        )
        .await;
        let get = |uri: &str| {
            test::TestRequest::get()
                .uri(uri)
                .insert_header((
                    "Authorization",
                    format!("Bearer {}", crate::admin_api::staff_token()),
                ))
                .to_request()
        };
        let body: Value = test::call_and_read_body_json(
            &app,
            get("/api/v1/admin/token-stats/?start_date=2025-03-01&end_date=2025-03-03&include=latency"),
        )
        .await;
        let near = |v: &Value, want: f64| {
            let got = v.as_f64().unwrap_or_else(|| panic!("{v}"));
            assert!(
                (got - want).abs() / want <= RELATIVE_ERROR_BOUND,
                "{got} vs {want}"
            );
        };
        near(&body["summary"]["latency_p50_sec"], 0.5);
        near(&body["summary"]["latency_p95_sec"], 0.95);
        near(&body["summary"]["latency_p99_sec"], 0.99);
        let models = body["by_model"].as_array().unwrap();
        let gpt = models.iter().find(|m| m["model"] == "gpt-4o").unwrap();
        near(&gpt["latency_p95_sec"], 0.95);
        let mini = models.iter().find(|m| m["model"] == "o4-mini").unwrap();
        assert_eq!(mini["latency_p50_sec"], json!(null));
        assert_eq!(mini["latency_p99_sec"], json!(null));
        // With a user filter (read from the rows) the same figures.
        let one: Value = test::call_and_read_body_json(
            &app,
            get("/api/v1/admin/token-stats/?user_id=2&include=latency,by_user"),
        )
        .await;
        assert_eq!(
            one["summary"]["latency_p50_sec"],
            body["summary"]["latency_p50_sec"]
        );
        assert!(one["by_user"].is_array());
        // Without include=latency the JSON is as before: no such keys.
        let plain: Value =
            test::call_and_read_body_json(&app, get("/api/v1/admin/token-stats/")).await;
        assert!(plain["summary"].get("latency_p50_sec").is_none(), "{plain}");
        assert!(
            plain["by_model"][0].get("latency_p95_sec").is_none(),
            "{plain}"
        );
        // Nothing matches: nulls.
        let none: Value = test::call_and_read_body_json(
            &app,
            get("/api/v1/admin/token-stats/?start_date=2030-01-01&include=latency"),
        )
        .await;
        assert_eq!(none["summary"]["latency_p50_sec"], json!(null));
        // An unknown include is refused, naming the parameter and both values.
        let res = test::call_service(&app, get("/api/v1/admin/token-stats/?include=p99")).await;
        assert_eq!(res.status().as_u16(), 400);
        let err: Value = test::read_body_json(res).await;
        let msg = err["errors"]["include"][0].as_str().unwrap();
        assert!(msg.contains("latency") && msg.contains("by_user"), "{err}");
    }
);

/// How many month cells of `user`'s latency histograms are stored (rows: on PostgreSQL one per
/// model and outcome, on SQLite one per bucket too; either way 0 for a light month).
async fn user_month_cells(t: &TestDb, user: i32) -> i64 {
    let month = migration::rollup::Calendar::Month.code();
    let latency = t
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM llm_tracker_usage_latency_user WHERE user_key = {user} AND grain = {month}"
        ))
        .await;
    // And the user's month cells per model and outcome (migration 000030): both or neither.
    let by_model = t
        .scalar_i64(&format!(
            "SELECT COUNT(*) FROM llm_tracker_usage_rollup WHERE user_key = {user} AND grain = {month}"
        ))
        .await;
    assert_eq!(
        latency > 0,
        by_model > 0,
        "user {user}: {latency} / {by_model}"
    );
    latency
}

/// Every reader against the rows, `when`: for each of `filters` (one user's) the histograms,
/// sums and daily and hourly series, `by_user` and the listing's total; for each of
/// `by_user_filters` (all users) `by_user` at each of `limits` (1000: past the bounds' limit,
/// every user ranked).
async fn assert_read_exactly(
    db: &DatabaseConnection,
    when: &str,
    filters: &[UsageFilter],
    by_user_filters: &[UsageFilter],
    limits: &[u64],
) {
    let rows = all_rows(db).await;
    for f in filters {
        let got = latency_histograms(db, f).await.unwrap();
        assert_eq!(got, expected(&rows, f), "{when}: {f:?}");
        // Sums, and daily and hourly series (a light month's days are its rows).
        for granularity in [None, Some(Granularity::Month), Some(Granularity::Day)] {
            assert_eq!(
                stats::token_stats(db, f, granularity).await.unwrap(),
                stats::token_stats_raw(db, f, granularity, Default::default())
                    .await
                    .unwrap(),
                "{when}: token stats of {f:?} by {granularity:?}"
            );
        }
        // One user's by_user, and the listing's total.
        assert_eq!(
            stats::stats_by_user(db, f, 5).await.unwrap(),
            stats::stats_by_user_raw(db, f, 5).await.unwrap(),
            "{when}: by_user of {f:?}"
        );
        assert_eq!(
            list_usage(db, f, 1, 5).await.unwrap().total,
            count_matching_raw(db, f).await.unwrap(),
            "{when}: listing total of {f:?}"
        );
    }
    for f in by_user_filters {
        for &limit in limits {
            assert_eq!(
                stats::stats_by_user(db, f, limit).await.unwrap(),
                stats::stats_by_user_raw(db, f, limit).await.unwrap(),
                "{when}: by_user {limit} of {f:?}"
            );
        }
    }
}

/// How many of `user`'s day cells the totals table holds (migration 000031: none for a light
/// month, unless retention deleted rows there).
async fn user_day_cells(t: &TestDb, user: i32) -> i64 {
    t.scalar_i64(&format!(
        "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE user_key = {user} AND grain = {}",
        migration::rollup::DAY
    ))
    .await
}

/// The full months of `user` (`migration::rollup::FULL_MONTH_TABLE`).
async fn full_months(t: &TestDb, user: i32) -> i64 {
    t.scalar_i64(&format!(
        "SELECT COUNT(*) FROM {} WHERE user_key = {user}",
        migration::rollup::FULL_MONTH_TABLE
    ))
    .await
}

db_test!(
    async fn a_users_light_months_are_counted_from_their_rows(backend: Backend) {
        // Issue 16 (the rollup's size at 100,000 users), migration 000029: a user's month with
        // fewer than FULL_MONTH_CALLS calls keeps no histogram cell; its percentiles come from
        // its rows, exactly, before and after the fold makes the month full, whatever is
        // pending.
        use migration::rollup::FULL_MONTH_CALLS;
        assert_eq!(FULL_MONTH_CALLS, 10);
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["light1", "light2", "heavy"]).await;
        let (light, heavy) = (&ids[..2], ids[2]);
        let mut rng = StdRng::seed_from_u64(29);
        // May to August 2025: the light users ~3 calls a month each, the heavy one ~45.
        let base = Utc.with_ymd_and_hms(2025, 5, 1, 0, 0, 0).unwrap();
        let days = 123;
        let mut rows = random_rows(&mut rng, light, base, days, 30, 1);
        rows.extend(random_rows(&mut rng, &[heavy], base, days, 220, 1_000));
        insert(db, &with_latencies(&mut rng, rows)).await;
        // Nothing folded yet: no month is full, and none has a cell.
        for id in &ids {
            assert_eq!(full_months(&t, *id).await, 0);
            assert_eq!(user_month_cells(&t, *id).await, 0);
        }
        let month = |m: u32| Utc.with_ymd_and_hms(2025, m, 1, 0, 0, 0).unwrap();
        let whole = |user: i32, m: u32| UsageFilter {
            user_id: Some(user),
            start: Some(month(m)),
            end: Some(month(m + 1) - Duration::microseconds(1)),
            ..UsageFilter::default()
        };
        let mut filters = Vec::new();
        for id in &ids {
            filters.push(UsageFilter {
                user_id: Some(*id),
                ..UsageFilter::default()
            });
            filters.push(whole(*id, 6));
            filters.push(UsageFilter {
                user_id: Some(*id),
                start: Some(Utc.with_ymd_and_hms(2025, 5, 17, 9, 30, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 8, 3, 2, 0, 0).unwrap()),
                success: Some(true),
                ..UsageFilter::default()
            });
            filters.push(UsageFilter {
                user_id: Some(*id),
                start: Some(month(7)),
                model: Some("gpt".into()),
                ..UsageFilter::default()
            });
            // Parts of two months (migration 000031: a light month's days are its rows).
            filters.push(UsageFilter {
                user_id: Some(*id),
                start: Some(Utc.with_ymd_and_hms(2025, 6, 14, 7, 0, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 13, 3, 0, 0).unwrap()),
                ..UsageFilter::default()
            });
        }
        // Per model too (migration 000030): a user's token sums per model and outcome, and
        // `by_user` with a model or outcome filter, which ranks every user's months.
        let by_user_filters = [
            UsageFilter {
                model: Some("gpt".into()),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(month(6)),
                end: Some(month(8) - Duration::microseconds(1)),
                success: Some(true),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(Utc.with_ymd_and_hms(2025, 5, 20, 0, 0, 0).unwrap()),
                model: Some("mini".into()),
                ..UsageFilter::default()
            },
            // Over all models (migration 000031), the day runs of partial months: 30 days
            // across a month's end (days at both ends), days inside one month, and a month and
            // most of the next (the next month's cell less its days after the range).
            UsageFilter {
                start: Some(Utc.with_ymd_and_hms(2025, 6, 14, 7, 0, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 13, 3, 0, 0).unwrap()),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(Utc.with_ymd_and_hms(2025, 7, 5, 0, 0, 0).unwrap()),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 19, 0, 0, 0).unwrap()),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(month(6)),
                end: Some(Utc.with_ymd_and_hms(2025, 7, 25, 0, 0, 0).unwrap()),
                ..UsageFilter::default()
            },
        ];
        let check = async |when: &str| {
            assert_read_exactly(db, when, &filters, &by_user_filters, &[1, 2, 10, 1000]).await
        };
        check("all pending").await;
        assert_verified(db).await;
        // The fold takes the heavy user's four months past 10 calls: they become full, their
        // cells filled from the rows; the light users' months stay light.
        fold(&t).await;
        assert_eq!(full_months(&t, heavy).await, 4);
        assert!(user_month_cells(&t, heavy).await > 0);
        for id in light {
            assert_eq!(full_months(&t, *id).await, 0);
            assert_eq!(user_month_cells(&t, *id).await, 0);
            assert_eq!(user_day_cells(&t, *id).await, 0);
        }
        assert!(user_day_cells(&t, heavy).await > 0);
        check("folded").await;
        assert_verified(db).await;
        // More rows, pending, in full and light months; then folded.
        let mut more = random_rows(&mut rng, &[heavy], month(7), 50, 40, 5_000);
        more.extend(random_rows(&mut rng, light, month(7), 50, 6, 6_000));
        insert(db, &with_latencies(&mut rng, more)).await;
        check("more pending").await;
        assert_verified(db).await;
        fold(&t).await;
        check("more folded").await;
        assert_verified(db).await;
        for id in light {
            assert_eq!(full_months(&t, *id).await, 0, "{id}");
        }
        // A month made full while some of its rows are pending (on PostgreSQL, a writer that
        // commits between the fold's statement and its promotion): filled from its rows less
        // those, which the next fold adds.
        let slot = |m: u32| month(m).timestamp() / 900;
        let july = (i64::from(light[0]), slot(7));
        let late = random_rows(&mut rng, &light[..1], month(7), 20, 3, 7_000);
        insert(db, &with_latencies(&mut rng, late)).await;
        {
            use sea_orm::TransactionTrait;
            let txn = db.begin().await.unwrap();
            migration::rollup::promote_months_in(&txn, &[july])
                .await
                .unwrap();
            txn.commit().await.unwrap();
        }
        assert_eq!(full_months(&t, light[0]).await, 1);
        assert!(user_month_cells(&t, light[0]).await > 0);
        assert!(user_day_cells(&t, light[0]).await > 0);
        check("made full, rows pending").await;
        assert_verified(db).await;
        fold(&t).await;
        check("made full, folded").await;
        assert_verified(db).await;
        // A rebuild keeps the full months and makes full every other month of 10 calls.
        rollup::rebuild(db).await.unwrap();
        assert_eq!(full_months(&t, heavy).await, 4);
        assert_eq!(full_months(&t, light[0]).await, 1, "full months stay full");
        assert_eq!(full_months(&t, light[1]).await, 0);
        assert_eq!(user_month_cells(&t, light[1]).await, 0);
        assert_eq!(user_day_cells(&t, light[1]).await, 0);
        check("rebuilt").await;
        assert_verified(db).await;
        // Retention past May and into June: a light month's deleted rows stay in its day
        // cells, which reads add to the rows left. (Over whole UTC days: the rows of a part of
        // a day before the horizon are gone, for a light month as for a full one.)
        let filters: Vec<UsageFilter> = filters
            .into_iter()
            .filter(|f| f.start.is_none_or(|s| s.timestamp() % 86_400 == 0))
            .collect();
        assert_eq!(filters.len(), 9);
        let mut before = Vec::new();
        for f in &filters {
            before.push((
                latency_histograms(db, f).await.unwrap(),
                stats::token_stats(db, f, None).await.unwrap(),
                stats::token_stats(db, f, Some(Granularity::Month))
                    .await
                    .unwrap(),
            ));
        }
        let report = llm_tracker::retention::run(db, 2, false, month(6) + Duration::days(12))
            .await
            .unwrap();
        assert!(report.rows > 0);
        let kept = async |when: &str| {
            for (f, (want, sums, daily)) in filters.iter().zip(&before) {
                assert_eq!(
                    &stats::token_stats(db, f, Some(Granularity::Month))
                        .await
                        .unwrap(),
                    daily,
                    "{when}: daily series of {f:?}"
                );
                assert_eq!(
                    &latency_histograms(db, f).await.unwrap(),
                    want,
                    "{when}: {f:?}"
                );
                assert_eq!(
                    &stats::token_stats(db, f, None).await.unwrap(),
                    sums,
                    "{when}: token stats of {f:?}"
                );
            }
        };
        kept("after retention").await;
        // A range after the horizon whose month cover starts before it: no bounds, every user
        // ranked (`rank_every_user`), the light users' missing days counted, or bounded by
        // their month's largest light month where that decides (limit 1: the heavy user).
        let by_user_after = async |when: &str| {
            for f in by_user_filters.iter().filter(|f| {
                f.model.is_none() && f.start.is_some_and(|s| s >= month(6) + Duration::days(10))
            }) {
                for limit in [1, 2, 10] {
                    assert_eq!(
                        stats::stats_by_user(db, f, limit).await.unwrap(),
                        stats::stats_by_user_raw(db, f, limit).await.unwrap(),
                        "{when}: by_user {limit} of {f:?}"
                    );
                }
            }
        };
        by_user_after("after retention").await;
        rollup::rebuild(db).await.unwrap();
        kept("retention, rebuilt").await;
        assert_verified(db).await;
        // A rebuild while a retention run is under way: its horizon moved on to 10 July, the
        // rows before it not deleted yet. A light month's days there are its rows (its day
        // cells hold only what retention deleted), and its month and year cells count them.
        let horizon = t
            .scalar_i64("SELECT horizon_slot FROM llm_tracker_usage_retention WHERE id = 1")
            .await;
        let set_horizon = async |slot: i64| {
            db.execute_unprepared(&format!(
                "UPDATE llm_tracker_usage_retention SET horizon_slot = {slot} WHERE id = 1"
            ))
            .await
            .unwrap();
        };
        assert!(t
            .scalar_i64(&format!(
                "SELECT COUNT(*) FROM llm_tracker_usage WHERE user_id = {} AND created_at >= '2025-07-01' AND created_at < '2025-07-10'",
                light[1]
            ))
            .await
            > 0);
        set_horizon(slot(7) + 9 * 96).await;
        rollup::rebuild(db).await.unwrap();
        set_horizon(horizon).await;
        kept("rebuilt while retention runs").await;
        assert_verified(db).await;
        // Down through 000031, 000030, then 000029, the light months get their cells back
        // (reads without the table use every month's cells); up again they go.
        // (Between the two, the per-model cells are those of the code before 000030, which
        // this code does not read that way; only the whole state after 000029's down is.)
        crate::helpers::down_through(db, "m20261211_000031_rollup_light_days").await;
        for id in light {
            assert!(user_day_cells(&t, *id).await > 0);
        }
        kept("after 000031's down").await;
        assert_verified(db).await;
        crate::helpers::down_through(db, "m20261210_000030_rollup_full_months_by_model").await;
        crate::helpers::down_through(db, "m20261209_000029_rollup_full_months").await;
        for id in light {
            assert!(user_month_cells(&t, *id).await > 0);
        }
        kept("after 000029's down").await;
        assert_verified(db).await;
        migration::Migrator::up(db, None).await.unwrap();
        // Months that start before the retention horizon (11 June) stay full: their cells keep
        // what retention deleted. The light users' July and August lose theirs again.
        for id in light {
            assert_eq!(full_months(&t, *id).await, 2);
            assert_eq!(
                t.scalar_i64(&format!(
                    "SELECT COUNT(*) FROM llm_tracker_usage_latency_user WHERE user_key = {id} AND grain = 2976 AND slot >= {}",
                    slot(7)
                ))
                .await,
                0
            );
            // (And their day cells: migration 000031.)
            assert_eq!(
                t.scalar_i64(&format!(
                    "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE user_key = {id} AND grain = 96 AND slot >= {}",
                    slot(7)
                ))
                .await,
                0
            );
        }
        assert_eq!(full_months(&t, heavy).await, 4);
        kept("after 000029's up").await;
        assert_verified(db).await;
    }
);

/// The full years of `user` (`migration::rollup::FULL_YEAR_TABLE`).
async fn full_years(t: &TestDb, user: i32) -> i64 {
    t.scalar_i64(&format!(
        "SELECT COUNT(*) FROM {} WHERE user_key = {user}",
        migration::rollup::FULL_YEAR_TABLE
    ))
    .await
}

/// How many month cells of `user` the totals table holds (migration 000032: none in a light
/// year).
async fn totals_month_cells(t: &TestDb, user: i32) -> i64 {
    t.scalar_i64(&format!(
        "SELECT COUNT(*) FROM llm_tracker_usage_rollup_total WHERE user_key = {user} AND grain = {}",
        migration::rollup::Calendar::Month.code()
    ))
    .await
}

db_test!(
    async fn a_users_light_years_are_counted_from_their_rows(backend: Backend) {
        // Issue 16 (the rollup's size at a million users), migration 000032: a user's year with
        // fewer than FULL_YEAR_CALLS calls keeps its year cell but no month cell in the totals
        // table; one user's sums, series, percentiles and listing total read its months from
        // its rows, and `by_user` adds them (through bounds, or ranking every user) — exactly,
        // before and after the fold, the year's promotion, a rebuild, retention and the
        // migration's down and up.
        use migration::rollup::FULL_YEAR_CALLS;
        assert_eq!(FULL_YEAR_CALLS, 10);
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["rare1", "rare2", "mid", "heavy", "both"]).await;
        let (rare, mid, heavy, both) = (&ids[..2], ids[2], ids[3], ids[4]);
        let mut rng = StdRng::seed_from_u64(32);
        let at = |y: i32, m: u32, d: u32| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
        // May 2025 to February 2026: the rare users a few calls a year, `mid` ~3 a month (a
        // full year of light months), `heavy` ~30 a month (full months).
        let base = at(2025, 5, 1);
        let days = 300;
        let mut rows = Vec::new();
        for (i, user) in rare.iter().enumerate() {
            let id = 1 + 100 * i as u128;
            for (k, (y, m, d)) in [
                (2025, 5, 20),
                (2025, 6, 3),
                (2025, 7, 31),
                (2026, 1, 9),
                (2026, 2, 14),
            ]
            .into_iter()
            .enumerate()
            {
                let mut r = random_rows(&mut rng, &[*user], at(y, m, d), 1, 1, id + k as u128);
                r[0].user_id = Some(*user);
                // rare2 calls seldom but with the most tokens: it ranks first wherever its
                // light years' rows count, which `by_user`'s bounds must allow for.
                if i == 1 {
                    r[0].prompt_tokens = 400_000 + 1_000 * k as i32;
                    r[0].total_tokens = r[0].prompt_tokens + r[0].completion_tokens;
                }
                rows.extend(r);
            }
        }
        rows.extend(random_rows(&mut rng, &[mid], base, days, 120, 1_000));
        rows.extend(random_rows(&mut rng, &[heavy], base, days, 300, 2_000));
        // `both`: a full 2025 of small calls in November and December, then a light 2026 of
        // two calls with the most tokens of anyone there. Over November to February it is
        // listed by its 2025 month cells, and its bound must hold its light 2026 too.
        for (k, mut r) in random_rows(&mut rng, &[both], at(2025, 11, 1), 60, 12, 3_000)
            .into_iter()
            .enumerate()
        {
            r.user_id = Some(both);
            r.prompt_tokens = 10 + k as i32;
            r.total_tokens = r.prompt_tokens + r.completion_tokens;
            rows.push(r);
        }
        for (k, (m, d)) in [(1, 20), (2, 10)].into_iter().enumerate() {
            let mut r = random_rows(&mut rng, &[both], at(2026, m, d), 1, 1, 3_100 + k as u128);
            r[0].user_id = Some(both);
            r[0].prompt_tokens = 500_000;
            r[0].total_tokens = r[0].prompt_tokens + r[0].completion_tokens;
            rows.extend(r);
        }
        insert(db, &with_latencies(&mut rng, rows)).await;
        let mut filters = Vec::new();
        for id in &ids {
            for (start, end) in [
                (None, None),
                (Some(at(2025, 6, 1)), Some(at(2025, 8, 1))),
                (Some(at(2025, 5, 17)), Some(at(2026, 2, 3))),
                (Some(at(2025, 12, 10)), None),
                (Some(at(2025, 7, 14)), Some(at(2025, 8, 13))),
            ] {
                filters.push(UsageFilter {
                    user_id: Some(*id),
                    start,
                    end: end.map(|e| e - Duration::microseconds(1)),
                    ..UsageFilter::default()
                });
            }
        }
        // `by_user` over all models: whole months (month runs), across the new year, months
        // less their days, days only, and all time (year cells).
        let by_user_filters = [
            UsageFilter::default(),
            UsageFilter {
                start: Some(at(2025, 6, 1)),
                end: Some(at(2025, 8, 1) - Duration::microseconds(1)),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(at(2025, 11, 1)),
                end: Some(at(2026, 3, 1) - Duration::microseconds(1)),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(at(2025, 5, 15)),
                end: Some(at(2025, 7, 30)),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(at(2025, 7, 14)),
                end: Some(at(2025, 8, 13)),
                ..UsageFilter::default()
            },
            UsageFilter {
                start: Some(at(2026, 1, 1)),
                ..UsageFilter::default()
            },
            // Days of a light year's month: bounded by the most tokens a light year holds.
            UsageFilter {
                start: Some(at(2026, 1, 5)),
                end: Some(at(2026, 1, 20)),
                ..UsageFilter::default()
            },
        ];
        let check = async |when: &str| {
            assert_read_exactly(db, when, &filters, &by_user_filters, &[1, 2, 3, 10, 1000]).await
        };
        check("all pending").await;
        assert_verified(db).await;
        // The fold: `mid` and `heavy` have full years with month cells, the rare users' years
        // (3 and 2 calls) are light, without month cells.
        fold(&t).await;
        assert_eq!(full_years(&t, heavy).await, 2);
        assert_eq!(full_years(&t, mid).await, 2);
        assert_eq!(full_years(&t, both).await, 1);
        assert!(totals_month_cells(&t, mid).await >= 8);
        for id in rare {
            assert_eq!(full_years(&t, *id).await, 0, "{id}");
            assert_eq!(totals_month_cells(&t, *id).await, 0, "{id}");
        }
        check("folded").await;
        assert_verified(db).await;
        // 7 more calls of rare1 in 2025, pending: 10, made full by the fold that counts them,
        // its months filled from the rows (July's 8 calls stay a light month).
        let mut more = Vec::new();
        for k in 0..7 {
            let mut r = random_rows(
                &mut rng,
                &[rare[0]],
                at(2025, 7, 2 + k),
                1,
                1,
                5_000 + u128::from(k),
            );
            r[0].user_id = Some(rare[0]);
            more.extend(r);
        }
        insert(db, &with_latencies(&mut rng, more)).await;
        check("more pending").await;
        assert_verified(db).await;
        fold(&t).await;
        assert_eq!(full_years(&t, rare[0]).await, 1);
        assert_eq!(totals_month_cells(&t, rare[0]).await, 3);
        assert_eq!(full_months(&t, rare[0]).await, 0);
        assert_eq!(full_years(&t, rare[1]).await, 0);
        check("year made full").await;
        assert_verified(db).await;
        // A rebuild keeps the full years and leaves the light one light.
        rollup::rebuild(db).await.unwrap();
        assert_eq!(full_years(&t, rare[0]).await, 1);
        assert_eq!(full_years(&t, rare[1]).await, 0);
        assert_eq!(totals_month_cells(&t, rare[1]).await, 0);
        check("rebuilt").await;
        assert_verified(db).await;
        // Retention up to 12 June 2025: rare2's 2025 starts before the horizon and is made full
        // before any of its rows goes; its 2026 stays light.
        let kept_filters: Vec<UsageFilter> = filters
            .iter()
            .filter(|f| f.start.is_none_or(|s| s >= at(2025, 6, 12)))
            .cloned()
            .collect();
        let mut before = Vec::new();
        for f in &kept_filters {
            before.push((
                stats::token_stats(db, f, None).await.unwrap(),
                stats::token_stats(db, f, Some(Granularity::Month))
                    .await
                    .unwrap(),
            ));
        }
        let report = llm_tracker::retention::run(db, 2, false, at(2025, 6, 14))
            .await
            .unwrap();
        assert!(report.rows > 0);
        assert_eq!(full_years(&t, rare[1]).await, 1);
        let kept = async |when: &str| {
            for (f, (sums, monthly)) in kept_filters.iter().zip(&before) {
                assert_eq!(
                    &stats::token_stats(db, f, None).await.unwrap(),
                    sums,
                    "{when}: token stats of {f:?}"
                );
                assert_eq!(
                    &stats::token_stats(db, f, Some(Granularity::Month))
                        .await
                        .unwrap(),
                    monthly,
                    "{when}: monthly series of {f:?}"
                );
            }
            for f in by_user_filters
                .iter()
                .filter(|f| f.start.is_some_and(|s| s >= at(2025, 7, 1)))
            {
                for limit in [1, 2, 10, 1000] {
                    assert_eq!(
                        stats::stats_by_user(db, f, limit).await.unwrap(),
                        stats::stats_by_user_raw(db, f, limit).await.unwrap(),
                        "{when}: by_user {limit} of {f:?}"
                    );
                }
            }
        };
        kept("after retention").await;
        assert_verified(db).await;
        // Down through 000032 the light year (rare2's 2026) gets its month cells back; up
        // again they go, the years before the horizon staying full.
        crate::helpers::down_through(db, "m20261212_000032_rollup_light_years").await;
        assert_eq!(totals_month_cells(&t, rare[1]).await, 3 + 2);
        kept("after 000032's down").await;
        assert_verified(db).await;
        migration::Migrator::up(db, None).await.unwrap();
        assert_eq!(full_years(&t, rare[1]).await, 1);
        assert_eq!(totals_month_cells(&t, rare[1]).await, 3);
        assert_eq!(full_years(&t, heavy).await, 2);
        kept("after 000032's up").await;
        assert_verified(db).await;
    }
);

db_test!(
    async fn a_month_becomes_full_at_exactly_ten_calls(backend: Backend) {
        // Migration 000029's threshold, through the fold: 9 calls leave a user's month light,
        // the 10th makes it full in the fold that counts it, and the histograms are exact
        // either side (`migration::rollup::FoldSql::candidates`).
        use migration::rollup::FULL_MONTH_CALLS;
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["edge"]).await;
        let user = ids[0];
        let july = Utc.with_ymd_and_hms(2025, 7, 1, 0, 0, 0).unwrap();
        let call = |n: u128, day: i64| {
            let created = july + Duration::days(day) + Duration::hours(3);
            let mut r =
                crate::usage_read::row(n, Some(user), "gpt-4o", (10, 5, 0, 0), true, created);
            r.started_at = Some(created - Duration::milliseconds(200 * n as i64));
            r
        };
        let whole = UsageFilter {
            user_id: Some(user),
            start: Some(july),
            end: Some(july + Duration::days(31) - Duration::microseconds(1)),
            ..UsageFilter::default()
        };
        let all = UsageFilter {
            user_id: Some(user),
            ..UsageFilter::default()
        };
        let first: Vec<usage::Model> = (1..FULL_MONTH_CALLS as u128)
            .map(|n| call(n, n as i64))
            .collect();
        insert(db, &first).await;
        fold(&t).await;
        assert_eq!(full_months(&t, user).await, 0, "9 calls: light");
        assert_eq!(user_month_cells(&t, user).await, 0);
        for f in [&whole, &all] {
            assert_exact(db, &all_rows(db).await, f).await;
        }
        assert_verified(db).await;
        insert(db, &[call(10, 20)]).await;
        // Pending: still light, and exact.
        assert_eq!(full_months(&t, user).await, 0);
        assert_exact(db, &all_rows(db).await, &whole).await;
        fold(&t).await;
        assert_eq!(full_months(&t, user).await, 1, "10 calls: full");
        assert!(user_month_cells(&t, user).await > 0);
        for f in [&whole, &all] {
            assert_exact(db, &all_rows(db).await, f).await;
        }
        assert_verified(db).await;
    }
);

db_test!(
    async fn a_listed_users_light_year_counts_in_its_bound(backend: Backend) {
        // Issue 16, migration 000032: `by_user` bounds a user listed by its month cells of one
        // year with its year cell of a light year too. Here `both` is listed by its small
        // November and December 2025 (a full year), and holds most in two calls of January
        // 2026 (a light year); 22 others have more than its 2025 and less than its whole. Its
        // light year is the largest there, yet less than the others' tokens: without it in
        // its bound, the ranking stops at the others and leaves `both` out.
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let names: Vec<String> = (0..23).map(|i| format!("lb{i}")).collect();
        let ids = users(db, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let (both, others) = (ids[22], &ids[..22]);
        let mut rng = StdRng::seed_from_u64(3232);
        let at = |y: i32, m: u32, d: u32| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
        let mut rows = Vec::new();
        let mut calls = |user: i32, start: DateTime<Utc>, days: i64, n: u128, tokens: i32| {
            let first = 1 + 100 * rows.len() as u128;
            for mut r in random_rows(&mut rng, &[user], start, days, n, first) {
                r.user_id = Some(user);
                (r.prompt_tokens, r.completion_tokens) = (tokens, 0);
                (r.cached_tokens, r.reasoning_tokens) = (0, 0);
                r.total_tokens = tokens;
                rows.push(r);
            }
        };
        for (i, user) in others.iter().enumerate() {
            calls(*user, at(2025, 11, 1), 60, 12, 8_000 + 10 * i as i32);
        }
        calls(both, at(2025, 11, 1), 60, 12, 5_000);
        calls(both, at(2026, 1, 10), 10, 2, 35_000);
        insert(db, &rows).await;
        fold(&t).await;
        let filter = UsageFilter {
            start: Some(at(2025, 11, 1)),
            end: Some(at(2026, 2, 1) - Duration::microseconds(1)),
            ..UsageFilter::default()
        };
        for limit in [1, 2] {
            let got = stats::stats_by_user(db, &filter, limit).await.unwrap();
            assert_eq!(
                got,
                stats::stats_by_user_raw(db, &filter, limit).await.unwrap(),
                "by_user at {limit}"
            );
            assert_eq!(got[0].user_id, Some(both), "{got:?}");
        }
    }
);

db_test!(
    async fn one_users_many_calls_are_counted_in_two_halves_exactly(backend: Backend) {
        // Issue 16: one user's rows of many calls are counted in two halves at once, on the
        // request's transaction and on another of the same snapshot (PostgreSQL; on SQLite
        // in turn): one range cut at a UTC midnight, or the rows around whole months dealt
        // out. The histograms equal the rows whatever the cut, folded or pending.
        use llm_tracker::usage::latency::{HALVES_FROM_CALLS, halves};
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["busy"]).await;
        let heavy = ids[0];
        let mut rng = StdRng::seed_from_u64(47);
        let march = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
        let mut rows = Vec::new();
        let mut next_id = 1;
        // Late February, ten days of March, early April (a fifth of the calls for no user).
        for (from, days, n) in [
            (march - Duration::days(6), 6, 4_000),
            (march + Duration::days(3), 10, 7_000),
            (march + Duration::days(31), 5, 4_000),
        ] {
            rows.extend(random_rows(&mut rng, &[heavy], from, days, n, next_id));
            next_id += n;
        }
        let rows = with_latencies(&mut rng, rows);
        let (folded, pending) = rows.split_at(rows.len() - 500);
        insert(db, folded).await;
        fold(&t).await;
        insert(db, pending).await;
        let user = |start: DateTime<Utc>, end: Option<DateTime<Utc>>| UsageFilter {
            start: Some(start),
            end,
            user_id: Some(heavy),
            ..Default::default()
        };
        let tick = Duration::microseconds(1);
        let inside = user(
            march + Duration::days(3) + Duration::hours(5),
            Some(march + Duration::days(11) + Duration::hours(17)),
        );
        let open = user(march + Duration::days(4), None);
        let around = user(
            march - Duration::days(5) + Duration::hours(3),
            Some(march + Duration::days(34) + Duration::hours(20)),
        );
        // The day cells say these are cut: one part each for the first two, the rows before
        // and after March (whose cell answers) for the third.
        let days: Vec<(i64, i64)> = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT slot, calls FROM llm_tracker_usage_rollup_total WHERE grain = 96 \
                     AND user_key = {heavy} ORDER BY slot"
                ),
            ))
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
        let april = march + Duration::days(31);
        let edges = [
            user(around.start.unwrap(), Some(march - tick)),
            user(april, around.end),
        ];
        for parts in [
            std::slice::from_ref(&inside),
            std::slice::from_ref(&open),
            &edges[..],
        ] {
            let [a, b] = halves(parts, &days).unwrap_or_else(|| panic!("{parts:?}"));
            assert!(!a.is_empty() && !b.is_empty());
        }
        assert!(days.iter().map(|d| d.1).sum::<i64>() > 2 * HALVES_FROM_CALLS);
        let all = all_rows(db).await;
        let one_day = user(
            march + Duration::days(5) + Duration::hours(1),
            Some(march + Duration::days(5) + Duration::hours(23)),
        );
        for filter in [
            inside.clone(),
            open.clone(),
            around.clone(),
            one_day,
            UsageFilter {
                model: Some("4o".into()),
                ..inside.clone()
            },
            UsageFilter {
                success: Some(true),
                ..around.clone()
            },
        ] {
            assert_exact(db, &all, &filter).await;
        }
        // Folded, the same.
        fold(&t).await;
        for filter in [&inside, &open, &around] {
            assert_exact(db, &all, filter).await;
        }
    }
);
