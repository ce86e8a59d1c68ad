//! The binary frames a WebSocket carries beside the control messages: the bytes of
//! proxied bodies and raw streams, multiplexed by stream id. Layout of every frame:
//! `[kind: u8][stream id: u32 big-endian][payload]`. This module owns the layout and
//! its codec only; the stream table, credit and flow control are the stream
//! multiplexer's (`adi-mux`), which never parses a frame itself.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest payload of one data frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Bytes of the frame header.
const HEADER: usize = 5;
/// Largest binary frame this crate produces: a WebSocket carrying streams must accept
/// messages of at least this size, whatever its limit on control messages.
pub const MAX_FRAME: usize = MAX_CHUNK + HEADER;

/// What a binary frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A chunk of the body.
    Data = 0,
    /// The body is complete.
    End = 1,
    /// The sender abandoned its body; the payload is the reason in UTF-8. The other
    /// direction of the stream is not affected.
    Reset = 2,
    /// The receiver consumed frames; the payload is the count as a big-endian u32.
    Window = 3,
    /// The receiver stopped reading (its consumer went away): the sender should stop.
    /// The other direction of the stream is not affected.
    Stop = 4,
    /// A head and the whole body in one frame, for small bodies: the payload is the
    /// head's length as a big-endian u32, the head (opaque to this crate), then every
    /// byte of the body. The body is complete: no `End` follows. It saves a small
    /// exchange two of its three frames; see [`whole`] and [`Frame::split_whole`].
    Whole = 5,
}

/// A decoded binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Which stream.
    pub stream: u32,
    /// The bytes after the header.
    pub payload: Bytes,
}

/// A binary frame that is not of this format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a header.
    #[error("binary frame of {0} bytes is shorter than its 5-byte header")]
    Short(usize),
    /// Unknown kind byte.
    #[error("binary frame has unknown kind {0}")]
    Kind(u8),
    /// Payload bigger than a chunk.
    #[error("binary frame payload of {0} bytes exceeds {MAX_CHUNK}")]
    TooLarge(usize),
    /// A window frame without a 4-byte count.
    #[error("window frame must carry a 4-byte count")]
    Window,
    /// A whole-body frame whose head length points past its end.
    #[error("whole-body frame has a head length past its end")]
    Whole,
}

/// Encodes one frame.
pub fn encode(kind: Kind, stream: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + payload.len());
    b.put_u8(kind as u8);
    b.put_u32(stream);
    b.put_slice(payload);
    b.freeze()
}

/// Whether a head and a body of these sizes fit in one [`Kind::Whole`] frame.
pub fn fits_whole(head: usize, body: usize) -> bool {
    4 + head + body <= MAX_CHUNK
}

/// Encodes a head and a complete body as one [`Kind::Whole`] frame, or `None` when they
/// do not fit in one frame (send the head and then the body in chunks instead).
pub fn whole(stream: u32, head: &[u8], body: &[u8]) -> Option<Bytes> {
    if !fits_whole(head.len(), body.len()) {
        return None;
    }
    let len = 4 + head.len() + body.len();
    let mut b = BytesMut::with_capacity(HEADER + len);
    b.put_u8(Kind::Whole as u8);
    b.put_u32(stream);
    b.put_u32(u32::try_from(head.len()).ok()?);
    b.put_slice(head);
    b.put_slice(body);
    Some(b.freeze())
}

impl Frame {
    /// The head and the body of a [`Kind::Whole`] frame (checked by [`decode`]); for
    /// any other kind, an empty head and the payload.
    pub fn split_whole(&self) -> (Bytes, Bytes) {
        if self.kind != Kind::Whole {
            return (Bytes::new(), self.payload.clone());
        }
        let p = &self.payload;
        let n = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
        (p.slice(4..4 + n), p.slice(4 + n..))
    }
}

/// Decodes one frame; never panics on arbitrary bytes.
pub fn decode(frame: Bytes) -> Result<Frame, FrameError> {
    if frame.len() < HEADER {
        return Err(FrameError::Short(frame.len()));
    }
    let kind = match frame[0] {
        0 => Kind::Data,
        1 => Kind::End,
        2 => Kind::Reset,
        3 => Kind::Window,
        4 => Kind::Stop,
        5 => Kind::Whole,
        k => return Err(FrameError::Kind(k)),
    };
    let stream = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
    let payload = frame.slice(HEADER..);
    if payload.len() > MAX_CHUNK {
        return Err(FrameError::TooLarge(payload.len()));
    }
    if kind == Kind::Window && payload.len() != 4 {
        return Err(FrameError::Window);
    }
    if kind == Kind::Whole {
        let p = &payload;
        let fits =
            p.len() >= 4 && u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize <= p.len() - 4;
        if !fits {
            return Err(FrameError::Whole);
        }
    }
    Ok(Frame {
        kind,
        stream,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let f = encode(Kind::Data, 7, b"hello");
        let d = decode(f).expect("decodes");
        assert_eq!(
            (d.kind, d.stream, &d.payload[..]),
            (Kind::Data, 7, &b"hello"[..])
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x00\x00")),
            Err(FrameError::Short(2))
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x09\x00\x00\x00\x01")),
            Err(FrameError::Kind(9))
        );
        assert_eq!(
            decode(encode(Kind::Window, 1, b"\x01")),
            Err(FrameError::Window)
        );
        let big = vec![0u8; MAX_CHUNK + 1];
        assert!(matches!(
            decode(encode(Kind::Data, 1, &big)),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_whole_frame_holds_its_head_and_body() {
        let f = decode(whole(3, b"h", b"xyz").expect("fits")).expect("decodes");
        assert_eq!(f.kind, Kind::Whole);
        assert_eq!(
            f.split_whole(),
            (Bytes::from_static(b"h"), Bytes::from_static(b"xyz"))
        );
        assert_eq!(
            decode(Bytes::from_static(
                b"\x05\x00\x00\x00\x01\x00\x00\x00\x09ab"
            )),
            Err(FrameError::Whole),
            "a head length past the end is refused"
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x05\x00\x00\x00\x01\x00")),
            Err(FrameError::Whole)
        );
        assert!(whole(1, &[0; 16], &vec![0; MAX_CHUNK]).is_none());
        assert!(!fits_whole(16, MAX_CHUNK) && fits_whole(16, 1024));
    }
}
