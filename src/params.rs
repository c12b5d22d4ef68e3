//! Tool parameters as real MCP clients send them, and the schema that tells them what to send.
//!
//! What mainstream clients do with a tool's input schema, and what they then send:
//! - Claude Code sends a parameter whose schema has no `type` as a JSON *string*
//!   (`"response_format": "{\"type\":\"json_object\"}"`): object and array parameters declare
//!   their type, and a string holding the right JSON is parsed, never forwarded as a string.
//! - Claude Desktop drops `["integer", "null"]` and `anyOf [X, null]` types and then sends
//!   values as strings: optional parameters are advertised without `null` (absent already
//!   means "not given", see [`strip_null`]); a value of the wrong type is refused by name.
//! - Warp sends whole-number floats for integers (`"max_tokens": 50.0`): JSON Schema's
//!   `integer` admits them (2020-12 validation §6.1.1: "a number with a zero fractional part"),
//!   so they are accepted; `50.5` is refused.
//!
//! The deserializers here produce messages that say what the value should be; the MCP layer
//! adds the parameter's name (see `mcp::Args`).

use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_json::Value;

/// An integer that may arrive as a whole-number float.
pub fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    d.deserialize_any(WholeNumber)
}

/// An optional [`whole_number`]; `null` is "not given".
pub fn optional_whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_option(OrNull(WholeNumber))
}

/// A number (an integer is a number too).
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(Number)
}

/// An optional [`number`]; `null` is "not given".
pub fn optional_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    d.deserialize_option(OrNull(Number))
}

/// A JSON object, or a string holding one.
pub fn optional_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    d.deserialize_option(OrNull(Object))
}

/// A string, an object, or a string holding an object (OpenAI's `tool_choice`: `"auto"` or
/// `{"type": "function", "function": {"name": ...}}`).
pub fn optional_string_or_object<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Value>, D::Error> {
    d.deserialize_option(OrNull(StringOrObject))
}

/// An array of objects, or a string holding one.
pub fn objects<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    d.deserialize_any(Objects)
}

/// An optional [`objects`].
pub fn optional_objects<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Value>>, D::Error> {
    d.deserialize_option(OrNull(Objects))
}

/// Schema of a parameter that is a string or an object.
pub struct StringOrObjectSchema;

impl JsonSchema for StringOrObjectSchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StringOrObject".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "object"]})
    }
}

/// Schema of an array of objects (`items` typed, so no client sends them as strings).
pub struct ObjectsSchema;

impl JsonSchema for ObjectsSchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Objects".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "array", "items": {"type": "object"}})
    }
}

/// Schema of a JSON object.
pub struct ObjectSchema;

impl JsonSchema for ObjectSchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Object".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "object"})
    }
}

/// Removes `null` from the type of every property of an object schema: `["integer", "null"]`
/// becomes `"integer"` and `anyOf [X, {"type": "null"}]` becomes `X`. Claude Desktop drops such
/// types and then sends the values as strings; an optional parameter is one a client may leave
/// out, and `null` is still accepted as "not given".
pub fn strip_null(schema: &mut Schema) {
    let Some(properties) = schema
        .as_object_mut()
        .and_then(|s| s.get_mut("properties"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for property in properties.values_mut() {
        let Some(property) = property.as_object_mut() else {
            continue;
        };
        if let Some(Value::Array(types)) = property.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types.remove(0);
                property.insert("type".into(), only);
            }
        }
        if let Some(Value::Array(any_of)) = property.get_mut("anyOf") {
            any_of.retain(|s| s.get("type").and_then(Value::as_str) != Some("null"));
            if any_of.len() == 1
                && let Some(Value::Object(only)) = any_of.pop()
            {
                property.remove("anyOf");
                for (key, value) in only {
                    property.entry(key).or_insert(value);
                }
            }
        }
        if property.get("default") == Some(&Value::Null) {
            property.remove("default");
        }
    }
}

/// `null` as `None`, anything else through the inner visitor.
struct OrNull<V>(V);

impl<'de, V: Visitor<'de> + Copy> Visitor<'de> for OrNull<V> {
    type Value = Option<V::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self.0).map(Some)
    }
}

#[derive(Clone, Copy)]
struct WholeNumber;

impl<'de> Visitor<'de> for WholeNumber {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer (a JSON number such as 50)")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        // -2^63 is exactly representable; from +2^63 up a value does not fit.
        let min = i64::MIN as f64;
        if v.fract() == 0.0 && v >= min && v < -min {
            Ok(v as i64)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

#[derive(Clone, Copy)]
struct Number;

impl<'de> Visitor<'de> for Number {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number (a JSON number such as 0.7)")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }
}

#[derive(Clone, Copy)]
struct Object;

impl<'de> Visitor<'de> for Object {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object such as {\"type\": \"json_object\"}")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        de::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map)).map(Value::Object)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        match serde_json::from_str::<Value>(v) {
            Ok(value @ Value::Object(_)) => Ok(value),
            _ => Err(E::invalid_type(Unexpected::Str(v), &self)),
        }
    }
}

#[derive(Clone, Copy)]
struct StringOrObject;

impl<'de> Visitor<'de> for StringOrObject {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string such as \"auto\" or a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        Object.visit_map(map)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        if v.trim_start().starts_with('{') {
            return Object.visit_str(v);
        }
        Ok(Value::String(v.to_string()))
    }
}

#[derive(Clone, Copy)]
struct Objects;

impl<'de> Visitor<'de> for Objects {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of JSON objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            out.push(object_item(item, out.len(), &self)?);
        }
        Ok(out)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<Value>, E> {
        match serde_json::from_str::<Value>(v) {
            Ok(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| object_item(item, i, &self))
                .collect(),
            _ => Err(E::invalid_type(Unexpected::Str(v), &self)),
        }
    }
}

/// One item of an array of objects; a string holding an object is parsed.
fn object_item<E: de::Error>(item: Value, index: usize, exp: &Objects) -> Result<Value, E> {
    match item {
        Value::Object(_) => Ok(item),
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(value @ Value::Object(_)) => Ok(value),
            _ => Err(E::custom(format_args!(
                "item {index} is the string {s:?}, not a JSON object; expected {}",
                Expecting(exp)
            ))),
        },
        other => Err(E::custom(format_args!(
            "item {index} is {}, not a JSON object; expected {}",
            describe(&other),
            Expecting(exp)
        ))),
    }
}

struct Expecting<'a, V>(&'a V);

impl<'de, V: Visitor<'de>> fmt::Display for Expecting<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
