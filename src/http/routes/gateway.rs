//! The OpenAI-compatible gateway (issue 19 item 2): `POST /v1/chat/completions` and
//! `GET /v1/models`, authenticated by an API key of scope `gateway`, answering in OpenAI's
//! shapes (errors as `{"error": {"message", "type", "code"}}`), one usage row per request.

use std::sync::OnceLock;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api_keys::{KeyOwner, Refused, Scope};
use crate::gateway::{self, Call, Upstream};
use crate::http::AppState;
use crate::http::auth::bearer;

/// The largest request body, in bytes.
pub const MAX_BODY: usize = 10 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(["/v1/chat/completions", "/v1/chat/completions/"])
            .route(web::post().to(chat_completions)),
    )
    .service(web::resource(["/v1/models", "/v1/models/"]).route(web::get().to(models)));
}

/// An error as OpenAI's clients read it.
fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    }))
}

async fn authenticate(req: &HttpRequest, state: &AppState) -> Result<KeyOwner, HttpResponse> {
    let answer = state
        .key_cache
        .authenticate(&state.db, bearer(req), Scope::Gateway)
        .await;
    let unauthorized = |message: &str| {
        openai_error(
            StatusCode::UNAUTHORIZED,
            message,
            "invalid_request_error",
            "invalid_api_key",
        )
    };
    match answer {
        Ok(Ok(owner)) => Ok(owner),
        Ok(Err(Refused::Missing)) => Err(unauthorized(
            "You didn't provide an API key: send Authorization: Bearer <key>.",
        )),
        Ok(Err(Refused::Unknown)) => Err(unauthorized("Incorrect API key provided.")),
        Ok(Err(Refused::Revoked)) => Err(unauthorized("The API key has been revoked.")),
        Ok(Err(Refused::Expired)) => Err(unauthorized("The API key has expired.")),
        Ok(Err(Refused::Scope(_))) => Err(openai_error(
            StatusCode::FORBIDDEN,
            "The API key does not have the gateway scope.",
            "invalid_request_error",
            "permission_denied",
        )),
        Err(e) => {
            tracing::error!(error = %e, "database error while checking an API key");
            Err(openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The gateway cannot check API keys right now; try again later.",
                "api_error",
                "service_unavailable",
            ))
        }
    }
}

/// `GET /v1/models`: the models of the price table and the configured ones.
pub async fn models(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match authenticate(&req, &state).await {
        Ok(_) => HttpResponse::Ok().json(gateway::model_list(&state.settings)),
        Err(res) => res,
    }
}

fn http_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

/// `POST /v1/chat/completions`: the body goes to the provider unchanged (Azure: `model` set
/// to the deployment; streams: `stream_options.include_usage` set), the answer comes back
/// unchanged (streams event by event as they arrive, the usage chunk only when the client asked
/// for it; errors with secrets redacted), and one row is recorded through the tracker's write
/// path — for a stream when it ends or the client goes away.
pub async fn chat_completions(
    req: HttpRequest,
    state: web::Data<AppState>,
    mut payload: web::Payload,
) -> HttpResponse {
    let owner = match authenticate(&req, &state).await {
        Ok(owner) => owner,
        Err(res) => return res,
    };
    let Some(store) = state.store.clone() else {
        return openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The gateway has no write path for usage rows.",
            "api_error",
            "service_unavailable",
        );
    };
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "The request body could not be read.",
                "invalid_request_error",
                "invalid_body",
            );
        };
        if body.len() + chunk.len() > MAX_BODY {
            return openai_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The request body is over 10 MB.",
                "invalid_request_error",
                "request_too_large",
            );
        }
        body.extend_from_slice(&chunk);
    }
    let mut request: serde_json::Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => map,
        _ => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "The request body must be a JSON object (a Chat Completions request).",
                "invalid_request_error",
                "invalid_json",
            );
        }
    };
    let Some(model) = request
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .map(str::to_owned)
    else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "model: required.",
            "invalid_request_error",
            "missing_model",
        );
    };
    // Streams always ask the provider for usage; the client gets the usage chunk only if it
    // asked for it too.
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if stream {
        let options = request.entry("stream_options").or_insert_with(|| json!({}));
        if !options.is_object() {
            *options = json!({});
        }
        options["include_usage"] = Value::Bool(true);
    }
    let upstream = match gateway::route(&state.settings, &model, stream) {
        Ok(u) => u,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                &e.to_string(),
                "invalid_request_error",
                "model_not_found",
            );
        }
    };
    let node_name = req
        .headers()
        .get("x-node-name")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().chars().take(100).collect::<String>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "gateway".into());
    let settings = &state.settings;
    let builder = match &upstream {
        Upstream::OpenAi { url } => http_client().post(url).bearer_auth(
            settings
                .openai
                .api_key
                .as_ref()
                .map(|k| k.expose())
                .unwrap_or_default(),
        ),
        Upstream::Gemini { url, .. } => {
            match gateway::gemini::request(&request) {
                Ok(Value::Object(translated)) => request = translated,
                Ok(_) => request = serde_json::Map::new(),
                Err(e) => {
                    return openai_error(
                        StatusCode::BAD_REQUEST,
                        &e.to_string(),
                        "invalid_request_error",
                        "invalid_request",
                    );
                }
            }
            http_client().post(url).header(
                "x-goog-api-key",
                settings
                    .gemini
                    .api_key
                    .as_ref()
                    .map(|k| k.expose())
                    .unwrap_or_default(),
            )
        }
        Upstream::Azure { url, deployment } => {
            request.insert("model".into(), Value::String(deployment.clone()));
            http_client().post(url).header(
                "api-key",
                settings
                    .azure
                    .api_key
                    .as_ref()
                    .map(|k| k.expose())
                    .unwrap_or_default(),
            )
        }
    };
    let secrets = crate::tracker::provider_secrets(settings);
    let started_at = chrono::Utc::now();
    let sent = builder
        .timeout(settings.llm_timeout)
        .header("content-type", "application/json")
        .body(Value::Object(request).to_string())
        .send()
        .await;
    let record = |model: &str, usage: [i32; 5], error: Option<String>| {
        gateway::row(
            Call {
                user_id: owner.user_id,
                key_prefix: &owner.prefix,
                node_name: &node_name,
                upstream: &upstream,
                model,
                usage,
                error,
                started_at,
                stream,
                first_chunk_at: None,
                extra: Default::default(),
            },
            &settings.prices,
        )
    };
    let response = match sent {
        Ok(r) => r,
        Err(e) => {
            let message =
                crate::redact::redact(&format!("the provider could not be reached: {e}"), &secrets);
            store
                .record(record(&model, [0; 5], Some(message.clone())))
                .await;
            let status = if e.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            return openai_error(status, &message, "api_error", "provider_unreachable");
        }
    };
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| actix_web::http::header::HeaderValue::from_bytes(v.as_bytes()).ok());
    if stream && status.is_success() {
        let guard = RowGuard {
            store: store.clone(),
            prices: settings.prices.clone(),
            user_id: owner.user_id,
            key_prefix: owner.prefix.clone(),
            node_name: node_name.clone(),
            upstream: upstream.clone(),
            model: model.clone(),
            started_at,
            secrets: secrets.clone(),
            reader: if matches!(upstream, Upstream::Gemini { .. }) {
                gateway::StreamReader::gemini(client_wants_usage, &model)
            } else {
                gateway::StreamReader::new(client_wants_usage)
            },
            upstream_error: None,
            ended: false,
            recorded: false,
        };
        let body = GatewayStream {
            upstream: Box::pin(response.bytes_stream()),
            guard,
        };
        return HttpResponse::build(status)
            .content_type("text/event-stream")
            .insert_header(("cache-control", "no-cache"))
            .streaming(body);
    }
    let text = match response.bytes().await {
        Ok(b) => b,
        Err(e) => {
            let message =
                crate::redact::redact(&format!("the provider's answer broke off: {e}"), &secrets);
            store
                .record(record(&model, [0; 5], Some(message.clone())))
                .await;
            return openai_error(
                StatusCode::BAD_GATEWAY,
                &message,
                "api_error",
                "provider_unreachable",
            );
        }
    };
    let answer: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
    let gemini = matches!(upstream, Upstream::Gemini { .. });
    if status.is_success() {
        // Gemini's answer is translated to OpenAI's shape; OpenAI's and Azure's pass unchanged.
        let (answer, text) = if gemini {
            let translated =
                gateway::gemini::response(&answer, &model, chrono::Utc::now().timestamp());
            let bytes = web::Bytes::from(translated.to_string());
            (translated, bytes)
        } else {
            (answer, text)
        };
        let answered_model = answer["model"].as_str().unwrap_or(&model).to_owned();
        store
            .record(record(
                &answered_model,
                gateway::usage_counts(&answer["usage"]),
                None,
            ))
            .await;
        return HttpResponse::build(status)
            .content_type("application/json")
            .body(text);
    }
    // The provider refused: its status and message, with any key redacted.
    let message = answer["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&text).chars().take(2000).collect());
    let message = crate::redact::redact(&message, &secrets);
    store
        .record(record(
            &model,
            [0; 5],
            Some(format!("{} {}", status.as_u16(), message)),
        ))
        .await;
    let mut res = if gemini {
        // Gemini's {"error": {"code", "message", "status"}} in OpenAI's shape.
        let code = answer["error"]["status"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| "provider_error".into());
        openai_error(status, &message, "api_error", &code)
    } else if answer["error"].is_object() {
        let mut error = answer["error"].clone();
        error["message"] = Value::String(message);
        HttpResponse::build(status).json(json!({ "error": error }))
    } else {
        openai_error(status, &message, "api_error", "provider_error")
    };
    if let Some(v) = retry_after {
        res.headers_mut()
            .insert(actix_web::http::header::RETRY_AFTER, v);
    }
    res
}

/// What a streamed request's row needs; records it exactly once, when the stream ends or the
/// client goes away (the response body is dropped), whichever comes first.
struct RowGuard {
    store: std::sync::Arc<crate::tracker::UsageStore>,
    prices: std::sync::Arc<crate::pricing::PriceTable>,
    user_id: i32,
    key_prefix: String,
    node_name: String,
    upstream: Upstream,
    model: String,
    started_at: chrono::DateTime<chrono::Utc>,
    secrets: Vec<String>,
    reader: gateway::StreamReader,
    upstream_error: Option<String>,
    /// The provider's stream ended (else the client went away first).
    ended: bool,
    recorded: bool,
}

impl RowGuard {
    fn record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let r = &self.reader;
        let mut extra = serde_json::Map::new();
        if r.usage.is_none() {
            extra.insert("usage_incomplete".into(), json!(true));
        }
        if !self.ended {
            extra.insert("client_disconnected".into(), json!(true));
        }
        let error = self
            .upstream_error
            .clone()
            .or_else(|| r.error.clone())
            .map(|e| crate::redact::redact(&e, &self.secrets));
        let row = gateway::row(
            Call {
                user_id: self.user_id,
                key_prefix: &self.key_prefix,
                node_name: &self.node_name,
                upstream: &self.upstream,
                model: r.model.as_deref().unwrap_or(&self.model),
                usage: r.usage.unwrap_or_default(),
                error,
                started_at: self.started_at,
                stream: true,
                first_chunk_at: r.first_chunk_at,
                extra,
            },
            &self.prices,
        );
        let store = self.store.clone();
        // The response may be dropped outside a task (the client went away): the row is
        // stored by a task of its own, through the same never-lose path.
        tokio::spawn(async move {
            store.record(row).await;
        });
    }
}

/// The provider's events forwarded as they arrive (no buffering beyond one event).
struct GatewayStream {
    upstream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<web::Bytes>> + Send>>,
    guard: RowGuard,
}

impl futures_util::Stream for GatewayStream {
    type Item = Result<web::Bytes, actix_web::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if self.guard.ended {
                return Poll::Ready(None);
            }
            match self.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let out = self.guard.reader.push(&bytes);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(web::Bytes::from(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.guard.upstream_error =
                        Some(format!("the provider's stream broke off: {e}"));
                    self.guard.ended = true;
                    self.guard.record();
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    let rest = self.guard.reader.finish();
                    self.guard.ended = true;
                    self.guard.record();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(web::Bytes::from(rest))));
                }
            }
        }
    }
}

impl Drop for GatewayStream {
    fn drop(&mut self) {
        self.guard.record();
    }
}
