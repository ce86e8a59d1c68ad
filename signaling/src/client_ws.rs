//! The client WebSocket (`/ws/client`): a signed-in person's live channel. Today it
//! streams aggregate queries part by part, so a UI shows the first device's tasks
//! before the slowest device replies. One actor per socket; queries run one at a time.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::client::{ClientToHub, HubToClient};
use adi_protocol::{decode, encode, ErrorCode};
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::StreamExt;
use tracing::debug;

use crate::aggregate::{self, Cursor};
use crate::api::{ApiError, Caller};
use crate::task_routes::{task_devices, ListParams};
use crate::HubState;

/// Largest frame a client may send.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// How long a new socket may take to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(state: Arc<HubState>, mut socket: WebSocket) {
    let caller = match authenticate(&state, &mut socket).await {
        Some(c) => c,
        None => return,
    };
    let _ = send(
        &mut socket,
        &HubToClient::Authenticated {
            user: caller.name.clone(),
        },
    )
    .await;
    let _counted = state.metrics.client_socket();
    let shutdown = state.shutdown.clone();
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.send(Message::Close(Some(CloseFrame { code: close_code::RESTART, reason: "hub restarting".into() }))).await;
                return;
            }
            f = socket.recv() => f,
        };
        let bytes = match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
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

async fn authenticate(state: &HubState, socket: &mut WebSocket) -> Option<Caller> {
    let refuse = |message: String| HubToClient::Error {
        query_id: None,
        code: ErrorCode::Unauthorized,
        message,
    };
    let first = match tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => decode::<ClientToHub>(t.as_bytes(), MAX_CLIENT_FRAME),
        _ => return None,
    };
    let result = match first {
        Ok(ClientToHub::Auth { token }) => {
            state.auth.verify(token.trim()).map_err(|e| e.to_string())
        }
        Ok(_) => Err("the first frame must be auth".to_owned()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(claims) => Some(Caller {
            id: claims.sub,
            name: claims.name,
        }),
        Err(message) => {
            debug!("client authentication refused: {message}");
            let _ = send(socket, &refuse(message)).await;
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: close_code::POLICY,
                    reason: "unauthorized".into(),
                })))
                .await;
            None
        }
    }
}

async fn send(socket: &mut WebSocket, msg: &HubToClient) -> Result<(), axum::Error> {
    socket.send(Message::Text(encode(msg).into())).await
}
