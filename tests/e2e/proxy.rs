//! The HTTP proxy through the hub, against real HTTP services on the device's loopback:
//! every method, headers both ways, binary bodies, large bodies in flat memory, SSE
//! arriving event by event, errors, and requests that must never leave the device's
//! registered loopback services.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::harness::{wait_for, Api, Cocoon, Hub};

/// What the test services observe, shared with the test body.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) uploaded: AtomicU64,
    aborted: AtomicBool,
    pub(crate) release_sse: Notify,
    /// Lets `/gated` send the rest of its body.
    release_gated: Notify,
    /// A `/hang` request reached the service / was dropped by it (its connection closed).
    hang_started: Arc<AtomicBool>,
    hang_dropped: Arc<AtomicBool>,
    /// The same for `/trickle`, which sends one chunk and then nothing.
    trickle_started: Arc<AtomicBool>,
    trickle_dropped: Arc<AtomicBool>,
}

/// Flips its flag when dropped: a handler holding one learns when hyper gives up on
/// the request, which happens when the connection to the service closes.
struct OnDrop(Arc<AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct AbortFlag(Arc<Seen>, bool);

impl Drop for AbortFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.aborted.store(true, Ordering::SeqCst);
        }
    }
}

async fn echo(req: Request) -> Response {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers: serde_json::Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect();
    let body = axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let summary = json!({"method": method, "uri": uri, "headers": headers, "body_len": body.len(),
        "body_sum": body.iter().map(|b| u64::from(*b)).sum::<u64>()});
    (
        StatusCode::OK,
        [
            ("x-service", "echo"),
            ("connection", "x-secret-hop"),
            ("x-secret-hop", "1"),
        ],
        summary.to_string(),
    )
        .into_response()
}

pub(crate) fn service(seen: Arc<Seen>) -> Router {
    let s1 = seen.clone();
    let s2 = seen.clone();
    let s3 = seen.clone();
    let s4 = seen.clone();
    let s5 = seen.clone();
    let s6 = seen.clone();
    Router::new()
        .route(
            "/status/{code}",
            any(|Path(code): Path<u16>| async move {
                StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT)
            }),
        )
        .route("/bytes", post(|body: Bytes| async move { body }))
        .route(
            "/download/{mib}",
            get(|Path(mib): Path<u64>| async move {
                let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
                let stream = futures_util::stream::iter(
                    (0..mib).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                Body::from_stream(stream)
            }),
        )
        .route(
            "/upload",
            post(move |req: Request| {
                let seen = s1.clone();
                async move {
                    let mut n = 0u64;
                    let mut stream = req.into_body().into_data_stream();
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(c) => n += c.len() as u64,
                            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
                        }
                    }
                    seen.uploaded.store(n, Ordering::SeqCst);
                    n.to_string().into_response()
                }
            }),
        )
        .route(
            "/sse",
            get(move || {
                let seen = s2.clone();
                async move {
                    let stream = futures_util::stream::unfold(0u32, move |n| {
                        let seen = seen.clone();
                        async move {
                            match n {
                                0 => Some((
                                    Ok::<_, std::io::Error>(Bytes::from("data: first\n\n")),
                                    1,
                                )),
                                1 => {
                                    // The second event waits until the client has seen the first.
                                    seen.release_sse.notified().await;
                                    Some((Ok(Bytes::from("data: second\n\n")), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    (
                        [("content-type", "text/event-stream")],
                        Body::from_stream(stream),
                    )
                }
            }),
        )
        .route(
            "/gated",
            get(move || {
                let seen = s6.clone();
                async move {
                    // One chunk at once, the rest when the test says so.
                    let first = futures_util::stream::once(async {
                        Ok::<_, std::io::Error>(Bytes::from("first chunk, "))
                    });
                    let rest = futures_util::stream::once(async move {
                        seen.release_gated.notified().await;
                        Ok(Bytes::from("then the rest"))
                    });
                    Body::from_stream(first.chain(rest))
                }
            }),
        )
        .route(
            "/big-head/{kib}",
            get(|Path(kib): Path<usize>| async move {
                // KiB-sized headers, as many as asked for.
                let mut response = "small body".into_response();
                for i in 0..kib {
                    let name = axum::http::HeaderName::try_from(format!("x-filler-{i}"))
                        .expect("header name");
                    let value =
                        axum::http::HeaderValue::try_from("v".repeat(1000)).expect("header value");
                    response.headers_mut().insert(name, value);
                }
                response
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route(
            "/hang",
            get(move || {
                let seen = s4.clone();
                async move {
                    // Never answers; the guard tells when the request is dropped.
                    let _guard = OnDrop(seen.hang_dropped.clone());
                    seen.hang_started.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        )
        .route(
            "/trickle",
            get(move || {
                let seen = s5.clone();
                async move {
                    let guard = OnDrop(seen.trickle_dropped.clone());
                    seen.trickle_started.store(true, Ordering::SeqCst);
                    let first = futures_util::stream::once(async {
                        Ok::<_, std::io::Error>(Bytes::from("first chunk"))
                    });
                    // Then silence, as an SSE stream between events.
                    let silent = futures_util::stream::unfold(guard, |g| async move {
                        std::future::pending::<()>().await;
                        Some((Ok(Bytes::new()), g))
                    });
                    Body::from_stream(first.chain(silent))
                }
            }),
        )
        .route(
            "/endless",
            get(move || {
                let seen = s3.clone();
                async move {
                    let guard = AbortFlag(seen, false);
                    let stream = futures_util::stream::unfold(guard, |g| async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Some((Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 1024])), g))
                    });
                    Body::from_stream(stream)
                }
            }),
        )
        .route(
            "/ws",
            get(|ws: axum::extract::ws::WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    use axum::extract::ws::Message;
                    let _ = socket
                        .send(Message::Text("hello from the service".into()))
                        .await;
                    while let Some(Ok(msg)) = socket.recv().await {
                        let reply = match msg {
                            Message::Text(t) => {
                                Message::Text(format!("echo: {}", t.as_str()).into())
                            }
                            Message::Binary(b) => Message::Binary(b),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if socket.send(reply).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
        .fallback(echo)
}

pub(crate) async fn serve(router: Router) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(port)
}

/// A port with nothing listening on it.
async fn dead_port() -> Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

struct Setup {
    hub: Hub,
    alice: Api,
    alice_key: String,
    device: String,
    cocoon: Cocoon,
    seen: Arc<Seen>,
    http: reqwest::Client,
}

async fn setup(hub_flags: &[&str]) -> Result<Setup> {
    let seen = Arc::new(Seen::default());
    let port = serve(service(seen.clone())).await?;
    let dead = dead_port().await?;
    let hub = Hub::start_with(hub_flags).await?;
    let alice_key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &[
            "--service",
            &format!("web:{port}/status/204"),
            "--service",
            &format!("dead:{dead}"),
            "--health-interval",
            "300ms",
        ],
    )?;
    let device = cocoon.device_id().await?;
    Ok(Setup {
        hub,
        alice,
        alice_key,
        device,
        cocoon,
        seen,
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()?,
    })
}

impl Setup {
    fn url(&self, service: &str, rest: &str) -> String {
        format!("{}/proxy/{}/{service}{rest}", self.hub.url, self.device)
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.alice.jwt)
    }
}

pub(crate) fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn every_method_headers_status_and_binary_bodies_pass_through() -> Result<()> {
    let s = setup(&[]).await?;
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let resp = s
            .req(m, &s.url("web", "/some/path?x=1&y=%20z"))
            .header("x-custom", "kept")
            .header("cookie", "adi_session=nope; theme=dark")
            .body(if method == "GET" {
                vec![]
            } else {
                vec![1u8, 2, 3]
            })
            .send()
            .await?;
        assert_eq!(resp.status(), 200, "{method}");
        assert_eq!(resp.headers()["x-service"], "echo");
        assert!(
            resp.headers().get("x-secret-hop").is_none(),
            "hop-by-hop named in Connection is dropped"
        );
        let seen: Value = resp.json().await?;
        assert_eq!(seen["method"], method);
        assert_eq!(seen["uri"], "/some/path?x=1&y=%20z");
        let h = &seen["headers"];
        assert_eq!(h["x-custom"], "kept");
        assert!(
            h.get("authorization").is_none(),
            "the hub's bearer never reaches the service"
        );
        assert_eq!(
            h["cookie"], "theme=dark",
            "the hub's session cookie is stripped"
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert!(h["x-forwarded-prefix"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/web"));
        assert!(
            h["host"]
                .as_str()
                .unwrap_or_default()
                .starts_with("127.0.0.1:"),
            "the service sees its own loopback host: {h}"
        );
        if method != "GET" {
            assert_eq!(seen["body_len"], 3, "{method}");
        }
    }
    let head = s
        .req(reqwest::Method::HEAD, &s.url("web", "/x"))
        .send()
        .await?;
    assert_eq!(head.status(), 200);

    for code in [201u16, 204, 301, 404, 418, 500, 503] {
        let resp = s
            .req(
                reqwest::Method::GET,
                &s.url("web", &format!("/status/{code}")),
            )
            .send()
            .await?;
        assert_eq!(
            resp.status().as_u16(),
            code,
            "status passes through (redirects are not followed)"
        );
    }

    let bytes: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let back = s
        .req(reqwest::Method::POST, &s.url("web", "/bytes"))
        .body(bytes.clone())
        .send()
        .await?;
    assert_eq!(back.status(), 200);
    assert!(
        back.bytes().await?.as_ref() == bytes.as_slice(),
        "binary body round-trips byte for byte"
    );

    // A bad key gets no session cookie.
    let login = s
        .http
        .post(format!("{}/api/auth/session", s.hub.url))
        .json(&json!({"api_key": "adi_key_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}))
        .send()
        .await?;
    assert_eq!(login.status(), 401);
    assert!(login.headers().get("set-cookie").is_none());
    Ok(())
}

#[tokio::test]
async fn session_cookie_is_scoped_to_proxied_pages() -> Result<()> {
    let s = setup(&[]).await?;
    let session = |key: String| {
        s.http
            .post(format!("{}/api/auth/session", s.hub.url))
            .json(&json!({ "api_key": key }))
            .send()
    };
    let resp = session(s.alice_key.clone()).await?;
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str()?.to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    for want in ["Path=/proxy/", "HttpOnly", "SameSite=Strict"] {
        assert!(attrs.contains(&want), "{want} in {cookie}");
    }
    let alice_cookie = attrs[0].to_owned();
    assert!(alice_cookie.starts_with("adi_session="), "{cookie}");

    // The cookie opens Alice's device's service...
    let resp = s
        .http
        .get(s.url("web", "/x"))
        .header("cookie", &alice_cookie)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    // ...and nothing in the API, even if a proxied page's script sends it there.
    for path in [
        "/api/cocoons".to_owned(),
        format!("/api/cocoons/{}/tasks", s.device),
        "/api/aggregate/tasks".to_owned(),
    ] {
        let resp = s
            .http
            .get(format!("{}{path}", s.hub.url))
            .header("cookie", &alice_cookie)
            .send()
            .await?;
        assert_eq!(resp.status(), 401, "{path} with only the cookie");
    }
    let resp = s
        .http
        .post(format!("{}/api/cocoons/{}/tasks", s.hub.url, s.device))
        .header("cookie", &alice_cookie)
        .json(&json!({"title": "from a proxied page", "command": ["true"]}))
        .send()
        .await?;
    assert_eq!(resp.status(), 401, "no task created with only the cookie");
    // The bearer header still works everywhere.
    assert_eq!(s.alice.get("/api/cocoons").await?.0, 200);

    // Dora owns nothing: the cookie authenticates her, ownership still decides.
    let resp = session(s.hub.add_user("dora")?).await?;
    let dora = resp.headers()["set-cookie"].to_str()?.to_owned();
    let resp = s
        .http
        .get(s.url("web", "/x"))
        .header("cookie", dora.split(';').next().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(resp.status(), 404);

    // Signing out clears the cookie on the same path.
    let resp = s
        .http
        .delete(format!("{}/api/auth/session", s.hub.url))
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    let cleared: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        cleared.iter().any(|c| c.starts_with("adi_session=;")
            && c.contains("Path=/proxy/")
            && c.contains("Max-Age=0")),
        "{cleared:?}"
    );
    Ok(())
}

#[tokio::test]
async fn large_bodies_stream_both_ways_in_flat_memory() -> Result<()> {
    let s = setup(&[]).await?;
    let hub_pid = s.hub.proc.pid();
    let cocoon_pid = s.cocoon.proc.pid();
    // Warm up, then take the baseline.
    s.req(reqwest::Method::GET, &s.url("web", "/download/1"))
        .send()
        .await?
        .bytes()
        .await?;
    let (hub_before, cocoon_before) = (vm_kib(hub_pid, "VmHWM:"), vm_kib(cocoon_pid, "VmHWM:"));

    const MIB: u64 = 256;
    let resp = s
        .req(
            reqwest::Method::GET,
            &s.url("web", &format!("/download/{MIB}")),
        )
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        got += chunk?.len() as u64;
    }
    assert_eq!(got, MIB * 1024 * 1024);

    let chunk = Bytes::from(vec![3u8; 1024 * 1024]);
    let upload =
        futures_util::stream::iter((0..MIB).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = s
        .req(reqwest::Method::POST, &s.url("web", "/upload"))
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await?, (MIB * 1024 * 1024).to_string());
    assert_eq!(s.seen.uploaded.load(Ordering::SeqCst), MIB * 1024 * 1024);

    let hub_growth = vm_kib(hub_pid, "VmHWM:").saturating_sub(hub_before);
    let cocoon_growth = vm_kib(cocoon_pid, "VmHWM:").saturating_sub(cocoon_before);
    eprintln!(
        "peak RSS growth over 2 x {MIB} MiB: hub {hub_growth} KiB, cocoon {cocoon_growth} KiB"
    );
    // A flow-control window is 1 MiB per stream; allow generous slack for allocators.
    assert!(hub_growth < 48 * 1024, "hub peak grew by {hub_growth} KiB");
    assert!(
        cocoon_growth < 48 * 1024,
        "cocoon peak grew by {cocoon_growth} KiB"
    );
    Ok(())
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() -> Result<()> {
    let s = setup(&[]).await?;
    let resp = s
        .req(reqwest::Method::GET, &s.url("web", "/sse"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("data: first\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended early"))??;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The first event is here while the service still holds the second one back.
    assert!(!text.contains("second"));
    s.seen.release_sse.notify_one();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next()).await? {
        text.push_str(&String::from_utf8_lossy(&chunk?));
    }
    assert!(text.ends_with("data: second\n\n"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_stalled_download_does_not_block_small_requests_and_a_departed_client_cancels(
) -> Result<()> {
    let s = setup(&[]).await?;
    // A client that opens an endless stream and never reads it.
    let stalled = s
        .req(reqwest::Method::GET, &s.url("web", "/endless"))
        .send()
        .await?;
    assert_eq!(stalled.status(), 200);
    for _ in 0..20 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            s.req(reqwest::Method::GET, &s.url("web", "/small")).send(),
        )
        .await??;
        assert_eq!(r.status(), 200);
    }
    // The client goes away: the service's response is dropped on the device.
    drop(stalled);
    wait_for(
        "the service to see the request cancelled",
        Duration::from_secs(10),
        || async { Ok(s.seen.aborted.load(Ordering::SeqCst).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn errors_have_their_status_and_say_why() -> Result<()> {
    let mut s = setup(&["--proxy-max-body-bytes", "1000"]).await?;
    let get = |url: String| s.req(reqwest::Method::GET, &url).send();

    let r = get(s.url("nope", "/")).await?;
    assert_eq!(r.status(), 404, "unknown service");
    let r = get(format!("{}/proxy/{}/web/", s.hub.url, "0".repeat(32))).await?;
    assert_eq!(r.status(), 404, "unknown device");
    // Every path under /proxy/ reaches the proxy, which says what is missing.
    for path in [
        format!("/proxy/{}", s.device),
        format!("/proxy/{}/", s.device),
    ] {
        let r = get(format!("{}{path}", s.hub.url)).await?;
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await?;
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }

    let r = get(s.url("dead", "/")).await?;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "upstream_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not reachable"),
        "{body}"
    );

    let r = s
        .req(reqwest::Method::GET, &s.url("web", "/slow"))
        .header("x-adi-timeout-ms", "300")
        .send()
        .await?;
    assert_eq!(r.status(), 504);

    let r = s
        .req(reqwest::Method::POST, &s.url("web", "/upload"))
        .body(vec![0u8; 5000])
        .send()
        .await?;
    assert_eq!(r.status(), 413, "declared length over the limit");
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 500]))),
    );
    let r = s
        .req(reqwest::Method::POST, &s.url("web", "/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    assert_eq!(r.status(), 413, "streamed body over the limit");

    let r = s.http.get(s.url("web", "/")).send().await?;
    assert_eq!(r.status(), 401, "no credentials");
    let bob = Api::login(&s.hub.url, &s.hub.add_user("bob")?).await?;
    let r = s
        .http
        .get(s.url("web", "/"))
        .bearer_auth(&bob.jwt)
        .send()
        .await?;
    assert_eq!(r.status(), 404, "another user's device is not there");

    s.cocoon.proc.kill();
    s.alice
        .wait_online(&s.device, false, Duration::from_secs(5))
        .await?;
    let r = s
        .req(reqwest::Method::GET, &s.url("web", "/"))
        .send()
        .await?;
    assert_eq!(r.status(), 502, "offline device");
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "device_offline");
    Ok(())
}

#[tokio::test]
async fn nothing_reaches_beyond_the_registered_loopback_service() -> Result<()> {
    let s = setup(&[]).await?;
    // Dot segments, raw and encoded, stay inside the service's root; an encoded slash
    // that forms no `..` passes as sent.
    let base = reqwest::Url::parse(&s.url("web", ""))?;
    for (path, want) in [
        ("/a/../../../etc/passwd", "/etc/passwd"),
        ("/a/%2e%2e/%2E%2E/x", "/x"),
        ("/repos/group%2Fproject", "/repos/group%2Fproject"),
    ] {
        let resp = raw_get(&format!("{}{path}", base.as_str()), &s.alice.jwt).await?;
        assert!(
            resp.contains(&format!("\"uri\":\"{want}\"")),
            "{path}: {resp}"
        );
    }
    // A `..` that only a service decoding %2F or %5C, or splitting on `\`, would see
    // is refused at the hub, with the reason.
    for path in [
        "/..%2f..%2fx",
        "/..%2F..%2Fetc/passwd",
        "/a/%2e%2e%5c%2e%2e%5cx",
        "/a\\..\\..\\x",
        "/x/%252e%252e/y",
        "/x/..;/admin",
    ] {
        let resp = raw_get(&format!("{}{path}", base.as_str()), &s.alice.jwt).await?;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(
            resp.contains("bad_request") && resp.contains("hides"),
            "{path}: {resp}"
        );
    }
    // A Host header or absolute-form target naming another host changes nothing.
    let resp = s
        .req(reqwest::Method::GET, &s.url("web", "/where"))
        .header("host", "169.254.169.254")
        .send()
        .await?;
    let seen: Value = resp.json().await?;
    assert_eq!(seen["uri"], "/where");
    assert_eq!(seen["headers"]["x-forwarded-host"], "169.254.169.254");
    // Service names are only the registered ones.
    for name in ["..", "web:22", "127.0.0.1:22", "%2e%2e"] {
        let r = s
            .req(
                reqwest::Method::GET,
                &format!("{}/proxy/{}/{name}/", s.hub.url, s.device),
            )
            .send()
            .await?;
        assert_eq!(r.status(), 404, "{name}");
    }
    let _ = &s.seen;
    Ok(())
}

/// Sends a request with the path exactly as given (no client-side normalisation).
async fn raw_get(url: &str, jwt: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {jwt}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn service_health_is_probed_and_shown() -> Result<()> {
    let s = setup(&[]).await?;
    let path = format!("/api/cocoons/{}/services", s.device);
    let services = wait_for("both services probed", Duration::from_secs(10), || async {
        let (status, body) = s.alice.get(&path).await?;
        anyhow::ensure!(status == 200, "{body}");
        let all: Vec<Value> = body["services"].as_array().cloned().unwrap_or_default();
        Ok(all.iter().all(|x| x["health"] != "unknown").then_some(all))
    })
    .await?;
    let by_name = |n: &str| {
        services
            .iter()
            .find(|x| x["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_name("web")["health"], "up");
    assert_eq!(by_name("web")["health_path"], "/status/204", "{services:?}");
    assert_eq!(by_name("dead")["health"], "down");
    assert!(by_name("dead")["health_detail"].as_str().is_some());

    let cfg = tempfile::tempdir()?;
    let (code, out, err) = crate::harness::cli(
        cfg.path(),
        &["cocoon", "services", &s.device],
        &[
            ("ADI_HUB", s.hub.url.as_str()),
            ("ADI_API_KEY", s.alice_key.as_str()),
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    let web = out
        .lines()
        .find(|l| l.starts_with("web"))
        .unwrap_or_default();
    let dead = out
        .lines()
        .find(|l| l.starts_with("dead"))
        .unwrap_or_default();
    assert!(web.contains(" up"), "{out}");
    assert!(dead.contains(" down"), "{out}");
    let key = s.hub.add_user("viewer")?;
    let (code, out, _) = crate::harness::cli(
        cfg.path(),
        &["cocoon", "services", &s.device],
        &[
            ("ADI_HUB", s.hub.url.as_str()),
            ("ADI_API_KEY", key.as_str()),
        ],
    )?;
    assert_ne!(code, 0, "not the viewer's device: {out}");
    Ok(())
}

#[tokio::test]
async fn port_forward_reaches_the_service_without_a_bearer() -> Result<()> {
    let s = setup(&[]).await?;
    let cfg = tempfile::tempdir()?;
    let (_fwd, local) = port_forward(&s, cfg.path()).await?;
    let plain = reqwest::Client::builder().no_proxy().build()?;
    let seen: Value = plain
        .get(format!("{local}/deep/path?q=1"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(seen["uri"], "/deep/path?q=1");
    assert!(seen["headers"].get("authorization").is_none());
    let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let back = plain
        .post(format!("{local}/bytes"))
        .body(bytes.clone())
        .send()
        .await?;
    assert_eq!(back.status(), 200);
    assert!(back.bytes().await?.as_ref() == bytes.as_slice());
    let teapot = plain.get(format!("{local}/status/418")).send().await?;
    assert_eq!(teapot.status(), 418);
    // The service's own 401 is the service's business, not a refused session.
    let refused = plain.get(format!("{local}/status/401")).send().await?;
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn websocket_upgrades_are_carried_both_ways() -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let s = setup(&[]).await?;
    let url = s.url("web", "/ws").replacen("http", "ws", 1);
    let mut request = url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", s.alice.jwt).parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(resp.status(), 101);
    let next = |m: Option<Result<Message, _>>| -> Result<Message> {
        Ok(m.ok_or_else(|| anyhow::anyhow!("socket ended"))??)
    };
    let first = next(tokio::time::timeout(Duration::from_secs(10), ws.next()).await?)?;
    assert_eq!(
        first,
        Message::text("hello from the service"),
        "service to client"
    );
    for i in 0..5 {
        ws.send(Message::text(format!("ping {i}"))).await?;
        let got = next(tokio::time::timeout(Duration::from_secs(10), ws.next()).await?)?;
        assert_eq!(got, Message::text(format!("echo: ping {i}")));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await?;
    let got = next(tokio::time::timeout(Duration::from_secs(10), ws.next()).await?)?;
    assert_eq!(
        got,
        Message::binary(blob),
        "a large binary message crosses intact"
    );
    ws.close(None).await?;
    // Without credentials there is no upgrade.
    let anon = tokio_tungstenite::connect_async(url.as_str()).await;
    assert!(anon.is_err(), "upgrade without credentials must fail");
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_before_the_head_or_mid_silence_cancels_on_the_device() -> Result<()> {
    let s = setup(&[]).await?;
    let wait_flag = |what: &'static str, flag: Arc<AtomicBool>| {
        wait_for(what, Duration::from_secs(10), move || {
            let flag = flag.clone();
            async move { Ok(flag.load(Ordering::SeqCst).then_some(())) }
        })
    };
    // A request the service never answers, with a deadline far beyond this test: only
    // the client leaving can end it.
    let request = s
        .req(reqwest::Method::GET, &s.url("web", "/hang"))
        .header("x-adi-timeout-ms", "3600000")
        .send();
    let client = tokio::spawn(request);
    wait_flag(
        "the service to get the request",
        s.seen.hang_started.clone(),
    )
    .await?;
    assert!(!s.seen.hang_dropped.load(Ordering::SeqCst));
    client.abort();
    let _ = client.await;
    wait_flag(
        "the service to see the request aborted",
        s.seen.hang_dropped.clone(),
    )
    .await?;

    // A response that sent its head and one chunk, then went quiet: the client leaving
    // ends it too, without waiting for a next chunk that may never come.
    let resp = s
        .req(reqwest::Method::GET, &s.url("web", "/trickle"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no first chunk"))??;
    assert_eq!(&first[..], b"first chunk");
    assert!(s.seen.trickle_started.load(Ordering::SeqCst));
    assert!(!s.seen.trickle_dropped.load(Ordering::SeqCst));
    drop(body);
    wait_flag(
        "the service to see the quiet response abandoned",
        s.seen.trickle_dropped.clone(),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_connected_device_that_stopped_heartbeating_is_answered_502_at_once() -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let mut ws = crate::wire::connect(&hub).await?;
    let register = json!({
        "type": "register", "versions": [1], "secret": crate::wire::secret(), "name": "quiet",
        "setup_token": alice.setup_token(60).await?,
        "services": [{"name": "web", "port": dead_port().await?}],
    });
    ws.send(Message::text(register.to_string())).await?;
    let reply = crate::wire::next(&mut ws).await?;
    assert_eq!(reply["type"], "registered", "{reply}");
    let id = reply["device_id"].as_str().unwrap_or_default().to_owned();
    let (mut tx, mut rx) = ws.split();
    // The device keeps its socket busy with WebSocket pings but sends no heartbeat, so
    // the hub keeps the connection while the registry turns it offline.
    let proxied = Arc::new(AtomicBool::new(false));
    let seen = proxied.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if let Message::Text(t) = msg {
                if t.as_str().contains("proxy_request") {
                    seen.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::harness::HEARTBEAT / 4);
        loop {
            tick.tick().await;
            if tx.send(Message::Ping(Default::default())).await.is_err() {
                break;
            }
        }
    });
    alice
        .wait_online(&id, false, crate::harness::HEARTBEAT * 20)
        .await?;
    let resp = reqwest::Client::new()
        .get(format!("{}/proxy/{id}/web/", hub.url))
        .bearer_auth(&alice.jwt)
        // Without the presence check the hub would wait this long, then answer 504.
        .header("x-adi-timeout-ms", "5000")
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "device_offline", "{body}");
    assert!(
        !reader.is_finished(),
        "the device's socket is still open: the registry, not a closed socket, said offline"
    );
    assert!(
        !proxied.load(Ordering::SeqCst),
        "the request never went to the silent device"
    );
    pinger.abort();
    reader.abort();
    Ok(())
}

/// A device's own small service: `/name` answers the device's name; `/hold` streams a
/// large body and keeps it open until released.
fn named_service(name: &'static str, release: Arc<Notify>) -> Router {
    Router::new()
        .route("/name", get(move || async move { name }))
        .route(
            "/hold",
            get(move || {
                let release = release.clone();
                async move {
                    let chunk = Bytes::from(vec![5u8; 1024 * 1024]);
                    let (first, rest) = (chunk.clone(), chunk);
                    // 8 MiB now, then nothing until released, then 8 MiB more.
                    let head = futures_util::stream::iter(
                        (0..8).map(move |_| Ok::<_, std::io::Error>(first.clone())),
                    );
                    let tail = futures_util::stream::once(async move {
                        release.notified().await;
                        Ok::<_, std::io::Error>(Bytes::new())
                    })
                    .chain(futures_util::stream::iter(
                        (0..8).map(move |_| Ok::<_, std::io::Error>(rest.clone())),
                    ));
                    Body::from_stream(head.chain(tail))
                }
            }),
        )
}

#[tokio::test]
async fn many_devices_share_the_hub_without_head_of_line_blocking() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let release = Arc::new(Notify::new());
    let names = ["north", "south", "east"];
    let mut cocoons = Vec::new();
    let mut devices = Vec::new();
    for name in names {
        let port = serve(named_service(name, release.clone())).await?;
        let cocoon = Cocoon::start(
            &hub.url,
            name,
            Some(&alice.setup_token(60).await?),
            &["--service", &format!("svc:{port}")],
        )?;
        devices.push(cocoon.device_id().await?);
        cocoons.push(cocoon);
    }
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = |device: &str, rest: &str| format!("{}/proxy/{device}/svc{rest}", hub.url);

    // A large transfer from the first device, read as it comes; the service holds it
    // open (8 MiB sent, 8 MiB to go) until the small requests are done.
    let resp = http
        .get(url(&devices[0], "/hold"))
        .bearer_auth(&alice.jwt)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let large = tokio::spawn(async move {
        let mut got = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            got += chunk?.len() as u64;
            progress_tx.send_replace(got);
        }
        anyhow::Ok(got)
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|got| *got >= 4 * 1024 * 1024),
    )
    .await??;

    // Many small requests to every device (the busy one included), all at once.
    let small = (0..8)
        .flat_map(|_| devices.iter().zip(names))
        .map(|(device, name)| {
            let request = http
                .get(url(device, "/name"))
                .bearer_auth(&alice.jwt)
                .send();
            async move {
                let resp = request.await?;
                anyhow::ensure!(resp.status() == 200, "{name}: {}", resp.status());
                let text = resp.text().await?;
                anyhow::ensure!(text == name, "{name} answered {text:?}");
                anyhow::Ok(())
            }
        });
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(small),
    )
    .await?;
    assert_eq!(answers.len(), 24);
    for answer in answers {
        answer?;
    }
    assert!(
        !large.is_finished(),
        "every small request completed while the large transfer was still open"
    );
    release.notify_one();
    let got = tokio::time::timeout(Duration::from_secs(30), large).await???;
    assert_eq!(got, 16 * 1024 * 1024);
    Ok(())
}

/// Starts `adi proxy DEVICE SERVICE --listen 127.0.0.1:0`; returns it and its local URL.
async fn port_forward(s: &Setup, cfg: &std::path::Path) -> Result<(crate::harness::Proc, String)> {
    let mut cmd = std::process::Command::new(crate::harness::ADI);
    cmd.args(["proxy", "box", "web", "--listen", "127.0.0.1:0"])
        .env("ADI_CONFIG_DIR", cfg)
        .env("ADI_HUB", &s.hub.url)
        .env("ADI_API_KEY", &s.alice_key);
    let fwd = crate::harness::Proc::spawn(&mut cmd)?;
    let line = fwd
        .wait_line("forwarding http://", Duration::from_secs(20))
        .await?;
    let local = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_default()
        .to_owned();
    Ok((fwd, local))
}

#[tokio::test]
async fn port_forward_carries_websocket_upgrades() -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = setup(&[]).await?;
    let cfg = tempfile::tempdir()?;
    let (_fwd, local) = port_forward(&s, cfg.path()).await?;
    let url = format!("{}/ws", local.replacen("http", "ws", 1));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url.as_str()).await?;
    assert_eq!(resp.status(), 101);
    assert_eq!(
        next_message(&mut ws).await?,
        Message::text("hello from the service")
    );
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await?;
        assert_eq!(
            next_message(&mut ws).await?,
            Message::text(format!("echo: ping {i}"))
        );
    }
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(blob.clone())).await?;
    assert_eq!(next_message(&mut ws).await?, Message::binary(blob));
    ws.close(None).await?;
    Ok(())
}

async fn next_message(ws: &mut crate::wire::Ws) -> Result<tokio_tungstenite::tungstenite::Message> {
    Ok(tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("socket ended"))??)
}

/// A download of `/gated` through the hub, its first chunk already read: the rest
/// comes once the test releases it.
async fn gated_download(s: &Setup) -> Result<reqwest::Response> {
    let mut download = s
        .req(reqwest::Method::GET, &s.url("web", "/gated"))
        .send()
        .await?;
    assert_eq!(download.status(), 200);
    assert_eq!(
        &download.chunk().await?.unwrap_or_default()[..],
        b"first chunk, "
    );
    Ok(download)
}

/// Every byte left of a response body; an error if it is cut off.
async fn rest_of(mut response: reqwest::Response) -> Result<Vec<u8>> {
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        rest.extend_from_slice(&chunk);
    }
    Ok(rest)
}

#[tokio::test]
async fn a_stopping_hub_finishes_requests_in_flight_and_takes_no_new_ones() -> Result<()> {
    let mut s = setup(&[]).await?;
    let download = gated_download(&s).await?;

    crate::harness::signal(s.hub.proc.pid(), "TERM");
    s.hub
        .proc
        .wait_line("adi hub stopping", Duration::from_secs(10))
        .await?;
    // No new connection is taken while the download finishes...
    let healthz = format!("{}/healthz", s.hub.url);
    wait_for(
        "the hub to stop accepting",
        Duration::from_secs(10),
        || async { Ok(s.http.get(&healthz).send().await.is_err().then_some(())) },
    )
    .await?;
    // ...and the device stays connected for it: the rest arrives whole.
    s.seen.release_gated.notify_one();
    assert_eq!(rest_of(download).await?, b"then the rest");
    // With nothing left in flight the hub exits by itself, cleanly.
    assert_eq!(s.hub.proc.wait_exit(Duration::from_secs(10)).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_stopping_hub_cuts_what_outlasts_the_grace_period_and_the_device_cancels_it() -> Result<()>
{
    let mut s = setup(&["--shutdown-grace", "1s"]).await?;
    let mut stream = s
        .req(reqwest::Method::GET, &s.url("web", "/trickle"))
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    assert_eq!(
        &stream.chunk().await?.unwrap_or_default()[..],
        b"first chunk"
    );
    crate::harness::signal(s.hub.proc.pid(), "TERM");
    // The stream never ends by itself (the proxy's deadline covers only the head), so
    // the hub's exit is the grace period's doing.
    assert_eq!(s.hub.proc.wait_exit(Duration::from_secs(15)).await?, 0);
    assert!(
        s.hub
            .proc
            .output()
            .contains("still in flight after the grace period"),
        "{}",
        s.hub.proc.output()
    );
    let cut = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await?;
    assert!(cut.is_err(), "a cut stream must not look complete: {cut:?}");
    wait_for(
        "the service to see the request cancelled",
        Duration::from_secs(10),
        || async { Ok(s.seen.trickle_dropped.load(Ordering::SeqCst).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_stopping_device_finishes_its_downloads_and_refuses_new_requests_at_once() -> Result<()> {
    let mut s = setup(&[]).await?;
    let download = gated_download(&s).await?;
    crate::harness::signal(s.cocoon.proc.pid(), "TERM");
    // New requests hear at once that the device is going, rather than being cut off
    // when it goes.
    let refused = wait_for("new requests refused", Duration::from_secs(10), || async {
        let r = s
            .req(reqwest::Method::GET, &s.url("web", "/small"))
            .send()
            .await?;
        Ok((r.status() == 502).then_some(r.text().await?))
    })
    .await?;
    assert!(refused.contains("stopping"), "{refused}");
    // Its owner sees why.
    let (_, device) = s.alice.cocoon(&s.device).await?;
    assert_eq!(
        (&device["status"], &device["online"]),
        (&json!("stopping"), &json!(true)),
        "{device}"
    );
    // The download in flight finishes whole, and then the cocoon leaves by itself.
    s.seen.release_gated.notify_one();
    assert_eq!(rest_of(download).await?, b"then the rest");
    assert_eq!(s.cocoon.proc.wait_exit(Duration::from_secs(15)).await?, 0);
    Ok(())
}

/// `count` headers of about 1 KiB each.
fn big_headers(count: usize) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    for i in 0..count {
        headers.insert(
            reqwest::header::HeaderName::try_from(format!("x-big-{i}")).expect("name"),
            reqwest::header::HeaderValue::try_from("h".repeat(1000)).expect("value"),
        );
    }
    headers
}

#[tokio::test]
async fn a_head_too_large_for_the_link_fails_its_own_request_and_nothing_else() -> Result<()> {
    let s = setup(&[]).await?;
    // A download in flight on the same device, whose link must survive what follows.
    let download = gated_download(&s).await?;

    // 70 KiB of request headers: more than one frame to the device holds.
    let too_big = s
        .req(reqwest::Method::GET, &s.url("web", "/echo"))
        .headers(big_headers(70))
        .send()
        .await?;
    assert_eq!(too_big.status(), 431);
    let body: Value = too_big.json().await?;
    assert_eq!(body["error"]["code"], "headers_too_large", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bytes")),
        "{body}"
    );
    // Under the limit, every header reaches the service.
    let fits = s
        .req(reqwest::Method::GET, &s.url("web", "/echo"))
        .headers(big_headers(40))
        .send()
        .await?;
    assert_eq!(fits.status(), 200);
    let seen: Value = fits.json().await?;
    assert_eq!(seen["headers"]["x-big-39"], "h".repeat(1000));

    // The largest header the hub carries to a device, found by halving.
    let (mut fits, mut refused) = (1_000usize, 80_000usize);
    while refused - fits > 64 {
        let mid = (fits + refused) / 2;
        let status = s
            .req(reqwest::Method::GET, &s.url("web", "/echo"))
            .header("x-one", "h".repeat(mid))
            .send()
            .await?
            .status();
        match status.as_u16() {
            200 => fits = mid,
            431 => refused = mid,
            other => anyhow::bail!("a {mid}-byte header got {other}"),
        }
    }
    eprintln!("figure: the largest single request header carried to a device is about {fits} bytes (431 from {refused})");

    // A service whose response head is over the limit: 502 naming why.
    let big_answer = s
        .req(reqwest::Method::GET, &s.url("web", "/big-head/70"))
        .send()
        .await?;
    assert_eq!(big_answer.status(), 502);
    let body: Value = big_answer.json().await?;
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("response head")),
        "{body}"
    );
    let fits = s
        .req(reqwest::Method::GET, &s.url("web", "/big-head/40"))
        .send()
        .await?;
    assert_eq!(fits.status(), 200);
    assert_eq!(fits.headers()["x-filler-39"], "v".repeat(1000).as_str());

    // Heads the hub's own HTTP server refuses before anything is sent on.
    let many = s
        .req(reqwest::Method::GET, &s.url("web", "/echo"))
        .headers({
            let mut h = reqwest::header::HeaderMap::new();
            for i in 0..150 {
                h.insert(
                    reqwest::header::HeaderName::try_from(format!("x-n-{i}"))?,
                    reqwest::header::HeaderValue::from_static("1"),
                );
            }
            h
        })
        .send()
        .await?;
    assert_eq!(many.status(), 431);

    // The download was never disturbed: the device's link stayed up throughout.
    s.seen.release_gated.notify_one();
    assert_eq!(rest_of(download).await?, b"then the rest");
    assert!(
        !s.cocoon.proc.output().contains("hub connection lost"),
        "the device's link dropped:\n{}",
        s.cocoon.proc.output()
    );
    Ok(())
}

#[tokio::test]
async fn a_device_is_reached_by_a_name_unique_among_its_owners_devices() -> Result<()> {
    let mut s = setup(&[]).await?;
    let by_name = |api: &Api, name: &str, rest: &str| {
        s.http
            .get(format!("{}/proxy/{name}/web{rest}", s.hub.url))
            .bearer_auth(&api.jwt)
            .send()
    };
    let r = by_name(&s.alice, "box", "/named?q=1").await?;
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await?;
    assert_eq!(seen["uri"], "/named?q=1");
    // The service builds its links on the path the client used.
    assert_eq!(seen["headers"]["x-forwarded-prefix"], "/proxy/box/web");

    // Names are per owner: bob's "box" is his, and alice's stays hers.
    let bob = Api::login(&s.hub.url, &s.hub.add_user("bob")?).await?;
    let bobs_port = serve(Router::new().fallback(|| async { "bob's box" })).await?;
    let mut bobs = Cocoon::start(
        &s.hub.url,
        "box",
        Some(&bob.setup_token(60).await?),
        &["--service", &format!("web:{bobs_port}")],
    )?;
    let bobs_id = bobs.device_id().await?;
    assert_eq!(by_name(&bob, "box", "/").await?.text().await?, "bob's box");
    let r = by_name(&s.alice, "box", "/").await?;
    assert_eq!(r.status(), 200);
    assert!(
        r.text().await?.contains("\"uri\""),
        "alice reached her own box"
    );
    let carol = Api::login(&s.hub.url, &s.hub.add_user("carol")?).await?;
    for (who, name) in [(&carol, "box"), (&s.alice, "no-such-box")] {
        let r = by_name(who, name, "/").await?;
        assert_eq!(r.status(), 404, "{name}");
        let body: Value = r.json().await?;
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }

    // A second "box" of alice's makes the name ambiguous: 409 naming both.
    let mut second = Cocoon::start(
        &s.hub.url,
        "box",
        Some(&s.alice.setup_token(60).await?),
        &["--service", &format!("web:{bobs_port}")],
    )?;
    let second_id = second.device_id().await?;
    let r = by_name(&s.alice, "box", "/").await?;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&s.device) && message.contains(&second_id),
        "{body}"
    );
    assert!(
        !message.contains(&bobs_id),
        "bob's device is not listed: {body}"
    );
    // Ids still reach each.
    let r = s
        .req(reqwest::Method::GET, &s.url("web", "/"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);

    // A name picks the one of them that is connected...
    second.proc.kill();
    s.alice
        .wait_online(&second_id, false, Duration::from_secs(5))
        .await?;
    let seen: Value = by_name(&s.alice, "box", "/again").await?.json().await?;
    assert_eq!(seen["uri"], "/again");
    // ...and with none connected, the catalog still knows both.
    s.cocoon.proc.kill();
    s.alice
        .wait_online(&s.device, false, Duration::from_secs(5))
        .await?;
    assert_eq!(by_name(&s.alice, "box", "/").await?.status(), 409);
    // An offline device called so is offline, not unknown.
    bobs.proc.kill();
    bob.wait_online(&bobs_id, false, Duration::from_secs(5))
        .await?;
    let r = by_name(&bob, "box", "/").await?;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "device_offline", "{body}");
    Ok(())
}

#[tokio::test]
async fn port_forward_to_a_service_the_device_lacks_stops_naming_its_services() -> Result<()> {
    let s = setup(&[]).await?;
    let cfg = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(crate::harness::ADI);
    cmd.args(["proxy", "box", "grafana", "--listen", "127.0.0.1:0"])
        .env("ADI_CONFIG_DIR", cfg.path())
        .env("ADI_HUB", &s.hub.url)
        .env("ADI_API_KEY", &s.alice_key);
    let mut fwd = crate::harness::Proc::spawn(&mut cmd)?;
    let code = fwd.wait_exit(Duration::from_secs(20)).await?;
    let said = fwd.output();
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("box has no service \"grafana\"")
            && said.contains("web")
            && said.contains("dead"),
        "{said}"
    );
    assert!(!said.contains("forwarding"), "{said}");
    Ok(())
}
