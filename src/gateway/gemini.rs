//! Chat Completions ↔ Gemini `generateContent`, for the gateway: the request translated to
//! Gemini's (system → `systemInstruction`, roles, tool calls and results, function tools →
//! `functionDeclarations`, JSON mode and schema, max tokens, temperature, top_p, stop, n), and
//! Gemini's answer back in OpenAI's response shape (choices, `finish_reason`, `tool_calls`,
//! usage with `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens`).

use serde_json::{Map, Value, json};

/// Why a request cannot be translated (a 400 naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Untranslatable {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> Untranslatable {
    Untranslatable {
        field,
        message: message.into(),
    }
}

/// A message's text: a string, or the text parts of a content array.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// JSON Schema keys Gemini's `responseSchema`/`parameters` do not take.
fn gemini_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "additionalProperties" | "$schema" | "strict" | "$defs" | "definitions"
                    )
                })
                .map(|(k, v)| (k.clone(), gemini_schema(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(gemini_schema).collect()),
        other => other.clone(),
    }
}

/// The `generateContent` body for a Chat Completions request.
pub fn request(body: &Map<String, Value>) -> Result<Value, Untranslatable> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "required: an array"))?;
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // Tool call ids → function names, for the tool results that follow.
    let mut calls = std::collections::HashMap::new();
    for m in messages {
        let role = m["role"].as_str().unwrap_or_default();
        match role {
            "system" | "developer" => system.push(json!({"text": text_of(&m["content"])})),
            "user" => {
                contents.push(json!({"role": "user", "parts": [{"text": text_of(&m["content"])}]}))
            }
            "assistant" => {
                let mut parts = Vec::new();
                let text = text_of(&m["content"]);
                if !text.is_empty() {
                    parts.push(json!({"text": text}));
                }
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let name = call["function"]["name"].as_str().unwrap_or_default();
                    let args: Value = call["function"]["arguments"]
                        .as_str()
                        .and_then(|a| serde_json::from_str(a).ok())
                        .unwrap_or_else(|| json!({}));
                    if let Some(id) = call["id"].as_str() {
                        calls.insert(id.to_owned(), name.to_owned());
                    }
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                contents.push(json!({"role": "model", "parts": parts}));
            }
            "tool" => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let name = calls.get(id).cloned().unwrap_or_else(|| id.to_owned());
                let text = text_of(&m["content"]);
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"result": text}));
                contents.push(json!({"role": "user", "parts": [{"functionResponse": {"name": name, "response": response}}]}));
            }
            other => return Err(bad("messages", format!("unknown role {other:?}"))),
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut config = Map::new();
    if let Some(n) = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
    {
        config.insert("maxOutputTokens".into(), n.clone());
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("seed", "seed"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            config.insert("stopSequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            config.insert("stopSequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    let format = body.get("response_format").unwrap_or(&Value::Null);
    match format["type"].as_str() {
        Some("json_object") => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = format["json_schema"].get("schema") {
                config.insert("responseSchema".into(), gemini_schema(schema));
            }
        }
        Some("text") | None => {}
        Some(other) => return Err(bad("response_format", format!("unknown type {other:?}"))),
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    let declarations: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function")
        .map(|t| {
            let f = &t["function"];
            let mut d = json!({"name": f["name"], "description": f["description"].as_str().unwrap_or_default()});
            if let Some(p) = f.get("parameters") {
                d["parameters"] = gemini_schema(p);
            }
            d
        })
        .collect();
    if !declarations.is_empty() {
        out.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
        let mode = match &body.get("tool_choice") {
            Some(Value::String(s)) if s == "none" => Some(json!({"mode": "NONE"})),
            Some(Value::String(s)) if s == "required" => Some(json!({"mode": "ANY"})),
            Some(Value::Object(c)) => c
                .get("function")
                .and_then(|f| f["name"].as_str())
                .map(|n| json!({"mode": "ANY", "allowedFunctionNames": [n]})),
            _ => None,
        };
        if let Some(m) = mode {
            out.insert("toolConfig".into(), json!({"functionCallingConfig": m}));
        }
    }
    Ok(Value::Object(out))
}

/// A candidate's text (thought parts left out) and its `functionCall`s.
fn parts_of(candidate: &Value) -> (String, Vec<Value>) {
    let parts = candidate["content"]["parts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text = parts
        .iter()
        .filter(|p| p["thought"] != true)
        .filter_map(|p| p["text"].as_str())
        .collect();
    let calls = parts
        .iter()
        .filter_map(|p| p.get("functionCall").cloned())
        .collect();
    (text, calls)
}

fn finish_reason(reason: Option<&str>, has_calls: bool) -> &'static str {
    if has_calls {
        return "tool_calls";
    }
    match reason {
        Some("MAX_TOKENS") => "length",
        Some("SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII") => {
            "content_filter"
        }
        _ => "stop",
    }
}

/// OpenAI's `usage` from Gemini's `usageMetadata` (completion = candidates + thoughts, as the
/// tracker counts Gemini calls).
pub fn usage(meta: &Value) -> Value {
    let n = |k: &str| meta[k].as_u64().unwrap_or(0);
    let thoughts = n("thoughtsTokenCount");
    let prompt = n("promptTokenCount");
    let completion = n("candidatesTokenCount") + thoughts;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": meta["totalTokenCount"].as_u64().unwrap_or(prompt + completion),
        "prompt_tokens_details": {"cached_tokens": n("cachedContentTokenCount")},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    })
}

/// Gemini's `generateContent` answer in OpenAI's `chat.completion` shape.
pub fn response(gemini: &Value, requested_model: &str, created: i64) -> Value {
    let choices: Vec<Value> = gemini["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            let (text, functions) = parts_of(c);
            let calls: Vec<Value> = functions
                .into_iter()
                .enumerate()
                .map(|(k, f)| {
                    json!({"id": format!("call_{i}_{k}"), "type": "function", "function": {
                        "name": f["name"], "arguments": f["args"].to_string()}})
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }, "refusal": null});
            let has_calls = !calls.is_empty();
            if has_calls {
                message["tool_calls"] = Value::Array(calls);
            }
            json!({"index": c["index"].as_u64().unwrap_or(i as u64), "message": message, "logprobs": null,
                   "finish_reason": finish_reason(c["finishReason"].as_str(), has_calls)})
        })
        .collect();
    json!({
        "id": format!("chatcmpl-{}", gemini["responseId"].as_str().unwrap_or("gemini")),
        "object": "chat.completion",
        "created": created,
        "model": gemini["modelVersion"].as_str().unwrap_or(requested_model),
        "choices": choices,
        "usage": usage(&gemini["usageMetadata"]),
    })
}

/// Gemini's stream events as Chat Completions chunks: the text and function calls of each,
/// the role on the first, `finish_reason` on the last; the usage kept for the end.
#[derive(Debug)]
pub struct ChunkTranslator {
    id: String,
    created: i64,
    model: String,
    sent_role: bool,
    calls: usize,
    usage: Option<Value>,
}

impl ChunkTranslator {
    pub fn new(model: &str, created: i64) -> Self {
        Self {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created,
            model: model.to_owned(),
            sent_role: false,
            calls: 0,
            usage: None,
        }
    }

    /// The usage of the stream so far, in OpenAI's shape.
    pub fn usage(&self) -> Option<&Value> {
        self.usage.as_ref()
    }

    fn event(&self, choices: Value, usage: Option<&Value>) -> Vec<u8> {
        let mut chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "choices": choices});
        if let Some(u) = usage {
            chunk["usage"] = u.clone();
        }
        format!("data: {chunk}\n\n").into_bytes()
    }

    /// One Gemini chunk in, one Chat Completions chunk event out (nothing when it has neither
    /// text, calls nor a finish).
    pub fn chunk(&mut self, gemini: &Value) -> Vec<u8> {
        if let Some(m) = gemini["modelVersion"].as_str().filter(|m| !m.is_empty()) {
            self.model = m.to_owned();
        }
        if gemini["usageMetadata"].is_object() {
            self.usage = Some(usage(&gemini["usageMetadata"]));
        }
        let c = &gemini["candidates"][0];
        let (text, functions) = parts_of(c);
        let calls: Vec<Value> = functions
            .into_iter()
            .map(|f| {
                let k = self.calls;
                self.calls += 1;
                json!({"index": k, "id": format!("call_0_{k}"), "type": "function",
                       "function": {"name": f["name"], "arguments": f["args"].to_string()}})
            })
            .collect();
        let finish = c["finishReason"]
            .as_str()
            .map(|r| finish_reason(Some(r), self.calls > 0));
        if text.is_empty() && calls.is_empty() && finish.is_none() {
            return Vec::new();
        }
        let mut delta = Map::new();
        if !self.sent_role {
            delta.insert("role".into(), json!("assistant"));
            self.sent_role = true;
        }
        if !text.is_empty() {
            delta.insert("content".into(), json!(text));
        }
        if !calls.is_empty() {
            delta.insert("tool_calls".into(), Value::Array(calls));
        }
        self.event(
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
            None,
        )
    }

    /// The end of the stream: the usage chunk when the client asked for it, then `[DONE]`.
    pub fn finish(&self, with_usage: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if with_usage && let Some(u) = &self.usage {
            out.extend(self.event(json!([]), Some(u)));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_gemini_s() {
        let body = json!({
            "model": "gemini-2.5-flash",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 3}"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {"type": "object", "additionalProperties": false, "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
            "max_tokens": 100, "temperature": 0.2, "stop": "END",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": {"type": "object", "additionalProperties": false, "properties": {"a": {"type": "integer"}}}}},
        });
        let g = request(body.as_object().unwrap()).unwrap();
        assert_eq!(
            g["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}]})
        );
        assert_eq!(
            g["contents"][0],
            json!({"role": "user", "parts": [{"text": "Weather in Oslo?"}]})
        );
        assert_eq!(g["contents"][1]["role"], "model");
        assert_eq!(
            g["contents"][1]["parts"][0]["functionCall"],
            json!({"name": "get_weather", "args": {"city": "Oslo"}})
        );
        assert_eq!(
            g["contents"][2]["parts"][0]["functionResponse"],
            json!({"name": "get_weather", "response": {"temp": 3}})
        );
        assert_eq!(
            g["tools"][0]["functionDeclarations"][0]["parameters"],
            json!({"type": "object", "properties": {"city": {"type": "string"}}})
        );
        assert_eq!(g["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
        let c = &g["generationConfig"];
        assert_eq!(
            (c["maxOutputTokens"].as_u64(), c["temperature"].as_f64()),
            (Some(100), Some(0.2))
        );
        assert_eq!(c["stopSequences"], json!(["END"]));
        assert_eq!(c["responseMimeType"], "application/json");
        assert_eq!(
            c["responseSchema"],
            json!({"type": "object", "properties": {"a": {"type": "integer"}}})
        );
        assert!(
            request(
                json!({"messages": [{"role": "robot"}]})
                    .as_object()
                    .unwrap()
            )
            .is_err()
        );
        assert!(request(json!({}).as_object().unwrap()).is_err());
        // Odd shapes are read, never a panic: no response_format, a tool_choice object
        // without `function`, non-string contents.
        let odd = json!({"messages": [{"role": "user", "content": 5}], "tool_choice": {"type": "x"},
                         "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": 3});
        assert!(request(odd.as_object().unwrap()).is_ok());
    }

    #[test]
    fn a_stream_comes_back_as_chat_completion_chunks() {
        let mut t = ChunkTranslator::new("gemini-2.5-flash", 1);
        let a = String::from_utf8(t.chunk(&json!({"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}}], "modelVersion": "gemini-2.5-flash"}))).unwrap();
        assert!(a.starts_with("data: {") && a.ends_with("\n\n"));
        let a: Value = serde_json::from_str(a.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(a["object"], "chat.completion.chunk");
        assert_eq!(
            a["choices"][0]["delta"],
            json!({"role": "assistant", "content": "Hel"})
        );
        let b = String::from_utf8(t.chunk(&json!({"candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}))).unwrap();
        let b: Value = serde_json::from_str(b.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(b["choices"][0]["delta"], json!({"content": "lo"}));
        assert_eq!(b["choices"][0]["finish_reason"], "stop");
        assert_eq!(t.usage().unwrap()["total_tokens"], 7);
        let end = String::from_utf8(t.finish(true)).unwrap();
        assert!(
            end.contains("\"choices\":[]")
                && end.contains("\"total_tokens\":7")
                && end.ends_with("data: [DONE]\n\n")
        );
        assert_eq!(
            String::from_utf8(t.finish(false)).unwrap(),
            "data: [DONE]\n\n"
        );
        assert!(
            t.chunk(&json!({"candidates": [{"content": {"parts": []}}]}))
                .is_empty()
        );
    }

    #[test]
    fn an_answer_comes_back_in_openai_s_shape() {
        let g: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/providers/gemini_success.json"
        ))
        .unwrap();
        let o = response(&g, "gemini-2.5-flash", 1);
        assert_eq!(o["object"], "chat.completion");
        assert_eq!(o["model"], "gemini-2.5-flash");
        assert_eq!(o["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            o["choices"][0]["message"]["content"],
            "{\"category\": \"billing\", \"confidence\": 0.9}"
        );
        assert_eq!(o["usage"]["prompt_tokens"], 2048);
        assert_eq!(o["usage"]["completion_tokens"], 36 + 384);
        assert_eq!(o["usage"]["total_tokens"], 2468);
        assert_eq!(o["usage"]["prompt_tokens_details"]["cached_tokens"], 1536);
        assert_eq!(
            o["usage"]["completion_tokens_details"]["reasoning_tokens"],
            384
        );
        let call = json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"x": 1}}}]}, "finishReason": "STOP"}]});
        let o = response(&call, "gemini-2.5-pro", 1);
        assert_eq!(o["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(o["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(
            o["choices"][0]["message"]["tool_calls"][0]["function"],
            json!({"name": "f", "arguments": "{\"x\":1}"})
        );
        let cut = json!({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "MAX_TOKENS"}]});
        assert_eq!(
            response(&cut, "m", 1)["choices"][0]["finish_reason"],
            "length"
        );
    }
}
