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

use adi_protocol::{CapabilityOffer, DeviceId, Hardware, ServiceInfo};

use super::{
    ApiKeyRecord, CatalogError, DeviceConfig, DeviceRecord, Owner, Result, TokenKind, TokenRecord,
    User, UserId,
};

/// The columns a [`UserRow`] is read from.
pub(super) const USER_COLUMNS: &str = "id, name, created_at";
/// The columns an [`ApiKeyRow`] is read from.
pub(super) const API_KEY_COLUMNS: &str = "key_id, user_id, secret_hash, created_at";
/// The columns a [`TokenRow`] is read from.
pub(super) const TOKEN_COLUMNS: &str =
    "id, kind, secret_hash, created_by, device_id, created_at, expires_at, used_at, revoked_at";
/// The columns a [`DeviceRow`] is read from.
pub(super) const DEVICE_COLUMNS: &str =
    "id, name, services, capabilities, location, hardware, created_at";

/// One row of `users`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct UserRow {
    id: String,
    name: String,
    created_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = CatalogError;

    fn try_from(row: UserRow) -> Result<User> {
        Ok(User {
            id: parse_user_id(&row.id)?,
            name: row.name,
            created_at: row.created_at,
        })
    }
}

/// A new user, named `name`, created now; its id is new.
pub(super) fn new_user(name: &str) -> User {
    User {
        id: UserId(uuid::Uuid::new_v4()),
        name: name.to_owned(),
        created_at: unix_now(),
    }
}

/// One row of `api_keys`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    key_id: String,
    user_id: String,
    secret_hash: Vec<u8>,
    created_at: i64,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = CatalogError;

    fn try_from(row: ApiKeyRow) -> Result<ApiKeyRecord> {
        Ok(ApiKeyRecord {
            key_id: row.key_id,
            user_id: parse_user_id(&row.user_id)?,
            secret_hash: row.secret_hash,
            created_at: row.created_at,
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
            created_at: row.created_at,
            expires_at: row.expires_at,
            used_at: row.used_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// One row of `devices`; its owners come from `device_owners`.
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
    /// The device this row holds, owned by `owners`.
    pub(super) fn into_record(self, owners: Vec<Owner>) -> Result<DeviceRecord> {
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
            owners,
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

/// A user who owns a device: `u.id, u.name` from `users` joined to `device_owners`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct OwnerRow {
    id: String,
    name: String,
}

impl TryFrom<OwnerRow> for Owner {
    type Error = CatalogError;

    fn try_from(row: OwnerRow) -> Result<Owner> {
        Ok(Owner {
            id: parse_user_id(&row.id)?,
            name: row.name,
        })
    }
}

/// An owner of one of several devices: `o.device_id, u.id, u.name`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DeviceOwnerRow {
    device_id: String,
    #[sqlx(flatten)]
    owner: OwnerRow,
}

/// The records of `devices`, each with its owners from `owners` (in the order read);
/// both read in one snapshot, so every device finds its owners.
pub(super) fn devices_with_owners(
    devices: Vec<DeviceRow>,
    owners: Vec<DeviceOwnerRow>,
) -> Result<Vec<DeviceRecord>> {
    let mut by_device: HashMap<String, Vec<Owner>> = HashMap::new();
    for row in owners {
        by_device
            .entry(row.device_id)
            .or_default()
            .push(row.owner.try_into()?);
    }
    devices
        .into_iter()
        .map(|device| {
            let owners = by_device.remove(&device.id).unwrap_or_default();
            device.into_record(owners)
        })
        .collect()
}

/// Owners as read, in the order read.
pub(super) fn owners(rows: Vec<OwnerRow>) -> Result<Vec<Owner>> {
    rows.into_iter().map(Owner::try_from).collect()
}

/// A stored device id.
pub(super) fn parse_device_id(s: &str) -> Result<DeviceId> {
    s.parse()
        .map_err(|_| CatalogError::Corrupt(format!("device id {s:?}")))
}

fn parse_user_id(s: &str) -> Result<UserId> {
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
