//! The connection loop: one session per WebSocket, the backoff between sessions, and the
//! hub each one dials (`hubs` says which, and learns the hub's cluster from its answer).
//! A session connects and registers; once registered, a [`Session`] actor owns the
//! socket and everything that lives only as long as the connection, with one handler
//! per thing that can happen (a frame from the hub, an answer or body frame to send,
//! the heartbeat, a capability request from a program on this device, a change of the
//! device's services or capabilities, a stop), until the connection ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use adi_mux::batch::Pacing;
use adi_protocol::{
    decode, encode, CapabilityOffer, CapabilityOutcome, DeviceId, DeviceRequest, DeviceSecret,
    DeviceToHub, ErrorCode, Heartbeat, HubToDevice, Outcome, ProxyRequest, Register, RemoteError,
    ServiceInfo, SUPPORTED_VERSIONS,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{interval, timeout, Instant, Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::capabilities::CapabilityServer;
use crate::hubs::{Hubs, Retry};
use crate::plugins::CapabilitySet;
use crate::runner::Runner;
use crate::{CapabilityCall, CocoonConfig, CocoonError, ConnState};

/// How long to wait for the hub's answer to a registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without any frame from the hub before the link counts as dead.
const SILENT_INTERVALS: u32 = 3;
/// Answers waiting to be written; request handlers wait when it is full.
const ANSWER_QUEUE: usize = 64;
/// Body frames waiting to be written; stream senders wait when it is full.
const FRAME_QUEUE: usize = 64;

/// How one session ended.
enum SessionEnd {
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
fn connect_failed(
    ws_url: &str,
    trust: &crate::trust::Trust,
    e: tokio_tungstenite::tungstenite::Error,
) -> SessionEnd {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    // A certificate that does not verify: said with the name and the CAs tried, and
    // retried, as a renewed certificate or a fixed --ca-cert may cure it.
    if let Some(why) = trust.explain(ws_url, &crate::trust::chain(&e)) {
        return lost(false, why);
    }
    match e {
        Error::Http(response) if !transient(response.status()) => {
            let body = response
                .body()
                .as_deref()
                .map(adi_protocol::http::excerpt)
                .filter(|e| !e.is_empty())
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            SessionEnd::NotAHub(format!(
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
        ) => SessionEnd::NotAHub(format!(
            "its answer to the cocoon endpoint's WebSocket upgrade is not one: {p}"
        )),
        Error::Io(io) => lost(false, io.to_string()),
        other => lost(false, format!("{ws_url}: {other}")),
    }
}

/// What the sessions of one cocoon share with the rest of it.
pub(crate) struct Shared {
    /// Whom the hub's TLS certificate must be issued by.
    pub(crate) trust: crate::trust::Trust,
    /// This agent process's own id, sent at every registration: the hub tells a
    /// reconnect of this agent from a second agent holding a copy of the secret.
    pub(crate) instance: String,
    pub(crate) runner: Arc<Runner>,
    pub(crate) http: crate::pool::Pool,
    pub(crate) health: watch::Receiver<Vec<adi_protocol::ServiceHealth>>,
    pub(crate) load: watch::Receiver<Option<adi_protocol::LoadReport>>,
    /// The device's services, OpenAI-compatible servers with their models among them.
    pub(crate) services: watch::Receiver<Arc<[ServiceInfo]>>,
    pub(crate) capabilities: watch::Receiver<Arc<CapabilitySet>>,
    pub(crate) server: Arc<CapabilityServer>,
}

pub(crate) async fn run(
    config: CocoonConfig,
    mut hubs: Hubs,
    secret: DeviceSecret,
    shared: Shared,
    mut calls: mpsc::Receiver<CapabilityCall>,
    state: watch::Sender<ConnState>,
    cancel: CancellationToken,
) -> Result<(), CocoonError> {
    let mut token = config.setup_token.clone();
    // Once this agent has been online, an address that answers like something else is
    // taken for a hub's reverse proxy having a bad moment, and retried.
    let mut ever_online = false;
    loop {
        // A device with services will carry proxied bodies: the hub gives its socket a
        // reader that handles large frames well.
        let bodies = !shared.services.borrow().is_empty();
        let hub = hubs.current().clone();
        let ws_url = hub.ws_url(bodies);
        state.send_replace(ConnState::Connecting {
            hub: hub.url().to_owned(),
        });
        let agent = Agent {
            trust: &shared.trust,
            instance: &shared.instance,
            config: &config,
            hub: hub.url(),
            ws_url: &ws_url,
            secret: &secret,
            runner: &shared.runner,
            http: &shared.http,
            health: &shared.health,
            load: &shared.load,
            services: &shared.services,
            capabilities: &shared.capabilities,
            server: &shared.server,
        };
        let outcome = session(&agent, &mut hubs, &mut token, &mut calls, &state, &cancel).await;
        let (was_online, reason) = match outcome {
            SessionEnd::Cancelled => {
                state.send_replace(ConnState::Stopped);
                return Ok(());
            }
            SessionEnd::Refused(code, message) if !code.is_retryable() => {
                state.send_replace(ConnState::Failed {
                    code,
                    message: message.clone(),
                });
                return Err(CocoonError::Refused { code, message });
            }
            // With other hubs to try, one mistyped address does not stop the device.
            SessionEnd::NotAHub(answered) if !ever_online && hubs.len() == 1 => {
                state.send_replace(ConnState::NotAHub {
                    hub: hub.url().to_owned(),
                    answered: answered.clone(),
                });
                return Err(CocoonError::NotAHub {
                    hub: hub.url().to_owned(),
                    answered,
                });
            }
            SessionEnd::NotAHub(answered) if !ever_online => {
                (false, format!("it is not an adi hub: {answered}"))
            }
            SessionEnd::NotAHub(answered) => (
                false,
                format!("its address answered like something else: {answered}"),
            ),
            SessionEnd::Refused(code, message) => {
                (false, format!("hub refused ({code}): {message}"))
            }
            SessionEnd::Lost { registered, reason } => {
                ever_online |= registered;
                (registered, reason)
            }
        };
        let Retry { attempt, step } = hubs.advance(was_online);
        let delay = config.backoff(step);
        let tried = hub.url();
        let next = hubs.current().url().to_owned();
        let secs = delay.as_secs_f64();
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        // One line per retry: what failed, and when the next try is, where.
        match (was_online, hubs.len() > 1) {
            (true, false) => warn!(
                attempt,
                delay_ms, "hub connection lost: {reason}; reconnecting to {next} in {secs:.1}s"
            ),
            (false, false) => warn!(
                attempt,
                delay_ms, "cannot connect to the hub at {next}: {reason}; retrying in {secs:.1}s"
            ),
            (true, true) => warn!(
                attempt,
                delay_ms,
                "connection to the hub at {tried} lost: {reason}; reconnecting to {next} in {secs:.1}s"
            ),
            (false, true) => warn!(
                attempt,
                delay_ms, "cannot connect to the hub at {tried}: {reason}; trying {next} in {secs:.1}s"
            ),
        }
        state.send_replace(ConnState::Reconnecting {
            attempt,
            reason,
            hub: next,
        });
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
    trust: &'a crate::trust::Trust,
    instance: &'a str,
    config: &'a CocoonConfig,
    /// The hub this session dials, as named in logs and the state.
    hub: &'a str,
    ws_url: &'a str,
    secret: &'a DeviceSecret,
    runner: &'a Arc<Runner>,
    http: &'a crate::pool::Pool,
    health: &'a watch::Receiver<Vec<adi_protocol::ServiceHealth>>,
    load: &'a watch::Receiver<Option<adi_protocol::LoadReport>>,
    services: &'a watch::Receiver<Arc<[ServiceInfo]>>,
    capabilities: &'a watch::Receiver<Arc<CapabilitySet>>,
    server: &'a Arc<CapabilityServer>,
}

async fn session(
    agent: &Agent<'_>,
    hubs: &mut Hubs,
    token: &mut Option<String>,
    calls: &mut mpsc::Receiver<CapabilityCall>,
    state: &watch::Sender<ConnState>,
    cancel: &CancellationToken,
) -> SessionEnd {
    let Agent {
        trust,
        instance,
        config,
        hub,
        ws_url,
        secret,
        load,
        ..
    } = *agent;
    // This session's own views, so a change made while it runs is sent exactly once.
    let mut capabilities = agent.capabilities.clone();
    let mut services = agent.services.clone();
    // Control frames are held to `max_frame_bytes` by the decoder; the socket must also
    // let whole body frames through.
    let socket_max = config.max_frame_bytes.max(adi_protocol::frame::MAX_FRAME);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(socket_max))
        .max_frame_size(Some(socket_max));
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        ws_url,
        Some(ws_config),
        true,
        Some(tokio_tungstenite::Connector::Rustls(trust.client_config())),
    );
    let mut ws = tokio::select! {
        _ = cancel.cancelled() => return SessionEnd::Cancelled,
        r = timeout(REGISTER_TIMEOUT, connect) => match r {
            Err(_) => return lost(false, "connecting timed out"),
            Ok(Err(e)) => return connect_failed(ws_url, trust, e),
            Ok(Ok((ws, _))) => ws,
        },
    };
    let offered = capabilities.borrow_and_update().offers();
    let register = DeviceToHub::Register(Register {
        versions: SUPPORTED_VERSIONS.to_vec(),
        secret: secret.clone(),
        setup_token: token.clone(),
        name: config.name.clone(),
        services: services.borrow_and_update().to_vec(),
        capabilities: offered.clone(),
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
            frame = encode(&DeviceToHub::Register(bare.clone()));
            if frame.len() > adi_protocol::DEFAULT_MAX_FRAME_BYTES {
                // Nor the models of its OpenAI-compatible servers: they follow in a
                // service update, once the hub's limit is known.
                for s in &mut bare.services {
                    s.models.clear();
                }
                services.mark_changed();
                frame = encode(&DeviceToHub::Register(bare));
            }
        }
    }
    if let Err(e) = ws.send(Message::text(frame)).await {
        return lost(false, format!("sending registration failed: {e}"));
    }
    let registered = tokio::select! {
        _ = cancel.cancelled() => return SessionEnd::Cancelled,
        r = timeout(REGISTER_TIMEOUT, ws.next()) => r,
    };
    let registered = match registered {
        Err(_) => return lost(false, "no answer to registration"),
        Ok(None) => return lost(false, "hub closed before answering"),
        Ok(Some(Err(e))) => return lost(false, format!("reading registration answer: {e}")),
        Ok(Some(Ok(msg))) => match msg {
            Message::Text(t) => match decode::<HubToDevice>(t.as_bytes(), config.max_frame_bytes) {
                Ok(HubToDevice::Registered(r)) => r,
                Ok(HubToDevice::Error { code, message }) => {
                    return SessionEnd::Refused(code, message)
                }
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
                    return SessionEnd::NotAHub(format!(
                        "its WebSocket answered the registration with something that is \
                         not an adi message ({e})"
                    ))
                }
            },
            Message::Close(frame) => return lost(false, close_reason(frame.as_ref())),
            Message::Binary(_) => {
                return SessionEnd::NotAHub(
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
    info!(device_id = %registered.device_id, heartbeat_ms = registered.heartbeat_interval_ms, hub, "connected to hub");
    hubs.learn(&registered.hubs);
    state.send_replace(ConnState::Online {
        device_id: registered.device_id.clone(),
        hub: hub.to_owned(),
    });

    // Answers stay within the smaller of our limit and the hub's: the hub closes a link
    // that sends it a larger frame.
    let max_answer =
        adi_protocol::limits::announced(registered.max_frame_bytes).min(config.max_frame_bytes);
    Session::new(
        agent,
        ws,
        registered.device_id,
        heartbeat_every,
        max_answer,
        Views {
            capabilities,
            offered,
            services,
        },
    )
    .run(calls, cancel)
    .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One registered connection to the hub, as an actor: it owns the socket and all that
/// lives only as long as this connection (its answers queue, its body streams, the
/// requests it serves, the capability requests it sent) and has one handler for each
/// thing that can happen. Every handler returns `Some` when the session ends.
struct Session<'a> {
    agent: &'a Agent<'a>,
    ws: Ws,
    device_id: DeviceId,
    /// Largest frame the hub takes from this device.
    max_answer: usize,
    /// What an answer may carry, sized to fit `max_answer`.
    budget: usize,
    heartbeat_every: Duration,
    ticker: Interval,
    seq: u64,
    last_heard: Instant,
    /// Answers of this session only: when it ends, late answers have nowhere to go,
    /// so they can never reach a later connection that reuses request ids.
    answer_tx: mpsc::Sender<DeviceToHub>,
    answers: mpsc::Receiver<DeviceToHub>,
    /// Body streams of proxied requests, also per session, and their frames.
    streams: adi_mux::Streams,
    frames: mpsc::Receiver<bytes::Bytes>,
    _end_streams: EndStreams,
    /// What the hub asked of this session and is still being served, so that a cocoon
    /// asked to stop can finish it first.
    serving: TaskTracker,
    /// Set once the cocoon is asked to stop: how long it still waits for `serving`.
    draining: Option<Pin<Box<Sleep>>>,
    /// Capability requests this device sent, by the id it gave them. Dropped with the
    /// session, which tells every waiting caller that the link was lost.
    asked: HashMap<u64, oneshot::Sender<CapabilityOutcome>>,
    next_ask: u64,
    /// The services, shared (not copied) by every proxied request.
    services: Arc<[ServiceInfo]>,
    /// What the device offers and serves, as this session told the hub.
    views: Views,
    /// Whether this socket's frames have been meeting in its writes.
    pacing: Pacing,
    /// The answer made while reading the hub's frame, written next by this task itself:
    /// queued on `answers` instead, it would wake this task while it runs, and the
    /// runtime reschedules a task woken that way by waking another worker thread.
    answered: Option<DeviceToHub>,
}

/// A session's own views of what the device offers and serves, so that a change made
/// while it runs is sent exactly once.
struct Views {
    capabilities: watch::Receiver<Arc<CapabilitySet>>,
    /// The offers the hub was last sent: plugin manifests also declare servers, so a
    /// change of the set need not change them.
    offered: Vec<CapabilityOffer>,
    /// Marked changed at the start when the registration left the models out.
    services: watch::Receiver<Arc<[ServiceInfo]>>,
}

impl<'a> Session<'a> {
    fn new(
        agent: &'a Agent<'a>,
        ws: Ws,
        device_id: DeviceId,
        heartbeat_every: Duration,
        max_answer: usize,
        views: Views,
    ) -> Self {
        let mut ticker = interval(heartbeat_every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.reset();
        let (answer_tx, answers) = mpsc::channel(ANSWER_QUEUE);
        let (frame_tx, frames) = mpsc::channel(FRAME_QUEUE);
        let streams = adi_mux::Streams::new(frame_tx);
        let services = views.services.borrow().clone();
        Session {
            agent,
            ws,
            device_id,
            max_answer,
            budget: crate::requests::reply_budget(max_answer),
            heartbeat_every,
            ticker,
            seq: 0,
            last_heard: Instant::now(),
            answer_tx,
            answers,
            _end_streams: EndStreams(streams.clone()),
            streams,
            frames,
            serving: TaskTracker::new(),
            draining: None,
            asked: HashMap::new(),
            next_ask: 1,
            services,
            views,
            pacing: Pacing::default(),
            answered: None,
        }
    }

    /// Serves the connection until it ends; says how.
    async fn run(
        mut self,
        calls: &mut mpsc::Receiver<CapabilityCall>,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        loop {
            let ended = tokio::select! {
                biased;
                _ = cancel.cancelled(), if self.draining.is_none() => self.on_stop().await,
                // An async block, so the wait is built only once it is polled, not on
                // every turn of the loop.
                () = async { self.serving.wait().await }, if self.draining.is_some() => {
                    Some(self.on_served().await)
                }
                () = grace_end(&mut self.draining) => {
                    warn!(in_flight = self.serving.len(), "requests still in flight after the grace period; cutting them off");
                    Some(stop(&mut self.ws).await)
                }
                _ = self.ticker.tick() => self.on_tick().await,
                Some(frame) = self.frames.recv() => self.on_body_frame(frame).await,
                Some(answer) = self.answers.recv() => self.on_answer(answer).await,
                Ok(()) = self.views.capabilities.changed() => self.on_capabilities().await,
                Ok(()) = self.views.services.changed() => self.on_services().await,
                Some(call) = calls.recv() => self.on_call(call).await,
                frame = self.ws.next() => match self.on_frame(frame) {
                    None => match self.answered.take() {
                        Some(answer) => self.on_answer(answer).await,
                        None => None,
                    },
                    end => end,
                },
            };
            if let Some(outcome) = ended {
                return outcome;
            }
        }
    }

    /// The cocoon is asked to stop: with nothing in flight it closes now; else it tells
    /// the hub it is draining and finishes what it serves within its grace period.
    async fn on_stop(&mut self) -> Option<SessionEnd> {
        let grace = self.agent.config.shutdown_grace;
        let in_flight = self.serving.len();
        if in_flight == 0 || grace.is_zero() {
            return Some(stop(&mut self.ws).await);
        }
        info!(
            in_flight,
            ?grace,
            "stopping: finishing the requests in flight, taking no new ones"
        );
        let _ = self
            .ws
            .send(Message::text(encode(&DeviceToHub::Draining)))
            .await;
        self.serving.close();
        self.draining = Some(Box::pin(tokio::time::sleep(grace)));
        None
    }

    /// Every request a stopping cocoon served has ended, so all they had to say is
    /// queued: it leaves before the close, heads before the body frames that follow.
    async fn on_served(&mut self) -> SessionEnd {
        while let Ok(answer) = self.answers.try_recv() {
            let frame = self.fit(answer);
            let _ = self.ws.feed(frame).await;
        }
        while let Ok(frame) = self.frames.try_recv() {
            let _ = self.ws.feed(Message::Binary(frame)).await;
        }
        info!("requests in flight finished");
        stop(&mut self.ws).await
    }

    /// A heartbeat (with a ping, so a dead hub is noticed even though heartbeats are not
    /// acknowledged), unless the hub has been silent too long.
    async fn on_tick(&mut self) -> Option<SessionEnd> {
        self.asked.retain(|_, reply| !reply.is_closed());
        if self.last_heard.elapsed() > self.heartbeat_every * SILENT_INTERVALS {
            return Some(lost(true, "hub silent for 3 heartbeat intervals"));
        }
        self.seq += 1;
        let seq = self.seq;
        let services = self.agent.health.borrow().clone();
        let load = self.agent.load.borrow().clone();
        let mut hb = encode(&DeviceToHub::Heartbeat(Heartbeat {
            seq,
            services,
            load,
        }));
        if hb.len() > self.max_answer {
            // Liveness matters more than the figures: send it bare.
            warn!(bytes = hb.len(), max = self.max_answer, "the heartbeat's load and health figures do not fit in one frame; sending it without them");
            hb = encode(&DeviceToHub::Heartbeat(Heartbeat {
                seq,
                ..Heartbeat::default()
            }));
        }
        let sent = async {
            self.ws.feed(Message::text(hb)).await?;
            self.ws.feed(Message::Ping(Default::default())).await?;
            self.ws.flush().await
        };
        match sent.await {
            Ok(()) => None,
            Err(e) => Some(lost(true, format!("sending heartbeat failed: {e}"))),
        }
    }

    /// A body frame, with every other one ready, in one write.
    async fn on_body_frame(&mut self, first: bytes::Bytes) -> Option<SessionEnd> {
        let failed = |e: tokio_tungstenite::tungstenite::Error| {
            Some(lost(true, format!("sending a body frame failed: {e}")))
        };
        if let Err(e) = self.ws.feed(Message::Binary(first)).await {
            return failed(e);
        }
        let mut batch = self.pacing.start();
        let mut ran_dry = false;
        while batch.more(ran_dry).await {
            ran_dry = match self.frames.try_recv() {
                Ok(frame) => {
                    if let Err(e) = self.ws.feed(Message::Binary(frame)).await {
                        return failed(e);
                    }
                    batch.fed();
                    false
                }
                Err(_) => true,
            };
        }
        self.pacing.finished(&batch);
        self.ws.flush().await.err().and_then(failed)
    }

    /// An answer, with every other one ready, in one write.
    async fn on_answer(&mut self, first: DeviceToHub) -> Option<SessionEnd> {
        let frame = self.fit(first);
        let failed = |e: tokio_tungstenite::tungstenite::Error| {
            Some(lost(true, format!("sending an answer failed: {e}")))
        };
        if let Err(e) = self.ws.feed(frame).await {
            return failed(e);
        }
        let mut batch = self.pacing.start();
        let mut ran_dry = false;
        while batch.more(ran_dry).await {
            ran_dry = match self.answers.try_recv() {
                Ok(answer) => {
                    let frame = self.fit(answer);
                    if let Err(e) = self.ws.feed(frame).await {
                        return failed(e);
                    }
                    batch.fed();
                    false
                }
                Err(_) => true,
            };
        }
        self.pacing.finished(&batch);
        self.ws.flush().await.err().and_then(failed)
    }

    /// The device's plugins changed what it offers: the hub hears the new list, unless
    /// it is too large for one frame (then the hub keeps the last one it got).
    async fn on_capabilities(&mut self) -> Option<SessionEnd> {
        let offers = self.views.capabilities.borrow_and_update().offers();
        if offers == self.views.offered {
            return None;
        }
        self.views.offered.clone_from(&offers);
        let update = encode(&DeviceToHub::CapabilitiesUpdate {
            capabilities: offers,
        });
        if update.len() > self.max_answer {
            warn!(bytes = update.len(), max = self.max_answer, "the plugins offer more capabilities than fit in one frame to the hub; the hub keeps the last list it got until fewer are installed");
            return None;
        }
        self.ws
            .send(Message::text(update))
            .await
            .err()
            .map(|e| lost(true, format!("sending capabilities failed: {e}")))
    }

    /// The device's services changed (a server's models, a manifest's servers): proxied
    /// requests see the new list at once, and the hub hears it whole, unless it is too
    /// large for one frame (then the hub keeps the last one it got).
    async fn on_services(&mut self) -> Option<SessionEnd> {
        let services = self.views.services.borrow_and_update().clone();
        self.services = services.clone();
        let update = encode(&DeviceToHub::ServiceRegister {
            services: services.to_vec(),
        });
        if update.len() > self.max_answer {
            warn!(bytes = update.len(), max = self.max_answer, "the services and their models do not fit in one frame to the hub; the hub keeps the last list it got until they do");
            return None;
        }
        self.ws
            .send(Message::text(update))
            .await
            .err()
            .map(|e| lost(true, format!("sending services failed: {e}")))
    }

    /// A program on this device asks for a capability through the hub.
    async fn on_call(&mut self, call: CapabilityCall) -> Option<SessionEnd> {
        if call.reply.is_closed() {
            return None;
        }
        let request_id = self.next_ask;
        self.next_ask += 1;
        let frame = encode(&DeviceToHub::CapabilityRequest {
            request_id,
            capability: call.query,
            payload: call.payload,
            prefer_device: call.prefer,
            deadline_ms: u64::try_from(call.deadline.as_millis()).unwrap_or(u64::MAX),
        });
        if frame.len() > self.max_answer {
            let _ = call.reply.send(CapabilityOutcome::Error(RemoteError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the request is {} bytes; at most {} fit in one frame",
                    frame.len(),
                    self.max_answer
                ),
            )));
            return None;
        }
        self.asked.insert(request_id, call.reply);
        self.ws
            .send(Message::text(frame))
            .await
            .err()
            .map(|e| lost(true, format!("sending a capability request failed: {e}")))
    }

    /// Whatever the hub sent.
    fn on_frame(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<SessionEnd> {
        self.last_heard = Instant::now();
        match frame {
            None => Some(lost(true, "hub closed the connection")),
            Some(Err(e)) => Some(lost(true, format!("connection failed: {e}"))),
            Some(Ok(Message::Close(frame))) => Some(lost(true, close_reason(frame.as_ref()))),
            Some(Ok(Message::Text(t))) => self.on_message(t.as_str()),
            Some(Ok(Message::Binary(b))) => {
                self.on_binary(b);
                None
            }
            Some(Ok(_)) => None,
        }
    }

    /// A control message from the hub.
    fn on_message(&mut self, text: &str) -> Option<SessionEnd> {
        match adi_protocol::decode_hub_frame(text, self.agent.config.max_frame_bytes) {
            // Another agent holds this device's secret and took its place, or an owner
            // removed the device: reconnecting would only take it back, or be refused,
            // forever.
            Ok(HubToDevice::Error {
                code: code @ (ErrorCode::DuplicateAgent | ErrorCode::DeviceRemoved),
                message,
            }) => return Some(SessionEnd::Refused(code, message)),
            Ok(HubToDevice::Error { code, message }) => {
                warn!(%code, "hub reported an error: {message}")
            }
            Ok(HubToDevice::Registered(_)) => warn!("unexpected second registration answer"),
            // Opened now, before reading on: its body frames follow.
            Ok(HubToDevice::ProxyRequest(request)) => self.serve_proxy(request),
            Ok(HubToDevice::CapabilityResponse {
                request_id,
                outcome,
            }) => {
                if let Some(reply) = self.asked.remove(&request_id) {
                    let _ = reply.send(outcome);
                }
            }
            Ok(HubToDevice::Request {
                request_id,
                request:
                    DeviceRequest::Capability {
                        capability,
                        payload,
                    },
                deadline_ms,
            }) => self.serve_capability(request_id, capability, payload, deadline_ms),
            Ok(HubToDevice::Request {
                request_id,
                request,
                ..
            }) => self.serve_request(request_id, request),
            Err(e) => warn!("undecodable frame from hub: {e}"),
        }
        None
    }

    /// A binary frame from the hub: a body frame of a stream, or a bodiless proxied
    /// request's head, whole.
    fn on_binary(&mut self, bytes: bytes::Bytes) {
        match adi_protocol::frame::decode(bytes) {
            Ok(frame) if frame.kind == adi_protocol::frame::Kind::Whole => {
                match adi_protocol::exchange::read_request(&frame) {
                    Ok(request) => self.serve_proxy(request),
                    Err(e) => warn!("{e}"),
                }
            }
            Ok(frame) => self.streams.on_frame(frame),
            Err(e) => warn!("bad body frame from hub: {e}"),
        }
    }

    /// Opens the request's stream and serves it on a task of its own.
    fn serve_proxy(&self, request: ProxyRequest) {
        let (body_in, body_out) = self.streams.open(request.stream_id);
        let tx = self.answer_tx.clone();
        let client = self.agent.http.clone();
        let services = self.services.clone();
        self.serving.spawn(async move {
            // Boxed, so the task's own future is a few pointers: spawning it and
            // retiring it copy those, not the whole exchange's state.
            Box::pin(crate::proxy::serve(
                client, &services, request, body_in, body_out, tx,
            ))
            .await;
        });
    }

    /// Serves a capability this device offers, on a task of its own.
    fn serve_capability(
        &self,
        request_id: u64,
        capability: adi_protocol::CapabilityQuery,
        payload: adi_protocol::Payload,
        deadline_ms: u64,
    ) {
        let server = self.agent.server.clone();
        let device_id = self.device_id.clone();
        let tx = self.answer_tx.clone();
        self.serving.spawn(async move {
            let deadline = Duration::from_millis(deadline_ms);
            let outcome = match server
                .serve(&device_id, &capability, payload, deadline)
                .await
            {
                Ok(payload) => Outcome::Ok(adi_protocol::DeviceReply::Capability { payload }),
                Err(e) => Outcome::Error(e),
            };
            let _ = tx
                .send(DeviceToHub::Response {
                    request_id,
                    outcome,
                })
                .await;
        });
    }

    /// Answers a request about this device's tasks, on a task of its own. A lookup or
    /// a page of tasks is first tried here: the task store reads a short one on the
    /// calling thread (tens of microseconds), and when it did, the session writes the
    /// answer next, without a task to start and wake. Anything that has to wait goes
    /// on in its own task from where it stopped.
    fn serve_request(&mut self, request_id: u64, request: DeviceRequest) {
        let runner = self.agent.runner.clone();
        let device_id = self.device_id.clone();
        let budget = self.budget;
        let quick = matches!(
            request,
            DeviceRequest::ListTasks { .. } | DeviceRequest::GetTask { .. }
        );
        let mut answer =
            Box::pin(
                async move { crate::requests::handle(&runner, &device_id, request, budget).await },
            );
        let tx = self.answer_tx.clone();
        if quick {
            if let Some(outcome) = (&mut answer).now_or_never() {
                let response = DeviceToHub::Response {
                    request_id,
                    outcome,
                };
                // One frame asks one thing, and the session takes the answer as soon as
                // the frame is handled.
                debug_assert!(self.answered.is_none(), "two answers from one frame");
                self.answered = Some(response);
                return;
            }
        }
        self.serving.spawn(async move {
            let outcome = answer.await;
            let _ = tx
                .send(DeviceToHub::Response {
                    request_id,
                    outcome,
                })
                .await;
        });
    }

    /// The frame for a message, held to the hub's frame limit: what a user or a
    /// service made too large is replaced by an error for that request alone
    /// (`adi_protocol::limits`).
    fn fit(&self, msg: DeviceToHub) -> Message {
        let (frame, replaced) = adi_protocol::limits::fit(msg, self.max_answer);
        if let Some(bytes) = replaced {
            warn!(bytes, max = self.max_answer, "a message too large for one frame to the hub was replaced by an error for its request");
        }
        Message::text(frame)
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

fn lost(registered: bool, reason: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost {
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
async fn stop<S>(ws: &mut S) -> SessionEnd
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
    SessionEnd::Cancelled
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

    fn roots() -> crate::trust::Trust {
        crate::trust::Trust::new(None).expect("the public roots")
    }
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    use tokio_tungstenite::tungstenite::http::Response;

    fn answered(status: u16) -> SessionEnd {
        let response = Response::builder()
            .status(status)
            .body(Some(b"<html>\n  Not here\n</html>".to_vec()))
            .expect("response");
        connect_failed(
            "ws://hub/ws/cocoon",
            &roots(),
            Error::Http(Box::new(response)),
        )
    }

    /// Stopping for good on a hub that is only busy or restarting would strand a
    /// device: only answers no adi hub gives stop it.
    #[test]
    fn busy_or_restarting_hubs_are_retried_and_other_answers_are_not_a_hub() {
        for status in [408, 429, 502, 503, 504] {
            assert!(
                matches!(
                    answered(status),
                    SessionEnd::Lost {
                        registered: false,
                        ..
                    }
                ),
                "{status}"
            );
        }
        for status in [200, 400, 404, 426, 500, 501] {
            match answered(status) {
                SessionEnd::NotAHub(what) => {
                    assert!(what.contains(&status.to_string()), "{what}");
                    assert!(what.ends_with(": Not here"), "{what}");
                }
                _ => panic!("{status} taken for a hub"),
            }
        }
        let cut_short = Error::Protocol(ProtocolError::HandshakeIncomplete);
        assert!(matches!(
            connect_failed("ws://hub/ws/cocoon", &roots(), cut_short),
            SessionEnd::Lost { .. }
        ));
        let garbage = Error::Protocol(ProtocolError::WrongHttpVersion);
        assert!(matches!(
            connect_failed("ws://hub/ws/cocoon", &roots(), garbage),
            SessionEnd::NotAHub(_)
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
