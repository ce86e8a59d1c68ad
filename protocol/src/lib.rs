//! Wire types shared by the hub (`signaling`), the device agent (`cocoon`) and clients.
//!
//! This crate owns the shape of every message and the codec that turns frames into them.
//! It must never do I/O: no sockets, no tokio, no files.
//!
//! # Protocol flow (one WebSocket per cocoon, `GET /ws/cocoon`)
//!
//! 1. The cocoon connects and sends [`DeviceToHub::Register`] as its first text frame,
//!    listing every protocol version it speaks, its device secret and, on first run only,
//!    a one-time setup token.
//! 2. The hub picks the highest version both sides speak, derives the device id from the
//!    secret (HMAC-SHA256 under a hub key), enrols the device if a token was given, and
//!    answers [`HubToDevice::Registered`] with the device id, the chosen version, the
//!    heartbeat interval and the other hubs of its cluster, where the device goes when it
//!    loses this one. Any failure is answered with [`HubToDevice::Error`] and a close
//!    frame whose reason names the error code.
//! 3. The cocoon sends [`DeviceToHub::Heartbeat`] every interval. The hub keeps heartbeat
//!    state in RAM only and closes a connection that stays silent for three intervals.
//! 4. The hub asks things of the device with [`HubToDevice::Request`] (an id, a deadline
//!    and a [`DeviceRequest`]); the device answers each with exactly one
//!    [`DeviceToHub::Response`] carrying the same id. Requests are handled concurrently
//!    on the device, so a slow one never delays a heartbeat or another answer. A page
//!    (of tasks, of log lines) holds what fits in one frame, which may be fewer items
//!    than asked: its `next` (or `more`) says where to go on.
//! 5. Either side may ask for a capability: the device with
//!    [`DeviceToHub::CapabilityRequest`] (answered by one [`HubToDevice::CapabilityResponse`]),
//!    the hub, on behalf of a user or another device, with a [`DeviceRequest::Capability`]
//!    request. The device reports what it serves in [`Register`] and, when its plugins
//!    change, in [`DeviceToHub::CapabilitiesUpdate`].
//! 6. A frame that does not decode is answered with [`HubToDevice::Error`] (`bad_request`);
//!    the connection stays up. An oversized frame closes the connection with code 1009:
//!    each side announces its limit and the sender checks every message against the
//!    peer's limit before sending (the rule and its table are in [`limits`]), so only a
//!    broken peer ever sends one.
//!
//! Control messages are JSON text frames tagged by `type`; unknown fields are ignored so
//! either side can grow, unknown types are errors.
//!
//! # Layout, one job each
//! - `messages`: the control messages by direction, and what they carry.
//! - `codec`: bytes in, a message or a descriptive error out; `fast`: the same for the
//!   frames of the hot paths, read in one pass, held to the general path's answers.
//! - [`frame`]: the binary frames' layout (body chunks by stream) and their codec.
//! - [`exchange`]: a proxied exchange's heads, whole or as messages, in one place.
//! - [`limits`]: the size rule of the link, who checks what before sending.
//! - `error`: the closed set of error codes and their HTTP statuses.
//! - `ids`: device and user ids, device secrets.
//! - [`capability`]: capability names, versions and matching.
//! - [`tasks`]: tasks, their filters, pages and logs.
//! - [`client`]: the messages of a person's client socket.
//! - [`views`]: what the REST API answers, as clients read it.
//! - [`http`]: the HTTP rules every proxy path applies (hop-by-hop headers, paths).
//! - `payload`: a capability's JSON payload, kept as raw text.

pub mod access;
pub mod capability;
pub mod client;
pub mod cluster;
mod codec;
mod error;
pub mod exchange;
mod fast;
pub mod frame;
pub mod http;
mod ids;
pub mod limits;
mod messages;
mod payload;
pub mod tasks;
pub mod views;

pub use access::{Role, Scope};
pub use capability::{CapabilityOffer, CapabilityQuery};
pub use codec::{decode, encode, DecodeError, DEFAULT_MAX_FRAME_BYTES};
pub use error::ErrorCode;
pub use fast::{decode_device_frame, decode_hub_frame};
pub use ids::{DeviceId, DeviceSecret, InvalidId, SecretError, UserId, MIN_SECRET_LEN};
pub use messages::{
    negotiate_version, CapabilityAnswer, CapabilityOutcome, DeviceReply, DeviceRequest,
    DeviceToHub, GpuModel, GpuReport, Hardware, HealthStatus, Heartbeat, HubToDevice, LoadReport,
    Outcome, ProxyHead, ProxyRequest, Register, Registered, RemoteError, ServiceHealth,
    ServiceInfo, ServiceKind, MAX_MODELS, MAX_MODEL_NAME, PROTOCOL_VERSION, SUPPORTED_VERSIONS,
    TCP_UPGRADE,
};
pub use payload::Payload;
