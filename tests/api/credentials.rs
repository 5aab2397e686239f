//! Django password hashes and simplejwt tokens (fixtures from Django itself).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use llm_tracker::auth::jwt::{TokenError, decode_access_token, mint_access_token};
use llm_tracker::auth::password::{
    DJANGO_ITERATIONS, check_password, make_password, make_password_with,
};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::fixture;

#[test]
fn django_password_fixtures_verify_exactly_as_django_says() {
    let doc: Value = serde_json::from_str(&fixture("django/password_hashes.json")).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 5);
    for v in vectors {
        let (password, encoded) = (
            v["password"].as_str().unwrap(),
            v["encoded"].as_str().unwrap(),
        );
        assert_eq!(
            check_password(password, encoded),
            v["must_verify"].as_bool().unwrap(),
            "{password:?} against {encoded}"
        );
    }
}

/// PBKDF2-HMAC-SHA256 for one 32-byte block, written out from RFC 8018 independently of the
/// crate the product uses: what Django's `hashlib.pbkdf2_hmac` computes.
fn reference_pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mac = |data: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(password).unwrap();
        m.update(data);
        m.finalize().into_bytes().to_vec()
    };
    let mut u = mac(&[salt, &1u32.to_be_bytes()].concat());
    let mut t = u.clone();
    for _ in 1..iterations {
        u = mac(&u);
        t.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
    }
    t
}

#[test]
fn hashes_we_make_verify_with_djangos_algorithm() {
    let encoded = make_password("密码 with spaces");
    let parts: Vec<&str> = encoded.split('$').collect();
    assert_eq!(parts.len(), 4, "{encoded}");
    assert_eq!(parts[0], "pbkdf2_sha256");
    assert_eq!(parts[1], DJANGO_ITERATIONS.to_string());
    assert_eq!(parts[2].len(), 22);
    assert!(parts[2].chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(check_password("密码 with spaces", &encoded));
    // The independent reference is unoptimised test code: compare at fewer rounds, same formula.
    let rounds = 20_000;
    let ours = make_password_with("密码 with spaces", parts[2], rounds);
    let expected = reference_pbkdf2("密码 with spaces".as_bytes(), parts[2].as_bytes(), rounds);
    assert_eq!(
        ours,
        format!(
            "pbkdf2_sha256${rounds}${}${}",
            parts[2],
            STANDARD.encode(expected)
        )
    );
    assert!(encoded.len() <= 128, "fits auth_user.password varchar(128)");
}

fn simplejwt() -> Value {
    serde_json::from_str(&fixture("django/simplejwt_tokens.json")).unwrap()
}

#[test]
fn simplejwt_tokens_are_accepted_or_refused_as_django_would() {
    let doc = simplejwt();
    let key = doc["signing_key"].as_str().unwrap();
    let token = |name: &str| doc["tokens"][name]["token"].as_str().unwrap().to_owned();
    assert_eq!(decode_access_token(key, &token("staff_access")), Ok(1));
    assert_eq!(decode_access_token(key, &token("non_staff_access")), Ok(2));
    assert_eq!(
        decode_access_token(key, &token("staff_refresh")),
        Err(TokenError::WrongType)
    );
    assert_eq!(
        decode_access_token(key, &token("staff_access_expired")),
        Err(TokenError::Expired)
    );
    assert_eq!(
        decode_access_token(key, &token("staff_access_wrong_key")),
        Err(TokenError::Invalid)
    );
}

#[test]
fn tokens_with_another_algorithm_or_none_are_refused() {
    let key = "llm-tracker-test-signing-key-0123456789";
    let claims = json!({"token_type": "access", "exp": 4_002_906_644_i64, "user_id": "1"});
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap();
    assert_eq!(decode_access_token(key, &hs512), Err(TokenError::Invalid));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    assert_eq!(decode_access_token(key, &none), Err(TokenError::Invalid));
    for garbage in ["", "abc", "a.b.c", "Bearer x"] {
        assert_eq!(decode_access_token(key, garbage), Err(TokenError::Invalid));
    }
    let sign = |c: Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    // `sub` is the fallback, numbers work, no `exp` or no user is refused.
    assert_eq!(
        decode_access_token(key, &sign(json!({"exp": 4_002_906_644_i64, "sub": "7"}))),
        Ok(7)
    );
    assert_eq!(
        decode_access_token(key, &sign(json!({"exp": 4_002_906_644_i64, "user_id": 8}))),
        Ok(8)
    );
    assert_eq!(
        decode_access_token(key, &sign(json!({"user_id": 8}))),
        Err(TokenError::Invalid)
    );
    assert_eq!(
        decode_access_token(key, &sign(json!({"exp": 4_002_906_644_i64}))),
        Err(TokenError::NoUserId)
    );
    assert_eq!(
        decode_access_token(
            key,
            &sign(json!({"exp": 4_002_906_644_i64, "user_id": "x"}))
        ),
        Err(TokenError::NoUserId)
    );
    // Issue 17, item 5: a token not valid yet (`nbf` in the future) is refused, as simplejwt
    // (PyJWT) refuses it; one whose `nbf` has passed is fine.
    let now = chrono::Utc::now().timestamp();
    assert_eq!(
        decode_access_token(
            key,
            &sign(json!({"exp": 4_002_906_644_i64, "nbf": now + 3600, "user_id": "9"}))
        ),
        Err(TokenError::Invalid)
    );
    assert_eq!(
        decode_access_token(
            key,
            &sign(json!({"exp": 4_002_906_644_i64, "nbf": now - 60, "user_id": "9"}))
        ),
        Ok(9)
    );
}

/// The claims of a token we mint, decoded by hand.
pub fn claims_of(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let decode =
        |p: &str| serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    (decode(parts[0]), decode(parts[1]))
}

/// Asserts the token carries exactly simplejwt's access-token claims.
pub fn assert_simplejwt_access_claims(token: &str, user_id: i32, ttl_secs: i64) {
    let (header, claims) = claims_of(token);
    assert_eq!(header["alg"], "HS256");
    let mut keys: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["exp", "iat", "jti", "token_type", "user_id"]);
    assert_eq!(claims["token_type"], "access");
    assert_eq!(
        claims["user_id"],
        user_id.to_string(),
        "simplejwt writes user_id as a string"
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        ttl_secs
    );
    let jti = claims["jti"].as_str().unwrap();
    assert!(
        jti.len() == 32 && jti.chars().all(|c| c.is_ascii_hexdigit()),
        "{jti}"
    );
}

#[test]
fn minted_tokens_carry_simplejwt_claims() {
    let token = mint_access_token("k-0123456789abcdef", 5, Duration::from_secs(3600));
    assert_simplejwt_access_claims(&token, 5, 3600);
}
