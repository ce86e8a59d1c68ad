//! The audit log: every security-relevant event, kept in the catalog for the hub's
//! retention (`--audit-retention`, 90 days by default). Who acted (a user and the key of
//! their session, or a device), on which device and whom, from which address, and when;
//! never a secret. A user reads their own actions, what was done to them, and the events
//! of the devices they own (`GET /api/audit`, `adi audit`).
//!
//! Recording never decides anything: an event that cannot be written is logged as a
//! warning, and the action it describes stands.

use std::net::IpAddr;
use std::time::Duration;

use adi_protocol::DeviceId;

use crate::access::Caller;
use crate::catalog::{AuditEvent, Catalog, UserId};

/// How long events are kept unless the hub is told otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 86_400);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device enrolled with a setup token.
    DeviceEnrolled,
    /// A setup or share token was made.
    TokenCreated,
    /// A token was taken back unused.
    TokenRevoked,
    /// A share token was claimed.
    ShareClaimed,
    /// An owner removed a member.
    MemberRemoved,
    /// A member left.
    MemberLeft,
    /// An owner gave a member another role.
    MemberRoleChanged,
    /// An owner deleted a device.
    DeviceDeleted,
    /// An API key was made.
    KeyCreated,
    /// An API key was revoked.
    KeyRevoked,
    /// A session was signed out.
    SessionRevoked,
    /// A sign-in was refused.
    SignInFailed,
    /// An admin disabled a user.
    UserDisabled,
    /// An admin enabled a user.
    UserEnabled,
    /// An admin removed a user.
    UserRemoved,
    /// An admin replaced a user's keys.
    UserKeyRotated,
    /// A task was created.
    TaskCreated,
    /// A task was cancelled.
    TaskCancelled,
    /// Two agents connected with one device's secret.
    DeviceConflict,
}

impl Kind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DeviceEnrolled => "device_enrolled",
            Kind::TokenCreated => "token_created",
            Kind::TokenRevoked => "token_revoked",
            Kind::ShareClaimed => "share_claimed",
            Kind::MemberRemoved => "member_removed",
            Kind::MemberLeft => "member_left",
            Kind::MemberRoleChanged => "member_role_changed",
            Kind::DeviceDeleted => "device_deleted",
            Kind::KeyCreated => "key_created",
            Kind::KeyRevoked => "key_revoked",
            Kind::SessionRevoked => "session_revoked",
            Kind::SignInFailed => "sign_in_failed",
            Kind::UserDisabled => "user_disabled",
            Kind::UserEnabled => "user_enabled",
            Kind::UserRemoved => "user_removed",
            Kind::UserKeyRotated => "user_key_rotated",
            Kind::TaskCreated => "task_created",
            Kind::TaskCancelled => "task_cancelled",
            Kind::DeviceConflict => "device_conflict",
        }
    }
}

/// An event of `kind`, now.
pub fn event(kind: Kind) -> AuditEvent {
    AuditEvent {
        at: crate::auth::unix_now_i64(),
        kind: kind.as_str().to_owned(),
        ..AuditEvent::default()
    }
}

/// An event of `kind` done by `caller`, now.
pub fn by(caller: &Caller, kind: Kind) -> AuditEvent {
    AuditEvent {
        actor_user: Some(caller.id),
        actor_key: caller.key.clone(),
        source: caller.source.map(|ip| ip.to_string()),
        ..event(kind)
    }
}

/// Builder steps for the fields most events set, so each place that records an event
/// says what it concerns in one expression.
impl AuditEvent {
    /// The device it concerns.
    pub fn on(mut self, device: &DeviceId) -> Self {
        self.device = Some(device.clone());
        self
    }

    /// The user it concerns.
    pub fn to(mut self, user: UserId) -> Self {
        self.target_user = Some(user);
        self
    }

    /// What else identifies it.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Where it came from.
    pub fn seen_from(mut self, ip: IpAddr) -> Self {
        self.source = Some(ip.to_string());
        self
    }
}

/// Writes `event`, keeping `retention` of the log; a failure is logged, not returned.
pub async fn record_in(catalog: &dyn Catalog, event: AuditEvent, retention: Duration) {
    let keep = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    if let Err(e) = catalog.record_audit(&event, keep).await {
        tracing::warn!(kind = %event.kind, "audit event not recorded: {e}");
    }
}

/// Writes `event` to the hub's catalog under its retention.
pub async fn record(state: &crate::HubState, event: AuditEvent) {
    record_in(state.catalog.as_ref(), event, state.config.audit_retention).await;
}
