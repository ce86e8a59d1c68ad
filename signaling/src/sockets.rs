//! The two WebSocket upgrades: a cocoon's link (`/ws/cocoon`) and a signed-in
//! client's live channel (`/ws/client`). Each socket keeps its connection's place under
//! the hub's caps for as long as it lives.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::HubState;

type AppState = Arc<HubState>;

/// This module's routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ws/cocoon", get(cocoon_ws))
        .route("/ws/client", get(client_ws))
}

/// The read buffer for a cocoon's socket, from the query of its upgrade request:
/// `bodies=1` from a cocoon with services, which will carry proxied bodies. The hint is
/// taken on trust: before registration anyone may send it, but it costs no more than any
/// peer can already make the socket reserve by announcing one large frame.
fn read_buffer_bytes(config: &crate::HubConfig, query: Option<&str>) -> usize {
    let bodies = query.is_some_and(|q| q.split('&').any(|kv| kv == "bodies=1"));
    if bodies {
        config.ws_body_read_buffer_bytes
    } else {
        config.ws_read_buffer_bytes
    }
}

/// The connection's place under the hub's caps, which an upgraded socket keeps.
type Slot = Option<axum::Extension<crate::server::ConnSlot>>;

async fn cocoon_ws(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    slot: Slot,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // Control frames are held to `max_frame_bytes` by the decoder; the socket must also
    // let whole body frames through.
    let max = state
        .config
        .max_frame_bytes
        .max(adi_protocol::frame::MAX_FRAME);
    let slot = slot.map(|s| s.0);
    ws.read_buffer_size(read_buffer_bytes(&state.config, query.as_deref()))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::connection::serve(state, socket, peer, slot))
}

async fn client_ws(State(state): State<AppState>, slot: Slot, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            crate::client_ws::serve(state, socket).await;
            drop(slot);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cocoon_that_carries_bodies_gets_the_large_read_buffer() {
        let config = crate::HubConfig::default();
        for hinted in ["bodies=1", "v=2&bodies=1"] {
            assert_eq!(
                read_buffer_bytes(&config, Some(hinted)),
                config.ws_body_read_buffer_bytes,
                "{hinted}"
            );
        }
        for other in [
            None,
            Some(""),
            Some("bodies=0"),
            Some("bodies=1x"),
            Some("xbodies=1"),
        ] {
            assert_eq!(
                read_buffer_bytes(&config, other),
                config.ws_read_buffer_bytes,
                "{other:?}"
            );
        }
        assert!(config.ws_read_buffer_bytes < config.ws_body_read_buffer_bytes);
    }
}
