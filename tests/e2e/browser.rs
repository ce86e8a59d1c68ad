//! The web UI in a real headless Chromium, against a real hub with real cocoons (and,
//! where a test needs a device to answer late or report a GPU, a device spoken by hand
//! on the real wire). Each test signs in as a person would, clicks and types, and waits
//! on what the page shows; screenshots of the main pages land in `target/screenshots/`.

use std::time::Duration;

use anyhow::{anyhow, Result};
use axum::response::Html;
use axum::routing::get;
use fantoccini::key::Key;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{wait_for, Api, Browser, Cocoon, Hub, BROWSER_WAIT};

/// A device spoken by hand over the cocoon WebSocket: it heartbeats with a given load
/// (a GPU, say) and hands every request from the hub to the test, which answers it.
struct RawDevice {
    id: String,
    requests: Option<mpsc::UnboundedReceiver<Value>>,
    answers: mpsc::UnboundedSender<Value>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RawDevice {
    async fn start(hub: &Hub, api: &Api, name: &str, load: Value) -> Result<Self> {
        Self::start_with(hub, api, name, load, json!({}), Duration::from_millis(200)).await
    }

    /// A device whose registration also says what `more` holds (services, location),
    /// heartbeating every `beat`.
    async fn start_with(
        hub: &Hub,
        api: &Api,
        name: &str,
        load: Value,
        more: Value,
        beat: Duration,
    ) -> Result<Self> {
        let mut ws = crate::wire::connect(hub).await?;
        let mut frame = json!({"type": "register", "versions": [1], "secret": crate::wire::secret(),
            "name": name, "setup_token": api.setup_token(60).await?, "capabilities": ["tasks:1.0.0"]});
        if let (Some(frame), Some(more)) = (frame.as_object_mut(), more.as_object()) {
            frame.extend(more.clone());
        }
        ws.send(Message::text(frame.to_string())).await?;
        let reply = crate::wire::next(&mut ws).await?;
        let id = reply["device_id"]
            .as_str()
            .ok_or_else(|| anyhow!("not registered: {reply}"))?
            .to_owned();
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (ans_tx, mut ans_rx) = mpsc::unbounded_channel::<Value>();
        let actor = tokio::spawn(async move {
            let mut beat = tokio::time::interval(beat);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        seq += 1;
                        let hb = json!({"type": "heartbeat", "seq": seq, "load": load});
                        if ws.send(Message::text(hb.to_string())).await.is_err() { return; }
                    }
                    Some(answer) = ans_rx.recv() => {
                        if ws.send(Message::text(answer.to_string())).await.is_err() { return; }
                    }
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => {
                            if let Ok(v) = serde_json::from_str::<Value>(&t) {
                                if v["type"] == "request" { let _ = req_tx.send(v); }
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
        });
        Ok(RawDevice {
            id,
            requests: Some(req_rx),
            answers: ans_tx,
            tasks: vec![actor],
        })
    }

    async fn next_request(&mut self) -> Result<Value> {
        let rx = self
            .requests
            .as_mut()
            .ok_or_else(|| anyhow!("answering on its own"))?;
        tokio::time::timeout(BROWSER_WAIT, rx.recv())
            .await
            .map_err(|_| anyhow!("no request from the hub"))?
            .ok_or_else(|| anyhow!("device connection ended"))
    }

    fn answer(&self, request: &Value, ok: Value) {
        let _ = self
            .answers
            .send(json!({"type": "response", "request_id": request["request_id"], "ok": ok}));
    }

    /// From now on, answers every task listing by itself, from `tasks` as a tiny task
    /// store would: status and text filters applied, nothing after the first page.
    fn serve_tasks(&mut self, tasks: Vec<Value>) {
        let Some(mut rx) = self.requests.take() else {
            return;
        };
        let answers = self.answers.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let page: Vec<&Value> = if req["after"].is_null() {
                    tasks
                        .iter()
                        .filter(|t| matches(t, &req["filter"]))
                        .collect()
                } else {
                    vec![]
                };
                let ok = json!({"kind": "tasks", "page": {"tasks": page, "next": null}});
                let _ = answers
                    .send(json!({"type": "response", "request_id": req["request_id"], "ok": ok}));
            }
        }));
    }
}

fn matches(task: &Value, filter: &Value) -> bool {
    let status_ok = filter["status"].is_null() || filter["status"] == task["status"];
    let text_ok = filter["text"].as_str().is_none_or(|q| {
        task["title"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains(&q.to_lowercase())
    });
    status_ok && text_ok
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A real HTTP service for a device to offer, on a free loopback port.
async fn lab_service() -> Result<u16> {
    let app = axum::Router::new().route(
        "/",
        get(|| async {
            Html("<!doctype html><title>Lab notebook</title><h1>Lab notebook is ready</h1>")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

const CARD: &str = "article.device";

/// Waits until the device card of `id` shows `status`; returns its text.
async fn wait_card(b: &Browser, id: &str, status: &str) -> Result<String> {
    let v = b
        .wait_js(
            &format!("device {id} {status}"),
            "const c = document.querySelector('article.device[data-id=\"' + arguments[0] + '\"]');
             if (!c || !c.getClientRects().length || c.dataset.status !== arguments[1]) return null;
             return c.innerText.includes(arguments[1]) ? c.innerText : null;",
            vec![id.into(), status.into()],
        )
        .await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

/// The titles of the task rows shown, top to bottom.
async fn task_titles(b: &Browser) -> Result<Vec<String>> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#task-rows tr')].map(r => r.querySelector('a').innerText)",
            vec![],
        )
        .await?;
    Ok(serde_json::from_value(v)?)
}

/// The page fits its window: nothing sticks out sideways.
async fn assert_fits(b: &Browser, what: &str) -> Result<()> {
    let v = b
        .js(
            "return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth}",
            vec![],
        )
        .await?;
    let (inner, scroll) = (v["inner"].as_i64(), v["scroll"].as_i64());
    assert!(
        inner.is_some() && scroll <= inner,
        "{what} is wider than the window: {v}"
    );
    Ok(())
}

async fn narrow(b: &Browser) -> Result<()> {
    b.client.set_window_size(390, 844).await?;
    b.wait_js(
        "a phone-wide window",
        "return window.innerWidth <= 400",
        vec![],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn devices_show_live_state_gpus_services_and_open_the_proxy() -> Result<()> {
    let Some(b) = Browser::start(1280, 1100).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let lab_port = lab_service().await?;
    let service = format!("lab:{lab_port}");
    // A plugin manifest, so the page shows an object-shaped capability with its version.
    let plugins = tempfile::tempdir()?;
    std::fs::write(
        plugins.path().join("embed.toml"),
        "[[capabilities]]\nprotocol = \"embeddings\"\nversion = \"1.2.0\"\nhttp = \"http://127.0.0.1:9/embed\"\nidempotent = true\n",
    )?;
    let plugins_dir = plugins.path().to_string_lossy().to_string();
    let lab = Cocoon::start(
        &hub.url,
        "lab-box",
        Some(&alice.setup_token(60).await?),
        &[
            "--service",
            &service,
            "--location",
            "Rack 3, Berlin",
            "--plugins-dir",
            &plugins_dir,
        ],
    )?;
    let mut laptop = Cocoon::start(&hub.url, "laptop", Some(&alice.setup_token(60).await?), &[])?;
    let gib = 1u64 << 30;
    let gpu = RawDevice::start(
        &hub,
        &alice,
        "gpu-box",
        json!({"cpu_count": 64, "cpu_percent": 12.0, "ram_total_bytes": 512 * gib, "ram_used_bytes": 128 * gib,
            "gpus": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-0", "memory_total_bytes": 140 * gib,
                      "memory_used_bytes": 35 * gib, "utilization_percent": 62, "temperature_c": 48}]}),
    )
    .await?;
    let (lab_id, laptop_id) = (lab.device_id().await?, laptop.device_id().await?);

    b.sign_in(&hub.url, &key).await?;
    let gpu_card = wait_card(&b, &gpu.id, "online").await?;
    for shown in [
        "gpu-box",
        "NVIDIA H200",
        "VRAM 35.0 / 140.0 GiB",
        "62 % busy",
        "48 °C",
        "64 cores",
        "128.0 / 512.0 GiB",
        "alice",
    ] {
        assert!(
            gpu_card.contains(shown),
            "gpu-box card lacks {shown:?}:\n{gpu_card}"
        );
    }
    wait_card(&b, &laptop_id, "online").await?;
    // The cocoon probes its service and reports it up; capabilities show with versions.
    b.wait_text(
        &format!("{CARD}[data-id=\"{lab_id}\"] li[data-service=\"lab\"]"),
        "up",
    )
    .await?;
    let lab_card = wait_card(&b, &lab_id, "online").await?;
    for shown in ["tasks 1.0.0", "embeddings 1.2.0", "Rack 3, Berlin"] {
        assert!(
            lab_card.contains(shown),
            "lab-box card lacks {shown:?}:\n{lab_card}"
        );
    }
    assert!(lab_card.contains("Last heartbeat"), "{lab_card}");
    assert!(
        lab_card.contains("CPU") && lab_card.contains("RAM"),
        "{lab_card}"
    );
    b.wait_text("#device-count", "3 of 3 online").await?;
    b.screenshot("devices").await?;

    // The service opens through the hub's proxy in a new tab, signed in by the cookie.
    let before = b.client.windows().await?;
    let link = format!("{CARD}[data-id=\"{lab_id}\"] li[data-service=\"lab\"] a");
    let href = b.find(&link).await?.attr("href").await?.unwrap_or_default();
    assert_eq!(href, format!("/proxy/{lab_id}/lab/"));
    b.click(&link).await?;
    let tab = wait_for("the service's tab", BROWSER_WAIT, || async {
        let now = b.client.windows().await?;
        Ok(now.into_iter().find(|w| !before.contains(w)))
    })
    .await?;
    let home = b.client.window().await?;
    b.client.switch_to_window(tab).await?;
    b.wait_text("h1", "Lab notebook is ready").await?;
    let url = b.client.current_url().await?;
    assert!(
        url.path().starts_with(&format!("/proxy/{lab_id}/lab")),
        "{url}"
    );
    b.client.close_window().await?;
    b.client.switch_to_window(home).await?;

    // A device that stops goes offline on the page without a reload.
    b.js("window.stayedOnPage = true", vec![]).await?;
    laptop.proc.terminate().await?;
    let off = wait_card(&b, &laptop_id, "offline").await?;
    assert!(off.contains("not reported while offline"), "{off}");
    b.wait_text("#device-count", "2 of 3 online").await?;
    assert_eq!(
        b.js("return window.stayedOnPage === true", vec![]).await?,
        true,
        "the page reloaded"
    );

    // On a phone-wide window every device is still there and nothing sticks out.
    narrow(&b).await?;
    for id in [&gpu.id, &lab_id, &laptop_id] {
        b.find(&format!("{CARD}[data-id=\"{id}\"]")).await?;
    }
    assert_fits(&b, "the devices page").await?;
    b.screenshot("narrow-devices").await?;
    b.close().await
}

#[tokio::test]
async fn tasks_fill_in_as_devices_answer_stream_logs_and_filter() -> Result<()> {
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let laptop = Cocoon::start(&hub.url, "laptop", Some(&alice.setup_token(60).await?), &[])?;
    let laptop_id = laptop.device_id().await?;
    let create = |title: String| {
        let alice = alice.clone();
        let id = laptop_id.clone();
        async move {
            let (status, body) = alice
                .post(
                    &format!("/api/cocoons/{id}/tasks"),
                    json!({ "title": title }),
                )
                .await?;
            anyhow::ensure!(status == 201, "create: {status} {body}");
            Ok::<_, anyhow::Error>(body)
        }
    };
    create("nightly backup".into()).await?;
    // More than one page (50) of tasks, so paging is needed.
    for i in 1..=55 {
        create(format!("batch job {i}")).await?;
    }
    let mut gpu = RawDevice::start(&hub, &alice, "gpu-box", json!(null)).await?;
    let rendered_sky = json!({"id": uuid::Uuid::new_v4(), "title": "render the sky", "status": "running",
        "created_at": now_micros(), "updated_at": now_micros()});

    b.sign_in(&hub.url, &key).await?;
    b.click("nav a[href='#tasks']").await?;
    // gpu-box holds the hub's request; the laptop's part shows already.
    let held = gpu.next_request().await?;
    assert_eq!(held["op"], "list_tasks", "{held}");
    // The device the list waits for is named, with the time waited, before it answers.
    let waiting = b.wait_text("#waiting", "gpu-box").await?;
    assert!(waiting.contains(" s"), "no time waited: {waiting}");
    b.wait_js(
        "the laptop no longer awaited",
        "return !document.getElementById('waiting').innerText.includes('laptop')",
        vec![],
    )
    .await?;
    b.wait_js(
        "the laptop's tasks before gpu-box answers",
        "const rows = [...document.querySelectorAll('#task-rows tr')];
         return rows.some(r => r.innerText.includes('batch job 55'))
             && document.getElementById('tasks-progress').innerText.includes('Loading')
             && !rows.some(r => r.innerText.includes('gpu-box'));",
        vec![],
    )
    .await?;
    gpu.answer(
        &held,
        json!({"kind": "tasks", "page": {"tasks": [rendered_sky.clone()], "next": null}}),
    );
    gpu.serve_tasks(vec![rendered_sky]);
    b.wait_text("#tasks-progress", "2 of 2 devices answered")
        .await?;
    let waiting = b
        .js(
            "return document.getElementById('waiting').innerText",
            vec![],
        )
        .await?;
    assert_eq!(waiting, "", "nothing awaited once all answered");
    let titles = task_titles(&b).await?;
    assert_eq!(titles.len(), 50, "one page: {titles:?}");
    assert_eq!(titles[0], "render the sky", "newest first: {titles:?}");
    assert_eq!(titles[1], "batch job 55");
    let row = b.wait_text("#task-rows tr:first-child", "gpu-box").await?;
    assert!(row.contains("running"), "{row}");

    // The next page continues the merged order to its end.
    b.click("#more-tasks").await?;
    b.wait_js(
        "the second page",
        "return document.querySelectorAll('#task-rows tr').length === 57
             && document.getElementById('more-tasks').hidden",
        vec![],
    )
    .await?;
    let titles = task_titles(&b).await?;
    assert_eq!(titles.last().map(String::as_str), Some("nightly backup"));
    let mut unique = titles.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), titles.len(), "a task shown twice");

    // A device that drops is named, not silently left out.
    drop(gpu);
    wait_for("gpu-box offline", BROWSER_WAIT, || async {
        let list = alice.cocoons().await?;
        Ok(list
            .iter()
            .any(|d| d["name"] == "gpu-box" && d["online"] == false)
            .then_some(()))
    })
    .await?;
    b.click("#task-filter button[type=submit]").await?;
    let notice = b.wait_text("#task-notices", "gpu-box").await?;
    assert!(notice.contains("offline"), "{notice}");

    // A task made in the form runs on the laptop; its logs arrive while it runs.
    let gate = tempfile::tempdir()?;
    let go = gate.path().join("go");
    let command = format!(
        "echo hello from the browser; while [ ! -e {} ]; do sleep 0.05; done; echo all done",
        go.display()
    );
    b.find("#create-device")
        .await?
        .select_by_value(&laptop_id)
        .await?;
    b.type_into("#create-title", "say hello").await?;
    b.type_into("#create-command", &format!("{command}{}", Key::Enter))
        .await?;
    b.wait_text("#detail-title", "say hello").await?;
    b.wait_text("#detail-logs", "hello from the browser")
        .await?;
    b.wait_text("#detail-status", "running").await?;
    b.wait_text("#task-rows", "say hello").await?;
    b.screenshot("tasks-with-logs").await?;
    std::fs::write(&go, "")?;
    b.wait_text("#detail-logs", "all done").await?;
    b.wait_text("#detail-status", "completed").await?;
    b.wait_text("#detail-facts", "Exit code").await?;
    b.wait_text("#task-rows tr[data-status=completed]", "say hello")
        .await?;

    // Filter by status, then search by text (Enter in the field).
    b.find("#filter-status")
        .await?
        .select_by_value("completed")
        .await?;
    wait_for("only completed tasks", BROWSER_WAIT, || async {
        let t = task_titles(&b).await?;
        Ok((t == ["say hello"]).then_some(()))
    })
    .await?;
    b.find("#filter-status").await?.select_by_value("").await?;
    b.type_into("#filter-q", &format!("NIGHTLY{}", Key::Enter))
        .await?;
    wait_for("the search's one task", BROWSER_WAIT, || async {
        let t = task_titles(&b).await?;
        Ok((t == ["nightly backup"]).then_some(()))
    })
    .await?;

    // A row opens from the keyboard; a task still pending can be cancelled.
    b.find("#task-rows tr a")
        .await?
        .send_keys(&Key::Enter.to_string())
        .await?;
    b.wait_text("#detail-title", "nightly backup").await?;
    b.wait_text("#detail-status", "pending").await?;
    b.click("#detail-cancel").await?;
    b.wait_text("#detail-status", "cancelled").await?;

    // On a phone-wide window the list and the task are still there and fit.
    b.find("#filter-q").await?.clear().await?;
    b.click("#task-filter button[type=submit]").await?;
    b.wait_text("#tasks-progress", "1 of 2 devices answered")
        .await?;
    narrow(&b).await?;
    b.click("#task-detail a[href='#tasks']").await?;
    b.wait_js(
        "the task closed",
        "return document.getElementById('task-detail').hidden",
        vec![],
    )
    .await?;
    b.find("#task-rows tr a").await?;
    assert_fits(&b, "the tasks page").await?;
    b.screenshot("narrow-tasks").await?;
    b.click("#task-rows tr[data-status=completed] a").await?;
    b.wait_text("#detail-logs", "all done").await?;
    assert_fits(&b, "a task's page").await?;
    drop(laptop);
    b.close().await
}

#[tokio::test]
async fn access_setup_token_enrols_a_device_and_a_teammate_claims_a_share() -> Result<()> {
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let private = Cocoon::start(
        &hub.url,
        "private-box",
        Some(&alice.setup_token(60).await?),
        &[],
    )?;
    let private_id = private.device_id().await?;

    b.sign_in(&hub.url, &alice_key).await?;
    wait_card(&b, &private_id, "online").await?;
    b.click("nav a[href='#access']").await?;
    b.find("#setup-expiry")
        .await?
        .select_by_value("600")
        .await?;
    b.click("#setup-form button[type=submit]").await?;
    let token = b.wait_text("#setup-token", "adi_setup_").await?;
    let token = token.trim().to_owned();
    let cmd = b.wait_text("#setup-cmd", "install.sh").await?;
    assert_eq!(
        cmd.trim(),
        format!("curl -fsSL {}/install.sh | sh -s -- {token}", hub.url)
    );
    b.wait_text("#setup-out", "valid until").await?;
    b.screenshot("access").await?;

    // A cocoon started with the token from the page shows up in the devices view.
    let new_box = Cocoon::start(&hub.url, "new-box", Some(&token), &[])?;
    let new_id = new_box.device_id().await?;
    b.click("nav a[href='#devices']").await?;
    let card = wait_card(&b, &new_id, "online").await?;
    assert!(card.contains("new-box") && card.contains("alice"), "{card}");

    // Share it: a one-time token for bob.
    b.click("nav a[href='#access']").await?;
    b.find("#share-device")
        .await?
        .select_by_value(&new_id)
        .await?;
    b.click("#share-form button[type=submit]").await?;
    let share = b.wait_text("#share-token", "adi_share_").await?;
    let share = share.trim().to_owned();

    // Bob, signed in, sees none of alice's devices and none of her tasks...
    b.click("#signout").await?;
    b.wait_text("#signin-note", "signed out").await?;
    b.sign_in(&hub.url, &bob_key).await?;
    b.click("nav a[href='#devices']").await?;
    b.wait_text("#no-devices", "No devices yet").await?;
    b.wait_text("#who", "bob").await?;
    let cards = b
        .js(
            "return document.querySelectorAll('article.device').length",
            vec![],
        )
        .await?;
    assert_eq!(cards, 0, "bob sees a device");
    b.click("nav a[href='#tasks']").await?;
    b.wait_text("#tasks-progress", "No devices to ask yet")
        .await?;
    assert!(task_titles(&b).await?.is_empty());

    // ...until he claims the share token: then exactly that device.
    b.click("nav a[href='#access']").await?;
    b.type_into("#claim-token", &format!("{share}{}", Key::Enter))
        .await?;
    b.wait_text("#claim-out", "You are now a user of new-box")
        .await?;
    b.type_into("#claim-token", &format!("{share}{}", Key::Enter))
        .await?;
    b.wait_text("#access-error", "already used").await?;
    b.click("nav a[href='#devices']").await?;
    let card = wait_card(&b, &new_id, "online").await?;
    let roles = b
        .js(
            "return [...arguments[0] ? document.querySelectorAll(`article.device[data-id='${arguments[0]}'] .members li`) : []].map(li => li.innerText.replace(/\\s+/g, ' ').trim())",
            vec![json!(new_id)],
        )
        .await?;
    assert_eq!(roles, json!(["alice owner", "bob user"]), "{card}");
    let leave = b
        .js(
            "return !!document.querySelector(`article.device[data-id='${arguments[0]}'] button.leave-device`)",
            vec![json!(new_id)],
        )
        .await?;
    assert_eq!(leave, json!(true), "a user may leave, not delete");
    let ids = b
        .js(
            "return [...document.querySelectorAll('article.device')].map(c => c.dataset.id)",
            vec![],
        )
        .await?;
    assert_eq!(ids, json!([new_id]), "bob sees only the shared device");
    drop((private, new_box));
    b.close().await
}

#[tokio::test]
async fn expired_or_invalid_session_goes_back_to_sign_in() -> Result<()> {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let Some(b) = Browser::start(1000, 800).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;

    // A wrong key is refused in words, and the form stays.
    b.client.goto(&hub.url).await?;
    b.type_into("#api-key", &format!("adi_key_wrong_wrong{}", Key::Enter))
        .await?;
    b.wait_text("#signin-error", "not accepted").await?;

    // A session that expired while the page was closed: back to sign in on reopening.
    b.sign_in(&hub.url, &key).await?;
    let sub = b
        .js(
            "return JSON.parse(atob(sessionStorage.getItem('adi.jwt').split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sub",
            vec![],
        )
        .await?;
    let now = adi_signaling::auth::unix_now();
    let expired = encode(
        &Header::default(),
        &json!({"sub": sub, "name": "alice", "iat": now - 7200, "exp": now - 3600, "iss": "adi-hub"}),
        &EncodingKey::from_secret(&hub.jwt_key().await?),
    )?;
    b.js(
        "sessionStorage.setItem('adi.jwt', arguments[0])",
        vec![expired.into()],
    )
    .await?;
    b.client.refresh().await?;
    b.wait_text("#signin-error", "session has expired").await?;
    b.find("#api-key").await?;
    let nav_hidden = b
        .js("return document.getElementById('nav').hidden", vec![])
        .await?;
    assert_eq!(nav_hidden, true);
    b.screenshot("session-expired").await?;

    // A session the hub stops accepting while the page is open, on the tasks page
    // (which asks over the WebSocket): back to sign in too.
    b.sign_in(&hub.url, &key).await?;
    b.click("nav a[href='#tasks']").await?;
    b.wait_text("#tasks-progress", "No devices to ask yet")
        .await?;
    // In one script, so the page's periodic device refresh (REST, with the same bad
    // token) cannot sign out first and take the button away before the click.
    b.js(
        "state.token = 'not.a.jwt'; closeSocket(); \
         document.querySelector('#task-filter button[type=submit]').click();",
        vec![],
    )
    .await?;
    b.wait_text("#signin-error", "session has expired").await?;
    let stored = b
        .js("return sessionStorage.getItem('adi.jwt')", vec![])
        .await?;
    assert_eq!(stored, Value::Null, "signing out forgets the token");
    b.close().await
}

#[tokio::test]
async fn hardware_reads_in_plain_words_and_an_online_device_without_load_is_not_called_offline(
) -> Result<()> {
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let gib = 1u64 << 30;
    let reporting = RawDevice::start(
        &hub,
        &alice,
        "reporting",
        json!({"cpu_count": 16, "cpu_percent": 3.0, "ram_total_bytes": 64 * gib,
            "ram_used_bytes": 8 * gib, "gpus": []}),
    )
    .await?;
    // An agent that reports no figures (an older build, say) while online.
    let silent = RawDevice::start(&hub, &alice, "silent", Value::Null).await?;

    b.sign_in(&hub.url, &key).await?;
    wait_card(&b, &reporting.id, "online").await?;
    let card = b
        .wait_text(&format!("{CARD}[data-id=\"{}\"]", reporting.id), "CPUs")
        .await?;
    for shown in ["16", "RAM", "64.0 GiB"] {
        assert!(card.contains(shown), "lacks {shown:?}:\n{card}");
    }
    for gone in ["Cpu count", "Ram total"] {
        assert!(!card.contains(gone), "says {gone:?}:\n{card}");
    }
    let card = wait_card(&b, &silent.id, "online").await?;
    assert!(card.contains("not reported yet"), "{card}");
    assert!(!card.contains("offline"), "{card}");
    b.close().await
}

#[tokio::test]
async fn an_owner_changes_a_members_role_removes_them_revokes_a_key_and_a_token_and_deletes_a_device_in_the_ui(
) -> Result<()> {
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let mut shared = Cocoon::start(
        &hub.url,
        "shared-box",
        Some(&alice.setup_token(60).await?),
        &[],
    )?;
    let id = shared.device_id().await?;
    let (_, share) = alice
        .post("/api/tokens", json!({"kind": "share", "device_id": id}))
        .await?;
    let (status, _) = bob
        .post("/api/tokens/claim", json!({"token": share["token"]}))
        .await?;
    assert_eq!(status, 200);

    b.sign_in(&hub.url, &alice_key).await?;
    let card = wait_card(&b, &id, "online").await?;
    assert!(card.contains("bob") && card.contains("user"), "{card}");
    // Every destructive action asks first; the test says yes, and records the question.
    b.js(
        "window.asked = []; window.confirm = (q) => { window.asked.push(q); return true; }; return true",
        vec![],
    )
    .await?;

    // Make bob an owner and a user again: the API follows each click, and the card then
    // offers the way back.
    for (to, back, label) in [
        ("owner", "user", "Make user"),
        ("user", "owner", "Make owner"),
    ] {
        let button = |role: &str| {
            format!("article.device[data-id='{id}'] li[data-member='bob'] button.set-role[data-role='{role}']")
        };
        b.click(&button(to)).await?;
        wait_for(&format!("bob to be {to}"), BROWSER_WAIT, || async {
            let (_, seen) = bob.cocoon(&id).await?;
            Ok((seen["role"] == to).then_some(()))
        })
        .await?;
        b.wait_text(&button(back), label).await?;
    }

    // Remove bob: he loses the device in the API.
    b.click(&format!(
        "article.device[data-id='{id}'] li[data-member='bob'] button.remove-member"
    ))
    .await?;
    wait_for("bob to lose the device", BROWSER_WAIT, || async {
        Ok((bob.cocoon(&id).await?.0 == 404).then_some(()))
    })
    .await?;
    let asked = b.js("return window.asked.join(' | ')", vec![]).await?;
    assert!(
        asked
            .as_str()
            .is_some_and(|q| q.contains("Make bob an owner of shared-box")
                && q.contains("Make bob a user of shared-box")
                && q.contains("Remove bob from shared-box")),
        "{asked}"
    );

    // A key made in the page is shown once and works; revoked in the page, it stops.
    b.click("nav a[href='#access']").await?;
    b.type_into("#key-name", "ui-key").await?;
    b.click("#key-scopes input[value='devices:read']").await?;
    b.click(&format!("#key-devices input[value='{id}']"))
        .await?;
    b.click("#key-form button[type=submit]").await?;
    let key = b.wait_text("#key-secret", "adi_key_").await?;
    let key = key.trim().to_owned();
    let ui = Api::login(&hub.url, &key).await?;
    assert_eq!(ui.cocoons().await?.len(), 1);
    let (status, _) = ui.get("/api/keys").await?;
    assert_eq!(status, 403, "devices:read only");
    let key_id = &key[8..24];
    b.wait_text(
        &format!("#key-rows tr[data-key='{key_id}']"),
        "devices:read on shared-box",
    )
    .await?;
    let (_, keys) = alice.get("/api/keys").await?;
    let made = keys["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["id"] == key_id).cloned())
        .unwrap_or_default();
    assert_eq!(made["devices"], json!([id]), "{keys}");
    b.click(&format!(
        "#key-rows tr[data-key='{key_id}'] button.revoke-key"
    ))
    .await?;
    wait_for("the key's session to end", BROWSER_WAIT, || async {
        Ok((ui.get("/api/cocoons").await?.0 == 401).then_some(()))
    })
    .await?;
    b.wait_text(&format!("#key-rows tr[data-key='{key_id}']"), "revoked")
        .await?;

    // A setup token made here is listed, and revoked here it enrols nothing.
    b.click("#setup-form button[type=submit]").await?;
    let token = b.wait_text("#setup-token", "adi_setup_").await?;
    let token_id = token.trim()[10..26].to_owned();
    b.click(&format!(
        "#token-rows tr[data-token='{token_id}'] button.revoke-token"
    ))
    .await?;
    b.wait_text(
        &format!("#token-rows tr[data-token='{token_id}']"),
        "revoked",
    )
    .await?;

    // The audit log shows what was done.
    b.click("nav a[href='#devices']").await?;
    b.click("nav a[href='#access']").await?;
    for kind in [
        "member_removed",
        "key_created",
        "key_revoked",
        "token_revoked",
    ] {
        b.wait_text("#audit-rows", kind).await?;
    }
    b.screenshot("access-management").await?;

    // Delete the device: its agent is told and stops, and its card goes.
    b.click("nav a[href='#devices']").await?;
    b.click(&format!(
        "article.device[data-id='{id}'] button.delete-device"
    ))
    .await?;
    assert_ne!(shared.proc.wait_exit(BROWSER_WAIT).await?, 0);
    assert!(shared.proc.output().contains("removed by its owner"));
    b.wait_js(
        "the deleted device's card gone",
        "return document.querySelectorAll('article.device').length === 0",
        vec![],
    )
    .await?;
    assert_eq!(alice.cocoon(&id).await?.0, 404);
    b.close().await
}

/// The fleet map's node of device `id`, once it shows `status`.
async fn wait_node(b: &Browser, id: &str, status: &str) -> Result<()> {
    b.wait_js(
        &format!("map node {id} {status}"),
        "const n = document.querySelector('svg.map a.node[data-id=\"' + arguments[0] + '\"]');
         return !!n && n.getAttribute('data-status') === arguments[1];",
        vec![id.into(), status.into()],
    )
    .await?;
    Ok(())
}

/// How many points the chart `id` on a device's page draws.
async fn chart_points(b: &Browser, id: &str) -> Result<u64> {
    let v = b
        .wait_js(
            &format!("chart {id}"),
            "const c = document.getElementById(arguments[0]); return c ? c.dataset.points : null;",
            vec![id.into()],
        )
        .await?;
    Ok(v.as_str().and_then(|p| p.parse().ok()).unwrap_or(0))
}

#[tokio::test]
async fn the_fleet_map_follows_devices_live_and_a_device_page_charts_its_load() -> Result<()> {
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let alice_key = hub.add_user("alice")?;
    let bob_key = hub.add_user("bob")?;
    let alice = Api::login(&hub.url, &alice_key).await?;
    let bob = Api::login(&hub.url, &bob_key).await?;
    let laptop = Cocoon::start(
        &hub.url,
        "laptop",
        Some(&alice.setup_token(60).await?),
        &["--location", "Lisbon"],
    )?;
    let laptop_id = laptop.device_id().await?;
    let gib = 1u64 << 30;
    let gpu = RawDevice::start_with(
        &hub,
        &alice,
        "gpu-box",
        json!({"cpu_count": 32, "cpu_percent": 25.0, "ram_total_bytes": 256 * gib, "ram_used_bytes": 64 * gib,
            "gpus": [{"index": 0, "name": "NVIDIA H100", "uuid": "GPU-0", "memory_total_bytes": 80 * gib,
                      "memory_used_bytes": 20 * gib, "utilization_percent": 62, "temperature_c": 50}]}),
        json!({"location": "Berlin, rack 2", "services": [
            {"name": "ssh", "port": 22, "kind": "tcp"},
            {"name": "llm", "port": 8000, "kind": "openai", "models": ["llama-3.1-8b"]}]}),
        Duration::from_millis(200),
    )
    .await?;
    // Whatever a device calls itself is shown as text, never run as markup.
    let hostile = "<img src=x onerror=\"window.pwned=1\">";
    let evil = RawDevice::start_with(
        &hub,
        &alice,
        hostile,
        Value::Null,
        json!({"location": "<b>Berlin</b>"}),
        Duration::from_millis(200),
    )
    .await?;

    b.sign_in(&hub.url, &alice_key).await?;
    for id in [&laptop_id, &gpu.id, &evil.id] {
        wait_node(&b, id, "online").await?;
    }
    let label = b
        .js(
            "return document.querySelector('svg.map a.node[data-id=\"' + arguments[0] + '\"]').getAttribute('aria-label')",
            vec![json!(evil.id)],
        )
        .await?;
    assert!(
        label.as_str().is_some_and(|l| l.starts_with(hostile)),
        "{label}"
    );
    let heading = b
        .js(
            "return document.querySelector('article.device[data-id=\"' + arguments[0] + '\"] h3').textContent",
            vec![json!(evil.id)],
        )
        .await?;
    assert_eq!(heading, hostile);
    assert_eq!(
        b.js(
            "return window.pwned === undefined && !document.querySelector('main img')",
            vec![]
        )
        .await?,
        true
    );
    // Grouped by location; a search by place narrows the map and the cards.
    b.wait_text("#topology", "Lisbon").await?;
    b.wait_text("#topology", "Berlin, rack 2").await?;
    b.type_into("#fleet-q", "lisbon").await?;
    b.wait_text("#fleet-shown", "1 of 3 match").await?;
    let shown = b
        .js(
            "return [...document.querySelectorAll('svg.map a.node')].map(n => n.dataset.id)",
            vec![],
        )
        .await?;
    assert_eq!(shown, json!([laptop_id]));
    b.type_into("#fleet-q", "GPU").await?;
    b.wait_text("#fleet-shown", "1 of 3 match").await?;
    b.find("#fleet-q").await?.clear().await?;
    b.find("#fleet-q").await?.send_keys(" ").await?;
    b.wait_js(
        "every device on the map again",
        "return document.querySelectorAll('svg.map a.node').length === 3",
        vec![],
    )
    .await?;
    b.screenshot("fleet").await?;
    b.assert_accessible("the fleet map").await?;

    // A device that stops shows offline on the map, and online again when it is back,
    // without a reload.
    b.js("window.stayedOnPage = true", vec![]).await?;
    let data_dir = laptop.data_dir.clone();
    let mut laptop = laptop;
    laptop.proc.terminate().await?;
    wait_node(&b, &laptop_id, "offline").await?;
    let shape = b
        .js(
            "return document.querySelector('svg.map a.node[data-id=\"' + arguments[0] + '\"] .shape').tagName",
            vec![json!(laptop_id)],
        )
        .await?;
    assert_eq!(shape, "rect", "offline is drawn as a hollow square");
    let back = Cocoon::start_in(
        &hub.url,
        "laptop",
        None,
        &data_dir,
        &["--location", "Lisbon"],
    )?;
    assert_eq!(back.device_id().await?, laptop_id);
    wait_node(&b, &laptop_id, "online").await?;
    assert_eq!(
        b.js("return window.stayedOnPage === true", vec![]).await?,
        true,
        "the page reloaded"
    );

    // A device that says it is stopping is drawn as an amber diamond.
    let _ = evil.answers.send(json!({"type": "draining"}));
    wait_node(&b, &evil.id, "stopping").await?;
    let shape = b
        .js(
            "return document.querySelector('svg.map a.node[data-id=\"' + arguments[0] + '\"] .shape').tagName",
            vec![json!(evil.id)],
        )
        .await?;
    assert_eq!(shape, "path", "stopping is drawn as a diamond");
    wait_card(&b, &evil.id, "stopping").await?;

    // The GPU box opens from the map, from the keyboard.
    let node = format!("svg.map a.node[data-id=\"{}\"]", gpu.id);
    b.find(&node)
        .await?
        .send_keys(&Key::Enter.to_string())
        .await?;
    b.wait_text("#device-title", "gpu-box").await?;
    let services = b
        .wait_text("#device-services", "adi connect gpu-box ssh")
        .await?;
    for shown in [
        "adi proxy gpu-box ssh --listen 127.0.0.1:PORT",
        "llama-3.1-8b",
        &format!("{}/v1", hub.url),
    ] {
        assert!(services.contains(shown), "lacks {shown:?}:\n{services}");
    }
    b.wait_text("#device-facts", "Berlin, rack 2").await?;
    b.wait_text("#chart-gpu-0", "62 % busy").await?;
    b.wait_text("#chart-ram", "64.0 / 256.0 GiB").await?;
    // The charts gain points as heartbeats arrive.
    let first = chart_points(&b, "chart-cpu").await?;
    b.wait_js(
        "a chart point more",
        "return Number(document.getElementById('chart-cpu').dataset.points) > arguments[0]
            && Number(document.getElementById('chart-gpu-0').dataset.points) > arguments[0]",
        vec![json!(first)],
    )
    .await?;
    let (status, history) = alice.get(&format!("/api/cocoons/{}/load", gpu.id)).await?;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["gpus"][0]["utilization_percent"][0], 62);
    assert_eq!(
        bob.get(&format!("/api/cocoons/{}/load", gpu.id)).await?.0,
        404
    );
    b.screenshot("device").await?;
    b.assert_accessible("a device's page").await?;

    // A member added by a share link made on the page; removed there, bob loses it.
    b.js(
        "window.asked = []; window.confirm = (q) => { window.asked.push(q); return true; }; return true",
        vec![],
    )
    .await?;
    b.click("#invite-form button[type=submit]").await?;
    let cmd = b
        .wait_text("#invite-cmd", "adi cocoon claim adi_share_")
        .await?;
    let token = cmd
        .trim()
        .trim_start_matches("adi cocoon claim ")
        .to_owned();
    let (status, body) = bob
        .post("/api/tokens/claim", json!({"token": token}))
        .await?;
    assert_eq!(status, 200, "{body}");
    b.click("#device-members li[data-member='bob'] button.remove-member")
        .await?;
    wait_for("bob to lose gpu-box", BROWSER_WAIT, || async {
        Ok((bob.cocoon(&gpu.id).await?.0 == 404).then_some(()))
    })
    .await?;
    let asked = b.js("return window.asked.join(' | ')", vec![]).await?;
    assert!(
        asked
            .as_str()
            .is_some_and(|q| q.contains("Remove bob from gpu-box")),
        "{asked}"
    );

    // On a phone-wide window the page still fits and reads.
    narrow(&b).await?;
    b.find("#chart-cpu").await?;
    assert_fits(&b, "a device's page").await?;
    b.screenshot("narrow-device").await?;
    b.assert_accessible("a device's page, phone-wide").await?;
    b.click("#device a[href='#devices']").await?;
    b.find(&node).await?;
    assert_fits(&b, "the fleet map").await?;
    b.screenshot("narrow-fleet").await?;
    b.assert_accessible("the fleet map, phone-wide").await?;
    let errors = b.console_errors().await?;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    drop((back, gpu, evil));
    b.close().await
}

/// Every page of the UI, light and dark, desktop and phone width: axe finds nothing
/// serious, nothing sticks out, the console stays clean; a screenshot of each.
#[tokio::test]
async fn every_page_passes_axe_in_light_and_dark_at_desktop_and_phone_width() -> Result<()> {
    let hub = Hub::start().await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let lab_port = lab_service().await?;
    let lab = Cocoon::start(
        &hub.url,
        "lab-box",
        Some(&alice.setup_token(60).await?),
        &[
            "--service",
            &format!("lab:{lab_port}"),
            "--location",
            "Rack 3, Berlin",
        ],
    )?;
    let lab_id = lab.device_id().await?;
    let (status, task) = alice
        .post(
            &format!("/api/cocoons/{lab_id}/tasks"),
            json!({"title": "say hello", "command": ["sh", "-c", "echo hello"]}),
        )
        .await?;
    assert_eq!(status, 201, "{task}");
    let task_id = task["id"].as_str().unwrap_or_default().to_owned();
    let gib = 1u64 << 30;
    let _gpu = RawDevice::start(
        &hub,
        &alice,
        "gpu-box",
        json!({"cpu_count": 64, "cpu_percent": 12.0, "ram_total_bytes": 512 * gib, "ram_used_bytes": 128 * gib,
            "gpus": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-0", "memory_total_bytes": 140 * gib,
                      "memory_used_bytes": 35 * gib, "utilization_percent": 62, "temperature_c": 48}]}),
    )
    .await?;

    for scheme in ["light", "dark"] {
        let switches: &[&str] = if scheme == "dark" {
            &["--force-dark-mode"]
        } else {
            &[]
        };
        let Some(b) = Browser::start_with(1280, 1000, switches).await? else {
            return Ok(());
        };
        b.client.goto(&hub.url).await?;
        let dark = b
            .js(
                "return matchMedia('(prefers-color-scheme: dark)').matches",
                vec![],
            )
            .await?;
        assert_eq!(dark, scheme == "dark", "the page follows the system");
        b.find("#api-key").await?;
        b.assert_accessible(&format!("sign-in ({scheme})")).await?;
        b.screenshot(&format!("{scheme}-signin")).await?;
        b.sign_in(&hub.url, &key).await?;
        wait_card(&b, &lab_id, "online").await?;
        let pages = [
            ("fleet", "#devices".to_owned(), "svg.map a.node".to_owned()),
            (
                "device",
                format!("#devices/{lab_id}"),
                "#chart-cpu".to_owned(),
            ),
            ("tasks", "#tasks".to_owned(), "#task-rows tr".to_owned()),
            (
                "task",
                format!("#tasks/{lab_id}/{task_id}"),
                "#detail-logs span".to_owned(),
            ),
            ("access", "#access".to_owned(), "#audit-rows tr".to_owned()),
        ];
        for (width, height, size) in [(1280, 1000, "desktop"), (390, 844, "phone")] {
            b.client.set_window_size(width, height).await?;
            b.wait_js(
                "the window's size",
                "return Math.abs(window.innerWidth - arguments[0]) < 20",
                vec![json!(width)],
            )
            .await?;
            for (name, hash, shown) in &pages {
                b.js("location.hash = arguments[0]", vec![json!(hash)])
                    .await?;
                b.find(shown).await?;
                if *name == "device" {
                    // Its page lists its recent tasks, each opening the task.
                    b.wait_text("#device-tasks", "say hello").await?;
                }
                let what = format!("the {name} page ({scheme}, {size})");
                assert_fits(&b, &what).await?;
                b.assert_accessible(&what).await?;
                b.screenshot(&format!("{scheme}-{name}-{size}")).await?;
            }
        }
        let errors = b.console_errors().await?;
        assert!(errors.is_empty(), "console errors ({scheme}): {errors:?}");
        b.close().await?;
    }
    drop(lab);
    Ok(())
}

/// Not a test but a measure (run with `--run-ignored only`): how long the page takes,
/// with 500 devices, from navigation to the devices listed (map and cards drawn), over
/// five loads; prints the median. See BENCHMARKS.md.
#[tokio::test]
#[ignore]
async fn first_view_with_500_devices() -> Result<()> {
    const DEVICES: usize = 500;
    let Some(b) = Browser::start(1280, 1000).await? else {
        return Ok(());
    };
    // Heartbeats at the default interval, so 500 devices cost what they would.
    let hub = Hub::start_with(&["--heartbeat-interval", "5s"]).await?;
    let key = hub.add_user("alice")?;
    let alice = Api::login(&hub.url, &key).await?;
    let gib = 1u64 << 30;
    let places = [
        "Berlin", "Lisbon", "Oslo", "Austin", "Tokyo", "Nairobi", "Lima", "Pune",
    ];
    let mut fleet = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let load = if i % 4 == 0 {
            json!({"cpu_count": 64, "cpu_percent": 30.0, "ram_total_bytes": 512 * gib, "ram_used_bytes": 100 * gib,
                "gpus": [{"index": 0, "name": "NVIDIA H100", "uuid": format!("GPU-{i}"), "memory_total_bytes": 80 * gib,
                          "memory_used_bytes": 20 * gib, "utilization_percent": 50, "temperature_c": 40}]})
        } else {
            json!({"cpu_count": 8, "cpu_percent": 5.0, "ram_total_bytes": 32 * gib, "ram_used_bytes": 4 * gib, "gpus": []})
        };
        let more = json!({"location": places[i % places.len()]});
        let beat = Duration::from_secs(4);
        fleet.push(
            RawDevice::start_with(&hub, &alice, &format!("node-{i:03}"), load, more, beat).await?,
        );
    }
    wait_for("every device online", Duration::from_secs(60), || async {
        let list = alice.cocoons().await?;
        let online = list.iter().filter(|d| d["online"] == true).count();
        Ok((online == DEVICES).then_some(()))
    })
    .await?;
    b.sign_in(&hub.url, &key).await?;
    let mut times = Vec::new();
    for _ in 0..5 {
        b.client.refresh().await?;
        let ms = b
            .wait_js(
                "500 devices listed",
                "const m = performance.getEntriesByName('adi-devices-listed')[0];
                 return m && document.querySelectorAll('svg.map a.node').length === 500
                     && document.getElementById('device-count').innerText.includes('500 of 500')
                     ? m.startTime : null;",
                vec![],
            )
            .await?;
        times.push(ms.as_f64().unwrap_or_default());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "first view, {DEVICES} devices: median {:.0} ms (runs: {})",
        times[times.len() / 2],
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    b.screenshot("fleet-500").await?;
    drop(fleet);
    b.close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_map_draws_every_hub_and_each_device_beside_its_own() -> Result<()> {
    let Some(db) = crate::cluster::catalog_and_nats().await else {
        return Ok(());
    };
    let result = async {
        let Some(b) = Browser::start(1280, 1000).await? else {
            return Ok(());
        };
        let (east_hub, west_hub) = (
            Hub::start_cluster(&db.url(), &[]).await?,
            Hub::start_cluster(&db.url(), &[]).await?,
        );
        let key = east_hub.add_user("alice")?;
        let (on_east, on_west) = (
            Api::login(&east_hub.url, &key).await?,
            Api::login(&west_hub.url, &key).await?,
        );
        wait_for("the hubs to see each other", BROWSER_WAIT, || async {
            let (_, body) = on_west.get("/api/hubs").await?;
            Ok((body["hubs"].as_array().map_or(0, Vec::len) == 2).then_some(()))
        })
        .await?;
        let east = Cocoon::start(
            &east_hub.url,
            "east-box",
            Some(&on_east.setup_token(60).await?),
            &["--location", "East"],
        )?;
        let west = Cocoon::start(
            &west_hub.url,
            "west-box",
            Some(&on_west.setup_token(60).await?),
            &["--location", "West"],
        )?;
        let (east_id, west_id) = (east.device_id().await?, west.device_id().await?);
        b.sign_in(&west_hub.url, &key).await?;
        for id in [&east_id, &west_id] {
            wait_node(&b, id, "online").await?;
        }
        let host = |url: &str| url.trim_start_matches("http://").to_owned();
        let drawn = b
            .wait_js(
                "both hubs, each device beside its own",
                "const hubs = [...document.querySelectorAll('svg.map g.hub')].map(h => h.getAttribute('aria-label'));
                 const label = (id) => document.querySelector('svg.map a.node[data-id=\"' + id + '\"]').getAttribute('aria-label');
                 const lines = document.querySelectorAll('svg.map line').length;
                 return hubs.length === 2 && label(arguments[0]).includes('on hub ' + arguments[2])
                     && label(arguments[1]).includes('on hub ' + arguments[3]) && lines === 2
                     ? hubs : null;",
                vec![
                    json!(east_id),
                    json!(west_id),
                    json!(host(&east_hub.url)),
                    json!(host(&west_hub.url)),
                ],
            )
            .await?;
        assert_eq!(
            drawn.as_array().map(Vec::len),
            Some(2),
            "{drawn}"
        );
        b.screenshot("fleet-two-hubs").await?;
        drop((east, west));
        b.close().await
    }
    .await;
    db.drop_database().await;
    result
}
