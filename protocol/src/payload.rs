//! A capability's payload: JSON the hub passes on without looking inside.
//!
//! The hub only ever forwards a payload, from the asker to the serving device and the
//! answer back, so parsing it into a tree and printing it again (twice per round
//! trip) was pure cost. A [`Payload`] keeps the JSON text as it arrived, checked to be
//! valid JSON, and writes it out as it is.

use std::fmt;

use serde::de::{self, DeserializeSeed as _, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// The name under which serde_json hands a value over as its raw text instead of
/// parsing it. A test below fails if serde_json ever stops doing so.
const RAW_TOKEN: &str = "$serde_json::private::RawValue";

/// Valid JSON text, kept as it was received.
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The payload parsed, for code that needs to look inside (built-in capabilities,
    /// the CLI printing an answer).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.get()).unwrap_or(serde_json::Value::Null)
    }

    /// Checks that `text` is JSON and keeps it as it is.
    pub fn from_json(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Payload)
    }

    /// The payload of a JSON value.
    pub fn from_value(value: &serde_json::Value) -> Self {
        // A `Value` always prints as valid JSON.
        serde_json::value::to_raw_value(value)
            .map(Payload)
            .unwrap_or_default()
    }
}

impl Default for Payload {
    /// `null`, as an absent payload reads.
    fn default() -> Self {
        Payload(Box::<RawValue>::default())
    }
}

impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Self {
        Payload::from_value(&value)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// Two payloads are equal when they hold the same JSON value, however it was spaced.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    /// Straight from JSON text the payload is taken as it is. Inside a message that
    /// serde buffers first (an internally tagged or flattened one), the raw text is
    /// gone; the value is read and printed again instead.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PayloadVisitor;

        impl<'de> Visitor<'de> for PayloadVisitor {
            type Value = Payload;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any valid JSON value")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Payload, M::Error> {
                // serde_json's answer to the raw token: one entry, the token and the text.
                match map.next_key::<String>()? {
                    Some(key) if key == RAW_TOKEN => {
                        let raw: Box<RawValue> = map.next_value_seed(RawText)?;
                        // Read it once as the general way does, keeping nothing, so
                        // that a frame decodes the same both ways.
                        let mut reader = serde_json::Deserializer::from_str(raw.get());
                        Strict::check()
                            .deserialize(&mut reader)
                            .and_then(|_| reader.end())
                            .map_err(de::Error::custom)?;
                        Ok(Payload(raw))
                    }
                    _ => Err(de::Error::custom("unexpected raw value")),
                }
            }

            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<Payload, D::Error> {
                let value = Strict::keep().deserialize(deserializer)?;
                Ok(Payload::from_value(&value.unwrap_or_default()))
            }
        }

        deserializer.deserialize_newtype_struct(RAW_TOKEN, PayloadVisitor)
    }
}

/// Deepest nesting of arrays and objects in a payload: well inside serde_json's limit
/// for a whole frame, so a payload is refused for its depth alike, however it is read.
pub const MAX_DEPTH: usize = 100;

/// Reads one JSON value under the rules every decoder of a payload applies alike:
/// numbers that fit an `f64`, no object key that is serde_json's reserved token, at
/// most [`MAX_DEPTH`] levels. The direct path checks the raw text with it (keeping
/// nothing); the general path builds the value with it.
struct Strict {
    depth: usize,
    keep: bool,
}

impl Strict {
    fn check() -> Self {
        Strict {
            depth: 0,
            keep: false,
        }
    }

    fn keep() -> Self {
        Strict {
            depth: 0,
            keep: true,
        }
    }

    fn deeper<E: de::Error>(&self) -> Result<Self, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "the payload nests more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
            keep: self.keep,
        })
    }

    fn leaf<E>(
        &self,
        value: impl FnOnce() -> serde_json::Value,
    ) -> Result<Option<serde_json::Value>, E> {
        Ok(self.keep.then(value))
    }
}

impl<'de> de::DeserializeSeed<'de> for Strict {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.leaf(|| v.into())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.leaf(|| serde_json::Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.leaf(|| serde_json::Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let inner = self.deeper()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Strict { ..inner })? {
            items.extend(item);
        }
        self.leaf(|| items.into())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let inner = self.deeper()?;
        let mut entries = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == RAW_TOKEN {
                return Err(de::Error::custom(
                    "a payload may not use serde_json's reserved key",
                ));
            }
            if let Some(value) = map.next_value_seed(Strict { ..inner })? {
                entries.insert(key, value);
            }
        }
        self.leaf(|| entries.into())
    }
}

/// The raw text serde_json hands over, kept as a `RawValue`.
struct RawText;

impl<'de> de::DeserializeSeed<'de> for RawText {
    type Value = Box<RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        struct TextVisitor;

        impl Visitor<'_> for TextVisitor {
            type Value = Box<RawValue>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("raw JSON text")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                RawValue::from_string(s.to_owned()).map_err(de::Error::custom)
            }

            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                RawValue::from_string(s).map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Serialize, Deserialize)]
    struct Plain {
        id: u64,
        payload: Payload,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Tagged {
        Ask {
            id: u64,
            #[serde(default)]
            payload: Payload,
        },
    }

    #[test]
    fn straight_from_json_the_text_is_kept_as_sent() {
        let frame = r#"{"id":7,"payload":{ "b" : [1, 2.50, "x\u0041"], "a":null }}"#;
        let p: Plain = serde_json::from_str(frame).expect("decodes");
        assert_eq!(
            p.payload.get(),
            r#"{ "b" : [1, 2.50, "x\u0041"], "a":null }"#
        );
        assert_eq!(
            serde_json::to_string(&p).expect("encodes"),
            r#"{"id":7,"payload":{ "b" : [1, 2.50, "x\u0041"], "a":null }}"#
        );
    }

    #[test]
    fn inside_buffered_messages_the_value_survives() {
        let frame = r#"{"payload":{"text":"héllo","n":[1,2]},"id":3,"type":"ask"}"#;
        let Tagged::Ask { id, payload } = serde_json::from_str(frame).expect("decodes");
        assert_eq!(id, 3);
        assert_eq!(payload.to_value(), json!({"text": "héllo", "n": [1, 2]}));
        let absent: Tagged = serde_json::from_str(r#"{"type":"ask","id":1}"#).expect("decodes");
        let Tagged::Ask { payload, .. } = absent;
        assert_eq!(payload.get(), "null");
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(serde_json::from_str::<Plain>(r#"{"id":1,"payload":{"a":}}"#).is_err());
        assert!(Payload::from_json("{\"a\":".into()).is_err());
        assert_eq!(
            Payload::from_json(" [1] ".into()).expect("json").to_value(),
            json!([1])
        );
    }

    /// Both ways of reading a payload: straight from the text, and buffered first.
    fn both_ways(payload: &str) -> (Result<Payload, String>, Result<Payload, String>) {
        let plain = format!(r#"{{"id":1,"payload":{payload}}}"#);
        let tagged = format!(r#"{{"type":"ask","id":1,"payload":{payload}}}"#);
        (
            serde_json::from_str::<Plain>(&plain)
                .map(|p| p.payload)
                .map_err(|e| e.to_string()),
            serde_json::from_str::<Tagged>(&tagged)
                .map(|Tagged::Ask { payload, .. }| payload)
                .map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn what_one_way_refuses_the_other_refuses_too() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for (payload, why) in [
            ("[1e400]", "number out of range"),
            ("{\"a\":-1e309}", "number out of range"),
            (r#"{"$serde_json::private::RawValue":"1"}"#, "reserved key"),
            (
                r#"{"a":{"$serde_json::private::RawValu\u0065":"{"}}"#,
                "reserved key",
            ),
            (deep(MAX_DEPTH + 1).as_str(), "nests more than"),
        ] {
            let (straight, buffered) = both_ways(payload);
            for (way, got) in [("straight", straight), ("buffered", buffered)] {
                let e = got.expect_err(payload);
                assert!(e.contains(why), "{way} {payload}: {e}");
            }
        }
        let (straight, buffered) = both_ways(&deep(MAX_DEPTH));
        assert_eq!(straight.expect("straight"), buffered.expect("buffered"));
    }

    #[test]
    fn equal_values_are_equal_payloads() {
        let a = Payload::from_json(r#"{"a":1,"b":2}"#.into()).expect("json");
        let b = Payload::from_json(r#"{ "b": 2, "a": 1 }"#.into()).expect("json");
        assert_eq!(a, b);
        assert_ne!(a, Payload::from_value(&json!({"a": 2})));
    }
}
