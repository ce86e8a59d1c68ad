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
struct Seen {
    uploaded: AtomicU64,
    aborted: AtomicBool,
    release_sse: Notify,
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

fn service(seen: Arc<Seen>) -> Router {
    let s1 = seen.clone();
    let s2 = seen.clone();
    let s3 = seen.clone();
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
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
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

async fn serve(router: Router) -> Result<u16> {
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

fn vm_kib(pid: u32, field: &str) -> u64 {
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
async fn session_cookie_is_http_only_strict_and_opens_proxied_pages() -> Result<()> {
    let s = setup(&[]).await?;
    let key = s.hub.add_user("dora")?;
    let resp = s
        .http
        .post(format!("{}/api/auth/session", s.hub.url))
        .json(&json!({"api_key": key}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str()?.to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default().to_owned();
    // Dora owns nothing: the cookie authenticates her, ownership still decides.
    let resp = s
        .http
        .get(s.url("web", "/x"))
        .header("cookie", &pair)
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    // Alice's session cookie opens her device's service.
    let alice_cookie = format!("adi_session={}", s.alice.jwt);
    let resp = s
        .http
        .get(s.url("web", "/x"))
        .header("cookie", alice_cookie)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
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
async fn errors_are_fast_and_say_why() -> Result<()> {
    let mut s = setup(&["--proxy-max-body-bytes", "1000"]).await?;
    let get = |url: String| s.req(reqwest::Method::GET, &url).send();

    let r = get(s.url("nope", "/")).await?;
    assert_eq!(r.status(), 404, "unknown service");
    let r = get(format!("{}/proxy/{}/web/", s.hub.url, "0".repeat(32))).await?;
    assert_eq!(r.status(), 404, "unknown device");

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
    // Dot segments, raw and encoded, stay inside the service's root.
    for (path, want) in [
        ("/a/../../../etc/passwd", "/etc/passwd"),
        ("/a/%2e%2e/%2E%2E/x", "/x"),
        ("/..%2f..%2fx", "/..%2f..%2fx"),
    ] {
        let url = reqwest::Url::parse(&s.url("web", ""))?;
        let raw = format!("{}{path}", url.as_str());
        let resp = raw_get(&raw, &s.alice.jwt).await?;
        assert!(
            resp.contains(&format!("\"uri\":\"{want}\"")),
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
    let mut cmd = std::process::Command::new(crate::harness::ADI);
    cmd.args(["proxy", "box", "web", "--listen", "127.0.0.1:0"])
        .env("ADI_CONFIG_DIR", cfg.path())
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
