//! Who may see and use which device: decided here, and only here. Every REST route, the
//! proxy, capability routing and the client socket ask this module, so a rule (today:
//! a device's owners may use it; a device may use the devices it shares an owner with)
//! changes in one place.
//!
//! A device the caller may not use is answered exactly like one that does not exist,
//! so nobody learns of another user's devices. Connected devices are judged from the
//! registry's RAM (as routing is); only a device that is not connected costs a catalog
//! read. It must never answer for a device without checking its owners.

use std::sync::Arc;

use adi_protocol::DeviceId;

use crate::catalog::{CatalogError, DeviceRecord, UserId};
use crate::registry::Access as Live;
use crate::HubState;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Requester {
    /// A signed-in user: the devices they own.
    User(UserId),
    /// A device: the devices that share one of its owners.
    Device {
        /// Its owners, from the registry.
        owners: Arc<[UserId]>,
    },
}

impl Requester {
    /// Whether a device with `owners` may be used by this requester.
    pub fn may_use(&self, owners: &[UserId]) -> bool {
        match self {
            Requester::User(u) => owners.contains(u),
            Requester::Device { owners: mine, .. } => owners.iter().any(|o| mine.contains(o)),
        }
    }
}

/// Why a device was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No such device, or one the caller may not use: the same to the caller.
    #[error("no such device")]
    NotFound,
    /// Several of the caller's devices answer to the name given.
    #[error(
        "{} of your devices are called {name:?}: {}; use the id of the one you mean",
        ids.len(),
        ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous {
        /// The name given.
        name: String,
        /// The devices it names, sorted.
        ids: Vec<DeviceId>,
    },
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// A device of the user's, as found.
pub enum Found {
    /// Connected: what the registry knows of it now.
    Live(DeviceId, Live),
    /// Not connected: what the catalog holds.
    Stored(DeviceRecord),
}

/// The user's device with this id, from the catalog.
pub async fn device(
    state: &HubState,
    user: UserId,
    raw_id: &str,
) -> Result<DeviceRecord, AccessError> {
    let id: DeviceId = raw_id.parse().map_err(|_| AccessError::NotFound)?;
    let device = state
        .catalog
        .device(&id)
        .await?
        .ok_or(AccessError::NotFound)?;
    if !device.owners.iter().any(|o| o.id == user) {
        return Err(AccessError::NotFound);
    }
    Ok(device)
}

/// Every device the user owns, from the catalog.
pub async fn devices(state: &HubState, user: UserId) -> Result<Vec<DeviceRecord>, AccessError> {
    Ok(state.catalog.devices_owned_by(user).await?)
}

/// The user's device named by `given`: its 32-hex id, or a name that is unique among
/// the user's devices. A connected device is found in RAM; one connected device with
/// the name wins over offline ones of the same name (looking for those would cost a
/// catalog read per request by name); otherwise the catalog decides.
pub async fn device_by_id_or_name(
    state: &HubState,
    user: UserId,
    given: &str,
) -> Result<Found, AccessError> {
    let mine = |owners: &[UserId]| owners.contains(&user);
    if let Ok(id) = given.parse::<DeviceId>() {
        if let Some(live) = state.registry.access(&id).filter(|a| mine(&a.owners)) {
            return Ok(Found::Live(id, live));
        }
        return device(state, user, given).await.map(Found::Stored);
    }
    let name = decoded_name(given).ok_or(AccessError::NotFound)?;
    let mut live = state.registry.named(&name, mine);
    if live.len() > 1 {
        return Err(ambiguous(&name, live));
    }
    if let Some(id) = live.pop() {
        if let Some(access) = state.registry.access(&id).filter(|a| mine(&a.owners)) {
            return Ok(Found::Live(id, access));
        }
    }
    let mut stored: Vec<DeviceRecord> = devices(state, user)
        .await?
        .into_iter()
        .filter(|d| d.name == name)
        .collect();
    match stored.len() {
        0 => Err(AccessError::NotFound),
        1 => stored.pop().map(Found::Stored).ok_or(AccessError::NotFound),
        _ => Err(ambiguous(&name, stored.into_iter().map(|d| d.id).collect())),
    }
}

/// A device name as it appears in a path, decoded; `None` if it cannot be a name.
fn decoded_name(given: &str) -> Option<String> {
    percent_encoding::percent_decode_str(given)
        .decode_utf8()
        .ok()
        .map(|n| n.into_owned())
}

fn ambiguous(name: &str, mut ids: Vec<DeviceId>) -> AccessError {
    ids.sort();
    AccessError::Ambiguous {
        name: name.to_owned(),
        ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_uses_their_devices_and_a_device_those_it_shares_an_owner_with() {
        let (alice, bob, carol) = (
            UserId(uuid::Uuid::from_u128(1)),
            UserId(uuid::Uuid::from_u128(2)),
            UserId(uuid::Uuid::from_u128(3)),
        );
        let user = Requester::User(alice);
        assert!(user.may_use(&[bob, alice]));
        assert!(!user.may_use(&[bob]));
        let device = Requester::Device {
            owners: Arc::from(vec![alice, bob]),
        };
        assert!(device.may_use(&[carol, bob]));
        assert!(!device.may_use(&[carol]));
        assert!(!device.may_use(&[]));
    }

    #[test]
    fn several_devices_of_one_name_are_named_by_id() {
        let e = ambiguous(
            "box",
            vec![DeviceId::from_mac(&[2; 16]), DeviceId::from_mac(&[1; 16])],
        );
        let text = e.to_string();
        assert!(
            text.starts_with("2 of your devices are called \"box\""),
            "{text}"
        );
        let first = DeviceId::from_mac(&[1; 16]).to_string();
        let second = DeviceId::from_mac(&[2; 16]).to_string();
        assert!(text.find(&first) < text.find(&second), "sorted: {text}");
    }
}
