//! What the hub's REST API answers, as types the CLI, the web UI's tests and other
//! clients read back: the hub serialises them, clients deserialise them, and neither
//! side depends on the other's crate for their shape. Plain data; no behaviour.

use serde::{Deserialize, Serialize};

use crate::client::DeviceStatus;
use crate::tasks::Task;
use crate::{CapabilityOffer, DeviceId, Hardware, HealthStatus, LoadReport, Role, Scope, UserId};

/// A device as the API shows it: catalog configuration plus live presence.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CocoonView {
    /// Device id.
    pub id: DeviceId,
    /// Device name.
    pub name: String,
    /// `online` or `offline`, from heartbeat age; `stopping` for an online device that
    /// is finishing its requests and takes no new ones.
    pub status: String,
    /// Whether the device is online.
    pub online: bool,
    /// Seconds since the last heartbeat, when connected.
    pub last_heartbeat_age_secs: Option<f64>,
    /// Declared services, with their live health.
    pub services: Vec<ServiceView>,
    /// What the device serves, as last declared (the catalog is written on every change).
    pub capabilities: Vec<CapabilityOffer>,
    /// Where it is, in its owner's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// What it is built of (CPUs, RAM, GPUs), as last reported; kept while offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
    /// Capability requests this hub has in flight to it.
    #[serde(default)]
    pub in_flight: u32,
    /// Raw TCP streams (`adi connect`, `adi proxy` to a tcp service) open to it through
    /// the hub it is connected to; 0 as another hub of a cluster sees it.
    #[serde(default)]
    pub tcp_streams: u32,
    /// CPU, RAM and GPU use from the latest heartbeat; absent while offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    /// Its members with the owner role: who may share, remove members and delete it.
    pub owners: Vec<OwnerView>,
    /// Everyone who may use it, owners and users, with their role.
    #[serde(default)]
    pub members: Vec<MemberView>,
    /// The caller's own role on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The hub it is connected to, by the URL `GET /api/hubs` lists it under, so a map
    /// of several hubs can draw it beside its own; absent while it is not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Unix seconds of enrolment.
    pub created_at: i64,
    /// The last time two agents connected with this device's secret at once (a copied
    /// data dir): the newer one holds the device, the older one was stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictView>,
}

/// Two agents with one device's secret, as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConflictView {
    /// Unix seconds.
    pub at: i64,
    /// Where the agent that was stopped connected from.
    pub displaced_from: Option<String>,
    /// Where the agent that holds the device now connected from.
    pub connected_from: Option<String>,
}

/// A service as the API shows it: what the device declared and how its last probe went.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ServiceView {
    /// Name used in proxy URLs.
    pub name: String,
    /// Loopback port on the device.
    pub port: u16,
    /// Path the device probes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// `up`, `down`, or `unknown` (device offline or not probed yet).
    #[serde(default = "unknown_health")]
    pub health: HealthStatus,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<String>,
    /// What it speaks: `http`, `openai` for an OpenAI-compatible server, or `tcp` for
    /// a raw TCP service (reached with `adi connect` or `adi proxy`).
    #[serde(default)]
    pub kind: crate::ServiceKind,
    /// The models an OpenAI-compatible server serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

pub(crate) fn unknown_health() -> HealthStatus {
    HealthStatus::Unknown
}

/// An owner as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OwnerView {
    /// User id.
    pub id: UserId,
    /// User name.
    pub name: String,
}

/// A member of a device as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// User id.
    pub id: UserId,
    /// User name.
    pub name: String,
    /// What they may do with the device.
    pub role: Role,
}

/// `PATCH /api/cocoons/{id}/members/{user}`: the role the member has from now on.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// `owner` or `user`.
    pub role: Role,
}

/// `GET /api/cocoons/{id}/members`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MemberList {
    /// The device.
    pub device_id: DeviceId,
    /// Owners first, then users, each by name.
    pub members: Vec<MemberView>,
}

/// `DELETE /api/cocoons/{id}`: the device removed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DeviceDeleted {
    /// Its id, now refused as removed.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// Whether its agent was connected, and so was told at once to stop.
    pub agent_told: bool,
}

/// A device's answer to whether it would run a task.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CanRun {
    /// The device asked.
    pub device_id: DeviceId,
    /// Whether it would run the task.
    pub can_run: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the device runs commands at all (off under `--no-exec`).
    pub exec_allowed: bool,
    /// Whether the device has a GPU for tasks requiring `gpu`.
    pub has_gpu: bool,
}

/// The merged task list: what every device answered, and how each device did.
#[derive(Serialize, Deserialize, Debug)]
pub struct AggregateTasks {
    /// Tasks of all devices, newest first.
    pub tasks: Vec<Task>,
    /// Every device asked (or known offline), with its status.
    pub devices: Vec<DeviceStatus>,
    /// Pass back as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// Where a setup or share token stands.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Unused, unrevoked and not yet expired: it still works.
    Active,
    /// Used once, by the device it enrolled or the person who claimed it.
    Used,
    /// Taken back by whoever made it.
    Revoked,
    /// Past its expiry, unused.
    Expired,
}

impl TokenState {
    /// The wire name, as listed.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Used => "used",
            TokenState::Revoked => "revoked",
            TokenState::Expired => "expired",
        }
    }
}

/// A setup or share token as its maker sees it listed: everything but its secret,
/// which the hub never stored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    /// Public id: the 16 hex characters after the token's prefix.
    pub id: String,
    /// `setup` or `share`.
    pub kind: String,
    /// For a share token, the device it shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    /// For a share token, the role it grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Where it stands now.
    pub state: TokenState,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, once used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<i64>,
    /// Unix seconds, once revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// `GET /api/tokens`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TokenList {
    /// Newest first.
    pub tokens: Vec<TokenView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_state_lists_under_its_wire_name() {
        for state in [
            TokenState::Active,
            TokenState::Used,
            TokenState::Revoked,
            TokenState::Expired,
        ] {
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
    }
}

/// An API key as its user sees it: never its secret.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyView {
    /// Public id: the 16 hex characters after `adi_key_`.
    pub id: String,
    /// The name its user gave it; keys made before names have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What it may do; every scope when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<Scope>>,
    /// The devices it is limited to; every device its user may use when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; it is refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Unix seconds, once revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
}

/// `GET /api/keys`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyList {
    /// Newest first.
    pub keys: Vec<KeyView>,
}

/// `POST /api/keys`: the new key, whose secret is shown this once.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyCreated {
    /// The whole key; the hub keeps only a hash of it.
    pub key: String,
    /// What was stored.
    #[serde(flatten)]
    pub view: KeyView,
}

/// One event of the audit log, as `GET /api/audit` shows it: never a secret.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AuditView {
    /// Its place in the log; later events have larger ones.
    pub seq: i64,
    /// Unix seconds.
    pub at: i64,
    /// What happened: `device_enrolled`, `token_created`, `token_revoked`,
    /// `share_claimed`, `member_removed`, `member_left`, `device_deleted`, `key_created`,
    /// `key_revoked`, `session_revoked`, `sign_in_failed`, `user_disabled`,
    /// `user_enabled`, `user_removed`, `user_key_rotated`, `task_created`,
    /// `task_cancelled` or `device_conflict`.
    pub kind: String,
    /// The user who acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_user: Option<String>,
    /// The id of the key of the session they acted with, or of the key tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_key: Option<String>,
    /// The device that acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_device: Option<DeviceId>,
    /// The device it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// The user it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_user: Option<String>,
    /// The address it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What else identifies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /api/audit`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AuditList {
    /// Newest first.
    pub events: Vec<AuditView>,
}
