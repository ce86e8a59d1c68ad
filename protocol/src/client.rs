//! Messages between the hub and a person's client (web UI, CLI) on `GET /ws/client`.
//!
//! 1. The client sends [`ClientToHub::Auth`] with its JWT as the first frame; the hub
//!    answers [`HubToClient::Authenticated`] or an error and a close.
//! 2. [`ClientToHub::AggregateQuery`] fans a task query out to the client's devices; the
//!    hub streams one [`HubToClient::AggregateQueryPart`] per device as each answers (or
//!    times out, or is offline), then one [`HubToClient::AggregateQueryDone`] with the
//!    merged order's next cursor. A UI can show the first device's tasks before the
//!    slowest one replies.

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
