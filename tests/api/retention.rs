//! Retention (issue 20, item 2; `src/retention.rs`): raw rows older than the limit are
//! deleted, and the statistics of the deleted period stay exactly what they were — at every
//! grain of all users' cells (15-minute slots and up, any zone whose offset is whole quarter
//! hours) and at UTC days for one user — while the listing shows no rows there. Deletes by
//! anyone else still take rows out of the statistics. Tracked calls go on undisturbed during a
//! run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use llm_tracker::db::entities::usage;
use llm_tracker::retention;
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::list::{count_matching_raw, list_usage};
use llm_tracker::usage::rollup;
use llm_tracker::usage::stats::{
    Granularity, SeriesOptions, TokenStatsData, UserStats, stats_by_user, token_stats_in,
    token_stats_raw,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::cli::{cmd, stderr, stdout};
use crate::db_test;
use crate::helpers::{Backend, TestDb};
use crate::resilience::{
    NEVER, assert_each_stored_once, callers, drained, joined, p99, provider, tracker_at,
};
use crate::rollup::{assert_same, assert_verified, fold, random_filter, random_rows, users};
use crate::usage_read::{insert, row};

/// 60 days of rows from here; "now" is 60 days later, and a 30-day retention deletes the
/// first 30 (the horizon is `BASE` + 30 days, a UTC midnight).
fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn now() -> DateTime<Utc> {
    base() + Duration::days(60) + Duration::hours(10)
}

fn horizon() -> DateTime<Utc> {
    base() + Duration::days(30)
}

fn range(from: DateTime<Utc>, to: DateTime<Utc>) -> UsageFilter {
    UsageFilter {
        start: Some(from),
        end: Some(to - Duration::microseconds(1)),
        ..Default::default()
    }
}

/// The requests whose answers retention must keep: over the deleted period, across the
/// horizon and over all time, for all users at slot grain in several zones and granularities,
/// by model and outcome, and for one user (and by user) over whole UTC days.
fn kept_requests(users: &[i32]) -> Vec<(UsageFilter, Option<Granularity>, Tz)> {
    let utc: Tz = "UTC".parse().unwrap();
    let zones: Vec<Tz> = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu"]
        .iter()
        .map(|z| z.parse().unwrap())
        .collect();
    let b = base();
    let mut out = Vec::new();
    let all_users = [
        UsageFilter::default(),
        range(b, horizon()),
        range(
            b + Duration::days(3) + Duration::minutes(15),
            b + Duration::days(20) + Duration::minutes(45),
        ),
        range(b + Duration::days(10), b + Duration::days(45)),
        UsageFilter {
            model: Some("mini".into()),
            success: Some(true),
            ..range(b, horizon())
        },
        UsageFilter {
            success: Some(false),
            ..range(b + Duration::hours(7), b + Duration::days(40))
        },
    ];
    // (`Day` is hourly buckets, `Month` daily, `Year` monthly.)
    for f in all_users {
        for g in [
            None,
            Some(Granularity::Day),
            Some(Granularity::Month),
            Some(Granularity::Year),
        ] {
            for tz in &zones {
                out.push((f.clone(), g, *tz));
            }
        }
    }
    for user in users {
        for f in [
            range(b, horizon()),
            range(b + Duration::days(2), b + Duration::days(41)),
        ] {
            for g in [None, Some(Granularity::Month), Some(Granularity::Year)] {
                out.push((
                    UsageFilter {
                        user_id: Some(*user),
                        ..f.clone()
                    },
                    g,
                    utc,
                ));
            }
        }
    }
    out
}

/// By-user rankings over whole UTC days.
fn kept_by_user() -> Vec<UsageFilter> {
    let b = base();
    vec![
        range(b, horizon()),
        range(b + Duration::days(1), b + Duration::days(50)),
    ]
}

type Answers = (Vec<TokenStatsData>, Vec<Vec<UserStats>>);

/// The answers now are `before`, request by request.
async fn assert_kept(db: &DatabaseConnection, users: &[i32], before: &Answers) {
    let now = answers(db, users).await;
    for ((request, a), b) in kept_requests(users).iter().zip(&now.0).zip(&before.0) {
        assert_eq!(a.summary, b.summary, "{request:?}");
        assert_eq!(a.by_model, b.by_model, "{request:?}");
        for (x, y) in a.series.iter().flatten().zip(b.series.iter().flatten()) {
            assert_eq!(x, y, "{request:?}");
        }
        assert_eq!(a.series, b.series, "{request:?}");
    }
    for ((f, a), b) in kept_by_user().iter().zip(&now.1).zip(&before.1) {
        assert_eq!(a, b, "by_user {f:?}");
    }
}

async fn answers(db: &DatabaseConnection, users: &[i32]) -> Answers {
    let mut stats = Vec::new();
    for (f, g, tz) in kept_requests(users) {
        let options = SeriesOptions { tz, fill: false };
        stats.push(token_stats_in(db, &f, g, options).await.unwrap());
    }
    let mut by_user = Vec::new();
    for f in kept_by_user() {
        by_user.push(stats_by_user(db, &f, 1000).await.unwrap());
    }
    (stats, by_user)
}

async fn rows_before(db: &DatabaseConnection, at: DateTime<Utc>) -> u64 {
    count_matching_raw(
        db,
        &UsageFilter {
            end: Some(at - Duration::microseconds(1)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn all_rows(db: &DatabaseConnection) -> u64 {
    count_matching_raw(db, &UsageFilter::default())
        .await
        .unwrap()
}

db_test!(
    async fn retention_keeps_the_statistics_of_what_it_deletes(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let db = &t.db;
        let ids = users(db, &["keep1", "keep2", "keep3"]).await;
        let mut rng = StdRng::seed_from_u64(20);
        let rows = random_rows(&mut rng, &ids, base(), 60, 1500, 1);
        insert(db, &rows[..900]).await;
        fold(&t).await;
        // Some contributions still pending when retention runs: it must keep them too.
        insert(db, &rows[900..]).await;

        let before = answers(db, &ids).await;
        // The answers kept are the true ones: the rollup's equal the raw rows' now.
        for ((f, g, tz), fast) in kept_requests(&ids).into_iter().zip(&before.0) {
            let raw = token_stats_raw(db, &f, g, SeriesOptions { tz, fill: false })
                .await
                .unwrap();
            assert_eq!(fast, &raw, "{f:?} {g:?} {tz}");
        }
        let old = rows_before(db, horizon()).await;
        let total = all_rows(db).await;
        let old_stats = token_stats_in(
            db,
            &range(base(), horizon()),
            None,
            SeriesOptions::default(),
        )
        .await
        .unwrap();
        assert!(old > 500 && old < total, "{old} of {total}");

        // A dry run counts and changes nothing.
        let dry = retention::run(db, 30, true, now()).await.unwrap();
        assert_eq!(
            (dry.horizon, dry.rows, dry.batches, dry.dry_run),
            (horizon(), old, 0, true)
        );
        assert_eq!(all_rows(db).await, total);
        assert_eq!(retention::horizon(db).await.unwrap(), None);
        assert_kept(db, &ids, &before).await;

        let report = retention::run(db, 30, false, now()).await.unwrap();
        assert_eq!((report.horizon, report.rows), (horizon(), old));
        assert!(report.batches >= 1);
        assert_eq!(retention::horizon(db).await.unwrap(), Some(horizon()));
        assert_eq!(retention::rows_deleted(db).await.unwrap(), old);
        assert_eq!(rows_before(db, horizon()).await, 0);
        assert_eq!(all_rows(db).await, total - old);

        // The statistics of the deleted period are what they were, pending or folded.
        assert_kept(db, &ids, &before).await;
        fold(&t).await;
        assert_kept(db, &ids, &before).await;
        // What is finer than a user's UTC day counts the rows left: none there.
        let hourly = token_stats_in(
            db,
            &UsageFilter {
                user_id: Some(ids[0]),
                ..range(base(), horizon())
            },
            Some(Granularity::Day),
            SeriesOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(hourly.series, Some(vec![]));
        assert!(hourly.summary.total_calls > 0);
        // The listing has no rows there, and its totals count the rows left.
        let gone = list_usage(db, &range(base(), horizon()), 1, 50)
            .await
            .unwrap();
        assert_eq!((gone.total, gone.results.len()), (0, 0));
        for f in [
            UsageFilter::default(),
            range(base() + Duration::days(10), base() + Duration::days(45)),
            UsageFilter {
                user_id: Some(ids[0]),
                ..Default::default()
            },
        ] {
            let page = list_usage(db, &f, 1, 5).await.unwrap();
            assert_eq!(
                page.total,
                count_matching_raw(db, &f).await.unwrap(),
                "{f:?}"
            );
        }
        // `rollup verify` checks from the horizon on, and finds it exact.
        let report = rollup::verify(db, None, None).await.unwrap();
        assert_eq!(report.differing_cells, 0, "{:?}", report.examples);
        assert_eq!(report.slots.map(|s| s.0), Some(horizon().timestamp() / 900));
        // Migration 000021 over a database with a horizon: `down` gives back the older layout's
        // user days per model (the deleted rows' kept, the rows left counted again), `up` makes
        // them months again and keeps only the deleted rows' days: the same answers, exact.
        // (What `down` leaves is the older version's to read.)
        crate::helpers::down_through(db, "m20261202_000021").await;
        <migration::Migrator as migration::MigratorTrait>::up(db, None)
            .await
            .unwrap();
        assert_kept(db, &ids, &before).await;
        let report = rollup::verify(db, None, None).await.unwrap();
        assert_eq!(report.differing_cells, 0, "{:?}", report.examples);
        // After the horizon the rollup still equals the rows, for any request.
        let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
        for _ in 0..40 {
            let mut f = random_filter(&mut rng, &ids, &times, horizon(), 30);
            f.start = Some(f.start.map_or(horizon(), |s| s.max(horizon())));
            let tz: Tz = ["UTC", "Europe/Berlin", "Asia/Kolkata"][rng.random_range(0..3)]
                .parse()
                .unwrap();
            assert_same(db, &f, tz, false).await;
        }

        // A row written later with an old date counts like any other (in the statistics and
        // in the listing) until the next run deletes it; its statistics stay.
        let late = row(
            9_000_001,
            Some(ids[1]),
            "gpt-4o",
            (100, 20, 0, 0),
            true,
            base() + Duration::days(5) + Duration::minutes(7),
        );
        insert(db, std::slice::from_ref(&late)).await;
        let whole_old = range(base(), horizon());
        let calls = |d: &TokenStatsData| d.summary.total_calls;
        let with_late = token_stats_in(db, &whole_old, None, SeriesOptions::default())
            .await
            .unwrap();
        assert_eq!(calls(&with_late), calls(&old_stats) + 1);
        assert_eq!(list_usage(db, &whole_old, 1, 5).await.unwrap().total, 1);
        let again = retention::run(db, 30, false, now()).await.unwrap();
        assert_eq!(again.rows, 1);
        assert_eq!(list_usage(db, &whole_old, 1, 5).await.unwrap().total, 0);
        assert_eq!(
            token_stats_in(db, &whole_old, None, SeriesOptions::default())
                .await
                .unwrap(),
            with_late
        );

        // Anyone else's delete takes its rows out of the statistics, as before.
        let after = range(horizon(), now());
        let kept = token_stats_in(db, &after, None, SeriesOptions::default())
            .await
            .unwrap();
        let victim = rows
            .iter()
            .find(|r| r.created_at >= horizon())
            .unwrap()
            .id
            .0;
        let id = llm_tracker::db::Dialect::of(db.get_database_backend()).uuid(victim);
        let deleted = db
            .execute_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                format!(
                    "DELETE FROM llm_tracker_usage WHERE id = {}",
                    llm_tracker::db::Dialect::of(db.get_database_backend()).placeholder(1)
                ),
                [id],
            ))
            .await
            .unwrap();
        assert_eq!(deleted.rows_affected(), 1);
        let less = token_stats_in(db, &after, None, SeriesOptions::default())
            .await
            .unwrap();
        assert_eq!(calls(&less), calls(&kept) - 1);
        assert_same(db, &after, "UTC".parse().unwrap(), false).await;

        // A rebuild recounts the rows from the horizon on and keeps the cells before it.
        let old_answers = answers(db, &ids).await;
        assert!(rollup::rebuild(db).await.unwrap() > 0);
        assert_kept(db, &ids, &old_answers).await;
        assert_verified(db).await;
        assert_eq!(
            token_stats_in(db, &whole_old, None, SeriesOptions::default())
                .await
                .unwrap(),
            with_late
        );
        // A later run with a shorter retention moves the horizon on; a longer one never back.
        let shorter = retention::run(db, 20, false, now()).await.unwrap();
        assert!(shorter.rows > 0);
        assert_eq!(
            retention::horizon(db).await.unwrap(),
            Some(base() + Duration::days(40))
        );
        retention::run(db, 50, false, now()).await.unwrap();
        assert_eq!(
            retention::horizon(db).await.unwrap(),
            Some(base() + Duration::days(40))
        );
        assert_eq!(
            token_stats_in(db, &whole_old, None, SeriesOptions::default())
                .await
                .unwrap(),
            with_late
        );
        assert_verified(db).await;
    }
);

db_test!(
    async fn tracked_calls_go_on_undisturbed_while_retention_deletes(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let old_rows: u128 = match backend {
            Backend::Postgres => 60_000,
            Backend::Sqlite => 30_000,
        };
        // A year ago, one row every few minutes.
        let from = Utc::now() - Duration::days(400);
        let rows: Vec<usage::Model> = (0..old_rows)
            .map(|i| {
                row(
                    i + 1,
                    None,
                    ["gpt-4o", "gpt-4o-mini"][(i % 2) as usize],
                    (10, 5, 0, 0),
                    i % 10 != 0,
                    from + Duration::seconds(i as i64 * 300),
                )
            })
            .collect();
        for chunk in rows.chunks(1000) {
            usage::insert_rows(&t.db, chunk).await.unwrap();
        }
        fold(&t).await;
        let stats_before = token_stats_in(
            &t.db,
            &UsageFilter::default(),
            Some(Granularity::Day),
            SeriesOptions::default(),
        )
        .await
        .unwrap();

        let server = provider(StdDuration::from_millis(20)).await;
        let dir = tempfile::tempdir().unwrap();
        let tracker = Arc::new(tracker_at(&t.db, &server, dir.path(), false).await);
        let stop = Arc::new(AtomicBool::new(false));
        let run = callers(&tracker, 8, &stop);
        tokio::time::sleep(StdDuration::from_millis(500)).await;
        let started = Instant::now();
        let report = retention::run(&t.db, 30, false, Utc::now()).await.unwrap();
        let ran = started.elapsed();
        tokio::time::sleep(StdDuration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        let seen = joined(run).await;

        assert_eq!(report.rows, old_rows as u64);
        assert!(report.batches > 5, "{report:?}");
        assert!(seen.iter().all(|s| s.ok), "every caller got its reply");
        let during = seen
            .iter()
            .filter(|s| s.started >= started && s.started < started + ran)
            .count();
        assert!(
            during > 20,
            "calls went on during the run ({ran:?}): {during}"
        );
        let slowest = seen.iter().map(|s| s.took).max().unwrap();
        assert!(
            slowest < NEVER,
            "a call waited for retention: {slowest:?} (p99 {:?}, run {ran:?})",
            p99(&seen)
        );
        let ids = drained(&tracker, &t.db, seen.len()).await;
        assert_each_stored_once(&seen, &ids);
        tracker.shutdown().await;

        // The deleted year still counts; today's calls are added to it.
        let stats_after = token_stats_in(
            &t.db,
            &UsageFilter::default(),
            Some(Granularity::Day),
            SeriesOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            stats_after.summary.total_calls,
            stats_before.summary.total_calls + seen.len() as i64
        );
        let (old_days, new_days) = (stats_before.series.unwrap(), stats_after.series.unwrap());
        assert_eq!(new_days[..old_days.len()], old_days[..]);
        assert_verified(&t.db).await;
    }
);

db_test!(
    async fn the_retention_command_counts_deletes_and_refuses_bad_limits(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let long_ago = Utc::now() - Duration::days(100);
        let rows: Vec<usage::Model> = (0..4)
            .map(|i| {
                row(
                    i + 1,
                    None,
                    "gpt-4o",
                    (10, 5, 0, 0),
                    true,
                    if i < 3 { long_ago } else { Utc::now() },
                )
            })
            .collect();
        insert(&t.db, &rows).await;

        let none = cmd(&t, &["retention"], &[]);
        assert!(!none.status.success());
        assert!(
            stderr(&none).contains("USAGE_RETENTION_DAYS"),
            "{}",
            stderr(&none)
        );
        for bad in ["0d", "12h", "forever"] {
            let o = cmd(&t, &["retention", "--older-than", bad], &[]);
            assert!(!o.status.success(), "{bad}");
            assert!(stderr(&o).contains("--older-than"), "{}", stderr(&o));
        }
        let bad_env = cmd(&t, &["retention"], &[("USAGE_RETENTION_DAYS", "soon")]);
        assert!(!bad_env.status.success());
        assert!(stderr(&bad_env).contains("USAGE_RETENTION_DAYS"));
        assert_eq!(all_rows(&t.db).await, 4);

        let dry = cmd(&t, &["retention", "--dry-run", "--older-than", "30d"], &[]);
        assert!(dry.status.success(), "{}", stderr(&dry));
        assert!(
            stdout(&dry).contains("3 rows") && stdout(&dry).contains("would be deleted"),
            "{}",
            stdout(&dry)
        );
        assert_eq!(all_rows(&t.db).await, 4);

        let real = cmd(&t, &["retention"], &[("USAGE_RETENTION_DAYS", "30")]);
        assert!(real.status.success(), "{}", stderr(&real));
        assert!(stdout(&real).contains("3 rows"), "{}", stdout(&real));
        assert_eq!(all_rows(&t.db).await, 1);
        let stats = token_stats_in(
            &t.db,
            &UsageFilter::default(),
            None,
            SeriesOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(stats.summary.total_calls, 4);
        let verify = cmd(&t, &["rollup", "verify"], &[]);
        assert!(verify.status.success(), "{}", stdout(&verify));
    }
);

db_test!(
    async fn two_servers_running_retention_at_once_delete_each_row_once(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let ids = users(&t.db, &["twice1", "twice2"]).await;
        let mut rng = StdRng::seed_from_u64(21);
        let rows = random_rows(&mut rng, &ids, base(), 60, 3000, 1);
        for chunk in rows.chunks(500) {
            usage::insert_rows(&t.db, chunk).await.unwrap();
        }
        let before = answers(&t.db, &ids).await;
        let old = rows_before(&t.db, horizon()).await;
        // A second pool: another server.
        let other = llm_tracker::db::connect(&t.url).await.unwrap();
        let (a, b) = tokio::join!(
            retention::run(&t.db, 30, false, now()),
            retention::run(&other, 30, false, now()),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.rows + b.rows, old, "{a:?} {b:?}");
        assert_eq!(retention::rows_deleted(&t.db).await.unwrap(), old);
        assert_eq!(rows_before(&t.db, horizon()).await, 0);
        assert_kept(&t.db, &ids, &before).await;
        assert_verified(&t.db).await;
    }
);
