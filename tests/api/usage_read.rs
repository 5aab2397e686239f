//! The read side (SPEC §5 token-stats and llm-usage figures), on both databases: a small
//! hand-built data set with exact expectations, and random data checked against a fold in Rust.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use llm_tracker::db::entities::usage;
use llm_tracker::pricing::{PriceTable, Tokens};
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::list::list_usage;
use llm_tracker::usage::stats::{
    Granularity, stats_by_model, summary_stats, time_series_stats, token_stats,
};
use llm_tracker::users::{NewUser, create_user};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;

use crate::db_test;
use crate::helpers::TestDb;

pub(crate) fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

static PRICES: std::sync::LazyLock<PriceTable> = std::sync::LazyLock::new(PriceTable::builtin);

#[allow(clippy::too_many_arguments)]
pub(crate) fn row(
    n: u128,
    user: Option<i32>,
    model: &str,
    tokens: (i32, i32, i32, i32),
    success: bool,
    created: DateTime<Utc>,
) -> usage::Model {
    let (p, c, cached, reasoning) = tokens;
    usage::Model {
        id: uuid::Uuid::from_u128(n).into(),
        user_id: user,
        model: model.into(),
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p + c,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        success,
        error: (!success).then(|| "boom".to_owned()),
        metadata: json!({"node_name": format!("n{n}")}),
        created_at: created,
        started_at: None,
        // As the tracker prices its rows: the built-in table, NULL for unknown models.
        cost: PRICES
            .cost_micros(
                model,
                Tokens {
                    prompt: p.into(),
                    completion: c.into(),
                    cached: cached.into(),
                    reasoning: reasoning.into(),
                },
            )
            .map(usage::Cost),
        cost_currency: "USD".into(),
        is_streaming: false,
        first_chunk_at: None,
    }
}

/// Inserts `rows` in multi-row statements of 200, as the tracker's group commit does; on a
/// schema from before migration 000016 (the migration tests go down and up) without the
/// streaming columns, which such rows must then not use.
pub(crate) async fn insert(db: &DatabaseConnection, rows: &[usage::Model]) {
    use sea_orm::Iterable;
    let backend = db.get_database_backend();
    let has_streaming = db
        .query_one_raw(sea_orm::Statement::from_string(
            backend,
            match backend {
                sea_orm::DbBackend::Postgres => "SELECT 1 FROM information_schema.columns WHERE table_name = 'llm_tracker_usage' AND column_name = 'first_chunk_at'",
                _ => "SELECT 1 FROM pragma_table_info('llm_tracker_usage') WHERE name = 'first_chunk_at'",
            },
        ))
        .await
        .unwrap()
        .is_some();
    for chunk in rows.chunks(200) {
        if has_streaming {
            usage::insert_rows(db, chunk).await.unwrap();
        } else {
            assert!(
                chunk
                    .iter()
                    .all(|r| !r.is_streaming && r.first_chunk_at.is_none())
            );
            let older: Vec<usage::Column> = usage::Column::iter()
                .filter(|c| !matches!(c, usage::Column::IsStreaming | usage::Column::FirstChunkAt))
                .collect();
            db.execute(&usage::insert_columns_statement(backend, chunk, &older))
                .await
                .unwrap();
        }
    }
}

db_test!(
    async fn a_small_data_set_gives_the_exact_figures_and_json(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let alice = create_user(
            &t.db,
            NewUser {
                username: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        insert(
            &t.db,
            &[
                row(
                    1,
                    Some(alice.id),
                    "gpt-4o",
                    (10, 5, 0, 0),
                    true,
                    at("2025-01-31T10:00:00.123456Z"),
                ),
                row(
                    2,
                    Some(alice.id),
                    "gpt-4o",
                    (20, 10, 5, 0),
                    true,
                    at("2025-01-31T10:59:59Z"),
                ),
                row(
                    3,
                    None,
                    "o4-mini",
                    (100, 50, 0, 30),
                    false,
                    at("2025-01-31T11:00:00Z"),
                ),
                row(
                    4,
                    None,
                    "a%_model",
                    (1, 1, 0, 0),
                    true,
                    at("2025-02-01T00:00:00Z"),
                ),
            ],
        )
        .await;
        let all = UsageFilter::default();

        let summary = summary_stats(&t.db, &all).await.unwrap();
        assert_eq!(
            serde_json::to_value(&summary).unwrap(),
            json!({
            "total_prompt_tokens": 131, "total_completion_tokens": 66, "total_tokens": 197,
            "total_cached_tokens": 5, "total_reasoning_tokens": 30,
            "total_calls": 4, "successful_calls": 3, "failed_calls": 1,
            // gpt-4o: 10·2.50 + 5·10 = 75 µ$; 15·2.50 + 5·1.25 + 10·10 = 143.75 → 144 µ$.
            // o4-mini: 100·1.10 + 20·4.40 + 30·4.40 = 330 µ$. a%_model: no price.
            "total_cost": 0.000549, "total_cost_currency": "USD", "unpriced_calls": 1})
        );

        let by_model = stats_by_model(&t.db, &all).await.unwrap();
        let order: Vec<(&str, i64)> = by_model
            .iter()
            .map(|m| (m.model.as_str(), m.total_tokens))
            .collect();
        assert_eq!(order, [("o4-mini", 150), ("gpt-4o", 45), ("a%_model", 2)]);
        assert_eq!(
            serde_json::to_value(&by_model[1]).unwrap(),
            json!({
            "model": "gpt-4o", "total_calls": 2, "total_prompt_tokens": 30, "total_completion_tokens": 15,
            "total_tokens": 45, "total_cached_tokens": 5, "total_reasoning_tokens": 0,
            "total_cost": 0.000219, "total_cost_currency": "USD", "avg_latency_sec": null,
            "avg_ttft_sec": null})
        );

        let db = &t.db;
        let buckets = |g| async move {
            time_series_stats(db, &UsageFilter::default(), g)
                .await
                .unwrap()
                .into_iter()
                .map(|i| (i.bucket, i.total_calls))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            buckets(Granularity::Day).await,
            [
                ("2025-01-31T10:00:00+00:00".to_owned(), 2),
                ("2025-01-31T11:00:00+00:00".to_owned(), 1),
                ("2025-02-01T00:00:00+00:00".to_owned(), 1)
            ]
        );
        assert_eq!(
            buckets(Granularity::Month).await,
            [("2025-01-31".to_owned(), 3), ("2025-02-01".to_owned(), 1)]
        );
        assert_eq!(
            buckets(Granularity::Year).await,
            [
                ("2025-01-01T00:00:00+00:00".to_owned(), 3),
                ("2025-02-01T00:00:00+00:00".to_owned(), 1)
            ]
        );

        let page = list_usage(&t.db, &all, 1, 20).await.unwrap();
        assert_eq!(page.total, 4);
        let ids: Vec<u128> = page.results.iter().map(|r| r.id.as_u128()).collect();
        assert_eq!(ids, [4, 3, 2, 1], "newest first");
        assert_eq!(
            serde_json::to_value(&page.results[3]).unwrap(),
            json!({
            "id": "00000000-0000-0000-0000-000000000001", "user_id": alice.id, "username": "alice",
            "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "cached_tokens": 0, "reasoning_tokens": 0, "success": true, "error": null,
            "created_at": "2025-01-31T10:00:00.123456+00:00", "metadata": {"node_name": "n1"},
            "cost": 0.000075, "cost_currency": "USD", "started_at": null, "latency_sec": null,
            "is_streaming": false, "first_chunk_at": null, "ttft_sec": null})
        );
        assert_eq!(
            serde_json::to_value(&page.results[0]).unwrap()["cost"],
            json!(null),
            "unpriced model"
        );
        assert_eq!(
            page.results[2].created_at, "2025-01-31T10:59:59+00:00",
            "no fraction when zero"
        );
        assert_eq!(page.results[1].username, None);
        let keys: Vec<String> = serde_json::to_value(&page)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            ["next_cursor", "page", "page_size", "results", "total"]
        );

        // Pages past the end are empty with the true total; the model filter is literal.
        let past = list_usage(&t.db, &all, 99, 2).await.unwrap();
        assert!(past.results.is_empty() && past.total == 4);
        let literal = UsageFilter {
            model: Some("%_".into()),
            ..Default::default()
        };
        assert_eq!(list_usage(&t.db, &literal, 1, 20).await.unwrap().total, 1);
        let case = UsageFilter {
            model: Some("GPT".into()),
            ..Default::default()
        };
        assert_eq!(summary_stats(&t.db, &case).await.unwrap().total_calls, 2);
        // Date-only end_date covers the whole day.
        let day =
            UsageFilter::from_params(Some("2025-01-31"), Some("2025-01-31"), None, None, None)
                .unwrap();
        assert_eq!(summary_stats(&t.db, &day).await.unwrap().total_calls, 3);
        let none = UsageFilter {
            user_id: Some(999),
            ..Default::default()
        };
        assert_eq!(
            summary_stats(&t.db, &none).await.unwrap(),
            Default::default()
        );
    }
);

/// What the SQL must compute, folded in Rust over the same rows.
fn fold(rows: &[&usage::Model]) -> [i64; 6] {
    let mut s = [0i64; 6];
    for r in rows {
        s[0] += 1;
        s[1] += i64::from(r.prompt_tokens);
        s[2] += i64::from(r.completion_tokens);
        s[3] += i64::from(r.total_tokens);
        s[4] += i64::from(r.cached_tokens);
        s[5] += i64::from(r.reasoning_tokens);
    }
    s
}

db_test!(
    async fn random_data_and_filters_match_a_plain_rust_fold(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let mut users = Vec::new();
        for name in ["u1", "u2", "u3"] {
            users.push(
                create_user(
                    &t.db,
                    NewUser {
                        username: name.into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .id,
            );
        }
        let models = [
            "gpt-4o",
            "gpt-4o-mini",
            "o4-mini",
            "gemini-2.5-flash",
            "GPT_x%",
        ];
        let mut rng = StdRng::seed_from_u64(20261123);
        let base = Utc.with_ymd_and_hms(2024, 12, 30, 0, 0, 0).unwrap();
        let rows: Vec<usage::Model> = (0..3000u128)
            .map(|n| {
                let user = if rng.random_bool(0.2) {
                    None
                } else {
                    Some(users[rng.random_range(0..users.len())])
                };
                let model = models[rng.random_range(0..models.len())];
                let p = rng.random_range(0..5000);
                let c = rng.random_range(0..2000);
                let created = base
                    + Duration::microseconds(rng.random_range(0..(70i64 * 86_400 * 1_000_000)));
                row(
                    n + 1,
                    user,
                    model,
                    (p, c, rng.random_range(0..=p), rng.random_range(0..=c)),
                    rng.random_bool(0.97),
                    created,
                )
            })
            .collect();
        insert(&t.db, &rows).await;

        for case in 0..25 {
            let start = rng
                .random_bool(0.6)
                .then(|| base + Duration::seconds(rng.random_range(0..(40 * 86_400))));
            let filter = UsageFilter {
                start,
                end: rng.random_bool(0.6).then(|| {
                    start.unwrap_or(base) + Duration::seconds(rng.random_range(0..(40 * 86_400)))
                }),
                user_id: rng
                    .random_bool(0.3)
                    .then(|| users[rng.random_range(0..users.len())]),
                model: rng
                    .random_bool(0.3)
                    .then(|| ["gpt", "MINI", "_x%", "flash"][rng.random_range(0..4)].to_owned()),
                success: [None, Some(true), Some(false)][rng.random_range(0..3)],
            };
            let matching: Vec<&usage::Model> = rows.iter().filter(|r| filter.matches(r)).collect();
            let expected = fold(&matching);

            let s = summary_stats(&t.db, &filter).await.unwrap();
            assert_eq!(
                [
                    s.total_calls,
                    s.total_prompt_tokens,
                    s.total_completion_tokens,
                    s.total_tokens,
                    s.total_cached_tokens,
                    s.total_reasoning_tokens
                ],
                expected,
                "case {case}: {filter:?}"
            );
            assert_eq!(
                s.successful_calls,
                matching.iter().filter(|r| r.success).count() as i64
            );
            assert_eq!(s.failed_calls + s.successful_calls, s.total_calls);
            // Cost: the exact micro-dollar sum of the priced rows; the others counted apart.
            let cost: i64 = matching.iter().filter_map(|r| r.cost).map(|c| c.0).sum();
            let unpriced = matching.iter().filter(|r| r.cost.is_none()).count() as i64;
            assert_eq!(
                (s.total_cost.0, s.unpriced_calls),
                (cost, unpriced),
                "case {case} cost"
            );

            let mut per_model: BTreeMap<&str, Vec<&usage::Model>> = BTreeMap::new();
            for r in &matching {
                per_model.entry(r.model.as_str()).or_default().push(r);
            }
            let mut want: Vec<(String, [i64; 6])> = per_model
                .iter()
                .map(|(m, rs)| (m.to_string(), fold(rs)))
                .collect();
            want.sort_by(|a, b| b.1[3].cmp(&a.1[3]).then(a.0.cmp(&b.0)));
            let got: Vec<(String, [i64; 6])> = stats_by_model(&t.db, &filter)
                .await
                .unwrap()
                .into_iter()
                .map(|m| {
                    (
                        m.model,
                        [
                            m.total_calls,
                            m.total_prompt_tokens,
                            m.total_completion_tokens,
                            m.total_tokens,
                            m.total_cached_tokens,
                            m.total_reasoning_tokens,
                        ],
                    )
                })
                .collect();
            assert_eq!(got, want, "case {case} by_model");

            for (g, fmt) in [
                (Granularity::Day, "%Y-%m-%dT%H:00:00+00:00"),
                (Granularity::Month, "%Y-%m-%d"),
                (Granularity::Year, "%Y-%m-01T00:00:00+00:00"),
            ] {
                let mut buckets: BTreeMap<String, Vec<&usage::Model>> = BTreeMap::new();
                for r in &matching {
                    buckets
                        .entry(r.created_at.format(fmt).to_string())
                        .or_default()
                        .push(r);
                }
                let want: Vec<(String, [i64; 6])> = buckets
                    .iter()
                    .map(|(b, rs)| (b.clone(), fold(rs)))
                    .collect();
                let got: Vec<(String, [i64; 6])> = time_series_stats(&t.db, &filter, g)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|i| {
                        (
                            i.bucket,
                            [
                                i.total_calls,
                                i.total_prompt_tokens,
                                i.total_completion_tokens,
                                i.total_tokens,
                                i.total_cached_tokens,
                                i.total_reasoning_tokens,
                            ],
                        )
                    })
                    .collect();
                assert_eq!(got, want, "case {case} series {g:?}");
                // The one-pass query behind the endpoint gives the same summary as the plain one.
                let one = token_stats(&t.db, &filter, Some(g)).await.unwrap();
                assert_eq!(one.summary, s, "case {case} one-pass summary {g:?}");
            }

            let mut newest: Vec<&usage::Model> = matching.clone();
            newest.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
            let page_no = rng.random_range(1..4u64);
            let page = list_usage(&t.db, &filter, page_no, 7).await.unwrap();
            assert_eq!(page.total as usize, matching.len());
            let want_ids: Vec<_> = newest
                .iter()
                .skip((page_no as usize - 1) * 7)
                .take(7)
                .map(|r| r.id.0)
                .collect();
            assert_eq!(
                page.results.iter().map(|r| r.id).collect::<Vec<_>>(),
                want_ids,
                "case {case} page {page_no}"
            );
        }
    }
);

db_test!(
    async fn costs_of_100k_rows_sum_to_the_exact_micro_dollar(backend: Backend) {
        // Issue 5: sums never drift. Random micro-dollar costs (up to $5 a call, every digit
        // significant), a tenth unpriced; PostgreSQL sums numeric(12,6), SQLite integers.
        let t = TestDb::migrated(backend).await;
        let mut rng = StdRng::seed_from_u64(5);
        let base = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let models = ["gpt-4o", "o3", "gemini-2.5-pro"];
        let rows: Vec<usage::Model> = (0..100_000u128)
            .map(|n| {
                let mut r = row(
                    n + 1,
                    None,
                    models[(n % 3) as usize],
                    (1, 1, 0, 0),
                    true,
                    base + Duration::seconds(n as i64),
                );
                r.cost =
                    (!rng.random_bool(0.1)).then(|| usage::Cost(rng.random_range(0..5_000_000)));
                r
            })
            .collect();
        for chunk in rows.chunks(1000) {
            usage::insert_rows(&t.db, chunk).await.unwrap();
        }
        let exact: i64 = rows.iter().filter_map(|r| r.cost).map(|c| c.0).sum();
        let unpriced = rows.iter().filter(|r| r.cost.is_none()).count() as i64;

        let all = UsageFilter::default();
        let s = summary_stats(&t.db, &all).await.unwrap();
        assert_eq!((s.total_cost.0, s.unpriced_calls), (exact, unpriced));
        let one = token_stats(&t.db, &all, Some(Granularity::Year))
            .await
            .unwrap();
        assert_eq!(one.summary.total_cost.0, exact);
        for m in &one.by_model {
            let want: i64 = rows
                .iter()
                .filter(|r| r.model == m.model)
                .filter_map(|r| r.cost)
                .map(|c| c.0)
                .sum();
            assert_eq!(m.total_cost.0, want, "{}", m.model);
        }
        let series: i64 = one.series.unwrap().iter().map(|i| i.total_cost.0).sum();
        assert_eq!(series, exact);
        // The JSON number is the exact six-decimal amount.
        let text = serde_json::to_value(&s).unwrap()["total_cost"].to_string();
        assert_eq!(
            text.parse::<rust_decimal::Decimal>().unwrap(),
            rust_decimal::Decimal::new(exact, 6),
            "{text}"
        );
    }
);
