//! Signing in: an API key exchanged for a session (`POST /api/auth/token`), and the
//! web UI's sign-in and sign-out, which also set and clear the session cookie.

use std::net::SocketAddr;
use std::sync::Arc;

use adi_protocol::ErrorCode;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{bearer_token, Json, SESSION_COOKIE, SESSION_COOKIE_PATH};
use crate::audit;
use crate::auth;
use crate::catalog::{ApiKeyRecord, User, UserId};
use crate::credential;
use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/auth/token", post(auth_token))
        .route(
            "/api/auth/session",
            post(open_session).delete(close_session),
        )
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

/// The user and key an API key names, checked under the sign-in limits: a source that
/// tries too often, or that keeps failing on one key, is told to wait.
pub(crate) async fn signed_in(
    state: &HubState,
    peer: SocketAddr,
    api_key: &str,
) -> Result<(User, ApiKeyRecord), ApiError> {
    let account = credential::parse(api_key).map(|p| p.account());
    state
        .throttle
        .admit(peer.ip(), account.as_deref())
        .map_err(|wait| ApiError::throttled("sign-ins", wait))?;
    match auth::user_for_api_key(&state.catalog, api_key).await {
        Ok(found) => Ok(found),
        Err(e) => {
            if !matches!(e, auth::AuthError::Catalog(_)) {
                state.throttle.failed(peer.ip(), account.as_deref());
                let mut event = audit::event(audit::Kind::SignInFailed)
                    .seen_from(peer.ip())
                    .detail(e.to_string());
                if let Some(parsed) = credential::parse(api_key) {
                    event.actor_key = Some(parsed.id.to_owned());
                    // Whose key was tried, so they see it in their log.
                    if let Ok(Some(key)) = state.catalog.api_key(parsed.id).await {
                        event.target_user = Some(key.user_id);
                    }
                }
                audit::record(state, event).await;
            }
            Err(e.into())
        }
    }
}

async fn auth_token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::Json<AuthRequest>, JsonRejection>,
) -> Result<Json<AuthResponse>, ApiError> {
    let req = auth_request(body)?;
    let (user, key) = signed_in(&state, peer, &req.api_key).await?;
    let (token, expires_at) = state.auth.issue(&user, &key);
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Result<axum::Json<AuthRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = auth_request(body)?;
    let (user, key) = signed_in(&state, peer, &req.api_key).await?;
    let (token, expires_at) = state.auth.issue(&user, &key);
    let secure = state.config.tls.is_some()
        || state
            .config
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v == "https");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path={SESSION_COOKIE_PATH}; HttpOnly; SameSite=Strict; Max-Age={}{}",
        expires_at.saturating_sub(auth::unix_now()),
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

/// Signs out: the session of the bearer token that comes along (the CLI's, the web
/// UI's) is revoked for the rest of its life, on this hub and after a restart, and the
/// cookie is cleared (also one an older hub set on `Path=/`). Without a valid bearer
/// token there is no session to revoke, and only the cookie is cleared.
async fn close_session(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(bearer_token);
    if let Some(claims) = bearer.and_then(|t| state.auth.verify(t).ok()) {
        if let Some(sid) = &claims.sid {
            let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
            state
                .catalog
                .revoke_session(sid, exp, auth::unix_now_i64())
                .await?;
            state.auth.revoke(sid, claims.exp);
            tracing::info!(user = %claims.sub, "session signed out");
            let mut event = audit::event(audit::Kind::SessionRevoked);
            event.actor_user = Some(claims.sub);
            event.actor_key = claims.kid.clone();
            audit::record(&state, event).await;
        }
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    for path in [SESSION_COOKIE_PATH, "/"] {
        let clear = format!("{SESSION_COOKIE}=; Path={path}; HttpOnly; SameSite=Strict; Max-Age=0");
        if let Ok(v) = header::HeaderValue::from_str(&clear) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}
