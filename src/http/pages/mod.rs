//! Django-style admin pages (SPEC §8): sign in with a Django password, an overview with a
//! chart, the usage listing and one row's detail, for active staff and superusers. Server
//! rendered with askama templates compiled into the binary (every value HTML-escaped), the
//! stylesheet embedded; the figures come from the same `usage/` functions as the API.

mod api_keys;
pub mod chart;
pub mod format;
pub mod session;

use std::collections::HashMap;

use actix_web::cookie::{Cookie, SameSite, time::Duration as CookieDuration};
use actix_web::http::{StatusCode, header};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use askama::Template;
use sea_orm::{ConnectionTrait, EntityTrait};

use crate::auth::password::check_password;
use crate::db::entities::auth_user;
use crate::http::AppState;
use crate::usage::buckets::{MAX_BUCKETS, buckets_between};
use crate::usage::list::{UsageRow, get_usage, list_usage_ordered};
use crate::usage::stats::{self, Granularity, SeriesOptions, Summary};
use crate::usage::{FilterParams, UsageFilter};
use session::{
    CSRF_COOKIE, DEVICE_COOKIE, DEVICE_TTL, SESSION_COOKIE, SESSION_TTL, Session, Signer,
};

/// The message of a refused sign-in, whatever the reason (Django's).
const BAD_LOGIN: &str = "Please enter the correct username and password for a staff account. Note that both fields may be case-sensitive.";
const TOO_MANY: &str = "Too many failed sign-ins. Try again in a few minutes.";
const PAGE_SIZE: u64 = 25;

/// Registers the pages.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/login/")
            .route(web::get().to(login_form))
            .route(web::post().to(login)),
    )
    .service(web::resource("/admin/logout/").route(web::post().to(logout)))
    .service(web::resource("/admin/").route(web::get().to(overview)))
    .service(web::resource("/admin").route(web::get().to(to_overview)))
    .service(web::resource("/admin/llm-usage/").route(web::get().to(usage_list)))
    .service(web::resource("/admin/llm-usage/export.csv").route(web::get().to(usage_export)))
    .service(web::resource("/admin/llm-usage/{id}/").route(web::get().to(usage_detail)))
    .service(web::resource("/admin/static/admin.css").route(web::get().to(stylesheet)))
    .configure(api_keys::configure);
}

// ---------------------------------------------------------------------------------------------
// Errors and the signed-in user

/// Why a page was not served.
#[derive(Debug)]
pub enum PageError {
    /// Not signed in (or the session ended): to the sign-in page, then back here.
    SignIn {
        next: String,
    },
    BadRequest(String),
    Forbidden(String),
    NotFound,
    TooManyRequests,
    Unavailable,
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Template)]
#[template(path = "admin/error.html")]
struct ErrorPage<'a> {
    signed_in: Option<String>,
    csrf: String,
    heading: &'a str,
    message: &'a str,
}

impl ResponseError for PageError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::SignIn { .. } => StatusCode::FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (heading, message) = match self {
            Self::SignIn { next } => {
                let to = format!("/admin/login/?next={}", urlencode(next));
                return HttpResponse::Found()
                    .insert_header((header::LOCATION, to))
                    .finish();
            }
            Self::BadRequest(m) => ("Bad request", m.as_str()),
            Self::Forbidden(m) => ("Forbidden", m.as_str()),
            Self::NotFound => ("Not found", "There is no such page or row."),
            Self::TooManyRequests => ("Too many requests", TOO_MANY),
            Self::Unavailable => (
                "Service unavailable",
                "The database is not answering. Try again shortly.",
            ),
        };
        html(
            self.status_code(),
            ErrorPage {
                signed_in: None,
                csrf: String::new(),
                heading,
                message,
            }
            .render(),
        )
    }
}

fn db_error(e: sea_orm::DbErr) -> PageError {
    tracing::error!(error = %e, "admin page: database error");
    PageError::Unavailable
}

fn html(status: StatusCode, rendered: askama::Result<String>) -> HttpResponse {
    match rendered {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header(("X-Frame-Options", "DENY"))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .insert_header((
                "Content-Security-Policy",
                "default-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
            ))
            .body(body),
        Err(e) => {
            tracing::error!(error = %e, "admin page: template error");
            HttpResponse::InternalServerError()
                .content_type("text/html; charset=utf-8")
                .body("<h1>Server error</h1>")
        }
    }
}

fn signer(state: &AppState) -> Result<Signer, PageError> {
    match &state.settings.jwt_secret {
        Some(secret) => Ok(Signer::new(secret.expose())),
        None => {
            tracing::error!("admin pages need JWT_SECRET (their sessions are signed with it)");
            Err(PageError::Unavailable)
        }
    }
}

/// A POST must come from this site (`Origin`, else `Referer`); see [`session::same_origin`].
fn check_origin(req: &HttpRequest) -> Result<(), PageError> {
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let info = req.connection_info();
    let own = format!("{}://{}", info.scheme(), info.host());
    if session::same_origin(
        header(header::ORIGIN).as_deref(),
        header(header::REFERER).as_deref(),
        &own,
    ) {
        Ok(())
    } else {
        Err(PageError::Forbidden(
            "CSRF verification failed: the request did not come from this site.".into(),
        ))
    }
}

/// A signed-in page's POST carries its session's CSRF token.
fn csrf_ok(staff: &Staff, token: &str) -> Result<(), PageError> {
    if session::same_token(&staff.session.csrf, token) {
        Ok(())
    } else {
        Err(PageError::Forbidden(
            "CSRF verification failed: reload the page and try again.".into(),
        ))
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A signed-in, active staff user or superuser, and their session.
pub struct Staff {
    pub user: auth_user::Model,
    pub session: Session,
}

impl FromRequest for Staff {
    type Error = PageError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, PageError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let cookie = req.cookie(SESSION_COOKIE).map(|c| c.value().to_owned());
        let next = match req.query_string() {
            "" => req.path().to_owned(),
            q => format!("{}?{q}", req.path()),
        };
        Box::pin(async move {
            let state = state.ok_or(PageError::Unavailable)?;
            let signer = signer(&state)?;
            let sign_in = || PageError::SignIn { next: next.clone() };
            let session = cookie
                .and_then(|c| signer.decode(&c, now()))
                .ok_or_else(sign_in)?;
            let user = auth_user::Entity::find_by_id(session.user_id)
                .one(&state.db)
                .await
                .map_err(db_error)?
                .ok_or_else(sign_in)?;
            let allowed = user.is_active && (user.is_staff || user.is_superuser);
            if !allowed || signer.password_tag(&user.password) != session.password_tag {
                return Err(sign_in());
            }
            // Ended on the server (logged out, signed out everywhere)?
            let open = session::records::is_open(&state.db, &signer.record_key(&session), now())
                .await
                .map_err(db_error)?;
            if !open {
                return Err(sign_in());
            }
            Ok(Staff { user, session })
        })
    }
}

/// The signed-in username and CSRF token every page's header needs.
fn chrome(staff: &Staff) -> (Option<String>, String) {
    (
        Some(staff.user.username.clone()),
        staff.session.csrf.clone(),
    )
}

/// Percent-encoding for a query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The query string as a map; a malformed one is a 400.
fn query_map(req: &HttpRequest) -> Result<HashMap<String, String>, PageError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|_| PageError::BadRequest("The address has a malformed query string.".into()))
}

fn param(q: &HashMap<String, String>, key: &str) -> String {
    q.get(key).map(|v| v.trim().to_owned()).unwrap_or_default()
}

/// Exact USD, without trailing zeros (`0.00128`).

// ---------------------------------------------------------------------------------------------
// Sign in and out

#[derive(Template)]
#[template(path = "admin/login.html")]
struct LoginPage<'a> {
    signed_in: Option<String>,
    csrf: String,
    next: &'a str,
    username: &'a str,
    error: Option<&'a str>,
}

/// Only local admin paths are followed after sign-in (no open redirect). A path holding a
/// control character (a header injection: CR, LF, NUL, DEL) falls back to `/admin/`; anything
/// outside printable ASCII is percent-encoded, so the `Location` header is always valid and
/// `/admin/é` arrives as `/admin/%C3%A9`.
fn safe_next(next: &str) -> String {
    let ok = next.starts_with("/admin/")
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    if !ok {
        return "/admin/".to_owned();
    }
    let mut out = String::with_capacity(next.len());
    for c in next.chars() {
        if c.is_ascii_graphic() && !matches!(c, '"' | '<' | '>' | '`' | '{' | '}' | '|' | '^') {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn csrf_cookie(req: &HttpRequest, token: &str) -> Cookie<'static> {
    Cookie::build(CSRF_COOKIE, token.to_owned())
        .path("/admin/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(req.connection_info().scheme() == "https")
        .finish()
}

fn login_page(
    req: &HttpRequest,
    signer: &Signer,
    status: StatusCode,
    next: &str,
    username: &str,
    error: Option<&str>,
) -> HttpResponse {
    // Reuse the visitor's CSRF cookie if it is one of ours, else start one.
    let token = req
        .cookie(CSRF_COOKIE)
        .map(|c| c.value().to_owned())
        .filter(|t| signer.csrf_is_ours(t))
        .unwrap_or_else(|| signer.new_csrf());
    let mut res = html(
        status,
        LoginPage {
            signed_in: None,
            csrf: token.clone(),
            next: &safe_next(next),
            username,
            error,
        }
        .render(),
    );
    let _ = res.add_cookie(&csrf_cookie(req, &token));
    res
}

async fn login_form(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let q = query_map(&req)?;
    Ok(login_page(
        &req,
        &signer(&state)?,
        StatusCode::OK,
        &param(&q, "next"),
        "",
        None,
    ))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrfmiddlewaretoken: String,
    #[serde(default)]
    next: String,
}

async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, PageError> {
    let form: LoginForm = serde_urlencoded_form(&body)?;
    let signer = signer(&state)?;
    check_origin(&req)?;
    let cookie_token = req.cookie(CSRF_COOKIE).map(|c| c.value().to_owned());
    let csrf_ok = cookie_token.as_deref().is_some_and(|t| {
        signer.csrf_is_ours(t) && session::same_token(t, &form.csrfmiddlewaretoken)
    });
    if !csrf_ok {
        return Err(PageError::Forbidden(
            "CSRF verification failed: reload the sign-in page and try again.".into(),
        ));
    }
    let ip = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    // Failures count per client address, and per username — except from a browser where
    // this user signed in before (its device cookie): an attacker who exhausts the username's
    // limit then blocks new devices only, not the owner's own.
    let known_device = req
        .cookie(DEVICE_COOKIE)
        .is_some_and(|c| signer.device_is_for(c.value(), &form.username, now()));
    let user_key = format!("user:{}", form.username.to_lowercase());
    let mut keys = vec![format!("ip:{ip}")];
    if !known_device {
        keys.push(user_key);
    }
    if state.login_limiter.blocked(&keys) {
        tracing::warn!(ip = %ip, "admin sign-in refused: too many failures");
        return Ok(login_page(
            &req,
            &signer,
            StatusCode::TOO_MANY_REQUESTS,
            &form.next,
            &form.username,
            Some(TOO_MANY),
        ));
    }
    let user = crate::users::find_by_username(&state.db, &form.username)
        .await
        .map_err(db_error)?;
    // The hash is checked even for an unknown user, so timing does not tell who exists.
    let encoded = user
        .as_ref()
        .map(|u| u.password.as_str())
        .unwrap_or(DUMMY_HASH.as_str());
    let password_ok = check_password(&form.password, encoded);
    let user = match user {
        Some(u) if password_ok && u.is_active && (u.is_staff || u.is_superuser) => u,
        _ => {
            state.login_limiter.fail(&keys);
            tracing::info!(ip = %ip, "admin sign-in failed");
            return Ok(login_page(
                &req,
                &signer,
                StatusCode::OK,
                &form.next,
                &form.username,
                Some(BAD_LOGIN),
            ));
        }
    };
    // The username's failures are not cleared by a success: an attacker would get a fresh
    // allowance every time the owner signs in.
    let session = Session {
        user_id: user.id,
        expires: now() + SESSION_TTL.as_secs() as i64,
        csrf: session::random_token(),
        password_tag: signer.password_tag(&user.password),
    };
    session::records::open(
        &state.db,
        &signer.record_key(&session),
        user.id,
        session.expires,
        now(),
    )
    .await
    .map_err(db_error)?;
    // As Django: the sign-in is recorded in last_login.
    let record = sea_orm::sea_query::Query::update()
        .table(auth_user::Entity)
        .value(
            auth_user::Column::LastLogin,
            crate::db::Dialect::of(state.db.get_database_backend())
                .datetime(crate::tracker::now_micros()),
        )
        .and_where(sea_orm::ColumnTrait::eq(&auth_user::Column::Id, user.id))
        .to_owned();
    if let Err(e) = state.db.execute(&record).await {
        tracing::warn!(error = %e, "could not record last_login");
    }
    let cookie = Cookie::build(SESSION_COOKIE, signer.encode(&session))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(req.connection_info().scheme() == "https")
        .max_age(CookieDuration::seconds(SESSION_TTL.as_secs() as i64))
        .finish();
    let device = Cookie::build(
        DEVICE_COOKIE,
        signer.device_token(&form.username, now() + DEVICE_TTL.as_secs() as i64),
    )
    .path("/admin/")
    .http_only(true)
    .same_site(SameSite::Lax)
    .secure(req.connection_info().scheme() == "https")
    .max_age(CookieDuration::seconds(DEVICE_TTL.as_secs() as i64))
    .finish();
    Ok(HttpResponse::Found()
        .insert_header((header::LOCATION, safe_next(&form.next)))
        .cookie(cookie)
        .cookie(device)
        .finish())
}

/// A real hash (of a random password) checked when the username is unknown, so the answer
/// takes as long as for a known one.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| crate::auth::password::make_password(&session::random_token()));

fn serde_urlencoded_form<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PageError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| PageError::BadRequest("The form was not UTF-8.".into()))?;
    web::Query::<T>::from_query(text)
        .map(web::Query::into_inner)
        .map_err(|_| PageError::BadRequest("The form could not be read.".into()))
}

#[derive(serde::Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrfmiddlewaretoken: String,
    /// Present (any value): end every session of this user, not only this one.
    #[serde(default)]
    everywhere: Option<String>,
}

async fn logout(
    req: HttpRequest,
    staff: Staff,
    body: web::Bytes,
) -> Result<HttpResponse, PageError> {
    let form: LogoutForm = serde_urlencoded_form(&body)?;
    check_origin(&req)?;
    csrf_ok(&staff, &form.csrfmiddlewaretoken)?;
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or(PageError::Unavailable)?;
    let signer = signer(&state)?;
    // The session ends on the server too: its cookie, replayed later, no longer opens a page.
    if form.everywhere.is_some() {
        let ended = session::records::close_all(&state.db, staff.user.id)
            .await
            .map_err(db_error)?;
        tracing::info!(
            user_id = staff.user.id,
            sessions = ended,
            "admin signed out everywhere"
        );
    } else {
        session::records::close(&state.db, &signer.record_key(&staff.session))
            .await
            .map_err(db_error)?;
    }
    let mut gone = Cookie::build(SESSION_COOKIE, "").path("/").finish();
    gone.make_removal();
    Ok(HttpResponse::Found()
        .insert_header((header::LOCATION, "/admin/login/"))
        .cookie(gone)
        .finish())
}

async fn to_overview() -> HttpResponse {
    HttpResponse::MovedPermanently()
        .insert_header((header::LOCATION, "/admin/"))
        .finish()
}

async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(include_str!("admin.css"))
}

// ---------------------------------------------------------------------------------------------
// Overview

#[derive(Template)]
#[template(path = "admin/overview.html")]
struct OverviewPage {
    signed_in: Option<String>,
    csrf: String,
    start_date: String,
    end_date: String,
    user_id: String,
    tz: String,
    zones: Vec<&'static str>,
    granularity: String,
    granularities: Vec<(&'static str, &'static str)>,
    error: Option<String>,
    cards: Vec<(&'static str, &'static str, String)>,
    bucket_name: &'static str,
    metric: &'static str,
    metric_links: Vec<(&'static str, &'static str, String)>,
    chart: String,
    outcome_chart: String,
    failure_chart: String,
    latency_chart: String,
    ttft_chart: String,
    by_model: Vec<ModelView>,
    top_users: Vec<UserView>,
    listing_query: String,
    errors: Vec<ErrorView>,
    errors_note: Option<String>,
    failed_listing: String,
    legend: Vec<(String, &'static str)>,
}

/// A line of the top error messages.
struct ErrorView {
    message: String,
    count: String,
    last_seen: String,
    last_seen_exact: String,
}

/// A model's line as shown: every figure formatted.
struct ModelView {
    model: String,
    calls: String,
    prompt: String,
    completion: String,
    total: String,
    cached: String,
    reasoning: String,
    cost: String,
    cost_share: String,
    latency: String,
    p50: String,
    p95: String,
    ttft: String,
}

/// A user's line of the top users.
struct UserView {
    user_id: Option<i32>,
    name: String,
    calls: String,
    tokens: String,
    token_share: String,
    cost: String,
}

/// What the overview's main chart shows per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Tokens,
    Cost,
    Calls,
}

impl Metric {
    const ALL: [(Metric, &'static str, &'static str); 3] = [
        (Metric::Tokens, "tokens", "Tokens"),
        (Metric::Cost, "cost", "Cost"),
        (Metric::Calls, "calls", "Calls"),
    ];

    fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, name, _)| raw.eq_ignore_ascii_case(name))
            .map(|(m, _, _)| *m)
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _, _)| *m == self)
            .map(|(_, n, _)| *n)
            .unwrap_or("tokens")
    }
}

/// Models stacked apart in the overview's main chart; the others are stacked as one.
const STACKED_MODELS: usize = 6;

/// The CSS classes of the stacked models' segments, the last for the other models.
const MODEL_CLASSES: [&str; STACKED_MODELS + 1] = ["m0", "m1", "m2", "m3", "m4", "m5", "m6"];

/// Optional seconds as a duration, `–` when unknown.
fn seconds(s: Option<f64>) -> String {
    s.map(format::duration).unwrap_or_else(|| "–".into())
}

/// Models in the latency charts (the largest by tokens).
const LATENCY_MODELS: usize = 10;

const ZONES: [&str; 8] = [
    "UTC",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Asia/Shanghai",
    "Asia/Tokyo",
];

/// A filter from the page's parameters (read as the API reads them), or the message to show.
fn page_filter(
    state: &AppState,
    req: &HttpRequest,
    with_model_and_success: bool,
) -> Result<(chrono_tz::Tz, UsageFilter), String> {
    let params = web::Query::<FilterParams>::from_query(req.query_string())
        .map_err(|_| "The address has a malformed query string.".to_owned())?
        .into_inner();
    let params = if with_model_and_success {
        params
    } else {
        params.without_row_filters()
    };
    params
        .parse(state.settings.default_timezone)
        .map_err(|e| e.to_string())
}

async fn overview(
    staff: Staff,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let q = query_map(&req)?;
    let (signed_in, csrf) = chrome(&staff);
    let raw_granularity = match param(&q, "granularity").as_str() {
        "" => "month".to_owned(),
        g => g.to_lowercase(),
    };
    let mut error = None;
    let granularity = Granularity::parse(&raw_granularity).unwrap_or_else(|| {
        error = Some("Unsupported granularity. Use one of: day, month, year.".to_owned());
        Granularity::Month
    });
    let (tz, filter) = match page_filter(&state, &req, false) {
        Ok(v) => v,
        Err(m) => {
            error = Some(m);
            (state.settings.default_timezone, UsageFilter::default())
        }
    };
    let mut fill = false;
    if let (Some(s), Some(e)) = (filter.start, filter.end) {
        match buckets_between(granularity, tz, s, e) {
            Ok(_) => fill = true,
            Err(n) => {
                error = Some(format!(
                    "The range holds {n} buckets, more than {MAX_BUCKETS}: choose a coarser chart or a shorter range."
                ))
            }
        }
    }
    // The reads that do not depend on each other run at once, each on its own connection (the
    // database works on them in parallel); the per-model series needs the largest models
    // first, so it follows the statistics while the other reads (the top users take longest)
    // go on.
    let db = &state.read_db;
    let ok = error.is_none();
    let (stats_and_models, top_users, top_errors, latency) = tokio::join!(
        async {
            if !ok {
                return Ok((None, Vec::new()));
            }
            let data =
                stats::token_stats_in(db, &filter, Some(granularity), SeriesOptions { tz, fill })
                    .await?;
            // Stacked by model over all users: the six largest models read from their cells,
            // the rest as one stack (the all-models series less them: exact, and far fewer
            // cells to read).
            let top_models: Vec<String> = data
                .by_model
                .iter()
                .take(STACKED_MODELS)
                .map(|m| m.model.clone())
                .collect();
            let per_model =
                if filter.user_id.is_some() || data.series.as_ref().is_none_or(|s| s.is_empty()) {
                    Vec::new()
                } else {
                    stats::series_by_model(db, &filter, granularity, tz, Some(&top_models)).await?
                };
            Ok::<_, sea_orm::DbErr>((Some(data), per_model))
        },
        async {
            match ok && filter.user_id.is_none() {
                true => stats::stats_by_user(db, &filter, 10).await,
                false => Ok(Vec::new()),
            }
        },
        async {
            match ok {
                true => crate::usage::errors::top_errors(db, &filter, 10)
                    .await
                    .map(Some),
                false => Ok(None),
            }
        },
        async {
            // Latency percentiles per model (exact counts, values within 5 %).
            match ok {
                true => crate::usage::latency::latency_histograms(db, &filter).await,
                false => Ok(crate::usage::latency::LatencyHistograms::default()),
            }
        },
    );
    let latency = latency.map_err(db_error)?;
    let (stats, per_model) = stats_and_models.map_err(db_error)?;
    // The percentiles on each model's line, as the API's include=latency sets them.
    let (summary, by_model, series) = match stats {
        Some(data) => {
            let data = data.with_latency(&latency);
            (data.summary, data.by_model, data.series.unwrap_or_default())
        }
        None => (Summary::default(), Vec::new(), Vec::new()),
    };
    let top_users = top_users.map_err(db_error)?;
    let top_errors = top_errors
        .map_err(db_error)?
        .filter(|_| summary.failed_calls > 0);
    let success_rate = if summary.total_calls == 0 {
        "–".to_owned()
    } else {
        format!(
            "{:.1} %",
            summary.successful_calls as f64 * 100.0 / summary.total_calls as f64
        )
    };
    let bucket_name = match granularity {
        Granularity::Day => "hour",
        Granularity::Month => "day",
        Granularity::Year => "month",
    };
    let metric = Metric::parse(&param(&q, "metric")).unwrap_or(Metric::Tokens);
    let series_cost: Vec<i64> = series.iter().map(|i| i.total_cost.0).collect();
    let series_decimals = format::money_decimals(&series_cost);
    let empty_text = "No calls in this range: widen the dates, or clear the user filter";
    let bar_title = |i: &stats::SeriesItem| {
        format!(
            "{}: {} tokens, {} calls ({} failed), {}",
            i.bucket,
            format::thousands(i.total_tokens),
            format::thousands(i.total_calls),
            format::thousands(i.total_calls - i.successful_calls),
            format::money(i.total_cost.0, series_decimals)
        )
    };
    let (chart_title, axis) = match metric {
        Metric::Tokens => (format!("Total tokens by {bucket_name}"), chart::Axis::Count),
        Metric::Cost => (format!("Cost (USD) by {bucket_name}"), chart::Axis::Usd),
        Metric::Calls => (format!("Calls by {bucket_name}"), chart::Axis::Count),
    };
    let value = |i: &stats::SeriesItem| match metric {
        Metric::Tokens => i.total_tokens as f64,
        Metric::Cost => i.total_cost.0 as f64 / 1e6,
        Metric::Calls => i.total_calls as f64,
    };
    let shown = |v: f64| match metric {
        Metric::Cost => format::money((v * 1e6).round() as i64, series_decimals),
        _ => format::thousands(v.round() as i64),
    };
    let others = !per_model.is_empty() && by_model.len() > STACKED_MODELS;
    let mut legend: Vec<(String, &'static str)> = per_model
        .iter()
        .zip(MODEL_CLASSES)
        .map(|(m, class)| (m.model.clone(), class))
        .collect();
    if others {
        legend.push(("other models".to_owned(), MODEL_CLASSES[STACKED_MODELS]));
    }
    let mut stacks: HashMap<String, Vec<f64>> = HashMap::new();
    for (k, m) in per_model.iter().enumerate() {
        for item in &m.series {
            stacks
                .entry(item.bucket.clone())
                .or_insert_with(|| vec![0.0; STACKED_MODELS + 1])[k] += value(item);
        }
    }
    if others {
        for i in &series {
            let stack = stacks
                .entry(i.bucket.clone())
                .or_insert_with(|| vec![0.0; STACKED_MODELS + 1]);
            let top: f64 = stack[..STACKED_MODELS].iter().sum();
            stack[STACKED_MODELS] = (value(i) - top).max(0.0);
        }
    }
    let main_bars: Vec<chart::Bar> = series
        .iter()
        .map(|i| match stacks.get(&i.bucket) {
            Some(stack) => chart::Bar {
                label: i.bucket.clone(),
                segments: stack
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (MODEL_CLASSES[k], *v))
                    .collect(),
                title: format!(
                    "{}; {}",
                    bar_title(i),
                    legend
                        .iter()
                        .zip(stack)
                        .filter(|(_, v)| **v > 0.0)
                        .map(|((name, _), v)| format!("{name} {}", shown(*v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            None => chart::Bar {
                label: i.bucket.clone(),
                segments: vec![("bar", value(i))],
                title: bar_title(i),
            },
        })
        .collect();
    let chart = chart::bars(&main_bars, chart::WIDE, &chart_title, axis, empty_text);
    let outcome_bars: Vec<chart::Bar> = series
        .iter()
        .map(|i| chart::Bar {
            label: i.bucket.clone(),
            segments: vec![
                ("ok", i.successful_calls as f64),
                ("failed", (i.total_calls - i.successful_calls) as f64),
            ],
            title: format!(
                "{}: {} calls, {} succeeded, {} failed",
                i.bucket,
                format::thousands(i.total_calls),
                format::thousands(i.successful_calls),
                format::thousands(i.total_calls - i.successful_calls)
            ),
        })
        .collect();
    let outcome_chart = chart::bars(
        &outcome_bars,
        chart::HALF,
        &format!("Calls by outcome by {bucket_name}"),
        chart::Axis::Count,
        empty_text,
    );
    let rates: Vec<(String, Option<f64>, String)> = series
        .iter()
        .map(|i| {
            let failed = i.total_calls - i.successful_calls;
            let rate = (i.total_calls > 0).then(|| failed as f64 * 100.0 / i.total_calls as f64);
            (
                i.bucket.clone(),
                rate,
                format!(
                    "{}: {} of {} calls failed ({})",
                    i.bucket,
                    format::thousands(failed),
                    format::thousands(i.total_calls),
                    format::share(failed, i.total_calls)
                ),
            )
        })
        .collect();
    let failure_chart = chart::rate_line(
        &rates,
        chart::HALF,
        &format!("Failure rate by {bucket_name}"),
        empty_text,
    );
    let charted: Vec<&stats::ModelStats> = by_model.iter().take(LATENCY_MODELS).collect();
    let latency_bars: Vec<chart::Bar> = charted
        .iter()
        .filter_map(|m| {
            let (p50, p95) = (m.latency_p50_sec.flatten()?, m.latency_p95_sec.flatten()?);
            Some(chart::Bar {
                label: m.model.clone(),
                segments: vec![("p50", p50), ("p95", (p95 - p50).max(0.0))],
                title: format!(
                    "{}: p50 {}, p95 {}, p99 {}, mean {} over {} timed calls",
                    m.model,
                    seconds(Some(p50)),
                    seconds(Some(p95)),
                    seconds(m.latency_p99_sec.flatten()),
                    seconds(m.avg_latency_sec),
                    format::thousands(latency.by_model.get(&m.model).map_or(0, |h| h.calls()))
                ),
            })
        })
        .collect();
    let latency_chart = chart::hbars(
        &latency_bars,
        chart::HALF,
        "Latency by model (p50, p95)",
        chart::Axis::Seconds,
        "No timed calls: latency needs started_at",
    );
    let ttft_bars: Vec<chart::Bar> = charted
        .iter()
        .filter_map(|m| {
            let t = m.avg_ttft_sec?;
            Some(chart::Bar {
                label: m.model.clone(),
                segments: vec![("ttft", t)],
                title: format!("{}: mean time to first token {}", m.model, seconds(Some(t))),
            })
        })
        .collect();
    let ttft_chart = chart::hbars(
        &ttft_bars,
        chart::HALF,
        "Time to first token by model (mean of streamed calls)",
        chart::Axis::Seconds,
        "No streamed calls in this range",
    );
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let model_costs: Vec<i64> = by_model.iter().map(|m| m.total_cost.0).collect();
    let model_decimals = format::money_decimals(&model_costs);
    let by_model = by_model
        .into_iter()
        .map(|m| ModelView {
            calls: format::thousands(m.total_calls),
            prompt: format::thousands(m.total_prompt_tokens),
            completion: format::thousands(m.total_completion_tokens),
            total: format::thousands(m.total_tokens),
            cached: format::thousands(m.total_cached_tokens),
            reasoning: format::thousands(m.total_reasoning_tokens),
            cost: format::money(m.total_cost.0, model_decimals),
            cost_share: format::share(m.total_cost.0, summary.total_cost.0),
            latency: seconds(m.avg_latency_sec),
            p50: seconds(m.latency_p50_sec.flatten()),
            p95: seconds(m.latency_p95_sec.flatten()),
            ttft: seconds(m.avg_ttft_sec),
            model: m.model,
        })
        .collect();
    let user_costs: Vec<i64> = top_users.iter().map(|u| u.total_cost.0).collect();
    let user_decimals = format::money_decimals(&user_costs);
    let top_users = top_users
        .into_iter()
        .map(|u| UserView {
            user_id: u.user_id,
            name: match (&u.username, u.user_id) {
                (Some(name), _) => name.clone(),
                (None, Some(id)) => format!("#{id} (deleted)"),
                (None, None) => "no user".to_owned(),
            },
            calls: format::thousands(u.total_calls),
            tokens: format::thousands(u.total_tokens),
            token_share: format::share(u.total_tokens, summary.total_tokens),
            cost: format::money(u.total_cost.0, user_decimals),
        })
        .collect();
    let cards = vec![
        (
            "Calls",
            "total-calls",
            format::thousands(summary.total_calls),
        ),
        ("Success rate", "success-rate", success_rate),
        (
            "Failed calls",
            "failed-calls",
            format::thousands(summary.failed_calls),
        ),
        (
            "Total tokens",
            "total-tokens",
            format::thousands(summary.total_tokens),
        ),
        (
            "Prompt tokens",
            "prompt-tokens",
            format::thousands(summary.total_prompt_tokens),
        ),
        (
            "Completion tokens",
            "completion-tokens",
            format::thousands(summary.total_completion_tokens),
        ),
        (
            "Cached tokens",
            "cached-tokens",
            format::thousands(summary.total_cached_tokens),
        ),
        (
            "Reasoning tokens",
            "reasoning-tokens",
            format::thousands(summary.total_reasoning_tokens),
        ),
        (
            "Cost (USD)",
            "total-cost",
            format::money(
                summary.total_cost.0,
                format::money_decimals(&[summary.total_cost.0]),
            ),
        ),
    ];
    let kept = ["start_date", "end_date", "user_id", "tz", "granularity"];
    let metric_links = Metric::ALL
        .iter()
        .map(|(_, name, label)| {
            (
                *name,
                *label,
                format!(
                    "/admin/?{}",
                    query_of(&q, &kept, &[("metric", (*name).to_owned())])
                ),
            )
        })
        .collect();
    let listing_query = query_of(&q, &["start_date", "end_date", "tz"], &[]);
    let failed_listing = format!(
        "/admin/llm-usage/?{}",
        query_of(
            &q,
            &["start_date", "end_date", "user_id", "tz"],
            &[("success", "false".to_owned())]
        )
    );
    let errors_note = top_errors.as_ref().filter(|t| t.capped).map(|t| {
        format!(
            "Counted from the newest {} failed calls of the range.",
            format::thousands(t.scanned as i64)
        )
    });
    let errors = top_errors
        .map(|t| t.groups)
        .unwrap_or_default()
        .into_iter()
        .map(|g| {
            let (last_seen, last_seen_exact) = format::instant(g.last_seen, tz);
            ErrorView {
                message: g.message,
                count: format::thousands(g.count as i64),
                last_seen,
                last_seen_exact,
            }
        })
        .collect();
    let page = OverviewPage {
        signed_in,
        csrf,
        start_date: param(&q, "start_date"),
        end_date: param(&q, "end_date"),
        user_id: param(&q, "user_id"),
        tz: tz.name().to_owned(),
        zones: ZONES.to_vec(),
        granularity: raw_granularity,
        granularities: vec![
            ("day", "hour (day view)"),
            ("month", "day (month view)"),
            ("year", "month (year view)"),
        ],
        error,
        cards,
        bucket_name,
        metric: metric.name(),
        metric_links,
        chart,
        outcome_chart,
        failure_chart,
        latency_chart,
        ttft_chart,
        by_model,
        top_users,
        listing_query,
        errors,
        errors_note,
        failed_listing,
        legend,
    };
    Ok(html(status, page.render()))
}

// ---------------------------------------------------------------------------------------------
// Listing, export, detail

#[derive(Template)]
#[template(path = "admin/usage_list.html")]
struct ListPage {
    signed_in: Option<String>,
    csrf: String,
    start_date: String,
    end_date: String,
    user_id: String,
    model: String,
    success: String,
    sort: String,
    error: Option<String>,
    tz: String,
    total_text: String,
    page: u64,
    pages: u64,
    rows: Vec<RowView>,
    export_url: String,
    sort_url: String,
    prev_url: Option<String>,
    next_url: Option<String>,
}

struct RowView {
    id: String,
    /// In the page's zone, to the second.
    created_at: String,
    /// The exact instant in UTC (a tooltip and the `<time>` element's `datetime`).
    created_exact: String,
    user_id: Option<i32>,
    username: Option<String>,
    model: String,
    prompt_tokens: String,
    completion_tokens: String,
    total_tokens: String,
    cost: String,
    success: bool,
}

impl RowView {
    /// The rows of a page, times in `tz`, costs with one precision for the column.
    fn page(rows: Vec<UsageRow>, tz: chrono_tz::Tz) -> Vec<Self> {
        let costs: Vec<i64> = rows.iter().filter_map(|r| r.cost.map(|c| c.0)).collect();
        let decimals = format::money_decimals(&costs);
        rows.into_iter()
            .map(|r| {
                let (created_at, created_exact) =
                    match chrono::DateTime::parse_from_rfc3339(&r.created_at) {
                        Ok(t) => format::instant(t.with_timezone(&chrono::Utc), tz),
                        Err(_) => (r.created_at.clone(), r.created_at.clone()),
                    };
                Self {
                    id: r.id.to_string(),
                    created_at,
                    created_exact,
                    user_id: r.user_id,
                    username: r.username,
                    model: r.model,
                    prompt_tokens: format::thousands(r.prompt_tokens.into()),
                    completion_tokens: format::thousands(r.completion_tokens.into()),
                    total_tokens: format::thousands(r.total_tokens.into()),
                    cost: r
                        .cost
                        .map(|c| format::money(c.0, decimals))
                        .unwrap_or_else(|| "–".into()),
                    success: r.success,
                }
            })
            .collect()
    }
}

/// `key=value&…` of the non-empty `keys` of `q`, with `extra` pairs.
fn query_of(q: &HashMap<String, String>, keys: &[&str], extra: &[(&str, String)]) -> String {
    keys.iter()
        .filter_map(|k| {
            let v = param(q, k);
            (!v.is_empty()).then(|| format!("{k}={}", urlencode(&v)))
        })
        .chain(extra.iter().map(|(k, v)| format!("{k}={}", urlencode(v))))
        .collect::<Vec<_>>()
        .join("&")
}

const LIST_FILTERS: [&str; 6] = [
    "start_date",
    "end_date",
    "user_id",
    "model",
    "success",
    "tz",
];

async fn usage_list(
    staff: Staff,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let q = query_map(&req)?;
    let (signed_in, csrf) = chrome(&staff);
    let oldest_first = param(&q, "sort") == "created_at";
    let sort = if oldest_first {
        "created_at"
    } else {
        "-created_at"
    };
    let page: u64 = match param(&q, "page").as_str() {
        "" => 1,
        p => p
            .parse()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| PageError::BadRequest("page: a whole number ≥ 1".into()))?,
    };
    let (tz, filter, error) = match page_filter(&state, &req, true) {
        Ok((tz, f)) => (tz, Some(f), None),
        Err(m) => (state.settings.default_timezone, None, Some(m)),
    };
    let listing = match &filter {
        Some(f) => Some(
            list_usage_ordered(&state.read_db, f, page, PAGE_SIZE, oldest_first)
                .await
                .map_err(db_error)?,
        ),
        None => None,
    };
    let total = listing.as_ref().map_or(0, |l| l.total);
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let link = |p: u64| {
        format!(
            "/admin/llm-usage/?{}",
            query_of(
                &q,
                &LIST_FILTERS,
                &[("sort", sort.into()), ("page", p.to_string())]
            )
        )
    };
    let page_view = ListPage {
        signed_in,
        csrf,
        start_date: param(&q, "start_date"),
        end_date: param(&q, "end_date"),
        user_id: param(&q, "user_id"),
        model: param(&q, "model"),
        success: param(&q, "success"),
        sort: sort.into(),
        error,
        total_text: format::thousands(i64::try_from(total).unwrap_or(i64::MAX)),
        page,
        pages,
        tz: tz.name().to_owned(),
        rows: listing
            .map(|l| RowView::page(l.results, tz))
            .unwrap_or_default(),
        export_url: format!(
            "/admin/llm-usage/export.csv?{}",
            query_of(&q, &LIST_FILTERS, &[])
        ),
        sort_url: format!(
            "/admin/llm-usage/?{}",
            query_of(
                &q,
                &LIST_FILTERS,
                &[(
                    "sort",
                    if oldest_first {
                        "-created_at"
                    } else {
                        "created_at"
                    }
                    .into()
                )]
            )
        ),
        prev_url: (page > 1).then(|| link(page - 1)),
        next_url: (page < pages).then(|| link(page + 1)),
    };
    let status = if page_view.error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok(html(status, page_view.render()))
}

async fn usage_export(
    _staff: Staff,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let (_, filter) = page_filter(&state, &req, true).map_err(PageError::BadRequest)?;
    crate::http::routes::admin::csv_response(state.read_db.clone(), filter)
        .await
        .map_err(|_| PageError::Unavailable)
}

#[derive(Template)]
#[template(path = "admin/usage_detail.html")]
struct DetailPage {
    signed_in: Option<String>,
    csrf: String,
    row: RowView,
    fields: Vec<(&'static str, String)>,
    metadata: String,
}

async fn usage_detail(
    staff: Staff,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let id = uuid::Uuid::parse_str(&path.into_inner()).map_err(|_| PageError::NotFound)?;
    let row = get_usage(&state.read_db, id)
        .await
        .map_err(db_error)?
        .ok_or(PageError::NotFound)?;
    let (signed_in, csrf) = chrome(&staff);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "–".into());
    let fields = vec![
        ("id", row.id.to_string()),
        ("created_at", row.created_at.clone()),
        ("started_at", opt(&row.started_at)),
        (
            "latency_sec",
            row.latency_sec
                .map(|l| format!("{} ({l} s)", format::duration(l)))
                .unwrap_or_else(|| "–".into()),
        ),
        ("is_streaming", row.is_streaming.to_string()),
        ("first_chunk_at", opt(&row.first_chunk_at)),
        (
            "ttft_sec",
            row.ttft_sec
                .map(|l| format!("{} ({l} s)", format::duration(l)))
                .unwrap_or_else(|| "–".into()),
        ),
        (
            "user_id",
            row.user_id
                .map(|u| u.to_string())
                .unwrap_or_else(|| "–".into()),
        ),
        ("username", opt(&row.username)),
        ("model", row.model.clone()),
        ("prompt_tokens", format::thousands(row.prompt_tokens.into())),
        (
            "completion_tokens",
            format::thousands(row.completion_tokens.into()),
        ),
        ("total_tokens", format::thousands(row.total_tokens.into())),
        ("cached_tokens", format::thousands(row.cached_tokens.into())),
        (
            "reasoning_tokens",
            format::thousands(row.reasoning_tokens.into()),
        ),
        ("success", row.success.to_string()),
        ("error", opt(&row.error)),
        (
            "cost",
            row.cost
                .map(|c| format::money(c.0, 6))
                .unwrap_or_else(|| "–".into()),
        ),
        ("cost_currency", row.cost_currency.clone()),
    ];
    let metadata = serde_json::to_string_pretty(&row.metadata).unwrap_or_default();
    let row = RowView::page(vec![row], state.settings.default_timezone)
        .pop()
        .ok_or(PageError::NotFound)?;
    Ok(html(
        StatusCode::OK,
        DetailPage {
            signed_in,
            csrf,
            row,
            fields,
            metadata,
        }
        .render(),
    ))
}

#[cfg(test)]
mod next_tests {
    use super::safe_next;

    #[test]
    fn next_is_local_valid_in_a_header_and_percent_encoded() {
        // Issue 17, item 2.
        for bad in [
            "/admin/\r\nX: 1",
            "/admin/\nX",
            "/admin/\u{0}",
            "/admin/\u{7f}",
            "//evil",
            "https://x/admin/",
            "/admin\\x",
            "/other/",
        ] {
            assert_eq!(safe_next(bad), "/admin/", "{bad:?}");
        }
        assert_eq!(safe_next("/admin/é"), "/admin/%C3%A9");
        assert_eq!(
            safe_next("/admin/llm-usage/?model=gpt&page=2"),
            "/admin/llm-usage/?model=gpt&page=2"
        );
        assert_eq!(safe_next("/admin/a b\"<"), "/admin/a%20b%22%3C");
        for next in ["/admin/é", "/admin/a b", "/admin/llm-usage/?x=1"] {
            assert!(actix_web::http::header::HeaderValue::from_str(&safe_next(next)).is_ok());
        }
    }
}
