//! The one size rule of the link between the hub and a cocoon: **the sender checks.**
//!
//! Each side announces the largest control (text) frame it accepts: the cocoon in
//! [`Register::max_frame_bytes`](crate::Register), the hub in
//! [`Registered::max_frame_bytes`](crate::Registered); absent means
//! [`DEFAULT_MAX_FRAME_BYTES`]. A receiver closes the link on a frame over its limit,
//! because only a broken peer sends one. So a sender never puts such a frame on the
//! link: it measures every message whose size depends on what a user, a service or a
//! plugin supplied, and ends that one request instead, with the status a user expects.
//! The link closes only for a broken peer, never because of what a user or a service
//! sent.
//!
//! | message | direction | largest | checked before sending by | when it does not fit |
//! |---|---|---|---|---|
//! | `register` | device → hub | hub's limit | hub refuses it | the agent stops: `payload_too_large` (its own services and plugins) |
//! | `heartbeat`, `capabilities_update` | device → hub | hub's limit | cocoon | the update is not sent and the agent logs why; the last one sent stands |
//! | `proxy_request` (head) | hub → device | device's limit | hub, per request | `431 headers_too_large` to the client |
//! | `proxy_response` (head) | device → hub | hub's limit | cocoon, per request | `502 upstream_error` naming the size |
//! | `proxy_error` | device → hub | [`MAX_MESSAGE_TEXT`] of text | cocoon | its message is cut |
//! | `request` | hub → device | device's limit | hub, per request | `413 payload_too_large` |
//! | `response` | device → hub | hub's limit | cocoon, per request | a `payload_too_large` answer in its place |
//! | `capability_request` | device → hub | hub's limit | cocoon, per request | `413` to the local caller |
//! | `capability_response` | hub → device | device's limit | hub, per request | a `payload_too_large` answer in its place |
//! | `registered`, `error`, `draining` | either | far below any limit | their fixed shape | — |
//! | binary body frames | either | [`MAX_BODY_FRAME`] | the stream multiplexer's encoder | bodies are cut into chunks |
//!
//! Pages of tasks and log lines are sized by the device to fit (`reply_budget`), so a
//! large store never produces an oversized answer. Request heads are also bounded
//! where they enter: the hub's HTTP server refuses a head over its own buffer (`431`)
//! before anything is measured here.

use serde::Serialize;

pub use crate::codec::DEFAULT_MAX_FRAME_BYTES;
use crate::{encode, CapabilityOutcome, DeviceToHub, ErrorCode, HubToDevice, Outcome, RemoteError};

/// Largest binary frame either side produces or must accept for proxied bodies,
/// whatever its control-frame limit: a body chunk plus its 5-byte stream header.
pub const MAX_BODY_FRAME: usize = 64 * 1024 + 5;

/// Longest human-readable message (an error's words) put on the link; longer ones are
/// cut at a character boundary.
pub const MAX_MESSAGE_TEXT: usize = 1024;

/// The peer's announced limit, or the default when it announced none (or one this
/// machine cannot address).
pub fn announced(max_frame_bytes: Option<u64>) -> usize {
    max_frame_bytes
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(DEFAULT_MAX_FRAME_BYTES)
}

/// `text` cut to at most [`MAX_MESSAGE_TEXT`] bytes at a character boundary, with an
/// ellipsis when cut.
pub fn clip_message(mut text: String) -> String {
    if text.len() <= MAX_MESSAGE_TEXT {
        return text;
    }
    let mut end = MAX_MESSAGE_TEXT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// A message whose size depends on what a user, a service or a plugin supplied, and
/// which therefore has a stand-in that fits: the stand-in still ends its request, with
/// the reason, so the request is answered exactly once and the link carries on.
pub trait Fit: Serialize + Sized {
    /// What goes instead of `self`, whose frame would be `len` bytes against the
    /// peer's `max`; `None` for a message that goes as it is (one no user or service
    /// can make large).
    fn stand_in(self, len: usize, max: usize) -> Option<Self>;
}

/// The frame for `msg`, held to the peer's `max`: `msg` itself when it fits, else its
/// stand-in. The second value is the size `msg` would have had, when it was replaced,
/// for the sender's log.
pub fn fit<M: Fit>(msg: M, max: usize) -> (String, Option<usize>) {
    let frame = encode(&msg);
    if frame.len() <= max {
        return (frame, None);
    }
    let len = frame.len();
    match msg.stand_in(len, max) {
        Some(stand_in) => (encode(&stand_in), Some(len)),
        None => (frame, None),
    }
}

impl Fit for DeviceToHub {
    fn stand_in(self, len: usize, max: usize) -> Option<Self> {
        match self {
            DeviceToHub::Response { request_id, .. } => Some(DeviceToHub::Response {
                request_id,
                outcome: Outcome::Error(RemoteError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the answer is {len} bytes; at most {max} fit in one frame"),
                )),
            }),
            DeviceToHub::ProxyResponse { stream_id, .. } => Some(DeviceToHub::ProxyError {
                stream_id,
                code: ErrorCode::UpstreamError,
                message: format!(
                    "the service's response head is {len} bytes; at most {max} can be passed on"
                ),
            }),
            DeviceToHub::ProxyError {
                stream_id,
                code,
                message,
            } => Some(DeviceToHub::ProxyError {
                stream_id,
                code,
                message: clip_message(message),
            }),
            _ => None,
        }
    }
}

impl Fit for HubToDevice {
    fn stand_in(self, len: usize, max: usize) -> Option<Self> {
        match self {
            HubToDevice::CapabilityResponse { request_id, .. } => {
                Some(HubToDevice::CapabilityResponse {
                    request_id,
                    outcome: CapabilityOutcome::Error(RemoteError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the answer is {len} bytes; at most {max} fit in one frame"),
                    )),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_a_character_boundary() {
        assert_eq!(clip_message("short".into()), "short");
        let long = "é".repeat(MAX_MESSAGE_TEXT);
        let cut = clip_message(long);
        assert!(cut.len() <= MAX_MESSAGE_TEXT, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn what_does_not_fit_is_replaced_by_an_error_that_ends_the_same_request() {
        let answer = DeviceToHub::Response {
            request_id: 7,
            outcome: Outcome::Ok(crate::DeviceReply::Capability {
                payload: crate::Payload::from(serde_json::json!({"x": "y".repeat(500)})),
            }),
        };
        let (frame, replaced) = fit(answer.clone(), 4096);
        assert_eq!(replaced, None);
        assert_eq!(frame, encode(&answer));
        let (frame, replaced) = fit(answer, 100);
        assert!(replaced.is_some_and(|n| n > 500), "{replaced:?}");
        assert!(frame.len() <= 200, "{frame}");
        let back: DeviceToHub = crate::decode(frame.as_bytes(), 1024).expect("decodes");
        assert!(matches!(
            back,
            DeviceToHub::Response {
                request_id: 7,
                outcome: Outcome::Error(RemoteError {
                    code: ErrorCode::PayloadTooLarge,
                    ..
                })
            }
        ));
        let head = DeviceToHub::ProxyResponse {
            stream_id: 3,
            status: 200,
            headers: vec![("x".into(), "v".repeat(500))],
        };
        let (frame, _) = fit(head, 100);
        let back: DeviceToHub = crate::decode(frame.as_bytes(), 1024).expect("decodes");
        assert!(matches!(
            back,
            DeviceToHub::ProxyError {
                stream_id: 3,
                code: ErrorCode::UpstreamError,
                ..
            }
        ));
        // What has no stand-in goes as it is.
        let (frame, replaced) = fit(DeviceToHub::Draining, 1);
        assert_eq!((frame.as_str(), replaced), (r#"{"type":"draining"}"#, None));
    }

    #[test]
    fn an_absent_limit_is_the_default() {
        assert_eq!(announced(None), DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(announced(Some(1 << 20)), 1 << 20);
    }
}
