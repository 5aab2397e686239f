//! Streaming replies: provider-neutral events, a server-sent-events reader over a reqwest
//! response and the chunk reading every provider shares. Each provider parses its own chunks
//! (`openai::openai_events` for OpenAI and Azure, `gemini::gemini_events`) and hands its parser
//! to [`events`]; this module knows none of them.

use std::collections::VecDeque;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::{ProviderError, ProviderErrorKind, Usage};

/// One event of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A piece of the reply text.
    Delta(String),
    /// The model the provider says answers (before any usage arrives).
    Model(String),
    /// Usage as reported so far (Gemini reports it on every chunk, OpenAI on the last one).
    Usage(Usage),
    /// The provider said the reply is complete (OpenAI `[DONE]`; Gemini a `finishReason` or a
    /// blocked prompt). A stream that ends without it was cut short.
    Done,
}

/// The events of one streamed reply; it ends after the provider's last chunk, or with an error.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// An opened stream and how many HTTP attempts opening it took.
pub struct OpenedStream {
    pub events: EventStream,
    pub attempts: u32,
}

fn network(e: reqwest::Error) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Network,
        format!("connection error: {}", e.without_url()),
    )
}

/// The `data` of each server-sent event of `response` (multi-line data joined with `\n`;
/// comments, `event:`, `id:` and `retry:` lines ignored). A connection that breaks mid-stream
/// ends with a network error.
pub fn sse_data(
    response: reqwest::Response,
) -> impl Stream<Item = Result<String, ProviderError>> + Send {
    struct State {
        bytes: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
        buffer: Vec<u8>,
        data: Vec<String>,
        ready: VecDeque<String>,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(response.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
        buffer: Vec::new(),
        data: Vec::new(),
        ready: VecDeque::new(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            match s.bytes.next().await {
                Some(Ok(chunk)) => {
                    s.buffer.extend_from_slice(&chunk);
                    while let Some(pos) = s.buffer.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = s.buffer.drain(..=pos).collect();
                        let line = String::from_utf8_lossy(&line);
                        let line = line.trim_end_matches(['\n', '\r']);
                        if line.is_empty() {
                            if !s.data.is_empty() {
                                s.ready.push_back(s.data.join("\n"));
                                s.data.clear();
                            }
                        } else if let Some(rest) = line.strip_prefix("data:") {
                            s.data
                                .push(rest.strip_prefix(' ').unwrap_or(rest).to_owned());
                        }
                    }
                }
                Some(Err(e)) => {
                    s.done = true;
                    return Some((Err(network(e)), s));
                }
                None => {
                    s.done = true;
                    // A last event not followed by a blank line still counts.
                    let line = String::from_utf8_lossy(&s.buffer).trim().to_owned();
                    if let Some(rest) = line.strip_prefix("data:") {
                        s.data.push(rest.trim_start().to_owned());
                    }
                    if !s.data.is_empty() {
                        s.ready.push_back(s.data.join("\n"));
                        s.data.clear();
                    }
                }
            }
        }
    })
}

fn unreadable(e: &serde_json::Error) -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::InvalidResponse,
        format!("unreadable stream chunk: {e}"),
    )
}

/// An `error` object sent in the stream (OpenAI and Gemini both do so on failures after the
/// 200 status): a server error, so the row says what the provider said.
fn in_stream_error(chunk: &Value) -> Option<ProviderError> {
    let error = chunk.get("error")?;
    let message = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| error.to_string());
    Some(ProviderError::new(ProviderErrorKind::Server, message))
}

/// One chunk's JSON, unless it is unreadable or an in-stream error; with the model it names
/// (under `model_key`) as the first event.
pub(crate) fn read_chunk(
    data: &str,
    model_key: &str,
) -> Result<(Value, Vec<Result<StreamEvent, ProviderError>>), ProviderError> {
    let chunk: Value = serde_json::from_str(data).map_err(|e| unreadable(&e))?;
    if let Some(e) = in_stream_error(&chunk) {
        return Err(e);
    }
    let mut out = Vec::new();
    if let Some(model) = chunk[model_key].as_str().filter(|m| !m.is_empty()) {
        out.push(Ok(StreamEvent::Model(model.to_owned())));
    }
    Ok((chunk, out))
}

/// SSE data parsed by `parse` into events; OpenAI's `[DONE]` is [`StreamEvent::Done`].
pub fn events(
    response: reqwest::Response,
    fallback_model: String,
    parse: fn(&str, &str) -> Vec<Result<StreamEvent, ProviderError>>,
) -> EventStream {
    let stream = sse_data(response).flat_map(move |d| {
        let items = match d {
            Ok(data) if data.trim() == "[DONE]" => vec![Ok(StreamEvent::Done)],
            Ok(data) => parse(&data, &fallback_model),
            Err(e) => vec![Err(e)],
        };
        futures_util::stream::iter(items)
    });
    Box::pin(stream)
}
