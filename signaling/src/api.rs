//! The REST edge: JSON in and out, a bearer JWT on every `/api` route but the token
//! exchange, and one error shape (`{"error": {"code", "message"}}`) whose status comes
//! from the shared [`ErrorCode`]. Internal detail is logged, never sent.
//!
//! Ownership is checked on every device route; a device the caller does not own is
//! answered exactly like one that does not exist.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    CapabilityOffer, DeviceId, ErrorCode, Hardware, HealthStatus, LoadReport, ServiceInfo,
};
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, Path, RawQuery, Request, State, WebSocketUpgrade,
};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::future::{Either, FutureExt as _};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::auth::{self, unix_now_i64, AuthError};
use crate::catalog::{CatalogError, DeviceRecord, Owner, TokenKind, UserId};
use crate::tokens::{self, TokenError};
use crate::HubState;

type AppState = Arc<HubState>;

/// Every route of the hub. A proxied request, the hot path, skips the route table: the
/// proxy reads device, service and target from the path itself, so matching and
/// capturing them first would only be repeated work.
pub fn app(
    state: AppState,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let routes = router(state.clone());
    tower::service_fn(move |req: Request| {
        if req.uri().path().starts_with(crate::proxy::PREFIX) {
            Either::Left(crate::proxy::handle(state.clone(), req).map(Ok))
        } else {
            Either::Right(tower::Service::call(&mut routes.clone(), req))
        }
    })
}

/// Every route of the hub but the proxy.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::serve))
        .route("/ws/cocoon", get(cocoon_ws))
        .route("/ws/client", get(client_ws))
        .route("/api/auth/token", post(auth_token))
        .route("/api/cocoons", get(list_cocoons))
        .route("/api/cocoons/{id}", get(get_cocoon))
        .route("/api/cocoons/{id}/services", get(get_services))
        .route("/api/tokens", post(create_token))
        .route("/api/tokens/claim", post(claim_token))
        .route(
            "/api/auth/session",
            post(open_session).delete(close_session),
        )
        .merge(crate::capability_routes::routes())
        .merge(crate::task_routes::routes())
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .merge(crate::install::routes())
        .with_state(state)
}

/// An error as the REST edge answers it.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error with a message safe to show the caller.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The error's message, safe to show.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn not_found_device() -> Self {
        ApiError::new(ErrorCode::NotFound, "no such device")
    }

    /// Logs the detail and answers a bare "internal error".
    pub(crate) fn internal(detail: &dyn std::fmt::Display) -> Self {
        warn!("request failed: {detail:#}");
        ApiError::new(ErrorCode::Internal, "internal error")
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// A catalog failure as the caller sees it: a conflict by name, an outage by its reason
/// (503: nothing was stored, retry later), anything else as a bare internal error.
impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e.code() {
            ErrorCode::Internal => ApiError::internal(&e),
            ErrorCode::Unavailable => {
                warn!("request refused: {e:#}");
                ApiError::new(ErrorCode::Unavailable, e.public_message())
            }
            code => ApiError::new(code, e.public_message()),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Catalog(inner) => inner.into(),
            other => ApiError::new(other.code(), other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Catalog(inner) => inner.into(),
            other => ApiError::new(ErrorCode::Unauthorized, other.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(ErrorCode::BadRequest, e.body_text())
    }
}

/// A JSON body whose rejections use the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The authenticated caller, from `Authorization: Bearer <jwt>`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user's id.
    pub id: UserId,
    /// The user's name.
    pub name: String,
}

/// Name of the web UI's session cookie (HttpOnly, SameSite=Strict, `Path=/proxy/`): it
/// carries the same JWT as the bearer header, so a browser tab can open proxied pages.
/// Proxied pages run on the hub's origin, so the cookie is good for `/proxy/...` only:
/// script in a proxied service must not be able to call the API as whoever opened it.
pub const SESSION_COOKIE: &str = "adi_session";

/// The only path the session cookie is sent to and accepted on.
pub const SESSION_COOKIE_PATH: &str = "/proxy/";

fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .find_map(|c| {
            c.strip_prefix(SESSION_COOKIE)
                .and_then(|r| r.strip_prefix('='))
        })
        .map(str::to_owned)
}

fn bearer_caller(header: &header::HeaderValue, state: &AppState) -> Result<Caller, ApiError> {
    let token = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "malformed Authorization header"))?;
    let claims = state.auth.verify(token.trim())?;
    Ok(Caller {
        id: claims.sub,
        name: claims.name,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// The bearer header only: the session cookie is not accepted here. A session
    /// outlives nothing it names: a user removed from the catalog is refused.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        let caller = bearer_caller(header, state)?;
        live_user(state, caller).await
    }
}

/// The caller, if their user still exists.
pub(crate) async fn live_user(state: &HubState, caller: Caller) -> Result<Caller, ApiError> {
    match state.catalog.user(caller.id).await? {
        Some(_) => Ok(caller),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this session's user no longer exists",
        )),
    }
}

/// The caller of a `/proxy/...` route: the bearer header, or else the web UI's session
/// cookie. Anywhere else only the bearer header counts, even if a cookie came along.
pub(crate) fn proxy_caller(
    path: &str,
    headers: &axum::http::HeaderMap,
    state: &AppState,
) -> Result<Caller, ApiError> {
    if let Some(header) = headers.get(header::AUTHORIZATION) {
        return bearer_caller(header, state);
    }
    let token = path
        .starts_with(SESSION_COOKIE_PATH)
        .then(|| session_cookie(headers))
        .flatten()
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
    let claims = state.auth.verify(&token)?;
    Ok(Caller {
        id: claims.sub,
        name: claims.name,
    })
}

/// Ready only while the catalog can be read and written (a committed write, at most
/// one a second however often this is asked); `/healthz` only says the hub is alive.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let catalog = state.catalog.clone();
    state
        .readiness
        .check(move || async move { catalog.probe_write(unix_now_i64()).await })
        .await
        .map_err(|u| ApiError::new(u.code, u.message))?;
    Ok("ready")
}

async fn api_not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such API route")
}

/// The read buffer for a cocoon's socket, from the query of its upgrade request:
/// `bodies=1` from a cocoon with services, which will carry proxied bodies. The hint is
/// taken on trust: before registration anyone may send it, but it costs no more than any
/// peer can already make the socket reserve by announcing one large frame.
fn read_buffer_bytes(config: &crate::HubConfig, query: Option<&str>) -> usize {
    let bodies = query.is_some_and(|q| q.split('&').any(|kv| kv == "bodies=1"));
    if bodies {
        config.ws_body_read_buffer_bytes
    } else {
        config.ws_read_buffer_bytes
    }
}

/// The connection's place under the hub's caps, which an upgraded socket keeps.
type Slot = Option<axum::Extension<crate::server::ConnSlot>>;

async fn cocoon_ws(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    slot: Slot,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // Control frames are held to `max_frame_bytes` by the decoder; the socket must also
    // let whole body frames through.
    let max = state.config.max_frame_bytes.max(adi_tunnel::MAX_FRAME);
    let slot = slot.map(|s| s.0);
    ws.read_buffer_size(read_buffer_bytes(&state.config, query.as_deref()))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::connection::serve(state, socket, peer, slot))
}

async fn client_ws(State(state): State<AppState>, slot: Slot, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            crate::client_ws::serve(state, socket).await;
            drop(slot);
        })
}

#[derive(Deserialize)]
struct AuthRequest {
    api_key: String,
}

/// The sign-in body, or what to send instead: the first call anyone makes by hand
/// (curl without `-H Content-Type`, a form post) should say how it is done.
fn auth_request(
    body: Result<axum::Json<AuthRequest>, JsonRejection>,
) -> Result<AuthRequest, ApiError> {
    let why = match body {
        Ok(axum::Json(req)) => return Ok(req),
        Err(JsonRejection::MissingJsonContentType(_)) => "the request is not marked as JSON",
        Err(JsonRejection::JsonSyntaxError(_)) => "the body is not JSON",
        Err(JsonRejection::JsonDataError(_)) => "the body has no \"api_key\" string",
        Err(e) => return Err(e.into()),
    };
    Err(ApiError::new(
        ErrorCode::BadRequest,
        format!("{why}: send Content-Type: application/json with {{\"api_key\": \"...\"}}"),
    ))
}

#[derive(Serialize)]
struct AuthResponse {
    token: String,
    expires_at: u64,
    user: UserView,
}

#[derive(Serialize)]
struct UserView {
    id: UserId,
    name: String,
}

async fn auth_token(
    State(state): State<AppState>,
    body: Result<axum::Json<AuthRequest>, JsonRejection>,
) -> Result<Json<AuthResponse>, ApiError> {
    let req = auth_request(body)?;
    let user = auth::user_for_api_key(&state.catalog, &req.api_key).await?;
    let (token, expires_at) = state.auth.issue(&user);
    Ok(Json(AuthResponse {
        token,
        expires_at,
        user: UserView {
            id: user.id,
            name: user.name,
        },
    }))
}

/// Signs a browser in: the same answer as the token exchange, plus the session cookie.
async fn open_session(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<axum::Json<AuthRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = auth_request(body)?;
    let user = auth::user_for_api_key(&state.catalog, &req.api_key).await?;
    let (token, expires_at) = state.auth.issue(&user);
    let secure = state
        .config
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v == "https");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path={SESSION_COOKIE_PATH}; HttpOnly; SameSite=Strict; Max-Age={}{}",
        state.config.jwt_ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Json(AuthResponse {
        token,
        expires_at,
        user: UserView {
            id: user.id,
            name: user.name,
        },
    })
    .into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// Signs a browser out: the cookie is cleared (also one an older hub set on `Path=/`).
async fn close_session() -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    for path in [SESSION_COOKIE_PATH, "/"] {
        let clear = format!("{SESSION_COOKIE}=; Path={path}; HttpOnly; SameSite=Strict; Max-Age=0");
        if let Ok(v) = header::HeaderValue::from_str(&clear) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// A device as the API shows it: catalog configuration plus live presence.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CocoonView {
    /// Device id.
    pub id: DeviceId,
    /// Device name.
    pub name: String,
    /// `online` or `offline`, from heartbeat age; `stopping` for an online device that
    /// is finishing its requests and takes no new ones.
    pub status: String,
    /// Whether the device is online.
    pub online: bool,
    /// Seconds since the last heartbeat, when connected.
    pub last_heartbeat_age_secs: Option<f64>,
    /// Declared services, with their live health.
    pub services: Vec<ServiceView>,
    /// What the device serves, as last declared (the catalog is written on every change).
    pub capabilities: Vec<CapabilityOffer>,
    /// Where it is, in its owner's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// What it is built of (CPUs, RAM, GPUs), as last reported; kept while offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
    /// Capability requests this hub has in flight to it.
    #[serde(default)]
    pub in_flight: u32,
    /// CPU, RAM and GPU use from the latest heartbeat; absent while offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    /// Owners.
    pub owners: Vec<OwnerView>,
    /// Unix seconds of enrolment.
    pub created_at: i64,
    /// The last time two agents connected with this device's secret at once (a copied
    /// data dir): the newer one holds the device, the older one was stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictView>,
}

/// Two agents with one device's secret, as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConflictView {
    /// Unix seconds.
    pub at: i64,
    /// Where the agent that was stopped connected from.
    pub displaced_from: Option<String>,
    /// Where the agent that holds the device now connected from.
    pub connected_from: Option<String>,
}

/// A service as the API shows it: what the device declared and how its last probe went.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceView {
    /// Name used in proxy URLs.
    pub name: String,
    /// Loopback port on the device.
    pub port: u16,
    /// Path the device probes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// `up`, `down`, or `unknown` (device offline or not probed yet).
    #[serde(default = "unknown_health")]
    pub health: HealthStatus,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<String>,
}

fn unknown_health() -> HealthStatus {
    HealthStatus::Unknown
}

fn service_views(
    state: &HubState,
    id: &DeviceId,
    services: Vec<ServiceInfo>,
    online: bool,
) -> Vec<ServiceView> {
    let health = if online {
        state.registry.service_health(id)
    } else {
        Vec::new()
    };
    services
        .into_iter()
        .map(|s| {
            let h = health.iter().find(|h| h.name == s.name);
            ServiceView {
                health: h.map_or(HealthStatus::Unknown, |h| h.status),
                health_detail: h.and_then(|h| h.detail.clone()),
                name: s.name,
                port: s.port,
                health_path: s.health_path,
            }
        })
        .collect()
}

/// An owner as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OwnerView {
    /// User id.
    pub id: UserId,
    /// User name.
    pub name: String,
}

impl From<Owner> for OwnerView {
    fn from(o: Owner) -> Self {
        OwnerView {
            id: o.id,
            name: o.name,
        }
    }
}

pub(crate) fn view(state: &HubState, d: DeviceRecord) -> CocoonView {
    let presence = state.registry.presence(&d.id);
    CocoonView {
        status: match (presence.online, presence.draining) {
            (true, true) => "stopping",
            (true, false) => "online",
            (false, _) => "offline",
        }
        .into(),
        online: presence.online,
        last_heartbeat_age_secs: presence
            .last_heartbeat_age
            .map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
        services: service_views(state, &d.id, d.services, presence.online),
        load: if presence.online {
            state.registry.load(&d.id)
        } else {
            None
        },
        capabilities: d.capabilities,
        in_flight: state.registry.in_flight(&d.id).unwrap_or(0),
        conflict: state.registry.conflict(&d.id).map(|c| ConflictView {
            at: c.at,
            displaced_from: c.displaced.map(|a| a.to_string()),
            connected_from: c.by.map(|a| a.to_string()),
        }),
        id: d.id,
        name: d.name,
        location: d.location,
        hardware: d.hardware,
        owners: d.owners.into_iter().map(Into::into).collect(),
        created_at: d.created_at,
    }
}

#[derive(Serialize)]
struct CocoonList {
    cocoons: Vec<CocoonView>,
}

async fn list_cocoons(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<CocoonList>, ApiError> {
    let devices = state.catalog.devices_owned_by(caller.id).await?;
    Ok(Json(CocoonList {
        cocoons: devices.into_iter().map(|d| view(&state, d)).collect(),
    }))
}

/// Loads a device the caller owns; anything else is the same 404.
pub(crate) async fn owned_device(
    state: &HubState,
    caller: &Caller,
    raw_id: &str,
) -> Result<DeviceRecord, ApiError> {
    let id: DeviceId = raw_id.parse().map_err(|_| ApiError::not_found_device())?;
    let device = state
        .catalog
        .device(&id)
        .await?
        .ok_or_else(ApiError::not_found_device)?;
    if !device.owners.iter().any(|o| o.id == caller.id) {
        return Err(ApiError::not_found_device());
    }
    Ok(device)
}

async fn get_cocoon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CocoonView>, ApiError> {
    let device = owned_device(&state, &caller, &id).await?;
    Ok(Json(view(&state, device)))
}

#[derive(Serialize)]
struct ServiceList {
    device_id: DeviceId,
    online: bool,
    services: Vec<ServiceView>,
}

async fn get_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ServiceList>, ApiError> {
    let device = owned_device(&state, &caller, &id).await?;
    let online = state.registry.presence(&device.id).online;
    Ok(Json(ServiceList {
        services: service_views(&state, &device.id, device.services, online),
        device_id: device.id,
        online,
    }))
}

#[derive(Deserialize)]
struct TokenRequest {
    kind: TokenKind,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default = "default_token_ttl")]
    expires_in_secs: u64,
}

fn default_token_ttl() -> u64 {
    3600
}

#[derive(Serialize)]
struct TokenResponse {
    token: String,
    kind: TokenKind,
    expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<TokenRequest>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    let device = match (req.kind, req.device_id.as_deref()) {
        (TokenKind::Setup, None) => None,
        (TokenKind::Setup, Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a setup token enrols a new device; it takes no device_id",
            ))
        }
        (TokenKind::Share, None) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a share token needs the device_id of a device you own",
            ))
        }
        (TokenKind::Share, Some(id)) => Some(owned_device(&state, &caller, id).await?.id),
    };
    let issued = tokens::issue(
        state.catalog.as_ref(),
        caller.id,
        req.kind,
        device.clone(),
        Duration::from_secs(req.expires_in_secs),
        unix_now_i64(),
    )
    .await?;
    tracing::info!(token_id = %issued.id, kind = req.kind.as_str(), user = %caller.id, "token issued");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token: issued.token,
            kind: req.kind,
            expires_at: issued.expires_at,
            device_id: device,
        }),
    ))
}

#[derive(Deserialize)]
struct ClaimRequest {
    token: String,
}

async fn claim_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<ClaimRequest>,
) -> Result<Json<CocoonView>, ApiError> {
    let device_id = tokens::claim(
        state.catalog.as_ref(),
        &req.token,
        caller.id,
        unix_now_i64(),
    )
    .await
    .inspect_err(|e| warn!(user = %caller.id, "share token refused: {e}"))?;
    tracing::info!(device_id = %device_id, user = %caller.id, "device shared");
    state.registry.add_owner(&device_id, caller.id);
    let device = state
        .catalog
        .device(&device_id)
        .await?
        .ok_or_else(ApiError::not_found_device)?;
    Ok(Json(view(&state, device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cocoon_that_carries_bodies_gets_the_large_read_buffer() {
        let config = crate::HubConfig::default();
        for hinted in ["bodies=1", "v=2&bodies=1"] {
            assert_eq!(
                read_buffer_bytes(&config, Some(hinted)),
                config.ws_body_read_buffer_bytes,
                "{hinted}"
            );
        }
        for other in [
            None,
            Some(""),
            Some("bodies=0"),
            Some("bodies=1x"),
            Some("xbodies=1"),
        ] {
            assert_eq!(
                read_buffer_bytes(&config, other),
                config.ws_read_buffer_bytes,
                "{other:?}"
            );
        }
        assert!(config.ws_read_buffer_bytes < config.ws_body_read_buffer_bytes);
    }
}
