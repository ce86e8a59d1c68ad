//! Serves the hub's proxied HTTP requests against this device's own loopback services.
//!
//! Only services this cocoon registered can be reached, and only at
//! `127.0.0.1:<their port>`: the URL is built from the registered port and a path that
//! always starts with `/`, and the HTTP client follows no redirects and uses no proxy,
//! so nothing a request carries can make the cocoon connect anywhere else.
//!
//! A request lives only as long as someone waits for its answer: when the hub stops
//! reading the response (the client went away, or the hub gave up) before the head or
//! between two chunks, the request to the service is dropped at once, so the service
//! sees its connection close instead of working for nobody.

use std::time::Duration;

use adi_protocol::http::{check_target, is_hop_by_hop};
use adi_protocol::{DeviceToHub, ErrorCode, ProxyHead, ProxyRequest, ServiceInfo};
use adi_tunnel::{BodyReceiver, BodySender};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tracing::debug;

/// Bodies up to this size, of known length, travel whole with their head: one frame
/// instead of three. Larger ones, and those of unknown length (server-sent events),
/// stream.
const INLINE_BODY: u64 = 32 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body for the service: empty, or streamed from the hub.
type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The HTTP client for loopback services: hyper's pooled HTTP/1 client and nothing
/// more, so no proxy from the environment, no redirects (they are the client's
/// business), no decompression (bytes pass as sent), and no URL parsing beyond the
/// `http::Uri` that [`loopback_uri`] builds from the registered port.
#[derive(Clone)]
pub struct Loopback {
    client: Client<HttpConnector, ProxyBody>,
}

impl Loopback {
    /// A client with keep-alive connections, `TCP_NODELAY`, and a 5 s connect timeout.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Loopback { client }
    }
}

impl Default for Loopback {
    fn default() -> Self {
        Self::new()
    }
}

/// The HTTP client for other loopback calls (health probes, plugin endpoints): no
/// proxies from the environment, no redirects, no decompression.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Handles one proxied request to its end: the response head goes back as a control
/// message on `answers`, the body on the stream; a small body of known length goes
/// whole with its head in one frame.
pub(crate) async fn serve(
    client: Loopback,
    services: &[ServiceInfo],
    request: ProxyRequest,
    request_body: BodyReceiver,
    mut response_body: BodySender,
    answers: mpsc::Sender<DeviceToHub>,
) {
    let stream_id = request.stream_id;
    let fail = |code: ErrorCode, message: String| DeviceToHub::ProxyError {
        stream_id,
        code,
        message,
    };
    let Some(service) = services.iter().find(|s| s.name == request.service) else {
        let _ = answers
            .send(fail(
                ErrorCode::NotFound,
                format!("no service {:?} on this device", request.service),
            ))
            .await;
        response_body.reset("no such service").await;
        return;
    };
    let uri = match loopback_uri(service.port, &request.target) {
        Ok(u) => u,
        Err(why) => {
            let _ = answers.send(fail(ErrorCode::BadRequest, why)).await;
            response_body.reset("invalid target").await;
            return;
        }
    };
    let Ok(method) = http::Method::from_bytes(request.method.as_bytes()) else {
        let _ = answers
            .send(fail(ErrorCode::BadRequest, "invalid method".into()))
            .await;
        response_body.reset("invalid method").await;
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    let connection = request
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.clone());
    for (name, value) in &request.headers {
        if !is_hop_by_hop(name, connection.as_deref()) && !name.eq_ignore_ascii_case("host") {
            builder = builder.header(name.as_str(), value.as_str());
        }
    }
    let has_body = request
        .headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v.trim() != "0")
        || request
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    // After a switch of protocols the stream carries raw bytes: keep its halves for that.
    let mut upgrade_body = None;
    let body = if request.empty_body && request.upgrade.is_none() {
        // The hub said no body follows: not even an end frame will come.
        request_body.finish_implied();
        empty()
    } else if let Some(protocol) = &request.upgrade {
        builder = builder
            .header("connection", "upgrade")
            .header("upgrade", protocol.as_str());
        upgrade_body = Some(request_body);
        empty()
    } else if has_body
        || !matches!(
            request.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "DELETE"
        )
    {
        let frames = body_stream(request_body)
            .map(|chunk| chunk.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
        BodyExt::boxed(StreamBody::new(frames))
    } else {
        drop_quietly(request_body);
        empty()
    };
    let outgoing = match builder.body(body) {
        Ok(r) => r,
        Err(e) => {
            let _ = answers
                .send(fail(ErrorCode::BadRequest, format!("invalid request: {e}")))
                .await;
            response_body.reset("invalid request").await;
            return;
        }
    };
    let deadline = Duration::from_millis(request.deadline_ms.max(1));
    let sent = tokio::select! {
        // Dropping the request future closes the connection to the service.
        () = response_body.stopped() => {
            debug!(stream_id, "client went away before the response head");
            return;
        }
        sent = tokio::time::timeout(deadline, client.client.request(outgoing)) => sent,
    };
    let response = match sent {
        Err(_) => {
            let _ = answers
                .send(fail(
                    ErrorCode::Timeout,
                    format!(
                        "service {} did not answer within {deadline:?}",
                        service.name
                    ),
                ))
                .await;
            response_body.reset("timeout").await;
            return;
        }
        Ok(Err(e)) => {
            let why = if e.is_connect() {
                format!(
                    "service {} is not reachable on 127.0.0.1:{} ({})",
                    service.name,
                    service.port,
                    root_cause(&e)
                )
            } else {
                format!("service {} failed: {}", service.name, root_cause(&e))
            };
            let _ = answers.send(fail(ErrorCode::UpstreamError, why)).await;
            response_body.reset("upstream failed").await;
            return;
        }
        Ok(Ok(r)) => r,
    };
    let connection = response
        .headers()
        .get("connection")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let headers = response
        .headers()
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n.as_str(), connection.as_deref()))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let status = response.status().as_u16();
    let small = response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= INLINE_BODY);
    if upgrade_body.is_none() && small {
        // A small body of known length goes with its head in one frame.
        let read = tokio::select! {
            () = response_body.stopped() => {
                debug!(stream_id, "client went away before the response body");
                return;
            }
            read = response.into_body().collect() => read,
        };
        let body = match read {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let why = format!("service {} failed: {}", service.name, root_cause(&e));
                let _ = answers.send(fail(ErrorCode::UpstreamError, why)).await;
                response_body.reset("upstream failed").await;
                return;
            }
        };
        let head = ProxyHead { status, headers };
        let encoded = serde_json::to_vec(&head).unwrap_or_default();
        if adi_tunnel::fits_whole(encoded.len(), body.len()) {
            let _ = response_body.send_whole(&encoded, &body).await;
            return;
        }
        let ProxyHead { status, headers } = head;
        let head = DeviceToHub::ProxyResponse {
            stream_id,
            status,
            headers,
        };
        if answers.send(head).await.is_ok() && response_body.send(body).await.is_ok() {
            let _ = response_body.finish().await;
        }
        return;
    }
    let head = DeviceToHub::ProxyResponse {
        stream_id,
        status,
        headers,
    };
    if answers.send(head).await.is_err() {
        return;
    }
    if let (Some(request_body), 101) = (upgrade_body, status) {
        match hyper::upgrade::on(response).await {
            Ok(upgraded) => {
                adi_tunnel::splice(TokioIo::new(upgraded), response_body, request_body).await
            }
            Err(e) => response_body.reset(&format!("upgrade failed: {e}")).await,
        }
        return;
    }
    let mut body = response.into_body();
    loop {
        let next = tokio::select! {
            // A quiet stream (SSE between events) must not outlive its client either.
            () = response_body.stopped() => {
                debug!(stream_id, "proxied response abandoned by the client");
                return;
            }
            next = body.frame() => next,
        };
        match next {
            None => break,
            Some(Ok(frame)) => {
                let Ok(chunk) = frame.into_data() else {
                    // Trailers: HTTP/1 proxies drop them.
                    continue;
                };
                if response_body.send(chunk).await.is_err() {
                    // The client went away: dropping the response aborts the request.
                    debug!(stream_id, "proxied response abandoned by the client");
                    return;
                }
            }
            Some(Err(e)) => {
                response_body
                    .reset(&format!("service body failed: {e}"))
                    .await;
                return;
            }
        }
    }
    let _ = response_body.finish().await;
}

fn empty() -> ProxyBody {
    BodyExt::boxed(Empty::new().map_err(|never| match never {}))
}

/// `http://127.0.0.1:<port><checked, normalised target>`, or why not: the target hides
/// a `..` (the hub refuses those already; a device does not rely on it) or is not a
/// path. The URI is built from its parts, so no target can name another host.
fn loopback_uri(port: u16, target: &str) -> Result<http::Uri, String> {
    let target = check_target(target).map_err(|e| e.to_string())?;
    let invalid = || "invalid request target".to_owned();
    if !target.starts_with('/') {
        return Err(invalid());
    }
    let path = http::uri::PathAndQuery::try_from(target).map_err(|_| invalid())?;
    http::Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(format!("127.0.0.1:{port}"))
        .path_and_query(path)
        .build()
        .map_err(|_| invalid())
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn body_stream(
    receiver: BodyReceiver,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, adi_tunnel::StreamError>> + Send + 'static
{
    futures_util::stream::unfold(receiver, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// A GET's body stream holds only an end frame; read it so the stream retires cleanly.
fn drop_quietly(mut receiver: BodyReceiver) {
    tokio::spawn(async move { while receiver.recv().await.is_some() {} });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_always_point_at_the_registered_loopback_port() {
        for target in [
            "/x",
            "@evil.example/",
            "//evil.example/x",
            "/../../etc",
            "http://evil/",
            "?q=1",
        ] {
            let uri = loopback_uri(8080, target).expect("built");
            assert_eq!(uri.host(), Some("127.0.0.1"), "{target}");
            assert_eq!(uri.port_u16(), Some(8080), "{target}");
        }
        assert_eq!(
            loopback_uri(8080, "/a/../b?x=1").expect("ok").to_string(),
            "http://127.0.0.1:8080/b?x=1"
        );
        assert!(loopback_uri(8080, "/..%2f..%2fetc").is_err());
    }
}
