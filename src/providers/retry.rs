//! Retries of transient errors with backoff honouring `Retry-After`, inside one timeout for
//! the whole call. One call, however many attempts, is one [`ChatResponse`] or one error,
//! each carrying the attempt count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::Rng;

use futures_util::StreamExt;

use super::{ChatRequest, ChatResponse, OpenedStream, Provider, ProviderError, ProviderErrorKind};

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

    /// Runs `op` until it succeeds, fails for good or the retries are spent; returns its
    /// value and the attempt that gave it (errors carry their attempt count).
    async fn retrying<T, F, Fut>(
        &self,
        made: &AtomicU32,
        mut op: F,
    ) -> Result<(T, u32), ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        loop {
            let attempt = made.fetch_add(1, Ordering::SeqCst) + 1;
            match op().await {
                Ok(value) => return Ok((value, attempt)),
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

    fn timed_out(&self, attempts: u32) -> ProviderError {
        ProviderError {
            kind: ProviderErrorKind::Timeout,
            status: None,
            message: format!("LLM call timed out after {:?}", self.timeout),
            retry_after: None,
            attempts: attempts.max(1),
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
        let call = self.retrying(&made, || self.inner.chat(request.clone()));
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((mut response, attempt))) => {
                response.attempts = attempt;
                Ok(response)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.timed_out(made.load(Ordering::SeqCst))),
        }
    }

    /// Opening the stream is retried as a call is (nothing has reached the caller yet); once
    /// it is open, an error ends it. The timeout covers the whole stream: opening and every
    /// wait for the next chunk end at the same deadline.
    async fn chat_stream(&self, request: ChatRequest) -> Result<OpenedStream, ProviderError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let made = AtomicU32::new(0);
        let open = self.retrying(&made, || self.inner.chat_stream(request.clone()));
        let (opened, attempt) = match tokio::time::timeout_at(deadline, open).await {
            Ok(result) => result?,
            Err(_) => return Err(self.timed_out(made.load(Ordering::SeqCst))),
        };
        let timed_out = self.timed_out(attempt);
        let events =
            futures_util::stream::unfold((opened.events, false), move |(mut events, ended)| {
                let timed_out = timed_out.clone();
                async move {
                    if ended {
                        return None;
                    }
                    match tokio::time::timeout_at(deadline, events.next()).await {
                        Ok(Some(Err(mut e))) => {
                            e.attempts = attempt;
                            Some((Err(e), (events, true)))
                        }
                        Ok(Some(item)) => Some((item, (events, false))),
                        Ok(None) => None,
                        Err(_) => Some((Err(timed_out), (events, true))),
                    }
                }
            });
        Ok(OpenedStream {
            events: Box::pin(events),
            attempts: attempt,
        })
    }
}
