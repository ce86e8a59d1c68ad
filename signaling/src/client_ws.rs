//! The client WebSocket (`/ws/client`): a signed-in person's live channel. It streams
//! aggregate queries part by part, so a UI shows the first device's tasks before the
//! slowest device replies, and, once asked, the live state of the person's devices as
//! it changes. One actor per socket; queries run one at a time, each in a task of its
//! own that hands the actor its messages, so that while a query waits for a slow device
//! the socket still hears of its devices' changes, and still closes at once when its
//! session ends or the hub stops. A client's next frame is read once the query is done.
//! Which devices a socket hears of is decided by [`crate::access`], read again on every
//! change of access.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::client::{ClientToHub, DeviceLive, DeviceRef, HubToClient};
use adi_protocol::{decode, encode, DeviceId, ErrorCode, Scope};
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use crate::access;
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
/// A query's messages waiting for the socket: the query waits while the client reads.
const QUERY_QUEUE: usize = 4;

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
    let mut watch: Option<Watch> = None;
    let mut query: Option<Query> = None;
    let mut tick = tokio::time::interval(WATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                // A member removed or a device deleted: the list is read again now.
                if let Some(w) = watch.as_mut() {
                    w.listed_at = None;
                }
                continue;
            }
            _ = tick.tick(), if watch.is_some() => {
                if let Some(w) = watch.as_mut() {
                    if send_watch(&mut socket, w, &state, &caller).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            msg = next_message(&mut query), if query.is_some() => {
                match msg {
                    Some(msg) => {
                        if send(&mut socket, &msg).await.is_err() {
                            return;
                        }
                    }
                    None => query = None,
                }
                continue;
            }
            f = socket.recv(), if query.is_none() => f,
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
            Ok(ClientToHub::WatchDevices) => {
                // Answered at once; the tick sends the changes from then on.
                let w = watch.insert(Watch::default());
                match send_watch(&mut socket, w, &state, &caller).await {
                    Err(_) => return,
                    // A watch refused at its start is not kept.
                    Ok(false) => watch = None,
                    Ok(true) => {}
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
                query = Some(Query::start(
                    state.clone(),
                    caller.clone(),
                    query_id,
                    params,
                    cursor,
                ));
            }
        }
    }
}

/// How often a watching client hears of its devices' changes.
const WATCH_TICK: Duration = Duration::from_secs(1);
/// How often a watch reads the caller's device list again when nothing announced a
/// change (a device enrolled or claimed announces none).
const WATCH_RELIST: Duration = Duration::from_secs(10);

/// A client's watch of its devices: the list (from the catalog, through
/// [`crate::access`]) and what it was last told of each.
#[derive(Default)]
struct Watch {
    devices: Vec<Listed>,
    listed_at: Option<tokio::time::Instant>,
    told: HashMap<DeviceId, DeviceLive>,
}

impl Watch {
    /// The next frame: every device when the list changed (a device added or gone,
    /// renamed, or its members changed) or was never sent, else those whose state
    /// changed; `None` when nothing did.
    async fn frame(
        &mut self,
        state: &HubState,
        caller: &Caller,
    ) -> Result<Option<HubToClient>, ApiError> {
        let mut full = self.listed_at.is_none();
        if self.listed_at.is_none_or(|at| at.elapsed() >= WATCH_RELIST) {
            let listed: Vec<Listed> = access::devices(state, caller, Scope::DevicesRead)
                .await?
                .into_iter()
                .map(|d| Listed {
                    members: d.members.iter().map(|m| (m.id, m.role)).collect(),
                    id: d.id,
                    name: d.name,
                })
                .collect();
            self.listed_at = Some(tokio::time::Instant::now());
            if listed != self.devices {
                self.devices = listed;
                full = true;
            }
        }
        if full {
            self.told.clear();
        }
        let mut changed = Vec::new();
        for Listed { id, name, .. } in &self.devices {
            let now = live(state, id, name);
            if !self.told.get(id).is_some_and(|t| t.same_as(&now)) {
                self.told.insert(id.clone(), now.clone());
                changed.push(now);
            }
        }
        if full {
            self.told
                .retain(|id, _| self.devices.iter().any(|d| d.id == *id));
        }
        Ok(
            (full || !changed.is_empty()).then_some(HubToClient::Devices {
                full,
                devices: changed,
            }),
        )
    }
}

/// A device of a watch's list, with what makes the list change: its name and members.
#[derive(PartialEq)]
struct Listed {
    id: DeviceId,
    name: String,
    members: Vec<(crate::catalog::UserId, adi_protocol::Role)>,
}

/// A device's live state, wherever in the cluster it is connected.
fn live(state: &HubState, id: &DeviceId, name: &str) -> DeviceLive {
    let presence = state.presence(id);
    DeviceLive {
        device_id: id.clone(),
        name: name.to_owned(),
        status: match (presence.online, presence.draining) {
            (true, true) => "stopping",
            (true, false) => "online",
            (false, _) => "offline",
        }
        .to_owned(),
        last_heartbeat_age_secs: presence
            .last_heartbeat_age
            .map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
        load: if presence.online {
            state.load(id)
        } else {
            None
        },
        services: if presence.online {
            state.service_health(id)
        } else {
            Vec::new()
        },
        hub: state.hub_of(id),
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

/// A running aggregate query: the messages its task sends the socket. Dropping it (the
/// socket closing) stops the task, and with it every request still waiting on a device.
struct Query {
    messages: mpsc::Receiver<HubToClient>,
    _task: AbortOnDropHandle<()>,
}

impl Query {
    fn start(
        state: Arc<HubState>,
        caller: Caller,
        query_id: String,
        params: ListParams,
        cursor: Option<String>,
    ) -> Self {
        let (out, messages) = mpsc::channel(QUERY_QUEUE);
        let task = tokio::spawn(async move {
            let ended =
                aggregate_query(&state, &caller, &out, &query_id, &params, cursor.as_deref());
            if let Err(QueryEnd::Refused(e)) = ended.await {
                let err = HubToClient::Error {
                    query_id: Some(query_id),
                    code: e.code(),
                    message: e.message().to_owned(),
                };
                let _ = out.send(err).await;
            }
        });
        Query {
            messages,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// The running query's next message; `None` once it has sent its last.
async fn next_message(query: &mut Option<Query>) -> Option<HubToClient> {
    query.as_mut()?.messages.recv().await
}

async fn aggregate_query(
    state: &HubState,
    caller: &Caller,
    out: &mpsc::Sender<HubToClient>,
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
    let started = HubToClient::AggregateQueryStarted {
        query_id: query_id.to_owned(),
        waiting: online
            .iter()
            .map(|d| DeviceRef {
                device_id: d.id.clone(),
                name: d.name.clone(),
            })
            .collect(),
        timeout_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
    };
    out.send(started).await.map_err(|_| QueryEnd::Gone)?;
    for device in &offline {
        let part = HubToClient::AggregateQueryPart {
            query_id: query_id.to_owned(),
            device: device.clone(),
            tasks: vec![],
        };
        out.send(part).await.map_err(|_| QueryEnd::Gone)?;
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
        out.send(msg).await.map_err(|_| QueryEnd::Gone)?;
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
    out.send(done).await.map_err(|_| QueryEnd::Gone)
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
/// Sends a watch's changes, if any; `Ok(false)` when the watch could not be read and
/// the client was told why.
async fn send_watch(
    socket: &mut WebSocket,
    watch: &mut Watch,
    state: &HubState,
    caller: &Caller,
) -> Result<bool, axum::Error> {
    match watch.frame(state, caller).await {
        Ok(Some(frame)) => send(socket, &frame).await.map(|()| true),
        Ok(None) => Ok(true),
        Err(e) => {
            let err = HubToClient::Error {
                query_id: None,
                code: e.code(),
                message: e.message().to_owned(),
            };
            send(socket, &err).await.map(|()| false)
        }
    }
}

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
