//! The access matrix: every kind of route (REST reads and writes, the proxy, the client
//! socket, capability requests, tokens, keys, members) against every kind of caller
//! (the device's owner, a user it was shared with, a stranger, a revoked key, an expired
//! key, a key with each single scope, a key limited to another device), with the exact
//! status each cell must answer. Deleting a device and removing a member are asserted
//! in `members`, where their effects are followed.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Api, Cocoon, Hub};

/// The callers, in the order of each row's statuses.
const CALLERS: [&str; 12] = [
    "owner",
    "user",
    "stranger",
    "revoked key",
    "expired key",
    "devices:read",
    "tasks:write",
    "proxy",
    "capabilities",
    "members:write",
    "keys:write",
    "other device only",
];

/// A service that answers `hello` on `/` and echoes JSON on `/embed`. Returns its port.
async fn service() -> Result<u16> {
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hello" }))
        .route(
            "/embed",
            axum::routing::post(|axum::Json(v): axum::Json<Value>| async move {
                axum::Json(json!({ "echo": v }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn manifest(dir: &Path, port: u16) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("embed.toml"),
        format!(
            "name = \"matrix\"\n[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.0.0\"\n\
             http = \"http://127.0.0.1:{port}/embed\"\n"
        ),
    )?;
    Ok(())
}

/// A key of alice's made with `body`, signed in.
async fn key_session(hub: &Hub, alice: &Api, body: Value) -> Result<(String, Api)> {
    let (status, made) = alice.post("/api/keys", body).await?;
    anyhow::ensure!(status == 201, "key: {status} {made}");
    let key = made["key"].as_str().unwrap_or_default().to_owned();
    let id = made["id"].as_str().unwrap_or_default().to_owned();
    Ok((id, Api::login(&hub.url, &key).await?))
}

/// What the client socket answers a sign-in with this session: 200 when signed in,
/// else the status of the error code it sends before closing.
async fn socket_status(hub: &Hub, jwt: &str) -> Result<u16> {
    let url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(
        json!({"type": "auth", "token": jwt}).to_string(),
    ))
    .await?;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?;
    let Some(Ok(Message::Text(t))) = first else {
        anyhow::bail!("no answer to the sign-in: {first:?}");
    };
    let v: Value = serde_json::from_str(&t)?;
    Ok(match (v["type"].as_str(), v["code"].as_str()) {
        (Some("authenticated"), _) => 200,
        (_, Some("unauthorized")) => 401,
        (_, Some("insufficient_scope")) => 403,
        _ => anyhow::bail!("unexpected sign-in answer {v}"),
    })
}

async fn status(resp: reqwest::RequestBuilder, jwt: &str) -> Result<u16> {
    Ok(resp.bearer_auth(jwt).send().await?.status().as_u16())
}

#[tokio::test]
async fn every_route_answers_every_kind_of_caller_exactly() -> Result<()> {
    let port = service().await?;
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let carol_key = hub.add_user("carol")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let carol = Api::login(&hub.url, &carol_key).await?;
    let dir = tempfile::tempdir()?;
    manifest(&dir.path().join("plugins"), port)?;
    let plugins = dir.path().join("plugins").to_string_lossy().to_string();
    let web = format!("web:{port}");
    let device = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--service", &web, "--plugins-dir", &plugins],
    )?;
    let other = Cocoon::start(&hub.url, "other", Some(&alice.setup_token(60).await?), &[])?;
    let (d, e) = (device.device_id().await?, other.device_id().await?);
    let (status_code, share) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": d}))
        .await?;
    anyhow::ensure!(status_code == 201, "{share}");
    let (status_code, claimed) = bob
        .post("/api/tokens/claim", json!({"token": share["token"]}))
        .await?;
    anyhow::ensure!(status_code == 200, "{claimed}");

    // The keys, each signed in.
    let (revoked_id, revoked) = key_session(&hub, &alice, json!({"name": "revoked"})).await?;
    let (_, expired) = key_session(
        &hub,
        &alice,
        json!({"name": "expired", "expires_in_secs": 2}),
    )
    .await?;
    let mut narrow = Vec::new();
    for scope in [
        "devices:read",
        "tasks:write",
        "proxy",
        "capabilities",
        "members:write",
        "keys:write",
    ] {
        let (_, api) = key_session(
            &hub,
            &alice,
            json!({"name": scope.replace(':', "-"), "scopes": [scope]}),
        )
        .await?;
        narrow.push(api);
    }
    let (_, limited) =
        key_session(&hub, &alice, json!({"name": "other-only", "devices": [e]})).await?;
    let (code, _) = alice.delete(&format!("/api/keys/{revoked_id}")).await?;
    anyhow::ensure!(code == 200);
    // Past the key's expiry and the hub's clock leeway (5 s): its session is over.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let mut callers: Vec<&Api> = vec![&alice, &bob, &carol, &revoked, &expired];
    callers.extend(narrow.iter());
    callers.push(&limited);
    assert_eq!(callers.len(), CALLERS.len());

    let ok_read = [200, 200, 404, 401, 401, 200, 403, 403, 403, 403, 403, 404];
    let rows: Vec<(&str, [u16; 12])> = vec![
        ("GET /api/cocoons/{d}", ok_read),
        ("GET /api/cocoons/{d}/services", ok_read),
        ("GET /api/cocoons/{d}/members", ok_read),
        ("GET /api/cocoons/{d}/tasks", ok_read),
        (
            "GET /api/cocoons",
            [200, 200, 200, 401, 401, 200, 403, 403, 403, 403, 403, 200],
        ),
        (
            "GET /api/aggregate/tasks",
            [200, 200, 200, 401, 401, 200, 403, 403, 403, 403, 403, 200],
        ),
        (
            "POST /api/cocoons/{d}/tasks",
            [201, 201, 404, 401, 401, 403, 201, 403, 403, 403, 403, 404],
        ),
        (
            "GET /proxy/{d}/web/",
            [200, 200, 404, 401, 401, 403, 403, 200, 403, 403, 403, 404],
        ),
        (
            "POST /api/capabilities/embeddings/request",
            [200, 200, 503, 401, 401, 403, 403, 403, 200, 403, 403, 503],
        ),
        (
            "POST /api/tokens (share {d})",
            [201, 403, 404, 401, 401, 403, 403, 403, 403, 201, 403, 404],
        ),
        (
            "POST /api/tokens (setup)",
            [201, 201, 201, 401, 401, 403, 403, 403, 403, 201, 403, 403],
        ),
        (
            "GET /api/tokens",
            [200, 200, 200, 401, 401, 403, 403, 403, 403, 200, 403, 200],
        ),
        (
            "DELETE /api/cocoons/{d}/members/alice (the last owner)",
            [409, 403, 404, 401, 401, 403, 403, 403, 403, 409, 403, 404],
        ),
        (
            "PATCH /api/cocoons/{d}/members/alice (to user: the last owner)",
            [409, 403, 404, 401, 401, 403, 403, 403, 403, 409, 403, 404],
        ),
        (
            "GET /api/keys",
            [200, 200, 200, 401, 401, 403, 403, 403, 403, 403, 200, 200],
        ),
        (
            "client socket sign-in",
            [200, 200, 200, 401, 401, 200, 403, 403, 403, 403, 403, 200],
        ),
    ];

    let mut wrong = Vec::new();
    for (route, expected) in &rows {
        for (i, api) in callers.iter().enumerate() {
            let http = &api.http;
            let url = |path: &str| format!("{}{path}", hub.url);
            let got = match *route {
                "GET /api/cocoons/{d}" => {
                    status(http.get(url(&format!("/api/cocoons/{d}"))), &api.jwt).await?
                }
                "GET /api/cocoons/{d}/services" => {
                    status(
                        http.get(url(&format!("/api/cocoons/{d}/services"))),
                        &api.jwt,
                    )
                    .await?
                }
                "GET /api/cocoons/{d}/members" => {
                    status(
                        http.get(url(&format!("/api/cocoons/{d}/members"))),
                        &api.jwt,
                    )
                    .await?
                }
                "GET /api/cocoons/{d}/tasks" => {
                    status(http.get(url(&format!("/api/cocoons/{d}/tasks"))), &api.jwt).await?
                }
                "GET /api/cocoons" => status(http.get(url("/api/cocoons")), &api.jwt).await?,
                "GET /api/aggregate/tasks" => {
                    status(http.get(url("/api/aggregate/tasks")), &api.jwt).await?
                }
                "POST /api/cocoons/{d}/tasks" => {
                    status(
                        http.post(url(&format!("/api/cocoons/{d}/tasks")))
                            .json(&json!({"title": "matrix"})),
                        &api.jwt,
                    )
                    .await?
                }
                "GET /proxy/{d}/web/" => {
                    status(http.get(url(&format!("/proxy/{d}/web/"))), &api.jwt).await?
                }
                "POST /api/capabilities/embeddings/request" => {
                    status(
                        http.post(url("/api/capabilities/embeddings/request"))
                            .json(&json!({"payload": {"x": 1}})),
                        &api.jwt,
                    )
                    .await?
                }
                "POST /api/tokens (share {d})" => {
                    status(
                        http.post(url("/api/tokens"))
                            .json(&json!({"kind": "share", "device_id": d})),
                        &api.jwt,
                    )
                    .await?
                }
                "POST /api/tokens (setup)" => {
                    status(
                        http.post(url("/api/tokens"))
                            .json(&json!({"kind": "setup"})),
                        &api.jwt,
                    )
                    .await?
                }
                "GET /api/tokens" => status(http.get(url("/api/tokens")), &api.jwt).await?,
                "DELETE /api/cocoons/{d}/members/alice (the last owner)" => {
                    status(
                        http.delete(url(&format!("/api/cocoons/{d}/members/alice"))),
                        &api.jwt,
                    )
                    .await?
                }
                "PATCH /api/cocoons/{d}/members/alice (to user: the last owner)" => {
                    status(
                        http.patch(url(&format!("/api/cocoons/{d}/members/alice")))
                            .json(&json!({"role": "user"})),
                        &api.jwt,
                    )
                    .await?
                }
                "GET /api/keys" => status(http.get(url("/api/keys")), &api.jwt).await?,
                "client socket sign-in" => socket_status(&hub, &api.jwt).await?,
                other => anyhow::bail!("no call for {other}"),
            };
            if got != expected[i] {
                wrong.push(format!(
                    "{route} as {}: {got}, expected {}",
                    CALLERS[i], expected[i]
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "cells that differ:\n{}", wrong.join("\n"));
    drop((device, other));
    Ok(())
}
