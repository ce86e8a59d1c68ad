//! The models of this device's OpenAI-compatible servers (llama.cpp, vLLM, Ollama, ...),
//! and with them the device's live service list. It asks each server
//! `GET http://127.0.0.1:PORT/v1/models` once at start (briefly, so registering is not
//! held up), then every refresh interval and whenever the plugin manifests change, and
//! publishes the whole list (the flags' and config file's services, then the servers
//! the manifests declare, each server with the models it listed) on a `watch` channel
//! that each session sends the hub whenever it changes.
//!
//! A server's answer is hostile input: read to at most [`MAX_ANSWER_BYTES`], names
//! checked, deduplicated, sorted and capped at [`MAX_MODELS`]. A server that cannot be
//! asked offers no models until it answers again, so the hub does not route to it.
//! This module only reads model lists; it never serves requests (the proxy does) and
//! never talks to the hub.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use adi_protocol::{ServiceInfo, ServiceKind, MAX_MODELS, MAX_MODEL_NAME};
use futures_util::future::join_all;
use serde::de::IgnoredAny;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::plugins::CapabilitySet;

/// Largest `/v1/models` answer read; a larger one is refused whole.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// How long one server may take to answer, body included.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How soon a server that could not be asked is asked again, at most.
const RETRY: Duration = Duration::from_secs(5);
/// Model names a log line shows; the rest are counted.
const LOGGED_NAMES: usize = 20;

/// The models one answer lists, as offered to the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelList {
    /// Distinct valid names, sorted, at most [`MAX_MODELS`].
    pub models: Vec<String>,
    /// Names left out: empty, longer than [`MAX_MODEL_NAME`] bytes, holding control
    /// characters, or past the first [`MAX_MODELS`].
    pub left_out: usize,
}

/// Why a server's models could not be learnt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelsError {
    /// Nothing accepted the connection, or it broke.
    #[error("nothing answers at 127.0.0.1:{0}")]
    Unreachable(u16),
    /// No whole answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 2xx (a server behind an API key answers 401).
    #[error("GET /v1/models answered HTTP {0}")]
    Status(u16),
    /// The body broke off.
    #[error("reading its answer failed: {0}")]
    Read(String),
    /// Larger than [`MAX_ANSWER_BYTES`].
    #[error("its answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    /// Not a JSON object, or `data`/`models` not a list.
    #[error("its answer is not a model list: {0}")]
    NotAList(String),
    /// A JSON object with neither `data` nor `models`.
    #[error("its answer has neither \"data\" (OpenAI) nor \"models\" (Ollama)")]
    Shape,
}

/// `{"object":"list","data":[{"id":..}]}` (OpenAI, llama.cpp, vLLM) or
/// `{"models":[{"name":..}]}` (Ollama's own API); everything else in it is ignored.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    data: Option<Vec<Entry>>,
    #[serde(default)]
    models: Option<Vec<Entry>>,
}

/// One listed model; an entry that is not an object is left out, not fatal.
#[derive(Deserialize)]
#[serde(untagged)]
enum Entry {
    Object {
        #[serde(default)]
        id: Option<Label>,
        #[serde(default)]
        name: Option<Label>,
        #[serde(default)]
        model: Option<Label>,
    },
    Other(IgnoredAny),
}

/// A name field; one that is not a string is left out.
#[derive(Deserialize)]
#[serde(untagged)]
enum Label {
    Text(String),
    Other(IgnoredAny),
}

impl Label {
    fn text(self) -> Option<String> {
        match self {
            Label::Text(t) => Some(t),
            Label::Other(_) => None,
        }
    }
}

impl Entry {
    fn name(self) -> Option<String> {
        match self {
            Entry::Object { id, name, model } => [id, name, model]
                .into_iter()
                .flatten()
                .find_map(Label::text),
            Entry::Other(_) => None,
        }
    }
}

/// Whether a server's model name may be offered to the hub.
fn acceptable(name: &str) -> bool {
    !name.trim().is_empty() && name.len() <= MAX_MODEL_NAME && !name.chars().any(char::is_control)
}

/// Reads a `/v1/models` answer. Apart from asking so that it can be fuzzed.
pub fn parse_models(body: &[u8]) -> Result<ModelList, ModelsError> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(ModelsError::TooLarge);
    }
    // serde would read a JSON array as the fields in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ModelsError::NotAList("not a JSON object".into()));
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| ModelsError::NotAList(e.to_string()))?;
    let entries = match (answer.data, answer.models) {
        (Some(data), _) => data,
        (None, Some(models)) => models,
        (None, None) => return Err(ModelsError::Shape),
    };
    let mut left_out = 0;
    let mut names = BTreeSet::new();
    for entry in entries {
        match entry.name() {
            Some(name) if acceptable(&name) => {
                names.insert(name);
            }
            _ => left_out += 1,
        }
    }
    left_out += names.len().saturating_sub(MAX_MODELS);
    Ok(ModelList {
        models: names.into_iter().take(MAX_MODELS).collect(),
        left_out,
    })
}

/// Asks the server on `port` for its models, within [`ANSWER_TIMEOUT`].
async fn ask(client: &reqwest::Client, port: u16) -> Result<ModelList, ModelsError> {
    let asked = async {
        let mut response = client
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|_| ModelsError::Unreachable(port))?;
        if !response.status().is_success() {
            return Err(ModelsError::Status(response.status().as_u16()));
        }
        let too_large = u64::try_from(MAX_ANSWER_BYTES).unwrap_or(u64::MAX);
        if response.content_length().is_some_and(|n| n > too_large) {
            return Err(ModelsError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ModelsError::Read(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ModelsError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_models(&body)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, asked)
        .await
        .unwrap_or(Err(ModelsError::Timeout(ANSWER_TIMEOUT)))
}

/// What was last learnt of one server, so that only changes are logged.
struct Known {
    port: u16,
    models: Vec<String>,
    left_out: usize,
    /// Set while it cannot be asked: warned once, and said when it answers again.
    failing: bool,
}

/// The servers' last answers, by service name.
struct Discovery {
    client: reqwest::Client,
    /// The flags' and config file's services, in their order.
    declared: Vec<ServiceInfo>,
    refresh: Duration,
    known: HashMap<String, Known>,
}

impl Discovery {
    /// Asks every OpenAI-compatible server in `services` at once, logs what changed,
    /// and gives back the list with each server's models.
    async fn round(&mut self, mut services: Vec<ServiceInfo>) -> Vec<ServiceInfo> {
        let client = &self.client;
        let answers = join_all(
            services
                .iter()
                .filter(|s| s.kind == ServiceKind::OpenAi)
                .map(|s| async move { (s.name.clone(), ask(client, s.port).await) }),
        )
        .await;
        self.known
            .retain(|name, _| services.iter().any(|s| s.name == *name));
        for (name, answer) in answers {
            let Some(service) = services.iter_mut().find(|s| s.name == name) else {
                continue;
            };
            service.models = self.learn(&name, service.port, answer);
        }
        services
    }

    /// Records one server's answer; its models, none while it cannot be asked.
    fn learn(
        &mut self,
        name: &str,
        port: u16,
        answer: Result<ModelList, ModelsError>,
    ) -> Vec<String> {
        let again = self.retry_every();
        let known = self.known.get_mut(name).filter(|k| k.port == port);
        match (answer, known) {
            (Err(e), Some(k)) => {
                if !k.failing {
                    warn_failing(name, port, &e, again);
                }
                k.failing = true;
                k.models.clear();
                Vec::new()
            }
            (Err(e), None) => {
                warn_failing(name, port, &e, again);
                self.known.insert(
                    name.to_owned(),
                    Known {
                        port,
                        models: Vec::new(),
                        left_out: 0,
                        failing: true,
                    },
                );
                Vec::new()
            }
            (Ok(list), Some(k)) => {
                let recovered = std::mem::take(&mut k.failing);
                if recovered {
                    info!(
                        service = name,
                        port, "openai service {name} at {port} answers again"
                    );
                }
                if recovered || k.models != list.models || k.left_out != list.left_out {
                    log_models(name, port, &list);
                    k.models.clone_from(&list.models);
                    k.left_out = list.left_out;
                }
                list.models
            }
            (Ok(list), None) => {
                log_models(name, port, &list);
                self.known.insert(
                    name.to_owned(),
                    Known {
                        port,
                        models: list.models.clone(),
                        left_out: list.left_out,
                        failing: false,
                    },
                );
                list.models
            }
        }
    }

    /// How long until the next round: sooner while a server cannot be asked.
    fn retry_every(&self) -> Duration {
        self.refresh.min(RETRY)
    }

    fn next_round(&self) -> Duration {
        if self.known.values().any(|k| k.failing) {
            self.retry_every()
        } else {
            self.refresh
        }
    }

    /// The flags' and config file's services, then the manifests' servers, no models.
    fn services(&self, plugins: &CapabilitySet) -> Vec<ServiceInfo> {
        let mut all = self.declared.clone();
        all.extend(plugins.services());
        all
    }
}

fn warn_failing(name: &str, port: u16, e: &ModelsError, again: Duration) {
    warn!(
        service = name,
        port,
        "openai service {name} at {port} cannot list its models: {e}; it offers none \
         until it does (asking again every {again:?})"
    );
}

fn log_models(name: &str, port: u16, list: &ModelList) {
    let n = list.models.len();
    let mut shown = list
        .models
        .iter()
        .take(LOGGED_NAMES)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if n > LOGGED_NAMES {
        shown.push_str(&format!(" and {} more", n - LOGGED_NAMES));
    }
    if n > 0 {
        shown.insert_str(0, ": ");
    }
    info!(
        service = name,
        port,
        models = n,
        "openai service {name} at {port} serves {n} models{shown}"
    );
    if list.left_out > 0 {
        warn!(
            service = name,
            port,
            left_out = list.left_out,
            "openai service {name} at {port} lists {} models that are not offered: empty, \
             longer than {MAX_MODEL_NAME} bytes, with control characters, or past the first \
             {MAX_MODELS}",
            list.left_out
        );
    }
}

/// Asks every OpenAI-compatible server once (each for at most a few seconds, all at
/// once), then keeps the list current on a task of its own: every `refresh` (sooner
/// while a server cannot be asked) and whenever the plugin manifests change.
pub(crate) async fn spawn(
    declared: Vec<ServiceInfo>,
    mut plugins: watch::Receiver<Arc<CapabilitySet>>,
    client: reqwest::Client,
    refresh: Duration,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<[ServiceInfo]>> {
    let mut discovery = Discovery {
        client,
        declared,
        refresh,
        known: HashMap::new(),
    };
    let services = discovery.services(&plugins.borrow_and_update());
    let first = discovery.round(services).await;
    let (tx, rx) = watch::channel(Arc::<[ServiceInfo]>::from(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(discovery.next_round()) => {}
                Ok(()) = plugins.changed() => {}
            }
            let services = discovery.services(&plugins.borrow_and_update());
            let next = discovery.round(services).await;
            tx.send_if_modified(|current| {
                if **current == *next {
                    false
                } else {
                    *current = next.into();
                    true
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(body: &str) -> Result<ModelList, ModelsError> {
        parse_models(body.as_bytes())
    }

    #[test]
    fn openai_and_ollama_lists_are_read_sorted_and_deduplicated() {
        let list = names(
            r#"{"object":"list","data":[
                {"id":"qwen2.5-7b","object":"model","owned_by":"llamacpp","meta":{"n_ctx":4096}},
                {"id":"llama-3.1-8b","object":"model"},
                {"id":"qwen2.5-7b"}
            ]}"#,
        )
        .expect("an OpenAI list");
        assert_eq!(list.models, ["llama-3.1-8b", "qwen2.5-7b"]);
        assert_eq!(list.left_out, 0);
        let ollama =
            names(r#"{"models":[{"name":"llama3:latest","model":"llama3:latest","size":1}]}"#)
                .expect("an Ollama list");
        assert_eq!(ollama.models, ["llama3:latest"]);
        assert_eq!(
            names(r#"{"object":"list","data":[]}"#),
            Ok(ModelList::default())
        );
    }

    #[test]
    fn bad_names_and_entries_are_left_out_and_counted() {
        let long = "m".repeat(MAX_MODEL_NAME + 1);
        let longest = "m".repeat(MAX_MODEL_NAME);
        let body = serde_json::json!({"data": [
            {"id": "ok"},
            {"id": long},
            {"id": longest},
            {"id": "bell\u{7}"},
            {"id": "line\nbreak"},
            {"id": "del\u{7f}"},
            {"id": "c1\u{85}"},
            {"id": ""},
            {"id": "   "},
            {"id": 7},
            {"id": null, "name": "by-name"},
            {"object": "model"},
            "a string",
            42,
            null,
            {"id": "ünïcødé/模型:Q4_K_M"}
        ]})
        .to_string();
        let list = names(&body).expect("a list");
        assert_eq!(
            list.models,
            ["by-name", &longest, "ok", "ünïcødé/模型:Q4_K_M"]
        );
        assert_eq!(list.left_out, 12);
    }

    #[test]
    fn huge_lists_are_capped_and_huge_answers_refused() {
        let many: Vec<serde_json::Value> = (0..MAX_MODELS * 4)
            .map(|i| serde_json::json!({"id": format!("model-{i:05}")}))
            .collect();
        let list = names(&serde_json::json!({ "data": many }).to_string()).expect("a list");
        assert_eq!(list.models.len(), MAX_MODELS);
        assert_eq!(list.left_out, MAX_MODELS * 3);
        assert_eq!(list.models[0], "model-00000");
        assert!(list.models.windows(2).all(|w| w[0] < w[1]));
        let huge = format!(
            r#"{{"data":[{{"id":"{}"}}]}}"#,
            "x".repeat(MAX_ANSWER_BYTES)
        );
        assert_eq!(names(&huge), Err(ModelsError::TooLarge));
    }

    #[test]
    fn answers_that_are_not_model_lists_say_why() {
        for body in [
            "",
            "not json",
            "[]",
            "null",
            "\"data\"",
            r#"{"data":5}"#,
            r#"{"data":{"id":"x"}}"#,
            r#"{"data":[{"id":"x"}]"#,
        ] {
            assert!(
                matches!(names(body), Err(ModelsError::NotAList(_))),
                "{body}: {:?}",
                names(body)
            );
        }
        assert_eq!(names(r#"{"object":"list"}"#), Err(ModelsError::Shape));
        assert_eq!(names(r#"{"data":null}"#), Err(ModelsError::Shape));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let nested = format!(r#"{{"data":[{{"id":{deep}}}]}}"#);
        assert!(names(&nested).is_err(), "too deep to read");
    }

    async fn stub(answer: &'static str, status: u16) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = axum::Router::new().route(
            "/v1/models",
            axum::routing::get(move || async move {
                (
                    http::StatusCode::from_u16(status).expect("status"),
                    [("content-type", "application/json")],
                    answer,
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    #[tokio::test]
    async fn servers_are_asked_and_failures_say_why() {
        let client = crate::proxy::client();
        let ok = stub(r#"{"data":[{"id":"b"},{"id":"a"}]}"#, 200).await;
        assert_eq!(ask(&client, ok).await.expect("models").models, ["a", "b"]);
        let locked = stub(r#"{"error":"no key"}"#, 401).await;
        assert_eq!(ask(&client, locked).await, Err(ModelsError::Status(401)));
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead_port = dead.local_addr().expect("addr").port();
        drop(dead);
        assert_eq!(
            ask(&client, dead_port).await,
            Err(ModelsError::Unreachable(dead_port))
        );
    }

    #[tokio::test]
    async fn the_list_follows_the_servers_and_the_manifests() {
        let ok = stub(r#"{"data":[{"id":"m1"}]}"#, 200).await;
        let web = crate::services::parse("web:1").expect("web");
        let llm = crate::services::openai("llm", ok).expect("llm");
        let (plugins_tx, plugins) = watch::channel(Arc::new(CapabilitySet::default()));
        let cancel = CancellationToken::new();
        let mut rx = spawn(
            vec![web.clone(), llm],
            plugins,
            crate::proxy::client(),
            Duration::from_secs(3600),
            cancel.clone(),
        )
        .await;
        {
            let first = rx.borrow_and_update();
            assert_eq!(first.len(), 2);
            assert_eq!(first[0], web);
            assert_eq!(first[1].models, ["m1"]);
        }
        // A manifest adds a server: asked at once, not at the next refresh.
        let more = stub(r#"{"models":[{"name":"m2"}]}"#, 200).await;
        plugins_tx.send_replace(Arc::new(CapabilitySet {
            services: vec![crate::plugins::PluginService {
                service: crate::services::openai("more", more).expect("more"),
                source: "/p/more.toml".into(),
                plugin: None,
            }],
            ..CapabilitySet::default()
        }));
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("in time")
            .expect("alive");
        let now = rx.borrow_and_update().clone();
        assert_eq!(now.len(), 3);
        assert_eq!(
            (now[2].name.as_str(), now[2].models.as_slice()),
            ("more", &["m2".to_owned()][..])
        );
        cancel.cancel();
    }
}
