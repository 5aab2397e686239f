//! Prometheus metrics (issue 20): one registry for the process, filled where things happen
//! (HTTP requests, recorded calls, the write path, the fold) and rendered by `GET /metrics`
//! in the text format.
//!
//! A scrape only reads counters and gauges already in memory: gauges that need the database
//! or the spool file (rows pending fold, spool depth) are refreshed by
//! `server::refresh_metrics` in the background, so scraping costs no query and stays well under a millisecond.
//!
//! Label values are bounded: routes are actix's templates (`/api/v1/admin/llm-usage/{id}/`,
//! never a raw path), providers one of a fixed few, and models the first [`MAX_MODELS`] names
//! seen (then `other`), because the ingest API lets a client name any model.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::db::entities::usage;

/// Distinct model label values before the rest are counted as `other`.
pub const MAX_MODELS: usize = 200;

/// Every metric family of the process.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub calls: IntCounterVec,
    pub call_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost_usd: prometheus::CounterVec,
    pub rows_committed: IntCounter,
    pub rows_spooled: IntCounter,
    pub rows_replayed: IntCounter,
    pub rows_rejected: IntCounterVec,
    pub rows_retained_out: IntCounter,
    pub spool_rows: IntGauge,
    pub spool_bytes: IntGauge,
    pub rollup_pending: IntGauge,
    pub fold_duration: Histogram,
    pub db_connections: IntGaugeVec,
    models: Mutex<HashSet<String>>,
    /// The latest background rendering ([`Metrics::prerender`]) and when it was made.
    rendered: Mutex<Option<(Instant, Arc<String>)>>,
    /// Whether a background task keeps [`Metrics::rendered`] fresh (`serve` with metrics on).
    prerendering: AtomicBool,
}

/// How often `serve` renders the exposition in the background, so that a scrape only copies
/// it out (see [`Metrics::exposition`]).
pub const PRERENDER_EVERY: Duration = Duration::from_secs(1);

/// A background rendering older than this is not served (the task stalled): the scrape renders.
const PRERENDER_MAX_AGE: Duration = Duration::from_secs(3);

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    registry.register(Box::new(c.clone())).expect("register");
    c
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("metric");
    registry.register(Box::new(h.clone())).expect("register");
    h
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric");
    registry.register(Box::new(c.clone())).expect("register");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric");
    registry.register(Box::new(g.clone())).expect("register");
    g
}

/// Seconds, for HTTP requests and folds: 2.5 ms to 5 s (eight buckets: every route has a
/// series per bucket, and each line costs the scrape ~1 µs).
const HTTP_BUCKETS: [f64; 8] = [0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 5.0];

/// Seconds, for LLM calls and their first token: 50 ms to 5 min.
const CALL_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let build = IntGaugeVec::new(
            Opts::new(
                "llm_tracker_build_info",
                "Always 1; the running version in the label.",
            ),
            &["version"],
        )
        .expect("metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("register");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register");
        let db_connections = IntGaugeVec::new(
            Opts::new(
                "llm_tracker_db_connections",
                "Connections of the database pool, by state (in_use, idle).",
            ),
            &["state"],
        )
        .expect("metric");
        registry
            .register(Box::new(db_connections.clone()))
            .expect("register");
        let fold_duration = Histogram::with_opts(
            HistogramOpts::new(
                "llm_tracker_rollup_fold_duration_seconds",
                "How long folds of pending rows into the rollup took.",
            )
            .buckets(HTTP_BUCKETS.to_vec()),
        )
        .expect("metric");
        registry
            .register(Box::new(fold_duration.clone()))
            .expect("register");
        let cost_usd = prometheus::CounterVec::new(
            Opts::new(
                "llm_tracker_cost_usd_total",
                "Cost of the recorded calls in US dollars (priced calls only).",
            ),
            &["provider", "model"],
        )
        .expect("metric");
        registry
            .register(Box::new(cost_usd.clone()))
            .expect("register");
        Self {
            http_requests: counter_vec(
                r,
                "llm_tracker_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: histogram_vec(
                r,
                "llm_tracker_http_request_duration_seconds",
                "Time to answer HTTP requests, by route template.",
                &["route"],
                HTTP_BUCKETS.to_vec(),
            ),
            calls: counter_vec(
                r,
                "llm_tracker_calls_total",
                "LLM calls recorded (tracked, gateway and ingested), by provider, model and outcome.",
                &["provider", "model", "outcome"],
            ),
            call_duration: histogram_vec(
                r,
                "llm_tracker_call_duration_seconds",
                "Duration of recorded calls (created_at - started_at), by provider.",
                &["provider"],
                CALL_BUCKETS.to_vec(),
            ),
            ttft: histogram_vec(
                r,
                "llm_tracker_time_to_first_token_seconds",
                "Time to first token of streamed calls (first_chunk_at - started_at), by provider.",
                &["provider"],
                CALL_BUCKETS.to_vec(),
            ),
            tokens: counter_vec(
                r,
                "llm_tracker_tokens_total",
                "Tokens of the recorded calls, by provider, model and kind (prompt, completion, cached, reasoning).",
                &["provider", "model", "kind"],
            ),
            cost_usd,
            rows_committed: counter(
                r,
                "llm_tracker_rows_committed_total",
                "Usage rows committed to the database as they were written.",
            ),
            rows_spooled: counter(
                r,
                "llm_tracker_rows_spooled_total",
                "Usage rows written to the spool because the database refused or was too slow.",
            ),
            rows_replayed: counter(
                r,
                "llm_tracker_rows_replayed_total",
                "Spooled or held usage rows stored later by the replay.",
            ),
            rows_rejected: counter_vec(
                r,
                "llm_tracker_rows_rejected_total",
                "Rows refused: by the ingest API's checks (ingest) or unreadable in the spool (spool).",
                &["source"],
            ),
            rows_retained_out: counter(
                r,
                "llm_tracker_retention_deleted_rows_total",
                "Usage rows deleted by retention (their statistics stay in the rollup).",
            ),
            spool_rows: gauge(
                r,
                "llm_tracker_spool_rows",
                "Usage rows waiting in the spool and in memory (refreshed every few seconds).",
            ),
            spool_bytes: gauge(
                r,
                "llm_tracker_spool_bytes",
                "Size of the spool file and its claims in bytes (refreshed every few seconds).",
            ),
            rollup_pending: gauge(
                r,
                "llm_tracker_rollup_pending_rows",
                "Rows of the rollup's delta table waiting for the fold (refreshed every few seconds).",
            ),
            fold_duration,
            db_connections,
            models: Mutex::new(HashSet::new()),
            rendered: Mutex::new(None),
            prerendering: AtomicBool::new(false),
            registry,
        }
    }

    /// Series of the labels known in advance, at zero: a dashboard sees them before the
    /// first event.
    fn with_known_series(self) -> Self {
        for provider in ["openai", "azure_openai", "gemini"] {
            self.call_duration.with_label_values(&[provider]);
            self.ttft.with_label_values(&[provider]);
        }
        for source in ["ingest", "spool"] {
            self.rows_rejected.with_label_values(&[source]);
        }
        for state in ["in_use", "idle"] {
            self.db_connections.with_label_values(&[state]);
        }
        self
    }

    /// The label for `model`: itself while fewer than [`MAX_MODELS`] names were seen, else
    /// `other`.
    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MAX_MODELS {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }

    /// Counts one recorded call: its outcome, duration, time to first token, tokens and cost.
    pub fn observe_call(&self, row: &usage::Model) {
        let provider = provider_label(row);
        let model = self.model_label(&row.model);
        let outcome = if row.success { "success" } else { "failure" };
        self.calls
            .with_label_values(&[provider, &model, outcome])
            .inc();
        if let Some(started) = row.started_at {
            self.call_duration
                .with_label_values(&[provider])
                .observe(usage::seconds_between(started, row.created_at));
            if let Some(first) = row.first_chunk_at {
                self.ttft
                    .with_label_values(&[provider])
                    .observe(usage::seconds_between(started, first));
            }
        }
        for (kind, n) in [
            ("prompt", row.prompt_tokens),
            ("completion", row.completion_tokens),
            ("cached", row.cached_tokens),
            ("reasoning", row.reasoning_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .with_label_values(&[provider, &model, kind])
                    .inc_by(n as u64);
            }
        }
        if let Some(cost) = row.cost {
            self.cost_usd
                .with_label_values(&[provider, &model])
                .inc_by(cost.0 as f64 / 1e6);
        }
    }

    /// The text exposition of every family, rendered now (gathering and encoding every
    /// series: about 1.5 ms at 100 models, see `docs/benchmarks.md`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        let _ = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// Renders the exposition and keeps it for the scrapes to come; from the first call on, a
    /// scrape answers with the latest such rendering while it is fresh (see
    /// [`Metrics::exposition`]). `serve` calls this every [`PRERENDER_EVERY`] when metrics are
    /// on.
    pub fn prerender(&self) {
        let text = Arc::new(self.render());
        *self.rendered.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), text));
        self.prerendering.store(true, Ordering::Relaxed);
    }

    /// What a scrape answers: the background rendering when one is kept fresh (at most
    /// [`PRERENDER_EVERY`] old, so a scrape costs a copy of the text whatever the number of
    /// series), else a rendering made now.
    pub fn exposition(&self) -> Arc<String> {
        if self.prerendering.load(Ordering::Relaxed)
            && let Some((at, text)) = &*self.rendered.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < PRERENDER_MAX_AGE
        {
            return text.clone();
        }
        Arc::new(self.render())
    }
}

/// The provider of a row as a label: what the tracker and the gateway write in
/// `metadata.provider` when it is one we know, `ingest` for rows sent to the ingest API
/// without one, else `other`.
fn provider_label(row: &usage::Model) -> &'static str {
    match row.metadata.get("provider").and_then(|v| v.as_str()) {
        Some("openai") => "openai",
        Some("azure_openai") | Some("azure") => "azure_openai",
        Some("gemini") => "gemini",
        _ => match row.metadata.get("source_type").and_then(|v| v.as_str()) {
            Some("ingest") => "ingest",
            _ => "other",
        },
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().with_known_series())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a background rendering every scrape renders now; once `prerender` runs, scrapes
    /// answer its text (the same allocation) until the next one.
    #[test]
    fn scrapes_answer_the_latest_background_rendering() {
        let m = Metrics::new().with_known_series();
        m.rows_committed.inc();
        let a = m.exposition();
        let b = m.exposition();
        assert!(!Arc::ptr_eq(&a, &b), "rendered on demand");
        assert!(a.contains("llm_tracker_rows_committed_total 1"));

        m.prerender();
        let first = m.exposition();
        m.rows_committed.inc();
        let again = m.exposition();
        assert!(Arc::ptr_eq(&first, &again), "the kept rendering");
        assert!(again.contains("llm_tracker_rows_committed_total 1"));
        m.prerender();
        let fresh = m.exposition();
        assert!(fresh.contains("llm_tracker_rows_committed_total 2"));
    }
}
