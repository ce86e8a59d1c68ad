//! API keys and users through real hub, cocoon and CLI processes: named keys narrowed to
//! scopes, devices and an expiry allow exactly that; revoking a key ends every session
//! opened with it at once (REST, proxy, open client sockets); on the hub host, an admin
//! disables, enables, rotates and removes users while the hub runs, and the hub applies
//! each within a second.

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::harness::{cli, fresh_postgres, wait_for, Api, Cocoon, Hub};

/// A service on loopback that answers `hello`. Returns its port.
async fn hello_service() -> Result<u16> {
    let app = axum::Router::new().fallback(|| async { "hello" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

async fn proxied(api: &Api, device: &str) -> Result<u16> {
    Ok(api
        .http
        .get(format!("{}/proxy/{device}/web/", api.base))
        .bearer_auth(&api.jwt)
        .send()
        .await?
        .status()
        .as_u16())
}

/// Signs in with `key`; the status and body of a refusal.
async fn sign_in(hub: &Hub, key: &str) -> Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/auth/token", hub.url))
        .json(&json!({ "api_key": key }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn narrow_keys_allow_only_what_they_say_and_a_revoked_key_ends_its_sessions_at_once(
) -> Result<()> {
    let port = hello_service().await?;
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let web = format!("web:{port}");
    let boxy = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--service", &web],
    )?;
    let other = Cocoon::start(
        &hub.url,
        "other",
        Some(&alice.setup_token(60).await?),
        &["--service", &web],
    )?;
    let (box_id, other_id) = (boxy.device_id().await?, other.device_id().await?);
    let cfg = tempfile::tempdir()?;
    let env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];

    // A key that reads and proxies, on "box" only, for an hour; shown once.
    let (status, out, err) = cli(
        cfg.path(),
        &[
            "keys",
            "create",
            "ci",
            "--scope",
            "devices:read",
            "--scope",
            "proxy",
            "--device",
            "box",
            "--expires",
            "1h",
        ],
        &env,
    )?;
    assert_eq!(status, 0, "{err}");
    let ci_key = out.trim().to_owned();
    assert!(ci_key.starts_with("adi_key_"), "{ci_key}");
    assert!(err.contains("devices:read, proxy on 1 device(s)"), "{err}");
    let (status, _, err) = cli(cfg.path(), &["keys", "create", "ci"], &env)?;
    assert_ne!(status, 0);
    assert!(err.contains("already have a key named \"ci\""), "{err}");
    let (status, _, err) = cli(
        cfg.path(),
        &["keys", "create", "bad", "--scope", "devices:write"],
        &env,
    )?;
    assert_ne!(status, 0);
    assert!(err.contains("not a scope"), "{err}");

    // It sees and reaches box, nothing else, and does nothing else.
    let ci = Api::login(&hub.url, &ci_key).await?;
    let listed: Vec<String> = ci
        .cocoons()
        .await?
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, vec![box_id.clone()]);
    assert_eq!(
        ci.cocoon(&other_id).await?.0,
        404,
        "outside the key's devices"
    );
    assert_eq!(proxied(&ci, &box_id).await?, 200);
    assert_eq!(proxied(&ci, &other_id).await?, 404);
    for (status, body) in [
        ci.post(
            &format!("/api/cocoons/{box_id}/tasks"),
            json!({"title": "nope"}),
        )
        .await?,
        ci.post("/api/tokens", json!({"kind": "setup"})).await?,
        ci.post("/api/keys", json!({"name": "wider"})).await?,
        ci.post("/api/capabilities/embeddings/request", json!({}))
            .await?,
    ] {
        assert_eq!(status, 403, "{body}");
        assert_eq!(code(&body), "insufficient_scope", "{body}");
        assert!(message(&body).contains("lacks the"), "{body}");
    }
    let (_, body) = ci
        .post(
            &format!("/api/cocoons/{box_id}/tasks"),
            json!({"title": "nope"}),
        )
        .await?;
    assert!(
        message(&body).contains("tasks:write"),
        "names the scope: {body}"
    );

    // A key may only make keys that allow no more than it does.
    let (status, keys_only) = alice
        .post(
            "/api/keys",
            json!({"name": "keys-only", "scopes": ["keys:write", "devices:read"], "devices": [box_id]}),
        )
        .await?;
    assert_eq!(status, 201, "{keys_only}");
    let keys_api = Api::login(&hub.url, keys_only["key"].as_str().unwrap_or_default()).await?;
    let (status, body) = keys_api
        .post(
            "/api/keys",
            json!({"name": "escalate", "scopes": ["proxy"]}),
        )
        .await?;
    assert_eq!((status, code(&body)), (403, "insufficient_scope"), "{body}");
    let (status, body) = keys_api
        .post("/api/keys", json!({"name": "wider", "devices": [other_id]}))
        .await?;
    assert_eq!(status, 404, "a device outside its own limit: {body}");
    let (status, inherited) = keys_api
        .post("/api/keys", json!({"name": "inherits"}))
        .await?;
    assert_eq!(status, 201, "{inherited}");
    assert_eq!(inherited["devices"], json!([box_id]), "{inherited}");
    assert_eq!(
        inherited["scopes"],
        json!(["devices:read", "keys:write"]),
        "{inherited}"
    );
    assert!(inherited["expires_at"].is_null(), "{inherited}");

    // Nor outlive it: a key made by an expiring key expires with it at the latest.
    let (status, brief) = alice
        .post(
            "/api/keys",
            json!({"name": "brief", "scopes": ["keys:write"], "expires_in_secs": 600}),
        )
        .await?;
    assert_eq!(status, 201, "{brief}");
    let brief_api = Api::login(&hub.url, brief["key"].as_str().unwrap_or_default()).await?;
    let (status, child) = brief_api
        .post("/api/keys", json!({"name": "forever"}))
        .await?;
    assert_eq!(status, 201, "{child}");
    assert_eq!(child["expires_at"], brief["expires_at"], "{child}");

    // Listed without secrets.
    let (status, out, err) = cli(cfg.path(), &["keys", "list", "--json"], &env)?;
    assert_eq!(status, 0, "{err}");
    assert!(
        !out.contains(&ci_key[ci_key.len() - 20..]),
        "a secret is listed"
    );
    let keys: Vec<Value> = serde_json::from_str(&out)?;
    let ci_entry = keys
        .iter()
        .find(|k| k["name"] == "ci")
        .cloned()
        .unwrap_or_default();
    assert_eq!(ci_entry["state"], "active");
    assert_eq!(ci_entry["scopes"], json!(["devices:read", "proxy"]));
    assert_eq!(ci_entry["devices"], json!([box_id]));
    assert!(ci_entry["expires_at"].as_i64().is_some(), "{ci_entry}");

    // Revoked by name: the session opened with it ends on every route, its open
    // client socket closes saying why, and the key signs in no more.
    let mut socket = crate::wire::client(&hub, &ci.jwt).await?;
    let (status, out, err) = cli(cfg.path(), &["keys", "revoke", "ci"], &env)?;
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("revoked key ci"), "{out}");
    let (status, body) = ci.get("/api/cocoons").await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("revoked"), "{body}");
    assert_eq!(proxied(&ci, &box_id).await?, 401);
    let closed = crate::wire::next(&mut socket).await?;
    assert_eq!(closed["close"], 1008, "{closed}");
    assert_eq!(closed["reason"], "api key revoked", "{closed}");
    let (status, body) = sign_in(&hub, &ci_key).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("revoked"), "{body}");
    // Alice's own session, from another key, is untouched; the name is free again.
    assert_eq!(alice.cocoons().await?.len(), 2);
    let (status, _, err) = cli(cfg.path(), &["keys", "create", "ci"], &env)?;
    assert_eq!(status, 0, "{err}");

    // An expired key signs in no more.
    let (status, short) = alice
        .post("/api/keys", json!({"name": "short", "expires_in_secs": 1}))
        .await?;
    assert_eq!(status, 201, "{short}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = sign_in(&hub, short["key"].as_str().unwrap_or_default()).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("expired"), "{body}");
    drop((boxy, other));
    Ok(())
}

#[tokio::test]
async fn an_admin_disables_enables_rotates_and_removes_users_while_the_hub_runs() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let solo = Cocoon::start(&hub.url, "solo", Some(&bob.setup_token(60).await?), &[])?;
    let solo_id = solo.device_id().await?;
    let admin = tempfile::tempdir()?;
    let data_dir = hub.data_dir.to_string_lossy().to_string();
    let user = |args: &[&str]| {
        let mut all = vec!["signaling", "user"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", &data_dir]);
        cli(admin.path(), &all, &[])
    };

    let (status, out, err) = user(&["list"])?;
    assert_eq!(status, 0, "{err}");
    assert!(out.starts_with("USER"), "{out}");
    let (status, out, _) = user(&["list", "--json"])?;
    assert_eq!(status, 0);
    let users: Vec<Value> = serde_json::from_str(&out)?;
    let bob_row = users
        .iter()
        .find(|u| u["name"] == "bob")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (bob_row["keys"].as_u64(), bob_row["devices"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(bob_row["disabled_at"].is_null());

    // Disabled: the running hub refuses bob's session within a second, on every route.
    let mut socket = crate::wire::client(&hub, &bob.jwt).await?;
    let (status, out, err) = user(&["disable", "bob"])?;
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("disabled bob"), "{out}");
    wait_for("bob's session refused", Duration::from_secs(5), || async {
        Ok((bob.get("/api/cocoons").await?.0 == 401).then_some(()))
    })
    .await?;
    let closed = crate::wire::next(&mut socket).await?;
    assert_eq!(closed["reason"], "user disabled or removed", "{closed}");
    let (status, body) = sign_in(&hub, &bob_key).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("disabled"), "{body}");
    assert_eq!(alice.cocoons().await?.len(), 0, "alice goes on");

    // Enabled: bob signs in again.
    let (status, _, err) = user(&["enable", "bob"])?;
    assert_eq!(status, 0, "{err}");
    let bob = Api::login(&hub.url, &bob_key).await?;
    wait_for(
        "bob's new session accepted",
        Duration::from_secs(5),
        || async { Ok((bob.get("/api/cocoons").await?.0 == 200).then_some(())) },
    )
    .await?;

    // A rotated key: the old one and its sessions are refused, the new one works.
    let (status, new_key, err) = user(&["rotate-key", "bob"])?;
    assert_eq!(status, 0, "{err}");
    let new_key = new_key.trim().to_owned();
    assert!(new_key.starts_with("adi_key_") && new_key != bob_key);
    assert_eq!(sign_in(&hub, &bob_key).await?.0, 401);
    wait_for(
        "the old key's session refused",
        Duration::from_secs(5),
        || async { Ok((bob.get("/api/cocoons").await?.0 == 401).then_some(())) },
    )
    .await?;
    let bob = Api::login(&hub.url, &new_key).await?;
    assert_eq!(bob.cocoons().await?.len(), 1);

    // Removing bob would orphan "solo": refused until told what to do with it.
    let (status, _, err) = user(&["remove", "bob"])?;
    assert_ne!(status, 0);
    assert!(
        err.contains("last owner of solo") && err.contains("--transfer-to"),
        "{err}"
    );
    let (status, out, err) = user(&["remove", "bob", "--transfer-to", "alice"])?;
    assert_eq!(status, 0, "{err}");
    assert!(
        out.contains("solo") && out.contains("now owned by alice"),
        "{out}"
    );
    wait_for("bob's session refused", Duration::from_secs(5), || async {
        Ok((bob.get("/api/cocoons").await?.0 == 401).then_some(()))
    })
    .await?;
    assert_eq!(sign_in(&hub, &new_key).await?.0, 401);
    let (status, seen) = alice.cocoon(&solo_id).await?;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["role"], "owner");
    assert_eq!(
        alice
            .http
            .get(format!("{}/proxy/{solo_id}/nothing/", hub.url))
            .bearer_auth(&alice.jwt)
            .send()
            .await?
            .status()
            .as_u16(),
        404,
        "alice reaches solo (it has no such service) as its owner now"
    );
    let (status, _, err) = user(&["disable", "nobody"])?;
    assert_ne!(status, 0);
    assert!(err.contains("no user \"nobody\""), "{err}");
    drop(solo);
    Ok(())
}

#[tokio::test]
async fn hubs_on_one_postgres_catalog_apply_each_others_revocations_and_removals() -> Result<()> {
    let Some(db) = fresh_postgres().await else {
        return Ok(());
    };
    let result = async {
        let port = hello_service().await?;
        let (a, b) = (
            Hub::start_postgres(&db.url()).await?,
            Hub::start_postgres(&db.url()).await?,
        );
        let alice_key = a.add_user("alice")?;
        let bob_key = a.add_user("bob")?;
        let alice = Api::login(&a.url, &alice_key).await?;
        // The device is connected to hub b; bob uses it through hub b.
        let web = format!("web:{port}");
        let device = Cocoon::start(
            &b.url,
            "box",
            Some(&alice.setup_token(60).await?),
            &["--service", &web],
        )?;
        let id = device.device_id().await?;
        let (_, share) = alice
            .post("/api/tokens", json!({"kind": "share", "device_id": id}))
            .await?;
        let bob_on_b = Api::login(&b.url, &bob_key).await?;
        let (status, _) = bob_on_b
            .post("/api/tokens/claim", json!({"token": share["token"]}))
            .await?;
        anyhow::ensure!(status == 200);
        anyhow::ensure!(proxied(&bob_on_b, &id).await? == 200);

        // Removed through hub a: hub b, which holds the device, stops proxying for him.
        let (status, _) = alice
            .delete(&format!("/api/cocoons/{id}/members/bob"))
            .await?;
        anyhow::ensure!(status == 200);
        wait_for(
            "hub b to learn of the removal",
            Duration::from_secs(5),
            || async { Ok((proxied(&bob_on_b, &id).await? == 404).then_some(())) },
        )
        .await?;

        // A key revoked through hub a: its session is refused by hub b too.
        let (_, made) = alice.post("/api/keys", json!({"name": "roaming"})).await?;
        let roaming = Api::login(&b.url, made["key"].as_str().unwrap_or_default()).await?;
        anyhow::ensure!(roaming.get("/api/cocoons").await?.0 == 200);
        let (status, _) = alice.delete("/api/keys/roaming").await?;
        anyhow::ensure!(status == 200);
        wait_for(
            "hub b to refuse the revoked key",
            Duration::from_secs(5),
            || async { Ok((proxied(&roaming, &id).await? == 401).then_some(())) },
        )
        .await?;
        drop(device);
        Ok(())
    }
    .await;
    db.drop_database().await;
    result
}
