//! Connection deadlines and caps, against a real hub process: sockets that send nothing,
//! half a head, or sit idle after an answer are closed at their deadline; a source that
//! holds too many connections is refused; and when idle sockets fill the hub, health
//! checks, sign-ins and device reconnects still get through on the reserved slots.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::{wait_for, Api, Hub};

/// A TCP connection to the hub from a chosen loopback address (all of 127/8 is this
/// host's loopback, so each address is a distinct source to the hub).
async fn connect_from(source: [u8; 4], hub: &Hub) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    Ok(socket
        .connect(SocketAddr::from(([127, 0, 0, 1], hub.port)))
        .await?)
}

/// Reads until the hub closes the connection; what it sent before closing.
async fn read_to_close(tcp: &mut TcpStream, deadline: Duration) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, tcp.read(&mut buf)).await {
            Err(_) => bail!(
                "still open after {deadline:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn silent_half_sent_and_idle_connections_are_closed_at_the_header_deadline() -> Result<()> {
    let hub = Hub::start_with(&["--header-timeout", "1s"]).await?;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(connect_from([127, 0, 0, 1], &hub).await?);
    }
    let mut half = Vec::new();
    for _ in 0..5 {
        let mut tcp = connect_from([127, 0, 0, 1], &hub).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
            .await?;
        half.push(tcp);
    }
    // A keep-alive connection that got its answer and then says nothing more.
    let mut idle = connect_from([127, 0, 0, 1], &hub).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await?;
    let mut answer = [0u8; 256];
    let n = idle.read(&mut answer).await?;
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    for tcp in silent.iter_mut().chain(half.iter_mut()) {
        read_to_close(tcp, Duration::from_secs(15)).await?;
    }
    read_to_close(&mut idle, Duration::from_secs(15)).await?;
    eprintln!(
        "figure: 11 silent, half-sent and idle sockets closed {:?} after they opened (--header-timeout 1s)",
        started.elapsed()
    );
    // The hub itself is fine.
    let health = reqwest::get(format!("{}/healthz", hub.url)).await?;
    assert_eq!(health.status(), 200);
    Ok(())
}

#[tokio::test]
async fn a_websocket_that_sends_no_first_frame_is_closed_with_a_reason() -> Result<()> {
    let hub = Hub::start_with(&["--handshake-timeout", "1s"]).await?;
    for path in ["/ws/cocoon", "/ws/client"] {
        let url = format!("{}{path}", hub.url.replacen("http", "ws", 1));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut error = None;
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
                Err(_) => bail!("{path}: still open after 15 s"),
                Ok(Some(Ok(Message::Text(t)))) => error = Some(serde_json::from_str::<Value>(&t)?),
                Ok(Some(Ok(Message::Close(f)))) => break f,
                Ok(Some(Ok(_))) => {}
                Ok(other) => bail!("{path}: ended without a close frame: {other:?}"),
            }
        };
        let close = close.context("a close frame with a code")?;
        assert_eq!(u16::from(close.code), 1008, "{path}");
        let error = error.context("an error frame first")?;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("within")),
            "{path}: {error}"
        );
    }
    Ok(())
}

type ClientWs = WebSocketStream<TcpStream>;

/// A signed-in client socket from a chosen source address: it holds its connection's
/// slot for as long as it stays open.
async fn client_from(source: [u8; 4], hub: &Hub, jwt: &str) -> Result<ClientWs> {
    let tcp = connect_from(source, hub).await?;
    let url = format!("ws://127.0.0.1:{}/ws/client", hub.port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    ws.send(Message::text(
        json!({"type": "auth", "token": jwt}).to_string(),
    ))
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.contains("authenticated") => Ok(ws),
        other => bail!("not signed in: {other:?}"),
    }
}

/// What the hub answers a request sent on a fresh connection from `source`.
async fn request_from(source: [u8; 4], hub: &Hub, request: &str) -> Result<String> {
    let mut tcp = connect_from(source, hub).await?;
    tcp.write_all(request.as_bytes()).await?;
    read_to_close(&mut tcp, Duration::from_secs(15)).await
}

#[tokio::test]
async fn caps_per_source_and_in_total_keep_room_for_health_sign_in_and_devices() -> Result<()> {
    // 64 slots, the last 4 of them reserved; 40 per source.
    let hub = Hub::start_with(&[
        "--max-connections",
        "64",
        "--max-connections-per-source",
        "40",
    ])
    .await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let setup = alice.setup_token(60).await?;

    // One source takes its 40; its 41st is refused, and says why.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(client_from([127, 0, 0, 2], &hub, &alice.jwt).await?);
    }
    let refused = request_from(
        [127, 0, 0, 2],
        &hub,
        "GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(
        refused.contains("too many connections from your address"),
        "{refused}"
    );

    // Another source fills the rest of the open slots (the API client above keeps a
    // connection or two of its own): once only the reserve is left, a client socket is
    // turned away.
    loop {
        match client_from([127, 0, 0, 3], &hub, &alice.jwt).await {
            Ok(ws) => held.push(ws),
            Err(e) if e.to_string().contains("503") => break,
            Err(e) => return Err(e),
        }
        anyhow::ensure!(held.len() <= 60, "more than 60 open slots were given");
    }
    assert!(
        held.len() >= 55,
        "only {} open slots were given",
        held.len()
    );
    eprintln!(
        "figure: with --max-connections 64 --max-connections-per-source 40, one source held 40 \
         and was refused its 41st (429); {} WebSockets in all (plus the API client's own) \
         filled the open slots, leaving the reserve of 4",
        held.len()
    );
    // Only the reserve is left: ordinary requests are turned away...
    let busy = request_from(
        [127, 0, 0, 4],
        &hub,
        &format!(
            "GET /api/cocoons HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\n\r\n",
            alice.jwt
        ),
    )
    .await?;
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(busy.contains("connection limit"), "{busy}");
    // ...while a health check, a sign-in and a device's (re)connection get through.
    let health = request_from(
        [127, 0, 0, 4],
        &hub,
        "GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = json!({"api_key": key}).to_string();
    let sign_in = request_from(
        [127, 0, 0, 4],
        &hub,
        &format!(
            "POST /api/auth/token HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await?;
    assert!(sign_in.starts_with("HTTP/1.1 200"), "{sign_in}");
    let tcp = connect_from([127, 0, 0, 5], &hub).await?;
    let url = format!("ws://127.0.0.1:{}/ws/cocoon", hub.port);
    let (mut device, _) = tokio_tungstenite::client_async(url, tcp).await?;
    device
        .send(Message::text(
            json!({"type": "register", "versions": [1], "secret": crate::wire::secret(),
                   "name": "late", "setup_token": setup})
            .to_string(),
        ))
        .await?;
    let registered = match tokio::time::timeout(Duration::from_secs(10), device.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t)?,
        other => bail!("no answer to the registration: {other:?}"),
    };
    assert_eq!(registered["type"], "registered", "{registered}");

    // With every slot taken, even those wait: the next connection is refused.
    let mut reserve = Vec::new();
    for source in [6, 7, 8] {
        reserve.push(connect_from([127, 0, 0, source], &hub).await?);
    }
    let full = request_from(
        [127, 0, 0, 9],
        &hub,
        "GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n",
    )
    .await?;
    assert!(full.starts_with("HTTP/1.1 503"), "{full}");

    // Closing the held sockets gives their slots back.
    drop(held);
    drop(reserve);
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("{}/api/cocoons", hub.url);
    wait_for(
        "ordinary requests to be served again",
        Duration::from_secs(10),
        || async {
            let r = http.get(&url).bearer_auth(&alice.jwt).send().await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await?;
    drop(device);
    Ok(())
}

#[tokio::test]
async fn a_request_with_two_host_headers_is_refused() -> Result<()> {
    let hub = Hub::start().await?;
    let answer = request_from(
        [127, 0, 0, 1],
        &hub,
        "GET /healthz HTTP/1.1\r\nHost: hub\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("more than one Host header"), "{answer}");
    Ok(())
}
