//! Tasks live on their devices; the hub fans out and merges. Three cocoons of one user
//! (two on SQLite, one on PostgreSQL) and one of another user, real commands, real
//! kills, and paging over a thousand tasks while devices keep adding more.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::harness::{
    cli, fresh_postgres, task_cgroups_dir, wait_for, Api, Cocoon, Hub, Leftovers,
};

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
    let Some(pg) = fresh_postgres().await else {
        return Ok(());
    };
    let result = merged_scenario(&pg.url()).await;
    pg.drop_database().await;
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
    let pids = tempfile::tempdir()?;
    let script = format!(
        "echo $$ > '{dir}/leader'; sleep 600 & echo $! > '{dir}/child'; wait",
        dir = pids.path().display()
    );
    let t = create(
        &alice,
        &d,
        json!({"title": "long", "command": ["sh", "-c", script]}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default();
    wait_status(&alice, &d, id, "running").await?;
    let (leader, child) = (pids.path().join("leader"), pids.path().join("child"));
    let leader = wait_for("the leader's pid", Duration::from_secs(20), || async {
        Ok(read_pid(&leader))
    })
    .await?;
    let child = wait_for("the child's pid", Duration::from_secs(20), || async {
        Ok(read_pid(&child))
    })
    .await?;
    c.proc.kill();
    alice.wait_online(&d, false, Duration::from_secs(5)).await?;
    // Nobody was there to stop them: the command and its child outlive the cocoon.
    assert!(!process_is_dead(leader) && !process_is_dead(child));
    assert!(!task_processes(id).is_empty());

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
    // The restarted cocoon killed what the task left running.
    wait_for(
        "the task's processes to die",
        Duration::from_secs(20),
        || async { Ok((process_is_dead(leader) && process_is_dead(child)).then_some(())) },
    )
    .await?;
    let left = task_processes(id);
    assert!(left.is_empty(), "processes of the task left: {left:?}");
    assert!(
        again
            .proc
            .output()
            .contains("killed processes left running"),
        "{}",
        again.proc.output()
    );
    Ok(())
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether a process is gone (or a zombie, which is as dead).
fn process_is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Live processes that run for the task `id` (their environment names it).
fn task_processes(id: &str) -> Vec<u32> {
    let marker = format!("ADI_TASK_ID={id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
        })
        .collect()
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

    let mut client = crate::wire::client(&hub, &alice.jwt).await?;
    client
        .send(Message::text(
            json!({"type": "aggregate_query", "query_id": "q1", "limit": 10, "timeout_ms": 20000})
                .to_string(),
        ))
        .await?;

    // Before anyone answers, the hub names every device it waits for.
    let started = crate::wire::next(&mut client).await?;
    assert_eq!(started["type"], "aggregate_query_started", "{started}");
    let mut waiting: Vec<&str> = started["waiting"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
        .unwrap_or_default();
    waiting.sort_unstable();
    assert_eq!(waiting, ["fast", "slow"], "{started}");
    assert_eq!(started["timeout_ms"], 20000);
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
        if m["type"] == "aggregate_query_started" {
            continue;
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

#[tokio::test]
async fn a_client_socket_waiting_on_a_query_still_hears_its_devices_and_closes_when_signed_out(
) -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    // Heartbeats far apart, so the silent hand-driven device stays online for the
    // whole test; a device that goes away is seen at once by its socket closing.
    let hub = Hub::start_with(&["--heartbeat-interval", "20s"]).await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let fast = Cocoon::start(&hub.url, "fast", Some(&alice.setup_token(60).await?), &[])?;
    let fast_id = fast.device_id().await?;
    let (mut slow, _) = raw_task_device(&hub, &alice, "slow").await?;
    let mut client = crate::wire::client(&hub, &alice.jwt).await?;
    client
        .send(Message::text(json!({"type": "watch_devices"}).to_string()))
        .await?;
    let listed = crate::wire::next(&mut client).await?;
    assert_eq!(listed["type"], "devices", "{listed}");
    assert_eq!(listed["full"], true, "{listed}");

    client
        .send(Message::text(
            json!({"type": "aggregate_query", "query_id": "q1", "timeout_ms": 30000}).to_string(),
        ))
        .await?;
    // The slow device holds the request and never answers it.
    let request = crate::wire::next(&mut slow).await?;
    assert_eq!(request["op"], "list_tasks", "{request}");
    let fast_status = |m: &Value| {
        m["devices"].as_array().and_then(|ds| {
            ds.iter()
                .find(|d| d["device_id"] == fast_id.as_str())
                .map(|d| d["status"].as_str().unwrap_or_default().to_owned())
        })
    };
    // While the query waits, the fast device answers and then goes away, and the watch
    // says so (each read fails after 10 s without a frame).
    loop {
        let m = crate::wire::next(&mut client).await?;
        assert_ne!(
            m["type"], "aggregate_query_done",
            "the query still waits: {m}"
        );
        if m["type"] == "aggregate_query_part" && m["device"]["device_id"] == fast_id.as_str() {
            break;
        }
    }
    drop(fast);
    loop {
        let m = crate::wire::next(&mut client).await?;
        assert_ne!(
            m["type"], "aggregate_query_done",
            "the query still waits: {m}"
        );
        if m["type"] == "devices" && fast_status(&m).as_deref() == Some("offline") {
            break;
        }
    }

    // Signing out closes the socket at once, the query still waiting on the slow device.
    let (status, body) = alice.delete("/api/auth/session").await?;
    assert!(status < 300, "{status} {body}");
    loop {
        let m = crate::wire::next(&mut client).await?;
        assert_ne!(
            m["type"], "aggregate_query_done",
            "the query still waits: {m}"
        );
        if m.get("close").is_some() {
            assert_eq!(m["close"], 1008, "{m}");
            assert_eq!(m["reason"], "session signed out", "{m}");
            break;
        }
    }
    Ok(())
}

/// Reads a server-sent event stream to its end: `(event, data)` pairs in order.
async fn read_sse(api: &Api, path: &str) -> Result<Vec<(String, Value)>> {
    use futures_util::StreamExt;
    let resp = api
        .http
        .get(format!("{}{path}", api.base))
        .bearer_auth(&api.jwt)
        .send()
        .await?;
    if resp.status() != 200 {
        bail!("{path}: {}", resp.status());
    }
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !content_type.starts_with("text/event-stream") {
        bail!("{path}: content type {content_type:?}");
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    let read = async {
        while let Some(chunk) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if line.is_empty() && !data.is_empty() {
                    events.push((std::mem::take(&mut event), serde_json::from_str(&data)?));
                    data.clear();
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), read).await??;
    Ok(events)
}

/// The stdout texts of log lines, in order.
fn stdout_texts<'a>(lines: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// What a cocoon logs when its hub connection drops.
const LINK_LOST: &str = "hub connection lost";

#[tokio::test]
async fn a_log_of_thousands_of_lines_reads_fully_by_cli_pages_and_stream() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let c = Cocoon::start(&hub.url, "chatty", Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;
    const LINES: usize = 2500;
    let expected: Vec<String> = (1..=LINES)
        .map(|i| format!("line {i} of a long log, padded so each line takes some room"))
        .collect();
    let script = format!(
        "i=1; while [ $i -le {LINES} ]; do echo \"line $i of a long log, padded so each line takes some room\"; i=$((i+1)); done"
    );
    let t = create(
        &alice,
        &d,
        json!({"title": "chatty", "command": ["sh", "-c", script]}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default().to_owned();
    wait_status(&alice, &d, &id, "completed").await?;

    // The CLI asks for 1,000 lines a page.
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(
        cfg.path(),
        &["tasks", "logs", "--device", "chatty", &id],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        expected,
        "every line, in order"
    );

    // REST pages: contiguous, each line once, complete only at the end.
    let mut after = 0u64;
    let mut lines = Vec::new();
    let mut pages = 0;
    loop {
        let (status, page) = alice
            .get(&format!(
                "/api/cocoons/{d}/tasks/{id}/logs?after={after}&limit=1000"
            ))
            .await?;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for l in page["lines"].as_array().cloned().unwrap_or_default() {
            assert_eq!(
                l["seq"].as_u64(),
                Some(after + 1),
                "no line skipped or repeated"
            );
            after += 1;
            lines.push(l);
        }
        assert_eq!(page["next_after"].as_u64(), Some(after));
        if page["complete"] == true {
            break;
        }
        assert!(pages < 100, "paging does not end");
    }
    assert!(
        pages > 2,
        "2,500 lines do not fit in one frame: {pages} pages"
    );
    assert_eq!(stdout_texts(&lines), expected);

    // Followed as server-sent events, read straight off the wire: log..., then end.
    let events = read_sse(
        &alice,
        &format!("/api/cocoons/{d}/tasks/{id}/logs?follow=true"),
    )
    .await?;
    let (last, logs) = events.split_last().expect("some events");
    assert_eq!(last.0, "end", "{last:?}");
    assert_eq!(last.1["status"], "completed");
    assert!(
        logs.iter().all(|(e, _)| e == "log"),
        "only log events before the end"
    );
    assert_eq!(stdout_texts(logs.iter().map(|(_, d)| d)), expected);

    // The device kept its connection all along.
    let (_, merged) = alice.get("/api/aggregate/tasks").await?;
    assert_eq!(merged["devices"][0]["status"], "ok", "{merged}");
    assert!(!c.proc.output().contains(LINK_LOST), "{}", c.proc.output());
    Ok(())
}

#[tokio::test]
async fn hundreds_of_tasks_and_long_descriptions_page_without_dropping_a_device() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let many = Cocoon::start(&hub.url, "many", Some(&alice.setup_token(60).await?), &[])?;
    let wordy = Cocoon::start(&hub.url, "wordy", Some(&alice.setup_token(60).await?), &[])?;
    let (many_id, wordy_id) = (many.device_id().await?, wordy.device_id().await?);
    let mut all = HashSet::new();
    let mut on_many = HashSet::new();
    let jobs: Vec<(String, Value)> = (0..420)
        .map(|n| (many_id.clone(), json!({"title": format!("short {n}")})))
        .chain((0..50).map(|n| {
            let description = format!("{n} {}", "a long description. ".repeat(150));
            (
                wordy_id.clone(),
                json!({"title": format!("wordy {n}"), "description": description}),
            )
        }))
        .collect();
    for chunk in jobs.chunks(50) {
        let creates = chunk.iter().map(|(device, body)| {
            let api = alice.clone();
            async move { create(&api, device, body.clone()).await }
        });
        for t in futures_util::future::join_all(creates).await {
            let t = t?;
            let id = t["id"].as_str().unwrap_or_default().to_owned();
            if t["device_id"] == many_id.as_str() {
                on_many.insert(id.clone());
            }
            all.insert(id);
        }
    }
    assert_eq!((all.len(), on_many.len()), (470, 420));

    // Merged, 500 a page and the default 50 a page: each task exactly once, both
    // devices answering every page.
    for limit in ["limit=500", "limit=50", ""] {
        let mut seen = HashSet::new();
        let mut cursor: Option<String> = None;
        for pages in 0.. {
            assert!(pages < 200, "{limit}: paging does not end");
            let mut q = vec![limit.to_owned()];
            if let Some(c) = &cursor {
                q.push(format!("cursor={c}"));
            }
            let (status, page) = alice
                .get(&format!("/api/aggregate/tasks?{}", q.join("&")))
                .await?;
            assert_eq!(status, 200, "{page}");
            let statuses: Vec<&Value> = page["devices"]
                .as_array()
                .map(|a| a.iter().map(|d| &d["status"]).collect())
                .unwrap_or_default();
            assert_eq!(
                statuses,
                [&json!("ok"), &json!("ok")],
                "{limit}: {}",
                page["devices"]
            );
            for t in page["tasks"].as_array().cloned().unwrap_or_default() {
                let id = t["id"].as_str().unwrap_or_default().to_owned();
                assert!(seen.insert(id.clone()), "{limit}: task {id} shown twice");
                if t["device_id"] == wordy_id.as_str() {
                    let description = t["description"].as_str().unwrap_or_default();
                    assert!(
                        description.len() > 3000 && description.ends_with("description. "),
                        "descriptions arrive whole: {} bytes",
                        description.len()
                    );
                }
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let missing = all.difference(&seen).count();
        assert_eq!(
            missing,
            0,
            "{limit}: {missing} of {} tasks skipped",
            all.len()
        );
        assert_eq!(seen.len(), all.len(), "{limit}: only alice's tasks");
    }

    // One device's own listing, 500 a page.
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/cocoons/{many_id}/tasks?limit=500&cursor={c}"),
            None => format!("/api/cocoons/{many_id}/tasks?limit=500"),
        };
        let (status, page) = alice.get(&path).await?;
        assert_eq!(status, 200, "{page}");
        for id in task_ids(&page) {
            assert!(seen.insert(id.clone()), "task {id} shown twice");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let missing = on_many.difference(&seen).count();
    assert_eq!(missing, 0, "{missing} of {} tasks skipped", on_many.len());
    assert_eq!(seen.len(), on_many.len());
    for c in [&many, &wordy] {
        assert!(!c.proc.output().contains(LINK_LOST), "{}", c.proc.output());
    }
    Ok(())
}

#[tokio::test]
async fn a_task_too_large_for_one_frame_is_refused_and_the_device_stays_online() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let c = Cocoon::start(&hub.url, "small", Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;
    let big = "x".repeat(100 * 1024);
    for (body, field) in [
        (json!({"title": "big", "description": big}), "description"),
        (json!({"title": "big", "command": ["echo", big]}), "command"),
        (json!({"title": "big", "input": {"blob": big}}), "input"),
    ] {
        let (status, answer) = alice.post(&format!("/api/cocoons/{d}/tasks"), body).await?;
        assert_eq!(status, 413, "{field}: {answer}");
        assert_eq!(answer["error"]["code"], "payload_too_large");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field) && message.contains("too large"),
            "{message}"
        );
    }
    let (status, answer) = alice
        .post(
            &format!("/api/cocoons/{d}/tasks/can-run"),
            json!({"command": ["echo", big]}),
        )
        .await?;
    assert_eq!(status, 413, "{answer}");
    // The CLI says why.
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, _, err) = cli(
        cfg.path(),
        &[
            "tasks",
            "create",
            "--device",
            "small",
            "--title",
            "big",
            "--description",
            &big[..80 * 1024],
        ],
        &env,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("description is too large"), "{err}");

    // Nothing reached the device, which is still online and takes the next task.
    let (_, list) = alice.get("/api/aggregate/tasks").await?;
    assert_eq!(list["devices"][0]["status"], "ok", "{list}");
    assert!(task_ids(&list).is_empty(), "{list}");
    let fits = "y".repeat(12 * 1024);
    let t = create(&alice, &d, json!({"title": "fits", "description": fits})).await?;
    assert_eq!(t["description"].as_str().map(str::len), Some(12 * 1024));
    assert!(!c.proc.output().contains(LINK_LOST), "{}", c.proc.output());
    Ok(())
}

#[tokio::test]
async fn devices_say_whether_they_would_run_a_task() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let locked = Cocoon::start(
        &hub.url,
        "locked",
        Some(&alice.setup_token(60).await?),
        &["--no-exec"],
    )?;
    let open = Cocoon::start(&hub.url, "open", Some(&alice.setup_token(60).await?), &[])?;
    let (locked_id, open_id) = (locked.device_id().await?, open.device_id().await?);
    let check = |device: &str, body: Value| {
        let alice = alice.clone();
        let path = format!("/api/cocoons/{device}/tasks/can-run");
        async move {
            let (status, answer) = alice.post(&path, body).await?;
            if status != 200 {
                bail!("can-run: {status} {answer}");
            }
            anyhow::Ok(answer)
        }
    };

    let refused = check(&locked_id, json!({"title": "x", "command": ["true"]})).await?;
    assert_eq!(refused["device_id"], locked_id.as_str());
    assert_eq!(refused["can_run"], false, "{refused}");
    assert_eq!(refused["exec_allowed"], false);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("--no-exec"),
        "{refused}"
    );
    let plain = check(&locked_id, json!({})).await?;
    assert_eq!(plain["can_run"], true, "{plain}");
    assert!(plain.get("reason").is_none(), "{plain}");

    let runs = check(&open_id, json!({"command": ["true"]})).await?;
    assert_eq!(runs["can_run"], true, "{runs}");
    assert_eq!(runs["exec_allowed"], true);
    let gpu = check(
        &open_id,
        json!({"command": ["true"], "requirements": ["gpu"]}),
    )
    .await?;
    assert_eq!(gpu["can_run"], gpu["has_gpu"], "{gpu}");
    if gpu["has_gpu"] == false {
        assert_eq!(gpu["reason"], "this device has no GPU", "{gpu}");
    }
    let (status, _) = alice
        .post(
            &format!("/api/cocoons/{}/tasks/can-run", "0".repeat(32)),
            json!({}),
        )
        .await?;
    assert_eq!(status, 404);
    let (_, list) = alice.get("/api/aggregate/tasks").await?;
    assert!(task_ids(&list).is_empty(), "a check stores nothing: {list}");

    // The CLI: the answer, and a failing exit when the device would not run it.
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(
        cfg.path(),
        &["tasks", "check", "--device", "locked", "--", "true"],
        &env,
    )?;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("commands allowed: no"), "{out}");
    assert!(
        err.contains("cannot run: command tasks are disabled"),
        "{err}"
    );
    let (code, out, err) = cli(
        cfg.path(),
        &["tasks", "check", "--device", "open", "--", "true"],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("can run: yes") && out.contains("commands allowed: yes"),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn cli_cancels_a_running_task_and_bad_device_cursors_say_why() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let c = Cocoon::start(&hub.url, "worker", Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;
    let t = create(
        &alice,
        &d,
        json!({"title": "sleeper", "command": ["sh", "-c", "echo sleeping; exec sleep 600"]}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default().to_owned();
    wait_status(&alice, &d, &id, "running").await?;

    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(
        cfg.path(),
        &["tasks", "cancel", "--device", "worker", &id],
        &env,
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{id} cancelled"));
    // Final when the CLI returns: the process is gone and the log says so.
    let done = task(&alice, &d, &id).await?;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(task_processes(&id).is_empty(), "the command was killed");
    let (_, logs) = alice
        .get(&format!("/api/cocoons/{d}/tasks/{id}/logs"))
        .await?;
    let last = logs["lines"]
        .as_array()
        .and_then(|a| a.last().cloned())
        .unwrap_or_default();
    assert_eq!(last["text"], "cancelled", "{logs}");
    let (code, _, err) = cli(
        cfg.path(),
        &["tasks", "cancel", "--device", "worker", &id],
        &env,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("already cancelled"), "{err}");

    // One device's listing refuses a cursor it did not hand out, with the reason.
    for cursor in ["garbage", "e30", "%7B%7D"] {
        let (status, body) = alice
            .get(&format!("/api/cocoons/{d}/tasks?cursor={cursor}"))
            .await?;
        assert_eq!(status, 400, "{cursor}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("cursor"),
            "{cursor}: {body}"
        );
    }
    let (status, body) = alice
        .get(&format!("/api/cocoons/{d}/tasks?limit=0"))
        .await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

#[tokio::test]
async fn pages_fit_a_hub_configured_with_a_smaller_frame_limit() -> Result<()> {
    // The hub tells the device its limit at registration; pages are cut to it, so
    // long descriptions never make the hub close the device's link.
    let hub = Hub::start_with(&["--max-frame-bytes", "16384"]).await?;
    let api = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let cocoon = Cocoon::start(
        &hub.url,
        "small-frames",
        Some(&api.setup_token(60).await?),
        &[],
    )?;
    let id = cocoon.device_id().await?;
    let description = "d".repeat(3000);
    for i in 0..20 {
        create(
            &api,
            &id,
            json!({"title": format!("long {i}"), "description": description}),
        )
        .await?;
    }
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/aggregate/tasks?limit=50&cursor={c}"),
            None => "/api/aggregate/tasks?limit=50".to_owned(),
        };
        let (status, body) = api.get(&path).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["devices"][0]["status"], "ok", "{body}");
        for t in body["tasks"].as_array().cloned().unwrap_or_default() {
            assert!(
                seen.insert(t["id"].as_str().unwrap_or_default().to_owned()),
                "twice: {t}"
            );
            assert_eq!(t["description"].as_str().map(str::len), Some(3000));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 20);
    api.wait_online(&id, true, Duration::from_secs(2)).await?;
    Ok(())
}

/// A command that starts two `sleep 300`s meant to outlive it: one detached every way at
/// once (a new session and so a new process group, a cleared environment, a double fork,
/// no descriptor of the task's), one under `nohup`. It writes their pids into `dir`
/// (`detached`, `nohup`), then runs `then`.
fn detacher(dir: &std::path::Path, then: &str) -> Value {
    let script = format!(
        "(setsid env -i PATH=\"$PATH\" sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/detached' &); \
         nohup sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {d}/nohup; \
         while [ ! -s {d}/detached ] || [ ! -s {d}/nohup ]; do sleep 0.05; done; {then}",
        d = dir.display()
    );
    json!(["sh", "-c", script])
}

/// The pids of the two sleeps [`detacher`] started, once both run; kept for cleanup.
async fn detached_pids(dir: &std::path::Path, leftovers: &mut Leftovers) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for name in ["detached", "nohup"] {
        let path = dir.join(name);
        let pid = wait_for(
            &format!("the {name} pid"),
            Duration::from_secs(20),
            || async {
                Ok(std::fs::read_to_string(&path)
                    .ok()
                    .filter(|t| t.ends_with('\n'))
                    .and_then(|t| t.trim().parse::<u32>().ok()))
            },
        )
        .await?;
        leftovers.pids.push(pid);
        assert!(!process_is_dead(pid), "the {name} sleep runs");
        pids.push(pid);
    }
    Ok(pids)
}

async fn wait_dead(pids: &[u32], what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(20), || async {
        Ok(pids.iter().all(|p| process_is_dead(*p)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn cancel_and_the_end_of_a_task_end_every_descendant_however_it_detached() -> Result<()> {
    let Some(cgroups) = task_cgroups_dir()? else {
        return Ok(());
    };
    let mut leftovers = Leftovers::default();
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let c = Cocoon::start(&hub.url, "whole", Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;

    let cancelled = tempfile::tempdir()?;
    let t = create(
        &alice,
        &d,
        json!({"title": "detacher", "command": detacher(cancelled.path(), "exec sleep 300")}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default();
    leftovers.cgroups.push(cgroups.join(id));
    let pids = detached_pids(cancelled.path(), &mut leftovers).await?;
    let (status, body) = alice
        .post(&format!("/api/cocoons/{d}/tasks/{id}/cancel"), json!({}))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    wait_dead(&pids, "the cancelled task's descendants to die").await?;
    assert!(!cgroups.join(id).exists(), "its cgroup is removed");

    // The task exits once the test has seen its daemons run (the `go` file), so they
    // cannot be ended before they are looked at.
    let exited = tempfile::tempdir()?;
    let go = exited.path().join("go");
    let then = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 0",
        go.display()
    );
    let t = create(
        &alice,
        &d,
        json!({"title": "daemoniser", "command": detacher(exited.path(), &then)}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default();
    leftovers.cgroups.push(cgroups.join(id));
    let pids = detached_pids(exited.path(), &mut leftovers).await?;
    std::fs::write(&go, b"")?;
    wait_status(&alice, &d, id, "completed").await?;
    wait_dead(&pids, "the daemons of a task that exited to die").await?;
    assert!(!cgroups.join(id).exists(), "its cgroup is removed");
    Ok(())
}

#[tokio::test]
async fn a_killed_cocoon_ends_what_its_task_detached_when_it_starts_again() -> Result<()> {
    let Some(cgroups) = task_cgroups_dir()? else {
        return Ok(());
    };
    let mut leftovers = Leftovers::default();
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
    let pids_dir = tempfile::tempdir()?;
    let t = create(
        &alice,
        &d,
        json!({"title": "detacher", "command": detacher(pids_dir.path(), "exec sleep 300")}),
    )
    .await?;
    let id = t["id"].as_str().unwrap_or_default();
    leftovers.cgroups.push(cgroups.join(id));
    let pids = detached_pids(pids_dir.path(), &mut leftovers).await?;
    c.proc.kill();
    alice.wait_online(&d, false, Duration::from_secs(5)).await?;
    assert!(
        pids.iter().all(|p| !process_is_dead(*p)),
        "nobody was there to stop them"
    );

    let _again = Cocoon::start_in(&hub.url, "crashy", None, dir.path(), &[])?;
    let t = wait_status(&alice, &d, id, "failed").await?;
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{t}"
    );
    wait_dead(&pids, "the interrupted task's descendants to die").await?;
    assert!(!cgroups.join(id).exists(), "its cgroup is removed");
    Ok(())
}

#[tokio::test]
async fn tasks_list_lines_its_columns_up_whatever_their_lengths() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let device = "a-device-with-a-rather-long-name";
    let c = Cocoon::start(&hub.url, device, Some(&alice.setup_token(60).await?), &[])?;
    let d = c.device_id().await?;
    for title in ["short", "a title much longer than the others"] {
        create(&alice, &d, json!({ "title": title })).await?;
    }
    let cfg = tempfile::tempdir()?;
    let env = [("ADI_HUB", hub.url.as_str()), ("ADI_API_KEY", key.as_str())];
    let (code, out, err) = cli(cfg.path(), &["tasks", "list"], &env)?;
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    let column = |name: &str| header.find(name).unwrap_or(usize::MAX);
    let (device_at, status_at, title_at) = (column("DEVICE"), column("STATUS"), column("TITLE"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{out}");
    for row in rows {
        assert!(
            row.get(device_at..).is_some_and(|r| r.starts_with(device))
                && row
                    .get(status_at..)
                    .is_some_and(|r| r.starts_with("pending"))
                && row
                    .get(title_at..)
                    .is_some_and(|r| r.starts_with(['s', 'a'])),
            "columns do not line up:\n{out}"
        );
    }
    Ok(())
}
