//! The `llm-tracker` command line.

use clap::{Parser, Subcommand};

use crate::auth::jwt;
use crate::config::{ConfigError, Settings};
use crate::providers::Message;
use crate::tracker::{CallRequest, CallState, LlmTracker, TrackerError};
use crate::users::{self, NewUser, UserError};

/// Records every LLM call a backend makes and serves the record to administrators.
#[derive(Debug, Parser)]
#[command(name = "llm-tracker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve HTTP until Ctrl-C / SIGTERM.
    Serve {
        /// Fill an empty database with demo rows, create an admin user, print the URLs and a
        /// ready admin token (and use a generated JWT key when JWT_SECRET is not set).
        #[arg(long)]
        demo: bool,
    },
    /// Apply migrations and exit.
    Migrate,
    /// Create a Django-compatible user (pbkdf2_sha256 password).
    CreateUser {
        /// Username (letters, digits and @ . + - _; at most 150).
        #[arg(long)]
        username: String,
        /// Password; without it the user gets an unusable password, as in Django.
        #[arg(long)]
        password: Option<String>,
        /// Mark the user as staff (may use the admin API).
        #[arg(long)]
        staff: bool,
        /// Mark the user as superuser (may use the admin API).
        #[arg(long)]
        superuser: bool,
    },
    /// Make one tracked call with the configured provider; print the reply, usage and row id.
    Call {
        /// The user message.
        prompt: String,
        /// A system message sent first.
        #[arg(long)]
        system: Option<String>,
        /// The pipeline step recorded as metadata.node_name.
        #[arg(long, default_value = "cli")]
        node_name: String,
        /// The end user (auth_user.id) the call is made for.
        #[arg(long)]
        user_id: Option<i32>,
        /// Ask the model for a JSON object, and print one JSON document.
        #[arg(long, conflicts_with = "stream")]
        json: bool,
        /// Stream the reply: print it as it arrives, then the usage and row id.
        #[arg(long)]
        stream: bool,
    },
    /// Print the OpenAPI document (to refresh openapi/openapi.json).
    Openapi,
    /// Recompute the cost of stored rows from the current price table (in batches; safe to
    /// interrupt and rerun). Prints how many rows changed.
    Reprice {
        /// Only rows that have no cost yet.
        #[arg(long)]
        missing_only: bool,
        /// Only rows created at or after this date or date-time (as the API's start_date).
        #[arg(long)]
        since: Option<String>,
        /// Only rows created at or before this date or date-time (a date means its end).
        #[arg(long)]
        until: Option<String>,
    },
    /// Create, list or revoke API keys (for the gateway and the ingest API).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Check or recreate the usage rollup that token-stats reads.
    Rollup {
        #[command(subcommand)]
        action: RollupAction,
    },
    /// Delete raw usage rows older than the retention, keeping their statistics (token-stats
    /// over the deleted period returns the same numbers; the listing has no rows there).
    /// Rows created before the UTC midnight that many days back go, in small batches.
    Retention {
        /// Count what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The retention, such as 400d (whole days); defaults to USAGE_RETENTION_DAYS.
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Print an HS256 access token for a user (the token alone on stdout).
    Token {
        /// The user the token is for.
        #[arg(long)]
        username: String,
        /// Lifetime: 90s, 15m, 1h, 7d (at most 366d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// `llm-tracker key …`.
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Create a key for a user and print it alone on stdout: it is shown this once (the
    /// database keeps only its hash).
    Create {
        /// The user the key speaks for (its calls are recorded under this user).
        #[arg(long)]
        username: String,
        /// What the key is for, shown in lists.
        #[arg(long, default_value = "default")]
        name: String,
        /// Comma-separated: gateway, ingest.
        #[arg(long, default_value = "gateway,ingest")]
        scopes: String,
        /// Lifetime such as 90d, 12h or 30m (at most 3650d); without it the key does not expire.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (prefix, user, name, scopes, status, times), newest first.
    List {
        /// Only this user's keys.
        #[arg(long)]
        username: Option<String>,
    },
    /// Revoke a key by its prefix (`ltk_` and 8 characters, as `key list` shows it).
    Revoke {
        /// The key's prefix.
        prefix: String,
    },
}

/// `llm-tracker rollup …`.
#[derive(Debug, Subcommand)]
pub enum RollupAction {
    /// Recompute the rollup's cells from the rows and compare them with the stored ones (whole
    /// UTC days of the range; the whole table by default). Exits 1 when any cell differs.
    Verify {
        /// From this date or date-time (as the API's start_date).
        #[arg(long)]
        since: Option<String>,
        /// Up to this date or date-time (a date means its end).
        #[arg(long)]
        until: Option<String>,
    },
    /// Recreate the rollup from every row (one transaction; writers wait for it).
    Rebuild,
    /// Fold the rows written since the last fold into the rollup's cells now (a running
    /// `serve` or tracker does this every second; reads are exact either way).
    Fold,
}

/// `llm-tracker key …`: arguments checked before the database is touched.
async fn key(settings: &Settings, action: KeyAction) -> Result<(), CliError> {
    use crate::api_keys::{self, KeyError, KeyRef, NewKey};
    let key_error = |e: KeyError| match e {
        KeyError::Invalid(m) => CliError::Usage(m),
        KeyError::UnknownUser(u) => CliError::User(UserError::NotFound(u)),
        KeyError::Db(e) => CliError::Db(e),
    };
    match action {
        KeyAction::Create {
            username,
            name,
            scopes,
            expires,
        } => {
            let scopes = api_keys::parse_scopes(scopes.split(',')).map_err(key_error)?;
            let lifetime = expires
                .as_deref()
                .map(api_keys::parse_lifetime)
                .transpose()
                .map_err(key_error)?;
            let db = open_migrated(settings).await?;
            let created = api_keys::create(
                &db,
                NewKey {
                    username,
                    name,
                    scopes,
                    lifetime,
                },
            )
            .await
            .map_err(key_error)?;
            eprintln!(
                "created key {} for {:?} (scopes: {}{}); it is shown this once:",
                created.info.prefix,
                created.info.username,
                scope_list(&created.info.scopes),
                created
                    .info
                    .expires_at
                    .map(|e| format!(", expires {}", e.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("{}", created.key);
        }
        KeyAction::List { username } => {
            let db = open_migrated(settings).await?;
            let keys = api_keys::list(&db, username.as_deref()).await?;
            println!("prefix\tuser\tname\tscopes\tstatus\tcreated\tlast used\texpires");
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            for k in keys {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    k.prefix,
                    k.username,
                    k.name,
                    scope_list(&k.scopes),
                    k.status,
                    time(Some(k.created_at)),
                    time(k.last_used_at),
                    time(k.expires_at)
                );
            }
        }
        KeyAction::Revoke { prefix } => {
            let db = open_migrated(settings).await?;
            match api_keys::revoke(&db, KeyRef::Prefix(&prefix)).await? {
                Some(k) => println!("revoked key {} of {:?}", k.prefix, k.username),
                None => return Err(CliError::Usage(format!("no key with prefix {prefix:?}"))),
            }
        }
    }
    Ok(())
}

fn scope_list(scopes: &[crate::api_keys::Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// `--since` / `--until` as a filter, read as the API reads start_date / end_date.
fn range_filter(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<crate::usage::UsageFilter, CliError> {
    crate::usage::UsageFilter::from_params(since, until, None, None, None).map_err(|e| {
        let flag = if e.param == "start_date" {
            "--since"
        } else {
            "--until"
        };
        CliError::Usage(format!("{flag}: {}", e.message))
    })
}

async fn rollup(settings: &Settings, action: RollupAction) -> Result<(), CliError> {
    match action {
        RollupAction::Verify { since, until } => {
            let filter = range_filter(since.as_deref(), until.as_deref())?;
            let db = open_migrated(settings).await?;
            let report = crate::usage::rollup::verify(&db, filter.start, filter.end).await?;
            let range = match report.slots {
                None => "the whole table".to_owned(),
                Some((lo, hi)) => {
                    let day = |slot: i64| {
                        chrono::DateTime::from_timestamp(slot.saturating_mul(900), 0)
                            .map(|t| t.format("%Y-%m-%d").to_string())
                            .unwrap_or_else(|| "…".into())
                    };
                    format!("UTC days {} to {} (exclusive)", day(lo), day(hi))
                }
            };
            for e in &report.examples {
                println!("differs: {e}");
            }
            println!(
                "rollup verify over {range}: {} cells expected, {} differ",
                report.expected_cells, report.differing_cells
            );
            if report.differing_cells > 0 {
                return Err(CliError::Check(format!(
                    "the rollup differs from the rows in {} cells; `llm-tracker rollup rebuild` recreates it",
                    report.differing_cells
                )));
            }
        }
        RollupAction::Rebuild => {
            let db = open_migrated(settings).await?;
            let started = std::time::Instant::now();
            let cells = crate::usage::rollup::rebuild(&db).await?;
            // Fresh tables read fast from the first request (PostgreSQL).
            migration::analyze_usage_tables(&db).await?;
            println!(
                "rollup rebuilt: {cells} cells in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        RollupAction::Fold => {
            let db = open_migrated(settings).await?;
            let started = std::time::Instant::now();
            let folded = crate::usage::rollup::fold(&db).await?;
            println!(
                "rollup fold: {} in {:.3} s",
                if folded {
                    "pending rows folded"
                } else {
                    "nothing pending (or another fold was running)"
                },
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// A command's failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tracker(#[from] TrackerError),
    #[error("{0}")]
    Check(String),
}

/// Runs one command to completion.
pub async fn run(cli: Cli, settings: Settings) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { demo } => {
            let mut settings = settings;
            if settings.jwt_secret.is_none() {
                if !demo {
                    return Err(ConfigError::missing(
                        "JWT_SECRET",
                        "the admin API checks tokens with it; or try `serve --demo`",
                    )
                    .into());
                }
                settings.jwt_secret = Some(crate::config::Secret::new(random_string(48)));
            }
            // The demo seeds its data first; production starts with the database down too
            // and migrates once it answers.
            let (db, migrated) = if demo {
                let db = open_migrated(&settings).await?;
                demo_setup(&settings, &db).await?;
                (db, true)
            } else {
                crate::db::open(
                    &settings.database_url,
                    crate::tracker::STARTUP_PROBE,
                    settings.sqlite_cache_mib,
                )
                .await?
            };
            crate::server::run(settings, db, migrated).await?;
        }
        Command::Migrate => {
            open_migrated(&settings).await?;
            eprintln!("migrations applied to {}", settings.database_url);
        }
        Command::CreateUser {
            username,
            password,
            staff,
            superuser,
        } => {
            // Validate everything before touching the database.
            if !users::is_valid_username(&username) {
                return Err(UserError::InvalidUsername(username).into());
            }
            if password.as_deref() == Some("") {
                return Err(UserError::EmptyPassword.into());
            }
            let db = open_migrated(&settings).await?;
            let user = users::create_user(
                &db,
                NewUser {
                    username,
                    password,
                    is_staff: staff,
                    is_superuser: superuser,
                },
            )
            .await?;
            println!(
                "created user {:?} (id {}, staff: {}, superuser: {})",
                user.username, user.id, user.is_staff, user.is_superuser
            );
        }
        Command::Openapi => print!("{}", crate::http::openapi::openapi_json()),
        Command::Reprice {
            missing_only,
            since,
            until,
        } => {
            // Dates are checked before the database is touched.
            let filter = range_filter(since.as_deref(), until.as_deref())?;
            let db = open_migrated(&settings).await?;
            let scope = crate::usage::reprice::RepriceScope {
                filter,
                missing_only,
            };
            let report = crate::usage::reprice::reprice(&db, &settings.prices, &scope, 1000, |r| {
                tracing::info!(scanned = r.scanned, changed = r.changed, "repricing");
            })
            .await?;
            println!(
                "repriced: {} rows scanned, {} changed, {} without a price",
                report.scanned, report.changed, report.unpriced
            );
        }
        Command::Rollup { action } => rollup(&settings, action).await?,
        Command::Retention {
            dry_run,
            older_than,
        } => {
            let days = match (older_than, settings.usage_retention_days) {
                (Some(raw), _) => crate::retention::parse_days(&raw)
                    .map_err(|e| CliError::Usage(format!("--older-than {e}")))?,
                (None, Some(days)) => days,
                (None, None) => {
                    return Err(CliError::Usage(
                        "no retention: pass --older-than (e.g. 400d) or set USAGE_RETENTION_DAYS"
                            .into(),
                    ));
                }
            };
            let db = open_migrated(&settings).await?;
            let started = std::time::Instant::now();
            let report = crate::retention::run(&db, days, dry_run, chrono::Utc::now()).await?;
            let before = report
                .horizon
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            if report.dry_run {
                println!(
                    "retention (dry run): {} rows created before {before} would be deleted; nothing changed",
                    report.rows
                );
            } else {
                println!(
                    "retention: {} rows created before {before} deleted in {} batches, {:.1} s; their statistics kept",
                    report.rows,
                    report.batches,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Command::Key { action } => key(&settings, action).await?,
        Command::Call {
            prompt,
            system,
            node_name,
            user_id,
            json,
            stream,
        } => {
            let mode = match (json, stream) {
                (true, _) => Reply::Json,
                (_, true) => Reply::Stream,
                _ => Reply::Text,
            };
            call(&settings, prompt, system, node_name, user_id, mode).await?;
        }
        Command::Token { username, ttl } => {
            let ttl = jwt::parse_ttl(&ttl).map_err(CliError::Usage)?;
            let secret = settings.require_jwt_secret()?.clone();
            let db = open_migrated(&settings).await?;
            let user = users::find_by_username(&db, &username)
                .await?
                .ok_or(UserError::NotFound(username))?;
            if !user.is_active {
                eprintln!(
                    "warning: user {:?} is inactive; the API will refuse this token",
                    user.username
                );
            } else if !(user.is_staff || user.is_superuser) {
                eprintln!(
                    "warning: user {:?} is neither staff nor superuser; the admin API will answer 403",
                    user.username
                );
            }
            println!("{}", jwt::mint_access_token(secret.expose(), user.id, ttl));
        }
    }
    Ok(())
}

/// How `call` prints the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Text,
    Json,
    Stream,
}

async fn call(
    settings: &Settings,
    prompt: String,
    system: Option<String>,
    node_name: String,
    user_id: Option<i32>,
    mode: Reply,
) -> Result<(), CliError> {
    let json = mode == Reply::Json;
    if prompt.trim().is_empty() {
        return Err(CliError::Usage("the prompt must not be empty".into()));
    }
    let tracker = LlmTracker::from_settings(settings).await?;
    let messages = system
        .into_iter()
        .map(Message::system)
        .chain([Message::user(prompt)])
        .collect();
    let request = CallRequest::new(messages)
        .node_name(node_name)
        .json_mode(json)
        .state(CallState {
            user_id,
            source_type: Some("cli".into()),
            ..Default::default()
        });
    // Provider messages can echo a key back; the terminal gets what the row got.
    let secrets = crate::tracker::options_from_settings(settings).secrets;
    let failed = |e: &crate::tracker::TrackerError, id: Option<String>| {
        if let Some(id) = id {
            eprintln!("recorded as row {id}");
        }
        CliError::Usage(crate::redact::redact(&e.to_string(), &secrets))
    };
    if mode == Reply::Stream {
        use futures_util::StreamExt;
        use std::io::Write;
        let (mut deltas, handle) = tracker.call_and_track_stream(request)?;
        let mut out = std::io::stdout();
        while let Some(delta) = deltas.next().await {
            if let Ok(text) = delta {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
        let record = handle.await?;
        tracker.shutdown().await;
        let row_id = record.row_id.to_string();
        return match &record.result {
            Ok(_) => {
                println!();
                println!(
                    "{}",
                    serde_json::to_string(&record.usage).unwrap_or_default()
                );
                println!("row_id: {row_id}");
                Ok(())
            }
            Err(e) => Err(failed(e, Some(row_id))),
        };
    }
    let tracked = tracker.track(request).await;
    tracker.shutdown().await;
    let row_id = tracked.row_id.map(|id| id.to_string());
    match tracked.result {
        Ok((content, usage)) if json => {
            let doc = serde_json::json!({"content": content, "usage": usage, "row_id": row_id});
            println!("{doc}");
            Ok(())
        }
        Ok((content, usage)) => {
            println!("{content}");
            println!("{}", serde_json::to_string(&usage).unwrap_or_default());
            println!("row_id: {}", row_id.unwrap_or_default());
            Ok(())
        }
        Err(e) => Err(failed(&e, row_id)),
    }
}

fn random_string(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Demo rows, an admin user and a token, printed with the URLs to open.
async fn demo_setup(settings: &Settings, db: &sea_orm::DatabaseConnection) -> Result<(), CliError> {
    let written =
        crate::demo::seed(db, &settings.prices, crate::demo::DEMO_ROWS, rand::random()).await?;
    if written > 0 {
        // The seeded rows into the rollup's cells, and planner statistics for all of them:
        // without, token-stats over the demo took 230 ms instead of 17 ms on PostgreSQL until
        // autovacuum got round to it.
        crate::usage::rollup::fold(db).await?;
        migration::analyze_usage_tables(db).await?;
    }
    let password = match users::find_by_username(db, "admin").await? {
        Some(_) => None,
        None => {
            let password = random_string(16);
            let new = NewUser {
                username: "admin".into(),
                password: Some(password.clone()),
                is_staff: true,
                is_superuser: true,
            };
            users::create_user(db, new).await?;
            Some(password)
        }
    };
    let admin = users::find_by_username(db, "admin")
        .await?
        .ok_or_else(|| UserError::NotFound("admin".into()))?;
    let secret = settings.require_jwt_secret()?;
    let token = jwt::mint_access_token(
        secret.expose(),
        admin.id,
        std::time::Duration::from_secs(12 * 3600),
    );
    let base = format!("http://{}", settings.bind_addr);
    println!("llm-tracker demo");
    if written > 0 {
        println!("  demo data:    {written} usage rows over the last 90 days");
    } else {
        println!("  demo data:    the database already had usage rows; none added");
    }
    println!("  admin pages:  {base}/admin/  (sign in as the admin user below)");
    println!("  Swagger UI:   {base}/api/docs/  (Authorize with the token below)");
    println!("  token-stats:  {base}/api/v1/admin/token-stats/?granularity=month");
    println!("  llm-usage:    {base}/api/v1/admin/llm-usage/");
    match password {
        Some(pw) => println!("  admin user:   admin / {pw}"),
        None => println!("  admin user:   admin (existing; password unchanged)"),
    }
    println!("  admin token (12 h):");
    println!("{token}");
    println!("  try: curl -H \"Authorization: Bearer $TOKEN\" '{base}/api/v1/admin/token-stats/'");
    Ok(())
}

async fn open_migrated(settings: &Settings) -> Result<sea_orm::DatabaseConnection, CliError> {
    let db = crate::db::connect(&settings.database_url).await?;
    crate::db::migrate(&db).await?;
    Ok(db)
}

/// clap's usage errors span several lines; the CLI promises one.
pub fn one_line_usage_error(err: &clap::Error) -> String {
    let rendered = err.to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    format!("error: {message} (see --help)")
}
