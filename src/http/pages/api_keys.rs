//! The API keys page: every key (never a key itself), a form that creates one and shows it
//! once, and a revoke button per key. POSTs carry the session's CSRF token and must come from
//! this site, as the sign-out does.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;

use super::{
    PageError, Staff, check_origin, chrome, csrf_ok, db_error, html, serde_urlencoded_form,
};
use crate::api_keys::{self, KeyError, KeyInfo, KeyRef, NewKey, Scope};
use crate::http::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/api-keys/")
            .route(web::get().to(page))
            .route(web::post().to(create)),
    )
    .service(web::resource("/admin/api-keys/{id}/revoke/").route(web::post().to(revoke)));
}

struct KeyRow {
    id: i32,
    prefix: String,
    username: String,
    name: String,
    scopes: String,
    status: String,
    created_at: String,
    last_used_at: String,
    expires_at: String,
}

impl From<KeyInfo> for KeyRow {
    fn from(k: KeyInfo) -> Self {
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|| "–".into())
        };
        Self {
            id: k.id,
            prefix: k.prefix,
            username: k.username,
            name: k.name,
            scopes: k
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            status: k.status,
            created_at: time(Some(k.created_at)),
            last_used_at: time(k.last_used_at),
            expires_at: time(k.expires_at),
        }
    }
}

struct Created {
    key: String,
    prefix: String,
    username: String,
}

#[derive(Template)]
#[template(path = "admin/api_keys.html")]
struct KeysPage {
    signed_in: Option<String>,
    csrf: String,
    keys: Vec<KeyRow>,
    created: Option<Created>,
    message: Option<String>,
    /// The form's values after a refusal.
    username: String,
    name: String,
    expires_in_days: String,
}

async fn render(
    staff: &Staff,
    state: &AppState,
    status: StatusCode,
    created: Option<Created>,
    message: Option<String>,
    form: Option<&CreateForm>,
) -> Result<HttpResponse, PageError> {
    let keys = api_keys::list(&state.db, None).await.map_err(db_error)?;
    let (signed_in, csrf) = chrome(staff);
    let field = |f: fn(&CreateForm) -> &String| form.map(|x| f(x).clone()).unwrap_or_default();
    let mut response = html(
        status,
        KeysPage {
            signed_in,
            csrf,
            keys: keys.into_iter().map(KeyRow::from).collect(),
            created,
            message,
            username: field(|f| &f.username),
            name: field(|f| &f.name),
            expires_in_days: field(|f| &f.expires_in_days),
        }
        .render(),
    );
    // A page holding a new key is not kept by the browser or any cache.
    response.headers_mut().insert(
        actix_web::http::header::CACHE_CONTROL,
        actix_web::http::header::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

async fn page(staff: Staff, state: web::Data<AppState>) -> Result<HttpResponse, PageError> {
    render(&staff, &state, StatusCode::OK, None, None, None).await
}

#[derive(serde::Deserialize, Default)]
struct CreateForm {
    #[serde(default)]
    csrfmiddlewaretoken: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scope_gateway: Option<String>,
    #[serde(default)]
    scope_ingest: Option<String>,
    #[serde(default)]
    expires_in_days: String,
}

async fn create(
    req: HttpRequest,
    staff: Staff,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, PageError> {
    let form: CreateForm = serde_urlencoded_form(&body)?;
    check_origin(&req)?;
    csrf_ok(&staff, &form.csrfmiddlewaretoken)?;
    let refuse = |message: String| {
        let state = state.clone();
        let staff = &staff;
        let form = &form;
        async move {
            render(
                staff,
                &state,
                StatusCode::BAD_REQUEST,
                None,
                Some(message),
                Some(form),
            )
            .await
        }
    };
    let scopes: std::collections::BTreeSet<Scope> = [
        (form.scope_gateway.is_some(), Scope::Gateway),
        (form.scope_ingest.is_some(), Scope::Ingest),
    ]
    .into_iter()
    .filter_map(|(on, s)| on.then_some(s))
    .collect();
    let lifetime = match form.expires_in_days.trim() {
        "" => None,
        days => match days.parse::<i64>() {
            Ok(d) if (1..=api_keys::MAX_LIFETIME_DAYS).contains(&d) => {
                Some(chrono::Duration::days(d))
            }
            _ => {
                return refuse(format!(
                    "Expires in days: a whole number from 1 to {}, or empty for never.",
                    api_keys::MAX_LIFETIME_DAYS
                ))
                .await;
            }
        },
    };
    let name = match form.name.trim() {
        "" => "default".to_owned(),
        n => n.to_owned(),
    };
    let new = NewKey {
        username: form.username.trim().to_owned(),
        name,
        scopes,
        lifetime,
    };
    match api_keys::create(&state.db, new).await {
        Ok(created) => {
            tracing::info!(
                prefix = %created.info.prefix,
                user = %created.info.username,
                by = %staff.user.username,
                "API key created"
            );
            let shown = Created {
                key: created.key,
                prefix: created.info.prefix,
                username: created.info.username,
            };
            render(&staff, &state, StatusCode::OK, Some(shown), None, None).await
        }
        Err(KeyError::Invalid(m)) => refuse(m).await,
        Err(KeyError::UnknownUser(u)) => refuse(format!("There is no user {u:?}.")).await,
        Err(KeyError::Db(e)) => Err(db_error(e)),
    }
}

#[derive(serde::Deserialize)]
struct RevokeForm {
    #[serde(default)]
    csrfmiddlewaretoken: String,
}

async fn revoke(
    req: HttpRequest,
    staff: Staff,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, PageError> {
    let form: RevokeForm = serde_urlencoded_form(&body)?;
    check_origin(&req)?;
    csrf_ok(&staff, &form.csrfmiddlewaretoken)?;
    let id: i32 = path.into_inner().parse().map_err(|_| PageError::NotFound)?;
    let info = api_keys::revoke(&state.db, KeyRef::Id(id))
        .await
        .map_err(db_error)?
        .ok_or(PageError::NotFound)?;
    tracing::info!(prefix = %info.prefix, by = %staff.user.username, "API key revoked");
    Ok(HttpResponse::SeeOther()
        .insert_header((actix_web::http::header::LOCATION, "/admin/api-keys/"))
        .finish())
}
