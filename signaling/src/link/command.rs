//! What a device's connection carries from the rest of the hub to its actor: the
//! commands, each request's answer channel, and why a request got no answer. It owns
//! these types only; it never routes, never touches a socket and never reads the
//! registry, so everything that asks devices things can depend on it, and it on nothing
//! of theirs.

use std::time::Duration;

use adi_mux::{BodyReceiver, BodySender};
use adi_protocol::{DeviceReply, DeviceRequest, ErrorCode, ProxyRequest, RemoteError};
use tokio::sync::oneshot;

use super::AskSlot;

/// What callers hand to a connection actor. Boxed, so a queued command takes two
/// words: most devices are idle most of the time, and a busy one queues a few dozen.
#[derive(Debug)]
pub enum Command {
    /// Ask the device something and wait for one answer.
    Request(Box<Call>),
    /// Open a proxied HTTP exchange with a body stream each way.
    Proxy(Box<ProxyCall>),
    /// Send this message as it is: the answer to something the device asked.
    Send(Box<Answer>),
    /// The ending of a capability request the device asked, from whichever device
    /// served it; written unless the request already ended (its deadline passed).
    Ended(Box<Ended>),
}

impl Command {
    /// Whether this asks the device something: those are bounded by the queue, while
    /// answers to the device's own requests are bounded by how many it may open.
    pub fn is_request(&self) -> bool {
        matches!(self, Command::Request(_) | Command::Proxy(_))
    }
}

/// How a capability request the device asked ended, on its way back to the device.
#[derive(Debug)]
pub struct Ended {
    /// The device's id for the request.
    pub request_id: u64,
    /// The hub's own number for that request, so an ending that arrives after its
    /// request timed out is not taken for a later request that reused the id.
    pub ask: u64,
    /// The answer, or why there is none.
    pub outcome: adi_protocol::CapabilityOutcome,
}

/// A message for the device that answers something it asked.
#[derive(Debug)]
pub struct Answer {
    /// The message, sent as it is.
    pub msg: adi_protocol::HubToDevice,
    /// The device's request slot, freed once the answer is written.
    pub slot: Option<AskSlot>,
}

/// An HTTP request for one of the device's services.
#[derive(Debug)]
pub struct ProxyCall {
    /// The request head; the actor fills in the stream id.
    pub request: ProxyRequest,
    /// Where the opened exchange goes, or why it could not open (its head does not
    /// fit in a frame the device accepts, the device has too many open).
    pub reply: oneshot::Sender<Result<ProxyOpened, RpcError>>,
}

/// A proxied exchange in flight: send the request body, await the head, read the body.
pub struct ProxyOpened {
    /// Request body to the device.
    pub request_body: BodySender,
    /// Response body from the device.
    pub response_body: BodyReceiver,
    /// The response head, or why there is none.
    pub head: oneshot::Receiver<Result<ResponseHead, RpcError>>,
}

impl std::fmt::Debug for ProxyOpened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyOpened")
            .field("stream", &self.request_body.id())
            .finish()
    }
}

/// Status and headers of a proxied response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// The whole body, when it came with the head; otherwise it follows on the stream.
    pub body: Option<bytes::Bytes>,
}

/// A request handed to a connection actor.
#[derive(Debug)]
pub struct Call {
    /// What to ask.
    pub request: DeviceRequest,
    /// How long the caller waits (told to the device).
    pub deadline: Duration,
    /// Where the answer goes.
    pub reply: ReplyTo,
}

/// Where a device's answer to a [`Call`] goes.
#[derive(Debug)]
pub enum ReplyTo {
    /// A caller waiting in the hub, which keeps its own deadline.
    Waiter(oneshot::Sender<Result<DeviceReply, RpcError>>),
    /// A routed capability request, which ends itself: it goes back to whoever asked,
    /// or on to the next device once.
    Routed(Routed),
}

impl ReplyTo {
    /// Hands the device's answer, or why there is none, to whoever waits for it.
    pub fn end(self, answer: Result<DeviceReply, RpcError>) {
        match self {
            ReplyTo::Waiter(tx) => {
                let _ = tx.send(answer);
            }
            ReplyTo::Routed(routed) => routed.end(answer),
        }
    }

    /// Whether nobody waits for the answer any more.
    pub fn is_closed(&self) -> bool {
        match self {
            ReplyTo::Waiter(tx) => tx.is_closed(),
            ReplyTo::Routed(routed) => routed.is_abandoned(),
        }
    }
}

/// Why a device request got no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RpcError {
    /// The device is not connected.
    #[error("the device is offline")]
    Offline,
    /// The device's queue is full; it is not keeping up.
    #[error("the device is too busy to take the request")]
    Busy,
    /// No answer within the deadline.
    #[error("the device did not answer within {0:?}")]
    Timeout(Duration),
    /// The device disconnected before answering.
    #[error("the device disconnected before answering")]
    Disconnected,
    /// The device answered with an error.
    #[error("{}", .0.message)]
    Remote(RemoteError),
}

impl RpcError {
    /// The shared error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            RpcError::Offline | RpcError::Disconnected => ErrorCode::DeviceOffline,
            RpcError::Busy => ErrorCode::UpstreamError,
            RpcError::Timeout(_) => ErrorCode::Timeout,
            RpcError::Remote(e) => e.code,
        }
    }
}

/// Where a routed request's answer goes instead of a waiting caller: back to whoever
/// asked, or on to the next device. Routing implements it; the connection only ends it.
pub trait Ending: Send + 'static {
    /// Takes the device's answer, or why there is none.
    fn end(self: Box<Self>, answer: Result<DeviceReply, RpcError>);
    /// Whether whoever asked has stopped waiting.
    fn is_abandoned(&self) -> bool;
}

/// A routed request's ending, ended exactly once: by the device's answer, with its
/// error, or, dropped unanswered (the device's connection ended, or its queue was
/// dropped), as if the device disconnected.
pub struct Routed(Option<Box<dyn Ending>>);

impl Routed {
    /// Wraps an ending, which is now sure to be ended once.
    pub fn new(ending: Box<dyn Ending>) -> Self {
        Routed(Some(ending))
    }

    /// Ends the request with the device's answer, or why there is none.
    pub fn end(mut self, answer: Result<DeviceReply, RpcError>) {
        if let Some(ending) = self.0.take() {
            ending.end(answer);
        }
    }

    /// Whether whoever asked has stopped waiting.
    pub fn is_abandoned(&self) -> bool {
        self.0.as_ref().is_none_or(|e| e.is_abandoned())
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        if let Some(ending) = self.0.take() {
            ending.end(Err(RpcError::Disconnected));
        }
    }
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Routed")
    }
}
