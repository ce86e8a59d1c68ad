//! Two users, three cocoons: each sees exactly their own devices, a share token makes a
//! member, and nothing of another user's device leaks through any route.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::harness::{cli, Api, Cocoon, Hub};

fn ids(list: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn two_users_three_cocoons_isolation_share_and_claim() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;

    let laptop = Cocoon::start(
        &hub.url,
        "laptop",
        Some(&alice.setup_token(3600).await?),
        &[],
    )?;
    let gpu = Cocoon::start(
        &hub.url,
        "gpu-box",
        Some(&alice.setup_token(3600).await?),
        &[
            "--service",
            "grafana:3000/api/health",
            "--service",
            "flowmap-api:8092",
        ],
    )?;
    let server = Cocoon::start(&hub.url, "server", Some(&bob.setup_token(3600).await?), &[])?;
    let (laptop_id, gpu_id, server_id) = (
        laptop.device_id().await?,
        gpu.device_id().await?,
        server.device_id().await?,
    );

    let mut expected = vec![laptop_id.clone(), gpu_id.clone()];
    expected.sort();
    assert_eq!(ids(&alice.cocoons().await?), expected);
    assert_eq!(ids(&bob.cocoons().await?), vec![server_id.clone()]);
    for c in alice.cocoons().await? {
        assert_eq!(c["status"], "online", "{c}");
        assert_eq!(c["owners"][0]["name"], "alice");
    }

    // Services as declared, through both the device and the services route.
    let (status, services) = alice
        .get(&format!("/api/cocoons/{gpu_id}/services"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(services["services"][0]["name"], "grafana");
    assert_eq!(services["services"][0]["port"], 3000);
    assert_eq!(services["services"][0]["health_path"], "/api/health");
    assert_eq!(services["services"][1]["name"], "flowmap-api");

    // Bob cannot see, list services of, or share Alice's device; the answer is the
    // same as for a device that does not exist.
    let (status, body) = bob.cocoon(&gpu_id).await?;
    assert_eq!(status, 404, "{body}");
    let (unknown_status, unknown_body) = bob.cocoon(&"0".repeat(32)).await?;
    assert_eq!((status, &body), (unknown_status, &unknown_body));
    assert_eq!(
        bob.get(&format!("/api/cocoons/{gpu_id}/services")).await?.0,
        404
    );
    let (status, _) = bob
        .post(
            "/api/tokens",
            serde_json::json!({"kind": "share", "device_id": gpu_id}),
        )
        .await?;
    assert_eq!(status, 404);
    assert_eq!(bob.cocoon("not-an-id").await?.0, 404);

    // Alice shares the GPU box through the CLI; Bob claims it through the CLI.
    let alice_cfg = tempfile::tempdir()?;
    let bob_cfg = tempfile::tempdir()?;
    let (code, out, err) = cli(
        alice_cfg.path(),
        &["login", "--hub", &hub.url, "--api-key", &alice_key],
        &[],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, share, err) = cli(
        alice_cfg.path(),
        &[
            "cocoon",
            "generate-token",
            "--share",
            "gpu-box", // by name, as the README shows
            "--expires",
            "1h",
        ],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    let share = share.trim();
    assert!(share.starts_with("adi_share_"), "{share}");
    let (code, out, err) = cli(
        bob_cfg.path(),
        &["cocoon", "claim", share],
        &[("ADI_HUB", &hub.url), ("ADI_API_KEY", &bob_key)],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("you are now a user of gpu-box"), "{out}");

    let mut bob_expected = vec![gpu_id.clone(), server_id.clone()];
    bob_expected.sort();
    assert_eq!(ids(&bob.cocoons().await?), bob_expected);
    let (_, shared) = bob.cocoon(&gpu_id).await?;
    let owners: Vec<&str> = shared["owners"]
        .as_array()
        .map(|o| o.iter().filter_map(|u| u["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        owners,
        vec!["alice"],
        "a share makes a user unless it says owner"
    );
    assert_eq!(shared["role"], "user", "{shared}");
    let members: Vec<(&str, &str)> = shared["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|u| Some((u["name"].as_str()?, u["role"].as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(members, vec![("alice", "owner"), ("bob", "user")]);
    // Sharing is not transitive to other devices: Bob still cannot see the laptop.
    assert_eq!(bob.cocoon(&laptop_id).await?.0, 404);
    assert_eq!(ids(&alice.cocoons().await?), expected);

    // The share token is one-time.
    let (code, _, err) = cli(
        bob_cfg.path(),
        &["cocoon", "claim", share],
        &[("ADI_HUB", &hub.url), ("ADI_API_KEY", &bob_key)],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("already used"), "{err}");

    // `adi cocoon list` with the stored session, as a table and as JSON.
    let (code, table, err) = cli(alice_cfg.path(), &["cocoon", "list"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("laptop") && table.contains("gpu-box") && !table.contains("server"),
        "{table}"
    );
    assert!(table.contains("grafana:3000"), "{table}");
    let (code, json, _) = cli(alice_cfg.path(), &["cocoon", "list", "--json"], &[])?;
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&json)?;
    assert_eq!(ids(&listed), expected);
    for c in &listed {
        assert_eq!(c["online"], true);
        assert!(c["last_heartbeat_age_secs"].as_f64().is_some(), "{c}");
    }
    // By id or by name.
    for device in [gpu_id.as_str(), "gpu-box"] {
        let (code, services, err) = cli(alice_cfg.path(), &["cocoon", "services", device], &[])?;
        assert_eq!(code, 0, "{err}");
        assert!(
            services.contains("flowmap-api") && services.contains("8092"),
            "{services}"
        );
    }
    let (code, _, err) = cli(
        alice_cfg.path(),
        &["cocoon", "services", "no-such-box"],
        &[],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("no device of yours is called"), "{err}");

    // Nothing secret was ever logged by the hub or the cocoons.
    let logs = format!(
        "{}{}{}{}",
        hub.proc.output(),
        laptop.proc.output(),
        gpu.proc.output(),
        server.proc.output()
    );
    for secret in [
        alice_key.as_str(),
        bob_key.as_str(),
        share,
        &laptop.secret()?,
        &gpu.secret()?,
        &alice.jwt,
    ] {
        assert!(!logs.contains(secret), "a secret appeared in the logs");
    }
    drop((laptop, gpu, server));
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

#[tokio::test]
async fn tokens_route_validates_its_input() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    for (body, code) in [
        (serde_json::json!({"kind": "share"}), 400),
        (
            serde_json::json!({"kind": "setup", "device_id": "0".repeat(32)}),
            400,
        ),
        (serde_json::json!({"kind": "teleport"}), 400),
        (
            serde_json::json!({"kind": "setup", "expires_in_secs": 0}),
            400,
        ),
        (
            serde_json::json!({"kind": "setup", "expires_in_secs": 999_999_999u64}),
            400,
        ),
        (
            serde_json::json!({"kind": "share", "device_id": "0".repeat(32)}),
            404,
        ),
    ] {
        let (status, answer) = alice.post("/api/tokens", body.clone()).await?;
        assert_eq!(status, code, "{body} -> {answer}");
        assert!(answer["error"]["message"].as_str().is_some(), "{answer}");
    }
    let (status, answer) = alice
        .post(
            "/api/tokens/claim",
            serde_json::json!({"token": "nonsense"}),
        )
        .await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "token_malformed");
    let setup = alice.setup_token(60).await?;
    let (status, answer) = alice
        .post("/api/tokens/claim", serde_json::json!({"token": setup}))
        .await?;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("setup token"));
    Ok(())
}

#[tokio::test]
async fn an_owner_claiming_their_own_share_token_is_told_so_and_the_token_still_works() -> Result<()>
{
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let bob = Api::login(&hub.url, &hub.add_user("bob")?).await?;
    let cocoon = Cocoon::start(&hub.url, "box", Some(&alice.setup_token(60).await?), &[])?;
    let id = cocoon.device_id().await?;
    let (status, share) = alice
        .post(
            "/api/tokens",
            serde_json::json!({"kind": "share", "device_id": id}),
        )
        .await?;
    assert_eq!(status, 201, "{share}");
    let token = share["token"].clone();

    let (status, answer) = alice
        .post("/api/tokens/claim", serde_json::json!({"token": token}))
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already a member of this device (as owner)")
                && m.contains("still works")),
        "{answer}"
    );
    // Not spent: the teammate it was meant for claims it.
    let (status, answer) = bob
        .post("/api/tokens/claim", serde_json::json!({"token": token}))
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(ids(&bob.cocoons().await?), vec![id]);
    Ok(())
}

#[tokio::test]
async fn a_session_whose_user_is_gone_is_refused_on_every_route() -> Result<()> {
    let hub = Hub::start().await?;
    let ghost = Api::login(&hub.url, &hub.add_user("ghost")?).await?;
    assert_eq!(ghost.get("/api/cocoons").await?.0, 200, "signed in");
    // The user is removed from the catalog while their session is still unexpired, by
    // hand, so that no change is written for the hub to read: it still sees them gone
    // within a second, as it sees every other removal of access.
    {
        use sqlx::Connection;
        let url = format!("sqlite:{}", hub.data_dir.join("catalog.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await?;
        let (id,): (String,) = sqlx::query_as("SELECT id FROM users WHERE name = 'ghost'")
            .fetch_one(&mut db)
            .await?;
        sqlx::query("DELETE FROM api_keys WHERE user_id = ?")
            .bind(&id)
            .execute(&mut db)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(&id)
            .execute(&mut db)
            .await?;
    }
    crate::harness::wait_for(
        "the removed user's session refused",
        Duration::from_secs(3),
        || async { Ok((ghost.get("/api/cocoons").await?.0 == 401).then_some(())) },
    )
    .await?;
    for (status, answer) in [
        ghost.get("/api/cocoons").await?,
        ghost.get("/api/aggregate/tasks").await?,
        ghost
            .post("/api/tokens", serde_json::json!({"kind": "setup"}))
            .await?,
        ghost
            .post(
                "/api/capabilities/embeddings/request",
                serde_json::json!({"payload": {}}),
            )
            .await?,
    ] {
        assert_eq!(status, 401, "{answer}");
        assert_eq!(answer["error"]["code"], "unauthorized", "{answer}");
    }
    let url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        serde_json::json!({"type": "auth", "token": ghost.jwt}).to_string(),
    ))
    .await?;
    let answer = crate::wire::next(&mut ws).await?;
    assert_eq!(answer["code"], "unauthorized", "{answer}");
    Ok(())
}
