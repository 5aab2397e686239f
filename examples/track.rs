//! The README's library example: one tracked call with the provider configured in the
//! environment (`LLM_PROVIDER`, its key, `DATABASE_URL`).
//!
//! `cargo run --example track -- "Say hello"`

use llm_tracker::{CallRequest, CallState, LlmTracker, Message, ProviderErrorKind, TrackerError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "你好".into());
    // Connects, migrates, builds the provider, replays rows an earlier run had to spool.
    let tracker = LlmTracker::from_env().await?;

    let request = CallRequest::new(vec![
        Message::system("Answer briefly."),
        Message::user(prompt),
    ])
    .node_name("interpret")
    .state(CallState {
        user_id: None, // Some(auth_user.id) of the end user the call is made for
        source_type: Some("task".into()),
        source_task_id: Some("celery-uuid".into()),
        ..Default::default()
    });

    match tracker.call_and_track(request).await {
        Ok((content, usage)) => {
            println!("{content}");
            println!(
                "{} prompt ({} cached) + {} completion ({} reasoning) tokens on {}",
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens,
                usage.reasoning_tokens,
                usage.model
            );
        }
        // Each of these has been recorded as a failure row already.
        Err(TrackerError::EmptyResponse { usage }) => eprintln!(
            "blocked or empty reply ({} prompt tokens)",
            usage.prompt_tokens
        ),
        Err(TrackerError::Provider(e)) if e.kind == ProviderErrorKind::RateLimited => {
            eprintln!("rate limited after {} attempts: {e}", e.attempts)
        }
        Err(TrackerError::Provider(e)) => eprintln!("provider error ({:?}): {e}", e.kind),
        // No call was made, nothing recorded.
        Err(e @ TrackerError::EmptyMessages) => eprintln!("{e}"),
        Err(e) => eprintln!("{e}"),
    }
    // Stores anything still pending; what the database refuses stays in the spool file.
    tracker.shutdown().await;
    Ok(())
}
