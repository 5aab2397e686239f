//! `LlmTracker`: calls the provider and stores one `llm_tracker_usage` row per call, on
//! success and on failure (SPEC §4).

pub mod store;
pub mod stream;

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{DatabaseConnection, DbErr};
use serde_json::{Map, Value, json};
use uuid::Uuid;

pub use crate::config::default_spool_path;
use crate::config::{ConfigError, Settings};
use crate::db::entities::usage;
use crate::pricing::{PriceTable, Tokens};
use crate::providers::{self, ChatRequest, ChatResponse, Message, Provider, ProviderError, Usage};
use crate::redact::redact;
pub use store::{BatchStored, StoreOptions, Stored, UsageStore, WriteMode};
pub use stream::{StreamHandle, StreamRecord, TrackedStream};

/// Who and what a call is made for; stored in the row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallState {
    /// The end user (`auth_user.id`) the call is made for.
    pub user_id: Option<i32>,
    pub source_type: Option<String>,
    pub source_task_id: Option<String>,
    pub source_path: Option<String>,
    /// Extra keys merged into the row's `metadata`.
    pub metadata: Map<String, Value>,
}

/// One tracked call: the LLM parameters first, then what is recorded about it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    pub messages: Vec<Message>,
    pub json_mode: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub response_format: Option<Value>,
    pub model: Option<String>,
    pub node_name: String,
    pub state: CallState,
}

impl CallRequest {
    /// A request for these messages, `node_name` `"unknown"`.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            json_mode: false,
            max_tokens: None,
            temperature: None,
            response_format: None,
            model: None,
            node_name: "unknown".into(),
            state: CallState::default(),
        }
    }

    /// Ask for a JSON object reply.
    pub fn json_mode(mut self, on: bool) -> Self {
        self.json_mode = on;
        self
    }

    /// Cap the reply length (else the provider's configured default).
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sampling temperature (else the provider's configured default).
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    /// OpenAI-style `response_format`, e.g. a `json_schema`.
    pub fn response_format(mut self, format: Value) -> Self {
        self.response_format = Some(format);
        self
    }

    /// Use another model (Azure: deployment) than the configured one.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The pipeline step making the call (`metadata.node_name`).
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Who and what the call is for.
    pub fn state(mut self, state: CallState) -> Self {
        self.state = state;
        self
    }

    /// The provider-neutral request this call sends.
    pub(crate) fn chat_request(&self) -> ChatRequest {
        ChatRequest {
            messages: self.messages.clone(),
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            json_mode: self.json_mode,
            response_format: self.response_format.clone(),
            keep_raw: false,
        }
    }
}

/// Why a tracked call failed. Every variant but `EmptyMessages` and `Config` has its row.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("Messages cannot be empty")]
    EmptyMessages,
    /// The provider answered without text (blocked, filtered); `usage` is what it reported.
    #[error("LLM returned empty response")]
    EmptyResponse { usage: Usage },
    /// The provider's error, unchanged in kind and message.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// A streamed reply that did not end: the consumer dropped the stream, or the provider
    /// closed it before saying it was complete.
    #[error("{0}")]
    StreamInterrupted(String),
}

/// The outcome of [`LlmTracker::track`]: the row's id (none when no call was made) and
/// the result `call_and_track` returns.
#[derive(Debug)]
pub struct TrackedCall {
    pub row_id: Option<Uuid>,
    pub stored: Option<Stored>,
    pub result: Result<(String, Usage), TrackerError>,
}

/// How the tracker stores rows and what it redacts.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub store: StoreOptions,
    /// Secret values (API keys) removed from error text before it is stored.
    pub secrets: Vec<String>,
    /// Prices each row's cost is computed from.
    pub prices: Arc<PriceTable>,
}

/// Calls the configured provider and records every call.
pub struct LlmTracker {
    shared: Arc<Shared>,
}

/// What every call needs; shared with the tasks that drive streamed calls.
pub(crate) struct Shared {
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) store: UsageStore,
    secrets: Vec<String>,
    prices: Arc<PriceTable>,
    /// Set by [`LlmTracker::shutdown`]: streams still running end now, each with its row.
    pub(crate) closing: tokio::sync::watch::Sender<bool>,
    /// Streams whose row is not written yet (shutdown waits for them).
    pub(crate) streams: tokio::sync::watch::Sender<usize>,
}

/// What a finished call left to record.
pub(crate) struct Outcome {
    pub(crate) usage: Usage,
    pub(crate) attempts: u32,
    pub(crate) error: Option<String>,
    /// Keys added to the row's metadata (streams: `stream`, `usage_incomplete`).
    pub(crate) extra: Map<String, Value>,
}

impl LlmTracker {
    /// From the environment (and `.env`): builds the provider, connects and migrates; starts
    /// while the database is unreachable (see [`LlmTracker::from_settings`]).
    pub async fn from_env() -> Result<Self, TrackerError> {
        Self::from_settings(&Settings::from_env()?).await
    }

    /// From loaded settings: builds the provider and a lazily connecting pool, and migrates if
    /// the database answers within [`STARTUP_PROBE`]. If it does not, the tracker starts all
    /// the same: calls are made and their rows spooled, and the store migrates and stores
    /// them once the database answers. Only bad settings are an error here.
    pub async fn from_settings(settings: &Settings) -> Result<Self, TrackerError> {
        let provider = providers::llm_service(settings)?;
        let (db, migrated) = crate::db::open(
            &settings.database_url,
            STARTUP_PROBE,
            settings.sqlite_cache_mib,
        )
        .await?;
        let mut options = options_from_settings(settings);
        // Until then rows go to the spool; the store migrates once the database answers.
        options.store.migrate = !migrated;
        Ok(Self::new(provider, db, options).await)
    }

    /// From a provider and a database (migrated, or with `options.store.migrate` set). Never
    /// waits for the database; rows an earlier run spooled are replayed in the background.
    pub async fn new(
        provider: Arc<dyn Provider>,
        db: DatabaseConnection,
        options: TrackerOptions,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                provider,
                store: UsageStore::open(db, options.store).await,
                secrets: options.secrets,
                prices: options.prices,
                closing: tokio::sync::watch::Sender::new(false),
                streams: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Sends the chat request and records the call; returns the reply text and usage.
    pub async fn call_and_track(
        &self,
        request: CallRequest,
    ) -> Result<(String, Usage), TrackerError> {
        self.track(request).await.result
    }

    /// As `call_and_track`, also telling the row's id and where it was stored.
    pub async fn track(&self, request: CallRequest) -> TrackedCall {
        if request.messages.is_empty() {
            return TrackedCall {
                row_id: None,
                stored: None,
                result: Err(TrackerError::EmptyMessages),
            };
        }
        // The id exists before the first attempt so that a retried insert stays one row.
        let row_id = Uuid::new_v4();
        let started_at = now_micros();
        let shared = &self.shared;
        let outcome = shared.provider.chat(request.chat_request()).await;
        let fallback_model = shared.fallback_model(&request);
        let (row, result) = shared.row_for(row_id, started_at, &request, fallback_model, outcome);
        let stored = shared.store.record(row).await;
        TrackedCall {
            row_id: Some(row_id),
            stored: Some(stored),
            result,
        }
    }

    /// The row store (to flush or inspect what is pending).
    pub fn store(&self) -> &UsageStore {
        &self.shared.store
    }

    /// Ends the streamed calls still running (each writes its failure row: "the tracker shut
    /// down before the reply ended") and waits for their rows; then stores what is pending if
    /// the database answers; the rest stays in the spool.
    pub async fn shutdown(&self) {
        self.shared.closing.send_replace(true);
        let mut streams = self.shared.streams.subscribe();
        let _ = streams.wait_for(|n| *n == 0).await;
        self.shared.store.shutdown().await;
    }
}

impl Shared {
    /// The model a row names when the provider reported none.
    pub(crate) fn fallback_model(&self, request: &CallRequest) -> String {
        request
            .model
            .clone()
            .unwrap_or_else(|| self.provider.default_model().to_owned())
    }

    fn row_for(
        &self,
        id: Uuid,
        started_at: DateTime<Utc>,
        request: &CallRequest,
        fallback_model: String,
        outcome: Result<ChatResponse, ProviderError>,
    ) -> (usage::Model, Result<(String, Usage), TrackerError>) {
        let (usage, attempts, error, result) = match outcome {
            Ok(response) if !response.content.is_empty() => {
                let usage = response.usage;
                (
                    usage.clone(),
                    response.attempts,
                    None,
                    Ok((response.content, usage)),
                )
            }
            Ok(response) => {
                let err = TrackerError::EmptyResponse {
                    usage: response.usage.clone(),
                };
                (
                    response.usage,
                    response.attempts,
                    Some(err.to_string()),
                    Err(err),
                )
            }
            Err(e) => {
                let usage = Usage {
                    model: fallback_model.clone(),
                    ..Default::default()
                };
                (
                    usage,
                    e.attempts,
                    Some(e.message.clone()),
                    Err(TrackerError::Provider(e)),
                )
            }
        };
        let outcome = Outcome {
            usage,
            attempts,
            error,
            extra: Map::new(),
        };
        (
            self.build_row(id, started_at, request, fallback_model, outcome),
            result,
        )
    }

    /// The row of a finished call: its usage (possibly partial), the error if it failed.
    pub(crate) fn build_row(
        &self,
        id: Uuid,
        started_at: DateTime<Utc>,
        request: &CallRequest,
        fallback_model: String,
        outcome: Outcome,
    ) -> usage::Model {
        let Outcome {
            usage,
            attempts,
            error,
            extra,
        } = outcome;
        let model = if usage.model.is_empty() {
            fallback_model
        } else {
            usage.model.clone()
        };
        let mut metadata = self.metadata(request, attempts);
        if let Value::Object(map) = &mut metadata {
            map.extend(extra);
        }
        usage::Model {
            id: id.into(),
            user_id: request.state.user_id,
            model: truncate(&model, 255),
            prompt_tokens: to_i32(usage.prompt_tokens),
            completion_tokens: to_i32(usage.completion_tokens),
            total_tokens: to_i32(usage.total_tokens),
            cached_tokens: to_i32(usage.cached_tokens),
            reasoning_tokens: to_i32(usage.reasoning_tokens),
            success: error.is_none(),
            error: error.map(|e| redact(&e, &self.secrets)),
            metadata,
            created_at: now_micros(),
            started_at: Some(started_at),
            cost: self
                .prices
                .cost_micros(
                    &model,
                    Tokens {
                        prompt: usage.prompt_tokens.into(),
                        completion: usage.completion_tokens.into(),
                        cached: usage.cached_tokens.into(),
                        reasoning: usage.reasoning_tokens.into(),
                    },
                )
                .map(usage::Cost),
            cost_currency: "USD".into(),
            is_streaming: false,
            first_chunk_at: None,
        }
    }

    fn metadata(&self, request: &CallRequest, attempts: u32) -> Value {
        let state = &request.state;
        let mut map = state.metadata.clone();
        map.insert("node_name".into(), json!(request.node_name));
        for (key, value) in [
            ("source_type", &state.source_type),
            ("source_task_id", &state.source_task_id),
            ("source_path", &state.source_path),
        ] {
            if let Some(v) = value {
                map.insert(key.into(), json!(v));
            }
        }
        map.insert("provider".into(), json!(self.provider.name()));
        map.insert("attempts".into(), json!(attempts));
        Value::Object(map)
    }
}

/// Store and redaction options as the settings say.
pub fn options_from_settings(settings: &Settings) -> TrackerOptions {
    TrackerOptions {
        store: store_options(settings),
        secrets: provider_secrets(settings),
        prices: settings.prices.clone(),
    }
}

/// The providers' API keys the settings hold: what error text must never show.
pub fn provider_secrets(settings: &Settings) -> Vec<String> {
    [
        &settings.openai.api_key,
        &settings.azure.api_key,
        &settings.gemini.api_key,
    ]
    .into_iter()
    .flatten()
    .map(|s| s.expose().to_owned())
    .collect()
}

/// The store's options as the settings say: spool path, write mode and commit deadline
/// (`USAGE_SPOOL_PATH`, `USAGE_WRITE_MODE`, `USAGE_COMMIT_DEADLINE_MS`), the rest defaults.
pub fn store_options(settings: &Settings) -> StoreOptions {
    let mut store = StoreOptions::new(settings.usage_spool_path.clone());
    store.write_mode = settings.usage_write_mode;
    store.commit_deadline = settings.usage_commit_deadline;
    store
}

/// How long [`LlmTracker::from_settings`] waits for the database to answer before it starts
/// without it.
pub const STARTUP_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}
