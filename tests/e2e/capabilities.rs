//! Capability routing end to end: devices offer `embeddings` and `llm.chat` through
//! plugin manifests pointing at real HTTP services on loopback; a device without them
//! asks through its own cocoon (the CLI and the local API) and users ask through REST.
//! Requests spread by load, never reach another user's device, survive a serving device
//! killed mid-request when the capability is idempotent, and say so when it is not.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::harness::{cli, wait_for, Api, Cocoon, Hub};

/// A plugin service the test runs in place of an embedding or chat server. A request
/// whose payload says `"hold": NAME` is held (never answered) by the service called
/// NAME, after telling the test it arrived, so the test can kill the device mid-request;
/// one that says `"gate": NAME` is told the same way and answered once the test
/// releases it.
pub(crate) struct Plugin {
    name: &'static str,
    embeds: AtomicU64,
    chats: AtomicU64,
    arrived: mpsc::UnboundedSender<&'static str>,
    pub(crate) release: tokio::sync::Notify,
}

async fn answer(plugin: &Plugin, kind: &'static str, payload: Value) -> Json<Value> {
    if payload["hold"].as_str() == Some(plugin.name) {
        let _ = plugin.arrived.send(kind);
        std::future::pending::<()>().await;
    }
    if payload["gate"].as_str() == Some(plugin.name) {
        let _ = plugin.arrived.send(kind);
        plugin.release.notified().await;
    }
    if let Some(ms) = payload["delay_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let text = payload["text"].as_str().unwrap_or_default();
    Json(json!({
        "by": plugin.name,
        "kind": kind,
        "vector": [text.len() as f64, 0.5, -1.0],
    }))
}

async fn embed(State(p): State<Arc<Plugin>>, Json(payload): Json<Value>) -> Json<Value> {
    p.embeds.fetch_add(1, Ordering::SeqCst);
    answer(&p, "embed", payload).await
}

async fn chat(State(p): State<Arc<Plugin>>, Json(payload): Json<Value>) -> Json<Value> {
    p.chats.fetch_add(1, Ordering::SeqCst);
    answer(&p, "chat", payload).await
}

/// Starts a plugin service on a free loopback port.
pub(crate) async fn plugin(
    name: &'static str,
    arrived: mpsc::UnboundedSender<&'static str>,
) -> Result<(Arc<Plugin>, u16)> {
    let state = Arc::new(Plugin {
        name,
        embeds: AtomicU64::new(0),
        chats: AtomicU64::new(0),
        arrived,
        release: tokio::sync::Notify::new(),
    });
    let app = Router::new()
        .route("/embed", post(embed))
        .route("/chat", post(chat))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((state, port))
}

/// Writes a manifest offering `embeddings:1.2.0` (idempotent) and `llm.chat:1.0.0`
/// (not) from the service on `port`.
pub(crate) fn manifest(dir: &Path, port: u16) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "name = \"test-models\"\n\
             [[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.2.0\"\nhttp = \"http://127.0.0.1:{port}/embed\"\nidempotent = true\n\n\
             [[capabilities]]\nprotocol = \"llm.chat\"\nversion = \"1.0.0\"\nhttp = \"http://127.0.0.1:{port}/chat\"\n"
        ),
    )?;
    Ok(())
}

pub(crate) fn served_by(body: &Value) -> String {
    body["from_device"].as_str().unwrap_or_default().to_owned()
}

pub(crate) async fn ask(api: &Api, protocol: &str, body: Value) -> Result<(u16, Value)> {
    api.post(&format!("/api/capabilities/{protocol}/request"), body)
        .await
}

/// The same request, sent in its own task, for a test that acts while it is in flight.
pub(crate) fn ask_later(
    api: &Api,
    protocol: &'static str,
    body: Value,
) -> tokio::task::JoinHandle<Result<(u16, Value)>> {
    let api = api.clone();
    tokio::spawn(async move { ask(&api, protocol, body).await })
}

/// `adi cocoon request` from the device whose data dir is `dir`.
pub(crate) fn request_cli(dir: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let data_dir = dir.to_string_lossy().to_string();
    let mut all = vec!["cocoon", "request"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", &data_dir]);
    let config = tempfile::tempdir()?;
    cli(config.path(), &all, &[])
}

async fn offered_by(api: &Api, protocol: &str, version: &str) -> Result<Vec<String>> {
    let (status, body) = api
        .get(&format!(
            "/api/cocoons/by-capability?protocol={protocol}&version={version}"
        ))
        .await?;
    if status != 200 {
        bail!("by-capability: {status} {body}");
    }
    Ok(body["cocoons"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["online"] == true)
        .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
        .collect())
}

// Several threads: the plugin services run on this runtime while the test waits on
// CLI processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_device_serves_capabilities_within_the_owners_fleet() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let bob = Api::login(&hub.url, &hub.add_user("bob")?).await?;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (svc_b, port_b) = plugin("B", arrived_tx.clone()).await?;
    let (svc_c, port_c) = plugin("C", arrived_tx.clone()).await?;
    let (svc_d, port_d) = plugin("D", arrived_tx).await?;

    let dirs = tempfile::tempdir()?;
    let dir = |n: &str| dirs.path().join(n);
    manifest(&dir("plugins-b"), port_b)?;
    manifest(&dir("plugins-c"), port_c)?;
    manifest(&dir("plugins-d"), port_d)?;
    // C also has a broken manifest: reported by file and line, skipped, the rest loads.
    std::fs::write(
        dir("plugins-c").join("broken.toml"),
        "[[capabilities]]\nprotocl = \"embeddings\"\nversion = \"1.0.0\"\n",
    )?;
    // A has a chat plugin it was told not to offer.
    std::fs::create_dir_all(dir("plugins-a"))?;
    std::fs::write(
        dir("plugins-a").join("chat.toml"),
        "[[capabilities]]\nprotocol = \"llm.chat\"\nversion = \"1.0.0\"\ncommand = [\"cat\"]\n",
    )?;
    let plugins_arg = |n: &str| dir(n).to_string_lossy().to_string();

    let start = |name: &str, api: &Api, data: &str, plugins: &str| {
        let (name, data, plugins, api) = (
            name.to_owned(),
            dir(data),
            plugins_arg(plugins),
            api.clone(),
        );
        let hub_url = hub.url.clone();
        async move {
            let token = api.setup_token(600).await?;
            let mut extra = vec!["--plugins-dir".to_owned(), plugins];
            if name == "a" {
                extra.extend(["--disable-capability".to_owned(), "llm.chat".to_owned()]);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Cocoon::start_in(&hub_url, &name, Some(&token), &data, &extra)
        }
    };
    let a = start("a", &alice, "cocoon-a", "plugins-a").await?;
    let mut b = start("b", &alice, "cocoon-b", "plugins-b").await?;
    let c = start("c", &alice, "cocoon-c", "plugins-c").await?;
    let d = start("d", &bob, "cocoon-d", "plugins-d").await?;
    let (a_id, b_id, c_id, d_id) = (
        a.device_id().await?,
        b.device_id().await?,
        c.device_id().await?,
        d.device_id().await?,
    );
    c.proc
        .wait_line("broken.toml:2:", Duration::from_secs(10))
        .await
        .context("the broken manifest is reported with its file and line")?;

    // Listing: alice sees her two embedding devices, with their load; a 2.x request
    // finds none; A does not offer the chat it disabled.
    let mut both = vec![b_id.clone(), c_id.clone()];
    both.sort();
    wait_for(
        "B and C offering embeddings",
        Duration::from_secs(10),
        || async {
            let mut ids = offered_by(&alice, "embeddings", "1.0.0").await?;
            ids.sort();
            Ok((ids == both).then_some(()))
        },
    )
    .await?;
    let (_, listing) = alice
        .get("/api/cocoons/by-capability?protocol=embeddings&version=1.0")
        .await?;
    let first = &listing["cocoons"][0];
    assert_eq!(first["offer"]["version"], "1.2.0", "{listing}");
    assert_eq!(first["offer"]["idempotent"], true, "{listing}");
    assert!(first["score"].is_number(), "{listing}");
    assert!(offered_by(&alice, "embeddings", "2.0.0").await?.is_empty());
    let mut chat_ids = offered_by(&alice, "llm.chat", "1.0.0").await?;
    chat_ids.sort();
    assert_eq!(chat_ids, both, "A disabled llm.chat");
    assert_eq!(
        offered_by(&bob, "embeddings", "1.0.0").await?,
        vec![d_id.clone()]
    );

    // What C would advertise, from its own files: the valid manifest, and a non-zero
    // exit for the broken one.
    let config = tempfile::tempdir()?;
    let (code, out, err) = cli(
        config.path(),
        &[
            "cocoon",
            "capabilities",
            "--data-dir",
            &dir("cocoon-c").to_string_lossy(),
            "--plugins-dir",
            &plugins_arg("plugins-c"),
        ],
        &[],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("embeddings") && out.contains("1.2.0") && out.contains("models.toml"),
        "{out}"
    );
    assert!(out.contains("tasks") && out.contains("builtin"), "{out}");
    assert!(err.contains("broken.toml:2:"), "{err}");

    // Cocoon to cocoon: A asks through its own cocoon; B or C serves.
    let (code, out, err) = request_cli(
        &dir("cocoon-a"),
        &["embeddings@1.0.0", "--payload", r#"{"text":"hello"}"#],
    )?;
    assert_eq!(code, 0, "{err}");
    let printed: Value = serde_json::from_str(&out)?;
    assert_eq!(printed["vector"][0], 5.0, "{out}");
    let server = err
        .lines()
        .find_map(|l| l.strip_prefix("served by device "))
        .context("says who served")?
        .to_owned();
    assert!(server == b_id || server == c_id, "{server}");
    // A newer major finds no device, at once.
    let (code, _, err) = request_cli(&dir("cocoon-a"), &["embeddings@2.0.0", "--payload", "{}"])?;
    assert_ne!(code, 0);
    assert!(err.contains("no_capable_device"), "{err}");
    // Another user's device: refused before it reaches it.
    let (code, _, err) = request_cli(
        &dir("cocoon-a"),
        &["embeddings", "--payload", "{}", "--prefer", &d_id],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("forbidden"), "{err}");

    // The local API wants its token.
    let info: Value =
        serde_json::from_slice(&std::fs::read(dir("cocoon-a").join("local-api.json"))?)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir("cocoon-a").join("local-api.json"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let url = info["url"].as_str().context("url")?;
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/capabilities/embeddings/request"))
        .bearer_auth("wrong")
        .json(&json!({"payload": {}}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);

    // Users: alice's requests never reach bob's device and vice versa; a preferred
    // device alice does not own is treated as unknown.
    for _ in 0..4 {
        let (status, body) = ask(
            &alice,
            "embeddings",
            json!({"version": "1.0.0", "payload": {"text": "x"}, "prefer_device": d_id}),
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        assert_ne!(served_by(&body), d_id);
        assert_eq!(body["payload"]["kind"], "embed");
    }
    let (status, body) = ask(&bob, "embeddings", json!({"payload": {"text": "y"}})).await?;
    assert_eq!((status, served_by(&body)), (200, d_id.clone()), "{body}");
    assert_eq!(
        svc_d.embeds.load(Ordering::SeqCst),
        1,
        "only bob's request reached D"
    );
    let (status, body) = ask(
        &alice,
        "embeddings",
        json!({"version": "2.0.0", "payload": {}}),
    )
    .await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capable_device");
    let (status, _) = ask(&alice, "Bad Name", json!({"payload": {}})).await?;
    assert_eq!(status, 400);
    // A payload that cannot fit in one frame to the device is refused, and the link
    // to the chosen device stays up.
    let (status, body) = ask(
        &alice,
        "embeddings",
        json!({"payload": {"text": "x".repeat(200 * 1024)}}),
    )
    .await?;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    alice
        .wait_online(&b_id, true, Duration::from_secs(2))
        .await?;
    alice
        .wait_online(&c_id, true, Duration::from_secs(2))
        .await?;

    // Load spreads: eight slow requests at once go to both devices.
    let slow: Vec<_> = (0..8)
        .map(|i| {
            let alice = alice.clone();
            async move {
                ask(
                    &alice,
                    "embeddings",
                    json!({"version": "1.0.0", "payload": {"text": format!("t{i}"), "delay_ms": 400}}),
                )
                .await
            }
        })
        .collect();
    let mut by: HashMap<String, usize> = HashMap::new();
    for r in futures_util::future::join_all(slow).await {
        let (status, body) = r?;
        assert_eq!(status, 200, "{body}");
        *by.entry(served_by(&body)).or_default() += 1;
    }
    assert!(
        by.get(&b_id).copied().unwrap_or(0) >= 2 && by.get(&c_id).copied().unwrap_or(0) >= 2,
        "{by:?}"
    );

    // The built-in tasks capability: a task sent to whichever device takes it.
    let (status, body) = ask(
        &alice,
        "tasks",
        json!({"payload": {"title": "routed", "command": ["sh", "-c", "echo routed"]}}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload"]["title"], "routed");
    assert_eq!(body["payload"]["device_id"], body["from_device"]);
    assert!([&a_id, &b_id, &c_id].contains(&&served_by(&body)), "{body}");

    // A new manifest on A is offered without a restart, served by its command.
    std::fs::write(
        dir("plugins-a").join("echo.toml"),
        "[[capabilities]]\nprotocol = \"echo\"\nversion = \"0.1.0\"\ncommand = [\"cat\"]\n",
    )?;
    wait_for("A offering echo", Duration::from_secs(15), || async {
        Ok((offered_by(&alice, "echo", "0.1.0").await? == vec![a_id.clone()]).then_some(()))
    })
    .await?;
    let (status, body) = ask(&alice, "echo", json!({"payload": {"say": ["hi", 1]}})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (served_by(&body), &body["payload"]),
        (a_id.clone(), &json!({"say": ["hi", 1]}))
    );

    // Not idempotent: B dies holding a chat request; the caller hears device_offline
    // and the request is not sent again to C.
    let held = ask_later(
        &alice,
        "llm.chat",
        json!({"payload": {"hold": "B"}, "prefer_device": b_id}),
    );
    let kind = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .context("the chat request reached B")?;
    assert_eq!(kind, Some("chat"));
    b.proc.kill();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "device_offline", "{body}");
    assert_eq!(
        svc_c.chats.load(Ordering::SeqCst),
        0,
        "not retried elsewhere"
    );
    // The next request goes to C.
    let (status, body) = ask(&alice, "embeddings", json!({"payload": {"text": "next"}})).await?;
    assert_eq!((status, served_by(&body)), (200, c_id.clone()), "{body}");

    // Idempotent: B back (same data dir, same device), dies holding an embedding; the
    // hub retries once on C and the caller gets C's answer.
    let mut b2 = Cocoon::start_in(
        &hub.url,
        "b",
        None,
        &dir("cocoon-b"),
        &["--plugins-dir", &plugins_arg("plugins-b")],
    )?;
    assert_eq!(b2.device_id().await?, b_id);
    alice
        .wait_online(&b_id, true, Duration::from_secs(10))
        .await?;
    let c_before = svc_c.embeds.load(Ordering::SeqCst);
    let held = ask_later(
        &alice,
        "embeddings",
        json!({"payload": {"hold": "B", "text": "again"}, "prefer_device": b_id}),
    );
    let kind = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .context("the embedding request reached B")?;
    assert_eq!(kind, Some("embed"));
    b2.proc.kill();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
    assert_eq!((status, served_by(&body)), (200, c_id.clone()), "{body}");
    assert_eq!(body["payload"]["by"], "C");
    assert_eq!(svc_c.embeds.load(Ordering::SeqCst), c_before + 1);
    assert!(svc_b.embeds.load(Ordering::SeqCst) >= 1);
    drop((a, c, d));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_device_finishes_its_calls_while_new_ones_go_elsewhere() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (svc_b, port_b) = plugin("B", arrived_tx.clone()).await?;
    let (svc_c, port_c) = plugin("C", arrived_tx).await?;
    let dirs = tempfile::tempdir()?;
    let mut devices = Vec::new();
    for (name, port) in [("b", port_b), ("c", port_c)] {
        let plugins = dirs.path().join(format!("plugins-{name}"));
        manifest(&plugins, port)?;
        let token = alice.setup_token(600).await?;
        devices.push(Cocoon::start_in(
            &hub.url,
            name,
            Some(&token),
            &dirs.path().join(name),
            &["--plugins-dir", &plugins.to_string_lossy()],
        )?);
    }
    let (b_id, c_id) = (devices[0].device_id().await?, devices[1].device_id().await?);
    wait_for(
        "B and C offering embeddings",
        Duration::from_secs(10),
        || async {
            Ok((offered_by(&alice, "embeddings", "1.0.0").await?.len() == 2).then_some(()))
        },
    )
    .await?;

    let held = ask_later(
        &alice,
        "embeddings",
        json!({"payload": {"gate": "B", "text": "in flight"}, "prefer_device": b_id}),
    );
    let kind = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .context("the request reached B")?;
    assert_eq!(kind, Some("embed"));
    crate::harness::signal(devices[0].proc.pid(), "TERM");
    // Once the hub hears B is stopping, even a request that prefers B goes to C.
    let prefer_b = json!({"payload": {"text": "new"}, "prefer_device": b_id});
    wait_for(
        "requests passing B over",
        Duration::from_secs(10),
        || async {
            let (status, body) = ask(&alice, "embeddings", prefer_b.clone()).await?;
            Ok((status == 200 && served_by(&body) == c_id).then_some(()))
        },
    )
    .await?;
    for _ in 0..3 {
        let (status, body) = ask(&alice, "embeddings", prefer_b.clone()).await?;
        assert_eq!((status, served_by(&body)), (200, c_id.clone()), "{body}");
    }
    // B is still there for the call it holds, and answers it.
    svc_b.release.notify_one();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
    assert_eq!((status, served_by(&body)), (200, b_id.clone()), "{body}");
    assert_eq!(body["payload"]["by"], "B");
    // Then it leaves by itself.
    assert_eq!(devices[0].proc.wait_exit(Duration::from_secs(15)).await?, 0);
    alice
        .wait_online(&b_id, false, Duration::from_secs(10))
        .await?;
    assert!(svc_c.embeds.load(Ordering::SeqCst) >= 4);
    Ok(())
}
