//! Messages between the hub and a person's client (web UI, CLI) on `GET /ws/client`.
//!
//! 1. The client sends [`ClientToHub::Auth`] with its JWT as the first frame; the hub
//!    answers [`HubToClient::Authenticated`] or an error and a close.
//! 2. [`ClientToHub::AggregateQuery`] fans a task query out to the client's devices; the
//!    hub first names every device it asks ([`HubToClient::AggregateQueryStarted`]), then
//!    streams one [`HubToClient::AggregateQueryPart`] per device as each answers (or
//!    times out, or is offline), then one [`HubToClient::AggregateQueryDone`] with the
//!    merged order's next cursor. A UI can show the first device's tasks before the
//!    slowest one replies, and name the devices it still waits for.
//! 3. [`ClientToHub::WatchDevices`] asks for the state of the client's devices as it
//!    changes: the hub answers [`HubToClient::Devices`] with all of them (`full`), then,
//!    about once a second, with those whose state or load changed, and with all of them
//!    again whenever the list itself changes (a device added, deleted or renamed, or
//!    its members changed).

use serde::{Deserialize, Serialize};

use crate::tasks::{Task, TaskFilter};
use crate::{DeviceId, ErrorCode};

/// How one device's part of a fan-out went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartStatus {
    /// Answered.
    Ok,
    /// No answer within the deadline.
    Timeout,
    /// Not connected (or disconnected mid-query).
    Offline,
    /// Answered with an error.
    Error,
}

/// One device's part of a fan-out, as reported to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// How its part went.
    pub status: PartStatus,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A device named in a message: its id and its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRef {
    /// The device.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
}

/// What a watching client is told of a device: enough to draw it on a map and see
/// whether it is busy, without its configuration (which `GET /api/cocoons` has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceLive {
    /// The device.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// `online`, `offline`, or `stopping` while it finishes its requests.
    pub status: String,
    /// Seconds since its last heartbeat, while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_age_secs: Option<f64>,
    /// Its latest load report, while online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<crate::LoadReport>,
    /// The hub it is connected to, by the URL `GET /api/hubs` lists it under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Its services' health as it last probed them, while online.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<crate::ServiceHealth>,
}

impl DeviceLive {
    /// Whether `other` tells a client anything new: the age of the last heartbeat
    /// alone is not news, or every device would change every second.
    pub fn same_as(&self, other: &DeviceLive) -> bool {
        self.device_id == other.device_id
            && self.name == other.name
            && self.status == other.status
            && self.load == other.load
            && self.services == other.services
            && self.hub == other.hub
    }
}

/// Messages a client sends to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientToHub {
    /// First frame: who the client is.
    Auth {
        /// A JWT from `POST /api/auth/token`.
        token: String,
    },
    /// Fan a task listing out to every device of the caller.
    AggregateQuery {
        /// Chosen by the client; echoed on every part.
        query_id: String,
        /// Which tasks.
        #[serde(default)]
        filter: TaskFilter,
        /// Page size (default 50, at most 500).
        #[serde(default)]
        limit: Option<u32>,
        /// `next_cursor` of a previous page.
        #[serde(default)]
        cursor: Option<String>,
        /// Per-device deadline in milliseconds (default 5000).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Send the state of every device of the caller, then its changes as they happen.
    WatchDevices,
}

/// Messages the hub sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubToClient {
    /// The JWT was accepted.
    Authenticated {
        /// The user's name.
        user: String,
    },
    /// The query went out: the devices it waits for, before any has answered.
    AggregateQueryStarted {
        /// The query.
        query_id: String,
        /// Every device asked (online, keeping tasks), none answered yet.
        waiting: Vec<DeviceRef>,
        /// How long each may take, in milliseconds, before it counts as timed out.
        timeout_ms: u64,
    },
    /// One device's part of an aggregate query, as soon as it is known.
    AggregateQueryPart {
        /// The query.
        query_id: String,
        /// The device and how its part went.
        device: DeviceStatus,
        /// Its tasks (empty unless `device.status` is ok), newest first.
        tasks: Vec<Task>,
    },
    /// Every device has answered or timed out.
    AggregateQueryDone {
        /// The query.
        query_id: String,
        /// Every device and how its part went.
        devices: Vec<DeviceStatus>,
        /// The merged first page (what the REST edge would answer).
        tasks: Vec<Task>,
        /// Cursor for the next page of the merged order.
        next_cursor: Option<String>,
    },
    /// Devices' live state, for a client that watches them.
    Devices {
        /// Every device of the caller (what is not listed is gone); otherwise only
        /// those that changed since the last frame.
        full: bool,
        /// The devices.
        devices: Vec<DeviceLive>,
    },
    /// A request was refused.
    Error {
        /// The query, when the error belongs to one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        query_id: Option<String>,
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}
