//! One actor per cocoon WebSocket: registration, then a `select!` over cancellation,
//! outbound frames, inbound frames and a staleness check, until the connection ends.
//! The actor owns the socket; everyone else talks to it through its [`ConnHandle`].
//!
//! It must never panic on input: every frame either decodes or is answered with an
//! error, and an oversized frame closes this connection alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    decode, encode, negotiate_version, CapabilityOutcome, CapabilityQuery, DecodeError, DeviceId,
    DeviceReply, DeviceToHub, ErrorCode, Hardware, HubToDevice, Outcome, Register, Registered,
    RemoteError, SUPPORTED_VERSIONS,
};
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};
use tracing::{debug, info, warn, Instrument};

use crate::auth::unix_now_i64;
use crate::catalog::{CatalogError, DeviceConfig, DeviceRecord, UserId};
use crate::registry::{ConnHandle, ConnId, Routing};
use crate::routing::Requester;
use crate::rpc::{Call, Command, ProxyCall, ProxyOpened, ResponseHead, RpcError};
use crate::tokens::{self, TokenError};
use crate::HubState;

/// How long a new connection may take to send its registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests queued for one device before callers are refused.
const OUTBOUND_QUEUE: usize = 32;
/// Requests awaiting an answer from one device before new ones are refused.
const MAX_IN_FLIGHT: usize = 1024;
/// Capability requests one device may have open at once; more are refused at once.
const MAX_DEVICE_REQUESTS: usize = 256;
/// Longest deadline a device may set on a capability request.
const MAX_CAPABILITY_DEADLINE: Duration = Duration::from_secs(600);
/// Body frames queued for the socket before stream senders wait.
const FRAME_QUEUE: usize = 64;
/// Frames written before one flush when several are queued.
const BATCH: usize = 32;
/// Heartbeat intervals of silence after which the hub drops a connection.
const SILENT_INTERVALS: u32 = 3;

/// A refusal sent to the device before the connection is closed.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Runs one cocoon connection to its end.
pub(crate) async fn serve(state: Arc<HubState>, socket: WebSocket) {
    let conn_id = state.registry.next_conn_id();
    let span = tracing::info_span!("cocoon_conn", conn_id, device_id = tracing::field::Empty);
    run(state, socket, conn_id).instrument(span).await;
}

async fn run(state: Arc<HubState>, mut socket: WebSocket, conn_id: ConnId) {
    let max = state.config.max_frame_bytes;
    let register = match timeout(REGISTER_TIMEOUT, socket.recv()).await {
        Err(_) => {
            let refusal = Refusal::new(ErrorCode::BadRequest, "no registration within 10 s");
            return refuse(socket, refusal).await;
        }
        Ok(None) | Ok(Some(Err(_))) => return,
        Ok(Some(Ok(msg))) => match frame_bytes(&msg) {
            None => return,
            Some(bytes) => match decode::<DeviceToHub>(bytes, max) {
                Ok(DeviceToHub::Register(r)) => r,
                Ok(_) => {
                    let refusal =
                        Refusal::new(ErrorCode::BadRequest, "the first frame must be register");
                    return refuse(socket, refusal).await;
                }
                Err(e) => return refuse(socket, decode_refusal(&e)).await,
            },
        },
    };
    let accepted = match register_device(&state, &register).await {
        Ok(a) => a,
        Err(refusal) => {
            warn!(code = %refusal.code, "registration refused: {}", refusal.message);
            return refuse(socket, refusal).await;
        }
    };
    let device_id = accepted.config.id.clone();
    tracing::Span::current().record("device_id", tracing::field::display(&device_id));
    let interval_ms =
        u64::try_from(state.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    let reply = HubToDevice::Registered(Registered {
        device_id: device_id.clone(),
        protocol_version: accepted.version,
        heartbeat_interval_ms: interval_ms,
        enrolled: accepted.enrolled,
        max_frame_bytes: u64::try_from(state.config.max_frame_bytes).ok(),
    });
    if socket.send(text(&reply)).await.is_err() {
        return;
    }
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let cancel = state.shutdown.child_token();
    state.registry.insert(
        device_id.clone(),
        conn_id,
        ConnHandle {
            outbound: tx.clone(),
            cancel: cancel.clone(),
        },
        Routing {
            owners: accepted.owners.into(),
            capabilities: accepted.config.capabilities.clone().into(),
            services: accepted.config.services.clone().into(),
        },
    );
    info!(enrolled = accepted.enrolled, name = %accepted.config.name, "device online");
    let mut conn = Connection {
        state: state.clone(),
        conn_id,
        config: accepted.config,
        pending: HashMap::new(),
        next_request: 1,
        streams: None,
        heads: HashMap::new(),
        next_stream: 1,
        own: tx,
        asking: Arc::new(Semaphore::new(MAX_DEVICE_REQUESTS)),
    };
    let end = conn.pump(&mut socket, rx, &cancel).await;
    state.registry.remove(&device_id, conn_id);
    match end {
        End::Closed(reason) => info!("device connection closed: {reason}"),
        End::Send(code, reason) => {
            info!("closing device connection: {reason}");
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await;
        }
    }
}

/// What ended a connection.
enum End {
    /// The peer closed or the socket failed; nothing more to send.
    Closed(String),
    /// We close, with this code and reason.
    Send(u16, String),
}

type Reply = oneshot::Sender<Result<DeviceReply, RpcError>>;
type HeadReply = oneshot::Sender<Result<ResponseHead, RpcError>>;

struct Connection {
    state: Arc<HubState>,
    conn_id: ConnId,
    config: DeviceConfig,
    /// Requests sent to the device and not yet answered. Dropped with the actor, which
    /// fails every waiting caller with `Disconnected`.
    pending: HashMap<u64, Reply>,
    next_request: u64,
    /// Body streams of proxied exchanges; made on the first one, since most devices
    /// never carry a body and an idle connection should stay small.
    streams: Option<adi_tunnel::Streams>,
    /// Proxied requests waiting for their response head, by stream.
    heads: HashMap<u32, HeadReply>,
    next_stream: u32,
    /// This connection's own queue, for answers to what the device asked.
    own: mpsc::Sender<Command>,
    /// Bounds the capability requests this device may have open at once.
    asking: Arc<Semaphore>,
}

impl Connection {
    async fn pump(
        &mut self,
        socket: &mut WebSocket,
        mut outbound: mpsc::Receiver<Command>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> End {
        let heartbeat = self.state.config.heartbeat_interval;
        let mut stale_check = interval(heartbeat);
        stale_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut frames: Option<mpsc::Receiver<bytes::Bytes>> = None;
        let end = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    break if self.state.shutdown.is_cancelled() {
                        End::Send(close_code::RESTART, "hub restarting".into())
                    } else {
                        End::Send(close_code::POLICY, "replaced by a newer connection of this device".into())
                    };
                }
                Some(command) = outbound.recv() => {
                    // Everything already queued goes out with one flush: a busy device
                    // gets its requests in few writes instead of one syscall each.
                    let mut next = Some(command);
                    let mut queued = 0;
                    let mut failed = None;
                    while let Some(command) = next.take() {
                        let frame = match command {
                            Command::Request(call) => self.start_call(*call),
                            Command::Proxy(call) => self.start_proxy(*call, &mut frames),
                            Command::Send(msg) => Some(self.fit(*msg)),
                        };
                        if let Some(frame) = frame {
                            if let Err(e) = socket.feed(frame).await {
                                failed = Some(e);
                                break;
                            }
                            queued += 1;
                        }
                        if queued < BATCH {
                            next = outbound.try_recv().ok();
                        }
                    }
                    if let Some(e) = failed {
                        break End::Closed(format!("send failed: {e}"));
                    }
                    if let Err(e) = socket.flush().await {
                        break End::Closed(format!("send failed: {e}"));
                    }
                }
                Some(frame) = next_frame(&mut frames) => {
                    // Body frames that are ready together leave with one flush.
                    let mut next = Some(frame);
                    let mut queued = 0;
                    let mut failed = None;
                    while let Some(frame) = next.take() {
                        if let Err(e) = socket.feed(Message::Binary(frame)).await {
                            failed = Some(e);
                            break;
                        }
                        queued += 1;
                        if queued < BATCH {
                            next = frames.as_mut().and_then(|rx| rx.try_recv().ok());
                        }
                    }
                    if let Some(e) = failed {
                        break End::Closed(format!("send failed: {e}"));
                    }
                    if let Err(e) = socket.flush().await {
                        break End::Closed(format!("send failed: {e}"));
                    }
                }
                frame = socket.recv() => {
                    last_heard = Instant::now();
                    match frame {
                        None => break End::Closed("peer went away".into()),
                        Some(Err(e)) => break classify_read_error(e, self.state.config.max_frame_bytes.max(adi_tunnel::MAX_FRAME)),
                        Some(Ok(Message::Close(_))) => break End::Closed("peer closed".into()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Binary(b))) => {
                            if let Some(reply) = self.body_frame(b) {
                                if let Err(e) = socket.send(text(&reply)).await {
                                    break End::Closed(format!("send failed: {e}"));
                                }
                            }
                        }
                        Some(Ok(msg)) => {
                            if let Some(reply) = self.handle(&msg).await {
                                if let Err(e) = socket.send(text(&reply)).await {
                                    break End::Closed(format!("send failed: {e}"));
                                }
                            }
                        }
                    }
                }
                _ = stale_check.tick() => {
                    // Callers that gave up (deadline passed) need no answer.
                    self.pending.retain(|_, reply| !reply.is_closed());
                    self.heads.retain(|_, reply| !reply.is_closed());
                    if last_heard.elapsed() > heartbeat * SILENT_INTERVALS {
                        break End::Send(close_code::AWAY, "no heartbeat for 3 intervals".into());
                    }
                }
            }
        };
        if let Some(streams) = &self.streams {
            streams.close_all();
        }
        end
    }

    /// Opens a body stream pair and returns the request frame to send.
    fn start_proxy(
        &mut self,
        call: ProxyCall,
        frames: &mut Option<mpsc::Receiver<bytes::Bytes>>,
    ) -> Option<Message> {
        let streams = self.streams.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(FRAME_QUEUE);
            *frames = Some(rx);
            adi_tunnel::Streams::new(tx)
        });
        if self.heads.len() >= MAX_IN_FLIGHT {
            // Dropping the reply tells the caller the device is unavailable.
            return None;
        }
        let stream_id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        let (response_body, request_body) = streams.open(stream_id);
        let (head_tx, head_rx) = oneshot::channel();
        self.heads.insert(stream_id, head_tx);
        let mut request = call.request;
        request.stream_id = stream_id;
        let opened = ProxyOpened {
            request_body,
            response_body,
            head: head_rx,
        };
        if call.reply.send(opened).is_err() {
            self.heads.remove(&stream_id);
            return None;
        }
        Some(text(&HubToDevice::ProxyRequest(request)))
    }

    /// Routes one binary (body) frame; returns an error reply if it is malformed.
    fn body_frame(&mut self, bytes: bytes::Bytes) -> Option<HubToDevice> {
        match adi_tunnel::decode(bytes) {
            Ok(frame) => {
                if let Some(streams) = &self.streams {
                    streams.on_frame(frame);
                }
                None
            }
            Err(e) => Some(HubToDevice::Error {
                code: ErrorCode::BadRequest,
                message: e.to_string(),
            }),
        }
    }

    /// Numbers a request and remembers who waits for it; returns the frame to send.
    fn start_call(&mut self, call: Call) -> Option<Message> {
        if self.pending.len() >= MAX_IN_FLIGHT {
            let _ = call.reply.send(Err(RpcError::Busy));
            return None;
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let deadline_ms = u64::try_from(call.deadline.as_millis()).unwrap_or(u64::MAX);
        let frame = encode(&HubToDevice::Request {
            request_id,
            deadline_ms,
            request: call.request,
        });
        // The device refuses a frame over the limit by closing its link; refusing the
        // one request here keeps everything else on the link going.
        let max = self.state.config.max_frame_bytes;
        if frame.len() > max {
            let _ = call.reply.send(Err(RpcError::Remote(RemoteError {
                code: ErrorCode::PayloadTooLarge,
                message: format!(
                    "the request is {} bytes; at most {max} fit in one frame to the device",
                    frame.len()
                ),
            })));
            return None;
        }
        self.pending.insert(request_id, call.reply);
        Some(Message::Text(frame.into()))
    }

    /// Handles one data frame; returns the reply to send, if any.
    async fn handle(&mut self, msg: &Message) -> Option<HubToDevice> {
        let bytes = frame_bytes(msg)?;
        let decoded = decode::<DeviceToHub>(bytes, self.state.config.max_frame_bytes);
        match decoded {
            Err(e) => {
                debug!("undecodable frame: {e}");
                let r = decode_refusal(&e);
                Some(HubToDevice::Error {
                    code: r.code,
                    message: r.message,
                })
            }
            Ok(DeviceToHub::Heartbeat(hb)) => {
                let hardware = hb.load.as_ref().map(Hardware::from);
                self.state
                    .registry
                    .heartbeat(&self.config.id, self.conn_id, hb.services, hb.load);
                match hardware {
                    Some(h) if self.config.hardware.as_ref() != Some(&h) => {
                        let mut next = self.config.clone();
                        next.hardware = Some(h);
                        self.store_config(next, "hardware").await
                    }
                    _ => None,
                }
            }
            Ok(DeviceToHub::CapabilitiesUpdate { capabilities }) => {
                if capabilities == self.config.capabilities {
                    return None;
                }
                self.state.registry.set_capabilities(
                    &self.config.id,
                    self.conn_id,
                    capabilities.clone().into(),
                );
                info!(count = capabilities.len(), "device capabilities changed");
                let mut next = self.config.clone();
                next.capabilities = capabilities;
                self.store_config(next, "capabilities").await
            }
            Ok(DeviceToHub::CapabilityRequest {
                request_id,
                capability,
                payload,
                prefer_device,
                deadline_ms,
            }) => {
                self.capability_request(request_id, capability, payload, prefer_device, deadline_ms)
            }
            Ok(DeviceToHub::Response {
                request_id,
                outcome,
            }) => {
                match self.pending.remove(&request_id) {
                    Some(reply) => {
                        let _ = reply.send(match outcome {
                            Outcome::Ok(r) => Ok(r),
                            Outcome::Error(e) => Err(RpcError::Remote(e)),
                        });
                    }
                    None => debug!(request_id, "answer to a request nobody waits for"),
                }
                None
            }
            Ok(DeviceToHub::ProxyResponse {
                stream_id,
                status,
                headers,
            }) => {
                if let Some(reply) = self.heads.remove(&stream_id) {
                    let _ = reply.send(Ok(ResponseHead { status, headers }));
                }
                None
            }
            Ok(DeviceToHub::ProxyError {
                stream_id,
                code,
                message,
            }) => {
                if let Some(reply) = self.heads.remove(&stream_id) {
                    let _ = reply.send(Err(RpcError::Remote(adi_protocol::RemoteError {
                        code,
                        message,
                    })));
                }
                None
            }
            Ok(DeviceToHub::Register(_)) => Some(HubToDevice::Error {
                code: ErrorCode::BadRequest,
                message: "already registered on this connection".into(),
            }),
            Ok(DeviceToHub::ServiceRegister { services }) => {
                if services == self.config.services {
                    return None;
                }
                self.state.registry.set_services(
                    &self.config.id,
                    self.conn_id,
                    services.clone().into(),
                );
                let mut next = self.config.clone();
                next.services = services;
                self.store_config(next, "services").await
            }
        }
    }

    /// The frame for an answer to the device, or, for a capability answer too large to
    /// send, an error in its place: the request still ends exactly once.
    fn fit(&self, msg: HubToDevice) -> Message {
        let frame = encode(&msg);
        let max = self.state.config.max_frame_bytes;
        match msg {
            HubToDevice::CapabilityResponse { request_id, .. } if frame.len() > max => {
                text(&HubToDevice::CapabilityResponse {
                    request_id,
                    outcome: CapabilityOutcome::Error(RemoteError {
                        code: ErrorCode::PayloadTooLarge,
                        message: format!(
                            "the answer is {} bytes; at most {max} fit in one frame",
                            frame.len()
                        ),
                    }),
                })
            }
            _ => Message::Text(frame.into()),
        }
    }

    /// Writes a changed configuration to the catalog; on failure the old one stays in
    /// force here, so the next report tries again.
    async fn store_config(&mut self, next: DeviceConfig, what: &str) -> Option<HubToDevice> {
        match self.state.catalog.update_device(&next).await {
            Ok(()) => {
                self.config = next;
                None
            }
            Err(e) => {
                warn!("storing device {what} failed: {e:#}");
                Some(HubToDevice::Error {
                    code: ErrorCode::Internal,
                    message: format!("the hub could not store the {what}"),
                })
            }
        }
    }

    /// Routes a capability request the device made, in its own task; the answer comes
    /// back through this connection's queue, exactly once.
    fn capability_request(
        &mut self,
        request_id: u64,
        query: CapabilityQuery,
        payload: serde_json::Value,
        prefer: Option<DeviceId>,
        deadline_ms: u64,
    ) -> Option<HubToDevice> {
        let refuse = |code, message: String| {
            Some(HubToDevice::CapabilityResponse {
                request_id,
                outcome: CapabilityOutcome::Error(RemoteError { code, message }),
            })
        };
        if let Err(e) = adi_protocol::capability::validate_protocol(&query.protocol) {
            return refuse(ErrorCode::BadRequest, e.to_string());
        }
        let Ok(permit) = self.asking.clone().try_acquire_owned() else {
            return refuse(
                ErrorCode::UpstreamError,
                format!("more than {MAX_DEVICE_REQUESTS} capability requests open at once"),
            );
        };
        let owners = self
            .state
            .registry
            .owners(&self.config.id)
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let requester = Requester::Device {
            id: self.config.id.clone(),
            owners,
        };
        let deadline = Duration::from_millis(deadline_ms).min(MAX_CAPABILITY_DEADLINE);
        let state = self.state.clone();
        let own = self.own.clone();
        let span =
            tracing::info_span!("capability_request", request_id, protocol = %query.protocol);
        tokio::spawn(
            async move {
                let outcome = match crate::routing::request(
                    &state,
                    &requester,
                    &query,
                    payload,
                    prefer.as_ref(),
                    deadline,
                )
                .await
                {
                    Ok(answer) => CapabilityOutcome::Ok(answer),
                    Err(e) => {
                        debug!(code = %e.code(), "capability request not served: {e}");
                        CapabilityOutcome::Error(e.to_remote())
                    }
                };
                drop(permit);
                let msg = HubToDevice::CapabilityResponse {
                    request_id,
                    outcome,
                };
                // Waits for room rather than dropping the answer; fails only if the
                // connection is gone, and then nobody is left to answer.
                let _ = own.send(Command::Send(Box::new(msg))).await;
            }
            .instrument(span),
        );
        None
    }
}

struct Accepted {
    config: DeviceConfig,
    owners: Vec<UserId>,
    version: u32,
    enrolled: bool,
}

/// Negotiates the version, checks the secret, and finds or enrols the device.
async fn register_device(state: &HubState, reg: &Register) -> Result<Accepted, Refusal> {
    let version = negotiate_version(&reg.versions).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!("no common protocol version; the hub speaks {SUPPORTED_VERSIONS:?}"),
        )
    })?;
    reg.secret
        .validate()
        .map_err(|e| Refusal::new(ErrorCode::BadRequest, e.to_string()))?;
    let name = reg.name.trim();
    if name.is_empty() || name.chars().count() > 128 {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "device name must be 1 to 128 characters",
        ));
    }
    let location = reg
        .location
        .as_deref()
        .map(str::trim)
        .filter(|l| !l.is_empty());
    if location.is_some_and(|l| l.chars().count() > 128) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "device location must be at most 128 characters",
        ));
    }
    let mut config = DeviceConfig {
        id: state.device_ids.derive(&reg.secret),
        name: name.to_owned(),
        services: reg.services.clone(),
        capabilities: reg.capabilities.clone(),
        location: location.map(str::to_owned),
        hardware: None,
    };
    if let Some(known) = existing(state, &config.id).await? {
        // Hardware arrives with the first heartbeat; until then the stored one stands.
        config.hardware = known.hardware.clone();
        let owners = known.owners.iter().map(|o| o.id).collect();
        update_if_changed(state, &DeviceConfig::from(known), &config).await?;
        return Ok(Accepted {
            config,
            owners,
            version,
            enrolled: false,
        });
    }
    let Some(token) = reg.setup_token.as_deref() else {
        return Err(Refusal::new(
            ErrorCode::NotEnrolled,
            "this device is not enrolled on this hub; start it once with a setup token",
        ));
    };
    match tokens::enrol(state.catalog.as_ref(), token, &config, unix_now_i64()).await {
        Ok(record) => Ok(Accepted {
            config,
            owners: record.owners.iter().map(|o| o.id).collect(),
            version,
            enrolled: true,
        }),
        // Enrolled concurrently by another connection with the same secret.
        Err(TokenError::Catalog(CatalogError::Conflict(_))) => {
            let owners = existing(state, &config.id)
                .await?
                .map(|d| d.owners.iter().map(|o| o.id).collect())
                .unwrap_or_default();
            Ok(Accepted {
                config,
                owners,
                version,
                enrolled: false,
            })
        }
        Err(e) => {
            if let TokenError::Catalog(inner) = &e {
                warn!("enrolment failed in the catalog: {inner:#}");
            }
            Err(Refusal::new(e.code(), refusal_text(&e)))
        }
    }
}

async fn existing(state: &HubState, id: &DeviceId) -> Result<Option<DeviceRecord>, Refusal> {
    match state.catalog.device(id).await {
        Ok(found) => Ok(found),
        Err(e) => {
            warn!("catalog lookup failed: {e:#}");
            Err(Refusal::new(
                ErrorCode::Internal,
                "the hub's catalog is unavailable; retry later",
            ))
        }
    }
}

/// Writes a device's configuration only when it differs: the catalog is for changes.
async fn update_if_changed(
    state: &HubState,
    known: &DeviceConfig,
    reported: &DeviceConfig,
) -> Result<(), Refusal> {
    if known == reported {
        return Ok(());
    }
    state.catalog.update_device(reported).await.map_err(|e| {
        warn!("storing device configuration failed: {e:#}");
        Refusal::new(
            ErrorCode::Internal,
            "the hub's catalog is unavailable; retry later",
        )
    })
}

fn refusal_text(e: &TokenError) -> String {
    match e {
        TokenError::Catalog(_) => "the hub's catalog is unavailable; retry later".into(),
        other => format!("setup token refused: {other}"),
    }
}

fn decode_refusal(e: &DecodeError) -> Refusal {
    match e {
        DecodeError::TooLarge { .. } => Refusal::new(ErrorCode::PayloadTooLarge, e.to_string()),
        DecodeError::Invalid(_) => Refusal::new(ErrorCode::BadRequest, e.to_string()),
    }
}

fn classify_read_error(e: axum::Error, max: usize) -> End {
    let text = e.to_string();
    // tungstenite reports an over-limit message as a capacity error.
    if text.contains("Space limit exceeded") || text.to_ascii_lowercase().contains("too long") {
        End::Send(
            close_code::SIZE,
            format!("frame exceeds the limit of {max} bytes"),
        )
    } else {
        End::Closed(format!("read failed: {text}"))
    }
}

async fn next_frame(frames: &mut Option<mpsc::Receiver<bytes::Bytes>>) -> Option<bytes::Bytes> {
    match frames {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn frame_bytes(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Text(t) => Some(t.as_bytes()),
        Message::Binary(b) => Some(b),
        _ => None,
    }
}

fn text(msg: &HubToDevice) -> Message {
    Message::Text(encode(msg).into())
}

/// Sends the refusal as an error frame, then closes with the code as the reason.
async fn refuse(mut socket: WebSocket, refusal: Refusal) {
    let frame = HubToDevice::Error {
        code: refusal.code,
        message: refusal.message,
    };
    let close_code = match refusal.code {
        ErrorCode::PayloadTooLarge => close_code::SIZE,
        ErrorCode::Internal => close_code::ERROR,
        _ => close_code::POLICY,
    };
    let _ = socket.send(text(&frame)).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close_code,
            reason: refusal.code.as_str().into(),
        })))
        .await;
}
