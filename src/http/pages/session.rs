//! Signed session cookies, CSRF tokens and the sign-in rate limit of the admin pages.
//!
//! The session is a cookie holding `user id, expiry, CSRF token, password tag`, signed with
//! HMAC-SHA256 under a key derived from `JWT_SECRET`: nothing is stored on the server, any
//! instance behind a load balancer accepts it, and changing a user's password (the tag is an
//! HMAC of the stored hash, as Django's session auth hash) ends their sessions.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

/// The session cookie.
pub const SESSION_COOKIE: &str = "llmt_session";
/// The sign-in form's CSRF cookie (double submit: cookie and hidden field must match).
pub const CSRF_COOKIE: &str = "llmt_csrf";

/// The cookie that marks a browser where a user signed in before (a "device cookie"): sign-ins
/// carrying it for that username are not held by the username's failure limit.
pub const DEVICE_COOKIE: &str = "llmt_device";

/// How long a device cookie is honoured.
pub const DEVICE_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// What a valid session cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: i32,
    /// Unix seconds.
    pub expires: i64,
    /// The token every POST of this session must carry.
    pub csrf: String,
    /// HMAC tag of the user's password hash when the session began.
    pub password_tag: String,
}

/// Signs and checks sessions.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    /// A signer whose key is derived from `secret` (`JWT_SECRET`) for this purpose only.
    pub fn new(secret: &str) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let derived = hmac::sign(&root, b"llm-tracker admin session v1");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// A short tag of a password hash: sessions made before a password change stop matching.
    pub fn password_tag(&self, password_hash: &str) -> String {
        let tag = hmac::sign(&self.key, format!("password:{password_hash}").as_bytes());
        URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
    }

    /// The cookie value of `session`.
    pub fn encode(&self, session: &Session) -> String {
        let payload = format!(
            "{}|{}|{}|{}",
            session.user_id, session.expires, session.csrf, session.password_tag
        );
        let payload = URL_SAFE_NO_PAD.encode(payload.as_bytes());
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The session in a cookie value, if its signature is ours and it has not expired.
    pub fn decode(&self, value: &str, now: i64) -> Option<Session> {
        let (payload, tag) = value.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        // Constant-time comparison.
        hmac::verify(&self.key, payload.as_bytes(), &tag).ok()?;
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let mut parts = payload.split('|');
        let session = Session {
            user_id: parts.next()?.parse().ok()?,
            expires: parts.next()?.parse().ok()?,
            csrf: parts.next()?.to_owned(),
            password_tag: parts.next()?.to_owned(),
        };
        (parts.next().is_none() && session.expires > now).then_some(session)
    }
}

impl Signer {
    /// A CSRF token for the sign-in form, before there is a session: a random nonce and its
    /// HMAC under the server's key, so that a token an attacker planted in the cookie (and
    /// repeats in the form) is refused — the double-submit check alone would pass it.
    pub fn new_csrf(&self) -> String {
        let nonce = random_token();
        let tag = hmac::sign(&self.key, format!("csrf:{nonce}").as_bytes());
        format!("{nonce}.{}", URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16]))
    }

    /// The key of a session's server-side record: an HMAC of its token (the database never
    /// holds the token itself).
    pub fn record_key(&self, session: &Session) -> String {
        let tag = hmac::sign(&self.key, format!("session:{}", session.csrf).as_bytes());
        URL_SAFE_NO_PAD.encode(&tag.as_ref()[..32])
    }

    /// A device cookie for `username` (case-insensitive), valid until `expires` (Unix s).
    pub fn device_token(&self, username: &str, expires: i64) -> String {
        let payload = format!("device|{}|{expires}", username.to_lowercase());
        let payload = URL_SAFE_NO_PAD.encode(payload.as_bytes());
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Whether `token` is a device cookie of ours for `username`, not expired at `now`.
    pub fn device_is_for(&self, token: &str, username: &str, now: i64) -> bool {
        let Some((payload, tag)) = token.split_once('.') else {
            return false;
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(tag) else {
            return false;
        };
        if hmac::verify(&self.key, payload.as_bytes(), &tag).is_err() {
            return false;
        }
        let Some(text) = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        else {
            return false;
        };
        let mut parts = text.splitn(3, '|');
        matches!(
            (parts.next(), parts.next(), parts.next().and_then(|e| e.parse::<i64>().ok())),
            (Some("device"), Some(name), Some(expires))
                if name == username.to_lowercase() && expires > now
        )
    }

    /// Whether `token` is one [`Signer::new_csrf`] made with this key.
    pub fn csrf_is_ours(&self, token: &str) -> bool {
        let Some((nonce, tag)) = token.split_once('.') else {
            return false;
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(tag) else {
            return false;
        };
        let expected = hmac::sign(&self.key, format!("csrf:{nonce}").as_bytes());
        nonce.len() == 43 && tag.len() == 16 && same_bytes(&expected.as_ref()[..16], &tag)
    }
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a state-changing request comes from this site: its `Origin` (or, without one, its
/// `Referer`) names the origin the request was sent to, as Django's CSRF check does. A request
/// with neither (some privacy settings strip both) is judged by its token alone.
pub fn same_origin(origin: Option<&str>, referer: Option<&str>, own: &str) -> bool {
    fn origin_of(url: &str) -> Option<String> {
        let (scheme, rest) = url.split_once("://")?;
        let host = rest.split(['/', '?', '#']).next()?;
        Some(format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        ))
    }
    let own = own.to_ascii_lowercase();
    match (origin, referer) {
        (Some(o), _) => origin_of(o).is_some_and(|o| o == own),
        (None, Some(r)) => origin_of(r).is_some_and(|r| r == own),
        (None, None) => true,
    }
}

/// A random URL-safe token (CSRF tokens: 256 bits).
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

pub use crate::http::auth::same_token;

/// Failed sign-ins per username and per client address: at most `max` in `window`.
pub struct Limiter {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Limiter {
    /// 10 failures per 5 minutes, as the issue asks.
    pub fn new() -> Self {
        Self::with(10, Duration::from_secs(300))
    }

    pub fn with(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// True when any of `keys` has used up its failures.
    pub fn blocked(&self, keys: &[String]) -> bool {
        let now = Instant::now();
        let Ok(mut map) = self.failures.lock() else {
            return false;
        };
        keys.iter().any(|k| {
            map.get_mut(k).is_some_and(|q| {
                while q
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.window)
                {
                    q.pop_front();
                }
                q.len() >= self.max
            })
        })
    }

    /// Counts a failure against each of `keys`.
    pub fn fail(&self, keys: &[String]) {
        let now = Instant::now();
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() > 100_000 {
            // Bounded memory under a spray of usernames: forget what has expired.
            map.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) <= self.window)
            });
        }
        for k in keys {
            let q = map.entry(k.clone()).or_default();
            q.push_back(now);
            while q.len() > self.max {
                q.pop_front();
            }
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            user_id: 7,
            expires: 2_000,
            csrf: random_token(),
            password_tag: "t".into(),
        }
    }

    #[test]
    fn signed_sessions_round_trip_and_expire() {
        let signer = Signer::new("k1-0123456789");
        let s = session();
        let v = signer.encode(&s);
        assert_eq!(signer.decode(&v, 1_999), Some(s));
        assert_eq!(signer.decode(&v, 2_000), None);
        assert_eq!(Signer::new("another-key-0123").decode(&v, 0), None);
    }

    #[test]
    fn a_tampered_session_is_refused() {
        let signer = Signer::new("k1-0123456789");
        let v = signer.encode(&session());
        let (payload, tag) = v.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(b"1|9999999999|x|t");
        assert_eq!(signer.decode(&format!("{forged}.{tag}"), 0), None);
        assert_eq!(signer.decode(payload, 0), None);
        assert_eq!(signer.decode("garbage", 0), None);
    }

    #[test]
    fn the_limiter_counts_per_key_within_its_window() {
        let l = Limiter::with(3, Duration::from_millis(200));
        let keys = vec!["u:alice".to_owned(), "ip:1".to_owned()];
        for _ in 0..3 {
            assert!(!l.blocked(&keys));
            l.fail(&keys);
        }
        assert!(l.blocked(&keys));
        assert!(l.blocked(&["ip:1".to_owned()]));
        assert!(!l.blocked(&["u:bob".to_owned()]));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!l.blocked(&keys));
    }

    #[test]
    fn tokens_compare_in_full() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
    }
}

#[cfg(test)]
mod csrf_tests {
    use super::*;

    #[test]
    fn csrf_tokens_are_bound_to_the_key() {
        let ours = Signer::new("a-key-of-sufficient-length-123");
        let theirs = Signer::new("another-key-of-sufficient-length");
        let token = ours.new_csrf();
        assert!(ours.csrf_is_ours(&token));
        assert!(!theirs.csrf_is_ours(&token));
        // Issue 17, item 4: attacker-chosen values.
        for forged in [
            "attacker",
            "",
            ".",
            &random_token(),
            &format!("{}.AAAA", random_token()),
        ] {
            assert!(!ours.csrf_is_ours(forged), "{forged}");
        }
    }

    #[test]
    fn origins_must_match() {
        let own = "http://127.0.0.1:8000";
        assert!(same_origin(Some("http://127.0.0.1:8000"), None, own));
        assert!(!same_origin(Some("https://evil.example"), None, own));
        assert!(!same_origin(Some("null"), None, own));
        assert!(same_origin(
            None,
            Some("http://127.0.0.1:8000/admin/login/"),
            own
        ));
        assert!(!same_origin(None, Some("https://evil.example/admin/"), own));
        assert!(same_origin(None, None, own));
    }
}

/// The server-side records of open sessions (`llm_tracker_admin_session`).
pub mod records {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
    use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

    fn table() -> Alias {
        Alias::new("llm_tracker_admin_session")
    }

    /// Records an open session (and forgets the expired ones).
    pub async fn open(
        db: &DatabaseConnection,
        key: &str,
        user_id: i32,
        expires: i64,
        now: i64,
    ) -> Result<(), DbErr> {
        let backend = db.get_database_backend();
        let gone = Query::delete()
            .from_table(table())
            .and_where(Expr::col(Alias::new("expires_at")).lte(now))
            .to_owned();
        db.execute_raw(backend.build(&gone)).await?;
        let insert = Query::insert()
            .into_table(table())
            .columns([
                Alias::new("session_key"),
                Alias::new("user_id"),
                Alias::new("expires_at"),
            ])
            .values_panic([key.into(), user_id.into(), expires.into()])
            .to_owned();
        db.execute_raw(backend.build(&insert)).await.map(|_| ())
    }

    /// Whether the session is still open.
    pub async fn is_open(db: &DatabaseConnection, key: &str, now: i64) -> Result<bool, DbErr> {
        let backend = db.get_database_backend();
        let q = Query::select()
            .expr(Expr::val(1))
            .from(table())
            .and_where(Expr::col(Alias::new("session_key")).eq(key))
            .and_where(Expr::col(Alias::new("expires_at")).gt(now))
            .to_owned();
        Ok(db.query_one_raw(backend.build(&q)).await?.is_some())
    }

    /// Ends one session.
    pub async fn close(db: &DatabaseConnection, key: &str) -> Result<(), DbErr> {
        let backend = db.get_database_backend();
        let q = Query::delete()
            .from_table(table())
            .and_where(Expr::col(Alias::new("session_key")).eq(key))
            .to_owned();
        db.execute_raw(backend.build(&q)).await.map(|_| ())
    }

    /// Ends every session of a user ("sign out everywhere"); returns how many were open.
    pub async fn close_all(db: &DatabaseConnection, user_id: i32) -> Result<u64, DbErr> {
        let backend = db.get_database_backend();
        let q = Query::delete()
            .from_table(table())
            .and_where(Expr::col(Alias::new("user_id")).eq(user_id))
            .to_owned();
        Ok(db.execute_raw(backend.build(&q)).await?.rows_affected())
    }
}
