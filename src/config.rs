//! Settings: read once from the environment (and `.env`), validated, then passed down.
//!
//! Every key of SPEC §3 lives here. A malformed value fails at load time with an error that
//! names the key; values a command does not need (a provider key for `migrate`) are checked by
//! the code that needs them, again naming the key.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// The default database: a SQLite file in the working directory, created when missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://llm_tracker.db?mode=rwc";

/// The default log filter: our own info lines, not every migration step.
pub const DEFAULT_LOG_FILTER: &str = "info,sea_orm_migration=warn";

/// A configuration error, always naming the key it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{key} is required{hint}")]
    Missing { key: &'static str, hint: String },
    #[error("{key} is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }

    /// A missing key, with a hint on why it is needed.
    pub fn missing(key: &'static str, hint: impl Into<String>) -> Self {
        let hint = hint.into();
        Self::Missing {
            key,
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        }
    }
}

/// A secret value: `Debug` and `Display` print `***`, never the value.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself, for the one place that must send or use it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A database URL. Printed with any password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Validates the scheme (sqlite or postgres).
    pub fn parse(key: &'static str, raw: &str) -> Result<Self, ConfigError> {
        let raw = raw.trim();
        let ok = raw.starts_with("sqlite:")
            || raw.starts_with("postgres://")
            || raw.starts_with("postgresql://");
        if !ok {
            return Err(ConfigError::invalid(
                key,
                "expected a sqlite:// or postgres:// URL",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for a SQLite URL.
    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", mask_url_password(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_url_password(&self.0))
    }
}

/// `postgres://user:pass@host/db` → `postgres://user:***@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_owned(),
    }
}

/// Which provider `llm_service()` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    AzureOpenAi,
    Gemini,
}

impl ProviderKind {
    /// The name used in `LLM_PROVIDER` and in `metadata.provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::AzureOpenAi => "azure_openai",
            Self::Gemini => "gemini",
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// OpenAI settings (`OPENAI_*`).
#[derive(Clone, Debug)]
pub struct OpenAiSettings {
    pub api_key: Option<Secret>,
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub base_url: String,
}

/// Azure OpenAI settings (`AZURE_OPENAI_*`).
#[derive(Clone, Debug)]
pub struct AzureSettings {
    pub api_key: Option<Secret>,
    pub api_base: Option<String>,
    pub deployment: String,
    pub api_version: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// Gemini settings (`GEMINI_*`).
#[derive(Clone, Debug)]
pub struct GeminiSettings {
    pub api_key: Option<Secret>,
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub base_url: String,
}

/// Everything the product reads from its environment.
#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: DatabaseUrl,
    /// Where admin reads go (a PostgreSQL read replica); `None`: `database_url`.
    pub database_read_url: Option<DatabaseUrl>,
    pub bind_addr: SocketAddr,
    pub jwt_secret: Option<Secret>,
    pub provider: ProviderKind,
    pub openai: OpenAiSettings,
    pub azure: AzureSettings,
    pub gemini: GeminiSettings,
    pub llm_timeout: Duration,
    pub llm_max_retries: u32,
    pub cors_allowed_origins: Vec<String>,
    /// Where usage rows wait while the database is unavailable.
    pub usage_spool_path: std::path::PathBuf,
    /// Whether callers wait for their row's commit (`committed`) or only its hand-over.
    pub usage_write_mode: WriteMode,
    /// How long a call waits for its row's commit before the row goes to the spool.
    pub usage_commit_deadline: Duration,
    /// `SQLITE_CACHE_MIB`: SQLite's page cache for a pool, all its connections together.
    pub sqlite_cache_mib: u32,
    /// The zone of token-stats buckets and of naive dates when a request names none.
    pub default_timezone: chrono_tz::Tz,
    /// The active price table: built-in, plus the file named by `LLM_PRICES_PATH`.
    pub prices: std::sync::Arc<crate::pricing::PriceTable>,
    pub log_filter: String,
    pub log_format: LogFormat,
    /// `METRICS_TOKEN`: `GET /metrics` on the main address answers only with it as a bearer
    /// token (at least 16 characters).
    pub metrics_token: Option<Secret>,
    /// `METRICS_BIND_ADDR`: a second address serving only `GET /metrics`, without a token
    /// (for a port only the scraper can reach). Neither set: no metrics endpoint.
    pub metrics_bind_addr: Option<SocketAddr>,
    /// `USAGE_RETENTION_DAYS`: raw rows older than this many days are deleted once a day by
    /// `serve`, their statistics kept (see `crate::retention`). Unset: keep every row.
    pub usage_retention_days: Option<u32>,
}

/// The longest `USAGE_RETENTION_DAYS` (and `retention --older-than`): 100 years.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// A key → value view over the environment, so tests can load settings from a map.
struct Source<'a>(&'a HashMap<String, String>);

impl Source<'_> {
    /// The trimmed value, or `None` when absent or empty.
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_owned()
    }

    fn secret(&self, key: &str) -> Option<Secret> {
        self.get(key).map(Secret::new)
    }

    /// A secret that must be at least 16 characters long when set (signing keys, tokens).
    fn long_secret(&self, key: &'static str) -> Result<Option<Secret>, ConfigError> {
        match self.secret(key) {
            Some(secret) if secret.expose().len() < 16 => {
                Err(ConfigError::invalid(key, "must be at least 16 characters"))
            }
            other => Ok(other),
        }
    }

    fn parsed<T: FromStr>(
        &self,
        key: &'static str,
        what: &str,
        check: impl Fn(&T) -> bool,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => match raw.parse::<T>() {
                Ok(v) if check(&v) => Ok(Some(v)),
                _ => Err(ConfigError::invalid(
                    key,
                    format!("expected {what}, got {raw:?}"),
                )),
            },
        }
    }

    fn max_tokens(&self, key: &'static str) -> Result<Option<u32>, ConfigError> {
        self.parsed::<u32>(key, "a positive integer", |v| *v > 0)
    }

    fn temperature(&self, key: &'static str) -> Result<Option<f32>, ConfigError> {
        self.parsed::<f32>(key, "a number from 0 to 2", |v| (0.0..=2.0).contains(v))
    }

    fn url(&self, key: &'static str, default: &str) -> Result<String, ConfigError> {
        let value = self.string(key, default);
        if !(value.starts_with("http://") || value.starts_with("https://")) {
            return Err(ConfigError::invalid(
                key,
                format!("expected an http(s) URL, got {value:?}"),
            ));
        }
        Ok(value.trim_end_matches('/').to_owned())
    }
}

/// When a tracked call returns to its caller (`USAGE_WRITE_MODE`); the usage store
/// (`tracker::UsageStore`) acts on it. Settings own it so that configuration depends on no
/// other module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// After the row is committed or spooled (fsynced), at most the commit deadline plus one
    /// spool write after the reply: a row is durable once the call returns.
    #[default]
    Committed,
    /// As soon as the row is handed to the store; the commit (or, failing it, the spool)
    /// follows in the background, within a second at most (usually milliseconds; while the
    /// database is unhealthy, at once to the spool). Saves the caller the commit's wait; a
    /// process killed outright before then loses the row, a graceful stop (`shutdown`) does
    /// not.
    Queued,
}

impl Settings {
    /// Loads `.env` (when present) and the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is reported by name.
        if let Err(e) = dotenvy::dotenv()
            && !e.not_found()
        {
            return Err(ConfigError::invalid(".env", e.to_string()));
        }
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_map(&vars)
    }

    /// Builds settings from a map of key → value (the environment, or a test's own map).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let src = Source(vars);
        let database_url = DatabaseUrl::parse(
            "DATABASE_URL",
            src.get("DATABASE_URL").unwrap_or(DEFAULT_DATABASE_URL),
        )?;
        let bind_addr = src
            .parsed::<SocketAddr>("BIND_ADDR", "host:port such as 127.0.0.1:8000", |_| true)?
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
        let jwt_secret = src.long_secret("JWT_SECRET")?;
        let metrics_token = src.long_secret("METRICS_TOKEN")?;
        let metrics_bind_addr = src.parsed::<SocketAddr>(
            "METRICS_BIND_ADDR",
            "host:port such as 127.0.0.1:9100",
            |_| true,
        )?;
        if metrics_bind_addr.is_some() && metrics_bind_addr == Some(bind_addr) {
            return Err(ConfigError::invalid(
                "METRICS_BIND_ADDR",
                "must differ from BIND_ADDR",
            ));
        }
        let usage_retention_days = src.parsed::<u32>(
            "USAGE_RETENTION_DAYS",
            "a whole number of days from 1 to 36500",
            |d| (1..=MAX_RETENTION_DAYS).contains(d),
        )?;
        let provider = match src.get("LLM_PROVIDER").map(str::to_ascii_lowercase) {
            None => ProviderKind::OpenAi,
            Some(p) if p == "openai" => ProviderKind::OpenAi,
            Some(p) if p == "azure_openai" => ProviderKind::AzureOpenAi,
            Some(p) if p == "gemini" => ProviderKind::Gemini,
            Some(p) => {
                return Err(ConfigError::invalid(
                    "LLM_PROVIDER",
                    format!("expected openai, azure_openai or gemini, got {p:?}"),
                ));
            }
        };
        let openai = OpenAiSettings {
            api_key: src.secret("OPENAI_API_KEY"),
            model: src.string("OPENAI_MODEL", "gpt-4o-mini"),
            max_tokens: src.max_tokens("OPENAI_MAX_TOKENS")?,
            temperature: src.temperature("OPENAI_TEMPERATURE")?,
            base_url: src.url("OPENAI_BASE_URL", "https://api.openai.com/v1")?,
        };
        let azure = AzureSettings {
            api_key: src.secret("AZURE_OPENAI_API_KEY"),
            api_base: match src.get("AZURE_OPENAI_API_BASE") {
                None => None,
                Some(_) => Some(src.url("AZURE_OPENAI_API_BASE", "")?),
            },
            deployment: src.string("AZURE_OPENAI_DEPLOYMENT", "gpt-4o-mini"),
            api_version: src.string("AZURE_OPENAI_API_VERSION", "2024-10-21"),
            max_tokens: src.max_tokens("AZURE_OPENAI_MAX_TOKENS")?,
            temperature: src.temperature("AZURE_OPENAI_TEMPERATURE")?,
        };
        let gemini = GeminiSettings {
            api_key: src.secret("GEMINI_API_KEY"),
            model: src.string("GEMINI_MODEL", "gemini-2.5-flash"),
            max_tokens: src.max_tokens("GEMINI_MAX_TOKENS")?,
            temperature: src.temperature("GEMINI_TEMPERATURE")?,
            base_url: src.url(
                "GEMINI_BASE_URL",
                "https://generativelanguage.googleapis.com",
            )?,
        };
        let timeout_secs = src
            .parsed::<u64>("LLM_TIMEOUT_SECS", "a whole number of seconds ≥ 1", |v| {
                *v >= 1 && *v <= 86_400
            })?
            .unwrap_or(120);
        let llm_max_retries = src
            .parsed::<u32>("LLM_MAX_RETRIES", "a whole number from 0 to 10", |v| {
                *v <= 10
            })?
            .unwrap_or(2);
        let commit_deadline_ms = src
            .parsed::<u64>(
                "USAGE_COMMIT_DEADLINE_MS",
                "a whole number of milliseconds from 1 to 60000",
                |v| *v >= 1 && *v <= 60_000,
            )?
            .unwrap_or(10);
        let sqlite_cache_mib = src
            .parsed::<u32>(
                "SQLITE_CACHE_MIB",
                "a whole number of MiB from 1 to 65536",
                |v| *v >= 1 && *v <= 65_536,
            )?
            .unwrap_or(DEFAULT_SQLITE_CACHE_MIB);
        let cors_allowed_origins = parse_origins(src.get("CORS_ALLOWED_ORIGINS"))?;
        let log_format = match src.get("LOG_FORMAT").map(str::to_ascii_lowercase) {
            None => LogFormat::Text,
            Some(f) if f == "text" => LogFormat::Text,
            Some(f) if f == "json" => LogFormat::Json,
            Some(f) => {
                return Err(ConfigError::invalid(
                    "LOG_FORMAT",
                    format!("expected text or json, got {f:?}"),
                ));
            }
        };
        Ok(Self {
            database_url: database_url.clone(),
            database_read_url: match src.get("DATABASE_READ_URL") {
                None => None,
                Some(url) => Some(DatabaseUrl::parse("DATABASE_READ_URL", url)?),
            },
            bind_addr,
            jwt_secret,
            metrics_token,
            metrics_bind_addr,
            usage_retention_days,
            provider,
            openai,
            azure,
            gemini,
            llm_timeout: Duration::from_secs(timeout_secs),
            llm_max_retries,
            cors_allowed_origins,
            usage_spool_path: src
                .get("USAGE_SPOOL_PATH")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| default_spool_path(database_url.expose())),
            usage_write_mode: match src.get("USAGE_WRITE_MODE").map(str::to_ascii_lowercase) {
                None => WriteMode::Committed,
                Some(m) if m == "committed" => WriteMode::Committed,
                Some(m) if m == "queued" => WriteMode::Queued,
                Some(m) => {
                    return Err(ConfigError::invalid(
                        "USAGE_WRITE_MODE",
                        format!("expected committed or queued, got {m:?}"),
                    ));
                }
            },
            usage_commit_deadline: Duration::from_millis(commit_deadline_ms),
            sqlite_cache_mib,
            log_filter: src.string("RUST_LOG", DEFAULT_LOG_FILTER),
            log_format,
            default_timezone: match src.get("DEFAULT_TIMEZONE") {
                None => chrono_tz::Tz::UTC,
                Some(name) => name.parse().map_err(|_| {
                    ConfigError::invalid(
                        "DEFAULT_TIMEZONE",
                        format!("{name:?} is not an IANA time zone (e.g. UTC, Asia/Shanghai)"),
                    )
                })?,
            },
            prices: std::sync::Arc::new(
                crate::pricing::PriceTable::load(
                    crate::pricing::prices_path(src.get("LLM_PRICES_PATH")).as_deref(),
                )
                .map_err(|e| ConfigError::invalid("LLM_PRICES_PATH", e.to_string()))?,
            ),
        })
    }

    /// The JWT key, or an error naming `JWT_SECRET` when it is not configured.
    pub fn require_jwt_secret(&self) -> Result<&Secret, ConfigError> {
        self.jwt_secret.as_ref().ok_or_else(|| {
            ConfigError::missing(
                "JWT_SECRET",
                "set it to the same value as Django's SIMPLE_JWT SIGNING_KEY to share tokens",
            )
        })
    }
}

fn parse_origins(raw: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            let o = o.trim_end_matches('/');
            let valid = (o.starts_with("http://") || o.starts_with("https://"))
                && !o["https://".len().min(o.len())..].contains('/');
            if valid {
                Ok(o.to_owned())
            } else {
                Err(ConfigError::invalid(
                    "CORS_ALLOWED_ORIGINS",
                    format!("{o:?} is not an origin such as https://dash.example.com"),
                ))
            }
        })
        .collect()
}

/// The default spool: next to a SQLite database file, else in the working directory.
pub fn default_spool_path(database_url: &str) -> std::path::PathBuf {
    let sqlite_file = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|p| !p.is_empty() && !p.contains(":memory:"));
    match sqlite_file {
        Some(file) => std::path::PathBuf::from(format!("{file}.usage-spool.jsonl")),
        None => std::path::PathBuf::from("llm_tracker_usage.spool.jsonl"),
    }
}

/// The SQLite page cache of a pool, all connections together, unless `SQLITE_CACHE_MIB` says
/// otherwise.
pub const DEFAULT_SQLITE_CACHE_MIB: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let s = Settings::from_map(&map(&[])).unwrap();
        assert_eq!(s.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(s.bind_addr.to_string(), "127.0.0.1:8000");
        assert_eq!(s.provider, ProviderKind::OpenAi);
        assert_eq!(s.openai.model, "gpt-4o-mini");
        assert_eq!(s.openai.base_url, "https://api.openai.com/v1");
        assert_eq!(s.azure.deployment, "gpt-4o-mini");
        assert_eq!(s.azure.api_version, "2024-10-21");
        assert_eq!(s.gemini.model, "gemini-2.5-flash");
        assert_eq!(s.llm_timeout, Duration::from_secs(120));
        assert_eq!(s.llm_max_retries, 2);
        assert!(s.jwt_secret.is_none());
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.log_filter, DEFAULT_LOG_FILTER);
    }

    #[test]
    fn malformed_values_name_their_key() {
        for (key, value) in [
            ("DATABASE_URL", "mysql://x"),
            ("BIND_ADDR", "localhost"),
            ("LLM_PROVIDER", "anthropic"),
            ("LLM_TIMEOUT_SECS", "0"),
            ("LLM_TIMEOUT_SECS", "ten"),
            ("LLM_MAX_RETRIES", "-1"),
            ("OPENAI_MAX_TOKENS", "0"),
            ("OPENAI_TEMPERATURE", "3.5"),
            ("GEMINI_BASE_URL", "ftp://x"),
            ("CORS_ALLOWED_ORIGINS", "https://a.example/path"),
            ("LOG_FORMAT", "xml"),
            ("USAGE_WRITE_MODE", "eventually"),
            ("USAGE_COMMIT_DEADLINE_MS", "0"),
            ("USAGE_COMMIT_DEADLINE_MS", "10ms"),
            ("SQLITE_CACHE_MIB", "0"),
            ("SQLITE_CACHE_MIB", "lots"),
            ("JWT_SECRET", "short"),
            ("METRICS_TOKEN", "short"),
            ("METRICS_BIND_ADDR", "9100"),
            ("USAGE_RETENTION_DAYS", "0"),
            ("USAGE_RETENTION_DAYS", "36501"),
            ("USAGE_RETENTION_DAYS", "400d"),
            ("METRICS_BIND_ADDR", "127.0.0.1:8000"),
        ] {
            let err = Settings::from_map(&map(&[(key, value)])).unwrap_err();
            assert!(
                err.to_string().starts_with(key),
                "{key}={value}: error {err} does not name the key"
            );
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::from_map(&map(&[
            ("JWT_SECRET", "super-secret-signing-key-123"),
            ("OPENAI_API_KEY", "sk-live-abcdef"),
            ("GEMINI_API_KEY", "AIzaSyTOPSECRET"),
            ("AZURE_OPENAI_API_KEY", "azure-topsecret"),
            ("DATABASE_URL", "postgres://app:hunter2@db:5432/app"),
        ]))
        .unwrap();
        let printed = format!("{s:?}");
        for secret in [
            "super-secret-signing-key-123",
            "sk-live-abcdef",
            "AIzaSyTOPSECRET",
            "azure-topsecret",
            "hunter2",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
        assert!(printed.contains("***"));
        assert_eq!(s.database_url.to_string(), "postgres://app:***@db:5432/app");
        assert_eq!(
            s.database_url.expose(),
            "postgres://app:hunter2@db:5432/app"
        );
    }

    #[test]
    fn empty_values_mean_not_given_and_origins_are_split() {
        let s = Settings::from_map(&map(&[
            ("OPENAI_MODEL", "  "),
            (
                "CORS_ALLOWED_ORIGINS",
                " https://dash.example.com/ , http://localhost:5173 ,",
            ),
            ("LLM_PROVIDER", "Gemini"),
        ]))
        .unwrap();
        assert_eq!(s.openai.model, "gpt-4o-mini");
        assert_eq!(
            s.cors_allowed_origins,
            vec!["https://dash.example.com", "http://localhost:5173"]
        );
        assert_eq!(s.provider, ProviderKind::Gemini);
    }

    #[test]
    fn missing_jwt_secret_is_named() {
        let s = Settings::from_map(&map(&[])).unwrap();
        let err = s.require_jwt_secret().unwrap_err();
        assert!(err.to_string().starts_with("JWT_SECRET is required"));
    }

    #[test]
    fn spool_defaults_sit_next_to_the_sqlite_file() {
        assert_eq!(
            default_spool_path("sqlite://llm_tracker.db?mode=rwc"),
            std::path::PathBuf::from("llm_tracker.db.usage-spool.jsonl")
        );
        assert_eq!(
            default_spool_path("sqlite:///var/lib/x.db"),
            std::path::PathBuf::from("/var/lib/x.db.usage-spool.jsonl")
        );
        assert_eq!(
            default_spool_path("sqlite::memory:"),
            std::path::PathBuf::from("llm_tracker_usage.spool.jsonl")
        );
        assert_eq!(
            default_spool_path("postgres://h/db"),
            std::path::PathBuf::from("llm_tracker_usage.spool.jsonl")
        );
    }
}
