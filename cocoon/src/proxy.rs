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
use adi_protocol::{DeviceToHub, ErrorCode, ProxyRequest, ServiceInfo};
use adi_tunnel::{BodyReceiver, BodySender};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::debug;

/// The HTTP client for loopback services: no proxies from the environment, no
/// redirects (they are the client's business), no decompression (bytes pass as sent).
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
/// message on `answers`, the body on the stream.
pub(crate) async fn serve(
    client: reqwest::Client,
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
    let url = match loopback_url(service.port, &request.target) {
        Ok(u) => u,
        Err(why) => {
            let _ = answers.send(fail(ErrorCode::BadRequest, why)).await;
            response_body.reset("invalid target").await;
            return;
        }
    };
    let Ok(method) = reqwest::Method::from_bytes(request.method.as_bytes()) else {
        let _ = answers
            .send(fail(ErrorCode::BadRequest, "invalid method".into()))
            .await;
        response_body.reset("invalid method").await;
        return;
    };
    let mut builder = client.request(method, url);
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
    if let Some(protocol) = &request.upgrade {
        builder = builder
            .header("connection", "upgrade")
            .header("upgrade", protocol.as_str());
        upgrade_body = Some(request_body);
    } else if has_body
        || !matches!(
            request.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "DELETE"
        )
    {
        builder = builder.body(reqwest::Body::wrap_stream(body_stream(request_body)));
    } else {
        drop_quietly(request_body);
    }
    let deadline = Duration::from_millis(request.deadline_ms.max(1));
    let sent = tokio::select! {
        // Dropping the request future closes the connection to the service.
        () = response_body.stopped() => {
            debug!(stream_id, "client went away before the response head");
            return;
        }
        sent = tokio::time::timeout(deadline, builder.send()) => sent,
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
    let head = DeviceToHub::ProxyResponse {
        stream_id,
        status: response.status().as_u16(),
        headers,
    };
    if answers.send(head).await.is_err() {
        return;
    }
    if let (Some(request_body), true) = (upgrade_body, response.status().as_u16() == 101) {
        match response.upgrade().await {
            Ok(upgraded) => adi_tunnel::splice(upgraded, response_body, request_body).await,
            Err(e) => response_body.reset(&format!("upgrade failed: {e}")).await,
        }
        return;
    }
    let mut body = response.bytes_stream();
    loop {
        let next = tokio::select! {
            // A quiet stream (SSE between events) must not outlive its client either.
            () = response_body.stopped() => {
                debug!(stream_id, "proxied response abandoned by the client");
                return;
            }
            next = body.next() => next,
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
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

/// `http://127.0.0.1:<port><checked, normalised target>`, or why not: the target hides
/// a `..` (the hub refuses those already; a device does not rely on it), or the URL
/// somehow names another host.
fn loopback_url(port: u16, target: &str) -> Result<reqwest::Url, String> {
    let target = check_target(target).map_err(|e| e.to_string())?;
    let invalid = || "invalid request target".to_owned();
    let url =
        reqwest::Url::parse(&format!("http://127.0.0.1:{port}{target}")).map_err(|_| invalid())?;
    (url.host_str() == Some("127.0.0.1") && url.port() == Some(port) && url.username().is_empty())
        .then_some(url)
        .ok_or_else(invalid)
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
            let url = loopback_url(8080, target).expect("built");
            assert_eq!(url.host_str(), Some("127.0.0.1"), "{target}");
            assert_eq!(url.port(), Some(8080), "{target}");
        }
        assert_eq!(
            loopback_url(8080, "/a/../b?x=1").expect("ok").as_str(),
            "http://127.0.0.1:8080/b?x=1"
        );
        assert!(loopback_url(8080, "/..%2f..%2fetc").is_err());
    }
}
