//! `/healthz` and `/readyz`: whether the hub is alive, and whether it can serve.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use crate::auth::unix_now_i64;
use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready only while the catalog can be read and written (a committed write, at most
/// one a second however often this is asked); `/healthz` only says the hub is alive.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let catalog = state.catalog.clone();
    state
        .readiness
        .check(move || async move { catalog.probe_write(unix_now_i64()).await })
        .await
        .map_err(|u| ApiError::new(u.code, u.message))?;
    Ok("ready")
}
