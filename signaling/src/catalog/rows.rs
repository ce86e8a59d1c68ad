//! Catalog rows: the one mapping between the catalog's records and the columns both
//! backends keep them in (ids as text, hashes as bytes, declared services, capabilities
//! and hardware as JSON text, times as unix seconds). Every row either backend reads is
//! decoded here, through `sqlx::FromRow` types whose fields decode on SQLite and
//! PostgreSQL alike, and every value either writes is encoded here.
//!
//! This module must never run a statement: the backends own their connections, their
//! transactions and their SQL.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use adi_protocol::{CapabilityOffer, DeviceId, Hardware, Role, Scope, ServiceInfo};

use super::{
    ApiKeyRecord, AuditEvent, CatalogError, Change, ChangeKind, DeviceConfig, DeviceRecord, Member,
    Result, TokenKind, TokenRecord, User, UserId,
};

/// The columns a [`UserRow`] is read from.
pub(super) const USER_COLUMNS: &str = "id, name, created_at, disabled_at";
/// The columns an [`ApiKeyRow`] is read from.
pub(super) const API_KEY_COLUMNS: &str =
    "key_id, user_id, secret_hash, created_at, name, scopes, devices, expires_at, revoked_at";
/// The columns a [`TokenRow`] is read from.
pub(super) const TOKEN_COLUMNS: &str =
    "id, kind, secret_hash, created_by, device_id, role, created_at, expires_at, used_at, revoked_at";
/// The columns a [`MemberRow`] is read from, with `o` the `device_owners` row and `u`
/// the user's.
pub(super) const MEMBER_COLUMNS: &str = "u.id, u.name, o.role";
/// How members are listed: owners first ('owner' sorts before 'user'), then by name.
pub(super) const MEMBER_ORDER: &str = "o.role, u.name, u.id";
/// The columns a [`DeviceRow`] is read from.
pub(super) const DEVICE_COLUMNS: &str =
    "id, name, services, capabilities, location, hardware, created_at";

/// One row of `users`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct UserRow {
    id: String,
    name: String,
    created_at: i64,
    disabled_at: Option<i64>,
}

impl TryFrom<UserRow> for User {
    type Error = CatalogError;

    fn try_from(row: UserRow) -> Result<User> {
        Ok(User {
            id: parse_user_id(&row.id)?,
            name: row.name,
            created_at: row.created_at,
            disabled_at: row.disabled_at,
        })
    }
}

/// A new user, named `name`, created now; its id is new.
pub(super) fn new_user(name: &str) -> User {
    User {
        id: UserId(uuid::Uuid::new_v4()),
        name: name.to_owned(),
        created_at: unix_now(),
        disabled_at: None,
    }
}

/// One row of `api_keys`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    key_id: String,
    user_id: String,
    secret_hash: Vec<u8>,
    created_at: i64,
    name: Option<String>,
    scopes: Option<String>,
    devices: Option<String>,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = CatalogError;

    fn try_from(row: ApiKeyRow) -> Result<ApiKeyRecord> {
        Ok(ApiKeyRecord {
            key_id: row.key_id,
            user_id: parse_user_id(&row.user_id)?,
            secret_hash: row.secret_hash,
            created_at: row.created_at,
            name: row.name,
            scopes: row
                .scopes
                .map(|s| decode_json::<Vec<Scope>>(&s, "key scopes"))
                .transpose()?,
            devices: row
                .devices
                .map(|d| decode_json::<Vec<DeviceId>>(&d, "key devices"))
                .transpose()?,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// The JSON columns of an API key, encoded for `api_keys`.
pub(super) struct KeyColumns {
    /// The `scopes` column; `NULL` for every scope.
    pub(super) scopes: Option<String>,
    /// The `devices` column; `NULL` for every device.
    pub(super) devices: Option<String>,
}

impl KeyColumns {
    /// Encodes what `key` is limited to.
    pub(super) fn of(key: &ApiKeyRecord) -> Result<Self> {
        Ok(KeyColumns {
            scopes: key.scopes.as_ref().map(encode_json).transpose()?,
            devices: key.devices.as_ref().map(encode_json).transpose()?,
        })
    }
}

/// The columns an [`AuditRow`] is read from, with `e` the event and `a`, `t` the actor's
/// and target's rows of `users`.
pub(super) const AUDIT_COLUMNS: &str = "e.seq, e.at, e.kind, e.actor_user, a.name AS actor_name, \
     e.actor_key, e.actor_device, e.device, e.target_user, t.name AS target_name, e.source, e.detail";

/// One row of `audit_events`, with the names of the users it names.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct AuditRow {
    seq: i64,
    at: i64,
    kind: String,
    actor_user: Option<String>,
    actor_name: Option<String>,
    actor_key: Option<String>,
    actor_device: Option<String>,
    device: Option<String>,
    target_user: Option<String>,
    target_name: Option<String>,
    source: Option<String>,
    detail: Option<String>,
}

impl TryFrom<AuditRow> for AuditEvent {
    type Error = CatalogError;

    fn try_from(row: AuditRow) -> Result<AuditEvent> {
        Ok(AuditEvent {
            seq: row.seq,
            at: row.at,
            kind: row.kind,
            actor_user: row.actor_user.as_deref().map(parse_user_id).transpose()?,
            actor_name: row.actor_name,
            actor_key: row.actor_key,
            actor_device: row
                .actor_device
                .as_deref()
                .map(parse_device_id)
                .transpose()?,
            device: row.device.as_deref().map(parse_device_id).transpose()?,
            target_user: row.target_user.as_deref().map(parse_user_id).transpose()?,
            target_name: row.target_name,
            source: row.source,
            detail: row.detail,
        })
    }
}

/// One row of `access_changes`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct ChangeRow {
    seq: i64,
    kind: String,
    subject: String,
}

impl TryFrom<ChangeRow> for Change {
    type Error = CatalogError;

    fn try_from(row: ChangeRow) -> Result<Change> {
        Ok(Change {
            seq: row.seq,
            kind: ChangeKind::parse(&row.kind)
                .ok_or_else(|| CatalogError::Corrupt(format!("change kind {:?}", row.kind)))?,
            subject: row.subject,
        })
    }
}

/// One row of `tokens`, without who used it.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct TokenRow {
    id: String,
    kind: String,
    secret_hash: Vec<u8>,
    created_by: String,
    device_id: Option<String>,
    role: Option<String>,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = CatalogError;

    fn try_from(row: TokenRow) -> Result<TokenRecord> {
        Ok(TokenRecord {
            kind: TokenKind::parse(&row.kind)
                .ok_or_else(|| CatalogError::Corrupt(format!("token kind {:?}", row.kind)))?,
            id: row.id,
            secret_hash: row.secret_hash,
            created_by: parse_user_id(&row.created_by)?,
            device_id: row.device_id.as_deref().map(parse_device_id).transpose()?,
            role: row.role.as_deref().map(parse_role).transpose()?,
            created_at: row.created_at,
            expires_at: row.expires_at,
            used_at: row.used_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// One row of `devices`; its members come from `device_owners`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DeviceRow {
    id: String,
    name: String,
    services: String,
    capabilities: String,
    location: Option<String>,
    hardware: Option<String>,
    created_at: i64,
}

impl DeviceRow {
    /// The device this row holds, used by `members`.
    pub(super) fn into_record(self, members: Vec<Member>) -> Result<DeviceRecord> {
        Ok(DeviceRecord {
            id: parse_device_id(&self.id)?,
            name: self.name,
            services: decode_json::<Vec<ServiceInfo>>(&self.services, "device services")?,
            capabilities: decode_json::<Vec<CapabilityOffer>>(
                &self.capabilities,
                "device capabilities",
            )?,
            location: self.location,
            hardware: self
                .hardware
                .map(|h| decode_json::<Hardware>(&h, "device hardware"))
                .transpose()?,
            created_at: self.created_at,
            members,
        })
    }
}

/// The JSON columns of a device's declared configuration, encoded for `devices`.
#[derive(Debug)]
pub(super) struct DeviceColumns {
    /// The `services` column.
    pub(super) services: String,
    /// The `capabilities` column.
    pub(super) capabilities: String,
    /// The `hardware` column; `NULL` until the device first reports it.
    pub(super) hardware: Option<String>,
}

impl DeviceColumns {
    /// Encodes what `device` declares.
    pub(super) fn of(device: &DeviceConfig) -> Result<Self> {
        Ok(DeviceColumns {
            services: encode_json(&device.services)?,
            capabilities: encode_json(&device.capabilities)?,
            hardware: device.hardware.as_ref().map(encode_json).transpose()?,
        })
    }
}

/// A member of a device: [`MEMBER_COLUMNS`] from `users` joined to `device_owners`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct MemberRow {
    id: String,
    name: String,
    role: String,
}

impl TryFrom<MemberRow> for Member {
    type Error = CatalogError;

    fn try_from(row: MemberRow) -> Result<Member> {
        Ok(Member {
            id: parse_user_id(&row.id)?,
            name: row.name,
            role: parse_role(&row.role)?,
        })
    }
}

/// A member of one of several devices: `o.device_id` and [`MEMBER_COLUMNS`].
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DeviceMemberRow {
    device_id: String,
    #[sqlx(flatten)]
    member: MemberRow,
}

/// The records of `devices`, each with its members from `members` (in the order read);
/// both read in one snapshot, so every device finds its members.
pub(super) fn devices_with_members(
    devices: Vec<DeviceRow>,
    members: Vec<DeviceMemberRow>,
) -> Result<Vec<DeviceRecord>> {
    let mut by_device: HashMap<String, Vec<Member>> = HashMap::new();
    for row in members {
        by_device
            .entry(row.device_id)
            .or_default()
            .push(row.member.try_into()?);
    }
    devices
        .into_iter()
        .map(|device| {
            let members = by_device.remove(&device.id).unwrap_or_default();
            device.into_record(members)
        })
        .collect()
}

/// Members as read, in the order read.
pub(super) fn members(rows: Vec<MemberRow>) -> Result<Vec<Member>> {
    rows.into_iter().map(Member::try_from).collect()
}

/// Refuses to remove `user` from a device with `members`: `NotFound` if they are not
/// one, `LastOwner` if no other owner would be left.
pub(super) fn check_removable(members: &[Member], user: UserId) -> Result<()> {
    let member = members
        .iter()
        .find(|m| m.id == user)
        .ok_or_else(|| CatalogError::NotFound(format!("member {user}")))?;
    let other_owner = members
        .iter()
        .any(|m| m.id != user && m.role == Role::Owner);
    if member.role == Role::Owner && !other_owner {
        return Err(CatalogError::LastOwner(member.name.clone()));
    }
    Ok(())
}

/// Whether `user` may be given `role`: a member, and, made a user, not the last owner
/// (the same rule as for leaving).
pub(super) fn check_role_change(members: &[Member], user: UserId, role: Role) -> Result<()> {
    match role {
        Role::User => check_removable(members, user),
        Role::Owner if members.iter().any(|m| m.id == user) => Ok(()),
        Role::Owner => Err(CatalogError::NotFound(format!("member {user}"))),
    }
}

/// A stored role.
pub(super) fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| CatalogError::Corrupt(format!("role {s:?}")))
}

/// A stored device id.
pub(super) fn parse_device_id(s: &str) -> Result<DeviceId> {
    s.parse()
        .map_err(|_| CatalogError::Corrupt(format!("device id {s:?}")))
}

pub(super) fn parse_user_id(s: &str) -> Result<UserId> {
    uuid::Uuid::parse_str(s)
        .map(UserId)
        .map_err(|_| CatalogError::Corrupt(format!("user id {s:?}")))
}

fn encode_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| CatalogError::Corrupt(format!("encoding JSON: {e}")))
}

fn decode_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| CatalogError::Corrupt(format!("{what}: {e}")))
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
