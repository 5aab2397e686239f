//! The `llm_tracker_usage` table: one row per LLM call.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Serializable so that a row can wait in the spool file while the database is away.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "llm_tracker_usage")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Option<i32>,
    pub model: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub total_tokens: i32,
    pub cached_tokens: i32,
    pub reasoning_tokens: i32,
    pub success: bool,
    pub error: Option<String>,
    pub metadata: Json,
    pub created_at: DateTimeUtc,
    /// When the request started; null on rows written by the Django app.
    pub started_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::auth_user::Entity",
        from = "Column::UserId",
        to = "super::auth_user::Column::Id",
        on_delete = "SetNull"
    )]
    User,
}

impl Related<super::auth_user::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
