//! `ANY /proxy/{device}/{service}/{path...}`: an owner reaches a service on a device's
//! loopback as if it were local. The request head goes to the device as a control
//! message, both bodies stream as binary frames with flow control, and the hub keeps at
//! most a window of each body in memory, whatever its size.
//!
//! The hub checks membership and that the service is one the device registered; the
//! device connects only to `127.0.0.1:<registered port>`. Hop-by-hop headers and the
//! hub's own credentials never reach the service. A raw TCP service (kind `tcp`) is
//! reached only by an `Upgrade: adi-tcp` request, which the device answers `101` once
//! it has connected to the service; the connection then carries its bytes both ways,
//! half-closes included, and is counted on the device's connection while open. A
//! streamed answer or an upgraded connection outlives nothing that allowed it: when its
//! caller is removed from the device, the device is deleted or the session is signed
//! out, it is cut at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adi_mux::BodyReceiver;
use adi_protocol::http::{check_target, is_hop_by_hop, requested_upgrade};
use adi_protocol::{DeviceId, ErrorCode, ProxyRequest, Scope, ServiceInfo, TCP_UPGRADE};
use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tracing::{debug, Instrument};

use crate::access::{self, Found};
use crate::rest::error::ApiError;
use crate::rest::extract::{proxy_caller, Caller, SESSION_COOKIE};
use crate::rpc::{self, RpcError};
use crate::HubState;

type AppState = Arc<HubState>;

/// Request header that shortens or lengthens the wait for the response head.
pub const TIMEOUT_HEADER: &str = "x-adi-timeout-ms";

/// Where proxied paths start: `/proxy/{device}/{service}{target}`.
pub(crate) const PREFIX: &str = "/proxy/";

/// Answers every request under [`PREFIX`]. It is called for them before the route
/// table, and takes what it needs from the request itself (the device, service and
/// target from the path, the caller from its credentials, the peer from the connection),
/// so no routing, extractors or boxing stand between a request and its device.
pub(crate) async fn handle(state: AppState, req: Request) -> Response {
    let _serving = state.cluster.as_ref().map(|c| c.serving());
    let response = match proxy(&state, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    state.metrics.proxy_response(response.status());
    response
}

/// Splits `/proxy/{device}/{service}{target}` keeping the target's encoding as sent.
fn split_uri(path_and_query: &str) -> Option<(&str, &str, &str)> {
    let rest = path_and_query.strip_prefix(PREFIX)?;
    let (device, rest) = rest.split_once('/')?;
    let (service, target) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Some((device, service, target))
}

/// The protocol a request asks to switch to, if it asks (`Connection: upgrade` plus an
/// `Upgrade` header).
fn upgrade_protocol(headers: &HeaderMap) -> Option<String> {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    requested_upgrade(get(header::CONNECTION), get(header::UPGRADE))
}

fn offline() -> ApiError {
    ApiError::new(
        ErrorCode::DeviceOffline,
        "the device is offline (no recent heartbeat)",
    )
}

async fn proxy(state: &AppState, mut req: Request) -> Result<Response, ApiError> {
    let caller = proxy_caller(req.uri().path(), req.headers(), state)?;
    let Some(&ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() else {
        return Err(ApiError::internal(
            &"the connection's peer address is unknown",
        ));
    };
    // Sent on by another hub of the cluster: the client is who that hub says.
    let from_hub = crate::cluster::sent_by_hub(state.cluster.as_deref(), req.headers());
    let peer = if from_hub {
        crate::cluster::client_addr(req.headers()).unwrap_or(peer)
    } else {
        peer
    };
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let (given, service, target) = split_uri(&path_and_query)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such service"))?;
    let upgrade = upgrade_protocol(req.headers());
    let tcp = upgrade
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(TCP_UPGRADE));
    let no_service = || ApiError::new(ErrorCode::NotFound, "no such service on this device");
    // Checked once the device is known to be the caller's, so a stranger learns nothing.
    let check =
        || check_target(target).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()));
    // Whose device it is, and whether it is connected, is decided by `access`: a
    // stranger's device is "no such device", whatever else is wrong with the request.
    let (device_id, live, elsewhere) =
        match access::device_by_id_or_name(state, &caller, given, Scope::Proxy).await? {
            Found::Live(id, live) => (id, live, None),
            Found::Remote(id, live, hub) => (id, live, Some(hub)),
            Found::Stored(device) => {
                let found = device.services.iter().find(|s| s.name == service);
                reached_as_declared(found.ok_or_else(no_service)?, given, tcp)?;
                check()?;
                return Err(offline());
            }
        };
    let found = live.services.iter().find(|s| s.name == service);
    reached_as_declared(found.ok_or_else(no_service)?, given, tcp)?;
    let target = check()?;
    // A device whose socket is still open but that stopped heartbeating would never
    // answer: say so now rather than after the whole deadline.
    if !live.online {
        return Err(offline());
    }
    if live.draining {
        return Err(ApiError::new(
            ErrorCode::DeviceOffline,
            "the device is stopping and takes no new requests",
        ));
    }
    if let Some(hub) = elsewhere {
        // Connected to another hub: that hub serves the request, as it was sent. A
        // request another hub sent here is never sent on again.
        let url = state
            .cluster
            .as_ref()
            .filter(|_| !from_hub)
            .and_then(|c| c.peer_url(hub))
            .ok_or_else(offline)?;
        return Box::pin(forward(state, &url, req, peer)).await;
    }
    let span =
        tracing::debug_span!("proxy", device_id = %device_id, service, method = %req.method());
    let max_body = state.config.proxy_max_body_bytes;
    if let (Some(max), Some(len)) = (max_body, content_length(req.headers())) {
        if len > max {
            return Err(too_large(max));
        }
    }
    let deadline = deadline(state, req.headers())?;
    // As the client addressed it, by id or by name: the service builds its links on it.
    let prefix = format!("/proxy/{given}/{service}");
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    // Most requests (GETs) carry no body: the head says so, and no frame follows it.
    let empty_body = upgrade.is_none() && req.body().is_end_stream();
    let head = ProxyRequest {
        stream_id: 0,
        service: service.to_owned(),
        method: req.method().as_str().to_owned(),
        target,
        headers: forward_headers(req.headers(), peer, prefix, state.scheme()),
        deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
        upgrade: upgrade.clone(),
        empty_body,
    };
    // Made only for answers that stream: most come whole with their head.
    let guard = || Guard {
        state: state.clone(),
        device: device_id.clone(),
        caller: caller.clone(),
    };
    let opened = rpc::open_proxy(state, &device_id, head).await?;
    let (too_large_tx, too_large_rx) = oneshot::channel();
    if let Some(on_upgrade) = on_upgrade {
        // Boxed: the upgrade's wait would otherwise size every proxied request's future.
        let upgrade = upgrade.unwrap_or_default();
        // A raw TCP stream is counted on the device's connection while it is open.
        let counted = tcp.then(|| state.registry.handle(&device_id)).flatten();
        return Box::pin(finish_upgrade(
            opened,
            on_upgrade,
            deadline,
            upgrade,
            guard(),
            counted,
        ))
        .await;
    }
    let mut request_body = opened.request_body;
    let body = req.into_body();
    if empty_body {
        request_body.finish_implied();
        drop(too_large_tx);
    } else {
        tokio::spawn(
            async move {
                let mut stream = body.into_data_stream();
                let mut sent: u64 = 0;
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) => {
                            request_body
                                .reset(&format!("client body failed: {e}"))
                                .await;
                            return;
                        }
                    };
                    sent += chunk.len() as u64;
                    if max_body.is_some_and(|max| sent > max) {
                        let _ = too_large_tx.send(());
                        request_body.reset("request body exceeds the limit").await;
                        return;
                    }
                    if request_body.send(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = request_body.finish().await;
            }
            .instrument(span.clone()),
        );
    }
    let head = tokio::select! {
        head = tokio::time::timeout(deadline, opened.head) => match head {
            Err(_) => return Err(RpcError::Timeout(deadline).into()),
            Ok(Err(_)) => return Err(RpcError::Disconnected.into()),
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Ok(Ok(head))) => head,
        },
        Ok(()) = too_large_rx => return Err(too_large(max_body.unwrap_or(0))),
    };
    debug!(parent: &span, status = head.status, "proxied response");
    let mut resp = Response::new(response_body(head.body, opened.response_body, guard));
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    copy_response_headers(&head.headers, resp.headers_mut());
    Ok(resp)
}

/// Refuses a request that does not reach `service` the way its kind is reached: a raw
/// TCP service only by an [`TCP_UPGRADE`] upgrade, and such an upgrade only to one.
/// `device` is as the client named it, to show the command that would work.
fn reached_as_declared(service: &ServiceInfo, device: &str, tcp: bool) -> Result<(), ApiError> {
    let name = &service.name;
    match (service.kind.is_tcp(), tcp) {
        (true, false) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "service {name} is a raw TCP service, not HTTP: reach it with \
                 `adi connect {device} {name}` (stdin and stdout) or \
                 `adi proxy {device} {name} --listen 127.0.0.1:PORT` (a local port)"
            ),
        )),
        (false, true) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "service {name} is not a TCP service: it speaks HTTP, at /proxy/{device}/{name}/"
            ),
        )),
        _ => Ok(()),
    }
}

/// A request whose body is already in hand, sent to `service` on `device` (connected
/// here) for `caller`: what the OpenAI-compatible endpoint sends a model's server. It
/// fails, so another device may be tried, only if nothing came back yet (the device or
/// its server could not be reached, or did not answer in time); once the head is in,
/// the answer streams back as a proxied one does, cut if the caller loses the device,
/// and a client that leaves cancels it on the device.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_whole(
    state: &AppState,
    caller: &Caller,
    device: &DeviceId,
    service: &str,
    target: String,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let deadline = deadline(state, headers)?;
    let head = ProxyRequest {
        stream_id: 0,
        service: service.to_owned(),
        method: "POST".to_owned(),
        target,
        headers: forward_headers(headers, peer, String::new(), state.scheme()),
        deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
        upgrade: None,
        empty_body: body.is_empty(),
    };
    let opened = rpc::open_proxy(state, device, head).await?;
    let mut request_body = opened.request_body;
    if body.is_empty() {
        request_body.finish_implied();
    } else {
        tokio::spawn(async move {
            if request_body.send(body).await.is_ok() {
                let _ = request_body.finish().await;
            }
        });
    }
    let head = match tokio::time::timeout(deadline, opened.head).await {
        Err(_) => return Err(RpcError::Timeout(deadline).into()),
        Ok(Err(_)) => return Err(RpcError::Disconnected.into()),
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Ok(Ok(head))) => head,
    };
    let guard = || Guard {
        state: state.clone(),
        device: device.clone(),
        caller: caller.clone(),
    };
    let mut resp = Response::new(response_body(head.body, opened.response_body, guard));
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    copy_response_headers(&head.headers, resp.headers_mut());
    Ok(resp)
}

/// Serves a proxied request through the hub the device is connected to: the request
/// goes on whole (its body streamed), and that hub's answer comes back the same way, so
/// each hop holds at most its socket buffers of a body. An upgrade is spliced through.
/// That hub checks the caller again, as for a request of its own.
pub(crate) async fn forward(
    state: &AppState,
    url: &str,
    mut req: Request,
    peer: SocketAddr,
) -> Result<Response, ApiError> {
    let Some(cluster) = state.cluster.as_ref() else {
        return Err(offline());
    };
    let upgrade = upgrade_protocol(req.headers());
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade.as_deref());
    let mut resp = cluster
        .client()
        .forward(url, cluster.key(), req, peer)
        .await
        .map_err(|e| {
            debug!(hub = url, "forwarding to another hub failed: {e}");
            ApiError::new(
                ErrorCode::DeviceOffline,
                "the hub the device is connected to cannot be reached",
            )
        })?;
    if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (on_upgrade, resp.status()) {
        let hub = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::join!(client, hub) {
                (Ok(client), Ok(hub)) => {
                    let mut client = hyper_util::rt::TokioIo::new(client);
                    let mut hub = hyper_util::rt::TokioIo::new(hub);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut hub).await;
                }
                (Err(e), _) | (_, Err(e)) => debug!("upgrade through another hub failed: {e}"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    strip_hop_by_hop(resp.headers_mut(), None);
    Ok(resp.map(Body::new))
}

/// Removes the headers that belong to one connection, not to the message; an upgrade
/// keeps the two that ask for it.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&str>) {
    let connection = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str(), connection.as_deref()))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// What allowed a proxied exchange: who asked, for which device.
struct Guard {
    state: AppState,
    device: DeviceId,
    caller: Caller,
}

impl Guard {
    /// Whether the caller may still use the device on this session.
    fn allows(&self) -> bool {
        let member = self
            .state
            .registry
            .access(&self.device)
            .is_some_and(|a| a.members.contains(&self.caller.id));
        member && self.caller.ended(&self.state.auth).is_none()
    }

    /// Resolves once the caller may no longer use the device; never while they may.
    async fn lost(self) {
        let mut changes = self.state.auth.changes();
        // Checked after subscribing, so a change between the request's own check and
        // now is not missed.
        if !self.allows() {
            return;
        }
        while changes.changed().await.is_ok() {
            if !self.allows() {
                debug!(device_id = %self.device, user = %self.caller.id, "proxied stream cut: access removed");
                return;
            }
        }
        std::future::pending().await
    }
}

/// Waits for the service's answer to an upgrade request; on `101` the client's
/// upgraded connection is spliced to the stream, so WebSocket frames (or any protocol's
/// bytes) pass through both ways.
async fn finish_upgrade(
    opened: rpc::ProxyOpened,
    on_upgrade: hyper::upgrade::OnUpgrade,
    deadline: Duration,
    protocol: String,
    guard: Guard,
    counted: Option<crate::registry::ConnHandle>,
) -> Result<Response, ApiError> {
    let head = match tokio::time::timeout(deadline, opened.head).await {
        Err(_) => return Err(RpcError::Timeout(deadline).into()),
        Ok(Err(_)) => return Err(RpcError::Disconnected.into()),
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Ok(Ok(head))) => head,
    };
    let switching = head.status == 101;
    let mut resp = if switching {
        let (sender, receiver) = (opened.request_body, opened.response_body);
        let slot = counted.map(|handle| handle.tcp_stream());
        tokio::spawn(async move {
            // Counted until both directions have ended.
            let _slot = slot;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    // Dropping the splice closes both the client's connection and
                    // the stream to the device.
                    tokio::select! {
                        () = adi_mux::splice(io, sender, receiver) => {}
                        () = guard.lost() => {}
                    }
                }
                Err(e) => debug!("client upgrade failed: {e}"),
            }
        });
        Response::new(Body::empty())
    } else {
        // The service declined to switch: an ordinary response with no request body.
        let _ = opened.request_body.finish().await;
        Response::new(response_body(head.body, opened.response_body, || guard))
    };
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    copy_response_headers(&head.headers, resp.headers_mut());
    if switching {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            resp.headers_mut().insert(header::UPGRADE, v);
        }
    }
    Ok(resp)
}

fn copy_response_headers(from: &[(String, String)], to: &mut HeaderMap) {
    let connection = header_value(from, "connection");
    for (name, value) in from {
        if is_hop_by_hop(name, connection.as_deref()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            to.append(n, v);
        }
    }
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds the limit of {max} bytes"),
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn deadline(state: &HubState, headers: &HeaderMap) -> Result<Duration, ApiError> {
    match headers.get(TIMEOUT_HEADER) {
        None => Ok(state.config.proxy_timeout),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|ms| (1..=3_600_000).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("{TIMEOUT_HEADER} must be 1 to 3600000 milliseconds"),
                )
            }),
    }
}

fn header_value(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// The request headers the service sees: hop-by-hop ones, the hub's credentials and
/// the hub's own control headers removed; `X-Forwarded-*` added.
fn forward_headers(
    headers: &HeaderMap,
    peer: SocketAddr,
    prefix: String,
    proto: &str,
) -> Vec<(String, String)> {
    let connection = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut out = Vec::with_capacity(headers.len() + 4);
    let mut forwarded_for = None;
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop(n, connection.as_deref())
            || n == "authorization"
            || n == "host"
            || n == TIMEOUT_HEADER
            || n == crate::cluster::HUB_KEY_HEADER
            || n == crate::cluster::CLIENT_ADDR_HEADER
            || n.starts_with("x-forwarded-")
        {
            if n == "x-forwarded-for" {
                forwarded_for = value.to_str().ok().map(str::to_owned);
            }
            continue;
        }
        let Ok(v) = value.to_str() else { continue };
        if n == "cookie" {
            let kept: Vec<&str> = v
                .split(';')
                .map(str::trim)
                .filter(|c| !c.starts_with(&format!("{SESSION_COOKIE}=")))
                .collect();
            if !kept.is_empty() {
                out.push(("cookie".to_owned(), kept.join("; ")));
            }
            continue;
        }
        out.push((n.to_owned(), v.to_owned()));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let ip = peer.ip().to_string();
    out.push((
        "x-forwarded-for".to_owned(),
        match forwarded_for {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        },
    ));
    out.push(("x-forwarded-host".to_owned(), host.to_owned()));
    out.push(("x-forwarded-proto".to_owned(), proto.to_owned()));
    out.push(("x-forwarded-prefix".to_owned(), prefix));
    out
}

/// The body that came whole with the head, or else the one on the stream.
fn response_body(
    whole: Option<bytes::Bytes>,
    receiver: BodyReceiver,
    guard: impl FnOnce() -> Guard,
) -> Body {
    match whole {
        Some(bytes) => {
            receiver.finish_implied();
            Body::from(bytes)
        }
        None => body_from(receiver, guard()),
    }
}

/// The response body as the client reads it; dropping it (the client went away)
/// resets the stream, which cancels the request on the device. It fails, which cuts
/// the client's connection rather than end the body as if complete, when the guard's
/// access is lost.
fn body_from(receiver: BodyReceiver, guard: Guard) -> Body {
    type Lost = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let lost: Lost = Box::pin(guard.lost());
    let stream = futures_util::stream::unfold(Some((receiver, lost)), |open| async move {
        let (mut rx, mut lost) = open?;
        tokio::select! {
            () = &mut lost => Some((
                Err(std::io::Error::other("access to the device was removed")),
                None,
            )),
            next = rx.recv() => match next {
                None => None,
                Some(Ok(chunk)) => Some((Ok(chunk), Some((rx, lost)))),
                Some(Err(e)) => Some((Err(std::io::Error::other(e)), Some((rx, lost)))),
            },
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_split_into_device_service_and_target() {
        assert_eq!(
            split_uri("/proxy/dev/grafana/api/x?y=1"),
            Some(("dev", "grafana", "/api/x?y=1"))
        );
        assert_eq!(
            split_uri("/proxy/dev/grafana"),
            Some(("dev", "grafana", ""))
        );
        assert_eq!(
            split_uri("/proxy/dev/grafana?x=1"),
            Some(("dev", "grafana", "?x=1"))
        );
        assert_eq!(
            split_uri("/proxy/dev/grafana/../../other/secret"),
            Some(("dev", "grafana", "/../../other/secret"))
        );
        assert_eq!(split_uri("/proxy/dev"), None);
    }

    #[test]
    fn a_tcp_service_is_reached_only_by_a_tcp_upgrade_and_only_it_is() {
        let service = |kind| ServiceInfo {
            name: "ssh".into(),
            port: 22,
            health_path: None,
            kind,
            models: Vec::new(),
        };
        let tcp = service(adi_protocol::ServiceKind::Tcp);
        let web = service(adi_protocol::ServiceKind::Http);
        assert!(reached_as_declared(&tcp, "box", true).is_ok());
        assert!(reached_as_declared(&web, "box", false).is_ok());
        let refused = reached_as_declared(&tcp, "box", false).expect_err("plain HTTP");
        assert_eq!(refused.code(), ErrorCode::BadRequest);
        assert!(
            refused.message().contains("adi connect box ssh"),
            "{}",
            refused.message()
        );
        let refused = reached_as_declared(&web, "box", true).expect_err("not tcp");
        assert_eq!(refused.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_do_not_reach_the_service() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer secret-jwt"),
        );
        h.insert(
            "cookie",
            HeaderValue::from_static("adi_session=jwt; theme=dark"),
        );
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-drop-me"),
        );
        h.insert("x-drop-me", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("host", HeaderValue::from_static("hub:8080"));
        h.insert("x-adi-timeout-ms", HeaderValue::from_static("100"));
        h.insert("accept", HeaderValue::from_static("text/html"));
        let out = forward_headers(
            &h,
            SocketAddr::from(([10, 0, 0, 9], 5555)),
            "/proxy/d/s".to_owned(),
            "https",
        );
        let get = |n: &str| out.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("authorization"), None);
        assert_eq!(get("cookie"), Some("theme=dark"));
        assert_eq!(get("x-drop-me"), None);
        assert_eq!(get("keep-alive"), None);
        assert_eq!(get("connection"), None);
        assert_eq!(get("host"), None);
        assert_eq!(get("x-adi-timeout-ms"), None);
        assert_eq!(get("accept"), Some("text/html"));
        assert_eq!(get("x-forwarded-for"), Some("10.0.0.9"));
        assert_eq!(get("x-forwarded-host"), Some("hub:8080"));
        assert_eq!(get("x-forwarded-prefix"), Some("/proxy/d/s"));
        assert_eq!(get("x-forwarded-proto"), Some("https"));
    }
}
