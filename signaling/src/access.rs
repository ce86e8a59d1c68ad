//! Who may see, use and manage which device: decided here, and only here. Every REST
//! route, the proxy, capability routing and the client socket ask this module, so a
//! rule changes in one place. The rules: a device's members (owners and users) see and
//! use it; only its owners share it, remove members and delete it; a device acts for
//! its owners, so it may use the devices they may use.
//!
//! A device the caller may not use is answered exactly like one that does not exist,
//! so nobody learns of another user's devices. Connected devices are judged from the
//! registry's RAM (as routing is); only a device that is not connected costs a catalog
//! read. It must never answer for a device without checking its owners.

use std::sync::Arc;

use adi_protocol::{DeviceId, Role, Scope};

use crate::catalog::{CatalogError, DeviceRecord, UserId};
use crate::registry::Access as Live;
use crate::HubState;

/// A signed-in person, as their session says: who they are, and what the API key the
/// session was opened with allows (its scopes, and the devices it is limited to).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user's id.
    pub id: UserId,
    /// The user's name.
    pub name: String,
    /// The session's id, if its JWT has one: what signing out revokes.
    pub session: Option<String>,
    /// The API key the session was opened with, if its JWT names it.
    pub key: Option<String>,
    /// The address the request came from, when known (for the audit log).
    pub source: Option<std::net::IpAddr>,
    /// The scopes it allows; every scope when `None`.
    scopes: Option<Arc<[Scope]>>,
    /// The devices it is limited to; none when `None`.
    devices: Option<Arc<[DeviceId]>>,
}

impl From<crate::auth::Claims> for Caller {
    fn from(claims: crate::auth::Claims) -> Self {
        Caller {
            id: claims.sub,
            name: claims.name,
            session: claims.sid,
            key: claims.kid,
            source: None,
            scopes: claims.scp.map(Arc::from),
            devices: claims.dev.map(Arc::from),
        }
    }
}

impl Caller {
    /// Refuses, naming the scope, unless the caller's key allows `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AccessError> {
        match &self.scopes {
            Some(scopes) if !scopes.contains(&scope) => Err(AccessError::InsufficientScope(scope)),
            _ => Ok(()),
        }
    }

    /// Whether the caller's key reaches `device` (it may still not be theirs).
    pub fn reaches(&self, device: &DeviceId) -> bool {
        self.devices.as_ref().is_none_or(|d| d.contains(device))
    }

    /// The scopes the caller's key allows; `None`: every scope.
    pub fn scopes(&self) -> Option<&[Scope]> {
        self.scopes.as_deref()
    }

    /// The devices the caller's key is limited to; `None`: no limit.
    pub fn device_limit(&self) -> Option<&[DeviceId]> {
        self.devices.as_deref()
    }

    /// Why the caller's session is no longer good, if it is not (signed out, its key
    /// revoked, its user disabled or removed), as `auth` knows now.
    pub fn ended(&self, auth: &crate::auth::Auth) -> Option<crate::auth::AuthError> {
        auth.ended_for(self.session.as_deref(), self.key.as_deref(), self.id)
    }

    /// As whom this caller asks routing for a capability.
    pub fn requester(&self) -> Requester {
        Requester::User {
            id: self.id,
            devices: self.devices.clone(),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Requester {
    /// A signed-in user: the devices they are a member of, within their key's limit.
    User {
        /// The user.
        id: UserId,
        /// The devices their key is limited to, if it is.
        devices: Option<Arc<[DeviceId]>>,
    },
    /// A device: it acts for its owners (not for its users, who could otherwise
    /// reach their own devices through someone else's), so it may use the devices
    /// any of them may use.
    Device {
        /// Its owners, from the registry.
        owners: Arc<[UserId]>,
    },
}

impl Requester {
    /// Whether device `id`, with `members`, may be used by this requester.
    pub fn may_use(&self, id: &DeviceId, members: &[UserId]) -> bool {
        match self {
            Requester::User { id: user, devices } => {
                members.contains(user) && devices.as_ref().is_none_or(|d| d.contains(id))
            }
            Requester::Device { owners, .. } => members.iter().any(|m| owners.contains(m)),
        }
    }
}

/// Why a device was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No such device, or one the caller may not use: the same to the caller.
    #[error("no such device")]
    NotFound,
    /// The caller's key does not allow this.
    #[error("this API key lacks the {0} scope")]
    InsufficientScope(Scope),
    /// The caller's key is limited to some devices, and this needs all of them (a setup
    /// token enrols a device the key could not reach).
    #[error("this API key is limited to some devices; use a key without a device limit")]
    DeviceLimited,
    /// The caller uses the device but is not one of its owners.
    #[error("only an owner of this device can do that; you are one of its users")]
    NotOwner,
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
    /// Connected to another hub of the cluster: what that hub last said of it.
    Remote(DeviceId, Live, crate::cluster::HubId),
    /// Not connected: what the catalog holds.
    Stored(DeviceRecord),
}

/// The device with this id that the caller is a member of, from the catalog (its RAM
/// view of the caller's devices, `catalog::MemberView`), for what `scope` allows.
pub async fn device(
    state: &HubState,
    caller: &Caller,
    raw_id: &str,
    scope: Scope,
) -> Result<DeviceRecord, AccessError> {
    let id = reachable_id(caller, raw_id, scope)?;
    let device = state.catalog.device_of(caller.id, &id).await?;
    member_of(device, caller)
}

/// The id, if it is one the caller's key reaches, for what `scope` allows.
fn reachable_id(caller: &Caller, raw_id: &str, scope: Scope) -> Result<DeviceId, AccessError> {
    caller.require(scope)?;
    let id: DeviceId = raw_id.parse().map_err(|_| AccessError::NotFound)?;
    if !caller.reaches(&id) {
        return Err(AccessError::NotFound);
    }
    Ok(id)
}

/// The device, if the caller is one of its members.
fn member_of(device: Option<DeviceRecord>, caller: &Caller) -> Result<DeviceRecord, AccessError> {
    device
        .filter(|d| d.role_of(caller.id).is_some())
        .ok_or(AccessError::NotFound)
}

/// The device with this id that the caller owns: what sharing it, removing its members
/// and deleting it need (the `members:write` scope). A user of it is told they are not
/// an owner; anyone else that there is no such device.
pub async fn owned_device(
    state: &HubState,
    caller: &Caller,
    raw_id: &str,
) -> Result<DeviceRecord, AccessError> {
    // Read from the catalog itself, not the view: what an owner changes next must go by
    // the members as they are now, such as one who just joined through another hub.
    let id = reachable_id(caller, raw_id, Scope::MembersWrite)?;
    let device = member_of(state.catalog.device(&id).await?, caller)?;
    match device.role_of(caller.id) {
        Some(Role::Owner) => Ok(device),
        _ => Err(AccessError::NotOwner),
    }
}

/// Every device the caller is a member of and their key reaches, from the catalog, for
/// what `scope` allows.
pub async fn devices(
    state: &HubState,
    caller: &Caller,
    scope: Scope,
) -> Result<Vec<DeviceRecord>, AccessError> {
    caller.require(scope)?;
    let mut devices = state.catalog.devices_of(caller.id).await?;
    devices.retain(|d| caller.reaches(&d.id));
    Ok(devices)
}

/// The user's device named by `given`: its 32-hex id, or a name that is unique among
/// the user's devices. A connected device is found in RAM; one connected device with
/// the name wins over offline ones of the same name (looking for those would cost a
/// catalog read per request by name); otherwise the catalog decides.
pub async fn device_by_id_or_name(
    state: &HubState,
    caller: &Caller,
    given: &str,
    scope: Scope,
) -> Result<Found, AccessError> {
    caller.require(scope)?;
    let mine =
        |id: &DeviceId, members: &[UserId]| members.contains(&caller.id) && caller.reaches(id);
    if let Ok(id) = given.parse::<DeviceId>() {
        if let Some(live) = state.registry.access(&id).filter(|a| mine(&id, &a.members)) {
            return Ok(Found::Live(id, live));
        }
        if let Some(found) = remote(state, &id, &mine) {
            return Ok(found);
        }
        return device(state, caller, given, scope).await.map(Found::Stored);
    }
    let name = decoded_name(given).ok_or(AccessError::NotFound)?;
    let mut live = state.registry.named(&name, mine);
    if let Some(cluster) = &state.cluster {
        for id in cluster.named(&name, mine) {
            if !live.contains(&id) {
                live.push(id);
            }
        }
    }
    if live.len() > 1 {
        return Err(ambiguous(&name, live));
    }
    if let Some(id) = live.pop() {
        if let Some(access) = state.registry.access(&id).filter(|a| mine(&id, &a.members)) {
            return Ok(Found::Live(id, access));
        }
        if let Some(found) = remote(state, &id, &mine) {
            return Ok(found);
        }
    }
    let mut stored: Vec<DeviceRecord> = devices(state, caller, scope)
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

/// The device, if it is connected to another hub of the cluster and `mine` lets the
/// caller use it.
fn remote(
    state: &HubState,
    id: &DeviceId,
    mine: &impl Fn(&DeviceId, &[UserId]) -> bool,
) -> Option<Found> {
    let (live, hub) = state.cluster.as_ref()?.access(id)?;
    mine(id, &live.members).then(|| Found::Remote(id.clone(), live, hub))
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
        let (one, two) = (DeviceId::from_mac(&[1; 16]), DeviceId::from_mac(&[2; 16]));
        let user = Requester::User {
            id: alice,
            devices: None,
        };
        assert!(user.may_use(&one, &[bob, alice]));
        assert!(!user.may_use(&one, &[bob]));
        let limited = Requester::User {
            id: alice,
            devices: Some(Arc::from(vec![two.clone()])),
        };
        assert!(limited.may_use(&two, &[alice]));
        assert!(
            !limited.may_use(&one, &[alice]),
            "outside the key's devices"
        );
        let device = Requester::Device {
            owners: Arc::from(vec![alice, bob]),
        };
        assert!(device.may_use(&one, &[carol, bob]));
        assert!(!device.may_use(&one, &[carol]));
        assert!(!device.may_use(&one, &[]));
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
