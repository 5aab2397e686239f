//! The README's streaming example: one streamed, tracked call with the provider configured in
//! the environment (`LLM_PROVIDER`, its key, `DATABASE_URL`).
//!
//! `cargo run --example stream -- "Tell me a short story"`

use std::io::Write;

use futures_util::StreamExt;
use llm_tracker::{CallRequest, LlmTracker, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello".into());
    let tracker = LlmTracker::from_env().await?;
    let request = CallRequest::new(vec![Message::user(prompt)]).node_name("story");

    // The deltas as they arrive; the call is driven (and recorded) by a task of its own.
    let (mut deltas, handle) = tracker.call_and_track_stream(request)?;
    while let Some(delta) = deltas.next().await {
        match delta {
            Ok(text) => {
                print!("{text}");
                std::io::stdout().flush()?;
            }
            Err(e) => eprintln!("\nprovider error: {e}"),
        }
        // Breaking out here (dropping `deltas`) ends the call: its row is still written, as
        // a failure with `metadata.usage_incomplete: true`.
    }
    // Resolves once the one row of this call is written.
    let record = handle.await?;
    println!(
        "\n{} tokens (complete usage: {}), row {}",
        record.usage.total_tokens, record.usage_complete, record.row_id
    );
    if let Err(e) = record.result {
        eprintln!("recorded as a failure: {e}");
    }
    tracker.shutdown().await;
    Ok(())
}
