//! Retries of transient errors with backoff honouring `Retry-After`, inside one timeout for
//! the whole call. One call, however many attempts, is one [`ChatResponse`] or one error,
//! each carrying the attempt count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::Rng;

use super::{ChatRequest, ChatResponse, Provider, ProviderError, ProviderErrorKind};

/// The longest wait between attempts, whatever the provider asks.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Adds retries and the whole-call timeout to a provider.
pub struct Resilient {
    inner: Arc<dyn Provider>,
    max_retries: u32,
    timeout: Duration,
}

impl Resilient {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Provider>, max_retries: u32, timeout: Duration) -> Self {
        Self {
            inner,
            max_retries,
            timeout,
        }
    }

    async fn attempts(
        &self,
        request: ChatRequest,
        made: &AtomicU32,
    ) -> Result<ChatResponse, ProviderError> {
        loop {
            let attempt = made.fetch_add(1, Ordering::SeqCst) + 1;
            match self.inner.chat(request.clone()).await {
                Ok(mut response) => {
                    response.attempts = attempt;
                    return Ok(response);
                }
                Err(mut err) => {
                    err.attempts = attempt;
                    if !err.kind.is_transient() || attempt > self.max_retries {
                        return Err(err);
                    }
                    let wait = err
                        .retry_after
                        .unwrap_or_else(|| backoff(attempt))
                        .min(MAX_BACKOFF);
                    tracing::info!(
                        provider = self.inner.name(),
                        attempt,
                        kind = ?err.kind,
                        wait_ms = wait.as_millis() as u64,
                        "transient provider error, retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// 0.5 s, 1 s, 2 s, … with ±25 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 0.5 * 2f64.powi(attempt.saturating_sub(1).min(6) as i32);
    let jitter = rand::rng().random_range(0.75..1.25);
    Duration::from_secs_f64(base * jitter)
}

#[async_trait::async_trait]
impl Provider for Resilient {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn default_model(&self) -> &str {
        self.inner.default_model()
    }

    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        let made = AtomicU32::new(0);
        match tokio::time::timeout(self.timeout, self.attempts(request, &made)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError {
                kind: ProviderErrorKind::Timeout,
                status: None,
                message: format!("LLM call timed out after {:?}", self.timeout),
                retry_after: None,
                attempts: made.load(Ordering::SeqCst).max(1),
            }),
        }
    }
}
