//! Strict JSON for everything knib reads back: a key given twice in one
//! object is an error, wherever it is (a struct, a map, a
//! `serde_json::Value`, a nested object).
//!
//! serde_json keeps the last of two equal keys when it builds a map or a
//! `Value`, and serde's derive only notices a repeated field of a struct in
//! some shapes; so a file with `"file": "a.qcow2", "file": "/etc/x"` could
//! mean one thing to a reviewer and another to knib. Every loader of a store
//! file (manifest, state, journal, job, settings) and the API's request
//! parser run [`check_unique_keys`] first.
//!
//! Written here rather than taken from a crate: no well-kept crate checks
//! duplicates in every shape (serde_with does it only for maps it is told
//! about), and the check is one small serde visitor over serde_json's own
//! parser, which reports the line and column of the repeated key.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};

/// Walks any JSON value, refusing an object that holds a key twice.
struct UniqueKeys;

impl<'de> de::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_none<E>(self) -> Result<Self, E> {
        Ok(UniqueKeys)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("key {key:?} is given twice")));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// Fail when `text` is not JSON or when an object in it holds a key twice.
pub fn check_unique_keys(text: &[u8]) -> Result<(), serde_json::Error> {
    let mut d = serde_json::Deserializer::from_slice(text);
    de::Deserialize::deserialize(&mut d).map(|_: UniqueKeys| ())?;
    d.end()
}

/// `serde_json::from_slice`, refusing a key given twice in any object.
pub fn from_slice<T: DeserializeOwned>(text: &[u8]) -> Result<T, serde_json::Error> {
    check_unique_keys(text)?;
    serde_json::from_slice(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for bad in [
            r#"{"a": 1, "a": 2}"#,
            r#"{"a": {"b": 1, "c": 2, "b": 3}}"#,
            r#"[{"x": null}, {"y": [1, {"z": 1, "z": 1}]}]"#,
        ] {
            let e = check_unique_keys(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("is given twice"), "{bad}: {e}");
        }
        for good in [r#"{"a": 1, "b": {"a": 2}}"#, "[1, 2.5, -3, \"s\", true, null]", r#"{"a": [{"a": 1}, {"a": 2}]}"#]
        {
            check_unique_keys(good.as_bytes()).unwrap();
        }
        assert!(check_unique_keys(b"{\"a\": 1} x").is_err());
    }
}
