//! The checks each fuzz target runs on one input, apart from libFuzzer so that the
//! workspace's tests run them too, on every seed and every input that once failed
//! (`seeds/` and `regressions/`, one folder per target).
//!
//! Each check decodes bytes the way the project reads them from the network or disk and
//! asserts what a caller relies on; a panic is a finding.

#![forbid(unsafe_code)]

use std::path::Path;

use adi_cocoon::models::{parse_models, MAX_ANSWER_BYTES};
use adi_cocoon::plugins::{parse_manifest, ModelServer, Serve};
use adi_cocoon::{config_file, services};
use adi_mux::Streams;
use adi_protocol::client::{ClientToHub, HubToClient};
use adi_protocol::exchange::{read_request, read_response, request_head, RequestHead};
use adi_protocol::http::{check_target, normalize_target};
use adi_protocol::{
    decode, decode_device_frame, decode_hub_frame, encode, frame, DecodeError, HubToDevice,
    DEFAULT_MAX_FRAME_BYTES,
};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A check: decodes one input and panics on a finding.
pub type Check = fn(&[u8]);

/// Every check by its target name, for the corpus tests.
pub const CHECKS: &[(&str, Check)] = &[
    ("device_frame", device_frame),
    ("hub_frame", hub_frame),
    ("client_message", client_message),
    ("mux_frames", mux_frames),
    ("proxy_head", proxy_head),
    ("request_target", request_target),
    ("plugin_manifest", plugin_manifest),
    ("cocoon_toml", cocoon_toml),
    ("cluster_message", cluster_message),
    ("openai_models", openai_models),
    ("model_request", model_request),
];

/// A frame a device sent, as the hub reads it: the direct reader of the hot frames must
/// give the general decoder's answer, and every message decoded must survive its own
/// encoding unchanged.
pub fn device_frame(data: &[u8]) {
    direct_is_general(data, decode_device_frame);
}

/// A frame the hub sent, as a device reads it, held to the same as [`device_frame`].
pub fn hub_frame(data: &[u8]) {
    direct_is_general(data, decode_hub_frame);
}

/// The direct reader and the general decoder agree, and what decodes round-trips. The
/// direct reader takes text, as the frames it reads are WebSocket text frames.
fn direct_is_general<T>(data: &[u8], direct: fn(&str, usize) -> Result<T, DecodeError>)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    round_trip::<T>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fast = direct(text, DEFAULT_MAX_FRAME_BYTES);
    let general = decode::<T>(data, DEFAULT_MAX_FRAME_BYTES);
    match (&fast, &general) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the direct reader differs from the general one"),
        (Err(_), Err(_)) => {}
        _ => panic!("direct {fast:?} but general {general:?}"),
    }
}

/// A message that decodes survives its own encoding unchanged.
fn round_trip<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = decode::<T>(data, DEFAULT_MAX_FRAME_BYTES) {
        let text = encode(&message);
        let again: T = decode(text.as_bytes(), usize::MAX).expect("own encoding decodes");
        assert_eq!(again, message, "a message changed through its own encoding");
    }
}

/// The messages of a person's client socket, both ways: decoding arbitrary bytes never
/// panics, and every message decoded survives its own encoding unchanged.
pub fn client_message(data: &[u8]) {
    round_trip::<ClientToHub>(data);
    round_trip::<HubToClient>(data);
}

/// What one hub of a cluster reads from another: beats and presence changes from NATS,
/// device requests and their answers over HTTP. Decoding arbitrary bytes never panics,
/// and every message decoded survives its own encoding unchanged.
pub fn cluster_message(data: &[u8]) {
    use adi_protocol::cluster::{Beat, Presence, Rpc, RpcAnswer};
    json_round_trip::<Beat>(data);
    json_round_trip::<Presence>(data);
    json_round_trip::<Rpc>(data);
    json_round_trip::<RpcAnswer>(data);
}

/// A JSON document that decodes as `T` survives its own encoding unchanged.
fn json_round_trip<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec(&message).expect("a decoded message encodes");
        let again: T = serde_json::from_slice(&bytes).expect("own encoding decodes");
        assert_eq!(again, message, "a message changed through its own encoding");
    }
}

/// A run of binary frames from a peer, as the stream multiplexer meets them: each is
/// decoded (a length byte pair before each frame in the input), and those that decode
/// are routed through a table with a few open streams. Nothing may panic, and the
/// table never grows past the streams this side opened.
pub fn mux_frames(data: &[u8]) {
    let (outbound, mut written) = tokio::sync::mpsc::channel(1024);
    let streams = Streams::new(outbound);
    let open: Vec<_> = (0..4).map(|id| streams.open(id)).collect();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let take = len.min(rest.len() - 2);
        let bytes = Bytes::copy_from_slice(&rest[2..2 + take]);
        rest = &rest[2 + take..];
        if let Ok(f) = frame::decode(bytes) {
            if f.kind == frame::Kind::Whole {
                let (head, body) = f.split_whole();
                assert_eq!(head.len() + body.len() + 4, f.payload.len());
            }
            streams.on_frame(f);
        }
    }
    while let Ok(sent) = written.try_recv() {
        frame::decode(sent).expect("the table writes only frames that decode");
    }
    assert!(
        streams.len() <= open.len(),
        "a peer's frame opened a stream"
    );
    drop(open);
    streams.close_all();
}

/// A whole frame carrying a proxied exchange's head, as each end reads it: the request
/// head a device reads and the response head the hub reads. A request that decodes
/// must encode back to a head that reads the same.
pub fn proxy_head(data: &[u8]) {
    let Ok(whole) = frame::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = read_response(&whole);
    let Ok(request) = read_request(&whole) else {
        return;
    };
    match request_head(request.clone(), DEFAULT_MAX_FRAME_BYTES) {
        Ok(RequestHead::Whole(bytes)) => {
            let again = frame::decode(bytes).expect("own whole frame decodes");
            assert_eq!(read_request(&again).expect("own head reads"), request);
        }
        Ok(RequestHead::Message(text)) => {
            let message: HubToDevice =
                decode(text.as_bytes(), usize::MAX).expect("own message decodes");
            assert!(
                matches!(message, HubToDevice::ProxyRequest(_)),
                "{message:?}"
            );
        }
        Err(_) => {}
    }
}

/// A proxied request's target (path and query) as the hub checks and normalises it
/// before a service sees it: the result starts with `/`, holds no `.` or `..`
/// segment, is its own normal form, and passes the check again.
pub fn request_target(data: &[u8]) {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let normal = normalize_target(target);
    assert!(normal.starts_with('/'), "{normal:?}");
    assert_eq!(normalize_target(&normal), normal, "not idempotent");
    let path = normal.split_once('?').map_or(normal.as_str(), |(p, _)| p);
    for segment in path.split('/') {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        assert!(
            decoded != "." && decoded != "..",
            "{normal:?} keeps a dot segment"
        );
    }
    if let Ok(checked) = check_target(target) {
        assert_eq!(checked, normal);
        assert_eq!(check_target(&checked).ok(), Some(checked.clone()));
    }
}

/// A plugin manifest's text as the cocoon reads it: never a panic, every capability it
/// accepts names a valid protocol and is served by a loopback URL or a program, and
/// every OpenAI-compatible server or raw TCP service it accepts is a service the proxy
/// can reach.
pub fn plugin_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(declared) = parse_manifest(text, Path::new("/plugins/fuzz.toml")) else {
        return;
    };
    assert!(
        !(declared.served.is_empty() && declared.services.is_empty()),
        "a manifest that declares nothing was accepted"
    );
    for s in &declared.services {
        let info = &s.service;
        assert!(info.port != 0 && info.models.is_empty());
        let checked = match info.kind {
            adi_protocol::ServiceKind::OpenAi => services::openai(&info.name, info.port),
            adi_protocol::ServiceKind::Tcp => services::tcp(&info.name, info.port),
            adi_protocol::ServiceKind::Http => panic!("a manifest declared an HTTP service"),
        };
        assert_eq!(checked.as_ref(), Ok(info), "the one service check");
    }
    assert!(
        services::unique(
            &declared
                .services
                .iter()
                .map(|s| s.service.clone())
                .collect::<Vec<_>>()
        )
        .is_ok(),
        "a manifest naming one service twice was accepted"
    );
    for s in declared.served {
        adi_protocol::capability::validate_protocol(&s.offer.protocol).expect("valid protocol");
        match s.serve {
            Serve::Http(url) => assert!(url.starts_with("http"), "{url}"),
            Serve::Command { argv, .. } => assert!(!argv[0].trim().is_empty()),
            Serve::Builtin => panic!("a manifest cannot declare a built-in"),
            Serve::Models { .. } => panic!("a manifest cannot declare a model offer"),
        }
    }
}

/// `cocoon.toml` as the cocoon reads it at start: never a panic, and each service it
/// declares is either refused by the one service check or comes out usable.
pub fn cocoon_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = config_file::parse(text) else {
        return;
    };
    for s in file.services {
        if let Ok(info) = services::check(&s.name, s.port, s.health.as_deref()) {
            assert!(info.port != 0);
            assert!(info.health_path.is_none_or(|p| p.starts_with('/')));
        }
    }
    for s in &file.openai {
        if let Ok(info) = services::parse_openai(s) {
            assert!(info.port != 0 && info.health_path.is_none());
        }
    }
    for s in &file.tcp {
        if let Ok(info) = services::parse_tcp(s) {
            assert!(info.port != 0 && info.health_path.is_none());
            assert_eq!(info.kind, adi_protocol::ServiceKind::Tcp);
        }
    }
}

/// An OpenAI-compatible server's `GET /v1/models` answer as the cocoon reads it: never a
/// panic, and what it offers the hub is within the protocol's limits: at most
/// `MAX_MODELS` distinct names, sorted, each non-empty, at most `MAX_MODEL_NAME` bytes,
/// without control characters.
pub fn openai_models(data: &[u8]) {
    let Ok(list) = parse_models(data) else {
        return;
    };
    assert!(data.len() <= MAX_ANSWER_BYTES);
    assert!(list.models.len() <= adi_protocol::MAX_MODELS);
    assert!(
        list.models.windows(2).all(|w| w[0] < w[1]),
        "sorted, distinct"
    );
    for m in &list.models {
        assert!(!m.trim().is_empty() && m.len() <= adi_protocol::MAX_MODEL_NAME);
        assert!(!m.chars().any(char::is_control), "{m:?}");
    }
}

/// A capability request for a model, as the cocoon prepares it for its model servers
/// (the first byte picks the model the query names, the rest is the payload): never a
/// panic, and what goes out is a JSON object for a server that lists its model, with
/// that model named in it, never asking for a stream.
pub fn model_request(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(payload) = adi_protocol::Payload::from_json(text.to_owned()) else {
        return;
    };
    let servers = [
        ModelServer {
            name: "a".into(),
            port: 1001,
            models: vec!["x".into()],
        },
        ModelServer {
            name: "b".into(),
            port: 1002,
            models: vec!["x".into(), "y".into()],
        },
    ];
    let asked = match pick % 4 {
        0 => None,
        1 => Some("x"),
        2 => Some("y"),
        _ => Some("z"),
    };
    let Ok(query) =
        adi_protocol::CapabilityQuery::new("llm.chat", None).and_then(|q| q.for_model(asked))
    else {
        return;
    };
    let Ok((url, sent)) =
        adi_cocoon::model_offers::prepare("/v1/chat/completions", &servers, &query, payload)
    else {
        return;
    };
    let body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(sent.get()).expect("a JSON object goes out");
    assert!(
        body.get("stream")
            .is_none_or(|s| s == &serde_json::Value::Bool(false)),
        "{body:?}"
    );
    let model = body.get("model").and_then(|m| m.as_str());
    if let Some(asked) = asked {
        assert_eq!(model, Some(asked), "the asked model is named");
    }
    let port = match model {
        Some(m) => servers
            .iter()
            .find(|s| s.models.iter().any(|have| have == m))
            .map(|s| s.port),
        None => Some(servers[0].port),
    };
    assert_eq!(
        Some(url),
        port.map(|p| format!("http://127.0.0.1:{p}/v1/chat/completions"))
    );
}
