//! The REST edge of capability routing: a user asks for a capability and the best of
//! their devices serves it (`POST /api/capabilities/{protocol}/request`), or lists which
//! of their devices offer one, with their load (`GET /api/cocoons/by-capability`).
//!
//! Only the caller's own devices are ever chosen or listed; the choice itself lives in
//! [`crate::routing`].

use std::sync::Arc;
use std::time::Duration;

use adi_protocol::capability::{best_offer, RequestBody};
use adi_protocol::{CapabilityAnswer, CapabilityOffer, CapabilityQuery, ErrorCode, Scope};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use adi_protocol::views::CocoonView;

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::view;
use crate::routing::{self, RouteError};
use crate::HubState;

/// Longest deadline a caller may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route(
            "/api/capabilities/{protocol}/request",
            post(request_capability).layer(DefaultBodyLimit::max(
                adi_protocol::DEFAULT_MAX_FRAME_BYTES * 16,
            )),
        )
        .route("/api/cocoons/by-capability", get(by_capability))
}

fn query(protocol: &str, version: Option<&str>) -> Result<CapabilityQuery, ApiError> {
    CapabilityQuery::new(protocol, version)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))
}

async fn request_capability(
    State(state): State<Arc<HubState>>,
    caller: Caller,
    Path(protocol): Path<String>,
    Json(body): Json<RequestBody>,
) -> Result<Json<CapabilityAnswer>, ApiError> {
    caller.require(Scope::Capabilities)?;
    let query = body
        .query(&protocol)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let prefer = body
        .prefer()
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "prefer_device is not a device id"))?;
    let timeout = body.deadline(state.config.capability_timeout, MAX_TIMEOUT);
    let answer = routing::request(
        &state,
        &caller.requester(),
        &query,
        body.payload,
        prefer.as_ref(),
        timeout,
    )
    .await
    .inspect_err(
        |e| tracing::debug!(user = %caller.id, code = %e.code(), "capability request failed: {e}"),
    );
    state
        .metrics
        .capability_answered(answer.as_ref().err().map(RouteError::code));
    Ok(Json(answer?))
}

#[derive(Deserialize)]
struct ByCapabilityParams {
    protocol: Option<String>,
    version: Option<String>,
    /// Only devices serving this model.
    model: Option<String>,
}

/// One device that offers the capability, with what routing would weigh.
#[derive(Serialize)]
struct Offering {
    #[serde(flatten)]
    device: CocoonView,
    /// The offer that matches, when online.
    offer: CapabilityOffer,
    /// Routing score when online: in-flight requests plus a load share; lower is better.
    score: Option<f64>,
}

#[derive(Serialize)]
struct Offerings {
    protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    cocoons: Vec<Offering>,
}

async fn by_capability(
    State(state): State<Arc<HubState>>,
    caller: Caller,
    Query(params): Query<ByCapabilityParams>,
) -> Result<Json<Offerings>, ApiError> {
    let protocol = params
        .protocol
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "protocol is required"))?;
    let query = query(protocol, params.version.as_deref())?
        .for_model(params.model.as_deref())
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let devices = crate::access::devices(&state, &caller, Scope::DevicesRead).await?;
    let mut cocoons: Vec<Offering> = devices
        .into_iter()
        .filter_map(|d| {
            let live = state.registry.candidate(&d.id, &query).or_else(|| {
                state
                    .cluster
                    .as_ref()
                    .and_then(|c| c.candidate(&d.id, &query))
            });
            let offer = match &live {
                Some(c) => c.offer.clone(),
                None => best_offer(&d.capabilities, &query)?.clone(),
            };
            Some(Offering {
                score: live.as_ref().map(routing::score),
                offer,
                device: view(&state, d, caller.id),
            })
        })
        .collect();
    // Online first, best score first; offline ones by name.
    cocoons.sort_by(|a, b| match (a.score, b.score) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.device.name.cmp(&b.device.name),
    });
    Ok(Json(Offerings {
        protocol: query.protocol,
        version: query.version.map(|v| v.to_string()),
        model: query.model,
        cocoons,
    }))
}
