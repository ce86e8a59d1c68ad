//! The connection loop: one session per WebSocket, and the backoff between sessions.
//! A session registers, then runs a `select!` over cancellation, the heartbeat timer
//! and inbound frames until the connection ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{
    decode, encode, CapabilityOutcome, DeviceRequest, DeviceSecret, DeviceToHub, ErrorCode,
    Heartbeat, HubToDevice, Outcome as Answer, Register, RemoteError, SUPPORTED_VERSIONS,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{interval, timeout, Instant, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::capabilities::CapabilityServer;
use crate::plugins::CapabilitySet;
use crate::runner::Runner;
use crate::{CapabilityCall, CocoonConfig, CocoonError, ConnState};

/// How long to wait for the hub's answer to a registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without any frame from the hub before the link counts as dead.
const SILENT_INTERVALS: u32 = 3;
/// Answers waiting to be written; request handlers wait when it is full.
const ANSWER_QUEUE: usize = 64;
/// Answers written before one flush when several are ready.
const ANSWER_BATCH: usize = 32;
/// Body frames waiting to be written; stream senders wait when it is full.
const FRAME_QUEUE: usize = 64;

/// How one session ended.
enum Outcome {
    Cancelled,
    Refused(ErrorCode, String),
    Lost {
        registered: bool,
        reason: String,
    },
    /// What answered at the hub's address is not an adi hub; what it answered.
    NotAHub(String),
}

/// Statuses a reverse proxy or a busy hub answers an upgrade with for a while (the hub
/// behind it restarting, the hub's connection caps): worth retrying. Any other answer
/// but `101 Switching Protocols` comes from something that is not an adi hub.
fn transient(status: tokio_tungstenite::tungstenite::http::StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 502 | 503 | 504)
}

/// Why a connection attempt failed: something that is not an adi hub answered (by the
/// HTTP status or the malformed answer), or the hub could not be reached for now.
fn connect_failed(ws_url: &str, e: tokio_tungstenite::tungstenite::Error) -> Outcome {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    match e {
        Error::Http(response) if !transient(response.status()) => {
            let body = response
                .body()
                .as_deref()
                .map(adi_protocol::http::excerpt)
                .filter(|e| !e.is_empty())
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            Outcome::NotAHub(format!(
                "it answered the cocoon endpoint's WebSocket upgrade with HTTP {}{body}",
                response.status()
            ))
        }
        Error::Http(response) => lost(
            false,
            format!(
                "the hub answered HTTP {} (busy or restarting)",
                response.status()
            ),
        ),
        // An answer that is no WebSocket upgrade at all; a connection cut short (a hub
        // stopping) is retried instead.
        Error::Protocol(
            p @ (ProtocolError::HttparseError(_)
            | ProtocolError::WrongHttpVersion
            | ProtocolError::MissingConnectionUpgradeHeader
            | ProtocolError::MissingUpgradeWebSocketHeader
            | ProtocolError::SecWebSocketAcceptKeyMismatch),
        ) => Outcome::NotAHub(format!(
            "its answer to the cocoon endpoint's WebSocket upgrade is not one: {p}"
        )),
        Error::Io(io) => lost(false, io.to_string()),
        other => lost(false, format!("{ws_url}: {other}")),
    }
}

/// What the sessions of one cocoon share with the rest of it.
pub(crate) struct Shared {
    /// This agent process's own id, sent at every registration: the hub tells a
    /// reconnect of this agent from a second agent holding a copy of the secret.
    pub(crate) instance: String,
    pub(crate) runner: Arc<Runner>,
    pub(crate) http: crate::pool::Pool,
    pub(crate) health: watch::Receiver<Vec<adi_protocol::ServiceHealth>>,
    pub(crate) load: watch::Receiver<Option<adi_protocol::LoadReport>>,
    pub(crate) capabilities: watch::Receiver<Arc<CapabilitySet>>,
    pub(crate) server: Arc<CapabilityServer>,
}

pub(crate) async fn run(
    config: CocoonConfig,
    ws_url: String,
    secret: DeviceSecret,
    shared: Shared,
    mut calls: mpsc::Receiver<CapabilityCall>,
    state: watch::Sender<ConnState>,
    cancel: CancellationToken,
) -> Result<(), CocoonError> {
    let mut token = config.setup_token.clone();
    let mut attempt: u32 = 0;
    // Once this agent has been online, an address that answers like something else is
    // taken for a hub's reverse proxy having a bad moment, and retried.
    let mut ever_online = false;
    loop {
        state.send_replace(ConnState::Connecting);
        let agent = Agent {
            instance: &shared.instance,
            config: &config,
            ws_url: &ws_url,
            secret: &secret,
            runner: &shared.runner,
            http: &shared.http,
            health: &shared.health,
            load: &shared.load,
            capabilities: &shared.capabilities,
            server: &shared.server,
        };
        let outcome = session(&agent, &mut token, &mut calls, &state, &cancel).await;
        let (was_online, reason) = match outcome {
            Outcome::Cancelled => {
                state.send_replace(ConnState::Stopped);
                return Ok(());
            }
            Outcome::Refused(code, message) if !code.is_retryable() => {
                state.send_replace(ConnState::Failed {
                    code,
                    message: message.clone(),
                });
                return Err(CocoonError::Refused { code, message });
            }
            Outcome::NotAHub(answered) if !ever_online => {
                state.send_replace(ConnState::NotAHub {
                    hub: config.hub_url.clone(),
                    answered: answered.clone(),
                });
                return Err(CocoonError::NotAHub {
                    hub: config.hub_url.clone(),
                    answered,
                });
            }
            Outcome::NotAHub(answered) => (
                false,
                format!("its address answered like something else: {answered}"),
            ),
            Outcome::Refused(code, message) => (false, format!("hub refused ({code}): {message}")),
            Outcome::Lost { registered, reason } => {
                if registered {
                    attempt = 0;
                    ever_online = true;
                }
                (registered, reason)
            }
        };
        let delay = config.backoff(attempt);
        let hub = &config.hub_url;
        let secs = delay.as_secs_f64();
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        // One line per retry: what failed, and when the next try is.
        if was_online {
            warn!(
                attempt,
                delay_ms, "hub connection lost: {reason}; reconnecting to {hub} in {secs:.1}s"
            );
        } else {
            warn!(
                attempt,
                delay_ms, "cannot connect to the hub at {hub}: {reason}; retrying in {secs:.1}s"
            );
        }
        state.send_replace(ConnState::Reconnecting { attempt, reason });
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => {
                state.send_replace(ConnState::Stopped);
                return Ok(());
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What every session of one cocoon shares.
struct Agent<'a> {
    instance: &'a str,
    config: &'a CocoonConfig,
    ws_url: &'a str,
    secret: &'a DeviceSecret,
    runner: &'a Arc<Runner>,
    http: &'a crate::pool::Pool,
    health: &'a watch::Receiver<Vec<adi_protocol::ServiceHealth>>,
    load: &'a watch::Receiver<Option<adi_protocol::LoadReport>>,
    capabilities: &'a watch::Receiver<Arc<CapabilitySet>>,
    server: &'a Arc<CapabilityServer>,
}

async fn session(
    agent: &Agent<'_>,
    token: &mut Option<String>,
    calls: &mut mpsc::Receiver<CapabilityCall>,
    state: &watch::Sender<ConnState>,
    cancel: &CancellationToken,
) -> Outcome {
    let Agent {
        instance,
        config,
        ws_url,
        secret,
        runner,
        http,
        health,
        load,
        capabilities,
        server,
    } = *agent;
    // This session's own view, so a change made while it runs is sent exactly once.
    let mut capabilities = capabilities.clone();
    // Control frames are held to `max_frame_bytes` by the decoder; the socket must also
    // let whole body frames through.
    let socket_max = config.max_frame_bytes.max(adi_protocol::frame::MAX_FRAME);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(socket_max))
        .max_frame_size(Some(socket_max));
    let connect = tokio_tungstenite::connect_async_with_config(ws_url, Some(ws_config), true);
    let mut ws = tokio::select! {
        _ = cancel.cancelled() => return Outcome::Cancelled,
        r = timeout(REGISTER_TIMEOUT, connect) => match r {
            Err(_) => return lost(false, "connecting timed out"),
            Ok(Err(e)) => return connect_failed(ws_url, e),
            Ok(Ok((ws, _))) => ws,
        },
    };
    let register = DeviceToHub::Register(Register {
        versions: SUPPORTED_VERSIONS.to_vec(),
        secret: secret.clone(),
        setup_token: token.clone(),
        name: config.name.clone(),
        services: config.services.clone(),
        capabilities: capabilities.borrow_and_update().offers(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        location: config.location.clone(),
        max_frame_bytes: u64::try_from(config.max_frame_bytes).ok(),
        instance: Some(instance.to_owned()),
        load: load.borrow().clone(),
    });
    let mut frame = encode(&register);
    if frame.len() > adi_protocol::DEFAULT_MAX_FRAME_BYTES {
        // The hub's limit is not known before it answers: registering matters more
        // than the figures, which the first heartbeat brings anyway.
        if let DeviceToHub::Register(mut bare) = register {
            bare.load = None;
            frame = encode(&DeviceToHub::Register(bare));
        }
    }
    if let Err(e) = ws.send(Message::text(frame)).await {
        return lost(false, format!("sending registration failed: {e}"));
    }
    let registered = tokio::select! {
        _ = cancel.cancelled() => return Outcome::Cancelled,
        r = timeout(REGISTER_TIMEOUT, ws.next()) => r,
    };
    let registered = match registered {
        Err(_) => return lost(false, "no answer to registration"),
        Ok(None) => return lost(false, "hub closed before answering"),
        Ok(Some(Err(e))) => return lost(false, format!("reading registration answer: {e}")),
        Ok(Some(Ok(msg))) => match msg {
            Message::Text(t) => match decode::<HubToDevice>(t.as_bytes(), config.max_frame_bytes) {
                Ok(HubToDevice::Registered(r)) => r,
                Ok(HubToDevice::Error { code, message }) => return Outcome::Refused(code, message),
                Ok(
                    HubToDevice::Request { .. }
                    | HubToDevice::ProxyRequest(_)
                    | HubToDevice::CapabilityResponse { .. },
                ) => return lost(false, "request before registration"),
                // A hub newer than this agent may answer in words it does not know
                // yet: only an answer not shaped like a hub's is something else's.
                Err(e) if answer_shaped(t.as_bytes()) => {
                    return lost(false, format!("bad registration answer: {e}"))
                }
                Err(e) => {
                    return Outcome::NotAHub(format!(
                        "its WebSocket answered the registration with something that is \
                         not an adi message ({e})"
                    ))
                }
            },
            Message::Close(frame) => return lost(false, close_reason(frame.as_ref())),
            Message::Binary(_) => {
                return Outcome::NotAHub(
                    "its WebSocket answered the registration with binary data".into(),
                )
            }
            _ => return lost(false, "unexpected registration answer"),
        },
    };
    if registered.enrolled {
        info!(device_id = %registered.device_id, "device enrolled");
    }
    // The token is spent; later reconnects prove identity with the secret alone.
    *token = None;
    let heartbeat_every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));
    info!(device_id = %registered.device_id, heartbeat_ms = registered.heartbeat_interval_ms, "connected to hub");
    state.send_replace(ConnState::Online {
        device_id: registered.device_id.clone(),
    });

    let mut ticker = interval(heartbeat_every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();
    let mut seq = 0u64;
    let mut last_heard = Instant::now();
    let device_id = registered.device_id.clone();
    // Answers of this session only: when it ends, late answers have nowhere to go,
    // so they can never reach a later connection that reuses request ids.
    let (answer_tx, mut answers) = mpsc::channel::<DeviceToHub>(ANSWER_QUEUE);
    // Body streams of proxied requests, also per session.
    let (frame_tx, mut frames) = mpsc::channel::<bytes::Bytes>(FRAME_QUEUE);
    let streams = adi_mux::Streams::new(frame_tx);
    let _end_streams = EndStreams(streams.clone());
    // What the hub asked of this session and is still being served, so that a cocoon
    // asked to stop can finish it first.
    let serving = TaskTracker::new();
    // Set once the cocoon is asked to stop: how long it still waits for `serving`.
    let mut draining: Option<Pin<Box<Sleep>>> = None;
    // Capability requests this device sent, by the id it gave them. Dropped with the
    // session, which tells every waiting caller that the link was lost.
    let mut asked: HashMap<u64, oneshot::Sender<CapabilityOutcome>> = HashMap::new();
    let mut next_ask: u64 = 1;
    // Answers stay within the smaller of our limit and the hub's: the hub closes a link
    // that sends it a larger frame.
    let max_answer = registered
        .max_frame_bytes
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(adi_protocol::DEFAULT_MAX_FRAME_BYTES)
        .min(config.max_frame_bytes);
    let budget = crate::requests::reply_budget(max_answer);
    // Opens the request's stream and serves it on a task of its own; the services are
    // shared, not copied, per request.
    let services: std::sync::Arc<[adi_protocol::ServiceInfo]> = config.services.as_slice().into();
    let serve_proxy = |request: adi_protocol::ProxyRequest| {
        let (body_in, body_out) = streams.open(request.stream_id);
        let tx = answer_tx.clone();
        let client = http.clone();
        let services = services.clone();
        serving.spawn(async move {
            // Boxed, so the task's own future is a few pointers: spawning it and
            // retiring it copy those, not the whole exchange's state.
            Box::pin(crate::proxy::serve(
                client, &services, request, body_in, body_out, tx,
            ))
            .await;
        });
    };
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if draining.is_none() => {
                let in_flight = serving.len();
                if in_flight == 0 || config.shutdown_grace.is_zero() {
                    return stop(&mut ws).await;
                }
                info!(in_flight, grace = ?config.shutdown_grace, "stopping: finishing the requests in flight, taking no new ones");
                let _ = ws.send(Message::text(encode(&DeviceToHub::Draining))).await;
                serving.close();
                draining = Some(Box::pin(tokio::time::sleep(config.shutdown_grace)));
            }
            // An async block, so the wait is built only once it is polled, not on every
            // turn of the loop.
            () = async { serving.wait().await }, if draining.is_some() => {
                // Every request has ended, so all they had to say is queued: it leaves
                // before the close, heads before the body frames that follow them.
                while let Ok(answer) = answers.try_recv() {
                    let _ = ws.feed(Message::text(fit(answer, max_answer))).await;
                }
                while let Ok(frame) = frames.try_recv() {
                    let _ = ws.feed(Message::Binary(frame)).await;
                }
                info!("requests in flight finished");
                return stop(&mut ws).await;
            }
            () = grace_end(&mut draining) => {
                warn!(in_flight = serving.len(), "requests still in flight after the grace period; cutting them off");
                return stop(&mut ws).await;
            }
            _ = ticker.tick() => {
                asked.retain(|_, reply| !reply.is_closed());
                if last_heard.elapsed() > heartbeat_every * SILENT_INTERVALS {
                    return lost(true, "hub silent for 3 heartbeat intervals");
                }
                seq += 1;
                let services = health.borrow().clone();
                let load = load.borrow().clone();
                let mut hb = encode(&DeviceToHub::Heartbeat(Heartbeat { seq, services, load }));
                if hb.len() > max_answer {
                    // Liveness matters more than the figures: send it bare.
                    warn!(bytes = hb.len(), max = max_answer, "the heartbeat's load and health figures do not fit in one frame; sending it without them");
                    hb = encode(&DeviceToHub::Heartbeat(Heartbeat { seq, ..Heartbeat::default() }));
                }
                // The ping makes the hub answer, so a dead hub is noticed even though
                // heartbeats themselves are not acknowledged.
                let sent = async {
                    ws.feed(Message::text(hb)).await?;
                    ws.feed(Message::Ping(Default::default())).await?;
                    ws.flush().await
                };
                if let Err(e) = sent.await {
                    return lost(true, format!("sending heartbeat failed: {e}"));
                }
            }
            Some(frame) = frames.recv() => {
                // Body frames that are ready together leave with one flush.
                if let Err(e) = write_ready(&mut ws, frame, &mut frames, Message::Binary).await {
                    return lost(true, format!("sending a body frame failed: {e}"));
                }
            }
            Some(answer) = answers.recv() => {
                // Answers that are ready together leave with one flush.
                let write = write_ready(&mut ws, answer, &mut answers, |a| Message::text(fit(a, max_answer)));
                if let Err(e) = write.await {
                    return lost(true, format!("sending an answer failed: {e}"));
                }
            }
            Ok(()) = capabilities.changed() => {
                let offers = capabilities.borrow_and_update().offers();
                let update = encode(&DeviceToHub::CapabilitiesUpdate { capabilities: offers });
                if update.len() > max_answer {
                    warn!(bytes = update.len(), max = max_answer, "the plugins offer more capabilities than fit in one frame to the hub; the hub keeps the last list it got until fewer are installed");
                    continue;
                }
                if let Err(e) = ws.send(Message::text(update)).await {
                    return lost(true, format!("sending capabilities failed: {e}"));
                }
            }
            Some(call) = calls.recv() => {
                if call.reply.is_closed() {
                    continue;
                }
                let request_id = next_ask;
                next_ask += 1;
                let frame = encode(&DeviceToHub::CapabilityRequest {
                    request_id,
                    capability: call.query,
                    payload: call.payload,
                    prefer_device: call.prefer,
                    deadline_ms: u64::try_from(call.deadline.as_millis()).unwrap_or(u64::MAX),
                });
                if frame.len() > max_answer {
                    let _ = call.reply.send(CapabilityOutcome::Error(RemoteError {
                        code: ErrorCode::PayloadTooLarge,
                        message: format!("the request is {} bytes; at most {max_answer} fit in one frame", frame.len()),
                    }));
                    continue;
                }
                asked.insert(request_id, call.reply);
                if let Err(e) = ws.send(Message::text(frame)).await {
                    return lost(true, format!("sending a capability request failed: {e}"));
                }
            }
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    None => return lost(true, "hub closed the connection"),
                    Some(Err(e)) => return lost(true, format!("connection failed: {e}")),
                    Some(Ok(Message::Close(frame))) => return lost(true, close_reason(frame.as_ref())),
                    Some(Ok(Message::Text(t))) => {
                        match adi_protocol::decode_hub_frame(t.as_bytes(), config.max_frame_bytes) {
                            // Another agent holds this device's secret and took its
                            // place: reconnecting would only take it back, forever.
                            Ok(HubToDevice::Error { code: ErrorCode::DuplicateAgent, message }) => {
                                return Outcome::Refused(ErrorCode::DuplicateAgent, message);
                            }
                            Ok(HubToDevice::Error { code, message }) => warn!(%code, "hub reported an error: {message}"),
                            Ok(HubToDevice::Registered(_)) => warn!("unexpected second registration answer"),
                            // Opened now, before reading on: its body frames follow.
                            Ok(HubToDevice::ProxyRequest(request)) => serve_proxy(request),
                            Ok(HubToDevice::CapabilityResponse { request_id, outcome }) => {
                                if let Some(reply) = asked.remove(&request_id) {
                                    let _ = reply.send(outcome);
                                }
                            }
                            Ok(HubToDevice::Request { request_id, request: DeviceRequest::Capability { capability, payload }, deadline_ms }) => {
                                let server = server.clone();
                                let device_id = device_id.clone();
                                let tx = answer_tx.clone();
                                serving.spawn(async move {
                                    let deadline = Duration::from_millis(deadline_ms);
                                    let outcome = match server.serve(&device_id, &capability, payload, deadline).await {
                                        Ok(payload) => Answer::Ok(adi_protocol::DeviceReply::Capability { payload }),
                                        Err(e) => Answer::Error(e),
                                    };
                                    let _ = tx.send(DeviceToHub::Response { request_id, outcome }).await;
                                });
                            }
                            Ok(HubToDevice::Request { request_id, request, .. }) => {
                                let runner = runner.clone();
                                let device_id = device_id.clone();
                                let tx = answer_tx.clone();
                                serving.spawn(async move {
                                    let outcome = crate::requests::handle(&runner, &device_id, request, budget).await;
                                    let _ = tx.send(DeviceToHub::Response { request_id, outcome }).await;
                                });
                            }
                            Err(e) => warn!("undecodable frame from hub: {e}"),
                        }
                    }
                    Some(Ok(Message::Binary(b))) => match adi_protocol::frame::decode(b) {
                        // A proxied request with no body: its head, whole.
                        Ok(frame) if frame.kind == adi_protocol::frame::Kind::Whole => {
                            match adi_protocol::exchange::read_request(&frame) {
                                Ok(request) => serve_proxy(request),
                                Err(e) => warn!("{e}"),
                            }
                        }
                        Ok(frame) => streams.on_frame(frame),
                        Err(e) => warn!("bad body frame from hub: {e}"),
                    },
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Writes `first` and whatever else `queue` holds, up to [`ANSWER_BATCH`] frames, then
/// flushes once. When the queue runs dry it yields once first, so that requests the
/// runtime is about to finish add their frames to the same write: under load one
/// syscall carries several answers, which the hub then reads in one.
async fn write_ready<S, T>(
    ws: &mut S,
    first: T,
    queue: &mut mpsc::Receiver<T>,
    frame: impl Fn(T) -> Message,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    ws.feed(frame(first)).await?;
    let mut fed = 1;
    let mut waited = false;
    while fed < ANSWER_BATCH {
        let Ok(next) = queue.try_recv() else {
            if waited {
                break;
            }
            waited = true;
            tokio::task::yield_now().await;
            continue;
        };
        ws.feed(frame(next)).await?;
        fed += 1;
    }
    ws.flush().await
}

/// The frame for a message, held to the hub's frame limit (the hub closes a link that
/// sends it a larger one, see `adi_protocol::limits`): an answer or a response head
/// that does not fit is replaced by an error for that request alone, and an error's
/// words are cut to size. Heartbeats and capability updates are checked where they
/// are made.
fn fit(msg: DeviceToHub, max: usize) -> String {
    let msg = match msg {
        DeviceToHub::ProxyError {
            stream_id,
            code,
            message,
        } => DeviceToHub::ProxyError {
            stream_id,
            code,
            message: adi_protocol::limits::clip_message(message),
        },
        other => other,
    };
    let frame = encode(&msg);
    if frame.len() <= max {
        return frame;
    }
    match msg {
        DeviceToHub::Response { request_id, .. } => {
            warn!(
                request_id,
                bytes = frame.len(),
                max,
                "answer too large for one frame"
            );
            encode(&DeviceToHub::Response {
                request_id,
                outcome: Answer::Error(RemoteError {
                    code: ErrorCode::PayloadTooLarge,
                    message: format!(
                        "the answer is {} bytes; at most {max} fit in one frame",
                        frame.len()
                    ),
                }),
            })
        }
        DeviceToHub::ProxyResponse { stream_id, .. } => {
            warn!(
                stream_id,
                bytes = frame.len(),
                max,
                "a service's response head is too large to pass on"
            );
            encode(&DeviceToHub::ProxyError {
                stream_id,
                code: ErrorCode::UpstreamError,
                message: format!(
                    "the service's response head is {} bytes; at most {max} can be \
                     passed on",
                    frame.len()
                ),
            })
        }
        // Nothing else a request carries reaches this queue.
        other => encode(&other),
    }
}

/// Whether a frame is a JSON object typed as one of the hub's answers to a registration.
fn answer_shaped(frame: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(frame)
        .ok()
        .and_then(|v| {
            v.get("type")?
                .as_str()
                .map(|t| t == "registered" || t == "error")
        })
        .unwrap_or(false)
}

fn lost(registered: bool, reason: impl Into<String>) -> Outcome {
    Outcome::Lost {
        registered,
        reason: reason.into(),
    }
}

fn close_reason(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if !f.reason.is_empty() => format!("hub closed the connection: {}", f.reason),
        Some(f) => format!("hub closed the connection (code {})", u16::from(f.code)),
        None => "hub closed the connection".into(),
    }
}

/// Closes the connection for a cocoon that is stopping.
async fn stop<S>(ws: &mut S) -> Outcome
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "cocoon stopping".into(),
        })))
        .await;
    let _ = timeout(Duration::from_secs(1), ws.close()).await;
    Outcome::Cancelled
}

/// Resolves when the grace period of a stopping cocoon is over; never before it stops.
async fn grace_end(draining: &mut Option<Pin<Box<Sleep>>>) {
    match draining {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Ends every proxied request of a session when the session ends, however it ends (the
/// hub went away, a write failed, the cocoon is stopping): each request's task then
/// drops its exchange, so the service sees its connection close instead of working on
/// for a client that can no longer be reached.
struct EndStreams(adi_mux::Streams);

impl Drop for EndStreams {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    use tokio_tungstenite::tungstenite::http::Response;

    fn answered(status: u16) -> Outcome {
        let response = Response::builder()
            .status(status)
            .body(Some(b"<html>\n  Not here\n</html>".to_vec()))
            .expect("response");
        connect_failed("ws://hub/ws/cocoon", Error::Http(response))
    }

    /// Stopping for good on a hub that is only busy or restarting would strand a
    /// device: only answers no adi hub gives stop it.
    #[test]
    fn busy_or_restarting_hubs_are_retried_and_other_answers_are_not_a_hub() {
        for status in [408, 429, 502, 503, 504] {
            assert!(
                matches!(
                    answered(status),
                    Outcome::Lost {
                        registered: false,
                        ..
                    }
                ),
                "{status}"
            );
        }
        for status in [200, 400, 404, 426, 500, 501] {
            match answered(status) {
                Outcome::NotAHub(what) => {
                    assert!(what.contains(&status.to_string()), "{what}");
                    assert!(what.ends_with(": Not here"), "{what}");
                }
                _ => panic!("{status} taken for a hub"),
            }
        }
        let cut_short = Error::Protocol(ProtocolError::HandshakeIncomplete);
        assert!(matches!(
            connect_failed("ws://hub/ws/cocoon", cut_short),
            Outcome::Lost { .. }
        ));
        let garbage = Error::Protocol(ProtocolError::WrongHttpVersion);
        assert!(matches!(
            connect_failed("ws://hub/ws/cocoon", garbage),
            Outcome::NotAHub(_)
        ));
    }

    #[test]
    fn a_hub_answer_in_words_this_agent_does_not_know_is_still_a_hub() {
        assert!(answer_shaped(
            br#"{"type":"error","code":"from_the_future","message":"m"}"#
        ));
        assert!(answer_shaped(br#"{"type":"registered","device_id":7}"#));
        assert!(!answer_shaped(br#"{"type":"register","name":"echoed"}"#));
        assert!(!answer_shaped(b"hello"));
    }
}
