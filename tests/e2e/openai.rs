//! The hub's OpenAI-compatible endpoint, driven by the official `openai` Python client
//! (from the virtualenv `scripts/test` makes, or `ADI_TEST_PYTHON`), in front of
//! OpenAI-compatible servers on the devices' loopback written for the test: they stand
//! in for llama.cpp or vLLM and stream with real delays between chunks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::harness::{wait_for, Api, Cocoon, Hub};

/// An OpenAI-compatible server standing in for a model server.
pub(crate) struct Stub {
    name: &'static str,
    models: Vec<&'static str>,
    /// Requests answered (or begun).
    requests: AtomicU64,
    /// Streams whose client went away before the last chunk.
    cancelled: AtomicU64,
    /// Streams in progress.
    streaming: AtomicU64,
}

/// Delay between two streamed chunks.
const CHUNK_DELAY: Duration = Duration::from_millis(150);

struct Abandoned(Arc<Stub>, bool);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn list(State(s): State<Arc<Stub>>) -> Json<Value> {
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "test"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn chat(State(s): State<Arc<Stub>>, Json(body): Json<Value>) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let said = body["messages"][0]["content"].as_str().unwrap_or_default();
    if said == "fail" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "the server refused", "type": "invalid_request_error", "code": "refused"}})),
        )
            .into_response();
    }
    if body["stream"].as_bool() != Some(true) {
        return Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": format!("hello from {}", s.name)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
        }))
        .into_response();
    }
    let count = if said == "long" { 200 } else { 5 };
    s.streaming.fetch_add(1, Ordering::SeqCst);
    let guard = Abandoned(s.clone(), false);
    let stream = async_stream(move |tx| async move {
        // The whole guard lives in the producer, dropped when it stops.
        let mut guard = guard;
        for i in 0..count {
            let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null}]});
            if tx.send(format!("data: {chunk}\n\n")).await.is_err() {
                return;
            }
            tokio::time::sleep(CHUNK_DELAY).await;
        }
        let _ = tx.send("data: [DONE]\n\n".to_owned()).await;
        guard.1 = true;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(stream)
        .unwrap_or_default()
}

/// A streamed body fed by `produce` through a channel: when the client goes away the
/// body is dropped, the channel closes, and the producer's next send fails.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(1);
    tokio::spawn(produce(tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|s| (Ok::<_, std::io::Error>(Bytes::from(s)), rx))
    });
    Body::from_stream(stream)
}

async fn embeddings(State(s): State<Arc<Stub>>, Json(body): Json<Value>) -> Json<Value> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let input = body["input"].as_str().unwrap_or_default();
    Json(json!({"object": "list", "model": body["model"],
        "data": [{"object": "embedding", "index": 0, "embedding": [input.len() as f64, 0.5]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
}

async fn completions(State(s): State<Arc<Stub>>, Json(body): Json<Value>) -> Json<Value> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    Json(
        json!({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "text": format!("said by {}", s.name), "finish_reason": "stop", "logprobs": null}]}),
    )
}

/// Starts a stub on a free loopback port; dropping the sender stops it.
pub(crate) async fn stub(
    name: &'static str,
    models: Vec<&'static str>,
) -> Result<(Arc<Stub>, u16, tokio::sync::oneshot::Sender<()>)> {
    let s = Arc::new(Stub {
        name,
        models,
        requests: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        streaming: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/models", get(list))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((s, port, stop))
}

/// The Python with the `openai` client; `None` (after saying SKIPPED) without it, a
/// failure when `CI` is set.
fn python() -> Option<PathBuf> {
    let path = std::env::var_os("ADI_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python"),
        PathBuf::from,
    );
    let ok = std::process::Command::new(&path)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} cannot import openai; scripts/test makes that virtualenv",
        path.display()
    );
    eprintln!(
        "*** SKIPPED: needs {} with the openai package (scripts/test makes it) ***",
        path.display()
    );
    None
}

/// Runs one scenario of `client.py`; its JSON.
async fn client(python: &PathBuf, hub: &Hub, key: &str, args: &[&str]) -> Result<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai/client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("{}/v1", hub.url))
        .arg(key)
        .args(args)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "client.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("client.py prints JSON")
}

/// A key with only the `capabilities` scope, as one hands to an editor.
pub(crate) async fn capabilities_key(api: &Api) -> Result<String> {
    let (status, made) = api
        .post(
            "/api/keys",
            json!({"name": "editor", "scopes": ["capabilities"]}),
        )
        .await?;
    ensure!(status == 201, "{status} {made}");
    made["key"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no key: {made}"))
}

/// The models the hub lists for `key`, once it lists `want`.
async fn models_listed(hub: &Hub, key: &str, want: &[&str]) -> Result<Value> {
    let http = reqwest::Client::new();
    wait_for(
        "the hub to list the models",
        Duration::from_secs(15),
        || async {
            let body: Value = http
                .get(format!("{}/v1/models", hub.url))
                .bearer_auth(key)
                .send()
                .await?
                .json()
                .await?;
            let ids: Vec<&str> = body["data"]
                .as_array()
                .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
                .unwrap_or_default();
            Ok(want.iter().all(|w| ids.contains(w)).then(|| body.clone()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_lists_streams_chats_and_embeds_through_the_hub() -> Result<()> {
    let Some(python) = python() else {
        return Ok(());
    };
    let hub = Hub::start_with(&["--proxy-max-body-bytes", "65536"]).await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (_a, port_a, _stop_a) = stub("A", vec!["llama-8b", "nomic-embed"]).await?;
    let (_b, port_b, _stop_b) = stub("B", vec!["qwen-32b"]).await?;
    let one = Cocoon::start(
        &hub.url,
        "one",
        Some(&alice.setup_token(60).await?),
        &["--openai", &format!("llm:{port_a}")],
    )?;
    let two = Cocoon::start(
        &hub.url,
        "two",
        Some(&alice.setup_token(60).await?),
        &["--openai", &format!("llm:{port_b}")],
    )?;
    let (one_id, two_id) = (one.device_id().await?, two.device_id().await?);
    let key = capabilities_key(&alice).await?;
    let listed = models_listed(&hub, &key, &["llama-8b", "nomic-embed", "qwen-32b"]).await?;
    let qwen = listed["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == "qwen-32b"))
        .ok_or_else(|| anyhow!("{listed}"))?;
    ensure!(qwen["devices"][0]["id"] == two_id.as_str(), "{listed}");

    let models = client(&python, &hub, &key, &["models"]).await?;
    ensure!(
        models["models"] == json!(["llama-8b", "nomic-embed", "qwen-32b"]),
        "{models}"
    );

    // Streamed: chunks arrive one by one, as the server sends them, not at the end.
    let streamed = client(&python, &hub, &key, &["stream", "llama-8b"]).await?;
    let chunks = streamed["chunks"]
        .as_array()
        .ok_or_else(|| anyhow!("{streamed}"))?;
    let text: String = chunks.iter().filter_map(|c| c["text"].as_str()).collect();
    ensure!(text == "t0 t1 t2 t3 t4 ", "{streamed}");
    let first = chunks[0]["at"].as_f64().unwrap_or(f64::MAX);
    let last = chunks[4]["at"].as_f64().unwrap_or(0.0);
    ensure!(
        last - first >= 3.0 * CHUNK_DELAY.as_secs_f64(),
        "the chunks came together, not as the server produced them: {streamed}"
    );

    let chat = client(&python, &hub, &key, &["chat", "qwen-32b"]).await?;
    ensure!(chat["content"] == "hello from B", "{chat}");
    ensure!(chat["device"] == two_id.as_str(), "{chat}");
    let embedded = client(&python, &hub, &key, &["embeddings", "nomic-embed"]).await?;
    ensure!(embedded["embedding"] == json!([4.0, 0.5]), "{embedded}");
    ensure!(embedded["device"] == one_id.as_str(), "{embedded}");
    let completed = client(&python, &hub, &key, &["completion", "llama-8b"]).await?;
    ensure!(completed["text"] == "said by A", "{completed}");

    // Errors in OpenAI's shape.
    let unknown = client(&python, &hub, &key, &["error", "gpt-9"]).await?;
    ensure!(unknown["status"] == 404, "{unknown}");
    ensure!(unknown["class"] == "NotFoundError", "{unknown}");
    ensure!(unknown["body"]["code"] == "model_not_found", "{unknown}");
    let http = reqwest::Client::new();
    let big = json!({"model": "llama-8b", "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url))
        .bearer_auth(&key)
        .json(&big)
        .send()
        .await?;
    ensure!(resp.status() == 413, "{}", resp.status());
    let body: Value = resp.json().await?;
    ensure!(body["error"]["code"] == "request_too_large", "{body}");
    // The server's own refusal is passed on as it said it.
    let resp = http
        .post(format!("{}/v1/chat/completions", hub.url))
        .bearer_auth(&key)
        .json(&json!({"model": "qwen-32b", "messages": [{"role": "user", "content": "fail"}]}))
        .send()
        .await?;
    ensure!(resp.status() == 400, "{}", resp.status());
    let body: Value = resp.json().await?;
    ensure!(body["error"]["code"] == "refused", "{body}");
    // No key, a wrong key, a key without the scope.
    for bearer in ["", "adi_key_nope_nope"] {
        let resp = http
            .get(format!("{}/v1/models", hub.url))
            .bearer_auth(bearer)
            .send()
            .await?;
        ensure!(resp.status() == 401, "{bearer:?}: {}", resp.status());
        let body: Value = resp.json().await?;
        ensure!(body["error"]["code"] == "invalid_api_key", "{body}");
    }
    let (_, narrow) = alice
        .post(
            "/api/keys",
            json!({"name": "reader", "scopes": ["devices:read"]}),
        )
        .await?;
    let resp = http
        .get(format!("{}/v1/models", hub.url))
        .bearer_auth(narrow["key"].as_str().unwrap_or_default())
        .send()
        .await?;
    ensure!(resp.status() == 403, "{}", resp.status());

    // A device that goes away: its model is known but has nobody to serve it.
    drop(two);
    wait_for(
        "qwen to be unavailable",
        Duration::from_secs(10),
        || async {
            let resp = http
                .post(format!("{}/v1/chat/completions", hub.url))
                .bearer_auth(&key)
                .json(
                    &json!({"model": "qwen-32b", "messages": [{"role": "user", "content": "hi"}]}),
                )
                .send()
                .await?;
            Ok((resp.status() == 503).then_some(()))
        },
    )
    .await?;
    drop(one);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_less_loaded_device_fail_over_and_cancel_on_disconnect() -> Result<()> {
    let Some(python) = python() else {
        return Ok(());
    };
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (a, port_a, _stop_a) = stub("A", vec!["shared"]).await?;
    let (b, port_b, _stop_b) = stub("B", vec!["shared"]).await?;
    let (_dead, port_dead, stop_dead) = stub("dead", vec!["shared"]).await?;
    let start = |name: &'static str, port: u16| {
        let (hub, alice) = (hub.url.clone(), alice.clone());
        async move {
            let token = alice.setup_token(60).await?;
            Cocoon::start(
                &hub,
                name,
                Some(&token),
                &["--openai", &format!("llm:{port}")],
            )
        }
    };
    let one = start("one", port_a).await?;
    let two = start("two", port_b).await?;
    let three = start("three", port_dead).await?;
    let (one_id, two_id, three_id) = (
        one.device_id().await?,
        two.device_id().await?,
        three.device_id().await?,
    );
    let key = capabilities_key(&alice).await?;
    wait_for("three devices serving", Duration::from_secs(15), || async {
        let listed = models_listed(&hub, &key, &["shared"]).await?;
        Ok((listed["data"][0]["devices"].as_array().map_or(0, Vec::len) == 3).then_some(()))
    })
    .await?;
    // The third server dies after it said what it serves: a request sent there fails
    // before anything came back, and goes to another device.
    let _ = stop_dead.send(());
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .post(format!("{}/v1/chat/completions", hub.url))
            .bearer_auth(&key)
            .header("x-adi-device", &three_id)
            .json(&json!({"model": "shared", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?;
        ensure!(resp.status() == 200, "{}", resp.status());
        let served = resp.headers()["x-adi-device"].to_str()?.to_owned();
        ensure!(served == one_id || served == two_id, "{served}");
    }

    // A long stream holds device one (preferred); the next requests go to device two.
    let mut long = http
        .post(format!("{}/v1/chat/completions", hub.url))
        .bearer_auth(&key)
        .header("x-adi-device", &one_id)
        .json(&json!({"model": "shared", "stream": true, "messages": [{"role": "user", "content": "long"}]}))
        .send()
        .await?;
    ensure!(long.headers()["x-adi-device"] == one_id.as_str());
    long.chunk().await?;
    for _ in 0..3 {
        let resp = http
            .post(format!("{}/v1/chat/completions", hub.url))
            .bearer_auth(&key)
            .json(&json!({"model": "shared", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?;
        ensure!(
            resp.headers()["x-adi-device"] == two_id.as_str(),
            "the idle device serves"
        );
    }
    // The client leaves mid-stream: the device's server sees its connection close.
    let before = a.cancelled.load(Ordering::SeqCst);
    drop(long);
    wait_for(
        "the server to see the client leave",
        Duration::from_secs(5),
        || async { Ok((a.cancelled.load(Ordering::SeqCst) > before).then_some(())) },
    )
    .await?;
    // The same through the openai client.
    let before = b.cancelled.load(Ordering::SeqCst) + a.cancelled.load(Ordering::SeqCst);
    let abandoned = client(&python, &hub, &key, &["abandon", "shared"]).await?;
    ensure!(abandoned["first"] == "t0 ", "{abandoned}");
    wait_for(
        "the server to see the openai client leave",
        Duration::from_secs(5),
        || async {
            let now = b.cancelled.load(Ordering::SeqCst) + a.cancelled.load(Ordering::SeqCst);
            Ok((now > before).then_some(()))
        },
    )
    .await?;
    drop((one, two, three));
    Ok(())
}

/// Asks for `protocol` as `api`'s caller.
async fn ask(api: &Api, protocol: &str, body: Value) -> Result<(u16, Value)> {
    api.post(&format!("/api/capabilities/{protocol}/request"), body)
        .await
}

/// The devices `by-capability` lists online for `protocol` and `model`.
async fn offering(api: &Api, protocol: &str, model: &str) -> Result<Vec<(String, Value)>> {
    let (status, body) = api
        .get(&format!(
            "/api/cocoons/by-capability?protocol={protocol}&model={model}"
        ))
        .await?;
    ensure!(status == 200, "by-capability: {status} {body}");
    Ok(body["cocoons"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["online"] == true)
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_owned(),
                c["offer"].clone(),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_offered_as_capabilities_and_routed_by_model_name() -> Result<()> {
    let hub = Hub::start().await?;
    let alice = Api::login(&hub.url, &hub.add_user("alice")?).await?;
    let (a, port_a, stop_a) = stub("A", vec!["qwen", "shared"]).await?;
    let (b, port_b, _stop_b) = stub("B", vec!["llama", "shared"]).await?;
    let mut devices = Vec::new();
    for (name, port) in [("one", port_a), ("two", port_b)] {
        let token = alice.setup_token(60).await?;
        devices.push(Cocoon::start(
            &hub.url,
            name,
            Some(&token),
            &["--openai", &format!("llm:{port}"), "--openai-refresh", "1s"],
        )?);
    }
    let (one, two) = (devices[0].device_id().await?, devices[1].device_id().await?);

    // Each device offers llm.chat and embeddings with its server's models.
    let listed = wait_for("qwen offered", Duration::from_secs(15), || async {
        let found = offering(&alice, "llm.chat", "qwen").await?;
        Ok((!found.is_empty()).then_some(found))
    })
    .await?;
    ensure!(listed.len() == 1 && listed[0].0 == one, "{listed:?}");
    ensure!(
        listed[0].1["models"] == json!(["qwen", "shared"]),
        "{listed:?}"
    );
    let shared = offering(&alice, "embeddings", "shared").await?;
    ensure!(shared.len() == 2, "both serve the shared model: {shared:?}");
    ensure!(offering(&alice, "llm.chat", "mistral").await?.is_empty());

    // A key with only the capabilities scope asks by model name, in the payload or
    // beside it; the device with that model answers, with its server's JSON.
    let key = Api::login(&hub.url, &capabilities_key(&alice).await?).await?;
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let (status, body) = ask(&key, "llm.chat", json!({"payload": chat("llama")})).await?;
        ensure!(status == 200, "{status} {body}");
        ensure!(body["from_device"] == two.as_str(), "{body}");
        ensure!(
            body["payload"]["choices"][0]["message"]["content"] == "hello from B",
            "{body}"
        );
    }
    let (status, body) = ask(
        &key,
        "llm.chat",
        json!({"model": "qwen", "payload": {"messages": [{"role": "user", "content": "hi"}]}}),
    )
    .await?;
    ensure!(
        status == 200 && body["from_device"] == one.as_str(),
        "{status} {body}"
    );
    ensure!(
        body["payload"]["model"] == "qwen",
        "the device names the model to its server: {body}"
    );
    let (status, body) = ask(
        &key,
        "embeddings",
        json!({"payload": {"model": "shared", "input": "four"}}),
    )
    .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["payload"]["data"][0]["embedding"][0] == 4.0, "{body}");

    // What cannot be served is refused, naming why, before any server sees it.
    let before = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    let (status, body) = ask(&key, "llm.chat", json!({"payload": chat("mistral")})).await?;
    ensure!(
        status == 503 && body["error"]["code"] == "no_capable_device",
        "{status} {body}"
    );
    ensure!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("mistral")),
        "{body}"
    );
    let mut streamed = chat("qwen");
    streamed["stream"] = json!(true);
    let (status, body) = ask(&key, "llm.chat", json!({"payload": streamed})).await?;
    ensure!(
        status == 400 && body["error"]["code"] == "bad_request",
        "{status} {body}"
    );
    let (status, body) = ask(
        &key,
        "llm.chat",
        json!({"model": "qwen", "payload": chat("llama")}),
    )
    .await?;
    ensure!(
        status == 400,
        "a payload naming another model: {status} {body}"
    );
    let (status, _) = ask(&key, "llm.chat", json!({"model": "a\nb", "payload": {}})).await?;
    ensure!(status == 400, "a model name with a line break");
    ensure!(
        a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst) == before,
        "no server saw a refused request"
    );

    // A device asks too, through its own cocoon.
    let (code, out, err) = crate::capabilities::request_cli(
        &devices[1].data_dir,
        &["llm.chat", "--payload", &chat("qwen").to_string(), "--json"],
    )?;
    ensure!(code == 0, "{out} {err}");
    let answer: Value = serde_json::from_str(&out)?;
    ensure!(answer["from_device"] == one.as_str(), "{answer}");

    // A server that stops answering drops out of the offers; its models are gone.
    let _ = stop_a.send(());
    wait_for(
        "qwen no longer offered",
        Duration::from_secs(15),
        || async {
            Ok(offering(&alice, "llm.chat", "qwen")
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    let (status, body) = ask(&key, "llm.chat", json!({"payload": chat("qwen")})).await?;
    ensure!(status == 503, "{status} {body}");
    let (status, body) = ask(&key, "llm.chat", json!({"payload": chat("shared")})).await?;
    ensure!(
        status == 200 && body["from_device"] == two.as_str(),
        "{status} {body}"
    );
    drop(devices);
    Ok(())
}
