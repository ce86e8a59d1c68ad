//! Capabilities: what a device offers (`embeddings:1.2.0`) and what a caller asks for
//! (`embeddings:1.0.0`), with the one compatibility rule every side applies.
//!
//! A request matches an offer of the same protocol when the versions share the major
//! number and the offer is at least the requested version: an offer of `1.4.0` serves
//! a request for `1.2.0`, never one for `2.0.0` or `1.5.0`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest protocol name accepted.
pub const MAX_PROTOCOL_LEN: usize = 64;

/// A protocol name that is not 1-64 characters of `[a-z0-9._-]`, starting with a
/// letter or digit, or a version that is not semver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The protocol name is malformed.
    #[error("protocol name {0:?} must be 1-64 of [a-z0-9._-], starting with a letter or digit")]
    Protocol(String),
    /// The version is not `MAJOR[.MINOR[.PATCH]]`.
    #[error("version {0:?} is not a semantic version (MAJOR.MINOR.PATCH)")]
    Version(String),
    /// Not `PROTOCOL:VERSION`.
    #[error("capability {0:?} is not PROTOCOL:VERSION")]
    Shape(String),
    /// A model name or list that cannot be routed by.
    #[error("{0}")]
    Models(String),
}

/// Checks a protocol name; returns it unchanged when it is valid.
pub fn validate_protocol(name: &str) -> Result<&str, CapabilityError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PROTOCOL_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        });
    if ok {
        Ok(name)
    } else {
        Err(CapabilityError::Protocol(name.chars().take(80).collect()))
    }
}

/// Parses `1`, `1.2` or `1.2.3` (pre-release and build parts allowed on the full form).
pub fn parse_version(s: &str) -> Result<semver::Version, CapabilityError> {
    let s = s.trim();
    let err = || CapabilityError::Version(s.chars().take(40).collect());
    let dots = s.bytes().filter(|b| *b == b'.').count();
    let padded = match dots {
        0 if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => format!("{s}.0.0"),
        1 if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') => format!("{s}.0"),
        _ => s.to_owned(),
    };
    semver::Version::parse(&padded).map_err(|_| err())
}

/// A capability a device offers, with how the hub may treat requests for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CapabilityOffer {
    /// Protocol name, e.g. `embeddings`.
    pub protocol: String,
    /// The version served.
    #[serde(serialize_with = "version_text")]
    pub version: semver::Version,
    /// Whether a request may be sent twice: the hub retries an idempotent request once
    /// on the next device when the first one fails before answering.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
    /// The models behind an offer backed by model servers (`llm.chat`, `embeddings`),
    /// so a request naming a model reaches only devices that have it. Empty makes no
    /// claim: such an offer serves a request for any model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

/// Most model names one offer may list (a device may run several model servers).
pub const MAX_OFFER_MODELS: usize = 1024;

/// Whether `name` may be a model name: 1 to [`crate::MAX_MODEL_NAME`] bytes, not blank,
/// without control characters, so it is safe to show and to route by.
pub fn valid_model_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= crate::MAX_MODEL_NAME
        && !name.chars().any(char::is_control)
}

impl CapabilityOffer {
    /// A non-idempotent offer.
    pub fn new(protocol: &str, version: &str) -> Result<Self, CapabilityError> {
        Ok(CapabilityOffer {
            protocol: validate_protocol(protocol)?.to_owned(),
            version: parse_version(version)?,
            idempotent: false,
            models: Vec::new(),
        })
    }

    /// The same offer listing `models`, which must be valid names, at most
    /// [`MAX_OFFER_MODELS`] of them.
    pub fn with_models(mut self, models: Vec<String>) -> Result<Self, CapabilityError> {
        if models.len() > MAX_OFFER_MODELS {
            return Err(CapabilityError::Models(format!(
                "{} models, more than {MAX_OFFER_MODELS}",
                models.len()
            )));
        }
        if let Some(bad) = models.iter().find(|m| !valid_model_name(m)) {
            return Err(CapabilityError::Models(format!(
                "model name {:?} is blank, longer than {} bytes or holds control characters",
                bad.chars().take(40).collect::<String>(),
                crate::MAX_MODEL_NAME
            )));
        }
        self.models = models;
        Ok(self)
    }

    /// Whether this offer can serve `query`.
    pub fn serves(&self, query: &CapabilityQuery) -> bool {
        self.protocol == query.protocol
            && query
                .version
                .as_ref()
                .is_none_or(|want| compatible(&self.version, want))
            && query
                .model
                .as_ref()
                .is_none_or(|m| self.models.is_empty() || self.models.iter().any(|have| have == m))
    }

    /// Whether this offer names the model `query` asks for, which makes it a better
    /// match than an offer that makes no claim.
    fn lists_model(&self, query: &CapabilityQuery) -> bool {
        query
            .model
            .as_ref()
            .is_some_and(|m| self.models.iter().any(|have| have == m))
    }
}

/// The newest of `offers` that serves `query` (among equals, one that lists the
/// model asked for): what a device answers with, and what the hub shows and routes by.
pub fn best_offer<'a>(
    offers: impl IntoIterator<Item = &'a CapabilityOffer>,
    query: &CapabilityQuery,
) -> Option<&'a CapabilityOffer> {
    offers
        .into_iter()
        .filter(|o| o.serves(query))
        .max_by(|a, b| {
            a.version
                .cmp(&b.version)
                .then_with(|| a.lists_model(query).cmp(&b.lists_model(query)))
        })
}

/// Whether a device offering `offered` may serve a request for `wanted`: same major,
/// and at least the requested version.
pub fn compatible(offered: &semver::Version, wanted: &semver::Version) -> bool {
    offered.major == wanted.major && offered >= wanted
}

impl fmt::Display for CapabilityOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol, self.version)
    }
}

impl FromStr for CapabilityOffer {
    type Err = CapabilityError;
    fn from_str(s: &str) -> Result<Self, CapabilityError> {
        let (protocol, version) = split(s)?;
        CapabilityOffer::new(protocol, version)
    }
}

fn split(s: &str) -> Result<(&str, &str), CapabilityError> {
    s.trim()
        .split_once([':', '@'])
        .ok_or_else(|| CapabilityError::Shape(s.chars().take(80).collect()))
}

/// Offers arrive either as `"protocol:version"` (the first protocol version's form)
/// or as objects; both are checked, so a malformed offer never reaches the registry.
impl<'de> Deserialize<'de> for CapabilityOffer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Object {
                protocol: String,
                version: String,
                #[serde(default)]
                idempotent: bool,
                #[serde(default)]
                models: Vec<String>,
            },
        }
        match Wire::deserialize(d)? {
            Wire::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Wire::Object {
                protocol,
                version,
                idempotent,
                models,
            } => {
                let mut offer = CapabilityOffer::new(&protocol, &version)
                    .and_then(|o| o.with_models(models))
                    .map_err(serde::de::Error::custom)?;
                offer.idempotent = idempotent;
                Ok(offer)
            }
        }
    }
}

/// What a caller asks for: a protocol and, optionally, the least version it needs and
/// the model that must serve it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CapabilityQuery {
    /// Protocol name.
    pub protocol: String,
    /// Least compatible version; `None` takes any version.
    #[serde(
        default,
        with = "opt_version_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<semver::Version>,
    /// The model that must serve it; only offers listing it, or listing none, match.
    #[serde(
        default,
        deserialize_with = "checked_model",
        skip_serializing_if = "Option::is_none"
    )]
    pub model: Option<String>,
}

impl CapabilityQuery {
    /// A checked query.
    pub fn new(protocol: &str, version: Option<&str>) -> Result<Self, CapabilityError> {
        Ok(CapabilityQuery {
            protocol: validate_protocol(protocol)?.to_owned(),
            version: version
                .filter(|v| !v.trim().is_empty())
                .map(parse_version)
                .transpose()?,
            model: None,
        })
    }

    /// The same query, served only by `model` (none when blank or absent).
    pub fn for_model(mut self, model: Option<&str>) -> Result<Self, CapabilityError> {
        self.model = match model.map(str::trim) {
            None | Some("") => None,
            Some(m) if valid_model_name(m) => Some(m.to_owned()),
            Some(m) => {
                return Err(CapabilityError::Models(format!(
                    "model name {:?} is longer than {} bytes or holds control characters",
                    m.chars().take(40).collect::<String>(),
                    crate::MAX_MODEL_NAME
                )))
            }
        };
        Ok(self)
    }
}

/// The `model` string of a payload that is a JSON object, as OpenAI-shaped requests
/// name their model; `None` for any other payload. A payload naming `model` twice is
/// refused: JSON readers disagree on which one counts, so the hub could route by one
/// and the model server read the other.
pub fn payload_model(payload: &crate::Payload) -> Result<Option<String>, CapabilityError> {
    match serde_json::from_str::<ModelField>(payload.get()) {
        Ok(ModelField::Twice) => Err(CapabilityError::Models(
            "the payload names \"model\" more than once".into(),
        )),
        Ok(ModelField::Once(model)) => Ok(model),
        Err(_) => Ok(None),
    }
}

/// What a payload says of its model, read without building the rest of it.
enum ModelField {
    /// Named at most once: its string, if it is one.
    Once(Option<String>),
    /// Named more than once.
    Twice,
}

impl<'de> Deserialize<'de> for ModelField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ModelVisitor)
    }
}

struct ModelVisitor;

impl<'de> serde::de::Visitor<'de> for ModelVisitor {
    type Value = ModelField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ModelField, A::Error> {
        let mut model: Option<Option<String>> = None;
        let mut twice = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "model" {
                let value: serde_json::Value = map.next_value()?;
                twice |= model.is_some();
                model = Some(value.as_str().map(str::to_owned));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(if twice {
            ModelField::Twice
        } else {
            ModelField::Once(model.flatten())
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ModelField, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(ModelField::Once(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }

    fn visit_unit<E>(self) -> Result<ModelField, E> {
        Ok(ModelField::Once(None))
    }
}

fn checked_model<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(m) if !valid_model_name(&m) => Err(serde::de::Error::custom(
            "model name is blank, too long or holds control characters",
        )),
        other => Ok(other),
    }
}

impl fmt::Display for CapabilityQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}:{v}", self.protocol)?,
            None => f.write_str(&self.protocol)?,
        }
        match &self.model {
            Some(m) => write!(f, " with model {m:?}"),
            None => Ok(()),
        }
    }
}

/// Parses `PROTOCOL`, `PROTOCOL@VERSION` or `PROTOCOL:VERSION`.
impl FromStr for CapabilityQuery {
    type Err = CapabilityError;
    fn from_str(s: &str) -> Result<Self, CapabilityError> {
        match s.trim().split_once([':', '@']) {
            Some((p, v)) => CapabilityQuery::new(p, Some(v)),
            None => CapabilityQuery::new(s.trim(), None),
        }
    }
}

fn version_text<S: serde::Serializer>(v: &semver::Version, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

mod opt_version_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<semver::Version>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<semver::Version>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) if !s.trim().is_empty() => super::parse_version(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            _ => Ok(None),
        }
    }
}

/// The body of a capability request at the REST edges (the hub's
/// `POST /api/capabilities/{protocol}/request` and a cocoon's local API), so both read
/// and check it alike.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestBody {
    /// Least compatible version; any version when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Passed to the serving device as it is.
    #[serde(default)]
    pub payload: crate::Payload,
    /// A device id to try first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_device: Option<String>,
    /// The model that must serve it; when absent, the payload's own `model` field, if
    /// it has one, is routed by (as OpenAI-shaped payloads carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long to wait for the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl RequestBody {
    /// The query for `protocol` at the body's version.
    pub fn query(&self, protocol: &str) -> Result<CapabilityQuery, CapabilityError> {
        let query = CapabilityQuery::new(protocol, self.version.as_deref())?;
        match &self.model {
            Some(m) => query.for_model(Some(m)),
            None => query.for_model(payload_model(&self.payload)?.as_deref()),
        }
    }

    /// The preferred device, if one is named.
    pub fn prefer(&self) -> Result<Option<crate::DeviceId>, crate::InvalidId> {
        match self.prefer_device.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(raw) => raw.parse().map(Some),
        }
    }

    /// The deadline asked for (`default` when none), held to 1 ms..=`max`.
    pub fn deadline(
        &self,
        default: std::time::Duration,
        max: std::time::Duration,
    ) -> std::time::Duration {
        self.timeout_ms
            .map_or(default, std::time::Duration::from_millis)
            .clamp(std::time::Duration::from_millis(1), max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> CapabilityQuery {
        s.parse().expect("valid query")
    }

    fn offer(s: &str) -> CapabilityOffer {
        s.parse().expect("valid offer")
    }

    #[test]
    fn same_major_and_at_least_the_requested_version() {
        let o = offer("embeddings:1.2.0");
        assert!(o.serves(&q("embeddings:1.0.0")));
        assert!(o.serves(&q("embeddings@1.2")));
        assert!(o.serves(&q("embeddings")));
        assert!(!o.serves(&q("embeddings:1.3.0")), "older minor");
        assert!(!o.serves(&q("embeddings:2.0.0")), "other major");
        assert!(!o.serves(&q("embeddings:0.9.0")), "other major");
        assert!(!o.serves(&q("llm.chat:1.0.0")), "other protocol");
    }

    #[test]
    fn the_newest_serving_offer_is_chosen() {
        let offers = [
            offer("embeddings:1.2.0"),
            offer("embeddings:1.4.0"),
            offer("embeddings:2.0.0"),
        ];
        assert_eq!(best_offer(&offers, &q("embeddings:1.1")), Some(&offers[1]));
        assert_eq!(best_offer(&offers, &q("embeddings")), Some(&offers[2]));
        assert_eq!(best_offer(&offers, &q("embeddings:3")), None);
    }

    #[test]
    fn a_model_is_served_only_by_offers_listing_it_or_listing_none() {
        let listing = offer("llm.chat:1.0.0")
            .with_models(vec!["qwen".into(), "llama".into()])
            .expect("models");
        let any = offer("llm.chat:1.0.0");
        let for_model = |m: &str| q("llm.chat").for_model(Some(m)).expect("model");
        assert!(listing.serves(&for_model("qwen")));
        assert!(!listing.serves(&for_model("mistral")));
        assert!(listing.serves(&q("llm.chat")), "no model asked: any offer");
        assert!(any.serves(&for_model("mistral")), "an offer without a list");
        let offers = [any.clone(), listing.clone()];
        assert_eq!(best_offer(&offers, &for_model("qwen")), Some(&listing));
        assert_eq!(best_offer(&offers, &for_model("x")), Some(&any));
        assert_eq!(
            q("llm.chat").for_model(Some("  ")).expect("blank").model,
            None
        );
        assert!(q("llm.chat").for_model(Some("a\nb")).is_err());
        assert!(q("llm.chat").for_model(Some(&"m".repeat(257))).is_err());
        assert!(offer("x:1")
            .with_models(vec!["m".into(); MAX_OFFER_MODELS + 1])
            .is_err());
        assert!(offer("x:1").with_models(vec!["bell\u{7}".into()]).is_err());
        let wire: CapabilityOffer = serde_json::from_str(
            r#"{"protocol":"embeddings","version":"1.0.0","models":["bge-m3"]}"#,
        )
        .expect("object with models");
        assert_eq!(wire.models, ["bge-m3"]);
        assert!(serde_json::from_str::<CapabilityOffer>(
            r#"{"protocol":"e","version":"1","models":[""]}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<CapabilityQuery>(r#"{"protocol":"e","model":"a\u0000"}"#)
                .is_err()
        );
    }

    #[test]
    fn a_request_names_its_model_or_its_payload_does() {
        let body = |json: &str| -> RequestBody { serde_json::from_str(json).expect("body") };
        let model = |b: RequestBody| b.query("llm.chat").expect("query").model;
        assert_eq!(
            model(body(r#"{"payload":{"model":"qwen","messages":[]}}"#)),
            Some("qwen".into())
        );
        assert_eq!(
            model(body(r#"{"model":"llama","payload":{"model":"qwen"}}"#)),
            Some("llama".into()),
            "the request's own field first"
        );
        assert_eq!(model(body(r#"{"payload":{"model":7}}"#)), None);
        assert_eq!(model(body(r#"{"payload":[1]}"#)), None);
        assert_eq!(model(body(r#"{}"#)), None);
        assert_eq!(
            model(body(
                r#"{"payload":{"a":{"model":"inner"},"model":"x\u0079"}}"#
            )),
            Some("xy".into()),
            "the top-level field, escapes read"
        );
        assert!(
            body(r#"{"payload":{"model":"x","n":1,"model":"y"}}"#)
                .query("llm.chat")
                .is_err(),
            "a model named twice is ambiguous"
        );
        assert!(
            body(r#"{"model":"y","payload":{"model":"x","model":"y"}}"#)
                .query("llm.chat")
                .is_ok(),
            "the request's own field decides; the device refuses the payload"
        );
    }

    #[test]
    fn short_versions_are_padded_and_garbage_refused() {
        assert_eq!(
            parse_version("1").expect("ok"),
            semver::Version::new(1, 0, 0)
        );
        assert_eq!(
            parse_version("1.2").expect("ok"),
            semver::Version::new(1, 2, 0)
        );
        assert!(parse_version("one").is_err());
        assert!(parse_version("1..2").is_err());
        assert!(parse_version("").is_err());
        assert!(validate_protocol("Embeddings").is_err());
        assert!(validate_protocol("-x").is_err());
        assert!(validate_protocol(&"a".repeat(65)).is_err());
        assert!(validate_protocol("llm.chat").is_ok());
    }

    #[test]
    fn offers_read_both_wire_forms() {
        let from_text: CapabilityOffer = serde_json::from_str("\"tasks:1.0.0\"").expect("text");
        assert_eq!(from_text, offer("tasks:1.0.0"));
        let from_obj: CapabilityOffer = serde_json::from_str(
            r#"{"protocol":"embeddings","version":"1.2.0","idempotent":true,"extra":1}"#,
        )
        .expect("object");
        assert!(from_obj.idempotent);
        assert_eq!(from_obj.version, semver::Version::new(1, 2, 0));
        assert!(serde_json::from_str::<CapabilityOffer>("\"BAD:1\"").is_err());
        assert!(
            serde_json::from_str::<CapabilityOffer>(r#"{"protocol":"x","version":"v"}"#).is_err()
        );
        let back: CapabilityOffer =
            serde_json::from_str(&serde_json::to_string(&from_obj).expect("ser")).expect("de");
        assert_eq!(back, from_obj);
    }
}
