//! `GET /api/audit?device=&since=&limit=`: the audit events the caller may read (their
//! own actions, what was done to them, and the events of the devices they own), newest
//! first. It needs the `devices:read` scope; a device filter names a device the caller
//! is a member of.

use std::sync::Arc;

use adi_protocol::views::{AuditList, AuditView};
use adi_protocol::{ErrorCode, Scope};
use axum::extract::{Query, State};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{Caller, Json};
use crate::access;
use crate::catalog::{AuditEvent, AuditQuery};
use crate::HubState;

type AppState = Arc<HubState>;

/// Events one answer holds at most.
const MAX_LIMIT: u32 = 1000;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/api/audit", get(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    since: Option<i64>,
    #[serde(default)]
    limit: Option<u32>,
}

fn view(e: AuditEvent) -> AuditView {
    AuditView {
        seq: e.seq,
        at: e.at,
        kind: e.kind,
        actor_user: e.actor_name.or(e.actor_user.map(|u| u.to_string())),
        actor_key: e.actor_key,
        actor_device: e.actor_device,
        device: e.device,
        target_user: e.target_name.or(e.target_user.map(|u| u.to_string())),
        source: e.source,
        detail: e.detail,
    }
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<Params>,
) -> Result<Json<AuditList>, ApiError> {
    caller.require(Scope::DevicesRead)?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    let device = match params.device.as_deref() {
        Some(id) => Some(
            access::device(&state, &caller, id, Scope::DevicesRead)
                .await?
                .id,
        ),
        None => None,
    };
    let events = state
        .catalog
        .audit_events(&AuditQuery {
            viewer: caller.id,
            device,
            since: params.since.unwrap_or(0),
            limit,
        })
        .await?;
    Ok(Json(AuditList {
        events: events.into_iter().map(view).collect(),
    }))
}
