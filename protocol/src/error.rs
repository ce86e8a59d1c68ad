//! The closed set of error codes every side shares, each mapped to one HTTP status at
//! the REST edge so the CLI, the web UI and cocoons read failures the same way.

use serde::{Deserialize, Serialize};

/// Why a request or a connection was refused. Adding a code is a protocol change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No valid credential was presented.
    Unauthorized,
    /// The caller is known but may not do this.
    Forbidden,
    /// The thing asked for does not exist (or the caller may not know it exists).
    NotFound,
    /// No online device offers the requested capability.
    NoCapableDevice,
    /// The target device is not connected.
    DeviceOffline,
    /// No answer came within the deadline.
    Timeout,
    /// A body or frame is larger than the configured limit.
    PayloadTooLarge,
    /// The request is malformed.
    BadRequest,
    /// The device or its service answered with a failure.
    UpstreamError,
    /// The two sides share no protocol version.
    UnsupportedVersion,
    /// A setup or share token is not of the token format.
    TokenMalformed,
    /// A setup or share token is not known to this hub.
    TokenUnknown,
    /// A setup or share token is past its expiry.
    TokenExpired,
    /// A one-time token was already used.
    TokenUsed,
    /// A one-time token was revoked by whoever made it.
    TokenRevoked,
    /// A device secret the hub has never enrolled, presented without a setup token.
    NotEnrolled,
    /// The request conflicts with existing state (a user name taken, say).
    Conflict,
    /// The request's head (its headers and target) is larger than can be carried to
    /// the device; the client should send fewer or shorter headers.
    HeadersTooLarge,
    /// The caller holds more connections than one source may.
    TooManyRequests,
    /// The hub cannot serve this now: a store cannot read or write (disk full, I/O
    /// error, a lock held too long, read-only, database unreachable) and nothing was
    /// stored, or the hub is at its connection limit. The same request can succeed
    /// once the cause is gone.
    Unavailable,
    /// Another agent with this device's secret connected (a copied data dir): the
    /// older connection is displaced and its agent stops.
    DuplicateAgent,
    /// The device was removed by one of its owners: its secret is refused from then
    /// on, and its agent stops rather than retry.
    DeviceRemoved,
    /// The credential is valid but its scopes do not cover this route; the message
    /// names the scope needed.
    InsufficientScope,
    /// The hub failed internally; the detail is in its log, never in the reply.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code maps to at the REST edge.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized | ErrorCode::NotEnrolled => 401,
            ErrorCode::Forbidden | ErrorCode::InsufficientScope => 403,
            ErrorCode::NotFound | ErrorCode::TokenUnknown => 404,
            ErrorCode::NoCapableDevice => 503,
            ErrorCode::DeviceOffline | ErrorCode::UpstreamError => 502,
            ErrorCode::Timeout => 504,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion | ErrorCode::TokenMalformed => {
                400
            }
            ErrorCode::TokenExpired
            | ErrorCode::TokenUsed
            | ErrorCode::TokenRevoked
            | ErrorCode::DeviceRemoved => 410,
            ErrorCode::Conflict | ErrorCode::DuplicateAgent => 409,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The wire name, as used in JSON bodies and close reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoCapableDevice => "no_capable_device",
            ErrorCode::DeviceOffline => "device_offline",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TokenMalformed => "token_malformed",
            ErrorCode::TokenUnknown => "token_unknown",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::NotEnrolled => "not_enrolled",
            ErrorCode::Conflict => "conflict",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DuplicateAgent => "duplicate_agent",
            ErrorCode::DeviceRemoved => "device_removed",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether retrying the same registration later can succeed. A cocoon gives up on
    /// the others, because no amount of reconnecting fixes a bad token.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal
                | ErrorCode::Timeout
                | ErrorCode::UpstreamError
                | ErrorCode::Unavailable
                | ErrorCode::TooManyRequests
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_name_matches_serde() {
        for code in [
            ErrorCode::Unauthorized,
            ErrorCode::NoCapableDevice,
            ErrorCode::TokenExpired,
            ErrorCode::TokenRevoked,
            ErrorCode::PayloadTooLarge,
            ErrorCode::HeadersTooLarge,
            ErrorCode::TooManyRequests,
            ErrorCode::Unavailable,
            ErrorCode::DuplicateAgent,
            ErrorCode::DeviceRemoved,
            ErrorCode::InsufficientScope,
        ] {
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
