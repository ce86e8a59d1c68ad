//! Members of a device through real hub, cocoon and CLI processes: a share makes a user
//! (or an owner, when it says so); a user uses the device but cannot manage it; an owner
//! removes a member, who loses the device at once, even mid-stream; anyone leaves; the
//! last owner cannot; an owner deletes a device, whose agent is told, stops and is
//! refused as removed when it comes back, its task store left alone; an owner gives a
//! member another role in place, never leaving the device without an owner.

use std::time::Duration;

use anyhow::{anyhow, Result};
use axum::body::Body;
use axum::routing::get;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{cli, Api, Cocoon, Hub};

/// A service whose `/stream` sends a line every 100 ms for as long as it is read, and
/// whose `/` answers at once. Returns its port.
async fn ticking_service() -> Result<u16> {
    let app = axum::Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/stream",
            get(|| async {
                let ticks = futures_util::stream::unfold(0u64, |n| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(format!("tick {n}\n")), n + 1))
                });
                Body::from_stream(ticks)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn members(body: &Value) -> Vec<(String, String)> {
    body["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|u| {
                    Some((
                        u["name"].as_str()?.to_owned(),
                        u["role"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, r)| ((*n).to_owned(), (*r).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_user_uses_a_shared_device_cannot_manage_it_and_loses_it_at_once_when_removed(
) -> Result<()> {
    let port = ticking_service().await?;
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--service", &format!("web:{port}")],
    )?;
    let id = cocoon.device_id().await?;
    let (alice_cfg, bob_cfg) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let alice_env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    let bob_env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", bob_key.as_str()),
    ];

    // A share token makes a user unless it says otherwise, and says so.
    let (code, share, err) = cli(
        alice_cfg.path(),
        &["cocoon", "generate-token", "--share", "box"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("user role"), "{err}");
    let (code, out, err) = cli(bob_cfg.path(), &["cocoon", "claim", share.trim()], &bob_env)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("you are now a user of box"), "{out}");
    let (code, out, err) = cli(
        alice_cfg.path(),
        &["cocoon", "members", "box", "--json"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out)?;
    assert_eq!(
        members(&json!({ "members": listed })),
        pairs(&[("alice", "owner"), ("bob", "user")])
    );
    let (code, table, _) = cli(bob_cfg.path(), &["cocoon", "members", "box"], &bob_env)?;
    assert_eq!(code, 0);
    assert!(
        table.starts_with("USER") && table.contains("bob") && table.contains("user"),
        "a user sees who else may use it: {table}"
    );

    // Bob uses it: the device, its services and the proxy...
    let (status, seen) = bob.cocoon(&id).await?;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["role"], "user");
    let proxied = |path: &str| {
        bob.http
            .get(format!("{}/proxy/{id}/web{path}", hub.url))
            .bearer_auth(&bob.jwt)
            .send()
    };
    let resp = proxied("/").await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await?, "hello");

    // ...but cannot share it, remove anyone or delete it: told why, with 403.
    for (status, body) in [
        bob.post(
            "/api/tokens",
            json!({"kind": "share", "device_id": id, "role": "user"}),
        )
        .await?,
        bob.delete(&format!("/api/cocoons/{id}/members/alice"))
            .await?,
        bob.delete(&format!("/api/cocoons/{id}")).await?,
    ] {
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert!(message(&body).contains("only an owner"), "{body}");
    }
    let (code, _, err) = cli(
        bob_cfg.path(),
        &["cocoon", "delete", "box", "--yes"],
        &bob_env,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("only an owner"), "{err}");
    assert_eq!(alice.cocoon(&id).await?.0, 200, "the device is still there");

    // The last owner cannot go, neither removed nor by leaving.
    let (code, _, err) = cli(alice_cfg.path(), &["cocoon", "leave", "box"], &alice_env)?;
    assert_ne!(code, 0);
    assert!(err.contains("last owner"), "{err}");
    let (status, body) = alice
        .delete(&format!("/api/cocoons/{id}/members/nobody"))
        .await?;
    assert_eq!(status, 404, "{body}");

    // Bob holds a stream open; alice removes him; the stream is cut (an error, not an
    // end that looks complete) and his next request finds no such device.
    let resp = proxied("/stream").await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or_else(|| anyhow!("the stream ended before its first tick"))??;
    assert!(String::from_utf8_lossy(&first).contains("tick"));
    let (code, out, err) = cli(
        alice_cfg.path(),
        &["cocoon", "remove-member", "box", "bob"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed bob"), "{out}");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Ok(e.to_string()),
                None => return Err(anyhow!("the stream ended as if complete")),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the removed member's stream went on"))??;
    assert!(!ended.is_empty());
    assert_eq!(proxied("/").await?.status(), 404);
    let (status, _) = bob.cocoon(&id).await?;
    assert_eq!(status, 404);
    assert!(bob.cocoons().await?.is_empty());

    // Shared again, as an owner this time: bob may now manage it, and leave it.
    let (status, token) = alice
        .post(
            "/api/tokens",
            json!({"kind": "share", "device_id": id, "role": "owner"}),
        )
        .await?;
    assert_eq!(status, 201, "{token}");
    assert_eq!(token["role"], "owner");
    let (status, claimed) = bob
        .post("/api/tokens/claim", json!({"token": token["token"]}))
        .await?;
    assert_eq!(status, 200, "{claimed}");
    assert_eq!(claimed["role"], "owner");
    let (status, listed) = bob.get(&format!("/api/cocoons/{id}/members")).await?;
    assert_eq!(status, 200);
    assert_eq!(
        members(&listed),
        pairs(&[("alice", "owner"), ("bob", "owner")])
    );
    let (status, tokens) = alice.get("/api/tokens").await?;
    assert_eq!(status, 200);
    assert!(
        tokens["tokens"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["role"] == "owner")),
        "{tokens}"
    );
    let (code, out, err) = cli(bob_cfg.path(), &["cocoon", "leave", "box"], &bob_env)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("you left box"), "{out}");
    assert!(bob.cocoons().await?.is_empty());
    let (_, listed) = alice.get(&format!("/api/cocoons/{id}/members")).await?;
    assert_eq!(members(&listed), pairs(&[("alice", "owner")]));
    drop(cocoon);
    Ok(())
}

#[tokio::test]
async fn an_owner_gives_a_member_another_role_in_place_and_a_device_keeps_an_owner() -> Result<()> {
    let port = ticking_service().await?;
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let carol_key = hub.add_user("carol")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let carol = Api::login(&hub.url, &carol_key).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "box",
        Some(&alice.setup_token(60).await?),
        &["--service", &format!("web:{port}")],
    )?;
    let id = cocoon.device_id().await?;
    let alice_cfg = tempfile::tempdir()?;
    let alice_env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    let (_, token) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    let (status, _) = bob
        .post("/api/tokens/claim", json!({"token": token["token"]}))
        .await?;
    assert_eq!(status, 200);
    let role_of = |who: &str| format!("/api/cocoons/{id}/members/{who}");

    // A user cannot raise anyone, themselves included; a stranger cannot see the device.
    for who in ["bob", "me", "alice"] {
        let (status, body) = bob.patch(&role_of(who), json!({"role": "owner"})).await?;
        assert_eq!(status, 403, "{who}: {body}");
        assert!(message(&body).contains("only an owner"), "{body}");
    }
    let (status, body) = carol
        .patch(&role_of("bob"), json!({"role": "owner"}))
        .await?;
    assert_eq!(status, 404, "{body}");
    // What is not a role, not a member or not the shape is refused and changes nothing.
    for (who, body, want) in [
        ("bob", json!({"role": "admin"}), 400),
        ("bob", json!({"role": "owner", "also": 1}), 400),
        ("bob", json!({}), 400),
        ("carol", json!({"role": "owner"}), 404),
        ("nobody", json!({"role": "owner"}), 404),
    ] {
        let (status, answer) = alice.patch(&role_of(who), body.clone()).await?;
        assert_eq!(status, want, "{who} {body}: {answer}");
    }
    let (status, body) = alice.patch(&role_of("me"), json!({"role": "user"})).await?;
    assert_eq!(status, 409, "{body}");
    assert!(message(&body).contains("last owner"), "{body}");
    let (_, listed) = alice.get(&format!("/api/cocoons/{id}/members")).await?;
    assert_eq!(
        members(&listed),
        pairs(&[("alice", "owner"), ("bob", "user")])
    );

    // Raised with the CLI, bob manages the device at once: he shares it.
    let (code, out, err) = cli(
        alice_cfg.path(),
        &["cocoon", "set-role", "box", "bob", "owner"],
        &alice_env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bob is now an owner of box"), "{out}");
    assert!(out.contains("owner") && out.contains("USER"), "{out}");
    let (status, bobs) = bob
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    assert_eq!(status, 201, "{bobs}");
    let (_, seen) = bob.cocoon(&id).await?;
    assert_eq!(seen["role"], "owner");

    // Now alice may step down; then bob is the last owner and may not.
    let (status, body) = alice.patch(&role_of("me"), json!({"role": "user"})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        members(&body),
        pairs(&[("bob", "owner"), ("alice", "user")])
    );
    let (status, body) = bob.patch(&role_of("me"), json!({"role": "user"})).await?;
    assert_eq!(status, 409, "{body}");

    // Alice, a user now, cannot raise herself back.
    let (status, _) = alice
        .patch(&role_of("me"), json!({"role": "owner"}))
        .await?;
    assert_eq!(status, 403);

    // Bob, lowered by the other owner, keeps using the device (his stream goes on) but
    // the share he made stops working.
    let (status, body) = bob
        .patch(&role_of("alice"), json!({"role": "owner"}))
        .await?;
    assert_eq!(status, 200, "{body}");
    let resp = bob
        .http
        .get(format!("{}/proxy/{id}/web/stream", hub.url))
        .bearer_auth(&bob.jwt)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let (status, body) = alice
        .patch(&role_of("bob"), json!({"role": "user"}))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        members(&body),
        pairs(&[("alice", "owner"), ("bob", "user")])
    );
    for _ in 0..3 {
        let tick = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .ok_or_else(|| anyhow!("the stream of a member made a user ended"))??;
        assert!(String::from_utf8_lossy(&tick).contains("tick"));
    }
    let (status, body) = carol
        .post("/api/tokens/claim", json!({"token": bobs["token"]}))
        .await?;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "token_revoked", "{body}");
    assert_eq!(carol.cocoon(&id).await?.0, 404);
    let (status, body) = bob
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    assert_eq!(status, 403, "{body}");

    // Each change is in the audit log, with the role given.
    let (status, audit) = alice.get("/api/audit?limit=1000").await?;
    assert_eq!(status, 200, "{audit}");
    let mut changes: Vec<(String, String)> = audit["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["kind"] == "member_role_changed")
                .filter_map(|e| {
                    Some((
                        e["target_user"].as_str()?.to_owned(),
                        e["detail"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    changes.reverse();
    assert_eq!(
        changes,
        pairs(&[
            ("bob", "owner"),
            ("alice", "user"),
            ("alice", "owner"),
            ("bob", "user")
        ]),
        "{audit}"
    );
    drop(cocoon);
    Ok(())
}

#[tokio::test]
async fn a_deleted_device_loses_every_member_its_agent_stops_and_is_refused_as_removed(
) -> Result<()> {
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let mut cocoon = Cocoon::start(&hub.url, "lab", Some(&alice.setup_token(60).await?), &[])?;
    let id = cocoon.device_id().await?;
    let (status, token) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    assert_eq!(status, 201, "{token}");
    let (status, _) = bob
        .post("/api/tokens/claim", json!({"token": token["token"]}))
        .await?;
    assert_eq!(status, 200);
    // A task written before, to show the device's store is left alone.
    let (status, task) = alice
        .post(
            &format!("/api/cocoons/{id}/tasks"),
            json!({"title": "kept on the device"}),
        )
        .await?;
    assert_eq!(status, 201, "{task}");
    let store = cocoon.data_dir.join("tasks.db");
    assert!(store.exists(), "the cocoon keeps its tasks in {store:?}");

    let cfg = tempfile::tempdir()?;
    let env = [
        ("ADI_HUB", hub.url.as_str()),
        ("ADI_API_KEY", alice_key.as_str()),
    ];
    // Without a terminal to ask on, deleting needs --yes.
    let (code, _, err) = cli(cfg.path(), &["cocoon", "delete", "lab"], &env)?;
    assert_ne!(code, 0);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(alice.cocoon(&id).await?.0, 200);

    let (code, out, err) = cli(cfg.path(), &["cocoon", "delete", "lab", "--yes"], &env)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("deleted lab") && out.contains("its agent was told and stops"),
        "{out}"
    );
    // The agent stops for good, saying why.
    let exit = cocoon.proc.wait_exit(Duration::from_secs(10)).await?;
    assert_ne!(exit, 0, "{}", cocoon.proc.output());
    assert!(
        cocoon.proc.output().contains("removed by its owner"),
        "{}",
        cocoon.proc.output()
    );
    // Nobody sees it any more.
    assert_eq!(alice.cocoon(&id).await?.0, 404);
    assert_eq!(bob.cocoon(&id).await?.0, 404);
    assert!(alice.cocoons().await?.is_empty() && bob.cocoons().await?.is_empty());
    let (status, _) = alice.delete(&format!("/api/cocoons/{id}")).await?;
    assert_eq!(status, 404, "deleting twice finds nothing");

    // Started again with the same secret, it is refused as removed and stops at once,
    // rather than retry forever; its task store is untouched.
    let mut again = Cocoon::start_in(&hub.url, "lab", None, &cocoon.data_dir, &[])?;
    let exit = again.proc.wait_exit(Duration::from_secs(20)).await?;
    assert_ne!(exit, 0);
    let said = again.proc.output();
    assert!(
        said.contains("device_removed") && said.contains("removed by its owner"),
        "{said}"
    );
    assert!(store.exists(), "the task store is left alone");
    let tasks = adi_task_store::SqliteTaskStore::open(&store).await?;
    let page = adi_task_store::TaskStore::list(
        &tasks,
        &adi_protocol::tasks::TaskFilter::default(),
        None,
        50,
    )
    .await?;
    assert!(
        page.tasks.iter().any(|t| t.title == "kept on the device"),
        "{:?}",
        page.tasks
    );

    // A new setup token brings it back, as a new device of its maker's.
    let mut back = Cocoon::start_in(
        &hub.url,
        "lab",
        Some(&alice.setup_token(60).await?),
        &cocoon.data_dir,
        &[],
    )?;
    assert_eq!(back.device_id().await?, id);
    let (status, seen) = alice.cocoon(&id).await?;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(members(&seen), pairs(&[("alice", "owner")]));
    back.proc.terminate().await?;
    Ok(())
}
