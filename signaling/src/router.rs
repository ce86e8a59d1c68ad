//! The hub's route table: the REST routes, the WebSocket upgrades, `/metrics`, and the
//! proxy, which skips the table. It sits above every module it joins, so none of them
//! imports it.

use std::convert::Infallible;
use std::sync::Arc;

use adi_protocol::ErrorCode;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::future::{Either, FutureExt as _};

use crate::rest::error::ApiError;
use crate::rest::{
    audit, capabilities, devices, health, hubs, install, keys, session, tasks, tokens,
};
use crate::sockets;
use crate::HubState;

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
        .merge(hubs::routes())
        .merge(crate::openai::routes())
        .route("/metrics", get(crate::metrics::serve))
        .merge(sockets::routes())
        .merge(session::routes())
        .merge(devices::routes())
        .merge(tokens::routes())
        .merge(keys::routes())
        .merge(audit::routes())
        .merge(capabilities::routes())
        .merge(tasks::routes())
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .merge(install::routes())
        .with_state(state)
}

async fn api_not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such API route")
}
