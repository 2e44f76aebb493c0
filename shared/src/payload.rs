//! What an event body must be, beyond having an event's head, to be stored and read one way (docs/design.md,
//! "What ingest refuses"): JSON Postgres's `jsonb` can hold (valid strings, numbers within a 64-bit float's range,
//! nesting within [`MAX_DEPTH`]), no key given twice in any object (Postgres keeps the last copy, a streaming reader
//! the first: the row of one id would hold another object), ids short enough for an index, and a `created` Stripe
//! could have stamped. Stripe never sends anything else; ingest refuses it with a 400 naming what is wrong, so an
//! accepted webhook can always be applied.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deepest nesting of arrays and objects accepted (Stripe's deepest events nest about a dozen levels; serde's own
/// limit is 128, Postgres's stack a few thousand).
pub const MAX_DEPTH: usize = 64;

/// Longest object id accepted, in bytes: an index entry of Postgres holds at most 2,704 bytes, and Stripe's ids are
/// a few dozen characters.
pub const MAX_OBJECT_ID: usize = 1024;

/// The earliest `created` accepted: 2009-01-01, before Stripe existed.
pub const EARLIEST_CREATED: i64 = 1_230_768_000;

/// How far ahead of this host's clock a `created` may be: one day (clocks drift; Stripe's never run a day ahead).
pub const CREATED_AHEAD: i64 = 86_400;

/// Why a body can't be stored as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unstorable {
    /// Not JSON Postgres can hold: a lone surrogate escape, a number beyond a 64-bit float, broken syntax.
    #[error("not storable JSON: {0}")]
    Json(String),
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    #[error("nested deeper than {MAX_DEPTH} levels at {0}")]
    TooDeep(String),
    /// A key given twice in one object.
    #[error("the key {key:?} appears twice in {at}")]
    DuplicateKey {
        /// The key (cut to 64 characters).
        key: String,
        /// Where: `the event`, `data.object`, `data.object.metadata`...
        at: String,
    },
    /// `data.object.id` longer than [`MAX_OBJECT_ID`].
    #[error("`data.object.id` is longer than {MAX_OBJECT_ID} bytes")]
    LongObjectId,
    /// `created` outside the window Stripe could have stamped.
    #[error(
        "`created` {created} is not a time Stripe could have stamped (between 2009-01-01 and a day after this host's clock)"
    )]
    Created {
        /// The value sent.
        created: i64,
    },
}

/// Checks `created` (unix seconds) against the window Stripe could have stamped it in, given this host's clock.
pub fn check_created(created: i64, now: i64) -> Result<(), Unstorable> {
    if (EARLIEST_CREATED..=now.saturating_add(CREATED_AHEAD)).contains(&created) {
        Ok(())
    } else {
        Err(Unstorable::Created { created })
    }
}

/// Checks a body's structure in one pass: storable JSON, nesting, duplicate keys, the length of `data.object.id`.
pub fn check_structure(body: &[u8]) -> Result<(), Unstorable> {
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let node = Node {
        depth: 0,
        role: Role::Event,
        found: &found,
    };
    let parsed = node.deserialize(&mut de).and_then(|()| de.end());
    match (found.into_inner(), parsed) {
        (Some(found), _) => Err(found.into_error()),
        (None, Ok(())) => Ok(()),
        (None, Err(err)) => Err(Unstorable::Json(explained(&err))),
    }
}

/// serde's message, with what Postgres would make of it for the two cases its own words leave unclear.
fn explained(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let at = format!("line {} column {}", err.line(), err.column());
    if message.contains("hex escape") || message.contains("surrogate") {
        format!(
            "a string with an invalid \\u escape (a lone UTF-16 surrogate Postgres can't store) at {at}"
        )
    } else if message.contains("number out of range") {
        format!("a number beyond a 64-bit float's range at {at}")
    } else {
        message
    }
}

/// What was found wrong, with the path to it built on the way back up (innermost key first).
#[derive(Debug)]
struct Found {
    kind: FoundKind,
    path: Vec<String>,
}

#[derive(Debug)]
enum FoundKind {
    TooDeep,
    Duplicate(String),
    LongObjectId,
}

impl Found {
    fn into_error(self) -> Unstorable {
        let at = if self.path.is_empty() {
            "the event".to_owned()
        } else {
            self.path
                .iter()
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(".")
        };
        match self.kind {
            FoundKind::TooDeep => Unstorable::TooDeep(at),
            FoundKind::Duplicate(key) => Unstorable::DuplicateKey { key, at },
            FoundKind::LongObjectId => Unstorable::LongObjectId,
        }
    }
}

/// Where a value is, as far as the checks need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Event,
    Data,
    Object,
    ObjectId,
    Other,
}

impl Role {
    fn of_member(self, key: &str) -> Self {
        match (self, key) {
            (Self::Event, "data") => Self::Data,
            (Self::Data, "object") => Self::Object,
            (Self::Object, "id") => Self::ObjectId,
            _ => Self::Other,
        }
    }
}

/// One JSON value being checked.
#[derive(Clone, Copy)]
struct Node<'f> {
    depth: usize,
    role: Role,
    found: &'f RefCell<Option<Found>>,
}

impl Node<'_> {
    fn fail<E: serde::de::Error>(&self, kind: FoundKind) -> E {
        *self.found.borrow_mut() = Some(Found {
            kind,
            path: Vec::new(),
        });
        E::custom("refused")
    }

    fn nested(&self, role: Role) -> Self {
        Self {
            depth: self.depth + 1,
            role,
            found: self.found,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.role == Role::ObjectId && v.len() > MAX_OBJECT_ID {
            return Err(self.fail(FoundKind::LongObjectId));
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(FoundKind::TooDeep));
        }
        let mut index = 0usize;
        while seq
            .next_element_seed(self.nested(Role::Other))
            .map_err(|e| self.annotate(e, || format!("[{index}]")))?
            .is_some()
        {
            index += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(FoundKind::TooDeep));
        }
        let mut keys: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let role = self.role.of_member(&key);
            map.next_value_seed(self.nested(role))
                .map_err(|e| self.annotate(e, || key.to_string()))?;
            if keys.contains(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(self.fail(FoundKind::Duplicate(shown)));
            }
            keys.insert(key);
        }
        Ok(())
    }
}

/// An object's key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl Node<'_> {
    /// Adds this level's key to the path of what a nested value found (errors pass through unchanged).
    fn annotate<E>(&self, err: E, segment: impl FnOnce() -> String) -> E {
        if let Some(found) = self.found.borrow_mut().as_mut() {
            let segment = segment();
            found.path.push(segment.chars().take(64).collect());
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(object: &str) -> String {
        format!(
            r#"{{"id":"evt_1","type":"customer.updated","created":1700000000,"data":{{"object":{object}}}}}"#
        )
    }

    #[test]
    fn stripe_shaped_events_pass() {
        let body = event(
            r#"{"id":"cus_1","object":"customer","email":"a\u00e9\ud83d\ude00b","nul":"a\u0000b","n":1.5e300,
                "metadata":{"id":"x","k":"v"},"list":{"data":[{"id":"a"},{"id":"a"}]}}"#,
        );
        assert_eq!(check_structure(body.as_bytes()), Ok(()));
    }

    #[test]
    fn duplicate_keys_are_named_with_where_they_are() {
        let twice_object = r#"{"id":"evt_1","type":"t","created":1,"data":{"object":{"id":"cus_A"},"object":{"id":"cus_B"}}}"#;
        assert_eq!(
            check_structure(twice_object.as_bytes()),
            Err(Unstorable::DuplicateKey {
                key: "object".into(),
                at: "data".into()
            })
        );
        let twice_id = event(r#"{"id":"cus_first","object":"customer","id":"cus_last"}"#);
        assert_eq!(
            check_structure(twice_id.as_bytes()),
            Err(Unstorable::DuplicateKey {
                key: "id".into(),
                at: "data.object".into()
            })
        );
        let nested = event(r#"{"id":"c","lines":{"data":[{"a":1},{"a":1,"b":2,"a":3}]}}"#);
        assert_eq!(
            check_structure(nested.as_bytes()).unwrap_err().to_string(),
            "the key \"a\" appears twice in data.object.lines.data.[1]"
        );
        let top = r#"{"id":"evt_1","id":"evt_2","type":"t","created":1}"#;
        assert!(
            check_structure(top.as_bytes())
                .unwrap_err()
                .to_string()
                .ends_with("in the event")
        );
        // The same key spelled with an escape is the same key.
        let escaped = event(r#"{"id":"c","\u0069d":"d"}"#);
        assert!(matches!(
            check_structure(escaped.as_bytes()),
            Err(Unstorable::DuplicateKey { .. })
        ));
    }

    #[test]
    fn what_postgres_cannot_store_is_refused() {
        for (object, expected) in [
            (r#"{"email":"x\ud800y"}"#, "surrogate"),
            (r#"{"email":"x\udc00y"}"#, "surrogate"),
            (r#"{"email":"x\ud800"}"#, "surrogate"),
            (r#"{"balance":1e999999}"#, "64-bit float"),
            (r#"{"balance":-1e400}"#, "64-bit float"),
        ] {
            let err = check_structure(event(object).as_bytes()).unwrap_err();
            assert!(
                matches!(&err, Unstorable::Json(m) if m.contains(expected)),
                "{object}: {err}"
            );
        }
        let deep = format!(
            r#"{{"id":"evt_1","type":"t","created":1,"extra":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            check_structure(deep.as_bytes()),
            Err(Unstorable::TooDeep(at)) if at.starts_with("extra.[0].[0]")
        ));
        let deep_livemode = event(&format!(
            r#"{{"id":"cus_x","livemode":{}{}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        ));
        assert!(matches!(
            check_structure(deep_livemode.as_bytes()),
            Err(Unstorable::TooDeep(_))
        ));
        let just_deep_enough = event(&format!(
            r#"{{"id":"cus_x","m":{}{}}}"#,
            "[".repeat(MAX_DEPTH - 3),
            "]".repeat(MAX_DEPTH - 3)
        ));
        assert_eq!(check_structure(just_deep_enough.as_bytes()), Ok(()));
        let long_id = event(&format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_OBJECT_ID + 1)));
        assert_eq!(
            check_structure(long_id.as_bytes()),
            Err(Unstorable::LongObjectId)
        );
        let long_nested_id = event(&format!(
            r#"{{"id":"cus_1","metadata":{{"id":"{}"}}}}"#,
            "x".repeat(5000)
        ));
        assert_eq!(
            check_structure(long_nested_id.as_bytes()),
            Ok(()),
            "only the object's own id is a key"
        );
        assert!(matches!(
            check_structure(b"{\"id\":\"e\",\"type\":\"t\"} trailing"),
            Err(Unstorable::Json(_))
        ));
    }

    #[test]
    fn created_must_be_a_time_stripe_could_have_stamped() {
        let now = 1_800_000_000;
        assert_eq!(check_created(now, now), Ok(()));
        assert_eq!(check_created(EARLIEST_CREATED, now), Ok(()));
        assert_eq!(check_created(now + CREATED_AHEAD, now), Ok(()));
        for bad in [
            i64::MAX,
            i64::MIN,
            0,
            EARLIEST_CREATED - 1,
            now + CREATED_AHEAD + 1,
        ] {
            assert_eq!(
                check_created(bad, now),
                Err(Unstorable::Created { created: bad })
            );
        }
        assert!(
            Unstorable::Created { created: 7 }
                .to_string()
                .starts_with("`created` 7")
        );
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::json!(f)),
            any::<String>().prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(8, 128, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn checking_any_bytes_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = check_structure(&body);
        }

        /// Any JSON with each key once per object, within the depth, passes: nothing Stripe sends is refused.
        #[test]
        fn json_with_unique_keys_passes(value in json_value()) {
            let body = serde_json::to_vec(&serde_json::json!({"id": "evt_1", "type": "t", "created": 1, "data": {"object": value}})).unwrap();
            proptest::prop_assert_eq!(check_structure(&body), Ok(()));
        }
    }
}
