//! The audit log through real hub, cocoon and CLI processes: each security-relevant
//! action leaves one event with its actor, device, address and time and never a secret;
//! each user reads exactly their own actions, what was done to them, and the events of
//! the devices they own (`GET /api/audit`, `adi audit`).

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::harness::{cli, wait_for, Api, Cocoon, Hub};

/// The events `api` may read with `query` (after `limit=1000&`), newest first.
async fn events_where(api: &Api, query: &str) -> Result<Vec<Value>> {
    let (status, body) = api.get(&format!("/api/audit?limit=1000{query}")).await?;
    anyhow::ensure!(status == 200, "audit: {status} {body}");
    Ok(body["events"].as_array().cloned().unwrap_or_default())
}

async fn events(api: &Api) -> Result<Vec<Value>> {
    events_where(api, "").await
}

/// The kinds of the events `api` may read with `query`, oldest first.
async fn kinds(api: &Api, query: &str) -> Result<Vec<String>> {
    let mut kinds: Vec<String> = events_where(api, query)
        .await?
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect();
    kinds.reverse();
    Ok(kinds)
}

fn find<'a>(events: &'a [Value], kind: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["kind"] == kind)
}

#[tokio::test]
async fn every_security_event_is_recorded_once_and_read_by_whom_it_concerns() -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let carol_key = hub.add_user("carol")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let carol = Api::login(&hub.url, &carol_key).await?;

    // Enrolment, a share and its claim, a task and its cancel.
    let device = Cocoon::start(&hub.url, "lab", Some(&alice.setup_token(60).await?), &[])?;
    let id = device.device_id().await?;
    let (_, share) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    let (status, _) = bob
        .post("/api/tokens/claim", json!({"token": share["token"]}))
        .await?;
    assert_eq!(status, 200);
    let (status, task) = bob
        .post(
            &format!("/api/cocoons/{id}/tasks"),
            json!({"title": "sleepy", "command": ["sleep", "30"]}),
        )
        .await?;
    assert_eq!(status, 201, "{task}");
    let task_id = task["id"].to_string().trim_matches('"').to_owned();
    let (status, _) = alice
        .post(
            &format!("/api/cocoons/{id}/tasks/{task_id}/cancel"),
            json!({}),
        )
        .await?;
    assert_eq!(status, 200);

    // Keys and tokens made and revoked; a failed sign-in on bob's key.
    let (_, key) = alice.post("/api/keys", json!({"name": "ci"})).await?;
    let (status, _) = alice.delete("/api/keys/ci").await?;
    assert_eq!(status, 200);
    let (_, spare) = alice.post("/api/tokens", json!({"kind": "setup"})).await?;
    let spare_id = spare["token"].as_str().unwrap_or_default()[10..26].to_owned();
    let (status, _) = alice.delete(&format!("/api/tokens/{spare_id}")).await?;
    assert_eq!(status, 200);
    let wrong = format!("{}{}", &bob_key[..bob_key.len() - 43], "x".repeat(43));
    assert_eq!(
        reqwest::Client::new()
            .post(format!("{}/api/auth/token", hub.url))
            .json(&json!({"api_key": wrong}))
            .send()
            .await?
            .status(),
        401
    );

    // Carol joins and leaves; bob is removed; alice signs a session out; an admin
    // disables and enables bob.
    let (_, share2) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    let (status, _) = carol
        .post("/api/tokens/claim", json!({"token": share2["token"]}))
        .await?;
    assert_eq!(status, 200);
    let (status, _) = carol
        .delete(&format!("/api/cocoons/{id}/members/me"))
        .await?;
    assert_eq!(status, 200);
    let (status, _) = alice
        .delete(&format!("/api/cocoons/{id}/members/bob"))
        .await?;
    assert_eq!(status, 200);
    let spare_session = Api::login(&hub.url, &alice_key).await?;
    let resp = reqwest::Client::new()
        .delete(format!("{}/api/auth/session", hub.url))
        .bearer_auth(&spare_session.jwt)
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    let data_dir = hub.data_dir.to_string_lossy().to_string();
    let admin = tempfile::tempdir()?;
    for action in ["disable", "enable"] {
        let (code, _, err) = cli(
            admin.path(),
            &["signaling", "user", action, "bob", "--data-dir", &data_dir],
            &[],
        )?;
        assert_eq!(code, 0, "{err}");
    }
    let bob = Api::login(&hub.url, &bob_key).await?;

    // Two agents with one secret, then the device deleted.
    let copy = tempfile::tempdir()?;
    std::fs::write(copy.path().join("device.secret"), device.secret()?)?;
    let second = Cocoon::start_in(&hub.url, "lab", None, copy.path(), &[])?;
    assert_eq!(second.device_id().await?, id);
    wait_for("the conflict recorded", Duration::from_secs(10), || async {
        Ok(kinds(&alice, "")
            .await?
            .contains(&"device_conflict".to_owned())
            .then_some(()))
    })
    .await?;

    // Alice owns the device: its events, whoever acted, and her own actions.
    assert_eq!(
        kinds(&alice, "").await?,
        [
            "token_created",
            "device_enrolled",
            "token_created",
            "share_claimed",
            "task_created",
            "task_cancelled",
            "key_created",
            "key_revoked",
            "token_created",
            "token_revoked",
            "token_created",
            "share_claimed",
            "member_left",
            "member_removed",
            "session_revoked",
            "device_conflict",
        ]
    );
    assert_eq!(
        kinds(&alice, &format!("&device={id}")).await?,
        [
            "device_enrolled",
            "token_created",
            "share_claimed",
            "task_created",
            "task_cancelled",
            "token_created",
            "share_claimed",
            "member_left",
            "member_removed",
            "device_conflict",
        ],
        "one device's events"
    );
    // Once deleted, the device's events others caused go with it; hers stay.
    let all = events(&alice).await?;
    let (status, _) = alice.delete(&format!("/api/cocoons/{id}")).await?;
    assert_eq!(status, 200);
    assert_eq!(
        kinds(&alice, "").await?,
        [
            "token_created",
            "device_enrolled",
            "token_created",
            "task_cancelled",
            "key_created",
            "key_revoked",
            "token_created",
            "token_revoked",
            "token_created",
            "member_removed",
            "session_revoked",
            "device_conflict",
            "device_deleted",
        ]
    );
    // Bob: what he did, and what was done to him; none of alice's own business.
    assert_eq!(
        kinds(&bob, "").await?,
        [
            "share_claimed",
            "task_created",
            "sign_in_failed",
            "member_removed",
            "user_disabled",
            "user_enabled",
        ]
    );
    // Carol: her claim and her leaving, nothing else.
    assert_eq!(kinds(&carol, "").await?, ["share_claimed", "member_left"]);

    // Each event says who, where from, and what; no secret anywhere in the log.
    let claimed = all
        .iter()
        .find(|e| e["kind"] == "share_claimed" && e["actor_user"] == "bob")
        .cloned()
        .unwrap_or_default();
    assert_eq!(claimed["actor_user"], "bob");
    assert_eq!(claimed["device"], id.as_str());
    assert_eq!(claimed["source"], "127.0.0.1");
    let enrolled = find(&all, "device_enrolled").cloned().unwrap_or_default();
    assert_eq!(enrolled["actor_device"], id.as_str());
    let removed = find(&all, "member_removed").cloned().unwrap_or_default();
    assert_eq!(
        (&removed["actor_user"], &removed["target_user"]),
        (&json!("alice"), &json!("bob"))
    );
    assert!(all.iter().all(|e| e["at"].as_i64().is_some_and(|t| t > 0)));
    let bobs = events(&bob).await?;
    let failed = find(&bobs, "sign_in_failed").cloned().unwrap_or_default();
    assert_eq!(failed["target_user"], "bob");
    assert_eq!(failed["source"], "127.0.0.1");
    let text = format!("{all:?}{bobs:?}");
    for secret in [
        alice_key.as_str(),
        bob_key.as_str(),
        share["token"].as_str().unwrap_or("-"),
        key["key"].as_str().unwrap_or("-"),
        &wrong[wrong.len() - 43..],
        &alice.jwt,
    ] {
        assert!(!text.contains(secret), "a secret is in the audit log");
    }

    // The CLI: a table, JSON, and filters by device and time.
    let cfg = tempfile::tempdir()?;
    let env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    let (code, table, err) = cli(cfg.path(), &["audit"], &env)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.starts_with("AT") && table.contains("device_deleted"),
        "{table}"
    );
    let (code, json_out, err) = cli(cfg.path(), &["audit", "--since", "1h", "--json"], &env)?;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&json_out)?;
    assert_eq!(listed.len(), 13);
    let (code, _, err) = cli(cfg.path(), &["audit", "--device", "nope"], &env)?;
    assert_ne!(code, 0);
    assert!(err.contains("no device of yours"), "{err}");
    let (status, body) = alice.get("/api/audit?limit=0").await?;
    assert_eq!(status, 400, "{body}");
    drop((device, second));
    Ok(())
}
