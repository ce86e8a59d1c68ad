//! The caller's devices as the API shows them: configuration from the catalog, live
//! presence, load and health from the registry.

use std::sync::Arc;

use adi_protocol::views::{CocoonView, ConflictView, OwnerView, ServiceView};
use adi_protocol::{DeviceId, HealthStatus, ServiceInfo};
use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::error::ApiError;
use super::extract::{Caller, Json};
use crate::access;
use crate::catalog::{DeviceRecord, Owner};
use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/cocoons", get(list_cocoons))
        .route("/api/cocoons/{id}", get(get_cocoon))
        .route("/api/cocoons/{id}/services", get(get_services))
}

fn service_views(
    state: &HubState,
    id: &DeviceId,
    services: Vec<ServiceInfo>,
    online: bool,
) -> Vec<ServiceView> {
    let health = if online {
        state.registry.service_health(id)
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
            }
        })
        .collect()
}

impl From<Owner> for OwnerView {
    fn from(o: Owner) -> Self {
        OwnerView {
            id: o.id,
            name: o.name,
        }
    }
}

pub(crate) fn view(state: &HubState, d: DeviceRecord) -> CocoonView {
    let presence = state.registry.presence(&d.id);
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
            state.registry.load(&d.id)
        } else {
            None
        },
        capabilities: d.capabilities,
        in_flight: state.registry.in_flight(&d.id).unwrap_or(0),
        conflict: state.registry.conflict(&d.id).map(|c| ConflictView {
            at: c.at,
            displaced_from: c.displaced.map(|a| a.to_string()),
            connected_from: c.by.map(|a| a.to_string()),
        }),
        id: d.id,
        name: d.name,
        location: d.location,
        hardware: d.hardware,
        owners: d.owners.into_iter().map(Into::into).collect(),
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
    let devices = state.catalog.devices_owned_by(caller.id).await?;
    Ok(Json(CocoonList {
        cocoons: devices.into_iter().map(|d| view(&state, d)).collect(),
    }))
}

async fn get_cocoon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CocoonView>, ApiError> {
    let device = access::device(&state, caller.id, &id).await?;
    Ok(Json(view(&state, device)))
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
    let device = access::device(&state, caller.id, &id).await?;
    let online = state.registry.presence(&device.id).online;
    Ok(Json(ServiceList {
        services: service_views(&state, &device.id, device.services, online),
        device_id: device.id,
        online,
    }))
}
