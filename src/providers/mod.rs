//! LLM providers: one trait, three implementations (OpenAI and Azure OpenAI through
//! async-openai, Gemini through its native REST API), and a wrapper adding retries and the
//! whole-call timeout. Usage is normalised to one meaning for every provider (SPEC §4).

pub mod azure_openai;
pub mod gemini;
pub mod openai;
pub mod retry;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, ProviderKind, Settings};
pub use stream::{EventStream, OpenedStream, StreamEvent};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A chat request, provider-neutral.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Overrides the configured model (Azure: the deployment).
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// Ask for a JSON object reply.
    pub json_mode: bool,
    /// OpenAI-style `response_format` (`{"type": "json_schema", "json_schema": {...}}`), passed
    /// through; wins over `json_mode`.
    pub response_format: Option<Value>,
    /// Keep the provider's raw JSON body in the response.
    pub keep_raw: bool,
}

/// Token usage, normalised: `cached_tokens` ⊂ `prompt_tokens`, `reasoning_tokens` ⊂
/// `completion_tokens`, `total_tokens` as the provider reports it, 0 for what it omits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cached_tokens: u32,
    pub reasoning_tokens: u32,
}

/// A provider's answer. `content` may be empty (blocked, filtered): the tracker decides.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    pub usage: Usage,
    /// The provider's JSON body, when `keep_raw` was asked for.
    pub raw: Option<Value>,
    /// How many HTTP attempts the call took (1 without retries).
    pub attempts: u32,
}

/// What went wrong, in provider-neutral terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderErrorKind {
    /// 429 rate limit: retried.
    RateLimited,
    /// 429 `insufficient_quota`: not retried.
    QuotaExceeded,
    /// 401/403: bad or missing key.
    Authentication,
    /// 400/404/422: the request itself is wrong.
    InvalidRequest,
    /// 5xx: retried.
    Server,
    /// Connection refused, reset, DNS: retried.
    Network,
    /// The whole call exceeded `LLM_TIMEOUT_SECS`.
    Timeout,
    /// A 2xx answer we could not read.
    InvalidResponse,
}

impl ProviderErrorKind {
    /// Transient kinds, worth another attempt.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::RateLimited | Self::Server | Self::Network)
    }
}

/// A provider failure: its kind, HTTP status, and the provider's own message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    pub status: Option<u16>,
    pub message: String,
    /// What the provider asked us to wait before retrying (`Retry-After`, Gemini `RetryInfo`).
    pub retry_after: Option<Duration>,
    /// HTTP attempts made before giving up.
    pub attempts: u32,
}

impl ProviderError {
    /// An error of `kind` with a message.
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            attempts: 1,
        }
    }

    /// The kind an HTTP error status maps to.
    pub fn kind_for_status(status: u16) -> ProviderErrorKind {
        match status {
            401 | 403 => ProviderErrorKind::Authentication,
            429 => ProviderErrorKind::RateLimited,
            500..=599 => ProviderErrorKind::Server,
            _ => ProviderErrorKind::InvalidRequest,
        }
    }
}

/// A chat-completion backend. `chat` makes one attempt; [`retry::Resilient`] adds retries and
/// the whole-call timeout.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `openai`, `azure_openai` or `gemini` (stored as `metadata.provider`).
    fn name(&self) -> &'static str;

    /// The model used when a request names none (Azure: the deployment).
    fn default_model(&self) -> &str;

    /// Sends the request once.
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError>;

    /// Sends the request once, asking for a streamed reply (with usage at its end). The
    /// default refuses: a provider that cannot stream says so.
    async fn chat_stream(&self, request: ChatRequest) -> Result<OpenedStream, ProviderError> {
        let _ = request;
        Err(ProviderError::new(
            ProviderErrorKind::InvalidRequest,
            format!("the {} provider does not stream", self.name()),
        ))
    }
}

/// The configured provider, with retries (`LLM_MAX_RETRIES`) and the whole-call timeout
/// (`LLM_TIMEOUT_SECS`). It writes nothing: use [`crate::tracker::LlmTracker`] to record calls.
pub fn llm_service(settings: &Settings) -> Result<Arc<dyn Provider>, ConfigError> {
    let inner: Arc<dyn Provider> = match settings.provider {
        ProviderKind::OpenAi => Arc::new(openai::OpenAiProvider::from_settings(&settings.openai)?),
        ProviderKind::AzureOpenAi => Arc::new(azure_openai::AzureOpenAiProvider::from_settings(
            &settings.azure,
        )?),
        ProviderKind::Gemini => Arc::new(gemini::GeminiProvider::from_settings(&settings.gemini)?),
    };
    Ok(Arc::new(retry::Resilient::new(
        inner,
        settings.llm_max_retries,
        settings.llm_timeout,
    )))
}

/// One HTTP client for every provider call: TLS through rustls with the ring provider.
pub(crate) fn http_client() -> Result<reqwest::Client, ConfigError> {
    // Installing twice is harmless; reqwest reads the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| ConfigError::Invalid {
            key: "HTTP client",
            reason: e.to_string(),
        })
}

/// An API key must be a plain header value; anything else is refused at start-up instead of
/// failing (or panicking inside a client) on the first call.
pub(crate) fn check_api_key(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: "must be printable ASCII without spaces".into(),
        })
    }
}

/// Parses `Retry-After` (seconds, possibly fractional) or `retry-after-ms`.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    header("retry-after")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// `max(0, n)` as u32, for token counts read from JSON.
pub(crate) fn count(v: Option<&Value>) -> u32 {
    v.and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The `message` of a provider's error object, else `HTTP {status}: ` and the start of the body
/// (a proxy's HTML page, say).
pub(crate) fn error_message(error: &Value, status: u16, body: &[u8]) -> String {
    error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )
        })
}
