//! What a request carries that the routes take apart: its JSON body (rejections in
//! the API's error shape) and its caller (the bearer session, or on `/proxy/...` the
//! web UI's session cookie). A session outlives nothing it names: a user removed from
//! the catalog is refused.

use std::sync::Arc;

use adi_protocol::ErrorCode;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::ApiError;
use crate::HubState;

type AppState = Arc<HubState>;

/// A JSON body whose rejections use the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

pub use crate::access::Caller;

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

/// The token of an `Authorization: Bearer ...` header, if it is one.
pub(crate) fn bearer_token(header: &header::HeaderValue) -> Option<&str> {
    let h = header.to_str().ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
}

fn bearer_caller(header: &header::HeaderValue, state: &AppState) -> Result<Caller, ApiError> {
    let token = bearer_token(header)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "malformed Authorization header"))?;
    Ok(state.auth.verify(token)?.into())
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
        let mut caller = bearer_caller(header, state)?;
        caller.source = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        live_user(state, caller).await
    }
}

/// The caller, if their user still exists.
pub(crate) async fn live_user(state: &HubState, caller: Caller) -> Result<Caller, ApiError> {
    match state.catalog.user_exists(caller.id).await? {
        true => Ok(caller),
        false => Err(ApiError::new(
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
    Ok(state.auth.verify(&token)?.into())
}
