//! The client WebSocket (`/ws/client`): a signed-in person's live channel. Today it
//! streams aggregate queries part by part, so a UI shows the first device's tasks
//! before the slowest device replies. One actor per socket; queries run one at a time.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::client::{ClientToHub, HubToClient};
use adi_protocol::{decode, encode, ErrorCode, Scope};
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::StreamExt;
use tracing::debug;

use crate::aggregate::{self, Cursor};
use crate::rest::error::ApiError;
use crate::rest::extract::Caller;
use crate::rest::listing::{task_devices, ListParams};
use crate::HubState;

/// Largest frame a client may send.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// How long a close frame may take to leave for a peer that does not read.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long any other frame may wait for a client that does not read.
const SEND_WAIT: Duration = Duration::from_secs(30);

pub(crate) async fn serve(state: Arc<HubState>, mut socket: WebSocket) {
    let (caller, expires_at) = match authenticate(&state, &mut socket).await {
        Some(c) => c,
        None => return,
    };
    // Counted before the client hears it is signed in, so what it reads next agrees.
    let _counted = state.metrics.client_socket();
    let _ = send(
        &mut socket,
        &HubToClient::Authenticated {
            user: caller.name.clone(),
        },
    )
    .await;
    let shutdown = state.shutdown.clone();
    // The socket lives no longer than the credential it was opened with.
    let expiry = tokio::time::sleep(until_unix(expires_at));
    tokio::pin!(expiry);
    // ...and no longer than its session, if it is signed out, its key revoked or its
    // user disabled first.
    let mut revocations = state.auth.changes();
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                close(&mut socket, close_code::RESTART, "hub restarting").await;
                return;
            }
            () = &mut expiry => {
                debug!(user = %caller.id, "client socket's session expired");
                close(&mut socket, close_code::POLICY, "session expired").await;
                return;
            }
            Ok(()) = revocations.changed() => {
                if let Some(why) = caller.ended(&state.auth) {
                    let reason = match why {
                        crate::auth::AuthError::Revoked => "session signed out",
                        crate::auth::AuthError::SessionKeyRevoked => "api key revoked",
                        _ => "user disabled or removed",
                    };
                    debug!(user = %caller.id, "client socket closed: {why}");
                    close(&mut socket, close_code::POLICY, reason).await;
                    return;
                }
                continue;
            }
            f = socket.recv() => f,
        };
        let bytes = match frame {
            None | Some(Ok(Message::Close(_))) => return,
            Some(Err(e)) => {
                if let Ok((code, reason)) = crate::close::read_error(e, MAX_CLIENT_FRAME) {
                    close(&mut socket, code, &reason).await;
                }
                return;
            }
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(_)) => continue,
        };
        match decode::<ClientToHub>(&bytes, MAX_CLIENT_FRAME) {
            Err(e) => {
                let err = HubToClient::Error {
                    query_id: None,
                    code: ErrorCode::BadRequest,
                    message: e.to_string(),
                };
                if send(&mut socket, &err).await.is_err() {
                    return;
                }
            }
            Ok(ClientToHub::Auth { .. }) => {
                let err = HubToClient::Error {
                    query_id: None,
                    code: ErrorCode::BadRequest,
                    message: "already authenticated".into(),
                };
                if send(&mut socket, &err).await.is_err() {
                    return;
                }
            }
            Ok(ClientToHub::AggregateQuery {
                query_id,
                filter,
                limit,
                cursor,
                timeout_ms,
            }) => {
                let params = ListParams::from_query(&filter, limit, timeout_ms);
                if let Err(e) = aggregate_query(
                    &state,
                    &caller,
                    &mut socket,
                    &query_id,
                    &params,
                    cursor.as_deref(),
                )
                .await
                {
                    match e {
                        QueryEnd::Refused(e) => {
                            let err = HubToClient::Error {
                                query_id: Some(query_id),
                                code: e.code(),
                                message: e.message().to_owned(),
                            };
                            if send(&mut socket, &err).await.is_err() {
                                return;
                            }
                        }
                        QueryEnd::Gone => return,
                    }
                }
            }
        }
    }
}

enum QueryEnd {
    Refused(ApiError),
    Gone,
}

impl From<ApiError> for QueryEnd {
    fn from(e: ApiError) -> Self {
        QueryEnd::Refused(e)
    }
}

async fn aggregate_query(
    state: &HubState,
    caller: &Caller,
    socket: &mut WebSocket,
    query_id: &str,
    params: &ListParams,
    cursor: Option<&str>,
) -> Result<(), QueryEnd> {
    let filter = params.filter()?;
    let limit = params.limit()?;
    let deadline = params.deadline()?;
    let cursor = cursor
        .map(|c| {
            Cursor::decode(c).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    "cursor is not one this hub handed out",
                )
            })
        })
        .transpose()?;
    let (online, offline) = task_devices(state, caller).await?;
    for device in &offline {
        let part = HubToClient::AggregateQueryPart {
            query_id: query_id.to_owned(),
            device: device.clone(),
            tasks: vec![],
        };
        send(socket, &part).await.map_err(|_| QueryEnd::Gone)?;
    }
    let mut parts = Vec::with_capacity(online.len());
    let mut stream = std::pin::pin!(aggregate::list_parts(
        state,
        &online,
        &filter,
        cursor.as_ref(),
        limit,
        deadline
    ));
    while let Some(part) = stream.next().await {
        let msg = HubToClient::AggregateQueryPart {
            query_id: query_id.to_owned(),
            device: part.status.clone(),
            tasks: part
                .answer
                .as_ref()
                .map(|p| p.tasks.clone())
                .unwrap_or_default(),
        };
        send(socket, &msg).await.map_err(|_| QueryEnd::Gone)?;
        parts.push(part);
    }
    let (tasks, next) = aggregate::merge(&parts, limit);
    let mut devices = offline;
    devices.extend(parts.into_iter().map(|p| p.status));
    let done = HubToClient::AggregateQueryDone {
        query_id: query_id.to_owned(),
        devices,
        tasks,
        next_cursor: next.map(|c| c.encode()),
    };
    send(socket, &done).await.map_err(|_| QueryEnd::Gone)
}

/// The signed-in caller and the expiry of their credential.
type SignedIn = (Caller, u64);

/// Reads the first frame, which must sign the socket in (with a session whose key has
/// the `devices:read` scope); answers the caller and when its credential ends, or
/// closes the socket with the reason and `None`.
async fn authenticate(state: &HubState, socket: &mut WebSocket) -> Option<SignedIn> {
    let wait = state.config.handshake_timeout;
    let deadline = tokio::time::Instant::now() + wait;
    let first = loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => {
                let message = format!("no sign-in within {wait:?}");
                refuse(socket, ErrorCode::Unauthorized, message, close_code::POLICY).await;
                return None;
            }
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Err(e))) => {
                if let Ok((code, reason)) = crate::close::read_error(e, MAX_CLIENT_FRAME) {
                    close(socket, code, &reason).await;
                }
                return None;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(msg))) => break msg,
        }
    };
    let decoded = match &first {
        Message::Text(t) => decode::<ClientToHub>(t.as_bytes(), MAX_CLIENT_FRAME),
        Message::Binary(b) => decode::<ClientToHub>(b, MAX_CLIENT_FRAME),
        _ => Err(adi_protocol::DecodeError::Invalid(
            "the first frame must be auth".into(),
        )),
    };
    let unauthorized = |message: String| (ErrorCode::Unauthorized, message);
    let result = match decoded {
        Ok(ClientToHub::Auth { token }) => state
            .auth
            .verify(token.trim())
            .map_err(|e| unauthorized(e.to_string())),
        Ok(_) => Err(unauthorized("the first frame must be auth".to_owned())),
        Err(e) => Err(unauthorized(e.to_string())),
    };
    let result = match result {
        Ok(claims) => {
            let exp = claims.exp;
            let caller = Caller::from(claims);
            match caller.require(Scope::DevicesRead) {
                Err(e) => Err((ErrorCode::InsufficientScope, e.to_string())),
                Ok(()) => crate::rest::extract::live_user(state, caller)
                    .await
                    .map(|c| (c, exp))
                    .map_err(|e| unauthorized(e.message().to_owned())),
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(signed_in) => Some(signed_in),
        Err((code, message)) => {
            debug!("client authentication refused: {message}");
            refuse(socket, code, message, close_code::POLICY).await;
            None
        }
    }
}

/// Sends an error frame, then closes with the code's name as the reason.
async fn refuse(socket: &mut WebSocket, code: ErrorCode, message: String, close_with: u16) {
    let err = HubToClient::Error {
        query_id: None,
        code,
        message,
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, send(socket, &err)).await;
    close(socket, close_with, code.as_str()).await;
}

/// Sends a close frame, waiting at most a moment for a peer that does not read.
async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(CLOSE_WAIT, socket.send(frame)).await;
}

/// How long from now until a unix time in seconds (zero when it has passed).
fn until_unix(at: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(at).saturating_sub(now)
}

/// Sends one frame; a client that takes none for [`SEND_WAIT`] is gone, so that a
/// peer that stops reading cannot hold this socket's task forever.
async fn send(socket: &mut WebSocket, msg: &HubToClient) -> Result<(), axum::Error> {
    let frame = Message::Text(encode(msg).into());
    match tokio::time::timeout(SEND_WAIT, socket.send(frame)).await {
        Ok(sent) => sent,
        Err(_) => Err(axum::Error::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no frame for 30 s",
        ))),
    }
}
