//! Direct decoding of the frames of a capability round trip, of a device's page of
//! tasks (each part of a merged view), and of a proxied request's head.
//!
//! serde reads an internally tagged message (`{"type": ...}`) by buffering the whole
//! frame into a tree of its own first, and a flattened field (`outcome`, `request`)
//! a second time, before building the message; the payload inside was parsed into a
//! `Value` on top. For the four frames every capability request makes, the tag is
//! known from the frame's first bytes (our encoder writes it first), so these are read
//! in one pass straight into the message, and the payload stays raw text.
//!
//! Anything else, including these messages written in another field order or with
//! a shape this path does not cover, goes the general way, which also gives the error.

use serde::Deserialize;

use crate::codec::{decode_text, DecodeError};
use crate::tasks::TaskPage;
use crate::{
    CapabilityAnswer, CapabilityOutcome, CapabilityQuery, DeviceId, DeviceReply, DeviceRequest,
    DeviceToHub, HubToDevice, Outcome, Payload, ProxyRequest, RemoteError,
};

const CAPABILITY_REQUEST: &[u8] = br#"{"type":"capability_request","#;
const RESPONSE: &[u8] = br#"{"type":"response","#;
const REQUEST: &[u8] = br#"{"type":"request","#;
const CAPABILITY_RESPONSE: &[u8] = br#"{"type":"capability_response","#;
const PROXY_REQUEST: &[u8] = br#"{"type":"proxy_request","#;

/// Decodes a frame a device sent: the text of a WebSocket text frame, which the
/// WebSocket reader has checked as UTF-8 already.
pub fn decode_device_frame(frame: &str, max_len: usize) -> Result<DeviceToHub, DecodeError> {
    direct_or_general(
        frame,
        max_len,
        &[
            (CAPABILITY_REQUEST, capability_request),
            (RESPONSE, response),
        ],
    )
}

/// Decodes a frame the hub sent, text as in [`decode_device_frame`].
pub fn decode_hub_frame(frame: &str, max_len: usize) -> Result<HubToDevice, DecodeError> {
    direct_or_general(
        frame,
        max_len,
        &[
            (REQUEST, request),
            (CAPABILITY_RESPONSE, capability_response),
            (PROXY_REQUEST, proxy_request),
        ],
    )
}

/// A direct reader for frames that start with a prefix: `None` declines the frame.
type Direct<T> = (&'static [u8], fn(&[u8]) -> Option<T>);

/// The message from the first direct reader whose prefix the frame starts with and
/// that accepts it; otherwise the general decoder's answer.
fn direct_or_general<T: serde::de::DeserializeOwned>(
    frame: &str,
    max_len: usize,
    direct: &[Direct<T>],
) -> Result<T, DecodeError> {
    let bytes = frame.as_bytes();
    // Only frames a direct reader takes pay for the scan below: heartbeats and the
    // rest go straight the general way. Being text, the frame is UTF-8 throughout, so
    // the direct readers, which look only at the fields they read, and the general
    // decoder, which looks at all of it, cannot disagree about that.
    let Some((_, read)) = direct.iter().find(|(prefix, _)| bytes.starts_with(prefix)) else {
        return decode_text(frame, max_len);
    };
    if frame.len() <= max_len && !may_overflow(bytes) {
        if let Some(msg) = read(bytes) {
            return Ok(msg);
        }
    }
    decode_text(frame, max_len)
}

/// Whether a number outside the frame's strings might not fit an `f64`: one with an
/// exponent of three digits or more, or a run of 300 digits. The general decoder
/// refuses such a number anywhere, the direct readers only where they read one, not in
/// a field they skip; so such a frame goes the general way, which gives the one answer.
/// Our encoder never writes one (an `f64` prints with a two-digit exponent at most, as
/// `1e-7`), and the scan is one pass over bytes already in cache that jumps over strings
/// (most of a frame: ids, titles, text) from one quote or backslash to the next.
fn may_overflow(frame: &[u8]) -> bool {
    let mut digits = 0usize;
    let mut exponent: Option<usize> = None;
    let mut i = 0;
    while let Some(&b) = frame.get(i) {
        i += 1;
        if b == b'"' {
            // To the closing quote; an unterminated string holds no number.
            loop {
                let Some(at) = frame
                    .get(i..)
                    .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                else {
                    return false;
                };
                i += at + 1;
                if frame[i - 1] == b'"' {
                    break;
                }
                // A backslash: the byte after it is escaped.
                i += 1;
            }
            digits = 0;
            exponent = None;
            continue;
        }
        match (b, exponent) {
            (b'0'..=b'9', Some(n)) => {
                if n + 1 >= 3 {
                    return true;
                }
                exponent = Some(n + 1);
            }
            (b'0'..=b'9', None) => {
                digits += 1;
                if digits >= 300 {
                    return true;
                }
            }
            (b'e' | b'E', None) if digits > 0 => exponent = Some(0),
            (b'+' | b'-', Some(0)) | (b'.', None) => {}
            _ => {
                digits = 0;
                exponent = None;
            }
        }
    }
    false
}

/// Exactly one of an answer and an error, as the general way requires.
fn one_of<A>(ok: Option<A>, error: Option<RemoteError>) -> Option<Result<A, RemoteError>> {
    match (ok, error) {
        (Some(a), None) => Some(Ok(a)),
        (None, Some(e)) => Some(Err(e)),
        _ => None,
    }
}

fn capability_request(frame: &[u8]) -> Option<DeviceToHub> {
    #[derive(Deserialize)]
    struct Frame {
        request_id: u64,
        capability: CapabilityQuery,
        #[serde(default)]
        payload: Payload,
        #[serde(default)]
        prefer_device: Option<DeviceId>,
        deadline_ms: u64,
    }
    let f: Frame = serde_json::from_slice(frame).ok()?;
    Some(DeviceToHub::CapabilityRequest {
        request_id: f.request_id,
        capability: f.capability,
        payload: f.payload,
        prefer_device: f.prefer_device,
        deadline_ms: f.deadline_ms,
    })
}

/// The one kind of reply this path reads; any other fails here and goes the general way.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum CapabilityKind {
    Capability,
}

/// A device's answer: a capability's or a page of tasks (what every merged view asks
/// each device for); any other reply goes the general way.
fn response(frame: &[u8]) -> Option<DeviceToHub> {
    capability_answer(frame).or_else(|| tasks_response(frame))
}

fn capability_answer(frame: &[u8]) -> Option<DeviceToHub> {
    #[derive(Deserialize)]
    struct Reply {
        #[allow(dead_code)]
        kind: CapabilityKind,
        payload: Payload,
    }
    #[derive(Deserialize)]
    struct Frame {
        request_id: u64,
        ok: Option<Reply>,
        error: Option<RemoteError>,
    }
    let f: Frame = serde_json::from_slice(frame).ok()?;
    let outcome = match one_of(f.ok, f.error)? {
        Ok(reply) => Outcome::Ok(DeviceReply::Capability {
            payload: reply.payload,
        }),
        Err(e) => Outcome::Error(e),
    };
    Some(DeviceToHub::Response {
        request_id: f.request_id,
        outcome,
    })
}

/// The kind of reply [`tasks_response`] reads.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum TasksKind {
    Tasks,
}

fn tasks_response(frame: &[u8]) -> Option<DeviceToHub> {
    #[derive(Deserialize)]
    struct Reply {
        #[allow(dead_code)]
        kind: TasksKind,
        page: TaskPage,
    }
    #[derive(Deserialize)]
    struct Frame {
        request_id: u64,
        ok: Option<Reply>,
        error: Option<RemoteError>,
    }
    let f: Frame = serde_json::from_slice(frame).ok()?;
    let outcome = match one_of(f.ok, f.error)? {
        Ok(reply) => Outcome::Ok(DeviceReply::Tasks { page: reply.page }),
        Err(e) => Outcome::Error(e),
    };
    Some(DeviceToHub::Response {
        request_id: f.request_id,
        outcome,
    })
}

fn request(frame: &[u8]) -> Option<HubToDevice> {
    #[derive(Deserialize)]
    struct Frame {
        request_id: u64,
        deadline_ms: u64,
        #[allow(dead_code)]
        op: CapabilityKind,
        capability: CapabilityQuery,
        #[serde(default)]
        payload: Payload,
    }
    let f: Frame = serde_json::from_slice(frame).ok()?;
    Some(HubToDevice::Request {
        request_id: f.request_id,
        deadline_ms: f.deadline_ms,
        request: DeviceRequest::Capability {
            capability: f.capability,
            payload: f.payload,
        },
    })
}

/// Every proxied request's head: read straight into the struct, its tag skipped as an
/// unknown field, instead of buffered and read twice.
fn proxy_request(frame: &[u8]) -> Option<HubToDevice> {
    serde_json::from_slice::<ProxyRequest>(frame)
        .ok()
        .map(HubToDevice::ProxyRequest)
}

fn capability_response(frame: &[u8]) -> Option<HubToDevice> {
    #[derive(Deserialize)]
    struct Frame {
        request_id: u64,
        ok: Option<CapabilityAnswer>,
        error: Option<RemoteError>,
    }
    let f: Frame = serde_json::from_slice(frame).ok()?;
    let outcome = match one_of(f.ok, f.error)? {
        Ok(answer) => CapabilityOutcome::Ok(answer),
        Err(e) => CapabilityOutcome::Error(e),
    };
    Some(HubToDevice::CapabilityResponse {
        request_id: f.request_id,
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode;
    use crate::{encode, ErrorCode};

    const MAX: usize = crate::DEFAULT_MAX_FRAME_BYTES;

    #[test]
    fn only_numbers_that_might_not_fit_send_a_frame_the_general_way() {
        let long = format!(r#"{{"a":{}}}"#, "9".repeat(300));
        for (frame, general) in [
            (r#"{"a":1e999}"#, true),
            (r#"{"a":-2.5E+308}"#, true),
            (long.as_str(), true),
            (r#"{"a":1e-7,"b":[2.5e-12,10]}"#, false),
            (r#"{"a":"1e999"}"#, false),
            (r#"{"a":"x\"1e999","b":true,"c":false}"#, false),
            (r#"{"id":"0123456789abcdef9e999"}"#, false),
        ] {
            assert_eq!(may_overflow(frame.as_bytes()), general, "{frame}");
        }
    }

    /// The scan as it reads in words: every byte in turn, tracking whether it is in a
    /// string, what escapes and how long the run of digits and the exponent are.
    fn may_overflow_byte_by_byte(frame: &[u8]) -> bool {
        let (mut in_string, mut escaped) = (false, false);
        let (mut digits, mut exponent) = (0usize, None::<usize>);
        for &b in frame {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match (b, exponent) {
                (b'0'..=b'9', Some(n)) if n + 1 >= 3 => return true,
                (b'0'..=b'9', Some(n)) => exponent = Some(n + 1),
                (b'0'..=b'9', None) if digits + 1 >= 300 => return true,
                (b'0'..=b'9', None) => digits += 1,
                (b'e' | b'E', None) if digits > 0 => exponent = Some(0),
                (b'+' | b'-', Some(0)) | (b'.', None) => {}
                (b'"', _) => {
                    in_string = true;
                    (digits, exponent) = (0, None);
                }
                _ => (digits, exponent) = (0, None),
            }
        }
        false
    }

    proptest::proptest! {
        /// Jumping over strings finds what reading every byte finds, escapes, unclosed
        /// strings and long runs of digits included.
        #[test]
        fn jumping_over_strings_agrees_with_reading_every_byte(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::string::string_regex("[0-9eE+.\\-]{1,6}").expect("regex"),
                    proptest::string::string_regex("[\"\\\\]{1,3}").expect("regex"),
                    proptest::string::string_regex("[a-z:,{}\\[\\] ]{1,4}").expect("regex"),
                    proptest::strategy::Just("9".repeat(299)),
                ],
                0..40,
            )
        ) {
            let frame = parts.concat();
            proptest::prop_assert_eq!(
                may_overflow(frame.as_bytes()),
                may_overflow_byte_by_byte(frame.as_bytes()),
                "{}", frame
            );
        }
    }

    fn spaced() -> Payload {
        Payload::from_json(r#"{ "text" : "hi", "v" : [1.50, 2] }"#.into()).expect("json")
    }

    #[test]
    fn round_trip_frames_keep_their_payload_as_sent() {
        // The general way would print the payload again (`{"text":"hi","v":[1.5,2]}`);
        // the spacing surviving shows these frames took the direct path.
        let query: CapabilityQuery = "embeddings@1.0.0".parse().expect("query");
        let frames = [
            encode(&DeviceToHub::CapabilityRequest {
                request_id: 9,
                capability: query.clone(),
                payload: spaced(),
                prefer_device: Some(DeviceId::from_mac(&[1; 16])),
                deadline_ms: 500,
            }),
            encode(&DeviceToHub::Response {
                request_id: 4,
                outcome: Outcome::Ok(DeviceReply::Capability { payload: spaced() }),
            }),
        ];
        for frame in &frames {
            let msg = decode_device_frame(frame, MAX).expect("decodes");
            assert_eq!(
                msg,
                decode::<DeviceToHub>(frame.as_bytes(), MAX).expect("same")
            );
            assert!(encode(&msg).contains(spaced().get()), "{frame}");
        }
        let frames = [
            encode(&HubToDevice::Request {
                request_id: 2,
                deadline_ms: 30_000,
                request: DeviceRequest::Capability {
                    capability: query,
                    payload: spaced(),
                },
            }),
            encode(&HubToDevice::CapabilityResponse {
                request_id: 3,
                outcome: CapabilityOutcome::Ok(CapabilityAnswer {
                    from_device: DeviceId::from_mac(&[2; 16]),
                    payload: spaced(),
                }),
            }),
        ];
        for frame in &frames {
            let msg = decode_hub_frame(frame, MAX).expect("decodes");
            assert_eq!(
                msg,
                decode::<HubToDevice>(frame.as_bytes(), MAX).expect("same")
            );
            assert!(encode(&msg).contains(spaced().get()), "{frame}");
        }
    }

    #[test]
    fn a_proxied_request_head_decodes_as_the_general_way_does() {
        for (upgrade, empty_body) in [(None, true), (Some("websocket".to_owned()), false)] {
            let head = HubToDevice::ProxyRequest(ProxyRequest {
                stream_id: 7,
                service: "web".into(),
                method: "GET".into(),
                target: "/a?b=\"c\"".into(),
                headers: vec![("x-forwarded-for".into(), "127.0.0.1".into())],
                deadline_ms: 30_000,
                upgrade,
                empty_body,
            });
            let frame = encode(&head);
            assert!(frame.as_bytes().starts_with(PROXY_REQUEST), "{frame}");
            assert_eq!(proxy_request(frame.as_bytes()).as_ref(), Some(&head));
            assert_eq!(decode_hub_frame(&frame, MAX).expect("decodes"), head);
        }
        // A head missing a field is refused with the general decoder's error.
        let partial = r#"{"type":"proxy_request","stream_id":1,"service":"web"}"#;
        assert!(proxy_request(partial.as_bytes()).is_none());
        assert_eq!(
            decode_hub_frame(partial, MAX).map_err(|e| e.to_string()),
            decode::<HubToDevice>(partial.as_bytes(), MAX).map_err(|e| e.to_string())
        );
    }

    #[test]
    fn other_shapes_go_the_general_way() {
        let stats = encode(&DeviceToHub::Response {
            request_id: 1,
            outcome: Outcome::Error(RemoteError::new(ErrorCode::NotFound, "no task")),
        });
        assert_eq!(
            decode_device_frame(&stats, MAX).expect("decodes"),
            decode::<DeviceToHub>(stats.as_bytes(), MAX).expect("decodes")
        );
        // A task request is not a capability one: the direct path declines it.
        let task = r#"{"type":"request","request_id":1,"deadline_ms":5,"op":"task_stats"}"#;
        assert_eq!(
            decode_hub_frame(task, MAX).expect("decodes"),
            HubToDevice::Request {
                request_id: 1,
                deadline_ms: 5,
                request: DeviceRequest::TaskStats,
            }
        );
        // Both an answer and an error: refused as the general way refuses it.
        let both = r#"{"type":"capability_response","request_id":1,"ok":{"from_device":"00","payload":1},"error":{"code":"internal","message":"x"}}"#;
        assert_eq!(
            decode_hub_frame(both, MAX).map_err(|e| e.to_string()),
            decode::<HubToDevice>(both.as_bytes(), MAX).map_err(|e| e.to_string())
        );
        // Fields in another order, tag last: still decoded.
        let late = r#"{"request_id":5,"capability":{"protocol":"x"},"deadline_ms":1,"type":"capability_request"}"#;
        assert!(matches!(
            decode_device_frame(late, MAX),
            Ok(DeviceToHub::CapabilityRequest { request_id: 5, .. })
        ));
    }

    #[test]
    fn broken_and_oversized_frames_get_the_general_errors() {
        let broken =
            r#"{"type":"response","request_id":1,"ok":{"kind":"capability","payload":{]}}"#;
        assert_eq!(
            decode_device_frame(broken, MAX),
            decode::<DeviceToHub>(broken.as_bytes(), MAX)
        );
        assert!(decode_device_frame(broken, MAX).is_err());
        let big = encode(&DeviceToHub::Response {
            request_id: 1,
            outcome: Outcome::Ok(DeviceReply::Capability {
                payload: Payload::from_value(&serde_json::json!("x".repeat(200))),
            }),
        });
        assert!(matches!(
            decode_device_frame(&big, 100),
            Err(DecodeError::TooLarge { max: 100, .. })
        ));
    }
}
