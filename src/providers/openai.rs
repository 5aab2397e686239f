//! OpenAI chat completions through async-openai. Also the engine behind Azure OpenAI, which
//! speaks the same wire format with another URL scheme and auth header.
//!
//! async-openai's own retry layer is replaced by a plain transport (`with_http_service`), so
//! `LLM_MAX_RETRIES` alone decides retries; the transport notes `Retry-After` and the status
//! of the answer for the retry policy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_openai::config::{Config, OpenAIConfig};
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, ResponseFormat,
};
use serde_json::Value;

use super::{
    ChatRequest, ChatResponse, Message, OpenedStream, Provider, ProviderError, ProviderErrorKind,
    Role, Usage, check_api_key, count, http_client, retry_after, stream,
};
use crate::config::{ConfigError, OpenAiSettings};

/// Which token-limit field the endpoint takes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MaxTokensField {
    /// OpenAI: `max_completion_tokens` (required by reasoning models, accepted by all).
    MaxCompletionTokens,
    /// Azure api-version 2024-10-21 deployments: `max_tokens`.
    MaxTokens,
}

/// An OpenAI-wire-format endpoint behind an async-openai `Config`.
pub(crate) struct Compatible<C: Config + Clone> {
    pub name: &'static str,
    pub config: C,
    pub http: reqwest::Client,
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub max_tokens_field: MaxTokensField,
}

/// What the transport saw of the last HTTP answer.
#[derive(Default)]
struct Seen {
    status: Option<u16>,
    retry_after: Option<Duration>,
}

impl<C: Config + Clone + 'static> Compatible<C> {
    fn build_request(
        &self,
        req: &ChatRequest,
    ) -> Result<CreateChatCompletionRequest, ProviderError> {
        let response_format = match (&req.response_format, req.json_mode) {
            (Some(v), _) => Some(serde_json::from_value::<ResponseFormat>(v.clone()).map_err(
                |e| {
                    ProviderError::new(
                        ProviderErrorKind::InvalidRequest,
                        format!("invalid response_format: {e}"),
                    )
                },
            )?),
            (None, true) => Some(ResponseFormat::JsonObject),
            (None, false) => None,
        };
        let max_tokens = req.max_tokens.or(self.max_tokens);
        let mut request = CreateChatCompletionRequest {
            model: req.model.clone().unwrap_or_else(|| self.model.clone()),
            messages: req.messages.iter().map(to_openai_message).collect(),
            temperature: req.temperature.or(self.temperature),
            response_format,
            ..Default::default()
        };
        match self.max_tokens_field {
            MaxTokensField::MaxCompletionTokens => request.max_completion_tokens = max_tokens,
            // Deprecated by OpenAI, but what Azure's 2024-10-21 deployments take.
            #[allow(deprecated)]
            MaxTokensField::MaxTokens => request.max_tokens = max_tokens,
        }
        Ok(request)
    }

    pub(crate) async fn chat_once(&self, req: ChatRequest) -> Result<ChatResponse, ProviderError> {
        let request = self.build_request(&req)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let transport = {
            let http = self.http.clone();
            let seen = seen.clone();
            tower::service_fn(move |factory: HttpRequestFactory| {
                let http = http.clone();
                let seen = seen.clone();
                async move {
                    let request = factory.build().await?;
                    let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
                    if let Ok(mut s) = seen.lock() {
                        s.status = Some(response.status().as_u16());
                        s.retry_after = retry_after(response.headers());
                    }
                    Ok::<_, OpenAIError>(response)
                }
            })
        };
        let client = async_openai::Client::build(self.http.clone(), self.config.clone())
            .with_http_service(transport);
        let result = client.chat().create_byot::<_, Value>(request).await;
        let seen = seen
            .lock()
            .map(|s| (s.status, s.retry_after))
            .unwrap_or_default();
        match result {
            Ok(body) => Ok(parse_response(
                &body,
                req.model.as_deref().unwrap_or(&self.model),
                req.keep_raw,
            )),
            Err(e) => Err(map_error(e, seen.0, seen.1)),
        }
    }
}

impl<C: Config + Clone + 'static> Compatible<C> {
    /// `stream: true` with `stream_options.include_usage`: the reply as chat-completion chunks
    /// over server-sent events, the usage in a last chunk with `choices: []`.
    pub(crate) async fn chat_stream_once(
        &self,
        req: ChatRequest,
    ) -> Result<OpenedStream, ProviderError> {
        let mut request = self.build_request(&req)?;
        request.stream = Some(true);
        request.stream_options = Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            ..Default::default()
        });
        let response = self
            .http
            .post(self.config.url("/chat/completions"))
            .query(&self.config.query())
            .headers(self.config.headers())
            .json(&request)
            .send()
            .await
            .map_err(|e| {
                ProviderError::new(
                    ProviderErrorKind::Network,
                    format!("connection error: {}", e.without_url()),
                )
            })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let wait = retry_after(response.headers());
            let body = response.bytes().await.unwrap_or_default();
            return Err(http_error(status, wait, &body));
        }
        Ok(OpenedStream {
            events: stream::events(
                response,
                req.model.unwrap_or_else(|| self.model.clone()),
                openai_events,
            ),
            attempts: 1,
        })
    }
}

/// An OpenAI / Azure error answer (`{"error": {"message", "type", "code"}}`) as an error.
fn http_error(status: u16, retry_after: Option<Duration>, body: &[u8]) -> ProviderError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &parsed["error"];
    let quota = error["code"].as_str() == Some("insufficient_quota")
        || error["type"].as_str() == Some("insufficient_quota");
    let kind = if status == 429 && quota {
        ProviderErrorKind::QuotaExceeded
    } else {
        ProviderError::kind_for_status(status)
    };
    let message = super::error_message(error, status, body);
    ProviderError {
        kind,
        status: Some(status),
        message,
        retry_after,
        attempts: 1,
    }
}

fn to_openai_message(m: &Message) -> ChatCompletionRequestMessage {
    let content = m.content.clone();
    match m.role {
        Role::System => ChatCompletionRequestSystemMessage::from(content).into(),
        Role::User => ChatCompletionRequestUserMessage::from(content).into(),
        Role::Assistant => ChatCompletionRequestAssistantMessage::from(content).into(),
    }
}

/// Reads the reply text and normalised usage from a chat-completion body.
pub(crate) fn parse_response(body: &Value, fallback_model: &str, keep_raw: bool) -> ChatResponse {
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ChatResponse {
        content,
        usage: parse_usage(body, fallback_model),
        raw: keep_raw.then(|| body.clone()),
        attempts: 1,
    }
}

/// OpenAI/Azure `usage`, normalised (SPEC §4).
pub(crate) fn parse_usage(body: &Value, fallback_model: &str) -> Usage {
    let usage = &body["usage"];
    let model = body["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or(fallback_model);
    Usage {
        model: model.to_owned(),
        prompt_tokens: count(usage.get("prompt_tokens")),
        completion_tokens: count(usage.get("completion_tokens")),
        total_tokens: count(usage.get("total_tokens")),
        cached_tokens: count(usage.pointer("/prompt_tokens_details/cached_tokens")),
        reasoning_tokens: count(usage.pointer("/completion_tokens_details/reasoning_tokens")),
    }
}

fn map_error(
    err: OpenAIError,
    status: Option<u16>,
    retry_after: Option<Duration>,
) -> ProviderError {
    let (kind, status, message) = match err {
        OpenAIError::ApiError(resp) => {
            let status = resp.status_code.as_u16();
            let api = resp.api_error;
            let quota = api.code.as_deref() == Some("insufficient_quota")
                || api.r#type.as_deref() == Some("insufficient_quota");
            let kind = if status == 429 && quota {
                ProviderErrorKind::QuotaExceeded
            } else {
                ProviderError::kind_for_status(status)
            };
            (kind, Some(status), api.message)
        }
        OpenAIError::Reqwest(e) => (
            ProviderErrorKind::Network,
            None,
            format!("connection error: {e}"),
        ),
        // A non-JSON error page (a proxy's 502, say) still counts by its status.
        OpenAIError::JSONDeserialize(e, _) => match status {
            Some(s) if s >= 400 => (
                ProviderError::kind_for_status(s),
                Some(s),
                format!("HTTP {s} with an unreadable body: {e}"),
            ),
            _ => (
                ProviderErrorKind::InvalidResponse,
                status,
                format!("unreadable response: {e}"),
            ),
        },
        OpenAIError::InvalidArgument(m) => (ProviderErrorKind::InvalidRequest, None, m),
        other => (
            ProviderErrorKind::InvalidResponse,
            status,
            other.to_string(),
        ),
    };
    ProviderError {
        kind,
        status,
        message,
        retry_after,
        attempts: 1,
    }
}

/// OpenAI (`api.openai.com` or any compatible `OPENAI_BASE_URL`).
pub struct OpenAiProvider(Compatible<OpenAIConfig>);

impl OpenAiProvider {
    /// Builds the provider; `OPENAI_API_KEY` is required.
    pub fn from_settings(s: &OpenAiSettings) -> Result<Self, ConfigError> {
        let key = s
            .api_key
            .as_ref()
            .ok_or_else(|| ConfigError::missing("OPENAI_API_KEY", "LLM_PROVIDER is openai"))?;
        check_api_key("OPENAI_API_KEY", key.expose())?;
        let config = OpenAIConfig::new()
            .with_api_key(key.expose())
            .with_api_base(&s.base_url);
        Ok(Self(Compatible {
            name: "openai",
            config,
            http: http_client()?,
            model: s.model.clone(),
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
        }))
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn name(&self) -> &'static str {
        self.0.name
    }

    fn default_model(&self) -> &str {
        &self.0.model
    }

    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.0.chat_once(request).await
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<OpenedStream, ProviderError> {
        self.0.chat_stream_once(request).await
    }
}

/// The events of one OpenAI / Azure chat-completion chunk. Tolerates Azure's first chunk
/// (`choices: []`, `prompt_filter_results`, empty `model`) and content-filter annotation
/// chunks without `delta`. The final chunk (`choices: []`, `usage`) gives the usage.
pub fn openai_events(
    data: &str,
    fallback_model: &str,
) -> Vec<Result<super::StreamEvent, ProviderError>> {
    let (chunk, mut out) = match super::stream::read_chunk(data, "model") {
        Ok(v) => v,
        Err(e) => return vec![Err(e)],
    };
    if let Some(text) = chunk
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        out.push(Ok(super::StreamEvent::Delta(text.to_owned())));
    }
    if chunk["usage"].is_object() {
        out.push(Ok(super::StreamEvent::Usage(parse_usage(
            &chunk,
            fallback_model,
        ))));
    }
    out
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use crate::providers::StreamEvent;

    #[test]
    fn azure_filter_chunks_are_tolerated() {
        let first = r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#;
        assert!(openai_events(first, "d").is_empty());
        let annotation = r#"{"choices":[{"content_filter_offsets":{"check_offset":1},"content_filter_results":{},"finish_reason":null,"index":0}],"created":0,"id":"","model":"","object":""}"#;
        assert!(openai_events(annotation, "d").is_empty());
    }

    #[test]
    fn the_final_chunk_carries_usage() {
        let last = r#"{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#;
        let events: Vec<StreamEvent> = openai_events(last, "d")
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(events[0], StreamEvent::Model("gpt-4o-mini".into()));
        match &events[1] {
            StreamEvent::Usage(u) => assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (19, 10, 29)
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_error_in_the_stream_is_an_error() {
        let e = openai_events(
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            "d",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].as_ref().unwrap_err().message, "overloaded");
        assert!(openai_events("not json", "d")[0].is_err());
    }
}
