//! The REST edge's one error: what every route, the proxy and the client socket answer
//! when they refuse, as `{"error": {"code", "message"}}` with the status the shared
//! [`ErrorCode`] fixes, and every conversion into it from the errors of the layers
//! below (catalog, tokens, sign-in, device calls, routing, access). Internal detail is
//! logged here, once, and never sent. Nothing here decides anything: it only says.

use adi_protocol::ErrorCode;
use axum::extract::rejection::JsonRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::warn;

use crate::access::AccessError;
use crate::auth::AuthError;
use crate::catalog::CatalogError;
use crate::routing::RouteError;
use crate::rpc::RpcError;
use crate::tokens::TokenError;

/// An error as the REST edge answers it.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// Seconds for `Retry-After`, on a refusal that passes with time.
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a message safe to show the caller.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `429` for one more `what` than its limit allows, to be tried again after `wait`.
    pub(crate) fn throttled(what: &str, wait: std::time::Duration) -> Self {
        let secs = crate::throttle::retry_after_secs(wait);
        ApiError {
            code: ErrorCode::TooManyRequests,
            message: format!(
                "too many {what} from this address or on this account; retry in {secs} s"
            ),
            retry_after: Some(secs),
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

    pub(crate) fn not_found_device() -> Self {
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
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
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

impl From<RpcError> for ApiError {
    fn from(e: RpcError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        // Routing treats a user's preferred device they may not use as unknown, so no
        // answer here names a device the caller is not a member of.
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::NotFound => ApiError::not_found_device(),
            AccessError::NotOwner | AccessError::DeviceLimited => {
                ApiError::new(ErrorCode::Forbidden, e.to_string())
            }
            AccessError::InsufficientScope(_) => {
                ApiError::new(ErrorCode::InsufficientScope, e.to_string())
            }
            AccessError::Ambiguous { .. } => ApiError::new(ErrorCode::Conflict, e.to_string()),
            AccessError::Catalog(inner) => inner.into(),
        }
    }
}
