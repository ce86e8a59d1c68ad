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

pub use crate::codec::DEFAULT_MAX_FRAME_BYTES;

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
    fn an_absent_limit_is_the_default() {
        assert_eq!(announced(None), DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(announced(Some(1 << 20)), 1 << 20);
    }
}
