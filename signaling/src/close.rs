//! How a WebSocket the hub serves (a cocoon's or a client's) ends when its peer sends
//! something the socket cannot take: the close frame that says why, decided by the
//! error's type. It owns that mapping only; each socket's actor sends the frame.

use axum::extract::ws::close_code;
use tungstenite::error::{CapacityError, Error as WsError};

/// The close code and reason for a failed read, or `None` when the peer is gone and
/// there is nobody to tell (the connection reset or closed under us).
pub(crate) fn read_error(e: axum::Error, max: usize) -> Result<(u16, String), String> {
    let inner = e.into_inner();
    let Some(ws) = inner.downcast_ref::<WsError>() else {
        return Err(format!("read failed: {inner}"));
    };
    match ws {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => Ok((
            close_code::SIZE,
            format!("a frame of {size} bytes exceeds the limit of {max} bytes"),
        )),
        WsError::Capacity(_) => Ok((
            close_code::SIZE,
            format!("a frame exceeds the limit of {max} bytes"),
        )),
        WsError::Utf8(_) => Ok((close_code::INVALID, "a text frame is not UTF-8".into())),
        WsError::Protocol(p) => Ok((close_code::PROTOCOL, clip(format!("protocol error: {p}")))),
        WsError::AttackAttempt => Ok((close_code::POLICY, "refused".into())),
        other => Err(format!("read failed: {other}")),
    }
}

/// A close reason must fit in a control frame (123 bytes of text).
fn clip(mut reason: String) -> String {
    const MAX: usize = 120;
    if reason.len() > MAX {
        let mut end = MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_broken_frame_gets_its_own_close_code() {
        let too_long = axum::Error::new(WsError::Capacity(CapacityError::MessageTooLong {
            size: 100_000,
            max_size: 65_536,
        }));
        let (code, reason) = read_error(too_long, 65_536).expect("a close");
        assert_eq!(code, close_code::SIZE);
        assert!(reason.contains("100000 bytes"), "{reason}");

        let utf8 = axum::Error::new(WsError::Utf8("bad".into()));
        assert_eq!(read_error(utf8, 1).expect("a close").0, close_code::INVALID);

        let protocol = axum::Error::new(WsError::Protocol(
            tungstenite::error::ProtocolError::UnmaskedFrameFromClient,
        ));
        let (code, reason) = read_error(protocol, 1).expect("a close");
        assert_eq!(code, close_code::PROTOCOL);
        assert!(reason.len() <= 123);

        let gone = axum::Error::new(WsError::ConnectionClosed);
        assert!(read_error(gone, 1).is_err());
        let io = axum::Error::new(std::io::Error::other("reset"));
        assert!(read_error(io, 1).is_err());
    }
}
