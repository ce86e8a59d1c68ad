//! Control messages, named by direction. Every message is one JSON text frame with a
//! `type` tag in snake_case; fields a side does not know are ignored.

use serde::{Deserialize, Serialize};

use crate::capability::{CapabilityOffer, CapabilityQuery};
use crate::tasks::{
    LogLine, NewTask, Position, Task, TaskFilter, TaskId, TaskPage, TaskStats, TaskStatus,
};
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Name used in proxy URLs; unique per device.
    pub name: String,
    /// Loopback port the service listens on.
    pub port: u16,
    /// Path the cocoon probes for health, if the service has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// What it speaks; plain HTTP unless said.
    #[serde(default, skip_serializing_if = "ServiceKind::is_http")]
    pub kind: ServiceKind,
    /// For an OpenAI-compatible server, the models it serves, as its `GET /v1/models`
    /// listed them (at most [`MAX_MODELS`], each at most [`MAX_MODEL_NAME`] bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

/// Most models one OpenAI-compatible service may offer.
pub const MAX_MODELS: usize = 256;
/// Longest model name, in bytes.
pub const MAX_MODEL_NAME: usize = 256;

/// What a device's service speaks, which decides how the hub offers it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// Any HTTP service, reached through `/proxy/`.
    #[default]
    Http,
    /// An OpenAI-compatible server (llama.cpp, vLLM, Ollama, ...): reached through
    /// `/proxy/` too, and its models through the hub's `/v1/` endpoints.
    #[serde(rename = "openai")]
    OpenAi,
    /// Raw TCP (SSH, a database): reached only by a [`TCP_UPGRADE`] upgrade of
    /// `/proxy/`, after which the stream carries the connection's bytes both ways.
    Tcp,
}

/// The `Upgrade` protocol that opens a raw TCP stream to a [`ServiceKind::Tcp`] service:
/// the hub answers `101` and the connection then carries the service's bytes.
pub const TCP_UPGRADE: &str = "adi-tcp";

impl ServiceKind {
    /// Whether it is plain HTTP (the default, left out of messages).
    pub fn is_http(&self) -> bool {
        matches!(self, ServiceKind::Http)
    }

    /// Whether it is raw TCP, reached only by a [`TCP_UPGRADE`] upgrade.
    pub fn is_tcp(&self) -> bool {
        matches!(self, ServiceKind::Tcp)
    }
}

/// First frame on a cocoon connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// What the device serves; each offer reads from `"protocol:version"` or an object.
    #[serde(default)]
    pub capabilities: Vec<CapabilityOffer>,
    /// Version of the agent build, for the operator's eyes.
    #[serde(default)]
    pub agent_version: String,
    /// Where the device is, in its owner's words (`home`, `eu-west rack 3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Largest frame the device accepts from the hub; the hub keeps what it sends
    /// within it. Absent from agents that predate it: the default limit then applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    /// Made fresh by each agent process, so the hub can tell the same agent coming
    /// back from a second agent holding a copy of this device's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// CPU, RAM and GPU use sampled just before registering, so the device shows its
    /// hardware and load from its first moment online rather than a heartbeat later.
    /// Absent from agents that predate it: the first heartbeat then brings them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

/// Liveness and load report, sent every heartbeat interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Monotonic counter, so the hub can tell a stuck sender from a slow link.
    #[serde(default)]
    pub seq: u64,
    /// CPU, RAM and GPU use, as the device last sampled them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    /// Latest health of each registered service, as the device probed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceHealth>,
}

/// A share in percent, held to 0–100.
fn percent<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
    let value = f64::deserialize(deserializer)?;
    // JSON numbers are finite, and a clamped one fits an f32.
    #[allow(clippy::cast_possible_truncation)]
    Ok(value.clamp(0.0, 100.0) as f32)
}

/// A device's CPU, RAM and GPU use at one instant. Kept in the hub's RAM only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Logical CPUs.
    pub cpu_count: u32,
    /// Busy share of all CPUs since the previous sample, 0–100 (a figure outside is
    /// read as the nearest end: past `f32`'s range it would become infinite, which
    /// JSON cannot carry, and every view of the device would stop encoding).
    #[serde(deserialize_with = "percent")]
    pub cpu_percent: f32,
    /// Bytes of RAM.
    pub ram_total_bytes: u64,
    /// Bytes of RAM in use.
    pub ram_used_bytes: u64,
    /// NVIDIA GPUs seen through NVML; empty without a driver.
    #[serde(default)]
    pub gpus: Vec<GpuReport>,
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// NVML index.
    pub index: u32,
    /// Model name.
    pub name: String,
    /// Stable GPU UUID.
    pub uuid: String,
    /// Bytes of VRAM.
    pub memory_total_bytes: u64,
    /// Bytes of VRAM in use.
    pub memory_used_bytes: u64,
    /// Busy share of the GPU over NVML's last window, 0–100.
    pub utilization_percent: u32,
    /// Core temperature, °C.
    pub temperature_c: Option<u32>,
}

/// What a device is built of, as opposed to how busy it is: kept in the catalog, and
/// written only when it changes (a GPU added, RAM upgraded), never per heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    /// Logical CPUs.
    pub cpu_count: u32,
    /// Bytes of RAM.
    pub ram_total_bytes: u64,
    /// NVIDIA GPUs, in NVML index order.
    #[serde(default)]
    pub gpus: Vec<GpuModel>,
}

/// One GPU's fixed facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuModel {
    /// Model name.
    pub name: String,
    /// Stable GPU UUID.
    pub uuid: String,
    /// Bytes of VRAM.
    pub memory_total_bytes: u64,
}

impl Hardware {
    /// Whether `load` reports exactly this hardware; allocates nothing, since every
    /// heartbeat asks.
    pub fn describes(&self, load: &LoadReport) -> bool {
        self.cpu_count == load.cpu_count
            && self.ram_total_bytes == load.ram_total_bytes
            && self.gpus.len() == load.gpus.len()
            && self.gpus.iter().zip(&load.gpus).all(|(m, g)| {
                m.name == g.name && m.uuid == g.uuid && m.memory_total_bytes == g.memory_total_bytes
            })
    }
}

impl From<&LoadReport> for Hardware {
    fn from(load: &LoadReport) -> Self {
        Hardware {
            cpu_count: load.cpu_count,
            ram_total_bytes: load.ram_total_bytes,
            gpus: load
                .gpus
                .iter()
                .map(|g| GpuModel {
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    memory_total_bytes: g.memory_total_bytes,
                })
                .collect(),
        }
    }
}

/// Whether a service answered its last probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Its health endpoint answered 2xx/3xx (or, without one, its port accepted).
    Up,
    /// It did not.
    Down,
    /// Not probed yet.
    Unknown,
}

/// One service's health as the device last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    /// The service.
    pub name: String,
    /// Up, down or unknown.
    pub status: HealthStatus,
    /// Why it is down, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
    /// Largest frame the hub accepts from the device; the device keeps its answers
    /// within it. Absent from hubs that predate it: the default limit then applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    /// The other hubs of this hub's cluster (their base URLs), so a device that loses its hub
    /// reconnects to another. Empty from a hub that runs alone or predates clusters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

/// Messages a cocoon sends to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The head of the answer to a [`HubToDevice::ProxyRequest`]; the body follows on
    /// the stream as binary frames. A small complete answer travels instead as one
    /// whole-body binary frame whose head is a [`ProxyHead`].
    ProxyResponse {
        /// The stream of the request.
        stream_id: u32,
        /// HTTP status.
        status: u16,
        /// Response headers, hop-by-hop ones removed.
        headers: Vec<(String, String)>,
    },
    /// A proxied request that got no response from the service.
    ProxyError {
        /// The stream of the request.
        stream_id: u32,
        /// Why (`not_found` service, `upstream_error` not listening, `timeout`, ...).
        code: ErrorCode,
        /// In words.
        message: String,
    },
    /// What the device serves changed (a plugin manifest was added, edited or removed).
    CapabilitiesUpdate {
        /// The full new list.
        capabilities: Vec<CapabilityOffer>,
    },
    /// The device asks the hub to have a capability served by the best device it may
    /// use; answered by exactly one [`HubToDevice::CapabilityResponse`].
    CapabilityRequest {
        /// Chosen by the device, echoed in the answer.
        request_id: u64,
        /// What is asked for.
        capability: CapabilityQuery,
        /// The request, passed to the serving device as it is.
        #[serde(default)]
        payload: crate::Payload,
        /// A device to try first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefer_device: Option<DeviceId>,
        /// Milliseconds the device waits; the hub answers `timeout` by then.
        deadline_ms: u64,
    },
    /// The answer to a [`HubToDevice::Request`], exactly one per request.
    Response {
        /// The request answered.
        request_id: u64,
        /// The answer, or why there is none.
        #[serde(flatten)]
        outcome: Outcome,
    },
    /// The device is stopping: it finishes what it is serving, and the hub sends it
    /// nothing new to proxy or serve, so callers go to another device or hear at once
    /// that this one is going.
    Draining,
}

/// An HTTP request for a device's service, as the hub forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRequest {
    /// Stream carrying both bodies.
    pub stream_id: u32,
    /// A service the device registered.
    pub service: String,
    /// HTTP method.
    pub method: String,
    /// Path and query, normalised, always starting with `/`.
    pub target: String,
    /// Request headers, hop-by-hop and hub credentials removed.
    pub headers: Vec<(String, String)>,
    /// Milliseconds the hub waits for the response head.
    pub deadline_ms: u64,
    /// The protocol the client asks to switch to (`websocket`); after a `101` answer
    /// the stream carries raw bytes both ways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The request has no body: no body frame, not even an end, follows on the stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_body: bool,
}

/// Status and headers of a proxied response, as the head of a whole-body frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHead {
    /// HTTP status.
    pub status: u16,
    /// Response headers, hop-by-hop ones removed.
    pub headers: Vec<(String, String)>,
}

/// A device's answer: `{"ok": ...}` or `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It worked.
    Ok(DeviceReply),
    /// It did not.
    Error(RemoteError),
}

/// An error a device reports, in the shared vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl RemoteError {
    /// An error with its code and words.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
        }
    }
}

/// What the hub asks of a device. Each names one operation on the device's own data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DeviceRequest {
    /// Store (and, if it has a command, run) a task.
    CreateTask {
        /// The task.
        task: NewTask,
    },
    /// One task.
    GetTask {
        /// Which.
        id: TaskId,
    },
    /// Cancel a task, killing its command if it runs.
    CancelTask {
        /// Which.
        id: TaskId,
    },
    /// One page of the device's tasks, newest first (the local part of an aggregate).
    ListTasks {
        /// Which tasks.
        #[serde(default)]
        filter: TaskFilter,
        /// Start after this position.
        #[serde(default)]
        after: Option<Position>,
        /// Page size.
        limit: u32,
    },
    /// Counts by status.
    TaskStats,
    /// A page of a task's log.
    ReadLogs {
        /// Which task.
        id: TaskId,
        /// Lines after this sequence number.
        after_seq: u64,
        /// Page size.
        limit: u32,
    },
    /// Serve a capability this device offers.
    Capability {
        /// What was asked for; the device picks its matching offer.
        capability: CapabilityQuery,
        /// The caller's request, as the caller gave it.
        #[serde(default)]
        payload: crate::Payload,
    },
    /// Whether the device would run this task, without storing it; answered by
    /// [`DeviceReply::CanRun`].
    CanRun {
        /// The task as it would be created.
        task: NewTask,
    },
}

/// What a device answers, one variant per kind of request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceReply {
    /// One task.
    Task {
        /// It (boxed: a task is large next to the other replies).
        task: Box<Task>,
    },
    /// A page of tasks.
    Tasks {
        /// The page.
        page: TaskPage,
    },
    /// Counts.
    Stats {
        /// The counts.
        stats: TaskStats,
    },
    /// A page of log lines.
    Logs {
        /// The lines, in order.
        lines: Vec<LogLine>,
        /// The task's status when the lines were read: once it is final and a read
        /// returns no line, the log is complete.
        status: TaskStatus,
        /// The device cut the page short to keep its answer within one frame: more
        /// lines follow right away, whatever the status.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// The device's judgement of a task it was asked about with
    /// [`DeviceRequest::CanRun`], and what it judged by.
    CanRun {
        /// Whether it would run the task.
        can_run: bool,
        /// Why not, in words, when it would not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Whether the device runs commands at all (off under `--no-exec`).
        exec_allowed: bool,
        /// Whether the device has a GPU for tasks that require `gpu`.
        has_gpu: bool,
    },
    /// A capability's answer, as the serving plugin gave it.
    Capability {
        /// The answer.
        payload: crate::Payload,
    },
}

/// A served capability request: who served it and what it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilityAnswer {
    /// The device that served it.
    pub from_device: DeviceId,
    /// Its answer, unchanged.
    pub payload: crate::Payload,
}

/// The outcome of a device's capability request: `{"ok": ...}` or `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapabilityOutcome {
    /// Served.
    Ok(CapabilityAnswer),
    /// Not served, and why.
    Error(RemoteError),
}

/// Messages the hub sends to a cocoon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubToDevice {
    /// Registration accepted.
    Registered(Registered),
    /// Asks the device to do something; answered by [`DeviceToHub::Response`].
    Request {
        /// Unique per connection; echoed in the response.
        request_id: u64,
        /// Milliseconds the hub will wait; the device may give up after that.
        deadline_ms: u64,
        /// What to do.
        #[serde(flatten)]
        request: DeviceRequest,
    },
    /// Forward an HTTP request to one of the device's loopback services. The request
    /// body follows on `stream_id` as binary frames (an empty body is just an end frame).
    ProxyRequest(ProxyRequest),
    /// The answer to the device's [`DeviceToHub::CapabilityRequest`].
    CapabilityResponse {
        /// The device's id for the request.
        request_id: u64,
        /// The answer, or why there is none.
        #[serde(flatten)]
        outcome: CapabilityOutcome,
    },
    /// Something the device sent was refused.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail; never contains secrets.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_describes_only_the_same_machine() {
        let load = LoadReport {
            cpu_count: 16,
            cpu_percent: 40.0,
            ram_total_bytes: 64 << 30,
            ram_used_bytes: 10 << 30,
            gpus: vec![GpuReport {
                name: "NVIDIA H200".into(),
                uuid: "GPU-1".into(),
                memory_total_bytes: 141 << 30,
                memory_used_bytes: 3 << 30,
                utilization_percent: 70,
                ..Default::default()
            }],
        };
        let hw = Hardware::from(&load);
        assert!(hw.describes(&load));
        // Load figures move every heartbeat; the hardware does not.
        let busier = LoadReport {
            cpu_percent: 99.0,
            ram_used_bytes: 60 << 30,
            ..load.clone()
        };
        assert!(hw.describes(&busier));
        let mut swapped = load.clone();
        swapped.gpus[0].uuid = "GPU-2".into();
        assert!(!hw.describes(&swapped));
        let no_gpu = LoadReport {
            gpus: vec![],
            ..load.clone()
        };
        assert!(!hw.describes(&no_gpu));
        let more_ram = LoadReport {
            ram_total_bytes: 128 << 30,
            ..load
        };
        assert!(!hw.describes(&more_ram));
    }

    /// A TCP service says so on the wire; an HTTP one says nothing, as before kinds.
    #[test]
    fn a_tcp_service_is_of_kind_tcp_on_the_wire() {
        let ssh: ServiceInfo =
            serde_json::from_str(r#"{"name":"ssh","port":22,"kind":"tcp"}"#).expect("decodes");
        assert_eq!(ssh.kind, ServiceKind::Tcp);
        assert!(ssh.kind.is_tcp() && !ssh.kind.is_http());
        let text = serde_json::to_string(&ssh).expect("encodes");
        assert!(text.contains(r#""kind":"tcp""#), "{text}");
        let web = ServiceInfo {
            kind: ServiceKind::Http,
            ..ssh
        };
        let text = serde_json::to_string(&web).expect("encodes");
        assert!(!text.contains("kind"), "{text}");
    }

    /// A hub that runs alone (or predates clusters) and an agent that predates them
    /// still understand each other's registration answer.
    #[test]
    fn the_cluster_list_is_optional_on_the_wire() {
        let alone: Registered = serde_json::from_str(
            r#"{"device_id":"00112233445566778899aabbccddeeff","protocol_version":1,"heartbeat_interval_ms":500}"#,
        )
        .expect("an answer without hubs");
        assert!(alone.hubs.is_empty());
        let text = serde_json::to_string(&alone).expect("encodes");
        assert!(!text.contains("hubs"), "{text}");
        let clustered = Registered {
            hubs: vec!["https://hub-b.example".into()],
            ..alone
        };
        let text = serde_json::to_string(&clustered).expect("encodes");
        assert!(
            text.contains(r#""hubs":["https://hub-b.example"]"#),
            "{text}"
        );
    }
}
