//! Django's `auth_user` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "auth_user")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub password: String,
    pub last_login: Option<DateTimeUtc>,
    pub is_superuser: bool,
    #[sea_orm(unique)]
    pub username: String,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub is_staff: bool,
    pub is_active: bool,
    pub date_joined: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::usage::Entity")]
    Usage,
}

impl Related<super::usage::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Usage.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
