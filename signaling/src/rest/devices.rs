//! The caller's devices as the API shows them (configuration from the catalog, live
//! presence, load and health from the registry), and what their owners do with them:
//! list and remove members, leave, delete. A removal takes effect at once: the
//! registry's copy of the members changes with the catalog, and every open proxied
//! stream and socket is told to look again whether it may go on.

use std::sync::Arc;

use adi_protocol::views::{
    CocoonView, ConflictView, DeviceDeleted, MemberList, MemberView, OwnerView, RoleChange,
    ServiceView,
};
use adi_protocol::{DeviceId, ErrorCode, HealthStatus, Role, Scope, ServiceInfo};
use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::Router;
use serde::Serialize;

use super::error::ApiError;
use super::extract::{Caller, Json};
use crate::access::{self, AccessError};
use crate::audit;
use crate::auth::unix_now_i64;
use crate::catalog::{CatalogError, DeviceRecord, Member, UserId};
use crate::history::HistoryView;
use crate::registry::{Grants, Stop};
use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/cocoons", get(list_cocoons))
        .route("/api/cocoons/{id}", get(get_cocoon).delete(delete_cocoon))
        .route("/api/cocoons/{id}/services", get(get_services))
        .route("/api/cocoons/{id}/load", get(get_load))
        .route("/api/cocoons/{id}/members", get(list_members))
        .route(
            "/api/cocoons/{id}/members/{user}",
            delete(remove_member).patch(set_member_role),
        )
}

fn service_views(
    state: &HubState,
    id: &DeviceId,
    services: Vec<ServiceInfo>,
    online: bool,
) -> Vec<ServiceView> {
    let health = if online {
        state.service_health(id)
    } else {
        Vec::new()
    };
    services
        .into_iter()
        .map(|s| {
            let h = health.iter().find(|h| h.name == s.name);
            ServiceView {
                health: h.map_or(HealthStatus::Unknown, |h| h.status),
                health_detail: h.and_then(|h| h.detail.clone()),
                name: s.name,
                port: s.port,
                health_path: s.health_path,
                kind: s.kind,
                models: s.models,
            }
        })
        .collect()
}

fn member_view(m: &Member) -> MemberView {
    MemberView {
        id: m.id,
        name: m.name.clone(),
        role: m.role,
    }
}

/// The device as `caller` sees it.
pub(crate) fn view(state: &HubState, d: DeviceRecord, caller: UserId) -> CocoonView {
    let role = d.role_of(caller);
    let presence = state.presence(&d.id);
    CocoonView {
        status: match (presence.online, presence.draining) {
            (true, true) => "stopping",
            (true, false) => "online",
            (false, _) => "offline",
        }
        .into(),
        online: presence.online,
        last_heartbeat_age_secs: presence
            .last_heartbeat_age
            .map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
        services: service_views(state, &d.id, d.services, presence.online),
        load: if presence.online {
            state.load(&d.id)
        } else {
            None
        },
        capabilities: d.capabilities,
        in_flight: state.in_flight(&d.id),
        tcp_streams: state.registry.tcp_streams(&d.id).unwrap_or(0),
        hub: state.hub_of(&d.id),
        conflict: state.registry.conflict(&d.id).map(|c| ConflictView {
            at: c.at,
            displaced_from: c.displaced.map(|a| a.to_string()),
            connected_from: c.by.map(|a| a.to_string()),
        }),
        id: d.id,
        name: d.name,
        location: d.location,
        hardware: d.hardware,
        owners: d
            .members
            .iter()
            .filter(|m| m.role == Role::Owner)
            .map(|m| OwnerView {
                id: m.id,
                name: m.name.clone(),
            })
            .collect(),
        members: d.members.iter().map(member_view).collect(),
        role,
        created_at: d.created_at,
    }
}

#[derive(Serialize)]
struct CocoonList {
    cocoons: Vec<CocoonView>,
}

async fn list_cocoons(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<CocoonList>, ApiError> {
    let devices = access::devices(&state, &caller, Scope::DevicesRead).await?;
    Ok(Json(CocoonList {
        cocoons: devices
            .into_iter()
            .map(|d| view(&state, d, caller.id))
            .collect(),
    }))
}

async fn get_cocoon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CocoonView>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    Ok(Json(view(&state, device, caller.id)))
}

#[derive(Serialize)]
struct ServiceList {
    device_id: DeviceId,
    online: bool,
    services: Vec<ServiceView>,
}

async fn get_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ServiceList>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let online = state.presence(&device.id).online;
    Ok(Json(ServiceList {
        services: service_views(&state, &device.id, device.services, online),
        device_id: device.id,
        online,
    }))
}

/// The device's CPU, RAM and GPU load over the last hour, from the heartbeats this hub
/// kept in RAM: empty columns for a device that reported nothing to this hub lately.
async fn get_load(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HistoryView>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    let history = state.registry.history();
    Ok(Json(
        history
            .view(&device.id, crate::history::now_ms())
            .unwrap_or_else(|| HistoryView {
                device_id: device.id.clone(),
                step_secs: u32::try_from(history.step().as_secs()).unwrap_or(u32::MAX),
                window_secs: crate::history::WINDOW.as_secs(),
                cpu_count: 0,
                ram_total_bytes: 0,
                at: Vec::new(),
                cpu_percent: Vec::new(),
                ram_used_bytes: Vec::new(),
                gpus: Vec::new(),
            }),
    ))
}

async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MemberList>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::DevicesRead).await?;
    Ok(Json(MemberList {
        members: device.members.iter().map(member_view).collect(),
        device_id: device.id,
    }))
}

/// Removes a member: any member may remove themselves (leave); only an owner may remove
/// someone else. `{user}` is a user name, a user id, or `me`. The last owner cannot
/// go: the device would be left with nobody to manage it.
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, who)): Path<(String, String)>,
) -> Result<Json<MemberList>, ApiError> {
    let device = access::device(&state, &caller, &id, Scope::MembersWrite).await?;
    let member = named_member(&device, &who, caller.id).ok_or_else(|| not_a_member(&who))?;
    if member != caller.id && device.role_of(caller.id) != Some(Role::Owner) {
        return Err(AccessError::NotOwner.into());
    }
    let left = match state
        .catalog
        .remove_member(&device.id, member, unix_now_i64())
        .await
    {
        Ok(left) => left,
        Err(CatalogError::NotFound(_)) => return Err(not_a_member(&who)),
        Err(e) => return Err(e.into()),
    };
    state.registry.set_grants(&device.id, &Grants::of(&left));
    state.auth.announce_change();
    tracing::info!(device_id = %device.id, user = %member, by = %caller.id, "member removed");
    let kind = if member == caller.id {
        audit::Kind::MemberLeft
    } else {
        audit::Kind::MemberRemoved
    };
    audit::record(&state, audit::by(&caller, kind).on(&device.id).to(member)).await;
    Ok(Json(MemberList {
        members: left.iter().map(member_view).collect(),
        device_id: device.id,
    }))
}

/// Gives a member another role (`{"role": "owner"}` or `{"role": "user"}`): only an
/// owner may, and it goes by the members as the catalog has them now. `{user}` is as for
/// removal. The last owner cannot become a user; an owner who becomes one takes the
/// share tokens they made with them, as a user may not share.
async fn set_member_role(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, who)): Path<(String, String)>,
    Json(change): Json<RoleChange>,
) -> Result<Json<MemberList>, ApiError> {
    let device = access::owned_device(&state, &caller, &id).await?;
    let member = named_member(&device, &who, caller.id).ok_or_else(|| not_a_member(&who))?;
    let members = match state
        .catalog
        .set_role(&device.id, member, change.role, unix_now_i64())
        .await
    {
        Ok(members) => members,
        Err(CatalogError::NotFound(_)) => return Err(not_a_member(&who)),
        Err(e) => return Err(e.into()),
    };
    state.registry.set_grants(&device.id, &Grants::of(&members));
    state.auth.announce_change();
    tracing::info!(
        device_id = %device.id,
        user = %member,
        role = change.role.as_str(),
        by = %caller.id,
        "member role changed"
    );
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::MemberRoleChanged)
            .on(&device.id)
            .to(member)
            .detail(change.role.as_str()),
    )
    .await;
    Ok(Json(MemberList {
        members: members.iter().map(member_view).collect(),
        device_id: device.id,
    }))
}

/// `who` names nobody among the device's members.
fn not_a_member(who: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("{who:?} is not a member of this device"),
    )
}

/// The member `who` names: `me`, a user id, or a user name.
fn named_member(device: &DeviceRecord, who: &str, caller: UserId) -> Option<UserId> {
    if who == "me" {
        return device.role_of(caller).map(|_| caller);
    }
    device
        .members
        .iter()
        .find(|m| m.id.to_string() == who || m.name == who)
        .map(|m| m.id)
}

/// Deletes a device its caller owns: the catalog forgets it, its members lose it at
/// once, and its agent, if connected, is told it was removed and stops.
async fn delete_cocoon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceDeleted>, ApiError> {
    let device = access::owned_device(&state, &caller, &id).await?;
    if !state
        .catalog
        .delete_device(&device.id, unix_now_i64())
        .await?
    {
        return Err(ApiError::not_found_device());
    }
    state.registry.set_grants(&device.id, &Grants::default());
    state.registry.history().forget(&device.id);
    let agent_told = state.registry.stop(&device.id, Stop::Removed);
    state.auth.announce_change();
    tracing::info!(device_id = %device.id, by = %caller.id, agent_told, "device deleted");
    audit::record(
        &state,
        audit::by(&caller, audit::Kind::DeviceDeleted)
            .on(&device.id)
            .detail(device.name.clone()),
    )
    .await;
    Ok(Json(DeviceDeleted {
        device_id: device.id,
        name: device.name,
        agent_told,
    }))
}
