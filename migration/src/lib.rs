//! Schema migrations for llm-tracker.
//!
//! Every statement is idempotent (`IF NOT EXISTS`) and uses the exact table, column and index
//! names of the Django app, so running these over a database the Django app created changes
//! nothing that is already there and only adds what is missing.

pub use sea_orm_migration::prelude::*;

mod m20250101_000001_create_auth_user;
mod m20250101_000002_create_llm_tracker_usage;
mod m20250301_000003_add_usage_started_at;
mod m20251101_000004_add_usage_cost;
mod m20251201_000005_add_usage_rollup;
pub mod m20251215_000006_rollup_delta;
mod m20261123_000007_rollup_phased_hours;
mod m20261126_000008_delta_autovacuum;
mod m20261126_000009_analyze_usage_tables;
mod m20261126_000010_create_admin_session;
pub mod m20261126_000011_rollup_per_user_days;
mod m20261127_000012_sqlite_django_formats;
mod m20261128_000013_rollup_read_indexes;
pub mod m20261128_000014_create_api_key;
pub mod m20261129_000015_rollup_summed_delta;
pub mod m20261129_000016_usage_streaming_ttft;
pub mod m20261129_000017_rollup_one_row_statements;
pub mod m20261130_000018_usage_retention;
pub mod m20261130_000019_failed_calls_index;
pub mod m20261201_000020_latency_histograms;
pub mod m20261202_000021_rollup_user_model_months;
pub mod m20261202_000022_rollup_all_users_months;
pub mod m20261203_000023_user_latency_histograms;
pub mod m20261204_000024_negative_tokens_index;
pub mod m20261205_000025_rollup_dense_user_hours;
pub mod m20261206_000026_rollup_month_top_index;
pub mod m20261207_000027_usage_no_user_index;
pub mod m20261208_000028_rollup_year_top_index;
pub mod m20261209_000029_rollup_full_months;
pub mod m20261210_000030_rollup_full_months_by_model;
pub mod m20261211_000031_rollup_light_days;
pub mod m20261212_000032_rollup_light_years;
pub mod m20261213_000033_usage_user_rows_cover;
pub mod m20261214_000034_usage_no_user_rows_cover;
pub mod m20261215_000035_rollup_dense_model_days;
pub mod rollup;

/// Refreshes the planner statistics of the usage and rollup tables (PostgreSQL; nothing on
/// SQLite), as migration 000009 does: after bulk writes such as a backfill or a seeding.
pub async fn analyze_usage_tables(
    db: &impl sea_orm_migration::sea_orm::ConnectionTrait,
) -> Result<(), DbErr> {
    if db.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::Postgres {
        db.execute_unprepared(m20261126_000009_analyze_usage_tables::ANALYZE)
            .await?;
    }
    Ok(())
}
mod util;

/// All migrations, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20250101_000001_create_auth_user::Migration),
            Box::new(m20250101_000002_create_llm_tracker_usage::Migration),
            Box::new(m20250301_000003_add_usage_started_at::Migration),
            Box::new(m20251101_000004_add_usage_cost::Migration),
            Box::new(m20251201_000005_add_usage_rollup::Migration),
            Box::new(m20251215_000006_rollup_delta::Migration),
            Box::new(m20261123_000007_rollup_phased_hours::Migration),
            Box::new(m20261126_000008_delta_autovacuum::Migration),
            Box::new(m20261126_000009_analyze_usage_tables::Migration),
            Box::new(m20261126_000010_create_admin_session::Migration),
            Box::new(m20261126_000011_rollup_per_user_days::Migration),
            Box::new(m20261127_000012_sqlite_django_formats::Migration),
            Box::new(m20261128_000013_rollup_read_indexes::Migration),
            Box::new(m20261128_000014_create_api_key::Migration),
            Box::new(m20261129_000015_rollup_summed_delta::Migration),
            Box::new(m20261129_000016_usage_streaming_ttft::Migration),
            Box::new(m20261129_000017_rollup_one_row_statements::Migration),
            Box::new(m20261130_000018_usage_retention::Migration),
            Box::new(m20261130_000019_failed_calls_index::Migration),
            Box::new(m20261201_000020_latency_histograms::Migration),
            Box::new(m20261202_000021_rollup_user_model_months::Migration),
            Box::new(m20261202_000022_rollup_all_users_months::Migration),
            Box::new(m20261203_000023_user_latency_histograms::Migration),
            Box::new(m20261204_000024_negative_tokens_index::Migration),
            Box::new(m20261205_000025_rollup_dense_user_hours::Migration),
            Box::new(m20261206_000026_rollup_month_top_index::Migration),
            Box::new(m20261207_000027_usage_no_user_index::Migration),
            Box::new(m20261208_000028_rollup_year_top_index::Migration),
            Box::new(m20261209_000029_rollup_full_months::Migration),
            Box::new(m20261210_000030_rollup_full_months_by_model::Migration),
            Box::new(m20261211_000031_rollup_light_days::Migration),
            Box::new(m20261212_000032_rollup_light_years::Migration),
            Box::new(m20261213_000033_usage_user_rows_cover::Migration),
            Box::new(m20261214_000034_usage_no_user_rows_cover::Migration),
            Box::new(m20261215_000035_rollup_dense_model_days::Migration),
        ]
    }
}
