//! Google Gemini through its native REST API:
//! `POST {GEMINI_BASE_URL}/v1beta/models/{model}:generateContent`, header `x-goog-api-key`.
//! async-openai has no Gemini types, so the wire types are our own.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::{
    ChatRequest, ChatResponse, OpenedStream, Provider, ProviderError, ProviderErrorKind, Role,
    Usage, check_api_key, count, http_client, retry_after, stream,
};
use crate::config::{ConfigError, GeminiSettings};

/// Gemini `generateContent`.
pub struct GeminiProvider {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part<'a>>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    generation_config: GenerationConfig,
}

impl GeminiProvider {
    /// Builds the provider; `GEMINI_API_KEY` is required.
    pub fn from_settings(s: &GeminiSettings) -> Result<Self, ConfigError> {
        let key = s
            .api_key
            .as_ref()
            .ok_or_else(|| ConfigError::missing("GEMINI_API_KEY", "LLM_PROVIDER is gemini"))?;
        check_api_key("GEMINI_API_KEY", key.expose())?;
        Ok(Self {
            http: http_client()?,
            base_url: s.base_url.clone(),
            api_key: key.expose().to_owned(),
            model: s.model.clone(),
            max_tokens: s.max_tokens,
            temperature: s.temperature,
        })
    }

    fn body<'a>(&self, req: &'a ChatRequest) -> Result<GenerateContentRequest<'a>, ProviderError> {
        let system: Vec<Part<'a>> = req
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| Part { text: &m.content })
            .collect();
        let contents = req
            .messages
            .iter()
            .filter(|m| m.role != Role::System)
            .map(|m| Content {
                role: Some(if m.role == Role::Assistant {
                    "model"
                } else {
                    "user"
                }),
                parts: vec![Part { text: &m.content }],
            })
            .collect();
        let (mime, schema) = response_format(req)?;
        Ok(GenerateContentRequest {
            contents,
            system_instruction: (!system.is_empty()).then_some(Content {
                role: None,
                parts: system,
            }),
            generation_config: GenerationConfig {
                max_output_tokens: req.max_tokens.or(self.max_tokens),
                temperature: req.temperature.or(self.temperature),
                response_mime_type: mime,
                response_json_schema: schema,
            },
        })
    }
}

/// OpenAI-style `response_format` / `json_mode` → Gemini's `responseMimeType` and
/// `responseJsonSchema`.
fn response_format(
    req: &ChatRequest,
) -> Result<(Option<&'static str>, Option<Value>), ProviderError> {
    let invalid = |m: &str| {
        ProviderError::new(
            ProviderErrorKind::InvalidRequest,
            format!("invalid response_format: {m}"),
        )
    };
    match &req.response_format {
        None if req.json_mode => Ok((Some("application/json"), None)),
        None => Ok((None, None)),
        Some(rf) => match rf["type"].as_str() {
            Some("text") => Ok((None, None)),
            Some("json_object") => Ok((Some("application/json"), None)),
            Some("json_schema") => {
                let schema = rf
                    .pointer("/json_schema/schema")
                    .cloned()
                    .ok_or_else(|| invalid("json_schema.schema is missing"))?;
                Ok((Some("application/json"), Some(schema)))
            }
            _ => Err(invalid("type must be text, json_object or json_schema")),
        },
    }
}

/// Gemini `usageMetadata`, normalised: completion = candidates + thoughts (SPEC §4).
pub(crate) fn parse_usage(body: &Value, fallback_model: &str) -> Usage {
    let meta = &body["usageMetadata"];
    let thoughts = count(meta.get("thoughtsTokenCount"));
    Usage {
        model: body["modelVersion"]
            .as_str()
            .filter(|m| !m.is_empty())
            .unwrap_or(fallback_model)
            .to_owned(),
        prompt_tokens: count(meta.get("promptTokenCount")),
        completion_tokens: count(meta.get("candidatesTokenCount")).saturating_add(thoughts),
        total_tokens: count(meta.get("totalTokenCount")),
        cached_tokens: count(meta.get("cachedContentTokenCount")),
        reasoning_tokens: thoughts,
    }
}

/// The first candidate's text parts that are not thoughts; empty when blocked.
pub(crate) fn reply_text(body: &Value) -> String {
    if body.pointer("/promptFeedback/blockReason").is_some() {
        return String::new();
    }
    body.pointer("/candidates/0/content/parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter(|p| !p["thought"].as_bool().unwrap_or(false))
                .filter_map(|p| p["text"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// `RetryInfo.retryDelay` (`"28s"`) from a Gemini error body.
fn retry_delay(error: &Value) -> Option<Duration> {
    error["details"].as_array()?.iter().find_map(|d| {
        let delay = d["retryDelay"].as_str()?.strip_suffix('s')?;
        Duration::try_from_secs_f64(delay.parse().ok()?).ok()
    })
}

#[async_trait::async_trait]
impl Provider for GeminiProvider {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    async fn chat(&self, req: ChatRequest) -> Result<ChatResponse, ProviderError> {
        let model = req.model.clone().unwrap_or_else(|| self.model.clone());
        let response = self.post(&req, &model, "generateContent").await?;
        let status = response.status().as_u16();
        let header_wait = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(connection_error)?;
        if !(200..300).contains(&status) {
            return Err(http_error(status, header_wait, &bytes));
        }
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| ProviderError {
            kind: ProviderErrorKind::InvalidResponse,
            status: Some(status),
            message: format!("unreadable response: {e}"),
            retry_after: None,
            attempts: 1,
        })?;
        Ok(ChatResponse {
            content: reply_text(&body),
            usage: parse_usage(&body, &model),
            raw: req.keep_raw.then(|| body.clone()),
            attempts: 1,
        })
    }

    /// `streamGenerateContent?alt=sse`: one `GenerateContentResponse` per event, the usage
    /// (cumulative) on each, the last one final.
    async fn chat_stream(&self, req: ChatRequest) -> Result<OpenedStream, ProviderError> {
        let model = req.model.clone().unwrap_or_else(|| self.model.clone());
        let response = self
            .post(&req, &model, "streamGenerateContent?alt=sse")
            .await?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let header_wait = retry_after(response.headers());
            let bytes = response.bytes().await.map_err(connection_error)?;
            return Err(http_error(status, header_wait, &bytes));
        }
        Ok(OpenedStream {
            events: stream::events(response, model, gemini_events),
            attempts: 1,
        })
    }
}

impl GeminiProvider {
    /// `POST {base}/v1beta/models/{model}:{method}` with the request's body.
    async fn post(
        &self,
        req: &ChatRequest,
        model: &str,
        method: &str,
    ) -> Result<reqwest::Response, ProviderError> {
        let url = format!("{}/v1beta/models/{}:{}", self.base_url, model, method);
        let body = self.body(req)?;
        self.http
            .post(&url)
            .header("x-goog-api-key", &self.api_key)
            .json(&body)
            .send()
            .await
            .map_err(connection_error)
    }
}

fn connection_error(e: reqwest::Error) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Network,
        format!("connection error: {}", e.without_url()),
    )
}

/// A Gemini error answer (`{"error": {"message", "details": [RetryInfo…]}}`) as an error.
fn http_error(status: u16, header_wait: Option<Duration>, bytes: &[u8]) -> ProviderError {
    let error = serde_json::from_slice::<Value>(bytes)
        .ok()
        .map(|v| v["error"].clone())
        .unwrap_or(Value::Null);
    let message = super::error_message(&error, status, bytes);
    ProviderError {
        kind: ProviderError::kind_for_status(status),
        status: Some(status),
        message,
        retry_after: header_wait.or_else(|| retry_delay(&error)),
        attempts: 1,
    }
}

/// The events of one Gemini `streamGenerateContent` response: the text parts that are not
/// thoughts, and `usageMetadata` (cumulative; the last one is the call's usage).
pub fn gemini_events(
    data: &str,
    fallback_model: &str,
) -> Vec<Result<super::StreamEvent, ProviderError>> {
    let (chunk, mut out) = match super::stream::read_chunk(data, "modelVersion") {
        Ok(v) => v,
        Err(e) => return vec![Err(e)],
    };
    let text = reply_text(&chunk);
    if !text.is_empty() {
        out.push(Ok(super::StreamEvent::Delta(text)));
    }
    if chunk["usageMetadata"].is_object() {
        out.push(Ok(super::StreamEvent::Usage(parse_usage(
            &chunk,
            fallback_model,
        ))));
    }
    if chunk.pointer("/candidates/0/finishReason").is_some()
        || chunk.pointer("/promptFeedback/blockReason").is_some()
    {
        out.push(Ok(super::StreamEvent::Done));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_schema_maps_to_response_json_schema() {
        let req = ChatRequest {
            response_format: Some(
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
            ),
            ..Default::default()
        };
        assert_eq!(
            response_format(&req).unwrap(),
            (Some("application/json"), Some(json!({"type": "object"})))
        );
        let bad = ChatRequest {
            response_format: Some(json!({"type": "yaml"})),
            ..Default::default()
        };
        assert!(response_format(&bad).is_err());
    }

    #[test]
    fn thoughts_are_not_reply_text() {
        let body = json!({"candidates": [{"content": {"parts": [
            {"text": "thinking...", "thought": true}, {"text": "Hel"}, {"text": "lo"}]}}]});
        assert_eq!(reply_text(&body), "Hello");
    }
}
