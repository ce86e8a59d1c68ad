//! `GET /metrics`: the hub's figures in Prometheus' text format, for whoever runs it.
//!
//! Counts the hot paths keep are plain atomics, resolved once when the hub starts, so a
//! proxied request pays one atomic add; figures that the registry already knows (devices
//! connected, online, stopping) are read when Prometheus scrapes, so heartbeats pay
//! nothing. The process's own figures (CPU, memory, open files) come with them.
//!
//! The figures are the whole hub's, every user's devices together, so they are not
//! served to everyone: a peer on the hub's own loopback may read them, unless the request
//! came through a proxy on that host (it carries `Forwarded`, `X-Forwarded-For` or
//! `X-Real-IP`); anyone else needs the `--metrics-token` bearer, compared in constant
//! time. Without a token set, metrics stay on loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use adi_protocol::ErrorCode;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use subtle::ConstantTimeEq;

use crate::rest::error::ApiError;
use crate::HubState;

/// What the hub counts as it works.
pub struct Metrics {
    registry: Registry,
    /// Proxied responses by status class, index 0 for 1xx up to 4 for 5xx.
    proxy_responses: [IntCounter; 5],
    capability_requests: IntCounterVec,
    /// The `ok` series of `capability_requests`, resolved once: most answers are served.
    capability_ok: IntCounter,
    client_sockets: IntGauge,
    devices_connected: IntGauge,
    devices_online: IntGauge,
    devices_draining: IntGauge,
    connections_open: IntGauge,
    connections_refused: IntCounterVec,
}

impl Metrics {
    /// Registers every series once; nothing is resolved by name on a hot path.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let proxy = IntCounterVec::new(
            Opts::new(
                "adi_hub_proxy_responses_total",
                "Responses to requests under /proxy/, by status class (errors the hub answers itself included).",
            ),
            &["class"],
        )?;
        let proxy_responses =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| proxy.with_label_values(&[class]));
        let capability_requests = IntCounterVec::new(
            Opts::new(
                "adi_hub_capability_requests_total",
                "Capability requests answered, from users and from devices, by outcome (ok or the error code).",
            ),
            &["outcome"],
        )?;
        let client_sockets = IntGauge::new(
            "adi_hub_client_sockets",
            "Live client WebSockets (web UI and CLI sessions).",
        )?;
        let devices_connected = IntGauge::new(
            "adi_hub_devices_connected",
            "Devices with an open connection to this hub.",
        )?;
        let devices_online = IntGauge::new(
            "adi_hub_devices_online",
            "Connected devices whose last heartbeat is recent enough to count as online.",
        )?;
        let devices_draining = IntGauge::new(
            "adi_hub_devices_stopping",
            "Connected devices that said they are stopping (finishing their requests).",
        )?;
        let build = IntGauge::with_opts(
            Opts::new("adi_hub_build_info", "The hub's version, as a label.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        let connections_open = IntGauge::new(
            "adi_hub_connections",
            "TCP connections held, WebSockets included.",
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "adi_hub_connections_refused_total",
                "Connections refused at a cap, by which: per_source or total.",
            ),
            &["cap"],
        )?;
        build.set(1);
        for c in [
            Box::new(proxy) as Box<dyn prometheus::core::Collector>,
            Box::new(capability_requests.clone()),
            Box::new(client_sockets.clone()),
            Box::new(devices_connected.clone()),
            Box::new(devices_online.clone()),
            Box::new(devices_draining.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_refused.clone()),
            Box::new(build),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c)?;
        }
        Ok(Metrics {
            registry,
            proxy_responses,
            capability_ok: capability_requests.with_label_values(&["ok"]),
            capability_requests,
            client_sockets,
            devices_connected,
            devices_online,
            devices_draining,
            connections_open,
            connections_refused,
        })
    }

    /// The counters the accept loop bumps when it refuses a connection at a cap.
    pub(crate) fn connections_refused(&self) -> crate::server::Refused {
        crate::server::Refused {
            per_source: self.connections_refused.with_label_values(&["per_source"]),
            total: self.connections_refused.with_label_values(&["total"]),
        }
    }

    /// Counts one response to a proxied request.
    pub fn proxy_response(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.proxy_responses[class].inc();
    }

    /// Counts one answered capability request: `None` for a served one.
    pub fn capability_answered(&self, error: Option<ErrorCode>) {
        match error {
            None => self.capability_ok.inc(),
            Some(code) => self
                .capability_requests
                .with_label_values(&[code.as_str()])
                .inc(),
        }
    }

    /// A client socket opened; it is counted until the guard is dropped.
    pub fn client_socket(self: &Arc<Self>) -> ClientSocket {
        self.client_sockets.inc();
        ClientSocket(self.clone())
    }

    fn render(&self, state: &HubState) -> Result<String, prometheus::Error> {
        let devices = state.registry.counts();
        self.devices_connected.set(gauge_value(devices.connected));
        self.devices_online.set(gauge_value(devices.online));
        self.devices_draining.set(gauge_value(devices.draining));
        self.connections_open
            .set(gauge_value(state.admission.open()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Keeps one client socket counted while it lives.
pub struct ClientSocket(Arc<Metrics>);

impl Drop for ClientSocket {
    fn drop(&mut self) {
        self.0.client_sockets.dec();
    }
}

/// Whether a request may read the metrics: see the module's doc.
fn may_read(state: &HubState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(token) = state.config.metrics_token.as_deref() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return Ok(());
        }
    }
    let proxied = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    if peer.ip().is_loopback() && !proxied {
        return Ok(());
    }
    Err(if state.config.metrics_token.is_some() {
        ApiError::new(
            ErrorCode::Unauthorized,
            "metrics need the hub's metrics token as a bearer",
        )
    } else {
        ApiError::new(
            ErrorCode::Forbidden,
            "metrics are served on the hub's loopback only; set --metrics-token to read them from elsewhere",
        )
    })
}

pub(crate) async fn serve(
    State(state): State<Arc<HubState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = may_read(&state, peer, &headers) {
        return e.into_response();
    }
    match state.metrics.render(&state) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}
