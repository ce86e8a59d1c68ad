//! Several hubs as one: three hub processes on one fresh PostgreSQL catalog, joined
//! through the machine's NATS. A device connected to one hub is listed, proxied (a
//! 256 MiB download in flat memory, SSE event by event, a WebSocket echo), asked for
//! capabilities and for its tasks through the others; a share made on one hub is
//! claimed on another and used on a third; a killed hub's device comes back on another
//! hub within seconds; a draining hub moves its devices before it stops; an agent that
//! appears on two hubs is kept only by the newer connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::harness::{fresh_postgres, nats_url, wait_for, Api, Cocoon, Hub};
use crate::proxy::{serve, service, vm_kib, Seen};

/// A fresh PostgreSQL catalog, once NATS is known to be reachable; `None` (after saying
/// SKIPPED) when either is missing, a failure when `CI` is set.
pub(crate) async fn catalog_and_nats() -> Option<adi_storage::test_database::TestPostgres> {
    let url = nats_url();
    let addr = url.trim_start_matches("nats://").to_owned();
    if let Err(e) = tokio::net::TcpStream::connect(&addr).await {
        assert!(
            std::env::var_os("CI").is_none(),
            "NATS at {url} is unreachable ({e}); scripts/test starts it"
        );
        eprintln!("*** SKIPPED: cluster test needs NATS at {url}: {e} ***");
        return None;
    }
    fresh_postgres().await
}

/// Runs `test` with three fresh hubs on a fresh catalog, dropped after it.
async fn in_cluster<F, Fut>(extra: &[&str], test: F) -> Result<()>
where
    F: FnOnce(Cluster) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let Some(db) = catalog_and_nats().await else {
        return Ok(());
    };
    let result = async { test(cluster(&db.url(), extra).await?).await }.await;
    db.drop_database().await;
    result
}

/// Three hubs on one catalog, and the user who owns the devices.
struct Cluster {
    hubs: Vec<Hub>,
    alice_key: String,
}

async fn cluster(db: &str, extra: &[&str]) -> Result<Cluster> {
    let mut hubs = Vec::new();
    for _ in 0..3 {
        hubs.push(Hub::start_cluster(db, extra).await?);
    }
    let alice_key = hubs[0].add_user("alice")?;
    // Every hub sees the two others before the test begins.
    for hub in &hubs {
        let api = Api::login(&hub.url, &alice_key).await?;
        wait_for(
            "the hubs to see each other",
            Duration::from_secs(10),
            || async {
                let (_, body) = api.get("/api/hubs").await?;
                Ok((body["hubs"].as_array().map_or(0, Vec::len) == 3).then_some(()))
            },
        )
        .await?;
    }
    Ok(Cluster { hubs, alice_key })
}

impl Cluster {
    async fn alice(&self, hub: usize) -> Result<Api> {
        Api::login(&self.hubs[hub].url, &self.alice_key).await
    }
}

/// Waits until `api`'s hub lists device `id` as online.
async fn online_on(api: &Api, id: &str, deadline: Duration) -> Result<()> {
    api.wait_online(id, true, deadline).await
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_one_hub_is_listed_proxied_and_asked_through_the_others() -> Result<()> {
    in_cluster(&[], |c| async move {
        let seen = Arc::new(Seen::default());
        let port = serve(service(seen.clone())).await?;
        let (on_a, on_b, on_c) = (c.alice(0).await?, c.alice(1).await?, c.alice(2).await?);
        let device = Cocoon::start(
            &c.hubs[0].url,
            "box",
            Some(&on_a.setup_token(60).await?),
            &["--service", &format!("web:{port}")],
        )?;
        let id = device.device_id().await?;
        // Listed, with its live state, by the hubs it is not connected to.
        online_on(&on_b, &id, Duration::from_secs(5)).await?;
        online_on(&on_c, &id, Duration::from_secs(5)).await?;
        // Its load is charted by a hub it is not connected to, too.
        wait_for(
            "hub b to chart the device's load",
            Duration::from_secs(5),
            || async {
                let (status, h) = on_b.get(&format!("/api/cocoons/{id}/load")).await?;
                Ok(
                    (status == 200 && h["at"].as_array().is_some_and(|a| !a.is_empty()))
                        .then_some(()),
                )
            },
        )
        .await?;
        // Each hub's beat says how many devices it holds.
        wait_for(
            "hub a's beat to count the device",
            Duration::from_secs(5),
            || async {
                let (_, hubs) = on_b.get("/api/hubs").await?;
                let counts: Vec<(String, u64)> = hubs["hubs"]
                    .as_array()
                    .ok_or_else(|| anyhow!("no hubs: {hubs}"))?
                    .iter()
                    .map(|h| {
                        (
                            h["url"].as_str().unwrap_or_default().to_owned(),
                            h["devices"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                Ok((counts.iter().map(|c| c.1).sum::<u64>() == 1
                    && counts
                        .iter()
                        .any(|c| c.0 == c.0 && c.0 == on_a.base && c.1 == 1))
                .then_some(()))
            },
        )
        .await?;

        // `adi signaling hubs` through any hub lists all three.
        let cfg = tempfile::tempdir()?;
        let (code, out, err) = crate::harness::cli(
            cfg.path(),
            &[
                "signaling",
                "hubs",
                "--hub",
                &on_c.base,
                "--api-key",
                &c.alice_key,
            ],
            &[],
        )?;
        ensure!(code == 0, "{out}{err}");
        ensure!(
            c.hubs.iter().all(|h| out.contains(&h.url)) && out.contains("serving (this one)"),
            "{out}"
        );

        let client = http()?;
        let url = |hub: &Api, rest: &str| format!("{}/proxy/{id}/web{rest}", hub.base);
        // By id and by name, through both other hubs.
        for hub in [&on_b, &on_c] {
            let r = client
                .get(url(hub, "/status/204"))
                .bearer_auth(&hub.jwt)
                .send()
                .await?;
            ensure!(r.status() == 204, "through {}: {}", hub.base, r.status());
            let r = client
                .get(format!("{}/proxy/box/web/status/204", hub.base))
                .bearer_auth(&hub.jwt)
                .send()
                .await?;
            ensure!(r.status() == 204, "by name through {}", hub.base);
        }

        // 256 MiB through hub b, digest checked, in flat memory on both hubs.
        let (b_pid, a_pid) = (c.hubs[1].proc.pid(), c.hubs[0].proc.pid());
        client
            .get(url(&on_b, "/download/1"))
            .bearer_auth(&on_b.jwt)
            .send()
            .await?
            .bytes()
            .await?;
        let (b_before, a_before) = (vm_kib(b_pid, "VmHWM:"), vm_kib(a_pid, "VmHWM:"));
        const MIB: u64 = 256;
        let resp = client
            .get(url(&on_b, &format!("/download/{MIB}")))
            .bearer_auth(&on_b.jwt)
            .send()
            .await?;
        ensure!(resp.status() == 200);
        let mut digest = Sha256::new();
        let mut got = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            got += chunk.len() as u64;
            digest.update(&chunk);
        }
        ensure!(got == MIB * 1024 * 1024, "got {got} bytes");
        let mut expected = Sha256::new();
        let mib = vec![7u8; 1024 * 1024];
        for _ in 0..MIB {
            expected.update(&mib);
        }
        ensure!(digest.finalize() == expected.finalize(), "digest differs");
        let b_growth = vm_kib(b_pid, "VmHWM:").saturating_sub(b_before);
        let a_growth = vm_kib(a_pid, "VmHWM:").saturating_sub(a_before);
        eprintln!("peak RSS growth over {MIB} MiB: hub b {b_growth} KiB, hub a {a_growth} KiB");
        ensure!(b_growth < 48 * 1024, "hub b peak grew by {b_growth} KiB");
        ensure!(a_growth < 48 * 1024, "hub a peak grew by {a_growth} KiB");

        // Server-sent events through hub c, the first before the second is sent.
        let resp = client
            .get(url(&on_c, "/sse"))
            .bearer_auth(&on_c.jwt)
            .send()
            .await?;
        ensure!(resp.status() == 200);
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        while !text.contains("data: first\n\n") {
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await?
                .ok_or_else(|| anyhow!("stream ended early"))??;
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        ensure!(
            !text.contains("second"),
            "the second event came early: {text}"
        );
        seen.release_sse.notify_one();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next()).await? {
            text.push_str(&String::from_utf8_lossy(&chunk?));
        }
        ensure!(text.ends_with("data: second\n\n"), "{text}");

        // A WebSocket through hub b.
        websocket_echo(&url(&on_b, "/ws"), &on_b.jwt).await?;

        // Tasks: made through hub b, read in the merged view of hub c.
        let (status, made) = on_b
            .post(
                &format!("/api/cocoons/{id}/tasks"),
                json!({"title": "made through b"}),
            )
            .await?;
        ensure!(status == 200 || status == 201, "{status} {made}");
        let (status, merged) = on_c.get("/api/aggregate/tasks").await?;
        ensure!(status == 200, "{status} {merged}");
        let titles: Vec<&str> = merged["tasks"]
            .as_array()
            .ok_or_else(|| anyhow!("no tasks: {merged}"))?
            .iter()
            .filter_map(|t| t["title"].as_str())
            .collect();
        ensure!(titles.contains(&"made through b"), "{merged}");
        let (status, listed) = on_c.get(&format!("/api/cocoons/{id}/tasks")).await?;
        ensure!(status == 200, "{status} {listed}");

        // A share made on b, claimed on c, used by its new member on a and on b.
        let bob_key = c.hubs[0].add_user("bob")?;
        let (status, share) = on_b
            .post("/api/tokens", json!({"kind": "share", "device_id": id}))
            .await?;
        ensure!(status == 200 || status == 201, "{status} {share}");
        let bob_on_c = Api::login(&c.hubs[2].url, &bob_key).await?;
        let (status, claimed) = bob_on_c
            .post("/api/tokens/claim", json!({"token": share["token"]}))
            .await?;
        ensure!(status == 200, "{status} {claimed}");
        for hub in [0, 1] {
            let bob = Api::login(&c.hubs[hub].url, &bob_key).await?;
            wait_for(
                "bob to reach the shared device",
                Duration::from_secs(5),
                || async {
                    let r = client
                        .get(url(&bob, "/status/204"))
                        .bearer_auth(&bob.jwt)
                        .send()
                        .await?;
                    Ok((r.status() == 204).then_some(()))
                },
            )
            .await?;
        }
        drop(device);
        Ok(())
    })
    .await
}

async fn websocket_echo(url: &str, jwt: &str) -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = url.replacen("http", "ws", 1).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {jwt}").parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await?;
    ensure!(resp.status() == 101);
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .ok_or_else(|| anyhow!("socket ended"))??;
    ensure!(
        first == Message::text("hello from the service"),
        "{first:?}"
    );
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await?;
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .ok_or_else(|| anyhow!("socket ended"))??;
        ensure!(got == Message::text(format!("echo: ping {i}")), "{got:?}");
    }
    ws.close(None).await?;
    Ok(())
}

/// How many devices each hub's beat says it holds, by URL.
async fn held(api: &Api) -> Result<Vec<(String, u64)>> {
    let (_, hubs) = api.get("/api/hubs").await?;
    Ok(hubs["hubs"]
        .as_array()
        .ok_or_else(|| anyhow!("no hubs: {hubs}"))?
        .iter()
        .map(|h| {
            (
                h["url"].as_str().unwrap_or_default().to_owned(),
                h["devices"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capabilities_are_routed_by_load_across_devices_on_different_hubs() -> Result<()> {
    use crate::capabilities::{ask, ask_later, manifest, plugin, request_cli, served_by};
    in_cluster(&[], |mut c| async move {
        let (on_a, on_c) = (c.alice(0).await?, c.alice(2).await?);
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
        let (svc_x, port_x) = plugin("X", arrived_tx.clone()).await?;
        let (_svc_y, port_y) = plugin("Y", arrived_tx).await?;
        let dirs = tempfile::tempdir()?;
        let dir = |n: &str| dirs.path().join(n);
        manifest(&dir("plugins-x"), port_x)?;
        manifest(&dir("plugins-y"), port_y)?;
        let start = |hub: usize, name: &str| {
            let plugins = dir(&format!("plugins-{name}"))
                .to_string_lossy()
                .to_string();
            let data = dir(&format!("cocoon-{name}"));
            let url = c.hubs[hub].url.clone();
            let api = on_a.clone();
            let name = name.to_owned();
            async move {
                let token = api.setup_token(600).await?;
                Cocoon::start_in(
                    &url,
                    &name,
                    Some(&token),
                    &data,
                    &["--plugins-dir", &plugins],
                )
            }
        };
        // x on hub a, y on hub b; the caller on hub c.
        let x = start(0, "x").await?;
        let y = start(1, "y").await?;
        let (x_id, y_id) = (x.device_id().await?, y.device_id().await?);
        online_on(&on_c, &x_id, Duration::from_secs(5)).await?;
        online_on(&on_c, &y_id, Duration::from_secs(5)).await?;
        wait_for(
            "hub c to see both offers",
            Duration::from_secs(5),
            || async {
                let (_, listing) = on_c
                    .get("/api/cocoons/by-capability?protocol=embeddings&version=1.0")
                    .await?;
                let scored = listing["cocoons"]
                    .as_array()
                    .map_or(0, |l| l.iter().filter(|d| d["score"].is_number()).count());
                Ok((scored == 2).then_some(()))
            },
        )
        .await?;

        // Requests at once spread over both devices, whichever hub they are on: each one
        // in flight outweighs any difference in the load the devices report (one
        // machine's CPU, sampled at different moments).
        let at_once = (0..6).map(|_| {
            ask(
                &on_c,
                "embeddings",
                json!({"payload": {"text": "hello", "delay_ms": 300}}),
            )
        });
        let mut served: HashMap<String, usize> = HashMap::new();
        for answer in futures_util::future::join_all(at_once).await {
            let (status, body) = answer?;
            ensure!(status == 200, "{status} {body}");
            ensure!(body["payload"]["vector"][0] == 5.0, "{body}");
            *served.entry(served_by(&body)).or_default() += 1;
        }
        ensure!(
            served.get(&x_id).copied().unwrap_or(0) >= 2
                && served.get(&y_id).copied().unwrap_or(0) >= 2,
            "both devices served: {served:?}"
        );

        // One request held at x: hub c counts it in flight, and the next go to y.
        let held = ask_later(
            &on_c,
            "embeddings",
            json!({"payload": {"text": "held", "gate": "X"}, "prefer_device": x_id}),
        );
        let kind = tokio::time::timeout(Duration::from_secs(10), arrived.recv()).await?;
        ensure!(kind == Some("embed"));
        for _ in 0..3 {
            let (status, body) =
                ask(&on_c, "embeddings", json!({"payload": {"text": "next"}})).await?;
            ensure!(status == 200, "{status} {body}");
            ensure!(served_by(&body) == y_id, "the idle device serves: {body}");
        }
        svc_x.release.notify_one();
        let (status, body) = held.await??;
        ensure!(status == 200 && served_by(&body) == x_id, "{status} {body}");

        // Cocoon to cocoon across hubs: y (on hub b) asks, preferring x (on hub a).
        let (code, out, err) = request_cli(
            &dir("cocoon-y"),
            &[
                "embeddings@1.0.0",
                "--payload",
                r#"{"text":"abc"}"#,
                "--prefer",
                &x_id,
            ],
        )?;
        ensure!(code == 0, "{out}{err}");
        let printed: Value = serde_json::from_str(&out)?;
        ensure!(printed["vector"][0] == 3.0, "{out}");
        ensure!(err.contains(&format!("served by device {x_id}")), "{err}");

        // A request in flight through a hub that dies ends once, at once, with an error
        // (llm.chat is not idempotent, so it is not sent again).
        let held = ask_later(
            &on_c,
            "llm.chat",
            json!({"payload": {"hold": "X"}, "prefer_device": x_id, "timeout_ms": 20000}),
        );
        let kind = tokio::time::timeout(Duration::from_secs(10), arrived.recv()).await?;
        ensure!(kind == Some("chat"));
        let killed = Instant::now();
        c.hubs[0].proc.kill();
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
        ensure!(status == 502 || status == 503, "{status} {body}");
        ensure!(body["error"]["code"] == "device_offline", "{body}");
        eprintln!(
            "request through the killed hub ended {:.2} s after the kill: {body}",
            killed.elapsed().as_secs_f64()
        );
        drop((x, y));
        Ok(())
    })
    .await
}

/// A device on hub a serving the proxy tests' service as `web`, online as seen from hub
/// b: the device, its id, and alice signed in on hub b.
async fn web_device_on_a(c: &Cluster) -> Result<(Cocoon, String, Api)> {
    let seen = Arc::new(Seen::default());
    let port = serve(service(seen.clone())).await?;
    let token = c.alice(0).await?.setup_token(60).await?;
    let device = Cocoon::start(
        &c.hubs[0].url,
        "box",
        Some(&token),
        &["--service", &format!("web:{port}")],
    )?;
    let id = device.device_id().await?;
    let on_b = c.alice(1).await?;
    online_on(&on_b, &id, Duration::from_secs(5)).await?;
    Ok((device, id, on_b))
}

/// Opens the test service's SSE stream at `url` and reads it up to its first event; the
/// stream is returned open.
async fn first_event(
    client: reqwest::Client,
    url: String,
    jwt: String,
) -> Result<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>> {
    let resp = client.get(&url).bearer_auth(&jwt).send().await?;
    let status = resp.status();
    if status != 200 {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{status} {body}");
    }
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("data: first") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await?
            .ok_or_else(|| anyhow!("the stream ended early"))??;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(body)
}

/// A hub forwards each request on its own connection to the device's hub, all from one
/// address: once one of them carried the hub key, that address is not held to the cap
/// per source, while any other address still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_forwarding_many_streams_is_not_held_to_the_cap_per_source() -> Result<()> {
    const CAP: usize = 16;
    const STREAMS: usize = 24;
    let cap = CAP.to_string();
    in_cluster(&["--max-connections-per-source", &cap], |c| async move {
        let (device, id, on_b) = web_device_on_a(&c).await?;
        // Users on three addresses of their own, each under hub b's cap.
        let clients: Vec<reqwest::Client> = (2..5u8)
            .map(|n| {
                reqwest::Client::builder()
                    .local_address(std::net::IpAddr::from([127, 0, 0, n]))
                    .no_proxy()
                    .build()
            })
            .collect::<Result<_, _>>()?;
        let url = |rest: &str| format!("{}/proxy/{id}/web{rest}", on_b.base);
        let warm = clients[0]
            .get(url("/"))
            .bearer_auth(&on_b.jwt)
            .send()
            .await?;
        anyhow::ensure!(warm.status() == 200, "{}", warm.status());

        // Many streams held open at once through hub b, each its own connection to a.
        let mut open = Vec::new();
        for i in 0..STREAMS {
            let client = clients[i % clients.len()].clone();
            let body = first_event(client, url("/sse"), on_b.jwt.clone())
                .await
                .with_context(|| format!("stream {i}"))?;
            open.push(body);
        }

        // Anyone else's address is still held to the cap on hub a.
        let mut held = Vec::new();
        let refused = loop {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::from(([127, 0, 0, 5], 0)))?;
            let mut tcp = socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], c.hubs[0].port)))
                .await?;
            let mut first = [0u8; 12];
            match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut first)).await {
                Ok(Ok(n)) => break String::from_utf8_lossy(&first[..n]).into_owned(),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => held.push(tcp),
            }
            anyhow::ensure!(
                held.len() <= CAP,
                "{} connections from one address",
                held.len()
            );
        };
        anyhow::ensure!(held.len() == CAP, "refused after {}", held.len());
        anyhow::ensure!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        drop((open, held, device));
        Ok(())
    })
    .await
}

/// A hub that has not forwarded anything to the device's hub yet, asked for many
/// streams at once, opens their connections only once the device's hub has read a
/// request with the hub key from it: none is refused at the cap per source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_streams_from_a_hub_that_has_not_forwarded_yet_is_not_refused() -> Result<()> {
    const CAP: usize = 3;
    const STREAMS: u8 = 32;
    let cap = CAP.to_string();
    in_cluster(&["--max-connections-per-source", &cap], |c| async move {
        let (device, id, on_b) = web_device_on_a(&c).await?;
        // One user address per stream, so hub b's own cap per source holds none back.
        let clients: Vec<reqwest::Client> = (1..=STREAMS)
            .map(|n| {
                reqwest::Client::builder()
                    .local_address(std::net::IpAddr::from([127, 0, 1, n]))
                    .no_proxy()
                    .build()
            })
            .collect::<Result<_, _>>()?;
        // Each user's connection to hub b is open before the burst, so the requests
        // reach hub b together.
        for client in &clients {
            let ok = client.get(format!("{}/healthz", on_b.base)).send().await?;
            ensure!(ok.status() == 200, "{}", ok.status());
        }
        let url = format!("{}/proxy/{id}/web/sse", on_b.base);
        // All at once, each held open: hub b needs a connection to hub a for every one.
        let opened = futures_util::future::join_all(
            clients
                .into_iter()
                .map(|client| first_event(client, url.clone(), on_b.jwt.clone())),
        )
        .await;
        let mut held = Vec::new();
        let mut failed = Vec::new();
        for (i, stream) in opened.into_iter().enumerate() {
            match stream {
                Ok(body) => held.push(body),
                Err(e) => failed.push(format!("stream {i}: {e:#}")),
            }
        }
        ensure!(failed.is_empty(), "{failed:?}");
        drop((held, device));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_s_device_is_back_on_another_within_seconds_and_its_streams_end_at_once(
) -> Result<()> {
    in_cluster(&[], |mut c| async move {
        // The device knows hub a only; it learns the others from hub a.
        let (device, id, on_b) = web_device_on_a(&c).await?;
        let client = http()?;
        let url = |rest: &str| format!("{}/proxy/{id}/web{rest}", on_b.base);
        // A stream through hub b from the device on hub a, mid-way when a dies.
        let resp = client
            .get(url("/sse"))
            .bearer_auth(&on_b.jwt)
            .send()
            .await?;
        ensure!(resp.status() == 200);
        let mut body = resp.bytes_stream();
        let first = tokio::time::timeout(Duration::from_secs(10), body.next()).await?;
        ensure!(first.is_some(), "the first event");

        let killed = Instant::now();
        c.hubs[0].proc.kill();
        // The stream ends at once, and never looks complete.
        let mut rest = String::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match body.next().await {
                    Some(Ok(chunk)) => rest.push_str(&String::from_utf8_lossy(&chunk)),
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await;
        ensure!(ended.is_ok(), "the stream through the dead hub still hangs");
        ensure!(!rest.contains("second"), "{rest}");

        // Online again through another hub, within 10 s, and usable.
        wait_for(
            "the device on another hub",
            Duration::from_secs(10),
            || async {
                let r = client
                    .get(url("/status/204"))
                    .bearer_auth(&on_b.jwt)
                    .send()
                    .await?;
                Ok((r.status() == 204).then_some(()))
            },
        )
        .await?;
        eprintln!(
            "device usable again {:.2} s after its hub was killed",
            killed.elapsed().as_secs_f64()
        );
        // Each surviving hub counts the moved device once, also while the dead hub
        // is not yet forgotten and still lists it.
        let (b, c_api) = (c.alice(1).await?, c.alice(2).await?);
        for api in [&b, &c_api] {
            let (status, list) = api.get("/api/hubs").await?;
            ensure!(status == 200, "{status} {list}");
            let sees = list["hubs"]
                .as_array()
                .and_then(|hubs| hubs.iter().find(|h| h["this"] == true))
                .and_then(|h| h["sees"].as_u64());
            ensure!(
                sees == Some(1),
                "{} sees the moved device {sees:?} times: {list}",
                api.base
            );
        }
        // The silent hub is dropped from the list within a few seconds.
        let dead = c.hubs[0].url.clone();
        wait_for(
            "the dead hub to leave the list",
            Duration::from_secs(6),
            || async {
                let counts = held(&on_b).await?;
                Ok((counts.len() == 2 && counts.iter().all(|(u, _)| *u != dead)).then_some(()))
            },
        )
        .await?;
        drop(device);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_hub_moves_its_devices_before_it_stops() -> Result<()> {
    in_cluster(&["--shutdown-grace", "5s"], |mut c| async move {
        let on_c = c.alice(2).await?;
        let token = c.alice(0).await?.setup_token(60).await?;
        let hubs = format!("{},{}", c.hubs[0].url, c.hubs[1].url);
        let device = Cocoon::start(&hubs, "box", Some(&token), &[])?;
        let id = device.device_id().await?;
        online_on(&on_c, &id, Duration::from_secs(5)).await?;
        wait_for(
            "hub a to hold the device",
            Duration::from_secs(5),
            || async {
                let counts = held(&on_c).await?;
                Ok(counts.contains(&(c.hubs[0].url.clone(), 1)).then_some(()))
            },
        )
        .await?;
        c.hubs[0].proc.terminate().await?;
        // The device is online on hub b, and hub c saw it move.
        wait_for("the device on hub b", Duration::from_secs(10), || async {
            let counts = held(&on_c).await?;
            Ok(counts.contains(&(c.hubs[1].url.clone(), 1)).then_some(()))
        })
        .await?;
        online_on(&on_c, &id, Duration::from_secs(5)).await?;
        drop(device);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_two_hubs_is_kept_by_the_newer_connection_everywhere() -> Result<()> {
    in_cluster(&[], |c| async move {
        let on_c = c.alice(2).await?;
        let token = c.alice(0).await?.setup_token(60).await?;
        let mut first = Cocoon::start(&c.hubs[0].url, "box-a", Some(&token), &[])?;
        let id = first.device_id().await?;
        online_on(&on_c, &id, Duration::from_secs(5)).await?;
        // A copy of its data dir, run against hub b: the same device, another agent.
        let copy = tempfile::tempdir()?;
        std::fs::write(copy.path().join("device.secret"), first.secret()?)?;
        let second = Cocoon::start_in(&c.hubs[1].url, "box-b", None, copy.path(), &[])?;
        ensure!(second.device_id().await? == id);
        // The older agent is told to stop for good; the newer one is the device.
        ensure!(first.proc.wait_exit(Duration::from_secs(20)).await? == 78);
        let said = first.proc.output();
        ensure!(said.contains("duplicate_agent"), "{said}");
        wait_for(
            "every hub to route to hub b",
            Duration::from_secs(5),
            || async {
                let counts = held(&on_c).await?;
                Ok((counts.contains(&(c.hubs[1].url.clone(), 1))
                    && counts.contains(&(c.hubs[0].url.clone(), 0)))
                .then_some(()))
            },
        )
        .await?;
        let (_, view) = on_c.cocoon(&id).await?;
        ensure!(view["online"] == true, "{view}");
        drop(second);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_without_the_catalog_s_keys_passes_for_a_hub() -> Result<()> {
    in_cluster(&[], |c| async move {
        let on_b = c.alice(1).await?;
        let client = http()?;
        // The route between hubs is unknown to a request without the hub key, or with
        // a wrong one, even one that names a device.
        let rpc = json!({"device": "00112233445566778899aabbccddeeff", "deadline_ms": 1000,
            "request": {"op": "task_stats"}});
        for key in [None, Some("0".repeat(64))] {
            let mut req = client
                .post(format!("{}/internal/hub/rpc", c.hubs[0].url))
                .json(&rpc);
            if let Some(k) = &key {
                req = req.header("x-adi-hub-key", k);
            }
            let resp = req.send().await?;
            ensure!(resp.status() == 404, "key {key:?}: {}", resp.status());
        }

        // Someone else on the NATS server sees the cluster's subjects and publishes a
        // beat of its own, unsigned and wrongly signed: no hub lists it.
        let nats = async_nats::connect(crate::harness::nats_url()).await?;
        let mut watch = nats.subscribe("adi.>").await?;
        let subject = loop {
            let m = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await?
                .ok_or_else(|| anyhow!("no cluster traffic"))?;
            if m.subject.as_str().ends_with(".beat") {
                break m.subject.to_string();
            }
        };
        let fake = json!({"hub": "2f1c6a5e-3b0e-4a57-9c1e-0d6c9a3b7f10",
            "url": "http://127.0.0.1:9", "devices": 1, "in_flight": 0,
            "started_at": 1, "seq": 0});
        let bytes = serde_json::to_vec(&fake)?;
        for _ in 0..3 {
            nats.publish(subject.clone(), bytes.clone().into()).await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Adi-Mac", "00".repeat(32).as_str());
            nats.publish_with_headers(subject.clone(), headers, bytes.clone().into())
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        nats.flush().await?;
        let listed = held(&on_b).await?;
        ensure!(listed.len() == 3, "{listed:?}");
        ensure!(
            listed.iter().all(|(u, _)| u != "http://127.0.0.1:9"),
            "{listed:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_a_device_of_another_hub_answers_through_any_hub() -> Result<()> {
    use crate::openai::{capabilities_key, stub};
    in_cluster(&[], |c| async move {
        let on_a = c.alice(0).await?;
        let (_server, port, _stop) = stub("A", vec!["llama-8b"]).await?;
        let device = Cocoon::start(
            &c.hubs[0].url,
            "gpu",
            Some(&on_a.setup_token(60).await?),
            &["--openai", &format!("llm:{port}")],
        )?;
        let id = device.device_id().await?;
        let key = capabilities_key(&on_a).await?;
        let http = http()?;
        // Through hub c: listed, answered whole and streamed, by the device on hub a.
        let base = &c.hubs[2].url;
        wait_for(
            "hub c to list the model",
            Duration::from_secs(10),
            || async {
                let body: Value = http
                    .get(format!("{base}/v1/models"))
                    .bearer_auth(&key)
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok((body["data"][0]["id"] == "llama-8b").then_some(()))
            },
        )
        .await?;
        let resp = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?;
        ensure!(resp.status() == 200, "{}", resp.status());
        ensure!(resp.headers()["x-adi-device"] == id.as_str());
        let body: Value = resp.json().await?;
        ensure!(
            body["choices"][0]["message"]["content"] == "hello from A",
            "{body}"
        );
        let resp = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "llama-8b", "stream": true,
                "messages": [{"role": "user", "content": "count"}]}))
            .send()
            .await?;
        ensure!(resp.status() == 200, "{}", resp.status());
        let text = resp.text().await?;
        ensure!(text.matches("data: ").count() == 6, "{text}");
        ensure!(text.ends_with("data: [DONE]\n\n"), "{text}");
        // The same model as a capability, asked at hub c by name.
        let on_c = c.alice(2).await?;
        let (status, body) = on_c
            .post(
                "/api/capabilities/llm.chat/request",
                json!({"payload": {"model": "llama-8b",
                    "messages": [{"role": "user", "content": "hi"}]}}),
            )
            .await?;
        ensure!(
            status == 200 && body["from_device"] == id.as_str(),
            "{status} {body}"
        );
        ensure!(
            body["payload"]["choices"][0]["message"]["content"] == "hello from A",
            "{body}"
        );
        let (status, body) = on_c
            .post(
                "/api/capabilities/llm.chat/request",
                json!({"model": "other", "payload": {}}),
            )
            .await?;
        ensure!(status == 503, "a model no device lists: {status} {body}");
        drop(device);
        Ok(())
    })
    .await
}
