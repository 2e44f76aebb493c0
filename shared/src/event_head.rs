//! The event head: the few fields of a Stripe event that routing and ordering need, read in one pass without
//! copying the body. Everything else in the event is skipped by the parser and kept byte for byte in the raw body.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a body is not a Stripe event.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The body is not JSON.
    #[error("body is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but without the string `id` and `type` every Stripe event has.
    #[error("body is not a Stripe event: {0}")]
    NotAnEvent(&'static str),
}

/// Longest event id or type accepted: Stripe's are about 30 and 60 characters.
pub const MAX_NAME_LEN: usize = 255;

/// Refuses an id or type that no Stripe event has: empty, too long, or with control characters or spaces (which
/// can't travel in a NATS header).
fn checked_name<'a>(value: Cow<'a, str>, what: &'static str) -> Result<Cow<'a, str>, HeadError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(HeadError::NotAnEvent(what));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(HeadError::NotAnEvent(what));
    }
    Ok(value)
}

/// The head of a Stripe event, generic over how `data.object` is read: [`ObjectHead`] when only its id and type
/// are needed (ingest), `&RawValue` when its exact bytes are kept too (applier).
#[derive(Debug, Deserialize)]
pub struct EventHead<'a, O> {
    /// Event id, `evt_...`.
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    pub id: Option<Cow<'a, str>>,
    /// Event type, e.g. `customer.updated`.
    #[serde(rename = "type", borrow, default, deserialize_with = "lenient_str")]
    pub event_type: Option<Cow<'a, str>>,
    /// `event` for API v1 events, `v2.core.event` for thin events.
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    pub object: Option<Cow<'a, str>>,
    /// When Stripe created the event: see [`EventHead::created`].
    #[serde(default, rename = "created", deserialize_with = "lenient_created")]
    pub created_as: Option<Created>,
    /// Connected account the event belongs to (Stripe Connect); absent for the platform's own events.
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    pub account: Option<Cow<'a, str>>,
    /// Live or test mode.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub livemode: Option<bool>,
    /// API version the payload was rendered with.
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    pub api_version: Option<Cow<'a, str>>,
    /// `data`, of which only `object` is read.
    #[serde(default = "no_data")]
    pub data: EventData<O>,
    /// A thin event's object (`{id, type, url}`): the payload carries no object.
    #[serde(default, deserialize_with = "lenient_related")]
    pub related_object: Option<RelatedObject>,
    /// A thin event's connected account (`context`), absent for the platform's own events.
    #[serde(borrow, default, deserialize_with = "lenient_str")]
    pub context: Option<Cow<'a, str>>,
}

/// An event's `created`, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Unix seconds (v1 events).
    Seconds(i64),
    /// An RFC 3339 time (thin events), as unix seconds.
    Time(i64),
}

/// `object` of a thin event (API v2 event destinations).
pub const THIN_EVENT: &str = "v2.core.event";

/// A thin event's `related_object`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct RelatedObject {
    /// Its id.
    #[serde(default, deserialize_with = "lenient_owned")]
    pub id: Option<String>,
    /// Its type (`customer`).
    #[serde(rename = "type", default, deserialize_with = "lenient_owned")]
    pub kind: Option<String>,
}

impl<O> EventHead<'_, O> {
    /// True for a thin event.
    #[must_use]
    pub fn is_thin(&self) -> bool {
        self.object.as_deref() == Some(THIN_EVENT)
    }

    /// Unix seconds when Stripe created the event: a v1 event's integer, a thin event's RFC 3339 time (to the
    /// second); anything else is no time at all.
    #[must_use]
    pub fn created(&self) -> Option<i64> {
        match (self.created_as?, self.is_thin()) {
            (Created::Seconds(s), _) | (Created::Time(s), true) => Some(s),
            (Created::Time(_), false) => None,
        }
    }

    /// The connected account: a v1 event's `account`, a thin event's `context`.
    #[must_use]
    pub fn account(&self) -> Option<&str> {
        if self.is_thin() {
            self.account.as_deref().or(self.context.as_deref())
        } else {
            self.account.as_deref()
        }
    }
}

fn no_data<O>() -> EventData<O> {
    EventData { object: None }
}

/// `data` of an event. Anything but a JSON object reads as "no object".
#[derive(Debug)]
pub struct EventData<O> {
    /// The object the event is about.
    pub object: Option<O>,
}

impl<'de, O: Deserialize<'de>> Deserialize<'de> for EventData<O> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<O>(std::marker::PhantomData<O>);
        impl<'de, O: Deserialize<'de>> Visitor<'de> for V<O> {
            type Value = EventData<O>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut object = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "object" && object.is_none() {
                        object = Some(map.next_value::<O>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(EventData { object })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                IgnoredAny
                    .visit_seq(seq)
                    .map(|_| EventData { object: None })
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(EventData { object: None })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `id` and `object` (its type) of a Stripe object. Anything but a JSON object reads as an object without either.
#[derive(Debug, Default)]
pub struct ObjectHead<'a> {
    /// Object id, absent for objects that have none (`balance`).
    pub id: Option<Cow<'a, str>>,
    /// Object type, e.g. `customer`, `checkout.session`.
    pub object: Option<Cow<'a, str>>,
}

/// A string field read leniently (see [`lenient_str`]).
struct LenientStr<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for LenientStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_str(d).map(LenientStr)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ObjectHead<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = ObjectHead<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut head = ObjectHead::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" if head.id.is_none() => {
                            head.id = map.next_value::<LenientStr<'_>>()?.0
                        }
                        "object" if head.object.is_none() => {
                            head.object = map.next_value::<LenientStr<'_>>()?.0
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| ObjectHead::default())
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(ObjectHead::default())
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// What ingest reads: id and type are required, the rest is optional.
#[derive(Debug)]
pub struct RoutingHead<'a> {
    /// Event id.
    pub id: Cow<'a, str>,
    /// Event type.
    pub event_type: Cow<'a, str>,
    /// Unix second Stripe created the event (see [`EventHead::created`]).
    pub created: i64,
    /// Connected account, if any.
    pub account: Option<Cow<'a, str>>,
    /// `data.object.id`, if any.
    pub object_id: Option<Cow<'a, str>>,
    /// `data.object.object`, if any.
    pub object_type: Option<Cow<'a, str>>,
}

impl<'a> RoutingHead<'a> {
    /// Reads the head of a body in one pass. Fails when the body is not JSON, or lacks a plain string `id` and
    /// `type` or a `created` (unix seconds; a thin event's RFC 3339 time). A thin event's object is its
    /// `related_object`, its account its `context`.
    pub fn parse(body: &'a [u8]) -> Result<Self, HeadError> {
        let head: EventHead<'a, ObjectHead<'a>> = parse_object(body)?;
        let thin = head.is_thin();
        let created = head.created().ok_or(HeadError::NotAnEvent(
            "no `created` (unix seconds, or an RFC 3339 time in a thin event)",
        ))?;
        let id = head.id.ok_or(HeadError::NotAnEvent("no string `id`"))?;
        let id = checked_name(
            id,
            "`id` is empty, longer than 255 characters, or has control characters or spaces",
        )?;
        let event_type = head
            .event_type
            .ok_or(HeadError::NotAnEvent("no string `type`"))?;
        let event_type = checked_name(
            event_type,
            "`type` is empty, longer than 255 characters, or has control characters or spaces",
        )?;
        let (object_id, object_type) = match (thin, head.related_object) {
            (true, Some(related)) => (related.id.map(Cow::Owned), related.kind.map(Cow::Owned)),
            (true, None) => (None, None),
            (false, _) => {
                let object = head.data.object.unwrap_or_default();
                (object.id, object.object)
            }
        };
        Ok(Self {
            id,
            event_type,
            created,
            account: if thin {
                head.account.or(head.context)
            } else {
                head.account
            },
            object_id,
            object_type,
        })
    }
}

/// Parses a body that must be a JSON object (serde would also read a struct from an array) into an event head.
pub fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HeadError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(body).map_err(HeadError::NotJson),
        _ => match serde_json::from_slice::<IgnoredAny>(body) {
            Err(err) => Err(HeadError::NotJson(err)),
            Ok(_) => Err(HeadError::NotAnEvent("not a JSON object")),
        },
    }
}

/// Reads the next value of a map as a lenient string (absent unless it is a string), for visitors of Stripe objects.
pub fn lenient<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Cow<'de, str>>, A::Error> {
    Ok(map.next_value::<LenientStr<'de>>()?.0)
}

/// Parses `data.object` kept as raw bytes into its id and type.
#[must_use]
pub fn object_head(raw: &RawValue) -> ObjectHead<'_> {
    serde_json::from_str(raw.get()).unwrap_or_default()
}

// Lenient readers: a field of an unexpected JSON type reads as absent instead of failing the whole parse, so a
// change in Stripe's payloads can't turn a valid event into a rejected one.

fn lenient_str<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_map(map).map(|_| None)
        }
    }
    d.deserialize_any(V)
}

/// Unix seconds, or an RFC 3339 time (thin events) read to the second.
fn lenient_created<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Created>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_i64().map(Created::Seconds),
        serde_json::Value::String(s) => rfc3339_seconds(&s).map(Created::Time),
        _ => None,
    })
}

/// The unix second of an RFC 3339 time (`2026-10-01T12:00:00.123Z`).
#[must_use]
pub fn rfc3339_seconds(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(time::OffsetDateTime::unix_timestamp)
}

fn lenient_owned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

fn lenient_related<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RelatedObject>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(value
        .is_object()
        .then(|| RelatedObject::deserialize(value).unwrap_or_default()))
}

fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Some(b),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_routing_fields_and_skips_nested_ids() {
        let body = br#"{"id":"evt_1","object":"event","type":"customer.updated","account":"acct_9","created":1,
            "data":{"object":{"metadata":{"id":"nested"},"id":"cus_1","object":"customer"},
            "previous_attributes":{"id":"x"}}}"#;
        let head = RoutingHead::parse(body).unwrap();
        assert_eq!(head.id, "evt_1");
        assert_eq!(head.event_type, "customer.updated");
        assert_eq!(head.account.as_deref(), Some("acct_9"));
        assert_eq!(head.object_id.as_deref(), Some("cus_1"));
        assert_eq!(head.object_type.as_deref(), Some("customer"));
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        assert!(matches!(
            RoutingHead::parse(b"not json"),
            Err(HeadError::NotJson(_))
        ));
        assert!(matches!(
            RoutingHead::parse(b" [\"evt_1\",\"t\"]"),
            Err(HeadError::NotAnEvent(_))
        ));
        assert!(matches!(
            RoutingHead::parse(br#"{"type":"x"}"#),
            Err(HeadError::NotAnEvent(_))
        ));
        assert!(matches!(
            RoutingHead::parse(br#"{"id":5,"type":"x"}"#),
            Err(HeadError::NotAnEvent(_))
        ));
        assert!(matches!(
            RoutingHead::parse(br#"{"id":"evt_1"}"#),
            Err(HeadError::NotAnEvent(_))
        ));
    }

    #[test]
    fn ids_and_types_that_cannot_travel_in_a_header_are_refused() {
        for body in [
            "{\"id\":\"evt_1\\r\\nX-Injected: 1\",\"type\":\"t\",\"created\":1}",
            "{\"id\":\"evt_1\",\"type\":\"customer.created\\n\",\"created\":1}",
            "{\"id\":\"evt 1\",\"type\":\"t\",\"created\":1}",
            "{\"id\":\"\",\"type\":\"t\",\"created\":1}",
        ] {
            assert!(
                matches!(
                    RoutingHead::parse(body.as_bytes()),
                    Err(HeadError::NotAnEvent(_))
                ),
                "{body}"
            );
        }
        let long = format!(
            r#"{{"id":"evt_{}","type":"t","created":1}}"#,
            "x".repeat(300)
        );
        assert!(RoutingHead::parse(long.as_bytes()).is_err());
        assert!(
            RoutingHead::parse(
                br#"{"id":"evt_1","type":"v2.core.account[requirements].updated","created":1}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn a_thin_event_routes_by_its_related_object_and_context_and_reads_its_time() {
        let thin = br#"{"id":"evt_65R","object":"v2.core.event","type":"v1.customer.created","created":"2026-10-01T12:00:00.999Z","context":"acct_9","related_object":{"id":"cus_1","type":"customer","url":"/v1/customers/cus_1"}}"#;
        let head = RoutingHead::parse(thin).unwrap();
        assert_eq!(
            (
                head.object_id.as_deref(),
                head.object_type.as_deref(),
                head.account.as_deref()
            ),
            (Some("cus_1"), Some("customer"), Some("acct_9"))
        );
        let full: EventHead<'_, &RawValue> = serde_json::from_slice(thin).unwrap();
        assert_eq!(full.created(), Some(1_790_856_000), "to the second");
        let v2 = br#"{"id":"evt_2","object":"v2.core.event","type":"v2.core.account[requirements].updated","created":"2026-10-01T12:00:00Z"}"#;
        let head = RoutingHead::parse(v2).unwrap();
        assert_eq!(head.object_id, None, "a thin event without related_object");
    }

    #[test]
    fn events_without_an_integer_created_are_refused_with_the_reason() {
        assert!(matches!(
            RoutingHead::parse(br#"{"id":"evt_1","type":"t","created":"2026-10-01T12:00:00Z"}"#),
            Err(HeadError::NotAnEvent(_))
        ));
    }

    #[test]
    fn odd_types_in_optional_fields_do_not_reject_an_event() {
        let body = br#"{"id":"evt_1","type":"x.y","created":7,"account":{"id":"a"},"livemode":1,
            "data":{"object":{"id":{"nested":true},"object":7}}}"#;
        let head = RoutingHead::parse(body).unwrap();
        assert_eq!(head.object_id, None);
        assert_eq!(head.account, None);
        let full: EventHead<'_, &RawValue> = serde_json::from_slice(body).unwrap();
        assert_eq!(full.created(), Some(7));
        assert_eq!(full.livemode, None);
    }

    #[test]
    fn keeps_the_object_bytes_exactly() {
        let body = br#"{"id":"evt_1","type":"t","created":1700000000,"data":{"object":{"id":"o_1", "object":"thing","n":1.50}}}"#;
        let head: EventHead<'_, &RawValue> = serde_json::from_slice(body).unwrap();
        let raw = head.data.object.unwrap();
        assert_eq!(raw.get(), r#"{"id":"o_1", "object":"thing","n":1.50}"#);
        assert_eq!(object_head(raw).id.as_deref(), Some("o_1"));
        assert_eq!(head.created(), Some(1_700_000_000));
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
            "[a-z_.]{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("id".to_owned()),
                        Just("type".to_owned()),
                        Just("data".to_owned()),
                        Just("object".to_owned()),
                        Just("account".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_head_parser_never_panics_on_bytes(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = RoutingHead::parse(&body);
        }

        #[test]
        fn the_head_parser_never_panics_on_any_json(value in json_value()) {
            let body = serde_json::to_vec(&value).unwrap();
            let _ = RoutingHead::parse(&body);
            let _ = parse_object::<EventHead<'_, &RawValue>>(&body);
        }

        #[test]
        fn an_event_with_string_id_and_type_is_always_accepted(id in "[a-zA-Z0-9_]{1,30}", kind in "[a-z_.]{1,40}", created in 0i64..4_000_000_000, data in json_value()) {
            let body = serde_json::to_vec(&serde_json::json!({ "id": id, "type": kind, "created": created, "data": data })).unwrap();
            let head = RoutingHead::parse(&body).unwrap();
            proptest::prop_assert_eq!(head.id.as_ref(), id.as_str());
        }
    }
}
