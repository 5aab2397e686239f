//! llm-tracker: puts every LLM call a backend makes on record and serves that record to
//! administrators, compatible with the Django `llm_tracker` app's tables and JSON.

pub mod api_keys;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pricing;
pub mod providers;
pub mod redact;
pub mod retention;
pub mod server;
pub mod telemetry;
pub mod tracker;
pub mod usage;
pub mod users;

pub use config::Settings;
pub use providers::{
    ChatRequest, ChatResponse, Message, Provider, ProviderError, ProviderErrorKind, Role, Usage,
    llm_service,
};
pub use tracker::{
    CallRequest, CallState, LlmTracker, StreamHandle, StreamRecord, TrackedCall, TrackedStream,
    TrackerError,
};
