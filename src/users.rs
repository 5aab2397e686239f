//! Creating and looking up Django users (`auth_user`).

use chrono::{SubsecRound, Utc};
use sea_orm::ConnectionTrait;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, Set,
    SqlErr, TransactionTrait,
};

use crate::auth::password;
use crate::db::entities::auth_user;

/// What `create_user` needs.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub username: String,
    /// `None` stores an unusable password, as Django's `create_user(password=None)`.
    pub password: Option<String>,
    pub is_staff: bool,
    pub is_superuser: bool,
}

/// Why a user could not be created or found.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid username {0:?}: use 1 to 150 letters, digits and @ . + - _")]
    InvalidUsername(String),
    #[error("the password must not be empty")]
    EmptyPassword,
    #[error("a user named {0:?} already exists")]
    Duplicate(String),
    #[error("no user named {0:?}")]
    NotFound(String),
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// Django's `UnicodeUsernameValidator`: `^[\w.@+-]+\Z`, at most 150 characters.
pub fn is_valid_username(username: &str) -> bool {
    let count = username.chars().count();
    (1..=150).contains(&count)
        && username
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '@' | '+' | '-'))
}

/// Creates a user, refusing a duplicate username; writes nothing on any error.
pub async fn create_user(
    db: &DatabaseConnection,
    new: NewUser,
) -> Result<auth_user::Model, UserError> {
    if !is_valid_username(&new.username) {
        return Err(UserError::InvalidUsername(new.username));
    }
    let hash = match new.password.as_deref() {
        Some("") => return Err(UserError::EmptyPassword),
        Some(pw) => password::make_password(pw),
        None => password::make_unusable_password(),
    };
    let joined = Utc::now().trunc_subsecs(6);
    let txn = db.begin().await?;
    if find_by_username(&txn, &new.username).await?.is_some() {
        return Err(UserError::Duplicate(new.username));
    }
    let user = auth_user::ActiveModel {
        password: Set(hash),
        last_login: Set(None),
        is_superuser: Set(new.is_superuser),
        username: Set(new.username.clone()),
        first_name: Set(String::new()),
        last_name: Set(String::new()),
        email: Set(String::new()),
        is_staff: Set(new.is_staff),
        is_active: Set(true),
        date_joined: Set(joined),
        ..Default::default()
    };
    let inserted = match user.insert(&txn).await {
        Ok(model) => model,
        // A concurrent insert of the same name lost the race to the unique constraint.
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            return Err(UserError::Duplicate(new.username));
        }
        Err(e) => return Err(e.into()),
    };
    if crate::db::Dialect::of(txn.get_database_backend()) == crate::db::Dialect::Sqlite {
        // On SQLite in Django's text form (crate::db::Dialect), which the insert above cannot
        // bind: the same instant, rewritten before anyone else sees the row.
        let fix = sea_orm::sea_query::Query::update()
            .table(auth_user::Entity)
            .value(
                auth_user::Column::DateJoined,
                crate::db::Dialect::of(txn.get_database_backend()).datetime(joined),
            )
            .and_where(sea_orm::ColumnTrait::eq(
                &auth_user::Column::Id,
                inserted.id,
            ))
            .to_owned();
        txn.execute(&fix).await?;
    }
    txn.commit().await?;
    Ok(inserted)
}

/// The user with this username, if any.
pub async fn find_by_username<C: sea_orm::ConnectionTrait>(
    db: &C,
    username: &str,
) -> Result<Option<auth_user::Model>, DbErr> {
    auth_user::Entity::find()
        .filter(auth_user::Column::Username.eq(username))
        .one(db)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_follow_djangos_validator() {
        for ok in ["admin", "a.b@c+d-e_f", "ünïcode", &"x".repeat(150)] {
            assert!(is_valid_username(ok), "{ok:?} refused");
        }
        for bad in ["", "with space", "semi;colon", "slash/", &"x".repeat(151)] {
            assert!(!is_valid_username(bad), "{bad:?} accepted");
        }
    }
}
