//! The `data` of a publish body as the text the event carries
//! ([`EventData`]): a JSON string as is, any other JSON value as its compact
//! JSON text, exactly as `serde_json::Value`'s `to_string` writes it (object
//! keys in sorted order, the last of duplicate keys kept, numbers and
//! strings in serde_json's own forms), but written while the body is read,
//! without building a tree of values first (a map, a string per key and a
//! value per entry, then freed, for every publish).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The event's data text.
#[derive(Debug)]
pub(super) struct EventData(pub(super) String);

impl<'de> serde::Deserialize<'de> for EventData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Top)
    }
}

/// The top-level value: a string is the text itself.
struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = EventData;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<EventData, E> {
        Ok(EventData(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<EventData, E> {
        Ok(EventData(text))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<EventData, E> {
        compact(|out| Compact(out).visit_bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<EventData, E> {
        compact(|out| Compact(out).visit_i64(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<EventData, E> {
        compact(|out| Compact(out).visit_u64(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<EventData, E> {
        compact(|out| Compact(out).visit_f64(value))
    }

    fn visit_unit<E: de::Error>(self) -> Result<EventData, E> {
        compact(|out| Compact(out).visit_unit())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<EventData, A::Error> {
        compact(|out| Compact(out).visit_seq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<EventData, A::Error> {
        compact(|out| Compact(out).visit_map(map))
    }
}

/// Runs `write` on an empty buffer and returns what it wrote as the text.
fn compact<E: de::Error>(
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<EventData, E> {
    let mut out = Vec::with_capacity(64);
    write(&mut out)?;
    // Only serde_json's output and whole UTF-8 strings were written.
    String::from_utf8(out)
        .map(EventData)
        .map_err(|_| E::custom("data is not UTF-8"))
}

/// Appends `value` as serde_json writes it.
fn append<T: serde::Serialize + ?Sized, E: de::Error>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), E> {
    serde_json::to_writer(out, value).map_err(E::custom)
}

/// Writes one value, compact, at the end of the buffer.
struct Compact<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Compact<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Compact<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        append(self.0, &value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        append(self.0, &value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        append(self.0, &value)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        // As `Value` keeps it: a number when finite (always, from JSON text).
        match serde_json::Number::from_f64(value) {
            Some(number) => append(self.0, &number),
            None => append(self.0, &()),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        append(self.0, text)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        append(self.0, &())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(b'[');
        let mut first = true;
        loop {
            let mark = out.len();
            if !first {
                out.push(b',');
            }
            if seq.next_element_seed(Compact(out))?.is_none() {
                out.truncate(mark);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(b'{');
        let start = out.len();
        // Each entry's key and where its `"key":value` was written.
        let mut entries: Vec<(Cow<'de, str>, usize, usize)> = Vec::new();
        let mut in_order = true;
        while let Some(key) = map.next_key_seed(Key)? {
            if !entries.is_empty() {
                out.push(b',');
            }
            let from = out.len();
            append(out, key.as_ref())?;
            out.push(b':');
            map.next_value_seed(Compact(out))?;
            if let Some((last, _, _)) = entries.last() {
                in_order &= **last < *key;
            }
            entries.push((key, from, out.len()));
        }
        if !in_order {
            // `Value` holds a sorted map: sort (stable), keep the last of
            // equal keys, and write the entries again in that order.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut kept: Vec<&(Cow<'de, str>, usize, usize)> = Vec::with_capacity(entries.len());
            for entry in &entries {
                match kept.last_mut() {
                    Some(last) if last.0 == entry.0 => *last = entry,
                    _ => kept.push(entry),
                }
            }
            let mut sorted = Vec::with_capacity(out.len() - start);
            for (i, (_, from, to)) in kept.iter().enumerate() {
                if i > 0 {
                    sorted.push(b',');
                }
                sorted.extend_from_slice(&out[*from..*to]);
            }
            out.truncate(start);
            out.extend_from_slice(&sorted);
        }
        out.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }

    fn visit_string<E: de::Error>(self, key: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the edge sent before: the value through `serde_json::Value`.
    fn through_value(text: &str) -> String {
        match serde_json::from_str::<serde_json::Value>(text).expect("valid JSON") {
            serde_json::Value::String(text) => text,
            other => other.to_string(),
        }
    }

    fn direct(text: &str) -> String {
        serde_json::from_str::<EventData>(text)
            .expect("valid JSON")
            .0
    }

    #[test]
    fn values_are_written_as_the_json_value_wrote_them() {
        for text in [
            r#""hello\nworld""#,
            r#"{"a": [1, 2]}"#,
            r#"{"t":1,"k":2,"t":3}"#,
            r#"{"k":1767000000000000,"t":-3,"f":1e3,"g":-0,"h":0.1,"u":18446744073709551615,"big":1e400}"#,
            r#"{"s":"\u0041\/\"\\\u00e9\u2028 ü","\u0062":null,"a":true,"c":{}}"#,
            r#"[[],[{}],{"b":{"z":1,"a":[false]}}]"#,
            "null",
            "12.50",
            "  \"spaced\"  ",
        ] {
            if serde_json::from_str::<serde_json::Value>(text).is_err() {
                assert!(serde_json::from_str::<EventData>(text).is_err(), "{text}");
                continue;
            }
            assert_eq!(direct(text), through_value(text), "{text}");
        }
    }

    #[test]
    fn what_the_json_value_refused_is_refused() {
        for text in ["", "{", r#"{"a":}"#, "[1,]", "nul", r#"{"a" 1}"#] {
            assert!(serde_json::from_str::<EventData>(text).is_err(), "{text}");
        }
    }

    /// JSON text of any shape: keys in any order, repeated, escaped or not;
    /// numbers of every kind; whitespace or none.
    fn json_text() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            "[a-e]{0,3}",
            Just(r"\u0061".to_owned()),
            Just(r"\n".to_owned()),
            Just("é".to_owned())
        ]
        .boxed();
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            "-?[1-9][0-9]{0,2}\\.[0-9]{1,4}",
            "[ -~]{0,6}".prop_map(|s| serde_json::to_string(&s).expect("string")),
            Just(r#""\u00e9\/\t""#.to_owned()),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                (proptest::collection::vec(inner.clone(), 0..6), " ?")
                    .prop_map(|(items, gap)| format!("[{gap}{}]", items.join(&format!(",{gap}")))),
                (proptest::collection::vec((key.clone(), inner), 0..6), " ?").prop_map(
                    |(entries, gap)| {
                        let entries: Vec<String> = entries
                            .into_iter()
                            .map(|(k, v)| format!("\"{k}\"{gap}:{gap}{v}"))
                            .collect();
                        format!("{{{gap}{}}}", entries.join(","))
                    }
                ),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_value_is_written_as_the_json_value_wrote_it(text in json_text()) {
            prop_assert_eq!(direct(&text), through_value(&text));
        }
    }
}
