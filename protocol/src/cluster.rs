//! What the hubs of a cluster tell each other, as JSON: over NATS, each hub's beat and
//! the changes among its devices; over HTTP, a device request one hub carries for
//! another. Every message names the hub it comes from; a hub ignores its own. They are
//! decoded from the network, so decoding never panics, and a message that does not
//! decode is dropped with a warning.

use serde::{Deserialize, Serialize};

use crate::{CapabilityOffer, DeviceId, LoadReport, ServiceHealth, ServiceInfo, UserId};

/// Largest presence message a hub sends: under NATS' default payload limit (1 MiB),
/// with room for a device of many services.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// A hub's sign of life, once a second: who it is, where it is reached, how busy it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    /// The hub (a random id per process).
    pub hub: uuid::Uuid,
    /// Its base URL, for other hubs and for devices.
    pub url: String,
    /// Devices connected to it.
    pub devices: u32,
    /// Requests it is serving now (proxied, capability, device asks).
    pub in_flight: u32,
    /// When it started, Unix seconds.
    pub started_at: i64,
    /// It is stopping: devices move off it, and nothing new is sent to it.
    #[serde(default)]
    pub draining: bool,
    /// It has stopped: forget it and its devices now.
    #[serde(default)]
    pub leaving: bool,
    /// The sequence number of its last presence message, so a hub that missed the
    /// last one notices.
    pub seq: u64,
}

/// Changes in a hub's devices since its previous presence message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// The hub whose devices these are.
    pub hub: uuid::Uuid,
    /// One more than the previous message's; a gap means a message was lost.
    pub seq: u64,
    /// The hub's whole list follows (in this and the next messages): forget what it
    /// said before.
    #[serde(default)]
    pub reset: bool,
    /// Devices connected now, or whose description changed.
    #[serde(default)]
    pub up: Vec<Device>,
    /// Devices no longer connected to the hub.
    #[serde(default)]
    pub down: Vec<DeviceId>,
    /// Devices whose load changed noticeably.
    #[serde(default)]
    pub load: Vec<Load>,
}

/// A connected device as other hubs need it: to list it, to check who may use it, and
/// to route to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// When its connection registered, Unix ms: the newer of two connections wins.
    pub since: i64,
    /// Its registered name.
    pub name: String,
    /// Who may use it.
    pub members: Vec<UserId>,
    /// Whom it acts for.
    pub owners: Vec<UserId>,
    /// What it serves.
    #[serde(default)]
    pub capabilities: Vec<CapabilityOffer>,
    /// Its loopback services.
    #[serde(default)]
    pub services: Vec<ServiceInfo>,
    /// Their health, as last reported.
    #[serde(default)]
    pub health: Vec<ServiceHealth>,
    /// Heard from within the online window.
    pub online: bool,
    /// Stopping: nothing new is sent to it.
    #[serde(default)]
    pub draining: bool,
    /// Its load, as last reported.
    #[serde(default)]
    pub load: Option<LoadReport>,
    /// The agent process holding the connection (its own random id, digested), so a
    /// second agent with the device's secret is told apart from the same agent moving.
    #[serde(default)]
    pub agent: Option<u64>,
}

/// A device's new load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// The device.
    pub id: DeviceId,
    /// Its load.
    pub load: LoadReport,
}

/// A device request one hub asks another to carry to a device connected there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rpc {
    /// The device.
    pub device: DeviceId,
    /// How long the asking hub waits, in ms.
    pub deadline_ms: u64,
    /// What to ask.
    pub request: crate::DeviceRequest,
}

/// The answer to an [`Rpc`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcAnswer {
    /// The device answered.
    Ok(crate::DeviceReply),
    /// The device is not connected to the hub asked.
    Offline,
    /// The device's queue is full.
    Busy,
    /// The device did not answer within this many ms.
    Timeout(u64),
    /// The device disconnected before answering.
    Disconnected,
    /// The device answered with an error.
    Remote(crate::RemoteError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_other_hubs_decode_and_keep_their_meaning() {
        let presence = r#"{"hub":"2f1c6a5e-3b0e-4a57-9c1e-0d6c9a3b7f10","seq":8,"reset":true,
            "up":[{"id":"00112233445566778899aabbccddeeff","since":1796638990123,"name":"gpu-box",
            "members":["6c0b6f4e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"],"owners":[],
            "capabilities":[{"protocol":"embeddings","version":"1.2.0","idempotent":true}],
            "online":true}],"down":["ffeeddccbbaa99887766554433221100"]}"#;
        let p: Presence = serde_json::from_str(presence).expect("presence");
        assert!(p.reset);
        assert_eq!(p.up[0].name, "gpu-box");
        assert!(p.up[0].capabilities[0].idempotent);
        assert!(p.up[0].load.is_none() && p.up[0].agent.is_none() && !p.up[0].draining);
        assert_eq!(p.down.len(), 1);
        let again: Presence =
            serde_json::from_slice(&serde_json::to_vec(&p).expect("encodes")).expect("decodes");
        assert_eq!(again, p);

        let rpc: Rpc = serde_json::from_str(
            r#"{"device":"00112233445566778899aabbccddeeff","deadline_ms":5000,"request":{"op":"task_stats"}}"#,
        )
        .expect("rpc");
        assert_eq!(rpc.request, crate::DeviceRequest::TaskStats);
        let answer: RpcAnswer = serde_json::from_str(r#"{"timeout":5000}"#).expect("answer");
        assert_eq!(answer, RpcAnswer::Timeout(5000));
        // A beat without the sequence number is refused, not read as zero.
        assert!(serde_json::from_str::<Beat>(
            r#"{"hub":"2f1c6a5e-3b0e-4a57-9c1e-0d6c9a3b7f10","url":"x","devices":1,"in_flight":0,"started_at":1}"#
        )
        .is_err());
    }
}
