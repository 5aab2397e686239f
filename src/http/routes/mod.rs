//! Route handlers, one module per area.

pub mod admin;
pub mod api_keys;
pub mod gateway;
pub mod health;
pub mod ingest;
pub mod metrics;
