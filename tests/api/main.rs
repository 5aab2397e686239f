//! The one integration-test binary. Database tests run on SQLite and on PostgreSQL
//! (`<test>::sqlite`, `<test>::postgres`); see `helpers.rs`.

mod helpers;

mod admin_api;
mod admin_pages;
mod api_keys;
mod browser;
mod cli;
mod credentials;
mod django_compat;
mod gateway;
mod health;
mod http_shell;
mod ingest;
mod latency;
mod layout;
mod metrics;
mod migrations;
mod openapi;
mod resilience;
mod retention;
mod rollup;
mod sqlite_django;
mod streaming;
mod top_errors;
mod tracker;
mod usage_read;
