//! Tasks live on their devices; the hub fans out and merges. Three cocoons of one user
//! (two on SQLite, one on PostgreSQL) and one of another user, real commands, real
//! kills, and paging over a thousand tasks while devices keep adding more.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::harness::{cli, drop_postgres, fresh_postgres, wait_for, Api, Cocoon, Hub};

async fn create(api: &Api, device: &str, body: Value) -> Result<Value> {
    let (status, task) = api
        .post(&format!("/api/cocoons/{device}/tasks"), body)
        .await?;
    if status != 201 {
        bail!("create: {status} {task}");
    }
    Ok(task)
}

async fn task(api: &Api, device: &str, id: &str) -> Result<Value> {
    let (status, t) = api
        .get(&format!("/api/cocoons/{device}/tasks/{id}"))
        .await?;
    if status != 200 {
        bail!("get: {status} {t}");
    }
    Ok(t)
}

async fn wait_status(api: &Api, device: &str, id: &str, want: &str) -> Result<Value> {
    wait_for(
        &format!("task {id} {want}"),
        Duration::from_secs(20),
        || async {
            let t = task(api, device, id).await?;
            Ok((t["status"] == want).then_some(t))
        },
    )
    .await
}

fn task_ids(list: &Value) -> Vec<String> {
    list["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn merged_view_across_sqlite_and_postgres_devices() -> Result<()> {
    let Some(pg) = fresh_postgres().await? else {
        return Ok(());
    };
    let result = merged_scenario(&pg).await;
    drop_postgres(&pg).await;
    result
}

async fn merged_scenario(pg: &str) -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let bob = Api::login(&hub.url, &hub.add_user("bob")?).await?;
    let a1 = Cocoon::start(
        &hub.url,
        "a-sqlite-1",
        Some(&alice.setup_token(60).await?),
        &[],
    )?;
    let mut a2 = Cocoon::start(
        &hub.url,
        "a-sqlite-2",
        Some(&alice.setup_token(60).await?),
        &[],
    )?;
    let a3 = Cocoon::start(
        &hub.url,
        "a-postgres",
        Some(&alice.setup_token(60).await?),
        &["--database-url", pg],
    )?;
    let b1 = Cocoon::start(&hub.url, "b-sqlite", Some(&bob.setup_token(60).await?), &[])?;
    let ids = [
        a1.device_id().await?,
        a2.device_id().await?,
        a3.device_id().await?,
    ];
    let bob_id = b1.device_id().await?;

    let mut expected = HashSet::new();
    for (i, d) in ids.iter().enumerate() {
        for n in 0..3 {
            let t = create(
                &alice,
                d,
                json!({"title": format!("alice task {i}.{n}"), "description": "report"}),
            )
            .await?;
            assert_eq!(t["device_id"], d.as_str());
            assert_eq!(t["status"], "pending");
            expected.insert(t["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    let bobs = create(&bob, &bob_id, json!({"title": "bob's secret task"})).await?;

    let (status, merged) = alice.get("/api/aggregate/tasks").await?;
    assert_eq!(status, 200, "{merged}");
    let got: HashSet<String> = task_ids(&merged).into_iter().collect();
    assert_eq!(got, expected, "exactly alice's tasks");
    assert!(!got.contains(bobs["id"].as_str().unwrap_or_default()));
    let created: Vec<i64> = merged["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["created_at"].as_i64().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");
    for t in merged["tasks"].as_array().cloned().unwrap_or_default() {
        assert!(
            ids.contains(&t["device_id"].as_str().unwrap_or_default().to_owned()),
            "{t}"
        );
    }
    let devices = merged["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 3);
    assert!(devices.iter().all(|d| d["status"] == "ok"), "{merged}");

    // Search and filter.
    let (_, found) = alice.get("/api/aggregate/tasks?q=TASK%201.").await?;
    assert_eq!(task_ids(&found).len(), 3, "{found}");
    let (_, none) = alice.get("/api/aggregate/tasks?status=completed").await?;
    assert!(task_ids(&none).is_empty());

    // Stats, per device and total.
    let (_, stats) = alice.get("/api/aggregate/stats").await?;
    assert_eq!(stats["total"]["total"], 9, "{stats}");
    assert_eq!(stats["total"]["by_status"]["pending"], 9, "{stats}");
    assert_eq!(stats["devices"].as_array().map(Vec::len), Some(3));

    // One device stops: it is labelled offline, the others still answer.
    a2.proc.kill();
    alice
        .wait_online(&ids[1], false, Duration::from_secs(5))
        .await?;
    let (status, partial) = alice.get("/api/aggregate/tasks").await?;
    assert_eq!(status, 200);
    assert_eq!(task_ids(&partial).len(), 6);
    let offline: Vec<&Value> = partial["devices"]
        .as_array()
        .map(|a| a.iter().filter(|d| d["status"] == "offline").collect())
        .unwrap_or_default();
    assert_eq!(offline.len(), 1, "{partial}");
    assert_eq!(offline[0]["device_id"], ids[1].as_str());
    assert_eq!(offline[0]["name"], "a-sqlite-2");

    // Bad input is refused with the reason.
    for (query, needle) in [
        ("status=done", "unknown status"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("cursor=garbage", "cursor"),
        ("timeout_ms=0", "timeout_ms"),
    ] {
        let (status, body) = alice.get(&format!("/api/aggregate/tasks?{query}")).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{query}: {body}"
        );
    }
    // Unknown task, someone else's device.
    let (status, _) = alice
        .get(&format!(
            "/api/cocoons/{}/tasks/{}",
            ids[0],
            uuid::Uuid::new_v4()
        ))
        .await?;
    assert_eq!(status, 404);
    let (status, _) = alice
        .get(&format!("/api/cocoons/{}/tasks/not-a-uuid", ids[0]))
        .await?;
    assert_eq!(status, 404);
    let (status, _) = alice
        .get(&format!(
            "/api/cocoons/{bob_id}/tasks/{}",
            bobs["id"].as_str().unwrap_or_default()
        ))
        .await?;
    assert_eq!(status, 404, "bob's task is invisible to alice");
    let (status, _) = alice
        .post(
            &format!("/api/cocoons/{bob_id}/tasks"),
            json!({"title": "x"}),
        )
        .await?;
    assert_eq!(status, 404);
    // An offline device answers fast with 502.
    let (status, body) = alice
        .post(
            &format!("/api/cocoons/{}/tasks", ids[1]),
            json!({"title": "x"}),
        )
        .await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "device_offline");
    Ok(())
}

#[tokio::test]
async fn paging_over_a_thousand_tasks_visits_each_once_while_devices_add_more() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let cocoons = [
        Cocoon::start(&hub.url, "p1", Some(&alice.setup_token(60).await?), &[])?,
        Cocoon::start(&hub.url, "p2", Some(&alice.setup_token(60).await?), &[])?,
        Cocoon::start(&hub.url, "p3", Some(&alice.setup_token(60).await?), &[])?,
    ];
    let mut ids = Vec::new();
    for c in &cocoons {
        ids.push(c.device_id().await?);
    }
    let mut existing = HashSet::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let creates = chunk.iter().map(|n| {
            let device = ids[n % 3].clone();
            let api = alice.clone();
            async move { create(&api, &device, json!({"title": format!("bulk {n}")})).await }
        });
        for t in futures_util::future::join_all(creates).await {
            existing.insert(t?["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(existing.len(), 1000);

    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("/api/aggregate/tasks?limit=97&cursor={c}"),
            None => "/api/aggregate/tasks?limit=97".to_owned(),
        };
        let (status, page) = alice.get(&url).await?;
        assert_eq!(status, 200, "{page}");
        for id in task_ids(&page) {
            assert!(seen.insert(id.clone()), "task {id} shown twice");
        }
        // Devices keep adding tasks between pages.
        create(
            &alice,
            &ids[pages % 3],
            json!({"title": format!("late {pages}")}),
        )
        .await?;
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    let missing: Vec<_> = existing.difference(&seen).collect();
    assert!(missing.is_empty(), "{} tasks skipped", missing.len());
    Ok(())
}

#[tokio::test]
async fn commands_run_on_the_device_with_logs_exit_codes_and_cancel() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let c = Cocoon::start(&hub.url, "runner", Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;

    let ok = create(
        &alice,
        &d,
        json!({"title": "ok", "command": ["sh", "-c", "echo one; echo two"]}),
    )
    .await?;
    let fail = create(
        &alice,
        &d,
        json!({"title": "fail", "command": ["sh", "-c", "echo oops >&2; exit 3"]}),
    )
    .await?;
    let missing = create(
        &alice,
        &d,
        json!({"title": "missing", "command": ["/nonexistent/program"]}),
    )
    .await?;
    let ok_id = ok["id"].as_str().unwrap_or_default();
    let done = wait_status(&alice, &d, ok_id, "completed").await?;
    assert_eq!(done["exit_code"], 0);
    let failed = wait_status(
        &alice,
        &d,
        fail["id"].as_str().unwrap_or_default(),
        "failed",
    )
    .await?;
    assert_eq!(failed["exit_code"], 3);
    let never = wait_status(
        &alice,
        &d,
        missing["id"].as_str().unwrap_or_default(),
        "failed",
    )
    .await?;
    assert!(
        never["error"]
            .as_str()
            .unwrap_or_default()
            .contains("could not start"),
        "{never}"
    );

    let (status, logs) = alice
        .get(&format!("/api/cocoons/{d}/tasks/{ok_id}/logs"))
        .await?;
    assert_eq!(status, 200);
    let stdout: Vec<&str> = logs["lines"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["stream"] == "stdout")
                .filter_map(|l| l["text"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(stdout, vec!["one", "two"]);
    assert_eq!(logs["complete"], true);
    let (_, err_logs) = alice
        .get(&format!(
            "/api/cocoons/{d}/tasks/{}/logs",
            fail["id"].as_str().unwrap_or_default()
        ))
        .await?;
    assert!(err_logs["lines"].as_array().is_some_and(|a| a
        .iter()
        .any(|l| l["stream"] == "stderr" && l["text"] == "oops")));

    // Follow a running task's log live through the CLI, until it ends.
    let slow = create(
        &alice,
        &d,
        json!({"title": "slow", "command": ["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"]}),
    )
    .await?;
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(
        cfg.path(),
        &[
            "tasks",
            "logs",
            "--device",
            "runner",
            slow["id"].as_str().unwrap_or_default(),
            "--follow",
        ],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["tick 1", "tick 2", "tick 3"],
        "{out}"
    );
    assert!(err.contains("task ended: completed"), "{err}");

    // Cancel kills a running command.
    let sleeper = create(
        &alice,
        &d,
        json!({"title": "sleeper", "command": ["sleep", "30"]}),
    )
    .await?;
    let sid = sleeper["id"].as_str().unwrap_or_default();
    wait_status(&alice, &d, sid, "running").await?;
    let (status, cancelled) = alice
        .post(&format!("/api/cocoons/{d}/tasks/{sid}/cancel"), json!({}))
        .await?;
    assert_eq!(status, 200, "{cancelled}");
    wait_status(&alice, &d, sid, "cancelled").await?;
    let (status, again) = alice
        .post(&format!("/api/cocoons/{d}/tasks/{sid}/cancel"), json!({}))
        .await?;
    assert_eq!(status, 409, "{again}");

    // The CLI: create with a command, list merged, show.
    let (code, out, err) = cli(
        cfg.path(),
        &[
            "tasks", "create", "--device", "runner", "--title", "from cli", "--", "sh", "-c",
            "echo cli",
        ],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    let cli_id = out.trim().to_owned();
    wait_status(&alice, &d, &cli_id, "completed").await?;
    let (code, out, _) = cli(
        cfg.path(),
        &["tasks", "list", "--status", "completed"],
        &env,
    )?;
    assert_eq!(code, 0);
    assert!(
        out.contains("from cli") && out.contains("runner") && !out.contains("sleeper"),
        "{out}"
    );
    let (code, out, _) = cli(
        cfg.path(),
        &["tasks", "list", "--search", "sleep", "--json"],
        &env,
    )?;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out)?;
    assert_eq!(task_ids(&listed).len(), 1, "{listed}");
    Ok(())
}

#[tokio::test]
async fn killed_cocoon_marks_its_running_task_interrupted_on_restart() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let dir = tempfile::tempdir()?;
    let mut c = Cocoon::start_in(
        &hub.url,
        "crashy",
        Some(&alice.setup_token(60).await?),
        dir.path(),
        &[],
    )?;
    let d = c.device_id().await?;
    let t = create(
        &alice,
        &d,
        json!({"title": "long", "command": ["sleep", "30"]}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default();
    wait_status(&alice, &d, id, "running").await?;
    c.proc.kill();
    alice.wait_online(&d, false, Duration::from_secs(5)).await?;

    let again = Cocoon::start_in(&hub.url, "crashy", None, dir.path(), &[])?;
    assert_eq!(again.device_id().await?, d);
    let t = wait_status(&alice, &d, id, "failed").await?;
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{t}"
    );
    Ok(())
}

#[tokio::test]
async fn no_exec_device_refuses_commands_but_keeps_plain_tasks() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let c = Cocoon::start(
        &hub.url,
        "locked",
        Some(&alice.setup_token(60).await?),
        &["--no-exec"],
    )?;
    let d = c.device_id().await?;
    let (status, body) = alice
        .post(
            &format!("/api/cocoons/{d}/tasks"),
            json!({"title": "x", "command": ["true"]}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-exec"),
        "{body}"
    );
    create(&alice, &d, json!({"title": "a note"})).await?;
    let (_, list) = alice.get("/api/aggregate/tasks").await?;
    assert_eq!(task_ids(&list).len(), 1, "the refused task was not stored");
    Ok(())
}

/// A hand-driven device that declares `tasks` and answers only when told to.
async fn raw_task_device(hub: &Hub, api: &Api, name: &str) -> Result<(crate::wire::Ws, String)> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = crate::wire::connect(hub).await?;
    let frame = json!({"type": "register", "versions": [1], "secret": crate::wire::secret(), "name": name,
        "setup_token": api.setup_token(60).await?, "capabilities": ["tasks:1.0.0"]});
    ws.send(Message::text(frame.to_string())).await?;
    let reply = crate::wire::next(&mut ws).await?;
    let id = reply["device_id"].as_str().unwrap_or_default().to_owned();
    Ok((ws, id))
}

#[tokio::test]
async fn client_websocket_streams_parts_as_devices_answer() -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let fast = Cocoon::start(&hub.url, "fast", Some(&alice.setup_token(60).await?), &[])?;
    let fast_id = fast.device_id().await?;
    create(&alice, &fast_id, json!({"title": "from the fast one"})).await?;
    let (mut slow, slow_id) = raw_task_device(&hub, &alice, "slow").await?;

    let url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let (mut client, _) = tokio_tungstenite::connect_async(url).await?;
    client
        .send(Message::text(
            json!({"type": "auth", "token": "nope"}).to_string(),
        ))
        .await?;
    let refused = crate::wire::next(&mut client).await?;
    assert_eq!(refused["code"], "unauthorized", "{refused}");

    let url = format!("{}/ws/client", hub.url.replacen("http", "ws", 1));
    let (mut client, _) = tokio_tungstenite::connect_async(url).await?;
    client
        .send(Message::text(
            json!({"type": "auth", "token": alice.jwt}).to_string(),
        ))
        .await?;
    assert_eq!(
        crate::wire::next(&mut client).await?["type"],
        "authenticated"
    );
    client
        .send(Message::text(
            json!({"type": "aggregate_query", "query_id": "q1", "limit": 10, "timeout_ms": 20000})
                .to_string(),
        ))
        .await?;

    // The slow device has the request in hand and has not answered...
    let request = crate::wire::next(&mut slow).await?;
    assert_eq!(request["op"], "list_tasks", "{request}");
    // ...yet the fast device's part already arrived.
    let first = crate::wire::next(&mut client).await?;
    assert_eq!(first["type"], "aggregate_query_part", "{first}");
    assert_eq!(first["device"]["device_id"], fast_id.as_str());
    assert_eq!(first["tasks"][0]["title"], "from the fast one");

    // Now the slow device answers with a task of its own.
    let now = adi_signaling::auth::unix_now() as i64 * 1_000_000;
    let answer = json!({"type": "response", "request_id": request["request_id"], "ok": {"kind": "tasks", "page": {"tasks": [
        {"id": uuid::Uuid::new_v4(), "title": "from the slow one", "status": "pending", "created_at": now, "updated_at": now}
    ], "next": null}}});
    slow.send(Message::text(answer.to_string())).await?;
    let second = crate::wire::next(&mut client).await?;
    assert_eq!(second["device"]["device_id"], slow_id.as_str(), "{second}");
    assert_eq!(
        second["tasks"][0]["device_id"],
        slow_id.as_str(),
        "the hub labels the device"
    );
    let done = crate::wire::next(&mut client).await?;
    assert_eq!(done["type"], "aggregate_query_done", "{done}");
    assert_eq!(done["tasks"].as_array().map(Vec::len), Some(2));

    // A device that never answers is labelled timeout; one that drops mid-query, offline.
    client
        .send(Message::text(
            json!({"type": "aggregate_query", "query_id": "q2", "timeout_ms": 300}).to_string(),
        ))
        .await?;
    let _ignored = crate::wire::next(&mut slow).await?;
    let mut statuses = std::collections::HashMap::new();
    loop {
        let m = crate::wire::next(&mut client).await?;
        if m["type"] == "aggregate_query_done" {
            break;
        }
        statuses.insert(
            m["device"]["name"].as_str().unwrap_or_default().to_owned(),
            m["device"]["status"].clone(),
        );
    }
    assert_eq!(statuses["slow"], "timeout", "{statuses:?}");
    assert_eq!(statuses["fast"], "ok");

    let query = tokio::spawn({
        let alice = alice.clone();
        async move { alice.get("/api/aggregate/tasks?timeout_ms=20000").await }
    });
    let _req = crate::wire::next(&mut slow).await?;
    drop(slow);
    let (status, body) = query.await??;
    assert_eq!(status, 200);
    let slow_part = body["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "slow").cloned())
        .unwrap_or_default();
    assert_eq!(slow_part["status"], "offline", "{body}");
    assert_eq!(task_ids(&body).len(), 1, "the fast device still answered");
    drop(client);
    Ok(())
}
