//! The read side of `llm_tracker_usage`: one filter, the statistics and the listing, shared by
//! the admin API and the admin pages. Free of any web framework; aggregates run in SQL.

pub mod buckets;
pub mod errors;
pub mod export;
pub mod filters;
pub mod latency;
pub mod list;
pub mod plans;
pub mod reprice;
pub mod rollup;
pub mod row_copy;
pub mod stats;
pub mod sums;

pub use filters::{FilterError, FilterParams, UsageFilter};
pub use sums::{Sum, TokenSums};

/// A datetime as Python's `isoformat()` writes it for an aware UTC value: `+00:00`,
/// microseconds only when not zero (the Django app's JSON contract).
pub fn isoformat(t: &chrono::DateTime<chrono::Utc>) -> String {
    use chrono::Timelike;
    if t.nanosecond() / 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}
