//! The overview's top error messages (issue 21): failures grouped by their message with ids and
//! secrets masked, counted, newest seen kept, most frequent first; bounded reading; on the page.

use chrono::{DateTime, Duration, TimeZone, Utc};
use llm_tracker::db::entities::usage;
use llm_tracker::usage::UsageFilter;
use llm_tracker::usage::errors::{MAX_SCANNED, top_errors};

use crate::db_test;
use crate::helpers::TestDb;
use crate::usage_read::{insert, row};

fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap() + Duration::minutes(minutes)
}

fn failure(n: u128, user: Option<i32>, error: Option<&str>, minutes: i64) -> usage::Model {
    let mut r = row(n, user, "gpt-4o", (10, 0, 0, 0), false, at(minutes));
    r.error = error.map(str::to_owned);
    r
}

db_test!(
    async fn failures_group_by_masked_message_most_frequent_first(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let ids = crate::rollup::users(&t.db, &["err1", "err2"]).await;
        let mut rows = vec![
            failure(
                1,
                Some(ids[0]),
                Some("Request req_8f3aB29xQ timed out after 30000 ms"),
                1,
            ),
            failure(
                2,
                Some(ids[1]),
                Some("Request req_91bcQQ77z timed out after 30001 ms"),
                5,
            ),
            failure(
                3,
                Some(ids[0]),
                Some("Request req_aa11bb22c timed out after 29999 ms"),
                9,
            ),
            failure(
                4,
                Some(ids[0]),
                Some("Incorrect API key provided: sk-proj-abcdefghijklmnopqrstu"),
                3,
            ),
            failure(
                5,
                None,
                Some("Incorrect API key provided: sk-proj-zyxwvutsrqponmlkjih"),
                4,
            ),
            failure(6, Some(ids[1]), Some("rate limited (429)"), 2),
            failure(7, Some(ids[1]), None, 6),
        ];
        // Successes never count, whatever their error text.
        let mut ok = row(8, Some(ids[0]), "gpt-4o", (1, 1, 0, 0), true, at(7));
        ok.error = Some("Request req_zzzzzzzzz timed out after 1000 ms".into());
        rows.push(ok);
        insert(&t.db, &rows).await;

        let all = top_errors(&t.db, &UsageFilter::default(), 10)
            .await
            .unwrap();
        assert_eq!((all.scanned, all.capped), (7, false));
        let lines: Vec<(&str, u64, DateTime<Utc>)> = all
            .groups
            .iter()
            .map(|g| (g.message.as_str(), g.count, g.last_seen))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("Request <id> timed out after <n> ms", 3, at(9)),
                ("Incorrect API key provided: sk-***", 2, at(4)),
                ("(no message)", 1, at(6)),
                ("rate limited (429)", 1, at(2)),
            ]
        );
        for g in &all.groups {
            assert!(!g.message.contains("abcdefghij") && !g.message.contains("req_"));
        }
        // The page's filters apply: a user, a range; the success filter is ignored.
        let user = top_errors(
            &t.db,
            &UsageFilter {
                user_id: Some(ids[1]),
                success: Some(true),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
        assert_eq!(user.scanned, 3);
        assert_eq!(user.groups[0].count, 1);
        let early = top_errors(
            &t.db,
            &UsageFilter {
                start: Some(at(0)),
                end: Some(at(3)),
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap();
        assert_eq!(early.scanned, 3);
        assert_eq!(early.groups.len(), 1, "limit");
    }
);

db_test!(
    async fn reading_stops_at_the_newest_failures_and_says_so(backend: Backend) {
        let t = TestDb::migrated(backend).await;
        let n = MAX_SCANNED as u128 + 5;
        let rows: Vec<usage::Model> = (0..n)
            .map(|i| {
                let message = if i < 5 {
                    "old failure"
                } else {
                    "new failure 12345"
                };
                failure(i + 1, None, Some(message), i as i64)
            })
            .collect();
        for chunk in rows.chunks(1000) {
            usage::insert_rows(&t.db, chunk).await.unwrap();
        }
        let top = top_errors(&t.db, &UsageFilter::default(), 10)
            .await
            .unwrap();
        assert!(top.capped);
        assert_eq!(top.scanned, MAX_SCANNED);
        // The five oldest were not read.
        assert_eq!(top.groups.len(), 1);
        assert_eq!(top.groups[0].message, "new failure <n>");
        assert_eq!(top.groups[0].count, MAX_SCANNED);
        assert_eq!(top.groups[0].last_seen, at(n as i64 - 1));
    }
);
