//! `GET /api/hubs`: the hubs serving now, and the route another hub of the cluster
//! uses to ask a device connected here something (`/internal/hub/rpc`), answered only
//! to a request that carries the cluster's hub key.

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{ErrorCode, Scope};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Caller, Json};
use crate::cluster::peer::RPC_PATH;
use crate::rpc::RpcError;
use crate::HubState;
use adi_protocol::cluster::{Rpc, RpcAnswer};

type AppState = Arc<HubState>;

/// Largest device request another hub may send.
const MAX_RPC_BYTES: usize = 64 * 1024 * 1024;
/// Longest deadline another hub may ask for.
const MAX_RPC_DEADLINE: Duration = Duration::from_secs(3600);

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/hubs", get(list))
        .route(RPC_PATH, post(rpc))
}

/// One hub, as `GET /api/hubs` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct HubView {
    /// Its id (random per process); absent for a hub that runs alone.
    pub id: Option<uuid::Uuid>,
    /// Its base URL.
    pub url: String,
    /// Devices connected to it.
    pub devices: u32,
    /// Requests it serves now.
    pub in_flight: u32,
    /// When it started, Unix seconds.
    pub started_at: Option<i64>,
    /// It is stopping.
    pub draining: bool,
    /// The hub that answered.
    pub this: bool,
    /// For the hub that answered: the devices it sees connected to any hub of the
    /// cluster (its own and those the others told it of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sees: Option<u64>,
}

/// The answer of `GET /api/hubs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HubList {
    /// Every hub alive, this one first.
    pub hubs: Vec<HubView>,
}

async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<HubList>, ApiError> {
    caller.require(Scope::DevicesRead)?;
    let devices = u32::try_from(state.registry.len()).unwrap_or(u32::MAX);
    let Some(cluster) = &state.cluster else {
        return Ok(Json(HubList {
            hubs: vec![HubView {
                id: None,
                url: state.listed_url(),
                devices,
                in_flight: 0,
                started_at: None,
                draining: state.shutdown.is_cancelled(),
                this: true,
                sees: Some(u64::from(devices)),
            }],
        }));
    };
    let mut hubs = vec![HubView {
        id: Some(cluster.id),
        url: state.listed_url(),
        devices,
        in_flight: cluster.in_flight(),
        started_at: Some(cluster.started_at()),
        draining: cluster.is_draining(),
        this: true,
        sees: Some(
            u64::from(devices)
                + cluster.remote_count(|id| state.registry.connected_at(id).is_some()) as u64,
        ),
    }];
    let mut peers: Vec<HubView> = cluster
        .peers()
        .into_iter()
        .map(|(id, p)| HubView {
            id: Some(id),
            url: p.url.to_string(),
            devices: p.devices,
            in_flight: p.in_flight,
            started_at: Some(p.started_at),
            draining: p.draining,
            this: false,
            sees: None,
        })
        .collect();
    peers.sort_by(|a, b| a.url.cmp(&b.url));
    hubs.extend(peers);
    Ok(Json(HubList { hubs }))
}

/// A device request from another hub, for a device connected here. Anything without
/// the hub key is answered as an unknown route, before its body is read.
async fn rpc(State(state): State<AppState>, req: Request) -> Response {
    let Some(cluster) = state
        .cluster
        .as_ref()
        .filter(|c| crate::cluster::sent_by_hub(Some(c), req.headers()))
    else {
        return ApiError::new(ErrorCode::NotFound, "no such API route").into_response();
    };
    let _serving = cluster.serving();
    let body = match axum::body::to_bytes(req.into_body(), MAX_RPC_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("reading the request: {e}"))
                .into_response()
        }
    };
    let rpc: Rpc = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("undecodable request: {e}"))
                .into_response()
        }
    };
    let deadline = Duration::from_millis(rpc.deadline_ms).min(MAX_RPC_DEADLINE);
    let answer = match crate::rpc::local_request(&state, &rpc.device, rpc.request, deadline).await {
        Ok(reply) => RpcAnswer::Ok(reply),
        Err(RpcError::Offline) => RpcAnswer::Offline,
        Err(RpcError::Busy) => RpcAnswer::Busy,
        Err(RpcError::Timeout(d)) => {
            RpcAnswer::Timeout(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
        Err(RpcError::Disconnected) => RpcAnswer::Disconnected,
        Err(RpcError::Remote(e)) => RpcAnswer::Remote(e),
    };
    axum::Json(answer).into_response()
}
