//! HS256 access tokens with the claims djangorestframework-simplejwt uses, so that tokens
//! minted here work in Django and tokens minted by Django work here.

use std::time::Duration;

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The claims of a simplejwt access token. simplejwt 5.5 writes `user_id` as a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub token_type: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub user_id: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Token is expired")]
    Expired,
    #[error("Token is invalid")]
    Invalid,
    #[error("Token has wrong type")]
    WrongType,
    #[error("Token contained no recognizable user identification")]
    NoUserId,
}

/// The longest lifetime `llm-tracker token` will mint.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Mints an access token for `user_id` valid for `ttl`.
pub fn mint_access_token(secret: &str, user_id: i32, ttl: Duration) -> String {
    let now = Utc::now().timestamp();
    let claims = AccessClaims {
        token_type: "access".into(),
        exp: now + ttl.as_secs() as i64,
        iat: now,
        jti: uuid::Uuid::new_v4().simple().to_string(),
        user_id: user_id.to_string(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    // Encoding a fixed claim struct with an HMAC key has no failure mode.
    .unwrap_or_default()
}

/// Validates an HS256 access token (algorithm pinned, `exp` required and checked, `nbf`
/// checked when present as simplejwt/PyJWT do, no leeway) and returns the user id it names:
/// `user_id` (number or numeric string), else `sub`.
pub fn decode_access_token(secret: &str, token: &str) -> Result<i32, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
        _ => TokenError::Invalid,
    })?;
    let claims = data.claims;
    match claims.get("token_type") {
        None => {}
        Some(Value::String(t)) if t == "access" => {}
        Some(_) => return Err(TokenError::WrongType),
    }
    let id = claims
        .get("user_id")
        .or_else(|| claims.get("sub"))
        .ok_or(TokenError::NoUserId)?;
    match id {
        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Value::String(s) => s.trim().parse::<i32>().ok(),
        _ => None,
    }
    .ok_or(TokenError::NoUserId)
}

/// Parses a lifetime such as `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid TTL {raw:?}: expected e.g. 30m, 1h, 7d"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid TTL {raw:?}: unit must be s, m, h or d")),
    };
    let secs = number
        .checked_mul(unit_secs)
        .filter(|s| *s > 0 && *s <= MAX_TTL.as_secs())
        .ok_or_else(|| format!("invalid TTL {raw:?}: must be between 1s and 366d"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "unit-test-signing-key-0123456789";

    #[test]
    fn minted_tokens_decode_to_their_user() {
        let token = mint_access_token(KEY, 42, Duration::from_secs(60));
        assert_eq!(decode_access_token(KEY, &token), Ok(42));
        assert_eq!(
            decode_access_token("another-key-0123456789", &token),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn ttl_parsing_accepts_units_and_refuses_nonsense() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "0",
            "1y",
            "h",
            "-1h",
            "1.5h",
            "400d",
            "99999999999999999999",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} accepted");
        }
    }
}
