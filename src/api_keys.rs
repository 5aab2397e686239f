//! API keys: how code in any language authenticates to the gateway and the ingest API.
//!
//! A key is `ltk_<8 characters>_<32 characters>` (letters and digits, from the OS's random
//! source through `rand`). The first part, `ltk_<8>`, is its display prefix: shown in lists,
//! stored in clear (unique), and how a presented key is found. The database holds the SHA-256
//! of the whole key, never the key: it is printed once, when created. A key has scopes
//! (`gateway`, `ingest`), may expire, and is revoked by setting `revoked_at` (it stays listed).
//! A key of a deactivated or deleted user authenticates no more.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    Set,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::entities::{api_key, auth_user};

/// What a key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/chat/completions`, `GET /v1/models`.
    Gateway,
    /// `POST /api/v1/usage/`.
    Ingest,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Gateway, Scope::Ingest];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Gateway => "gateway",
            Scope::Ingest => "ingest",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw.trim())
    }
}

/// Scopes from `gateway,ingest` (comma-separated, at least one, each known).
pub fn parse_scopes<'a>(
    parts: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeSet<Scope>, KeyError> {
    let mut out = BTreeSet::new();
    for part in parts {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        out.insert(Scope::parse(part).ok_or_else(|| {
            KeyError::Invalid(format!(
                "unknown scope {part:?}: the scopes are gateway and ingest"
            ))
        })?);
    }
    if out.is_empty() {
        return Err(KeyError::Invalid(
            "at least one scope is needed: gateway, ingest".into(),
        ));
    }
    Ok(out)
}

/// A lifetime such as `90d`, `12h` or `30m` (a whole number of days, hours or minutes, at least
/// one minute, at most ten years).
pub fn parse_lifetime(raw: &str) -> Result<Duration, KeyError> {
    let raw = raw.trim();
    let bad = || {
        KeyError::Invalid(format!(
            "expiry {raw:?}: expected a number of days, hours or minutes such as 90d, 12h or 30m"
        ))
    };
    let (number, unit) = raw.split_at(raw.len().saturating_sub(1));
    let n: i64 = number.parse().map_err(|_| bad())?;
    let minutes = match unit {
        "d" => n.checked_mul(24 * 60),
        "h" => n.checked_mul(60),
        "m" => Some(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    if !(1..=MAX_LIFETIME_DAYS * 24 * 60).contains(&minutes) {
        return Err(KeyError::Invalid(format!(
            "expiry {raw:?}: between one minute and {MAX_LIFETIME_DAYS} days"
        )));
    }
    Ok(Duration::minutes(minutes))
}

/// The longest lifetime a key can be given.
pub const MAX_LIFETIME_DAYS: i64 = 3650;

/// The longest key name.
pub const MAX_NAME_CHARS: usize = 100;

const KEY_START: &str = "ltk_";
const PREFIX_RANDOM: usize = 8;
const SECRET_CHARS: usize = 32;

/// `last_used_at` is written when it is older than this, not on every use (a busy key would
/// otherwise update its row thousands of times a second).
pub const LAST_USED_RESOLUTION: Duration = Duration::seconds(60);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad input: the message says what (for a 400 or the CLI).
    #[error("{0}")]
    Invalid(String),
    #[error("no user {0}")]
    UnknownUser(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// A key as lists show it: never the key or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct KeyInfo {
    pub id: i32,
    pub user_id: i32,
    pub username: String,
    pub name: String,
    /// The key's first characters (`ltk_` and 8 more): how it is recognised and revoked.
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `active`, `revoked` or `expired`, as of the answer.
    pub status: String,
}

impl KeyInfo {
    fn new(m: api_key::Model, username: String, now: DateTime<Utc>) -> Self {
        let status = if m.revoked_at.is_some() {
            "revoked"
        } else if m.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        Self {
            id: m.id,
            user_id: m.user_id,
            username,
            name: m.name,
            prefix: m.prefix,
            scopes: m.scopes.split(',').filter_map(Scope::parse).collect(),
            created_at: m.created_at,
            last_used_at: m.last_used_at,
            expires_at: m.expires_at,
            revoked_at: m.revoked_at,
            status: status.into(),
        }
    }
}

/// A key just created: the key itself (shown once) and its record.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key: String,
    pub info: KeyInfo,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub username: String,
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    pub lifetime: Option<Duration>,
}

fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_chars(n: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// Creates a key for an active user. The name is trimmed, 1–100 characters, without control
/// characters.
pub async fn create<C: ConnectionTrait>(db: &C, new: NewKey) -> Result<CreatedKey, KeyError> {
    let name = new.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(KeyError::Invalid(format!(
            "name: 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(KeyError::Invalid("name: no control characters".into()));
    }
    if new.scopes.is_empty() {
        return Err(KeyError::Invalid(
            "at least one scope is needed: gateway, ingest".into(),
        ));
    }
    let user = crate::users::find_by_username(db, &new.username)
        .await?
        .ok_or_else(|| KeyError::UnknownUser(new.username.clone()))?;
    if !user.is_active {
        return Err(KeyError::Invalid(format!(
            "user {:?} is not active",
            user.username
        )));
    }
    let created_at = now();
    // A prefix already taken (1 in 62^8 per key) is drawn again.
    for _ in 0..5 {
        let prefix = format!("{KEY_START}{}", random_chars(PREFIX_RANDOM));
        if api_key::Entity::find()
            .filter(api_key::Column::Prefix.eq(&prefix))
            .one(db)
            .await?
            .is_some()
        {
            continue;
        }
        let key = format!("{prefix}_{}", random_chars(SECRET_CHARS));
        let model = api_key::ActiveModel {
            user_id: Set(user.id),
            name: Set(name.clone()),
            prefix: Set(prefix),
            key_hash: Set(sha256_hex(&key)),
            scopes: Set(new
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")),
            created_at: Set(created_at),
            last_used_at: Set(None),
            expires_at: Set(new.lifetime.map(|l| created_at + l)),
            revoked_at: Set(None),
            ..Default::default()
        }
        .insert(db)
        .await?;
        return Ok(CreatedKey {
            key,
            info: KeyInfo::new(model, user.username, created_at),
        });
    }
    Err(KeyError::Db(DbErr::Custom(
        "could not draw an unused key prefix".into(),
    )))
}

/// Every key, newest first; only `username`'s when given (an unknown user has none).
pub async fn list<C: ConnectionTrait>(
    db: &C,
    username: Option<&str>,
) -> Result<Vec<KeyInfo>, DbErr> {
    let mut q = api_key::Entity::find()
        .find_also_related(auth_user::Entity)
        .order_by_desc(api_key::Column::Id);
    if let Some(u) = username {
        q = q.filter(auth_user::Column::Username.eq(u));
    }
    let now = now();
    Ok(q.all(db)
        .await?
        .into_iter()
        .map(|(k, u)| KeyInfo::new(k, u.map(|u| u.username).unwrap_or_default(), now))
        .collect())
}

/// Revokes a key by id or by prefix; `None` when there is no such key. Revoking a revoked key
/// keeps its first `revoked_at`.
pub async fn revoke<C: ConnectionTrait>(db: &C, key: KeyRef<'_>) -> Result<Option<KeyInfo>, DbErr> {
    let found = match key {
        KeyRef::Id(id) => api_key::Entity::find_by_id(id).one(db).await?,
        KeyRef::Prefix(p) => {
            api_key::Entity::find()
                .filter(api_key::Column::Prefix.eq(p.trim()))
                .one(db)
                .await?
        }
    };
    let Some(found) = found else {
        return Ok(None);
    };
    let model = if found.revoked_at.is_none() {
        let mut active: api_key::ActiveModel = found.into();
        active.revoked_at = Set(Some(now()));
        active.update(db).await?
    } else {
        found
    };
    let username = auth_user::Entity::find_by_id(model.user_id)
        .one(db)
        .await?
        .map(|u| u.username)
        .unwrap_or_default();
    Ok(Some(KeyInfo::new(model, username, now())))
}

/// Which key to revoke.
#[derive(Debug, Clone, Copy)]
pub enum KeyRef<'a> {
    Id(i32),
    Prefix(&'a str),
}

/// Who a presented key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub key_id: i32,
    pub prefix: String,
    pub user_id: i32,
    pub is_staff: bool,
}

/// Why a presented key was refused. Everything but [`Refused::Scope`] is a 401; the messages
/// never repeat the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no API key was given")]
    Missing,
    #[error("the API key is not valid")]
    Unknown,
    #[error("the API key has been revoked")]
    Revoked,
    #[error("the API key has expired")]
    Expired,
    #[error("the API key is not allowed here (scope {0})")]
    Scope(&'static str),
}

/// Checks a presented key for `scope`: known (its hash compared in constant time), not
/// revoked, not expired, its user active, the scope granted. Records the use
/// (`last_used_at`, at most once a minute per key).
pub async fn authenticate<C: ConnectionTrait>(
    db: &C,
    presented: Option<&str>,
    scope: Scope,
) -> Result<Result<KeyOwner, Refused>, DbErr> {
    Ok(authenticate_with(db, presented, scope).await?.0)
}

/// [`authenticate`], with the key's scopes and expiry when it was found.
async fn authenticate_with<C: ConnectionTrait>(
    db: &C,
    presented: Option<&str>,
    scope: Scope,
) -> Result<(Result<KeyOwner, Refused>, String, Option<DateTime<Utc>>), DbErr> {
    let refused = |r: Refused| Ok((Err(r), String::new(), None));
    let Some(presented) = presented.map(str::trim).filter(|k| !k.is_empty()) else {
        return refused(Refused::Missing);
    };
    let prefix_len = KEY_START.len() + PREFIX_RANDOM;
    let well_formed = presented.len() == prefix_len + 1 + SECRET_CHARS
        && presented.starts_with(KEY_START)
        && presented.as_bytes()[prefix_len] == b'_'
        && presented.is_char_boundary(prefix_len);
    if !well_formed {
        return refused(Refused::Unknown);
    }
    let Some((key, user)) = api_key::Entity::find()
        .filter(api_key::Column::Prefix.eq(&presented[..prefix_len]))
        .find_also_related(auth_user::Entity)
        .one(db)
        .await?
    else {
        return refused(Refused::Unknown);
    };
    if !same(&sha256_hex(presented), &key.key_hash) {
        return refused(Refused::Unknown);
    }
    let Some(user) = user.filter(|u| u.is_active) else {
        return refused(Refused::Unknown);
    };
    let now = now();
    if key.revoked_at.is_some() {
        return refused(Refused::Revoked);
    }
    if key.expires_at.is_some_and(|e| e <= now) {
        return refused(Refused::Expired);
    }
    if !key.scopes.split(',').any(|s| s == scope.as_str()) {
        return refused(Refused::Scope(scope.as_str()));
    }
    if key
        .last_used_at
        .is_none_or(|t| now - t >= LAST_USED_RESOLUTION)
    {
        api_key::Entity::update_many()
            .col_expr(
                api_key::Column::LastUsedAt,
                sea_orm::sea_query::Expr::value(now),
            )
            .filter(api_key::Column::Id.eq(key.id))
            .exec(db)
            .await?;
    }
    Ok((
        Ok(KeyOwner {
            key_id: key.id,
            prefix: key.prefix,
            user_id: user.id,
            is_staff: user.is_staff,
        }),
        key.scopes,
        key.expires_at,
    ))
}

/// Keys that authenticated recently, by hash: used only when the database cannot be asked, so
/// that writers keep working through an outage (their rows are spooled). An entry serves for
/// [`KeyCache::TTL`] after the database last confirmed the key, and is checked again for its
/// scope and expiry; a revocation made during the outage takes effect when the database answers.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, Remembered>>,
}

#[derive(Debug, Clone)]
struct Remembered {
    owner: KeyOwner,
    scopes: String,
    expires_at: Option<DateTime<Utc>>,
    confirmed: std::time::Instant,
}

impl Remembered {
    fn check(self, scope: Scope) -> Result<KeyOwner, Refused> {
        if self.expires_at.is_some_and(|t| t <= now()) {
            return Err(Refused::Expired);
        }
        if !self.scopes.split(',').any(|s| s == scope.as_str()) {
            return Err(Refused::Scope(scope.as_str()));
        }
        Ok(self.owner)
    }
}

impl KeyCache {
    /// How long after the database confirmed a key it is accepted without asking again: the
    /// gateway and the ingest API then add no query per request, and a revocation (or a
    /// deactivated user) takes effect on every server within this time.
    pub const FRESH: std::time::Duration = std::time::Duration::from_secs(5);

    /// How long after its last confirmation a key is trusted without the database.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(600);
    const MAX_ENTRIES: usize = 10_000;

    /// [`authenticate`], falling back to this cache when the database fails; `Err` only when
    /// the database failed and the key is not remembered.
    pub async fn authenticate<C: ConnectionTrait>(
        &self,
        db: &C,
        presented: Option<&str>,
        scope: Scope,
    ) -> Result<Result<KeyOwner, Refused>, DbErr> {
        let hash = presented.map(|k| sha256_hex(k.trim()));
        // Confirmed by the database within FRESH: no query (a revocation reaches every server
        // within FRESH).
        let fresh = hash.as_ref().and_then(|h| {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries
                .get(h)
                .filter(|r| r.confirmed.elapsed() < Self::FRESH)
                .cloned()
        });
        if let Some(r) = fresh {
            return Ok(r.check(scope));
        }
        match authenticate_with(db, presented, scope).await {
            Ok((answer, scopes, expires_at)) => {
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                if let (Err(Refused::Unknown | Refused::Revoked | Refused::Expired), Some(h)) =
                    (&answer, &hash)
                {
                    // Revoked (or gone) while the database answers: not trusted in an outage.
                    entries.remove(h);
                }
                if let (Ok(owner), Some(hash)) = (&answer, hash) {
                    if entries.len() >= Self::MAX_ENTRIES {
                        entries.retain(|_, r| r.confirmed.elapsed() < Self::TTL);
                    }
                    if entries.len() < Self::MAX_ENTRIES {
                        entries.insert(
                            hash,
                            Remembered {
                                owner: owner.clone(),
                                scopes,
                                expires_at,
                                confirmed: std::time::Instant::now(),
                            },
                        );
                    }
                }
                Ok(answer)
            }
            Err(e) => {
                let remembered = hash.and_then(|h| {
                    let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                    entries
                        .get(&h)
                        .filter(|r| r.confirmed.elapsed() < Self::TTL)
                        .cloned()
                });
                let Some(r) = remembered else {
                    return Err(e);
                };
                tracing::warn!(prefix = %r.owner.prefix, "database unavailable: API key accepted from the cache");
                Ok(r.check(scope))
            }
        }
    }
}

/// Equal strings of hex digits, compared in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_days_hours_and_minutes_within_bounds() {
        assert_eq!(parse_lifetime("90d").unwrap(), Duration::days(90));
        assert_eq!(parse_lifetime(" 12h ").unwrap(), Duration::hours(12));
        assert_eq!(parse_lifetime("30m").unwrap(), Duration::minutes(30));
        for bad in [
            "",
            "d",
            "90",
            "-1d",
            "0m",
            "3651d",
            "1.5d",
            "90x",
            "99999999999999999d",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_are_known_names_and_at_least_one() {
        assert_eq!(
            parse_scopes("ingest, gateway,ingest".split(',')).unwrap(),
            BTreeSet::from([Scope::Gateway, Scope::Ingest])
        );
        assert!(parse_scopes("".split(',')).is_err());
        assert!(parse_scopes("admin".split(',')).is_err());
    }

    #[test]
    fn hashes_are_sha256_hex_and_compared_whole() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(same("ab01", "ab01"));
        assert!(!same("ab01", "ab02"));
        assert!(!same("ab01", "ab0"));
    }
}
