//! The heads of one proxied exchange on the wire, and the one choice each side makes
//! about them. A head whose body is small, complete and known (for a request: none at
//! all) travels **whole**: head and body in one binary [`Kind::Whole`] frame on the
//! exchange's stream, so a small exchange costs one frame each way. Any other head
//! travels as a control message ([`HubToDevice::ProxyRequest`],
//! [`DeviceToHub::ProxyResponse`]) and its body follows on the stream.
//!
//! Both ends encode and read heads here and nowhere else, so the two forms of each
//! head are one decision in one place. Pure: no I/O; the stream multiplexer carries the
//! frames and the connection actors write them.

use bytes::Bytes;

use crate::frame::{self, Frame, Kind};
use crate::{encode, DeviceToHub, HubToDevice, ProxyHead, ProxyRequest};

/// Largest body that may travel whole with its response head: small enough that a
/// service's answer is read in full before anything is sent, large enough for most
/// API answers.
pub const WHOLE_BODY: u64 = 32 * 1024;

/// A request head as the hub sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestHead {
    /// Head and its empty body in one binary frame: nothing follows on the stream.
    Whole(Bytes),
    /// The head as a control message; the body (or just its end) follows.
    Message(String),
}

/// The request head that would not fit in one frame the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the request head is {len} bytes as sent to the device, which accepts at most {max}; \
     send fewer or shorter headers"
)]
pub struct HeadTooLarge {
    /// Its encoded size.
    pub len: usize,
    /// The device's frame limit.
    pub max: usize,
}

/// Encodes a request head for the device, whole when it has no body (and no upgrade),
/// else as a control message no larger than `peer_max`.
pub fn request_head(request: ProxyRequest, peer_max: usize) -> Result<RequestHead, HeadTooLarge> {
    if request.empty_body && request.upgrade.is_none() {
        let whole = serde_json::to_vec(&request)
            .ok()
            .and_then(|head| frame::whole(request.stream_id, &head, &[]));
        if let Some(whole) = whole {
            return Ok(RequestHead::Whole(whole));
        }
    }
    let text = encode(&HubToDevice::ProxyRequest(request));
    if text.len() > peer_max {
        return Err(HeadTooLarge {
            len: text.len(),
            max: peer_max,
        });
    }
    Ok(RequestHead::Message(text))
}

/// A whole frame that does not hold a head of this side's kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed proxied head on stream {stream}: {why}")]
pub struct MalformedHead {
    /// The stream it came on.
    pub stream: u32,
    /// What is wrong with it.
    pub why: String,
}

/// The request a whole frame from the hub carries; its body is empty.
pub fn read_request(whole: &Frame) -> Result<ProxyRequest, MalformedHead> {
    let malformed = |why: String| MalformedHead {
        stream: whole.stream,
        why,
    };
    if whole.kind != Kind::Whole {
        return Err(malformed("not a whole frame".into()));
    }
    let (head, _) = whole.split_whole();
    let mut request: ProxyRequest =
        serde_json::from_slice(&head).map_err(|e| malformed(e.to_string()))?;
    if request.stream_id != whole.stream {
        return Err(malformed(format!(
            "its head names stream {}",
            request.stream_id
        )));
    }
    request.empty_body = true;
    Ok(request)
}

/// A response head as the device sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseHead {
    /// Head and the whole body: send with the stream's `send_whole`, which also ends
    /// the stream.
    Whole {
        /// The head, encoded.
        head: Vec<u8>,
        /// Every byte of the body.
        body: Bytes,
    },
    /// The head as a control message; the body follows on the stream (including, when
    /// it was read but did not fit whole, the body given here).
    Message {
        /// The message (boxed: it is large next to a whole frame's parts).
        head: Box<DeviceToHub>,
        /// The body already read, if any, to send first on the stream.
        body: Option<Bytes>,
    },
}

/// Encodes a response head for the hub: whole with `body` when a complete body was
/// read and fits one frame with its head, else as a control message.
pub fn response_head(stream_id: u32, head: ProxyHead, body: Option<Bytes>) -> ResponseHead {
    if let Some(body) = body {
        if let Ok(encoded) = serde_json::to_vec(&head) {
            if frame::fits_whole(encoded.len(), body.len()) {
                return ResponseHead::Whole {
                    head: encoded,
                    body,
                };
            }
        }
        return ResponseHead::Message {
            head: Box::new(response_message(stream_id, head)),
            body: Some(body),
        };
    }
    ResponseHead::Message {
        head: Box::new(response_message(stream_id, head)),
        body: None,
    }
}

fn response_message(stream_id: u32, head: ProxyHead) -> DeviceToHub {
    DeviceToHub::ProxyResponse {
        stream_id,
        status: head.status,
        headers: head.headers,
    }
}

/// The response head and whole body a whole frame from the device carries.
pub fn read_response(whole: &Frame) -> Result<(ProxyHead, Bytes), MalformedHead> {
    let malformed = |why: String| MalformedHead {
        stream: whole.stream,
        why,
    };
    if whole.kind != Kind::Whole {
        return Err(malformed("not a whole frame".into()));
    }
    let (head, body) = whole.split_whole();
    let head = serde_json::from_slice(&head).map_err(|e| malformed(e.to_string()))?;
    Ok((head, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(empty_body: bool) -> ProxyRequest {
        ProxyRequest {
            stream_id: 9,
            service: "web".into(),
            method: "GET".into(),
            target: "/x".into(),
            headers: vec![("accept".into(), "*/*".into())],
            deadline_ms: 1000,
            upgrade: None,
            empty_body,
        }
    }

    #[test]
    fn a_request_without_a_body_goes_whole_and_reads_back() {
        let RequestHead::Whole(bytes) = request_head(request(true), 1024).expect("fits") else {
            panic!("a bodiless request goes whole");
        };
        let frame = frame::decode(bytes).expect("a frame");
        assert_eq!(read_request(&frame), Ok(request(true)));
        let mut upgrade = request(true);
        upgrade.upgrade = Some("websocket".into());
        assert!(matches!(
            request_head(upgrade, 1024),
            Ok(RequestHead::Message(_))
        ));
    }

    #[test]
    fn a_request_with_a_body_is_a_message_held_to_the_peers_limit() {
        let RequestHead::Message(text) = request_head(request(false), 1024).expect("fits") else {
            panic!("a request with a body goes as a message");
        };
        assert!(text.starts_with(r#"{"type":"proxy_request""#), "{text}");
        let mut big = request(false);
        big.headers.push(("x-big".into(), "h".repeat(2000)));
        let err = request_head(big, 1024).expect_err("too large");
        assert!(err.len > 2000 && err.max == 1024, "{err:?}");
    }

    #[test]
    fn a_whole_frame_from_the_wrong_stream_or_of_the_wrong_shape_is_malformed() {
        let head = serde_json::to_vec(&request(true)).expect("json");
        let other = frame::decode(frame::whole(8, &head, &[]).expect("fits")).expect("frame");
        assert!(read_request(&other).is_err());
        let garbage = frame::decode(frame::whole(9, b"{nope", &[]).expect("fits")).expect("frame");
        assert!(read_request(&garbage).is_err());
        assert!(read_response(&garbage).is_err());
        let data = frame::decode(frame::encode(Kind::Data, 9, b"x")).expect("frame");
        assert!(read_request(&data).is_err());
    }

    #[test]
    fn a_small_complete_body_goes_whole_a_large_one_follows_its_head() {
        let head = ProxyHead {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
        };
        match response_head(3, head.clone(), Some(Bytes::from_static(b"hello"))) {
            ResponseHead::Whole { head: h, body } => {
                let frame =
                    frame::decode(frame::whole(3, &h, &body).expect("fits")).expect("frame");
                assert_eq!(
                    read_response(&frame),
                    Ok((head.clone(), Bytes::from_static(b"hello")))
                );
            }
            other => panic!("a small body goes whole: {other:?}"),
        }
        let large = Bytes::from(vec![0u8; frame::MAX_CHUNK]);
        assert!(matches!(
            response_head(3, head.clone(), Some(large)),
            ResponseHead::Message { body: Some(_), .. }
        ));
        assert!(matches!(
            response_head(3, head, None),
            ResponseHead::Message { body: None, .. }
        ));
    }
}
