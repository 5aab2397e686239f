//! The OpenAI-compatible gateway's routing and rows (issue 19 item 2): which configured provider
//! a Chat Completions request goes to, and the usage row its answer makes.
//!
//! Routing, over the providers configured (an API key set; Azure also needs its API base):
//! - `azure/<deployment>` → Azure OpenAI, that deployment;
//! - a model starting with `gemini` → Gemini (translated both ways, [`gemini`], streams too);
//! - anything else → OpenAI;
//! - with only one provider configured, every model goes to it (`azure/` stripped for Azure).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::config::Settings;
use crate::db::entities::usage;
use crate::pricing::{PriceTable, Tokens};

pub mod gemini;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    OpenAi { url: String },
    Azure { url: String, deployment: String },
    Gemini { url: String, model: String },
}

impl Upstream {
    /// `metadata.provider` of its rows.
    pub fn name(&self) -> &'static str {
        match self {
            Upstream::OpenAi { .. } => "openai",
            Upstream::Azure { .. } => "azure_openai",
            Upstream::Gemini { .. } => "gemini",
        }
    }
}

/// Why a request cannot be routed (a 400 for the client, nothing sent or recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no provider is configured on this gateway")]
    NoProvider,
    #[error("model {0:?}: Azure OpenAI is not configured on this gateway")]
    AzureMissing(String),
}

fn configured(settings: &Settings) -> (bool, bool, bool) {
    (
        settings.openai.api_key.is_some(),
        settings.azure.api_key.is_some() && settings.azure.api_base.is_some(),
        settings.gemini.api_key.is_some(),
    )
}

/// The upstream of a request for `model`, by the rule above (`stream`: a streamed request).
pub fn route(settings: &Settings, model: &str, stream: bool) -> Result<Upstream, RouteError> {
    let (openai, azure, gemini) = configured(settings);
    let only_azure = azure && !openai && !gemini;
    let azure_upstream = |deployment: &str| {
        let base = settings
            .azure
            .api_base
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        Upstream::Azure {
            url: format!(
                "{base}/openai/deployments/{}/chat/completions?api-version={}",
                urlencode(deployment),
                urlencode(&settings.azure.api_version)
            ),
            deployment: deployment.to_owned(),
        }
    };
    if let Some(deployment) = model.strip_prefix("azure/") {
        return if azure {
            Ok(azure_upstream(deployment))
        } else {
            Err(RouteError::AzureMissing(model.to_owned()))
        };
    }
    if only_azure {
        return Ok(azure_upstream(model));
    }
    let is_gemini = model.to_ascii_lowercase().starts_with("gemini");
    if (is_gemini && gemini) || (gemini && !openai && !azure) {
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        return Ok(Upstream::Gemini {
            url: format!(
                "{}/v1beta/models/{}:{method}",
                settings.gemini.base_url.trim_end_matches('/'),
                urlencode(model)
            ),
            model: model.to_owned(),
        });
    }
    if openai {
        return Ok(Upstream::OpenAi {
            url: format!(
                "{}/chat/completions",
                settings.openai.base_url.trim_end_matches('/')
            ),
        });
    }
    if azure {
        return Ok(azure_upstream(model));
    }
    Err(RouteError::NoProvider)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The models `GET /v1/models` lists: the price table's and the configured defaults, sorted,
/// in OpenAI's list shape.
pub fn model_list(settings: &Settings) -> Value {
    let (openai, azure, gemini) = configured(settings);
    let mut ids: std::collections::BTreeSet<String> =
        settings.prices.models().keys().cloned().collect();
    if openai {
        ids.insert(settings.openai.model.clone());
    }
    if azure {
        ids.insert(format!("azure/{}", settings.azure.deployment));
    }
    if gemini {
        ids.insert(settings.gemini.model.clone());
    }
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-tracker"}))
        .collect();
    json!({"object": "list", "data": data})
}

/// Token counts from a Chat Completions `usage` object (absent counts are 0).
pub fn usage_counts(usage: &Value) -> [i32; 5] {
    let n = |v: &Value| {
        v.as_u64()
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX))
            .unwrap_or(0)
    };
    let prompt = n(&usage["prompt_tokens"]);
    let completion = n(&usage["completion_tokens"]);
    let total = match usage.get("total_tokens") {
        Some(t) if t.is_u64() => n(t),
        _ => prompt.saturating_add(completion),
    };
    [
        prompt,
        completion,
        total,
        n(&usage["prompt_tokens_details"]["cached_tokens"]),
        n(&usage["completion_tokens_details"]["reasoning_tokens"]),
    ]
}

/// What the gateway knows of a finished request, for its row.
pub struct Call<'a> {
    pub user_id: i32,
    pub key_prefix: &'a str,
    pub node_name: &'a str,
    pub upstream: &'a Upstream,
    /// The model the answer named, else the request's.
    pub model: &'a str,
    pub usage: [i32; 5],
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub stream: bool,
    /// When the stream's first chunk arrived.
    pub first_chunk_at: Option<DateTime<Utc>>,
    /// More `metadata` (a stream's `usage_incomplete`, …).
    pub extra: Map<String, Value>,
}

/// The usage row of a gateway request.
pub fn row(call: Call<'_>, prices: &PriceTable) -> usage::Model {
    use chrono::SubsecRound;
    let [prompt, completion, total, cached, reasoning] = call.usage;
    let mut metadata = Map::new();
    metadata.insert("source_type".into(), json!("gateway"));
    metadata.insert("api_key".into(), json!(call.key_prefix));
    metadata.insert("node_name".into(), json!(call.node_name));
    metadata.insert("provider".into(), json!(call.upstream.name()));
    metadata.insert("stream".into(), json!(call.stream));
    metadata.extend(call.extra);
    let model: String = call.model.chars().take(255).collect();
    let cost = prices.cost_micros(
        &model,
        Tokens {
            prompt: prompt.into(),
            completion: completion.into(),
            cached: cached.into(),
            reasoning: reasoning.into(),
        },
    );
    let created_at = Utc::now().trunc_subsecs(6);
    usage::Model {
        id: Uuid::new_v4().into(),
        user_id: Some(call.user_id),
        model,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        success: call.error.is_none(),
        error: call.error,
        metadata: Value::Object(metadata),
        created_at,
        started_at: Some(call.started_at.trunc_subsecs(6)),
        cost: cost.map(usage::Cost),
        cost_currency: crate::pricing::CURRENCY.into(),
        is_streaming: call.stream,
        first_chunk_at: call
            .first_chunk_at
            .map(|t| t.trunc_subsecs(6).min(created_at)),
    }
}

/// Reads a streamed Chat Completions answer as it passes: splits the server-sent events,
/// keeps the model, the usage chunk and the first chunk's time, and says which events go on to
/// the client (the usage-only chunk only when the client asked for usage).
#[derive(Debug, Default)]
pub struct StreamReader {
    buf: Vec<u8>,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    pub model: Option<String>,
    pub usage: Option<[i32; 5]>,
    pub first_chunk_at: Option<DateTime<Utc>>,
    /// An `error` object sent inside the stream.
    pub error: Option<String>,
    /// `[DONE]` seen.
    pub done: bool,
    /// Set for Gemini: its events are translated into Chat Completions chunks.
    gemini: Option<gemini::ChunkTranslator>,
}

impl StreamReader {
    /// A reader for a client that did (`true`) or did not ask for the usage chunk.
    pub fn new(client_wants_usage: bool) -> Self {
        Self {
            client_wants_usage,
            ..Default::default()
        }
    }

    /// A reader that translates Gemini's `streamGenerateContent?alt=sse` events into Chat
    /// Completions chunks for `model`.
    pub fn gemini(client_wants_usage: bool, model: &str) -> Self {
        Self {
            client_wants_usage,
            gemini: Some(gemini::ChunkTranslator::new(model, Utc::now().timestamp())),
            ..Default::default()
        }
    }

    /// Bytes from the provider in, the bytes to forward out (whole events, in order).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            out.extend(self.forward(&event[..end], &event));
        }
        out
    }

    /// What is left when the provider's stream ends (an event without its blank line); for
    /// Gemini, the usage chunk (when asked for) and `[DONE]`.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = if rest.iter().all(u8::is_ascii_whitespace) {
            if self.gemini.is_some() {
                Vec::new()
            } else {
                rest
            }
        } else {
            let whole = rest.clone();
            self.forward(&rest, &whole)
        };
        if let Some(g) = &self.gemini {
            out.extend(g.finish(self.client_wants_usage));
            self.done = true;
        }
        out
    }

    /// The bytes to send on for one event (`event` without its blank line, `whole` with it).
    fn forward(&mut self, event: &[u8], whole: &[u8]) -> Vec<u8> {
        if self.gemini.is_some() {
            return self.translate(event);
        }
        if self.keep(event) {
            whole.to_vec()
        } else {
            Vec::new()
        }
    }

    fn data_of(event: &[u8]) -> String {
        let text = String::from_utf8_lossy(event);
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What every provider's chunk tells the row: the first chunk's time, the model (under
    /// `model_key`), an `error` object sent in the stream. True when the chunk is an error.
    fn note(&mut self, chunk: &Value, model_key: &str) -> bool {
        if self.first_chunk_at.is_none() {
            self.first_chunk_at = Some(Utc::now());
        }
        if let Some(m) = chunk[model_key].as_str().filter(|m| !m.is_empty()) {
            self.model = Some(m.to_owned());
        }
        let Some(e) = chunk.get("error") else {
            return false;
        };
        self.error = Some(
            e["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string()),
        );
        true
    }

    /// A Gemini event as a Chat Completions chunk event (nothing for an unreadable one).
    fn translate(&mut self, event: &[u8]) -> Vec<u8> {
        let Ok(chunk) = serde_json::from_str::<Value>(&Self::data_of(event)) else {
            return Vec::new();
        };
        if self.note(&chunk, "modelVersion") {
            return Vec::new();
        }
        let Some(g) = self.gemini.as_mut() else {
            return Vec::new();
        };
        let out = g.chunk(&chunk);
        if let Some(u) = g.usage() {
            self.usage = Some(usage_counts(u));
        }
        out
    }

    fn keep(&mut self, event: &[u8]) -> bool {
        let data = Self::data_of(event);
        if data.trim() == "[DONE]" {
            self.done = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
            return true;
        };
        self.note(&chunk, "model");
        if chunk["usage"].is_object() {
            self.usage = Some(usage_counts(&chunk["usage"]));
            let usage_only = chunk["choices"].as_array().is_none_or(Vec::is_empty);
            return self.client_wants_usage || !usage_only;
        }
        true
    }
}

/// The end of the first whole event in `buf` and the length of its blank line.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let mut vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        vars.insert("DATABASE_URL".into(), "sqlite::memory:".into());
        Settings::from_map(&vars).unwrap()
    }

    #[test]
    fn models_route_by_the_documented_rule() {
        let all = settings(&[
            ("OPENAI_API_KEY", "sk-test-0123456789"),
            ("AZURE_OPENAI_API_KEY", "az-test-0123456789"),
            ("AZURE_OPENAI_API_BASE", "https://r.openai.azure.com/"),
            ("GEMINI_API_KEY", "gm-test-0123456789"),
        ]);
        assert_eq!(route(&all, "gpt-4o", false).unwrap().name(), "openai");
        match route(&all, "azure/my dep", false).unwrap() {
            Upstream::Azure { url, deployment } => {
                assert_eq!(deployment, "my dep");
                assert!(url.starts_with("https://r.openai.azure.com/openai/deployments/my%20dep/chat/completions?api-version="), "{url}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            route(&all, "gemini-2.5-flash", false),
            Ok(Upstream::Gemini { .. })
        ));
        assert!(matches!(
            route(&all, "gemini-2.5-flash", true),
            Ok(Upstream::Gemini { url, .. }) if url.ends_with(":streamGenerateContent?alt=sse")
        ));
        let openai = settings(&[("OPENAI_API_KEY", "sk-test-0123456789")]);
        assert_eq!(
            route(&openai, "gemini-2.5-flash", false).unwrap().name(),
            "openai"
        );
        assert!(matches!(
            route(&openai, "azure/x", false),
            Err(RouteError::AzureMissing(_))
        ));
        let azure = settings(&[
            ("AZURE_OPENAI_API_KEY", "az-test-0123456789"),
            ("AZURE_OPENAI_API_BASE", "https://r.openai.azure.com"),
        ]);
        assert!(
            matches!(route(&azure, "gpt-4o", false).unwrap(), Upstream::Azure { deployment, .. } if deployment == "gpt-4o")
        );
        assert_eq!(
            route(&settings(&[]), "gpt-4o", false),
            Err(RouteError::NoProvider)
        );
    }

    #[test]
    fn a_stream_is_read_in_pieces_and_the_usage_chunk_kept_back_unless_asked_for() {
        let sse = "data: {\"model\":\"m-1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                   data: {\"model\":\"m-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\r\n\r\n\
                   data: [DONE]\n\n";
        for wants in [false, true] {
            let mut r = StreamReader::new(wants);
            let mut out = Vec::new();
            for piece in sse.as_bytes().chunks(7) {
                out.extend(r.push(piece));
            }
            out.extend(r.finish());
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.contains("prompt_tokens"), wants, "{text}");
            assert!(text.contains("\"Hi\"") && text.ends_with("data: [DONE]\n\n"));
            assert_eq!(r.usage, Some([3, 2, 5, 0, 0]));
            assert_eq!(r.model.as_deref(), Some("m-1"));
            assert!(r.done && r.first_chunk_at.is_some());
        }
    }

    #[test]
    fn usage_counts_read_the_details() {
        let u = json!({"prompt_tokens": 2048, "completion_tokens": 420, "total_tokens": 2468,
                       "prompt_tokens_details": {"cached_tokens": 1536},
                       "completion_tokens_details": {"reasoning_tokens": 256}});
        assert_eq!(usage_counts(&u), [2048, 420, 2468, 1536, 256]);
        assert_eq!(
            usage_counts(&json!({"prompt_tokens": 3, "completion_tokens": 4})),
            [3, 4, 7, 0, 0]
        );
        assert_eq!(usage_counts(&Value::Null), [0; 5]);
    }
}
