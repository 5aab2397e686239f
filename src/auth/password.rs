//! Django's `pbkdf2_sha256$<iterations>$<salt>$<base64 hash>` password format.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::num::NonZeroU32;

use rand::Rng;
use rand::distr::Alphanumeric;
use ring::pbkdf2::{PBKDF2_HMAC_SHA256, derive as pbkdf2_derive, verify as pbkdf2_verify};

/// Django 5.2's default iteration count for `PBKDF2PasswordHasher`.
pub const DJANGO_ITERATIONS: u32 = 1_000_000;
const ALGORITHM: &str = "pbkdf2_sha256";
/// Django refuses to verify hashes claiming absurd work factors; so do we (denial of service).
const MAX_ITERATIONS: u32 = 10_000_000;

/// Hashes `password` with a fresh random salt, as Django's `make_password` does.
pub fn make_password(password: &str) -> String {
    make_password_with(password, &random_salt(), DJANGO_ITERATIONS)
}

/// Hashes with a given salt and iteration count (Django's `PBKDF2PasswordHasher.encode`).
pub fn make_password_with(password: &str, salt: &str, iterations: u32) -> String {
    let hash = derive(password, salt, iterations);
    format!("{ALGORITHM}${iterations}${salt}${}", STANDARD.encode(hash))
}

/// An unusable password, as Django's `set_unusable_password` stores it.
pub fn make_unusable_password() -> String {
    let suffix: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("!{suffix}")
}

/// True when `password` matches `encoded`. Unusable (`!…`) or malformed hashes never match.
/// The final comparison is constant-time.
pub fn check_password(password: &str, encoded: &str) -> bool {
    let mut parts = encoded.splitn(4, '$');
    let (Some(algorithm), Some(iterations), Some(salt), Some(expected)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if algorithm != ALGORITHM || salt.is_empty() || salt.contains('$') {
        return false;
    }
    let Ok(iterations) = iterations.parse::<u32>() else {
        return false;
    };
    let Some(iterations) = NonZeroU32::new(iterations).filter(|n| n.get() <= MAX_ITERATIONS) else {
        return false;
    };
    let Ok(expected) = STANDARD.decode(expected) else {
        return false;
    };
    // ring compares in constant time.
    pbkdf2_verify(
        PBKDF2_HMAC_SHA256,
        iterations,
        salt.as_bytes(),
        password.as_bytes(),
        &expected,
    )
    .is_ok()
}

fn derive(password: &str, salt: &str, iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    pbkdf2_derive(
        PBKDF2_HMAC_SHA256,
        iterations,
        salt.as_bytes(),
        password.as_bytes(),
        &mut out,
    );
    out
}

/// 22 alphanumeric characters, the length Django's `get_random_string` salt uses (~128 bits).
fn random_salt() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(22)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_hash_has_djangos_shape_and_verifies() {
        let encoded = make_password_with("pw", "abc", 1000);
        let parts: Vec<&str> = encoded.split('$').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "pbkdf2_sha256");
        assert_eq!(parts[1], "1000");
        assert_eq!(parts[2], "abc");
        assert!(check_password("pw", &encoded));
        assert!(!check_password("pW", &encoded));
    }

    #[test]
    fn malformed_hashes_never_verify() {
        for bad in [
            "",
            "pbkdf2_sha256",
            "pbkdf2_sha256$x$salt$AAAA",
            "pbkdf2_sha256$0$salt$AAAA",
            "pbkdf2_sha256$99999999999$salt$AAAA",
            "argon2$1000$salt$AAAA",
            "pbkdf2_sha256$1000$$AAAA",
            "pbkdf2_sha256$1000$salt$not base64!",
            "!unusable",
        ] {
            assert!(!check_password("pw", bad), "{bad:?} verified");
        }
        assert!(make_unusable_password().starts_with('!'));
    }
}
