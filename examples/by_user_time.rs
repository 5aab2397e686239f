//! Times `include=by_user` as the library computes it, without a server (and without applying
//! migrations, so a database taken down to an older layout stays as it is):
//!
//! ```sh
//! cargo run --release --example by_user_time -- postgres://… 2026-10-15T00:00:00Z 2026-11-13T23:59:59Z 50,250,1000
//! ```
//!
//! Arguments: the database URL, the range's start and end (RFC 3339; `-` for an open end) and
//! the `user_limit`s. Prints, per limit, the p50 of 12 calls of `stats::stats_by_user` and the
//! first and last users of the answer (to compare two databases). Figures in
//! `docs/benchmarks.md`.

use chrono::{DateTime, Utc};
use llm_tracker::usage::{UsageFilter, stats};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, start, end, limits] = args.as_slice() else {
        eprintln!("usage: by_user_time <database url> <start|-> <end|-> <limit,limit,…>");
        std::process::exit(2);
    };
    let at = |s: &str| match s {
        "-" => None,
        s => Some(
            DateTime::parse_from_rfc3339(s)
                .expect("an RFC 3339 time")
                .with_timezone(&Utc),
        ),
    };
    let db = sea_orm::Database::connect(url.as_str())
        .await
        .expect("the database");
    let filter = UsageFilter {
        start: at(start),
        end: at(end),
        ..Default::default()
    };
    for limit in limits
        .split(',')
        .map(|l| l.trim().parse::<u64>().expect("a limit"))
    {
        let mut times = Vec::new();
        let mut answer = Vec::new();
        for _ in 0..12 {
            let started = std::time::Instant::now();
            answer = stats::stats_by_user(&db, &filter, limit)
                .await
                .expect("by_user");
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let ends = |u: Option<&stats::UserStats>| u.map(|u| (u.user_id, u.total_tokens));
        println!(
            "user_limit {limit}: p50 {:.1} ms, {} users, first {:?}, last {:?}",
            times[times.len() / 2],
            answer.len(),
            ends(answer.first()),
            ends(answer.last()),
        );
    }
}
