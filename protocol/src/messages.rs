//! Control messages, named by direction. Every message is one JSON text frame with a
//! `type` tag in snake_case; fields a side does not know are ignored.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, DeviceSecret, ErrorCode};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every protocol version this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// Picks the newest version both sides speak, or `None` when they share none.
pub fn negotiate_version(theirs: &[u32]) -> Option<u32> {
    SUPPORTED_VERSIONS
        .iter()
        .rev()
        .find(|v| theirs.contains(v))
        .copied()
}

/// A service a device runs on its own loopback and offers through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Name used in proxy URLs; unique per device.
    pub name: String,
    /// Loopback port the service listens on.
    pub port: u16,
    /// Path the cocoon probes for health, if the service has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
}

/// First frame on a cocoon connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Every protocol version the cocoon speaks.
    pub versions: Vec<u32>,
    /// The device's long-lived credential.
    pub secret: DeviceSecret,
    /// One-time setup token, needed only the first time a secret is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_token: Option<String>,
    /// Human name of the device.
    pub name: String,
    /// Services on the device's loopback.
    #[serde(default)]
    pub services: Vec<ServiceInfo>,
    /// Capabilities as `protocol:version` strings.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Version of the agent build, for the operator's eyes.
    #[serde(default)]
    pub agent_version: String,
}

/// Liveness and load report, sent every heartbeat interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Monotonic counter, so the hub can tell a stuck sender from a slow link.
    #[serde(default)]
    pub seq: u64,
}

/// Answer to a successful [`Register`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The id the hub knows this device by.
    pub device_id: DeviceId,
    /// The version both sides now speak.
    pub protocol_version: u32,
    /// How often the hub expects a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Whether this registration enrolled the device just now.
    #[serde(default)]
    pub enrolled: bool,
}

/// Messages a cocoon sends to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceToHub {
    /// First frame: identity, version offer and what the device serves.
    Register(Register),
    /// Periodic liveness.
    Heartbeat(Heartbeat),
    /// The device's services changed.
    ServiceRegister {
        /// The full new list.
        services: Vec<ServiceInfo>,
    },
}

/// Messages the hub sends to a cocoon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubToDevice {
    /// Registration accepted.
    Registered(Registered),
    /// Something the device sent was refused.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail; never contains secrets.
        message: String,
    },
}
