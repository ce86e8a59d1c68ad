//! One actor per cocoon WebSocket. [`serve`] runs the registration (version, secret,
//! enrolment) in the task axum spawned for the upgrade; once the device is accepted it
//! spawns the connection's actor, which owns the socket for the rest of the connection
//! and `select!`s over its [`ConnHandle`] (a stop, then queued commands), outbound body
//! frames and inbound frames until the connection ends. Everyone else talks to the
//! actor through that handle.
//!
//! The actor's future is what every connected device costs the hub for as long as it
//! stays connected, so it is kept small: registration state lives in the upgrade task
//! and is freed with it, the socket is moved into the actor once, rare slow paths
//! (catalog writes) are boxed, there is no per-connection timer until the device asks
//! something of its own (then one, for the earliest deadline of its open requests; the
//! registry's sweeper watches for silence) and no per-connection span (events carry
//! `device_id` and `conn_id` as fields).
//!
//! A capability request the device makes is routed right here, without a task of its
//! own: the serving device's actor queues the ending back on this connection, so a round
//! trip takes two hand-offs between actors, as a broker's would.
//!
//! It must never panic on input: every frame either decodes or is answered with an
//! error, and an oversized frame closes this connection alone.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use adi_mux::batch::Pacing;
use adi_protocol::{
    decode, encode, negotiate_version, CapabilityOutcome, CapabilityQuery, DecodeError, DeviceId,
    DeviceToHub, ErrorCode, Hardware, HubToDevice, LoadReport, Outcome, Register, Registered,
    RemoteError, SUPPORTED_VERSIONS,
};
use adi_protocol::{exchange, limits};
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant, Sleep};
use tracing::{debug, info, warn};

use crate::audit;
use crate::auth::unix_now_i64;
use crate::catalog::{CatalogError, DeviceConfig, DeviceRecord};
use crate::link::command::{
    Answer, Call, Command, Ended, ProxyCall, ProxyOpened, ReplyTo, ResponseHead, RpcError,
};
use crate::link::{AskSlot, ConnHandle, Next, Stop, MAX_DEVICE_REQUESTS};
use crate::registry::{Agent, ConnId, Grants};
use crate::routing::{self, Destination, Requester};
use crate::tokens::{self, TokenError};
use crate::HubState;

/// How long a close frame may take to leave for a peer that does not read.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Requests awaiting an answer from one device before new ones are refused.
const MAX_IN_FLIGHT: usize = 1024;
/// Longest deadline a device may set on a capability request.
const MAX_CAPABILITY_DEADLINE: Duration = Duration::from_secs(600);
/// Body frames queued for the socket before stream senders wait.
const FRAME_QUEUE: usize = 64;

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

/// Registers one cocoon connection and, once the device is accepted, spawns the actor
/// that serves it to its end.
pub(crate) async fn serve(
    state: Arc<HubState>,
    mut socket: WebSocket,
    peer: std::net::SocketAddr,
    slot: Option<crate::server::ConnSlot>,
) {
    let conn_id = state.registry.next_conn_id();
    let Some(accepted) = admit(&state, &mut socket, conn_id, peer).await else {
        return;
    };
    let link = ConnHandle::new(state.registry.now_ms());
    // The actor writes `registered`, as the first command in its queue, and not this
    // task: the socket keeps the waker of the last task that wrote to it until another
    // write, and a waker keeps its task's memory, so a write from here would keep this
    // task's (large, finished) allocation for as long as the device stays connected.
    let interval_ms =
        u64::try_from(state.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    let registered = HubToDevice::Registered(Registered {
        device_id: accepted.config.id.clone(),
        protocol_version: accepted.version,
        heartbeat_interval_ms: interval_ms,
        enrolled: accepted.enrolled,
        max_frame_bytes: u64::try_from(state.config.max_frame_bytes).ok(),
        hubs: state
            .cluster
            .as_ref()
            .map(|c| c.peer_urls())
            .unwrap_or_default(),
    });
    let _ = link.try_send(Command::Send(Box::new(Answer {
        msg: registered,
        slot: None,
    })));
    let displaced = state.registry.insert(
        accepted.config.id.clone(),
        &accepted.config.name,
        conn_id,
        link.clone(),
        &accepted.grants,
        &accepted.config.capabilities,
        &accepted.config.services,
        Agent {
            instance: accepted.instance,
            peer: Some(peer),
        },
    );
    // Only enrolments and conflicts are audited: a reconnect costs no write.
    if accepted.enrolled || displaced.is_some() {
        let id = &accepted.config.id;
        let mut event = if accepted.enrolled {
            audit::event(audit::Kind::DeviceEnrolled).detail(accepted.config.name.clone())
        } else {
            audit::event(audit::Kind::DeviceConflict).detail(format!(
                "another agent with this device's secret connected; the one from {} was stopped",
                displaced
                    .and_then(|c| c.displaced)
                    .map_or_else(|| "an unknown address".to_owned(), |a| a.to_string())
            ))
        };
        event.actor_device = Some(id.clone());
        event.actor_user = accepted.grants.owners.first().copied();
        audit::record(&state, event.on(id).seen_from(peer.ip())).await;
    }
    // The load sampled for the registration counts as the first heartbeat's, so the
    // device shows its figures from its first moment online.
    if accepted.load.is_some() {
        state
            .registry
            .heartbeat(&accepted.config.id, conn_id, Vec::new(), accepted.load);
    }
    // A shutdown that began while this device registered has already stopped every
    // connection it found; this one was not there yet.
    if state.shutdown.is_cancelled() {
        link.stop(Stop::Shutdown);
    }
    info!(
        device_id = %accepted.config.id,
        conn_id,
        enrolled = accepted.enrolled,
        name = %accepted.config.name,
        "device online"
    );
    let conn = Connection {
        state,
        _slot: slot,
        conn_id,
        peer_max: accepted.peer_max,
        config: accepted.config,
        socket,
        link,
        pending: HashMap::new(),
        next_request: 1,
        asks: None,
        streams: None,
        frames: None,
        heads: HashMap::new(),
        pacing: Pacing::default(),
        next_stream: 1,
    };
    tokio::spawn(conn.run());
}

/// Reads the registration and accepts or refuses it; `None` when the connection ends
/// here. It writes only refusals: see [`serve`].
async fn admit(
    state: &HubState,
    socket: &mut WebSocket,
    conn_id: ConnId,
    peer: std::net::SocketAddr,
) -> Option<Accepted> {
    let max = state.config.max_frame_bytes;
    let wait = state.config.handshake_timeout;
    let deadline = Instant::now() + wait;
    let first = loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => {
                let refusal = Refusal::new(
                    ErrorCode::BadRequest,
                    format!("no registration within {wait:?}"),
                );
                refuse(socket, refusal).await;
                return None;
            }
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Err(e))) => {
                if let Ok((code, reason)) = crate::close::read_error(e, max) {
                    debug!(
                        conn_id,
                        code, "closing an unregistered device socket: {reason}"
                    );
                    close(socket, code, reason).await;
                }
                return None;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(msg))) => break msg,
        }
    };
    let register = match frame_bytes(&first).map(|bytes| decode::<DeviceToHub>(bytes, max)) {
        Some(Ok(DeviceToHub::Register(r))) => r,
        Some(Err(e)) => {
            refuse(socket, decode_refusal(&e)).await;
            return None;
        }
        Some(Ok(_)) | None => {
            let refusal = Refusal::new(ErrorCode::BadRequest, "the first frame must be register");
            refuse(socket, refusal).await;
            return None;
        }
    };
    let mut accepted = match register_device(state, &register, peer).await {
        Ok(a) => a,
        Err(refusal) => {
            warn!(conn_id, code = %refusal.code, "registration refused: {}", refusal.message);
            refuse(socket, refusal).await;
            return None;
        }
    };
    accepted.load = register.load;
    Some(accepted)
}

/// What ended a connection.
enum End {
    /// The peer closed or the socket failed; nothing more to send.
    Closed(String),
    /// We close, with this code and reason.
    Send(u16, String),
    /// We tell the device why, as an error frame, then close with the code's name.
    Refuse(ErrorCode, String),
}

impl End {
    fn stopped(why: Stop) -> End {
        match why {
            Stop::Shutdown => End::Send(close_code::RESTART, "hub restarting".into()),
            Stop::Replaced => End::Send(
                close_code::POLICY,
                "replaced by a newer connection of this device".into(),
            ),
            Stop::Silent => End::Send(close_code::AWAY, "no heartbeat for 3 intervals".into()),
            Stop::Removed => End::Refuse(ErrorCode::DeviceRemoved, DEVICE_REMOVED.into()),
            Stop::Displaced(by) => End::Refuse(
                ErrorCode::DuplicateAgent,
                format!(
                    "another agent with this device's secret connected{} and took its place; \
                     this agent stops. A copied data dir makes a second agent: give the copy \
                     its own identity (remove its device.secret and enrol it with a new setup \
                     token)",
                    by.map(|a| format!(" from {a}")).unwrap_or_default()
                ),
            ),
        }
    }
}

/// What a data frame from the device calls for.
enum Handled {
    /// Nothing more.
    Done,
    /// This reply, encoded.
    Reply(Message),
    /// Storing this changed configuration (of this part) in the catalog.
    Store(Box<DeviceConfig>, &'static str),
}

type HeadReply = oneshot::Sender<Result<ResponseHead, RpcError>>;

/// The actor's state: everything one connected device holds in the hub.
struct Connection {
    state: Arc<HubState>,
    /// This connection's place under the hub's caps, given back when it ends.
    _slot: Option<crate::server::ConnSlot>,
    conn_id: ConnId,
    /// Largest frame the device accepts: everything this hub sends it is held to it.
    peer_max: usize,
    config: DeviceConfig,
    socket: WebSocket,
    /// This connection's handle, as the registry holds it: the queue the actor reads,
    /// and where answers to what the device asked are queued.
    link: ConnHandle,
    /// Requests sent to the device and not yet answered. Dropped with the actor, which
    /// fails every waiting caller with `Disconnected`.
    pending: HashMap<u64, ReplyTo>,
    next_request: u64,
    /// Capability requests the device asked and the hub has not yet answered; made on
    /// the first, since most devices never ask.
    asks: Option<Box<Asks>>,
    /// Body streams of proxied exchanges, and the queue of their frames for the
    /// socket; made on the first one, since most devices never carry a body and an
    /// idle connection should stay small.
    streams: Option<adi_mux::Streams>,
    frames: Option<mpsc::Receiver<bytes::Bytes>>,
    /// Proxied requests waiting for their response head, by stream.
    heads: HashMap<u32, HeadReply>,
    next_stream: u32,
    /// Whether this socket's frames have been meeting in its writes.
    pacing: Pacing,
}

impl Connection {
    /// Serves the connection to its end, then unregisters it and closes the socket.
    // Not an `async fn`: that would move `self` into its future and then copy it into
    // a local, so the future would hold the connection twice (1624 bytes instead of
    // 944 with Rust 1.95). The block uses the captured `self` in place.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let end = self.pump().await;
            // Boxed: it runs once, and its state must not size the future every
            // connected device keeps.
            Box::pin(self.finish(end)).await;
        }
    }

    /// Every branch says what to write, and one place writes it, so the future holds
    /// one send and no branch's state outlives its branch.
    async fn pump(&mut self) -> End {
        loop {
            let (frame, _slot) = tokio::select! {
                biased;
                next = self.link.recv() => match next {
                    Next::Stop(why) => return End::stopped(why),
                    Next::Command(Command::Request(call)) => (self.start_call(*call), None),
                    Next::Command(Command::Proxy(call)) => (self.start_proxy(*call), None),
                    Next::Command(Command::Send(answer)) => {
                        // The device's slot is freed once its answer is written.
                        let Answer { msg, slot } = *answer;
                        (Some(self.fit(msg)), slot)
                    }
                    Next::Command(Command::Ended(ended)) => (self.ended(*ended), None),
                },
                // Before the socket, so a device that keeps sending still hears its
                // timeouts on time.
                () = Asks::expiry(&mut self.asks) => (self.expire_asks(), None),
                Some(frame) = next_frame(&mut self.frames) => (Some(Message::Binary(frame)), None),
                frame = self.socket.recv() => {
                    self.link.heard(self.state.registry.now_ms());
                    let reply = match frame {
                        None => return End::Closed("peer went away".into()),
                        Some(Err(e)) => return match crate::close::read_error(e, self.state.config.max_frame_bytes.max(adi_protocol::frame::MAX_FRAME)) {
                            Ok((code, reason)) => End::Send(code, reason),
                            Err(reason) => End::Closed(reason),
                        },
                        Some(Ok(Message::Close(_))) => return End::Closed("peer closed".into()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                        Some(Ok(Message::Binary(b))) => self.body_frame(b).map(|r| text(&r)),
                        Some(Ok(msg)) => match self.handle(msg) {
                            Handled::Done => None,
                            Handled::Reply(frame) => Some(frame),
                            // Rare and slow, so boxed: its state must not size the
                            // future every connected device keeps.
                            Handled::Store(next, what) => Box::pin(self.store_config(*next, what))
                                .await
                                .map(|r| text(&r)),
                        },
                    };
                    (reply, None)
                }
            };
            if let Some(frame) = frame {
                if let Err(e) = self.write(frame).await {
                    return End::Closed(format!("send failed: {e}"));
                }
            }
        }
    }

    /// Writes `first` and whatever else is ready (queued commands, body frames), up to
    /// [`BATCH`] frames, then flushes once: a busy device gets its traffic in few
    /// writes instead of one syscall per frame. When the queue runs dry it yields once
    /// first while frames have been meeting, so the requests whose connections are
    /// ready on this thread queue theirs too: under load a write then carries several
    /// frames, for one scheduler pass.
    async fn write(&mut self, first: Message) -> Result<(), axum::Error> {
        self.socket.feed(first).await?;
        let mut batch = self.pacing.start();
        let mut ran_dry = false;
        while batch.more(ran_dry).await {
            ran_dry = match self.ready() {
                None => true,
                Some(None) => false,
                Some(Some(frame)) => {
                    self.socket.feed(frame).await?;
                    batch.fed();
                    false
                }
            };
        }
        self.pacing.finished(&batch);
        self.socket.flush().await
    }

    /// The next queued command or body frame, handled: `None` when nothing is queued,
    /// `Some(None)` when what was queued needs no frame.
    fn ready(&mut self) -> Option<Option<Message>> {
        Some(match self.link.try_recv() {
            Some(Command::Request(call)) => self.start_call(*call),
            Some(Command::Proxy(call)) => self.start_proxy(*call),
            Some(Command::Send(answer)) => {
                let Answer { msg, slot } = *answer;
                let frame = self.fit(msg);
                drop(slot);
                Some(frame)
            }
            Some(Command::Ended(ended)) => self.ended(*ended),
            None => Some(Message::Binary(
                self.frames.as_mut().and_then(|rx| rx.try_recv().ok())?,
            )),
        })
    }

    /// Unregisters the connection, fails whatever still waits on it, and closes.
    async fn finish(&mut self, end: End) {
        self.state.registry.remove(&self.config.id, self.conn_id);
        self.link.close();
        if let Some(streams) = &self.streams {
            streams.close_all();
        }
        let (device_id, conn_id) = (&self.config.id, self.conn_id);
        match end {
            End::Closed(reason) => info!(%device_id, conn_id, "device connection closed: {reason}"),
            End::Send(code, reason) => {
                info!(%device_id, conn_id, "closing device connection: {reason}");
                close(&mut self.socket, code, reason).await;
            }
            End::Refuse(code, message) => {
                warn!(%device_id, conn_id, %code, "closing device connection: {message}");
                refuse(&mut self.socket, Refusal { code, message }).await;
            }
        }
    }

    /// Opens a body stream pair and returns the request frame to send; a head that
    /// would not fit in one frame the device accepts is refused here, for this request
    /// alone, before anything is opened (see `adi_protocol::limits`).
    fn start_proxy(&mut self, call: ProxyCall) -> Option<Message> {
        if self.heads.len() >= MAX_IN_FLIGHT || self.heads.len() == self.heads.capacity() {
            // Callers that gave up need no head; forget them before the table grows.
            self.heads.retain(|_, reply| !reply.is_closed());
        }
        if self.heads.len() >= MAX_IN_FLIGHT {
            let _ = call.reply.send(Err(RpcError::Busy));
            return None;
        }
        let stream_id = self.next_stream;
        let mut request = call.request;
        request.stream_id = stream_id;
        // Whole in one binary frame without a body, else a control message no larger
        // than the device takes: `exchange` decides.
        let frame = match exchange::request_head(request, self.peer_max) {
            Ok(exchange::RequestHead::Whole(frame)) => Message::Binary(frame),
            Ok(exchange::RequestHead::Message(text)) => Message::Text(text.into()),
            Err(e) => {
                let _ = call.reply.send(Err(RpcError::Remote(RemoteError::new(
                    ErrorCode::HeadersTooLarge,
                    e.to_string(),
                ))));
                return None;
            }
        };
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        let frames = &mut self.frames;
        let streams = self.streams.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(FRAME_QUEUE);
            *frames = Some(rx);
            adi_mux::Streams::new(tx)
        });
        let (response_body, request_body) = streams.open(stream_id);
        let (head_tx, head_rx) = oneshot::channel();
        self.heads.insert(stream_id, head_tx);
        let opened = ProxyOpened {
            request_body,
            response_body,
            head: head_rx,
        };
        if call.reply.send(Ok(opened)).is_err() {
            self.heads.remove(&stream_id);
            return None;
        }
        Some(frame)
    }

    /// Routes one binary (body) frame; returns an error reply if it is malformed.
    fn body_frame(&mut self, bytes: bytes::Bytes) -> Option<HubToDevice> {
        match adi_protocol::frame::decode(bytes) {
            Ok(mut frame) => {
                if frame.kind == adi_protocol::frame::Kind::Whole {
                    self.whole_response(&frame);
                    // The body went with the head; the stream only needs to end.
                    frame.kind = adi_protocol::frame::Kind::End;
                    frame.payload = bytes::Bytes::new();
                }
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

    /// A small answer in one frame: the head and the whole body go to the waiting
    /// caller together, so the body never passes through the stream. A head that does
    /// not decode fails the request (the stream ends with the frame either way).
    fn whole_response(&mut self, frame: &adi_protocol::frame::Frame) {
        let Some(reply) = self.heads.remove(&frame.stream) else {
            return;
        };
        let _ = reply.send(match exchange::read_response(frame) {
            Ok((head, body)) => Ok(ResponseHead {
                status: head.status,
                headers: head.headers,
                body: Some(body),
            }),
            Err(e) => Err(RpcError::Remote(RemoteError::new(
                ErrorCode::UpstreamError,
                format!("the device sent {e}"),
            ))),
        });
    }

    /// Numbers a request and remembers who waits for it; returns the frame to send.
    fn start_call(&mut self, call: Call) -> Option<Message> {
        if self.pending.len() >= MAX_IN_FLIGHT || self.pending.len() == self.pending.capacity() {
            // Callers that gave up (deadline passed) need no answer; forget them before
            // the table grows or refuses.
            self.pending.retain(|_, reply| !reply.is_closed());
        }
        if self.pending.len() >= MAX_IN_FLIGHT {
            call.reply.end(Err(RpcError::Busy));
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
        // The device refuses a frame over its limit by closing its link; refusing the
        // one request here keeps everything else on the link going.
        let max = self.peer_max;
        if frame.len() > max {
            call.reply.end(Err(RpcError::Remote(RemoteError {
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

    /// Handles one data frame; says what else it calls for. Never waits: the one slow
    /// step, a catalog write, is left to the caller.
    fn handle(&mut self, msg: Message) -> Handled {
        // Binary frames are body frames, read before this.
        let Message::Text(frame) = &msg else {
            return Handled::Done;
        };
        let decoded =
            adi_protocol::decode_device_frame(frame.as_str(), self.state.config.max_frame_bytes);
        match decoded {
            Err(e) => {
                debug!(device_id = %self.config.id, conn_id = self.conn_id, "undecodable frame: {e}");
                let r = decode_refusal(&e);
                Handled::Reply(text(&HubToDevice::Error {
                    code: r.code,
                    message: r.message,
                }))
            }
            Ok(DeviceToHub::Heartbeat(hb)) => {
                // Built (and stored) only when it differs from what the catalog holds.
                let changed = hb
                    .load
                    .as_ref()
                    .filter(|l| {
                        !self
                            .config
                            .hardware
                            .as_ref()
                            .is_some_and(|h| h.describes(l))
                    })
                    .map(Hardware::from);
                self.state
                    .registry
                    .heartbeat(&self.config.id, self.conn_id, hb.services, hb.load);
                match changed {
                    Some(h) => {
                        let mut next = self.config.clone();
                        next.hardware = Some(h);
                        Handled::Store(Box::new(next), "hardware")
                    }
                    None => Handled::Done,
                }
            }
            Ok(DeviceToHub::CapabilitiesUpdate { capabilities }) => {
                if capabilities == self.config.capabilities {
                    return Handled::Done;
                }
                self.state
                    .registry
                    .set_capabilities(&self.config.id, self.conn_id, &capabilities);
                info!(
                    device_id = %self.config.id,
                    conn_id = self.conn_id,
                    count = capabilities.len(),
                    "device capabilities changed"
                );
                let mut next = self.config.clone();
                next.capabilities = capabilities;
                Handled::Store(Box::new(next), "capabilities")
            }
            Ok(DeviceToHub::CapabilityRequest {
                request_id,
                capability,
                payload,
                prefer_device,
                deadline_ms,
            }) => match self.capability_request(
                request_id,
                capability,
                payload,
                prefer_device,
                deadline_ms,
            ) {
                Some(reply) => Handled::Reply(text(&reply)),
                None => Handled::Done,
            },
            Ok(DeviceToHub::Response {
                request_id,
                outcome,
            }) => {
                match self.pending.remove(&request_id) {
                    Some(reply) => reply.end(match outcome {
                        Outcome::Ok(r) => Ok(r),
                        Outcome::Error(e) => Err(RpcError::Remote(e)),
                    }),
                    None => debug!(
                        device_id = %self.config.id,
                        conn_id = self.conn_id,
                        request_id,
                        "answer to a request nobody waits for"
                    ),
                }
                Handled::Done
            }
            Ok(DeviceToHub::ProxyResponse {
                stream_id,
                status,
                headers,
            }) => {
                if let Some(reply) = self.heads.remove(&stream_id) {
                    let _ = reply.send(Ok(ResponseHead {
                        status,
                        headers,
                        body: None,
                    }));
                }
                Handled::Done
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
                Handled::Done
            }
            Ok(DeviceToHub::Register(_)) => Handled::Reply(text(&HubToDevice::Error {
                code: ErrorCode::BadRequest,
                message: "already registered on this connection".into(),
            })),
            Ok(DeviceToHub::Draining) => {
                self.state
                    .registry
                    .set_draining(&self.config.id, self.conn_id);
                info!(device_id = %self.config.id, conn_id = self.conn_id, "device stopping: finishing its requests, taking no new ones");
                Handled::Done
            }
            Ok(DeviceToHub::ServiceRegister { services }) => {
                if services == self.config.services {
                    return Handled::Done;
                }
                self.state
                    .registry
                    .set_services(&self.config.id, self.conn_id, &services);
                let mut next = self.config.clone();
                next.services = services;
                Handled::Store(Box::new(next), "services")
            }
        }
    }

    /// The frame for an answer to the device, held to its frame limit: a capability
    /// answer too large to send is replaced by an error, so the request still ends
    /// exactly once (`adi_protocol::limits`).
    fn fit(&self, msg: HubToDevice) -> Message {
        let (frame, replaced) = limits::fit(msg, self.peer_max);
        if let Some(bytes) = replaced {
            debug!(device_id = %self.config.id, conn_id = self.conn_id, bytes, max = self.peer_max, "an answer too large for the device's frame was replaced by an error");
        }
        Message::Text(frame.into())
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
                warn!(
                    device_id = %self.config.id,
                    conn_id = self.conn_id,
                    "storing device {what} failed: {e:#}"
                );
                Some(HubToDevice::Error {
                    code: e.code(),
                    message: format!("the hub could not store the {what}"),
                })
            }
        }
    }

    /// Routes a capability request the device made. Nothing waits for it here: the
    /// serving device's connection queues the ending back on this one, and this actor
    /// keeps the deadline, so a request ends exactly once, by its deadline.
    fn capability_request(
        &mut self,
        request_id: u64,
        query: CapabilityQuery,
        payload: adi_protocol::Payload,
        prefer: Option<DeviceId>,
        deadline_ms: u64,
    ) -> Option<HubToDevice> {
        let refuse = |code, message: String| {
            Some(self.answer_ask(
                request_id,
                CapabilityOutcome::Error(RemoteError { code, message }),
            ))
        };
        if let Err(e) = adi_protocol::capability::validate_protocol(&query.protocol) {
            return refuse(ErrorCode::BadRequest, e.to_string());
        }
        if self
            .asks
            .as_ref()
            .is_some_and(|a| a.open.contains_key(&request_id))
        {
            return refuse(
                ErrorCode::BadRequest,
                format!("request {request_id} is already open"),
            );
        }
        let Some(slot) = self.link.try_ask() else {
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
        let requester = Requester::Device { owners };
        let order = match routing::choose(&self.state, &requester, &query, prefer.as_ref()) {
            Ok(order) => order,
            Err(e) => {
                debug!(device_id = %self.config.id, request_id, code = %e.code(), "capability request not served: {e}");
                return Some(self.answer_ask(request_id, CapabilityOutcome::Error(e.to_remote())));
            }
        };
        let wait = Duration::from_millis(deadline_ms).min(MAX_CAPABILITY_DEADLINE);
        let deadline = Instant::now() + wait;
        let asks = self
            .asks
            .get_or_insert_with(|| Box::new(Asks::new(deadline)));
        let ask = asks.open(request_id, deadline, wait, slot);
        let to = Destination::Device {
            link: self.link.clone(),
            request_id,
            ask,
        };
        routing::dispatch(
            &self.state,
            &order,
            &requester,
            query,
            payload,
            deadline,
            to,
        );
        None
    }

    /// The frame for a routed request's ending, unless that request already ended.
    fn ended(&mut self, ended: Ended) -> Option<Message> {
        // The closed request's slot is freed here, before its answer is written.
        self.asks.as_mut()?.close(ended.request_id, ended.ask)?;
        let answer = self.answer_ask(ended.request_id, ended.outcome);
        Some(self.fit(answer))
    }

    /// The answer to one of the device's own capability requests, counted once: every
    /// ending of such a request comes through here.
    fn answer_ask(&self, request_id: u64, outcome: CapabilityOutcome) -> HubToDevice {
        self.state.metrics.capability_answered(match &outcome {
            CapabilityOutcome::Ok(_) => None,
            CapabilityOutcome::Error(e) => Some(e.code),
        });
        HubToDevice::CapabilityResponse {
            request_id,
            outcome,
        }
    }

    /// Answers `timeout` to every request whose deadline has passed. Rare, so the
    /// answers go through this connection's own queue rather than in one batch here.
    fn expire_asks(&mut self) -> Option<Message> {
        let asks = self.asks.as_mut()?;
        let expired = asks.expire(Instant::now());
        for (request_id, wait) in expired {
            let msg = self.answer_ask(
                request_id,
                CapabilityOutcome::Error(routing::timed_out(wait).to_remote()),
            );
            let _ = self
                .link
                .try_send(Command::Send(Box::new(Answer { msg, slot: None })));
        }
        None
    }
}

/// The capability requests one device has open, with the earliest deadline armed.
struct Asks {
    open: HashMap<u64, Open>,
    next: u64,
    /// Armed no later than the earliest open deadline while any request is open;
    /// not polled while none is.
    timer: Pin<Box<Sleep>>,
}

/// One open request of the device's: its slot is freed when the request ends.
struct Open {
    ask: u64,
    deadline: Instant,
    wait: Duration,
    _slot: AskSlot,
}

impl Asks {
    fn new(deadline: Instant) -> Self {
        Asks {
            open: HashMap::new(),
            next: 1,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Whether the timer stands for an open request.
    fn armed(&self) -> bool {
        !self.open.is_empty()
    }

    /// Notes a new request; returns the hub's number for it.
    fn open(&mut self, request_id: u64, deadline: Instant, wait: Duration, slot: AskSlot) -> u64 {
        let ask = self.next;
        self.next += 1;
        if !self.armed() || deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
        }
        self.open.insert(
            request_id,
            Open {
                ask,
                deadline,
                wait,
                _slot: slot,
            },
        );
        ask
    }

    /// Ends request `request_id` if it is still the one numbered `ask`.
    fn close(&mut self, request_id: u64, ask: u64) -> Option<Open> {
        match self.open.get(&request_id) {
            Some(open) if open.ask == ask => self.open.remove(&request_id),
            _ => None,
        }
    }

    /// Ends every request due by `now`, and arms the timer for the next one.
    fn expire(&mut self, now: Instant) -> Vec<(u64, Duration)> {
        let due: Vec<(u64, Duration)> = self
            .open
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, o)| (*id, o.wait))
            .collect();
        for (id, _) in &due {
            self.open.remove(id);
        }
        if let Some(next) = self.open.values().map(|o| o.deadline).min() {
            self.timer.as_mut().reset(next);
        }
        due
    }

    /// Resolves when the earliest open request is due; never while none is open.
    async fn expiry(asks: &mut Option<Box<Asks>>) {
        match asks {
            Some(a) if a.armed() => a.timer.as_mut().await,
            _ => std::future::pending().await,
        }
    }
}

struct Accepted {
    config: DeviceConfig,
    /// The load the device registered with, if it sent one.
    load: Option<LoadReport>,
    peer_max: usize,
    instance: Option<u64>,
    grants: Grants,
    version: u32,
    enrolled: bool,
}

/// Negotiates the version, checks the secret, and finds or enrols the device.
async fn register_device(
    state: &HubState,
    reg: &Register,
    peer: std::net::SocketAddr,
) -> Result<Accepted, Refusal> {
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
    let peer_max = adi_protocol::limits::announced(reg.max_frame_bytes);
    let instance = reg.instance.as_deref().map(instance_digest);
    let id = state.device_ids.derive(&reg.secret);
    // Checked before the catalog is touched, so a displaced agent cannot rename the
    // device or change its services on its way back.
    if let Some(conflict) = state.registry.displaced(&id, instance) {
        return Err(Refusal::new(
            ErrorCode::DuplicateAgent,
            format!(
                "this agent was displaced by another agent with the same device secret{}; \
                 stop one of them, or give the copy its own identity",
                conflict
                    .by
                    .map(|a| format!(" (connected from {a})"))
                    .unwrap_or_default()
            ),
        ));
    }
    let mut config = DeviceConfig {
        id,
        name: name.to_owned(),
        services: reg.services.clone(),
        capabilities: reg.capabilities.clone(),
        location: location.map(str::to_owned),
        // What the registration's load shows; stored only where it differs from what
        // the catalog holds, as heartbeats do.
        hardware: reg.load.as_ref().map(Hardware::from),
    };
    if let Some(known) = existing(state, &config.id).await? {
        let reported = reg.load.as_ref();
        if reported.is_none_or(|l| known.hardware.as_ref().is_some_and(|h| h.describes(l))) {
            config.hardware = known.hardware.clone();
        }
        let grants = Grants::of(&known.members);
        update_if_changed(state, &DeviceConfig::from(known), &config).await?;
        return Ok(Accepted {
            config,
            load: None,
            peer_max,
            instance,
            grants,
            version,
            enrolled: false,
        });
    }
    let Some(token) = reg.setup_token.as_deref() else {
        if removed(state, &config.id).await? {
            return Err(Refusal::new(ErrorCode::DeviceRemoved, DEVICE_REMOVED));
        }
        return Err(Refusal::new(
            ErrorCode::NotEnrolled,
            "this device is not enrolled on this hub; start it once with a setup token",
        ));
    };
    // Enrolment attempts (never a known device's reconnect) count against the source.
    let account = crate::credential::parse(token).map(|p| p.account());
    if let Err(wait) = state.throttle.admit(peer.ip(), account.as_deref()) {
        return Err(Refusal::new(
            ErrorCode::TooManyRequests,
            format!(
                "too many enrolment attempts from this address or with this token; retry in {} s",
                crate::throttle::retry_after_secs(wait)
            ),
        ));
    }
    let enrolled = tokens::enrol(state.catalog.as_ref(), token, &config, unix_now_i64()).await;
    if let Err(e) = &enrolled {
        if !matches!(e, TokenError::Catalog(_)) {
            state.throttle.failed(peer.ip(), account.as_deref());
        }
    }
    match enrolled {
        Ok(record) => Ok(Accepted {
            config,
            load: None,
            peer_max,
            instance,
            grants: Grants::of(&record.members),
            version,
            enrolled: true,
        }),
        // Enrolled concurrently by another connection with the same secret.
        Err(TokenError::Catalog(CatalogError::Conflict(_))) => {
            let grants = existing(state, &config.id)
                .await?
                .map(|d| Grants::of(&d.members))
                .unwrap_or_default();
            Ok(Accepted {
                config,
                load: None,
                peer_max,
                instance,
                grants,
                version,
                enrolled: false,
            })
        }
        // A removed device's agent that still passes its old, spent token.
        Err(TokenError::Used) if removed(state, &config.id).await? => {
            Err(Refusal::new(ErrorCode::DeviceRemoved, DEVICE_REMOVED))
        }
        Err(e) => {
            if let TokenError::Catalog(inner) = &e {
                warn!("enrolment failed in the catalog: {inner:#}");
            }
            Err(Refusal::new(e.code(), refusal_text(&e)))
        }
    }
}

/// What an agent of a device its owner removed is told, on its connection and when it
/// comes back.
const DEVICE_REMOVED: &str = "this device was removed by its owner; the agent stops. Its task \
     store on this device is left as it was; to add the device again, start it with a new \
     setup token";

async fn removed(state: &HubState, id: &DeviceId) -> Result<bool, Refusal> {
    state.catalog.is_removed(id).await.map_err(|e| {
        warn!("catalog lookup failed: {e:#}");
        catalog_refusal(&e)
    })
}

async fn existing(state: &HubState, id: &DeviceId) -> Result<Option<DeviceRecord>, Refusal> {
    match state.catalog.device(id).await {
        Ok(found) => Ok(found),
        Err(e) => {
            warn!("catalog lookup failed: {e:#}");
            Err(catalog_refusal(&e))
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
        catalog_refusal(&e)
    })
}

fn refusal_text(e: &TokenError) -> String {
    match e {
        TokenError::Catalog(inner) => catalog_refusal(inner).message,
        other => format!("setup token refused: {other}"),
    }
}

/// A short, fixed-size stand-in for the id an agent made for itself: it is compared,
/// never shown, and an agent gains nothing by choosing it.
fn instance_digest(instance: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instance.hash(&mut h);
    h.finish()
}

/// A registration the catalog could not serve: retryable, and with the outage named
/// when it is one (a full disk, say), so the device's log says why it waits.
fn catalog_refusal(e: &CatalogError) -> Refusal {
    Refusal::new(e.code(), format!("{}; retry later", e.public_message()))
}

fn decode_refusal(e: &DecodeError) -> Refusal {
    match e {
        DecodeError::TooLarge { .. } => Refusal::new(ErrorCode::PayloadTooLarge, e.to_string()),
        DecodeError::Invalid(_) => Refusal::new(ErrorCode::BadRequest, e.to_string()),
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
async fn refuse(socket: &mut WebSocket, refusal: Refusal) {
    let frame = HubToDevice::Error {
        code: refusal.code,
        message: refusal.message,
    };
    let close_code = match refusal.code {
        ErrorCode::PayloadTooLarge => close_code::SIZE,
        ErrorCode::Internal => close_code::ERROR,
        ErrorCode::Unavailable => close_code::AGAIN,
        _ => close_code::POLICY,
    };
    let _ = timeout(CLOSE_WAIT, socket.send(text(&frame))).await;
    close(socket, close_code, refusal.code.as_str().into()).await;
}

/// Sends a close frame, waiting at most a moment for a peer that does not read.
async fn close(socket: &mut WebSocket, code: u16, reason: String) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = timeout(CLOSE_WAIT, socket.send(frame)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, F: Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[tokio::test]
    async fn open_requests_expire_in_deadline_order_and_a_reused_id_is_a_new_request() {
        let link = ConnHandle::new(0);
        let slot = || link.try_ask().expect("slot");
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut asks = Asks::new(t);
        let first = asks.open(1, t + s(3), s(3), slot());
        asks.open(2, t + s(1), s(1), slot());
        asks.open(3, t + s(2), s(2), slot());
        assert_eq!(asks.timer.deadline(), t + s(1), "armed at the earliest");
        let mut due = asks.expire(t + s(2));
        due.sort();
        assert_eq!(due, vec![(2, s(1)), (3, s(2))]);
        assert_eq!(asks.timer.deadline(), t + s(3), "re-armed at the next");
        // Request 1 ends and its id is used again: the first one's late ending is not
        // the second's.
        assert!(asks.close(1, first).is_some());
        let again = asks.open(1, t + s(5), s(5), slot());
        assert!(asks.close(1, first).is_none());
        assert!(asks.close(1, again).is_some());
        assert!(asks.expire(t + s(9)).is_empty());
        assert!(!asks.armed(), "idle with nothing open");
        drop(asks);
        assert!(
            (0..MAX_DEVICE_REQUESTS).all(|_| link.try_ask().map(std::mem::forget).is_some()),
            "every slot was given back"
        );
    }

    #[test]
    fn the_future_a_connected_device_keeps_stays_small() {
        // Every connected device holds this future (in its task) for as long as it
        // stays connected; it was 944 bytes when this test was written, the socket
        // alone is 368. Registration's state must stay out of it.
        let size = output_size(Connection::run);
        assert!(size <= 1280, "the connection future grew to {size} bytes");
    }
}
