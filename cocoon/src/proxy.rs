//! Serves the hub's proxied HTTP requests against this device's own loopback services,
//! and the raw TCP streams of its `tcp` services (an `adi-tcp` upgrade: the cocoon
//! connects to the service, answers `101` and passes bytes both ways, speaking no HTTP
//! to it). A TCP service is reached only that way, and only a TCP service is.
//!
//! Only services this cocoon registered can be reached, and only at
//! `127.0.0.1:<their port>`: the connection is opened to the registered port (see
//! [`crate::pool`]), the request carries a checked path that always starts with `/`,
//! and nothing follows redirects or uses a proxy, so nothing a request carries can make
//! the cocoon connect anywhere else.
//!
//! A request lives only as long as someone waits for its answer: when the hub stops
//! reading the response (the client went away, or the hub gave up) before the head or
//! between two chunks, the request to the service is dropped at once, so the service
//! sees its connection close instead of working for nobody.

use std::time::Duration;

use adi_mux::{BodyReceiver, BodySender};
use adi_protocol::exchange;
use adi_protocol::http::{check_target, is_hop_by_hop};
use adi_protocol::{DeviceToHub, ErrorCode, ProxyHead, ProxyRequest, ServiceInfo, TCP_UPGRADE};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tracing::debug;

use crate::pool::{ExchangeError, Pool, ProxyBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    pool: Pool,
    services: &[ServiceInfo],
    request: ProxyRequest,
    request_body: BodyReceiver,
    response_body: BodySender,
    answers: mpsc::Sender<DeviceToHub>,
) {
    let stream_id = request.stream_id;
    // A raw TCP service is reached only as a byte stream, and only it is.
    let tcp = request
        .upgrade
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(TCP_UPGRADE));
    match services.iter().find(|s| s.name == request.service) {
        Some(service) if service.kind.is_tcp() && tcp => {
            let deadline = Duration::from_millis(request.deadline_ms.max(1));
            let opened = Box::pin(serve_tcp(
                service,
                stream_id,
                deadline,
                request_body,
                response_body,
                &answers,
            ));
            if let Err((refusal, response_body)) = opened.await {
                Box::pin(refusal.send(stream_id, &answers, response_body)).await;
            }
            return;
        }
        Some(service) if service.kind.is_tcp() || tcp => {
            let why = if tcp {
                format!("service {} is not a TCP service", service.name)
            } else {
                format!(
                    "service {} is a raw TCP service: it is reached only as a byte stream",
                    service.name
                )
            };
            let refusal = Refusal::bad_request(why, "wrong kind of service");
            return Box::pin(refusal.send(stream_id, &answers, response_body)).await;
        }
        _ => {}
    }
    // Every way to fail ends in one place, so the future holds one refusal's state, not
    // one per reason; and the exchange and the answer are boxed: the task's own future
    // stays small, so spawning and polling it copies little.
    let refusal = 'refused: {
        let Prepared {
            service,
            outgoing,
            upgrade_body,
            deadline,
        } = match prepare(services, request, request_body) {
            Ok(p) => p,
            Err(r) => break 'refused r,
        };
        let upgrade = upgrade_body.is_some();
        let exchange = Box::pin(async {
            if upgrade {
                // The switched connection leaves the pool: its own task hands it over.
                let mut sender = pool.upgradable(service.port).await?;
                let response = sender.send_request(outgoing).await?;
                Ok((None, response))
            } else {
                let (conn, response) = pool.send(service.port, outgoing).await?;
                Ok((Some(conn), response))
            }
        });
        let sent: Result<Result<_, ExchangeError>, _> = tokio::select! {
            // Dropping the request future closes the connection to the service.
            () = response_body.stopped() => {
                debug!(stream_id, "client went away before the response head");
                return;
            }
            sent = tokio::time::timeout(deadline, exchange) => sent,
        };
        let (conn, response) = match sent {
            Ok(Ok(answered)) => answered,
            Err(_) => {
                break 'refused Refusal {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "service {} did not answer within {deadline:?}",
                        service.name
                    ),
                    reset: "timeout",
                }
            }
            Ok(Err(ExchangeError::Connect(why))) => {
                break 'refused Refusal::upstream(format!(
                    "service {} is not reachable on 127.0.0.1:{} ({why})",
                    service.name, service.port,
                ))
            }
            Ok(Err(ExchangeError::Http(e))) => {
                break 'refused Refusal::upstream(format!(
                    "service {} failed: {}",
                    service.name,
                    root_cause(&e)
                ))
            }
        };
        let answer = Box::pin(respond(
            service,
            stream_id,
            response,
            upgrade_body,
            response_body,
            answers,
        ));
        let Some(mut conn) = conn else {
            answer.await;
            return;
        };
        // The connection is driven while the answer is passed on, and goes back to the
        // pool only when that is over.
        conn.drive(answer).await;
        pool.checkin(conn);
        return;
    };
    Box::pin(refusal.send(stream_id, &answers, response_body)).await;
}

/// Opens a raw TCP stream to `service`: connects to `127.0.0.1:<its port>` (no HTTP is
/// spoken to it), answers the hub `101`, and splices the connection with the stream
/// until both directions have ended, half-closes passed on either way. A client that
/// goes away while the connection is being made leaves nothing behind.
async fn serve_tcp(
    service: &ServiceInfo,
    stream_id: u32,
    deadline: Duration,
    request_body: BodyReceiver,
    response_body: BodySender,
    answers: &mpsc::Sender<DeviceToHub>,
) -> Result<(), (Refusal, BodySender)> {
    let connect = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, service.port));
    let connected = tokio::select! {
        () = response_body.stopped() => {
            debug!(stream_id, "client went away before the TCP connection was made");
            return Ok(());
        }
        connected = tokio::time::timeout(deadline, connect) => connected,
    };
    let tcp = match connected {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let why = format!(
                "service {} is not reachable on 127.0.0.1:{} ({e})",
                service.name, service.port
            );
            return Err((Refusal::upstream(why), response_body));
        }
        Err(_) => {
            let refusal = Refusal {
                code: ErrorCode::Timeout,
                message: format!(
                    "service {} did not accept a connection within {deadline:?}",
                    service.name
                ),
                reset: "timeout",
            };
            return Err((refusal, response_body));
        }
    };
    // Interactive protocols (SSH keystrokes) must not wait for a fuller segment.
    let _ = tcp.set_nodelay(true);
    let head = ProxyHead {
        status: 101,
        headers: vec![
            ("connection".into(), "upgrade".into()),
            ("upgrade".into(), TCP_UPGRADE.into()),
        ],
    };
    let exchange::ResponseHead::Message { head, .. } =
        exchange::response_head(stream_id, head, None)
    else {
        // A head without a body never goes whole.
        return Ok(());
    };
    if answers.send(*head).await.is_err() {
        return Ok(());
    }
    debug!(stream_id, service = %service.name, "raw TCP stream open");
    adi_mux::splice(tcp, response_body, request_body).await;
    debug!(stream_id, service = %service.name, "raw TCP stream closed");
    Ok(())
}

/// A request ready for its service.
struct Prepared<'a> {
    service: &'a ServiceInfo,
    outgoing: http::Request<ProxyBody>,
    /// The request's stream, kept for the raw bytes after a switch of protocols.
    upgrade_body: Option<BodyReceiver>,
    deadline: Duration,
}

/// Why a request gets no answer from its service, as the hub is told.
struct Refusal {
    code: ErrorCode,
    message: String,
    /// Why the response stream is reset.
    reset: &'static str,
}

impl Refusal {
    fn bad_request(message: impl Into<String>, reset: &'static str) -> Self {
        Refusal {
            code: ErrorCode::BadRequest,
            message: message.into(),
            reset,
        }
    }

    fn upstream(message: String) -> Self {
        Refusal {
            code: ErrorCode::UpstreamError,
            message,
            reset: "upstream failed",
        }
    }

    async fn send(self, stream_id: u32, answers: &mpsc::Sender<DeviceToHub>, body: BodySender) {
        let Refusal {
            code,
            message,
            reset,
        } = self;
        let _ = answers
            .send(DeviceToHub::ProxyError {
                stream_id,
                code,
                message,
            })
            .await;
        body.reset(reset).await;
    }
}

/// The request for the service, built from what the hub sent: the registered
/// service, a checked target, the headers less hop-by-hop ones, and the body.
fn prepare(
    services: &[ServiceInfo],
    request: ProxyRequest,
    request_body: BodyReceiver,
) -> Result<Prepared<'_>, Refusal> {
    let Some(service) = services.iter().find(|s| s.name == request.service) else {
        return Err(Refusal {
            code: ErrorCode::NotFound,
            message: format!("no service {:?} on this device", request.service),
            reset: "no such service",
        });
    };
    let uri =
        origin_form(&request.target).map_err(|why| Refusal::bad_request(why, "invalid target"))?;
    let method = http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| Refusal::bad_request("invalid method", "invalid method"))?;
    // The header map is filled in place: a request builder moves its whole state
    // through every header it adds.
    let mut headers = http::HeaderMap::with_capacity(request.headers.len() + 1);
    let host = format!("127.0.0.1:{}", service.port);
    headers.insert(
        http::header::HOST,
        http::HeaderValue::try_from(host)
            .map_err(|_| Refusal::bad_request("invalid host", "invalid request"))?,
    );
    let connection = request
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.as_str());
    for (name, value) in &request.headers {
        if is_hop_by_hop(name, connection) || name.eq_ignore_ascii_case("host") {
            continue;
        }
        let invalid = || {
            Refusal::bad_request(
                format!("invalid request: invalid header {name:?}"),
                "invalid request",
            )
        };
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| invalid())?;
        headers.append(name, value);
    }
    let has_body = request
        .headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v.trim() != "0")
        || request
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    let mut upgrade_body = None;
    let body = if request.empty_body && request.upgrade.is_none() {
        // The hub said no body follows: not even an end frame will come.
        request_body.finish_implied();
        empty()
    } else if let Some(protocol) = &request.upgrade {
        let protocol = http::HeaderValue::from_str(protocol)
            .map_err(|_| Refusal::bad_request("invalid upgrade protocol", "invalid request"))?;
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        headers.insert(http::header::UPGRADE, protocol);
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
    let mut outgoing = http::Request::new(body);
    *outgoing.method_mut() = method;
    *outgoing.uri_mut() = uri;
    *outgoing.headers_mut() = headers;
    Ok(Prepared {
        service,
        outgoing,
        upgrade_body,
        deadline: Duration::from_millis(request.deadline_ms.max(1)),
    })
}

/// Passes a service's answer on to the hub: the head as a control message on
/// `answers`, the body on the stream; a small body of known length whole with its head
/// in one frame.
async fn respond(
    service: &ServiceInfo,
    stream_id: u32,
    mut response: http::Response<hyper::body::Incoming>,
    upgrade_body: Option<BodyReceiver>,
    mut response_body: BodySender,
    answers: mpsc::Sender<DeviceToHub>,
) {
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
        .is_some_and(|n| n <= exchange::WHOLE_BODY);
    // A small body of known length is read first, so it can go whole with its head.
    let mut read_body = None;
    if upgrade_body.is_none() && small {
        let read = tokio::select! {
            () = response_body.stopped() => {
                debug!(stream_id, "client went away before the response body");
                return;
            }
            read = response.body_mut().collect() => read,
        };
        match read {
            Ok(b) => read_body = Some(b.to_bytes()),
            Err(e) => {
                let why = format!("service {} failed: {}", service.name, root_cause(&e));
                let refusal = Refusal::upstream(why);
                return Box::pin(refusal.send(stream_id, &answers, response_body)).await;
            }
        }
    }
    let head = ProxyHead { status, headers };
    match exchange::response_head(stream_id, head, read_body) {
        exchange::ResponseHead::Whole { head, body } => {
            let _ = response_body.send_whole(&head, &body).await;
            return;
        }
        exchange::ResponseHead::Message { head, body } => {
            if answers.send(*head).await.is_err() {
                return;
            }
            if let Some(body) = body {
                if response_body.send(body).await.is_ok() {
                    let _ = response_body.finish().await;
                }
                return;
            }
        }
    }
    if let (Some(request_body), 101) = (upgrade_body, status) {
        match hyper::upgrade::on(response).await {
            Ok(upgraded) => {
                adi_mux::splice(TokioIo::new(upgraded), response_body, request_body).await
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

/// The checked, normalised target as an origin-form URI (`/path?query`, what an
/// HTTP/1 request line carries to an origin server), or why not: the target hides a
/// `..` (the hub refuses those already; a device does not rely on it) or is not a path.
/// It has no scheme or authority, so no target can name another host.
fn origin_form(target: &str) -> Result<http::Uri, String> {
    let target = check_target(target).map_err(|e| e.to_string())?;
    let invalid = || "invalid request target".to_owned();
    if !target.starts_with('/') {
        return Err(invalid());
    }
    let path = http::uri::PathAndQuery::try_from(target).map_err(|_| invalid())?;
    http::Uri::builder()
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
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, adi_mux::StreamError>> + Send + 'static {
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

    fn request(headers: &[(&str, &str)]) -> ProxyRequest {
        ProxyRequest {
            stream_id: 1,
            service: "web".into(),
            method: "GET".into(),
            target: "/a?b=1".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            deadline_ms: 1000,
            upgrade: None,
            empty_body: true,
        }
    }

    fn services() -> Vec<ServiceInfo> {
        serde_json::from_value(serde_json::json!([{"name": "web", "port": 8080}])).expect("service")
    }

    fn body() -> BodyReceiver {
        let (tx, _rx) = mpsc::channel(1);
        adi_mux::Streams::new(tx).open(1).0
    }

    #[tokio::test]
    async fn the_request_names_the_loopback_host_and_drops_hop_by_hop_headers() {
        let services = services();
        let sent = request(&[
            ("Host", "hub.example"),
            ("Connection", "keep-alive, x-private"),
            ("X-Private", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("Accept", "text/html"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Accept", "*/*"),
        ]);
        let Ok(prepared) = prepare(&services, sent, body()) else {
            panic!("a valid request is refused");
        };
        let outgoing = prepared.outgoing;
        assert_eq!(outgoing.method(), http::Method::GET);
        assert_eq!(outgoing.uri(), "/a?b=1");
        let headers = outgoing.headers();
        assert_eq!(headers["host"], "127.0.0.1:8080");
        let accept: Vec<_> = headers.get_all("accept").iter().collect();
        assert_eq!(accept, ["text/html", "*/*"]);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1");
        for gone in ["connection", "x-private", "keep-alive"] {
            assert!(!headers.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(headers.len(), 4);
    }

    #[tokio::test]
    async fn a_malformed_header_is_refused_as_a_bad_request() {
        let services = services();
        for (name, value) in [("bad name", "x"), ("x-ok", "line\nbreak")] {
            let refused = prepare(&services, request(&[(name, value)]), body()).err();
            let Some(refusal) = refused else {
                panic!("{name:?}: {value:?} was accepted");
            };
            assert_eq!(refusal.code, ErrorCode::BadRequest);
            assert!(
                refusal.message.contains("invalid header"),
                "{}",
                refusal.message
            );
        }
        let unknown = ProxyRequest {
            service: "db".into(),
            ..request(&[])
        };
        let refused = prepare(&services, unknown, body()).err();
        assert!(matches!(
            refused,
            Some(Refusal {
                code: ErrorCode::NotFound,
                ..
            })
        ));
    }

    /// What `serve` tells the hub of `request` to `services`: its first control message.
    async fn answer_to(services: &[ServiceInfo], request: ProxyRequest) -> Option<DeviceToHub> {
        let (tx, mut rx) = mpsc::channel(8);
        let (frames, _wire) = mpsc::channel(64);
        let (body_in, body_out) = adi_mux::Streams::new(frames).open(request.stream_id);
        serve(Pool::default(), services, request, body_in, body_out, tx).await;
        rx.recv().await
    }

    #[tokio::test]
    async fn a_tcp_service_is_reached_only_by_an_adi_tcp_upgrade_and_only_it_is() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let services: Vec<ServiceInfo> = serde_json::from_value(serde_json::json!([
            {"name": "web", "port": 8080},
            {"name": "ssh", "port": port, "kind": "tcp"},
        ]))
        .expect("services");
        for (service, upgrade, code, why) in [
            ("ssh", None, ErrorCode::BadRequest, "raw TCP service"),
            (
                "ssh",
                Some("websocket"),
                ErrorCode::BadRequest,
                "raw TCP service",
            ),
            (
                "web",
                Some("adi-tcp"),
                ErrorCode::BadRequest,
                "not a TCP service",
            ),
            (
                "ssh",
                Some("ADI-TCP"),
                ErrorCode::UpstreamError,
                "not reachable",
            ),
        ] {
            let sent = ProxyRequest {
                service: service.into(),
                upgrade: upgrade.map(str::to_owned),
                empty_body: upgrade.is_none(),
                ..request(&[])
            };
            match answer_to(&services, sent).await {
                Some(DeviceToHub::ProxyError {
                    code: got, message, ..
                }) => {
                    assert_eq!(got, code, "{service} {upgrade:?}: {message}");
                    assert!(message.contains(why), "{service} {upgrade:?}: {message}");
                }
                other => panic!("{service} {upgrade:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_tcp_stream_is_answered_101_once_the_service_accepts_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let services: Vec<ServiceInfo> = serde_json::from_value(serde_json::json!([
            {"name": "ssh", "port": port, "kind": "tcp"},
        ]))
        .expect("services");
        let sent = ProxyRequest {
            service: "ssh".into(),
            upgrade: Some(TCP_UPGRADE.into()),
            empty_body: false,
            ..request(&[])
        };
        let (tx, mut rx) = mpsc::channel(8);
        let (frames, _wire) = mpsc::channel(64);
        let (body_in, body_out) = adi_mux::Streams::new(frames).open(sent.stream_id);
        let serving = tokio::spawn(async move {
            serve(Pool::default(), &services, sent, body_in, body_out, tx).await;
        });
        let (_accepted, _) = listener.accept().await.expect("the cocoon connects");
        match rx.recv().await {
            Some(DeviceToHub::ProxyResponse {
                status, headers, ..
            }) => {
                assert_eq!(status, 101);
                assert!(headers
                    .iter()
                    .any(|(n, v)| n == "upgrade" && v == TCP_UPGRADE));
            }
            other => panic!("{other:?}"),
        }
        serving.abort();
    }

    #[test]
    fn targets_are_paths_that_name_no_host() {
        for target in [
            "/x",
            "@evil.example/",
            "//evil.example/x",
            "/../../etc",
            "http://evil/",
            "?q=1",
        ] {
            let uri = origin_form(target).expect("built");
            assert_eq!(uri.host(), None, "{target}");
            assert_eq!(uri.scheme(), None, "{target}");
            assert!(uri.path().starts_with('/'), "{target}: {uri}");
        }
        assert_eq!(
            origin_form("/a/../b?x=1").expect("ok").to_string(),
            "/b?x=1"
        );
        assert!(origin_form("/..%2f..%2fetc").is_err());
    }
}
