//! The OpenAI-compatible endpoint: one base URL (`/v1`) for every model on every device
//! the caller may use. Devices declare the OpenAI-compatible servers on their loopback
//! (llama.cpp, vLLM, Ollama, ...) with the models each serves; a request names a model,
//! and the hub sends it to the least-loaded device that serves it, through the same
//! streams as the proxy: bodies cross with flow control, server-sent events pass on
//! chunk by chunk, and a client that leaves cancels the generation on the device.
//!
//! - `GET /v1/models`: the union of the caller's models, each with the devices serving it.
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: sent on as they
//!   came (the body is read once, up to a limit, only to learn its model), answered as
//!   the device's server answers, with `x-adi-device` naming the device. A device that
//!   fails before answering anything is replaced by the next; an answer, error or not,
//!   is passed on.
//! - Credentials as OpenAI clients send them: `Authorization: Bearer` with an adi API key
//!   (or a session JWT); a key needs the `capabilities` scope. A key is checked against
//!   the catalog once, then remembered for a while; a revocation ends it at once all
//!   the same.
//! - Errors in OpenAI's shape: `{"error": {"message", "type", "code"}}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{DeviceId, ErrorCode, Scope, ServiceKind};
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::access::Caller;
use crate::cluster::HubId;
use crate::registry::{load_share, Via};
use crate::rest::error::ApiError;
use crate::HubState;

type AppState = Arc<HubState>;

/// Header naming the device that served an answer, and, on a request, the device to
/// try first (its id or name).
pub const DEVICE_HEADER: &str = "x-adi-device";
/// Largest request body read when none is configured for the proxy.
const DEFAULT_MAX_BODY: u64 = 32 * 1024 * 1024;
/// Devices tried for one request at most.
const ATTEMPTS: usize = 3;
/// How long a checked API key is remembered before the catalog is asked again.
const KEY_TTL: Duration = Duration::from_secs(60);
/// API keys remembered at most; the memory is emptied when it is full.
const MAX_KEYS: usize = 10_000;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(complete))
        .route("/v1/completions", post(complete))
        .route("/v1/embeddings", post(complete))
}

/// API keys already checked, by the digest of the key: the caller each stands for,
/// until when.
#[derive(Default)]
pub(crate) struct Keys {
    known: DashMap<[u8; 32], (Caller, tokio::time::Instant)>,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: &'static str,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    param: Option<&'a str>,
}

impl OpenAiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        OpenAiError {
            status,
            message,
            kind,
            code,
            retry_after: None,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                code: self.code,
                param: None,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        let status =
            StatusCode::from_u16(e.code().http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
        let (kind, code) = match e.code() {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::TokenRevoked => {
                ("invalid_request_error", "invalid_api_key")
            }
            ErrorCode::InsufficientScope | ErrorCode::Forbidden => {
                ("invalid_request_error", "insufficient_permissions")
            }
            ErrorCode::TooManyRequests => ("rate_limit_error", "rate_limit_exceeded"),
            ErrorCode::PayloadTooLarge => ("invalid_request_error", "request_too_large"),
            ErrorCode::BadRequest => ("invalid_request_error", "invalid_request"),
            ErrorCode::NotFound => ("invalid_request_error", "not_found"),
            ErrorCode::Timeout => ("api_error", "timeout"),
            ErrorCode::DeviceOffline | ErrorCode::Unavailable | ErrorCode::NoCapableDevice => {
                ("api_error", "model_unavailable")
            }
            _ => ("api_error", "upstream_error"),
        };
        OpenAiError {
            status,
            message: e.message().to_owned(),
            kind,
            code,
            retry_after: None,
        }
    }
}

/// The caller, from the bearer an OpenAI client sends: an adi API key, or a session
/// JWT. Failed keys count against the sign-in limits, as a sign-in does.
async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, OpenAiError> {
    let unauthorized = |m: &str| {
        OpenAiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            m.to_owned(),
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(crate::rest::extract::bearer_token)
        .ok_or_else(|| {
            unauthorized("no API key: send Authorization: Bearer with an adi API key")
        })?;
    let caller = if token.starts_with("adi_key_") {
        key_caller(state, token, peer).await?
    } else {
        Caller::from(state.auth.verify(token).map_err(ApiError::from)?)
    };
    if let Some(why) = caller.ended(&state.auth) {
        return Err(ApiError::from(why).into());
    }
    caller
        .require(Scope::Capabilities)
        .map_err(ApiError::from)?;
    Ok(caller)
}

async fn key_caller(state: &AppState, key: &str, peer: SocketAddr) -> Result<Caller, OpenAiError> {
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let now = tokio::time::Instant::now();
    if let Some(known) = state.openai_keys.known.get(&digest) {
        if known.1 > now {
            return Ok(known.0.clone());
        }
    }
    let (user, record) = crate::rest::session::signed_in(state, peer, key)
        .await
        .map_err(OpenAiError::from)?;
    let (jwt, expires_at) = state.auth.issue(&user, &record);
    let mut caller = Caller::from(state.auth.verify(&jwt).map_err(ApiError::from)?);
    caller.source = Some(peer.ip());
    // Remembered no longer than the key lives.
    let left = Duration::from_secs(expires_at.saturating_sub(crate::auth::unix_now()));
    let keys = &state.openai_keys.known;
    if keys.len() >= MAX_KEYS {
        keys.clear();
    }
    keys.insert(digest, (caller.clone(), now + KEY_TTL.min(left)));
    Ok(caller)
}

/// A device serving a model, as one request sees it.
struct Server {
    id: DeviceId,
    name: String,
    service: String,
    /// The hub it is connected to, when not this one.
    hub: Option<HubId>,
    via: Via,
    score: f64,
}

/// Every online device the caller may use with an OpenAI-compatible service that
/// serves `model` (any model when `None`), with every model its services serve; reads
/// RAM only.
fn servers(state: &HubState, caller: &Caller, model: Option<&str>) -> Vec<(Server, Vec<String>)> {
    let requester = caller.requester();
    let mut out = Vec::new();
    let window = state.registry.online_window();
    let serves = |services: &[adi_protocol::ServiceInfo]| -> Option<(String, Vec<String>)> {
        services
            .iter()
            .filter(|s| s.kind == ServiceKind::OpenAi)
            .find(|s| model.is_none_or(|m| s.models.iter().any(|x| x == m)))
            .map(|s| {
                let models = services
                    .iter()
                    .filter(|s| s.kind == ServiceKind::OpenAi)
                    .flat_map(|s| s.models.iter().cloned())
                    .collect();
                (s.name.clone(), models)
            })
    };
    state.registry.each(|id, live| {
        if live.draining
            || live.last_heartbeat.elapsed() > window
            || !requester.may_use(id, &live.members)
        {
            return;
        }
        if let Some((service, models)) = serves(&live.services) {
            let via = Via::Local(live.handle.clone());
            out.push((
                Server {
                    id: id.clone(),
                    name: live.name.to_string(),
                    service,
                    hub: None,
                    score: f64::from(via.in_flight()) + load_share(live.load.as_deref()),
                    via,
                },
                models,
            ));
        }
    });
    if let Some(cluster) = &state.cluster {
        cluster.each(|id, r| {
            if !r.online
                || r.draining
                || state.registry.connected_at(id).is_some()
                || !requester.may_use(id, &r.members)
            {
                return;
            }
            if let Some((service, models)) = serves(&r.services) {
                let via = Via::Remote {
                    hub: r.hub,
                    in_flight: r.in_flight.clone(),
                };
                out.push((
                    Server {
                        id: id.clone(),
                        name: r.name.to_string(),
                        service,
                        hub: Some(r.hub),
                        score: f64::from(via.in_flight()) + load_share(r.load.as_deref()),
                        via,
                    },
                    models,
                ));
            }
        });
    }
    out
}

/// The answer of `GET /v1/models`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models, by id.
    pub data: Vec<Model>,
}

/// One model, with the devices that serve it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Model {
    /// The model's name, as requests give it.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unknown to the hub: 0.
    pub created: u64,
    /// Always `adi`.
    pub owned_by: String,
    /// The devices serving it now.
    pub devices: Vec<ModelDevice>,
}

/// A device that serves a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelDevice {
    /// The device's id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// Its service that serves the model.
    pub service: String,
}

async fn models(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller(&state, &headers, peer).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut by_model: BTreeMap<String, Vec<ModelDevice>> = BTreeMap::new();
    for (server, models) in servers(&state, &caller, None) {
        for model in models {
            let devices = by_model.entry(model).or_default();
            if !devices.iter().any(|d| d.id == server.id) {
                devices.push(ModelDevice {
                    id: server.id.clone(),
                    name: server.name.clone(),
                    service: server.service.clone(),
                });
            }
        }
    }
    let data = by_model
        .into_iter()
        .map(|(id, mut devices)| {
            devices.sort_by(|a, b| a.id.cmp(&b.id));
            Model {
                id,
                object: "model".into(),
                created: 0,
                owned_by: "adi".into(),
                devices,
            }
        })
        .collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

/// What the hub reads of a request body: the model, and nothing else.
#[derive(Deserialize)]
struct Asked {
    model: String,
}

async fn complete(State(state): State<AppState>, req: Request) -> Response {
    match serve(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(state: &AppState, req: Request) -> Result<Response, OpenAiError> {
    let Some(&ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() else {
        return Err(ApiError::internal(&"the connection's peer address is unknown").into());
    };
    let from_hub = crate::cluster::sent_by_hub(state.cluster.as_deref(), req.headers());
    let peer = if from_hub {
        crate::cluster::client_addr(req.headers()).unwrap_or(peer)
    } else {
        peer
    };
    let caller = caller(state, req.headers(), peer).await?;
    let path = req.uri().path().to_owned();
    let (parts, body) = req.into_parts();
    let max = state
        .config
        .proxy_max_body_bytes
        .unwrap_or(DEFAULT_MAX_BODY);
    let too_large = || {
        OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body exceeds the limit of {max} bytes"),
        )
    };
    let body = axum::body::to_bytes(body, usize::try_from(max).unwrap_or(usize::MAX))
        .await
        .map_err(|_| too_large())?;
    let asked: Asked = serde_json::from_slice(&body).map_err(|e| {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            format!("the body must be JSON with a \"model\": {e}"),
        )
    })?;
    let preferred = parts
        .headers
        .get(DEVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut order: Vec<Server> = servers(state, &caller, Some(&asked.model))
        .into_iter()
        .map(|(s, _)| s)
        // A request another hub sent here is for one device of this hub, and goes no
        // further.
        .filter(|s| !from_hub || s.hub.is_none())
        .collect();
    if from_hub {
        order.retain(|s| preferred.as_deref() == Some(s.id.as_str()));
    }
    if order.is_empty() {
        // Served by one of the caller's devices that is offline now? Only this answer
        // reads the catalog.
        let known = crate::access::devices(state, &caller, Scope::Capabilities)
            .await
            .map_err(ApiError::from)?
            .iter()
            .flat_map(|d| d.services.iter())
            .any(|s| s.kind == ServiceKind::OpenAi && s.models.contains(&asked.model));
        return Err(if known {
            OpenAiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "model_unavailable",
                format!("no device that serves {:?} can take it now", asked.model),
            )
        } else {
            OpenAiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "the model {:?} does not exist or no device of yours serves it",
                    asked.model
                ),
            )
        });
    }
    rank(&mut order, &state.routing_turn);
    if let Some(p) = &preferred {
        if let Some(i) = order
            .iter()
            .position(|s| s.id.as_str() == p || s.name == *p)
        {
            let first = order.remove(i);
            order.insert(0, first);
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or(path.clone(), |p| p.as_str().to_owned());
    let mut last = None;
    for server in order.into_iter().take(ATTEMPTS) {
        match attempt(
            state,
            &caller,
            &server,
            &target,
            &parts.headers,
            peer,
            body.clone(),
        )
        .await
        {
            Ok(resp) => return Ok(resp),
            Err(e) => {
                tracing::debug!(device_id = %server.id, model = asked.model, "model request not taken: {}", e.message);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "model_unavailable",
            "no device could take the request".into(),
        )
    }))
}

/// Orders devices best first: requests in flight from this hub, then load; devices tied
/// for best take turns.
fn rank(order: &mut [Server], turn: &std::sync::atomic::AtomicUsize) {
    order.sort_by(|a, b| a.score.total_cmp(&b.score).then_with(|| a.id.cmp(&b.id)));
    let Some(best) = order.first().map(|s| s.score) else {
        return;
    };
    let tied = order
        .iter()
        .take_while(|s| s.score <= best + crate::routing::TIE)
        .count();
    if tied > 1 {
        let turn = turn.fetch_add(1, Ordering::Relaxed) % tied;
        order[..tied].rotate_left(turn);
    }
}

/// Counts a request in flight to a device while its answer streams.
struct Counted(Via);

impl Counted {
    fn new(via: &Via) -> Self {
        via.in_flight_counter().fetch_add(1, Ordering::Relaxed);
        Counted(via.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight_counter().fetch_sub(1, Ordering::Relaxed);
    }
}

/// One device's try: an error only if it answered nothing.
async fn attempt(
    state: &AppState,
    caller: &Caller,
    server: &Server,
    target: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let counted = Counted::new(&server.via);
    let resp = match server.hub {
        None => crate::proxy::send_whole(
            state,
            caller,
            &server.id,
            &server.service,
            target.to_owned(),
            headers,
            peer,
            body,
        )
        .await
        .map_err(OpenAiError::from)?,
        Some(hub) => {
            let url = state
                .cluster
                .as_ref()
                .and_then(|c| c.peer_url(hub))
                .ok_or_else(|| {
                    OpenAiError::from(ApiError::new(
                        ErrorCode::DeviceOffline,
                        "the hub the device is connected to is gone",
                    ))
                })?;
            let mut req = Request::new(Body::from(body));
            *req.method_mut() = axum::http::Method::POST;
            *req.uri_mut() = target
                .parse()
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "bad request target"))?;
            *req.headers_mut() = headers.clone();
            req.headers_mut().insert(
                DEVICE_HEADER,
                HeaderValue::from_str(server.id.as_str())
                    .map_err(|_| ApiError::new(ErrorCode::Internal, "device id"))?,
            );
            let resp = crate::proxy::forward(state, &url, req, peer)
                .await
                .map_err(OpenAiError::from)?;
            // That hub found nothing to serve it with (the device left it): try another.
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                && !resp.headers().contains_key(DEVICE_HEADER)
            {
                return Err(OpenAiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "model_unavailable",
                    "the device left its hub".into(),
                ));
            }
            resp
        }
    };
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(server.id.as_str()) {
        parts.headers.insert(DEVICE_HEADER, v);
    }
    // Counted while the answer streams, so the next request sees this device busy.
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &counted;
        chunk
    }));
    Ok(Response::from_parts(parts, body))
}
