//! The REST edge. It owns the route table and nothing else: every route lives in the
//! module named for what it serves, each refusal is a [`error::ApiError`], the caller
//! and JSON bodies come from [`extract`], and whether the caller may touch a device is
//! decided by [`crate::access`], never here. No module below imports this one.
//!
//! - [`error`]: the one error shape and every conversion into it
//! - [`extract`]: the caller (bearer session, or the session cookie on `/proxy/`) and
//!   JSON bodies
//! - `devices`: the caller's devices, with live presence
//! - `tokens`: setup and share tokens, minted and claimed
//! - `session`: signing in with an API key, and the web UI's sign-in and sign-out
//! - `tasks`: a device's tasks and the merged list across devices
//! - `capabilities`: capability requests, served by the best device
//! - `listing`: the query of a merged task listing, shared with the client socket
//! - `sockets`: the cocoon and client WebSocket upgrades
//! - `health`: liveness and readiness
//! - `install`: the install script, the hub's own executable and the web UI's page

pub(crate) mod capabilities;
mod devices;
pub mod error;
pub mod extract;
mod health;
pub(crate) mod install;
pub(crate) mod listing;
mod session;
mod sockets;
pub(crate) mod tasks;
mod tokens;

use std::convert::Infallible;
use std::sync::Arc;

use adi_protocol::ErrorCode;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::future::{Either, FutureExt as _};

use crate::HubState;
pub(crate) use devices::view;
use error::ApiError;

type AppState = Arc<HubState>;

/// Every route of the hub. A proxied request, the hot path, skips the route table: the
/// proxy reads device, service and target from the path itself, so matching and
/// capturing them first would only be repeated work.
pub fn app(
    state: AppState,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let routes = router(state.clone());
    tower::service_fn(move |req: Request| {
        if req.uri().path().starts_with(crate::proxy::PREFIX) {
            Either::Left(crate::proxy::handle(state.clone(), req).map(Ok))
        } else {
            Either::Right(tower::Service::call(&mut routes.clone(), req))
        }
    })
}

/// Every route of the hub but the proxy.
fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::routes())
        .route("/metrics", get(crate::metrics::serve))
        .merge(sockets::routes())
        .merge(session::routes())
        .merge(devices::routes())
        .merge(tokens::routes())
        .merge(capabilities::routes())
        .merge(tasks::routes())
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .merge(install::routes())
        .with_state(state)
}

async fn api_not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such API route")
}
