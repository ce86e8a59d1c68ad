//! The device side of the OpenAI-compatible endpoint: a cocoon run with
//! `--openai NAME:PORT` asks a real OpenAI-compatible server (a stub here) for its
//! models, offers them to the hub, follows the server's list as it changes or as the
//! server stops answering, and leaves the server reachable through `/proxy/` like any
//! service. `adi models` and `adi cocoon services` show what the hub learnt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::harness::{cli, wait_for, Api, Cocoon, Hub};

/// What the stub server answers to `GET /v1/models`: its models, or 503 while down.
#[derive(Default)]
struct Listing {
    models: Vec<String>,
    down: bool,
}

type Shared = Arc<Mutex<Listing>>;

fn set(listing: &Shared, models: &[&str], down: bool) {
    let mut l = listing.lock().unwrap_or_else(|e| e.into_inner());
    l.models = models.iter().map(|m| (*m).to_owned()).collect();
    l.down = down;
}

async fn models(State(listing): State<Shared>) -> Response {
    let l = listing.lock().unwrap_or_else(|e| e.into_inner());
    if l.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "loading model").into_response();
    }
    let data: Vec<Value> = l
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "stub"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A tiny OpenAI-compatible server on a free loopback port; returns its port.
async fn stub(listing: Shared) -> Result<u16> {
    let app = Router::new()
        .route("/v1/models", get(models))
        .with_state(listing);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// The hub's `GET /v1/models` as `(model, [(device id, service)])`, sorted by model.
async fn hub_models(api: &Api) -> Result<Vec<(String, Vec<(String, String)>)>> {
    let (status, body) = api.get("/v1/models").await?;
    anyhow::ensure!(status == 200, "GET /v1/models: {status} {body}");
    let mut out: Vec<(String, Vec<(String, String)>)> = body["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let devices = m["devices"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|d| {
                    (
                        d["id"].as_str().unwrap_or_default().to_owned(),
                        d["service"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            (m["id"].as_str().unwrap_or_default().to_owned(), devices)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until the hub lists exactly `want`, each served by `device`'s `llm`.
async fn wait_models(api: &Api, device: &str, want: &[&str]) -> Result<()> {
    let expected: Vec<(String, Vec<(String, String)>)> = want
        .iter()
        .map(|m| ((*m).to_owned(), vec![(device.to_owned(), "llm".to_owned())]))
        .collect();
    wait_for(
        &format!("the hub to list {want:?}"),
        Duration::from_secs(10),
        || async { Ok((hub_models(api).await? == expected).then_some(())) },
    )
    .await
}

#[tokio::test]
async fn the_servers_models_reach_the_hub_and_follow_its_list() -> Result<()> {
    let listing: Shared = Arc::default();
    set(&listing, &["model-b", "model-a"], false);
    let port = stub(listing.clone()).await?;
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "gpu-box",
        Some(&alice.setup_token(60).await?),
        &[
            "--openai",
            &format!("llm:{port}"),
            "--service",
            &format!("web:{port}"),
            "--openai-refresh",
            "300ms",
        ],
    )?;
    let device = cocoon.device_id().await?;

    // Registered with its models: the hub offers them at once, and lists the server
    // among the device's services.
    wait_models(&alice, &device, &["model-a", "model-b"]).await?;
    cocoon
        .proc
        .wait_line(
            &format!("openai service llm at {port} serves 2 models: model-a, model-b"),
            Duration::from_secs(5),
        )
        .await?;
    let (status, view) = alice.cocoon(&device).await?;
    assert_eq!(status, 200, "{view}");
    let services = view["services"].as_array().cloned().unwrap_or_default();
    let llm = services
        .iter()
        .find(|s| s["name"] == "llm")
        .unwrap_or_else(|| panic!("no llm service in {view}"));
    assert_eq!(llm["port"], port, "{llm}");
    // Shown where the hub's view carries them.
    let view_has_kind = llm.get("kind").is_some();
    if let Some(kind) = llm.get("kind") {
        assert_eq!(kind, "openai", "{llm}");
        assert_eq!(llm["models"], json!(["model-a", "model-b"]), "{llm}");
    }
    if let Some(kind) = services
        .iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| s.get("kind"))
    {
        assert_eq!(kind, "http");
    }

    // The server is an ordinary service too: reachable through the proxy.
    let (status, through) = alice.get(&format!("/proxy/{device}/llm/v1/models")).await?;
    assert_eq!(status, 200, "{through}");
    assert_eq!(through["data"][0]["id"], "model-b", "the stub's own answer");

    // The server's list changes: the hub follows within a few refreshes.
    set(&listing, &["model-c"], false);
    wait_models(&alice, &device, &["model-c"]).await?;
    cocoon
        .proc
        .wait_line(
            &format!("openai service llm at {port} serves 1 models: model-c"),
            Duration::from_secs(5),
        )
        .await?;

    // A server that stops answering offers nothing, warned about once however often it
    // is asked again; when it answers again, that is said and its models come back.
    set(&listing, &["model-c"], true);
    wait_models(&alice, &device, &[]).await?;
    let warning = format!("openai service llm at {port} cannot list its models");
    cocoon
        .proc
        .wait_line(&warning, Duration::from_secs(5))
        .await?;
    // Several retries (every 300 ms) pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cocoon.proc.output().matches(&warning).count(),
        1,
        "{}",
        cocoon.proc.output()
    );
    assert!(cocoon.proc.output().contains("HTTP 503"));
    set(&listing, &["model-c", "model-d"], false);
    wait_models(&alice, &device, &["model-c", "model-d"]).await?;
    cocoon
        .proc
        .wait_line(
            &format!("openai service llm at {port} answers again"),
            Duration::from_secs(5),
        )
        .await?;

    // The CLI: `adi models` lists each model with its device, `adi cocoon services`
    // each service with its kind.
    let config = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(config.path(), &["models"], &env)?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("MODEL") && lines[0].contains("DEVICES"),
        "{out}"
    );
    for model in ["model-c", "model-d"] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(model))
            .unwrap_or_else(|| panic!("no {model} row in {out}"));
        assert!(row.contains(&format!("gpu-box ({device})/llm")), "{out}");
    }
    let (code, out, err) = cli(config.path(), &["models", "--json"], &env)?;
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out)?;
    assert_eq!(listed[0]["id"], "model-c", "{listed}");
    assert_eq!(listed[0]["devices"][0]["id"], device.as_str(), "{listed}");
    let (code, out, err) = cli(config.path(), &["cocoon", "services", &device], &env)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("KIND") && out.contains("MODELS"), "{out}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {out}"))
            .to_owned()
    };
    if view_has_kind {
        assert!(row("web ").contains("http"), "{out}");
        let llm = row("llm ");
        assert!(
            llm.contains("openai") && llm.contains("model-c, model-d"),
            "{out}"
        );
    } else {
        assert!(row("llm ").contains(&port.to_string()), "{out}");
    }
    Ok(())
}

#[tokio::test]
async fn a_server_a_plugin_manifest_declares_is_offered_and_proxied_without_a_restart() -> Result<()>
{
    let listing: Shared = Arc::default();
    set(&listing, &["from-plugin"], false);
    let port = stub(listing).await?;
    let plugins = tempfile::tempdir()?;
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let plugins_dir = plugins.path().to_string_lossy().into_owned();
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--plugins-dir", &plugins_dir],
    )?;
    let device = cocoon.device_id().await?;
    std::fs::write(
        plugins.path().join("llm.toml"),
        format!("name = \"llama\"\n[[openai]]\nname = \"llm\"\nport = {port}\n"),
    )?;
    wait_models(&alice, &device, &["from-plugin"]).await?;
    let (status, through) = alice.get(&format!("/proxy/{device}/llm/v1/models")).await?;
    assert_eq!(status, 200, "{through}");
    assert_eq!(through["data"][0]["id"], "from-plugin");
    // Removing the manifest withdraws the server and its models.
    std::fs::remove_file(plugins.path().join("llm.toml"))?;
    wait_models(&alice, &device, &[]).await?;
    let (status, _) = alice.get(&format!("/proxy/{device}/llm/v1/models")).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn a_name_given_twice_is_refused_before_connecting() -> Result<()> {
    let hub = Hub::start().await?;
    let mut cocoon = Cocoon::start(
        &hub.url,
        "box",
        None,
        &["--service", "llm:8080", "--openai", "llm:8081"],
    )?;
    let code = cocoon.proc.wait_exit(Duration::from_secs(10)).await?;
    assert_ne!(code, 0);
    assert!(
        cocoon
            .proc
            .output()
            .contains("service \"llm\" is given twice"),
        "{}",
        cocoon.proc.output()
    );
    Ok(())
}
