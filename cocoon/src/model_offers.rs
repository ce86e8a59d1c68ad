//! The models of this device's OpenAI-compatible servers, offered as capabilities:
//! `llm.chat` and `embeddings`, each listing every model the servers list now, so the
//! hub routes `llm.chat` for a model only to devices that have it, by load, like any
//! other capability. A request is a body in OpenAI's shape; it is POSTed to the first
//! server that lists its model, and the server's JSON answer is the answer.
//!
//! The offered set is the plugins' set plus these offers, recomputed whenever either
//! the manifests or the servers' model lists change. A server that cannot be asked
//! lists no models, so it drops out of the offers until it answers again.

use std::collections::BTreeSet;
use std::sync::Arc;

use adi_protocol::capability::{payload_model, MAX_OFFER_MODELS};
use adi_protocol::{CapabilityOffer, CapabilityQuery, ErrorCode, Payload, RemoteError};
use adi_protocol::{ServiceInfo, ServiceKind};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plugins::{CapabilitySet, ModelServer, Serve, Served};

/// The version model offers are made at.
pub const VERSION: &str = "1.0.0";

/// Each protocol models are offered as, the path on the server that serves it, and
/// whether a request may be sent twice (an embedding is the same each time; a chat
/// answer is costly GPU work and is never run twice by the hub).
pub const PROTOCOLS: &[(&str, &str, bool)] = &[
    ("llm.chat", "/v1/chat/completions", false),
    ("embeddings", "/v1/embeddings", true),
];

/// The offers the servers in `services` make now, leaving out `disabled` protocols.
pub fn offers(services: &[ServiceInfo], disabled: &BTreeSet<String>) -> Vec<Served> {
    let servers: Vec<ModelServer> = services
        .iter()
        .filter(|s| s.kind == ServiceKind::OpenAi && !s.models.is_empty())
        .map(|s| ModelServer {
            name: s.name.clone(),
            port: s.port,
            models: s.models.clone(),
        })
        .collect();
    if servers.is_empty() {
        return Vec::new();
    }
    let models: Vec<String> = servers
        .iter()
        .flat_map(|s| s.models.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .take(MAX_OFFER_MODELS)
        .collect();
    let source = format!(
        "openai {}",
        servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    PROTOCOLS
        .iter()
        .filter(|(protocol, _, _)| !disabled.contains(*protocol))
        .filter_map(|&(protocol, path, idempotent)| {
            let mut offer = CapabilityOffer::new(protocol, VERSION)
                .and_then(|o| o.with_models(models.clone()))
                .ok()?;
            offer.idempotent = idempotent;
            Some(Served {
                offer,
                serve: Serve::Models {
                    path,
                    servers: servers.clone(),
                },
                source: source.clone(),
                plugin: None,
            })
        })
        .collect()
}

/// The plugins' set with the servers' model offers added.
pub fn combine(
    plugins: &Arc<CapabilitySet>,
    services: &[ServiceInfo],
    disabled: &BTreeSet<String>,
) -> Arc<CapabilitySet> {
    let extra = offers(services, disabled);
    if extra.is_empty() {
        return plugins.clone();
    }
    let mut set = CapabilitySet::clone(plugins);
    set.served.extend(extra);
    Arc::new(set)
}

/// What this device offers, kept current on a task of its own.
pub(crate) fn watch(
    mut plugins: watch::Receiver<Arc<CapabilitySet>>,
    mut services: watch::Receiver<Arc<[ServiceInfo]>>,
    disabled: BTreeSet<String>,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<CapabilitySet>> {
    let first = combine(
        &plugins.borrow_and_update(),
        &services.borrow_and_update(),
        &disabled,
    );
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                Ok(()) = plugins.changed() => {}
                Ok(()) = services.changed() => {}
                else => return,
            }
            let next = combine(
                &plugins.borrow_and_update(),
                &services.borrow_and_update(),
                &disabled,
            );
            tx.send_if_modified(|current| {
                if **current == *next {
                    false
                } else {
                    *current = next;
                    true
                }
            });
        }
    });
    rx
}

/// Where a request goes and what is sent: the first server listing the model asked
/// for (by the query, or else by the payload), with the payload naming that model.
/// A payload that is not a JSON object, asks for a stream, or names another model
/// than the query is refused before any server sees it.
pub fn prepare(
    path: &str,
    servers: &[ModelServer],
    query: &CapabilityQuery,
    payload: Payload,
) -> Result<(String, Payload), RemoteError> {
    let bad = |message: String| RemoteError::new(ErrorCode::BadRequest, message);
    let mut body: Map<String, Value> = serde_json::from_str(payload.get()).map_err(|_| {
        bad(format!(
            "a {} request is an OpenAI request body: a JSON object with \"model\"",
            query.protocol
        ))
    })?;
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err(bad(format!(
            "{} as a capability answers once; streamed answers come from the hub's \
             /v1{} endpoint",
            query.protocol,
            path.trim_start_matches("/v1")
        )));
    }
    let named = payload_model(&payload).map_err(|e| bad(e.to_string()))?;
    let model = match (&query.model, &named) {
        (Some(asked), Some(named)) if asked != named => {
            return Err(bad(format!(
                "the request asks for model {asked:?} but its payload names {named:?}"
            )))
        }
        (Some(m), _) | (None, Some(m)) => Some(m.clone()),
        (None, None) => None,
    };
    let server = match &model {
        Some(m) => servers
            .iter()
            .find(|s| s.models.iter().any(|have| have == m)),
        None => servers.first(),
    }
    .ok_or_else(|| {
        RemoteError::new(
            ErrorCode::NoCapableDevice,
            match &model {
                Some(m) => format!("this device serves no model {m:?}"),
                None => "this device has no model server listing models".to_owned(),
            },
        )
    })?;
    let payload = match (model, named) {
        (Some(m), None) => {
            body.insert("model".into(), Value::String(m));
            serde_json::to_string(&body)
                .ok()
                .and_then(|text| Payload::from_json(text).ok())
                .ok_or_else(|| {
                    RemoteError::new(ErrorCode::Internal, "encoding the request failed")
                })?
        }
        _ => payload,
    };
    Ok((format!("http://127.0.0.1:{}{path}", server.port), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, port: u16, kind: ServiceKind, models: &[&str]) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            port,
            health_path: None,
            kind,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn payload(json: &str) -> Payload {
        Payload::from_json(json.to_owned()).expect("json")
    }

    fn query(model: Option<&str>) -> CapabilityQuery {
        CapabilityQuery::new("llm.chat", None)
            .and_then(|q| q.for_model(model))
            .expect("query")
    }

    #[test]
    fn every_listed_model_is_offered_as_chat_and_embeddings() {
        let services = [
            service("web", 80, ServiceKind::Http, &[]),
            service("llama", 8080, ServiceKind::OpenAi, &["qwen", "llama"]),
            service("down", 8081, ServiceKind::OpenAi, &[]),
            service("vllm", 8000, ServiceKind::OpenAi, &["qwen", "bge-m3"]),
        ];
        let served = offers(&services, &BTreeSet::new());
        let offered: Vec<String> = served.iter().map(|s| s.offer.to_string()).collect();
        assert_eq!(offered, ["llm.chat:1.0.0", "embeddings:1.0.0"]);
        for s in &served {
            assert_eq!(s.offer.models, ["bge-m3", "llama", "qwen"]);
            let Serve::Models { servers, .. } = &s.serve else {
                panic!("served by the model servers");
            };
            let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(
                names,
                ["llama", "vllm"],
                "a server listing nothing is left out"
            );
        }
        assert!(!served[0].offer.idempotent && served[1].offer.idempotent);
        let disabled = ["llm.chat".to_owned()].into();
        let only: Vec<String> = offers(&services, &disabled)
            .iter()
            .map(|s| s.offer.protocol.clone())
            .collect();
        assert_eq!(only, ["embeddings"]);
        assert!(offers(&services[..1], &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_request_goes_to_the_first_server_listing_its_model() {
        let servers = [
            ModelServer {
                name: "a".into(),
                port: 1,
                models: vec!["x".into()],
            },
            ModelServer {
                name: "b".into(),
                port: 2,
                models: vec!["x".into(), "y".into()],
            },
        ];
        let path = "/v1/chat/completions";
        let (url, sent) = prepare(
            path,
            &servers,
            &query(None),
            payload(r#"{"model":"y","n":1}"#),
        )
        .expect("y");
        assert_eq!(url, "http://127.0.0.1:2/v1/chat/completions");
        assert_eq!(sent.get(), r#"{"model":"y","n":1}"#, "sent as it came");
        let (url, sent) = prepare(path, &servers, &query(Some("x")), payload(r#"{"n":1}"#))
            .expect("model from the query");
        assert_eq!(url, "http://127.0.0.1:1/v1/chat/completions");
        let sent: Value = serde_json::from_str(sent.get()).expect("json");
        assert_eq!(sent["model"], "x");
        let (url, _) = prepare(path, &servers, &query(None), payload("{}")).expect("no model");
        assert_eq!(url, "http://127.0.0.1:1/v1/chat/completions");
    }

    #[test]
    fn unservable_requests_are_refused_before_a_server_sees_them() {
        let servers = [ModelServer {
            name: "a".into(),
            port: 1,
            models: vec!["x".into()],
        }];
        let path = "/v1/chat/completions";
        let code = |q: CapabilityQuery, p: &str| {
            prepare(path, &servers, &q, payload(p))
                .expect_err("refused")
                .code
        };
        assert_eq!(code(query(None), "[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(query(None), r#""text""#), ErrorCode::BadRequest);
        assert_eq!(
            code(query(None), r#"{"model":"x","stream":true}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(query(Some("x")), r#"{"model":"z"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(query(None), r#"{"model":"z","model":"x"}"#),
            ErrorCode::BadRequest,
            "a model named twice"
        );
        assert_eq!(
            code(query(Some("z")), r#"{"n":1}"#),
            ErrorCode::NoCapableDevice
        );
        assert!(prepare(
            path,
            &servers,
            &query(None),
            payload(r#"{"model":"x","stream":false}"#)
        )
        .is_ok());
    }
}
