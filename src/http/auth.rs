//! `AdminUser`: the extractor every admin route takes, so none can forget the check. It does
//! what Django REST framework's `IsAdminUser` with simplejwt does (SPEC §5).

use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use sea_orm::EntityTrait;

use crate::auth::jwt::{TokenError, decode_access_token};
use crate::db::entities::auth_user;
use crate::http::AppState;
use crate::http::error::ApiError;

/// An active staff user or superuser, authenticated by a Bearer JWT.
#[derive(Debug, Clone)]
pub struct AdminUser(pub auth_user::Model);

const NOT_PROVIDED: ApiError = ApiError::Unauthorized {
    detail: "Authentication credentials were not provided.",
    code: "not_authenticated",
};
const TOKEN_NOT_VALID: ApiError = ApiError::Unauthorized {
    detail: "Given token not valid for any token type",
    code: "token_not_valid",
};

impl FromRequest for AdminUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .map(|v| v.to_str().map(str::to_owned));
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let state = state.ok_or(ApiError::Internal)?;
            let header = match header {
                None => return Err(NOT_PROVIDED),
                Some(Err(_)) => return Err(TOKEN_NOT_VALID),
                Some(Ok(h)) => h,
            };
            let mut parts = header.split_whitespace();
            let token = match (parts.next(), parts.next(), parts.next()) {
                // As simplejwt: another scheme is "no credentials for us".
                (Some(scheme), _, _) if !scheme.eq_ignore_ascii_case("bearer") => {
                    return Err(NOT_PROVIDED);
                }
                (Some(_), Some(token), None) => token.to_owned(),
                _ => {
                    return Err(ApiError::Unauthorized {
                        detail: "Authorization header must contain two space-delimited values",
                        code: "bad_authorization_header",
                    });
                }
            };
            let Some(secret) = state.settings.jwt_secret.as_ref() else {
                tracing::error!("admin API called but JWT_SECRET is not set");
                return Err(ApiError::ServiceUnavailable);
            };
            let user_id = decode_access_token(secret.expose(), &token).map_err(|e| match e {
                TokenError::NoUserId => ApiError::Unauthorized {
                    detail: "Token contained no recognizable user identification",
                    code: "token_not_valid",
                },
                TokenError::Expired | TokenError::Invalid | TokenError::WrongType => {
                    TOKEN_NOT_VALID
                }
            })?;
            let user = auth_user::Entity::find_by_id(user_id)
                .one(&state.db)
                .await
                .map_err(ApiError::database)?
                .ok_or(ApiError::Unauthorized {
                    detail: "User not found",
                    code: "user_not_found",
                })?;
            if !user.is_active {
                return Err(ApiError::Unauthorized {
                    detail: "User is inactive",
                    code: "user_inactive",
                });
            }
            if !(user.is_staff || user.is_superuser) {
                return Err(ApiError::Forbidden);
            }
            Ok(AdminUser(user))
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), for the
/// routes that take API keys (the gateway, the ingest API).
pub fn bearer(req: &actix_web::HttpRequest) -> Option<&str> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Equal, compared in constant time (CSRF tokens, the metrics token).
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
