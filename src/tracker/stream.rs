//! `call_and_track_stream`: a streamed call that is always recorded, exactly once.
//!
//! The call is driven by a task of its own, not by the caller's polling: it reads the
//! provider's stream, hands each text delta to the caller's [`TrackedStream`] and, however the
//! stream ends — complete, provider error, timeout, or the caller dropping the stream (or the
//! whole future holding it) — writes the one row through the same store as every other call
//! (commit or spool), then resolves the [`StreamHandle`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{CallRequest, LlmTracker, Outcome, Shared, Stored, TrackerError, now_micros};
use crate::providers::{ChatRequest, ProviderError, StreamEvent, Usage};

/// The text deltas of a streamed call, as they arrive. A provider error is the last item.
/// Dropping it before the end stops the call; its row is still written (a failure).
pub struct TrackedStream {
    rx: mpsc::Receiver<Result<String, ProviderError>>,
}

impl Stream for TrackedStream {
    type Item = Result<String, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// What a streamed call recorded.
#[derive(Debug)]
pub struct StreamRecord {
    /// The row's id.
    pub row_id: Uuid,
    /// Where the row went (committed, queued, or spooled).
    pub stored: Stored,
    /// The usage recorded: the provider's final usage, or what it had reported so far.
    pub usage: Usage,
    /// False when the final usage never arrived (`metadata.usage_incomplete` in the row).
    pub usage_complete: bool,
    /// The whole reply text, or why the call failed.
    pub result: Result<String, TrackerError>,
}

/// Resolves once the streamed call's row is written. Dropping it changes nothing.
pub struct StreamHandle {
    row_id: Uuid,
    rx: oneshot::Receiver<StreamRecord>,
}

impl StreamHandle {
    /// The id the call's row has (known before the call starts).
    pub fn row_id(&self) -> Uuid {
        self.row_id
    }
}

impl Future for StreamHandle {
    type Output = Result<StreamRecord, TrackerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.map_err(|_| {
                TrackerError::StreamInterrupted(
                    "the task driving the stream ended without recording it (runtime shut down?)"
                        .into(),
                )
            })
        })
    }
}

/// Why a stream did not complete.
enum Failure {
    Provider(ProviderError),
    Dropped,
    Truncated,
    ShutDown,
}

/// What the stream delivered so far.
#[derive(Default)]
struct Seen {
    content: String,
    /// When the first text delta arrived (the row's `first_chunk_at`).
    first_chunk_at: Option<chrono::DateTime<chrono::Utc>>,
    model: Option<String>,
    usage: Option<Usage>,
    done: bool,
    attempts: u32,
}

/// Deltas waiting for the caller, at most: beyond, the provider is read no faster than the
/// caller reads (and a caller that stops reading is noticed when it drops the stream).
const BUFFER: usize = 16;

impl LlmTracker {
    /// Sends the chat request asking for a streamed reply; returns the text deltas as they
    /// arrive and a handle resolving to the row id and usage once the row is written.
    ///
    /// Same parameters and row rules as [`LlmTracker::call_and_track`], with exactly one row
    /// per stream whatever happens: success with the provider's usage when the stream
    /// completes; otherwise (the stream dropped early, a provider error mid-stream, the
    /// timeout) a failure row whose `error` says which, with the usage reported so far and
    /// `metadata.usage_incomplete: true` when the final usage never arrived. Must be called
    /// inside a Tokio runtime; empty `messages` is refused at once, without a row.
    pub fn call_and_track_stream(
        &self,
        request: CallRequest,
    ) -> Result<(TrackedStream, StreamHandle), TrackerError> {
        if request.messages.is_empty() {
            return Err(TrackerError::EmptyMessages);
        }
        let row_id = Uuid::new_v4();
        // Counted before the task starts, so a shutdown right after this call waits for it.
        self.shared.streams.send_modify(|n| *n += 1);
        let (tx, rx) = mpsc::channel(BUFFER);
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(drive(self.shared.clone(), request, row_id, tx, done_tx));
        Ok((
            TrackedStream { rx },
            StreamHandle {
                row_id,
                rx: done_rx,
            },
        ))
    }
}

async fn drive(
    shared: Arc<Shared>,
    request: CallRequest,
    row_id: Uuid,
    tx: mpsc::Sender<Result<String, ProviderError>>,
    done: oneshot::Sender<StreamRecord>,
) {
    let started_at = now_micros();
    let chat = request.chat_request();
    let mut seen = Seen {
        attempts: 1,
        ..Default::default()
    };
    let ended = read(&shared, chat, &tx, &mut seen).await;
    drop(tx);

    let fallback_model = shared.fallback_model(&request);
    let usage_complete = seen.done && seen.usage.is_some();
    let usage = seen.usage.clone().unwrap_or_else(|| Usage {
        model: seen.model.clone().unwrap_or_default(),
        ..Default::default()
    });
    let result = match ended {
        Ok(()) if seen.content.is_empty() => Err(TrackerError::EmptyResponse {
            usage: usage.clone(),
        }),
        Ok(()) => Ok(std::mem::take(&mut seen.content)),
        Err(Failure::Provider(e)) => Err(TrackerError::Provider(e)),
        Err(Failure::Dropped) => Err(TrackerError::StreamInterrupted(
            "stream dropped by the consumer before the reply ended".into(),
        )),
        Err(Failure::Truncated) => Err(TrackerError::StreamInterrupted(
            "the provider closed the stream before the reply ended".into(),
        )),
        Err(Failure::ShutDown) => Err(TrackerError::StreamInterrupted(
            "the tracker shut down before the reply ended".into(),
        )),
    };
    let mut extra = Map::new();
    extra.insert("stream".into(), Value::Bool(true));
    if !usage_complete {
        extra.insert("usage_incomplete".into(), json!(true));
    }
    let outcome = Outcome {
        usage: usage.clone(),
        attempts: seen.attempts,
        error: result.as_ref().err().map(|e| match e {
            TrackerError::Provider(p) => p.message.clone(),
            other => other.to_string(),
        }),
        extra,
    };
    let mut row = shared.build_row(row_id, started_at, &request, fallback_model, outcome);
    row.is_streaming = true;
    // Never after the row's end, whatever the wall clock did meanwhile.
    row.first_chunk_at = seen.first_chunk_at.map(|t| t.min(row.created_at));
    let stored = shared.store.record(row).await;
    shared.streams.send_modify(|n| *n = n.saturating_sub(1));
    let _ = done.send(StreamRecord {
        row_id,
        stored,
        usage,
        usage_complete,
        result,
    });
}

/// Reads the provider's stream into `seen`, forwarding deltas, until it ends or fails.
async fn read(
    shared: &Shared,
    chat: ChatRequest,
    tx: &mpsc::Sender<Result<String, ProviderError>>,
    seen: &mut Seen,
) -> Result<(), Failure> {
    let mut closing = shared.closing.subscribe();
    let opened = tokio::select! {
        opened = shared.provider.chat_stream(chat) => opened,
        _ = tx.closed() => return Err(Failure::Dropped),
        _ = closing.wait_for(|c| *c) => return Err(Failure::ShutDown),
    };
    let mut events = match opened {
        Ok(o) => {
            seen.attempts = o.attempts;
            o.events
        }
        Err(e) => {
            seen.attempts = e.attempts;
            offer(tx, &mut closing, Err(e.clone())).await;
            return Err(Failure::Provider(e));
        }
    };
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            // After the provider said it was done, only the end of its body is missing.
            _ = tx.closed() => return if seen.done { Ok(()) } else { Err(Failure::Dropped) },
            _ = closing.wait_for(|c| *c) => {
                return if seen.done { Ok(()) } else { Err(Failure::ShutDown) };
            }
        };
        match next {
            None if seen.done => return Ok(()),
            None => return Err(Failure::Truncated),
            Some(Err(e)) => {
                offer(tx, &mut closing, Err(e.clone())).await;
                return Err(Failure::Provider(e));
            }
            Some(Ok(StreamEvent::Delta(text))) => {
                if seen.first_chunk_at.is_none() && !text.is_empty() {
                    seen.first_chunk_at = Some(super::now_micros());
                }
                seen.content.push_str(&text);
                // A consumer that stops reading holds the call here, until it reads, drops
                // the stream, or the tracker shuts down.
                tokio::select! {
                    sent = tx.send(Ok(text)) => if sent.is_err() {
                        return Err(Failure::Dropped);
                    },
                    _ = closing.wait_for(|c| *c) => return Err(Failure::ShutDown),
                }
            }
            Some(Ok(StreamEvent::Model(model))) => seen.model = Some(model),
            Some(Ok(StreamEvent::Usage(usage))) => seen.usage = Some(usage),
            Some(Ok(StreamEvent::Done)) => seen.done = true,
        }
    }
}

/// Hands the consumer its last item unless it has dropped the stream or the tracker shuts down.
async fn offer(
    tx: &mpsc::Sender<Result<String, ProviderError>>,
    closing: &mut tokio::sync::watch::Receiver<bool>,
    item: Result<String, ProviderError>,
) {
    tokio::select! {
        _ = tx.send(item) => {}
        _ = closing.wait_for(|c| *c) => {}
    }
}
