//! An event as the applier works with it: read once from the message (head fields, the span of `data.object` in the
//! body, what ordering needs of the object), sharing the message's bytes (no copy) so a batch can be retried without
//! going back to NATS.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use stripe_sync_shared::event_head::{self, EventHead};

use crate::error::ApplyError;
use crate::version::{Kind, SetFields};

/// The last second of year 9999: the latest `created` the applier stores.
pub const MAX_CREATED: i64 = 253_402_300_799;

/// One event, ready to apply.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Place in the stream's total order: the stream sequence, plus `epoch << 40` when the stream was re-created
    /// (see `stripe.stream_epochs`). The last tie-break between same-second events.
    pub seq: u64,
    /// The event as received (Stripe's bytes; see [`Incoming::from_bytes`] for the one substitution), valid UTF-8.
    body: bytes::Bytes,
    /// Event id.
    pub id: String,
    /// Event type.
    pub event_type: String,
    /// Unix seconds of the event.
    pub created: i64,
    /// `account` (Connect), if any.
    pub account: Option<String>,
    /// Live or test mode, as the event says.
    pub livemode: Option<bool>,
    /// `data.object.livemode`, for events that lack their own.
    object_livemode: Option<bool>,
    /// Lifecycle fields set in the object ([`crate::version::FORWARD_CANDIDATES`]); the registry says which of
    /// them order states of the object's type within a second.
    pub set_fields: SetFields,
    /// API version.
    pub api_version: Option<String>,
    /// `data.object.object`.
    pub object_type: Option<String>,
    /// `data.object.id`.
    pub object_id: Option<String>,
    /// Where `data.object` is in `body`.
    object_span: Option<Range<usize>>,
    /// A thin event (API v2 event destinations): no object in the payload; `object_type` and `object_id` are its
    /// `related_object`'s, `account` its `context`.
    pub thin: bool,
    /// A thin event's `snapshot_event`: the id of the v1 event of the same change, when Stripe names it.
    pub snapshot_event: Option<String>,
}

impl Incoming {
    /// Reads an event body. Fails (permanently) when it is not UTF-8 JSON with a string `id`, `type` and an integer
    /// `created`.
    ///
    /// Postgres's `jsonb` cannot hold the character U+0000; a `\u0000` escape in the body becomes `\ufffd` (the
    /// replacement character) so the event is applied rather than dead-lettered. The stream keeps the original.
    pub fn parse(seq: u64, body: &[u8]) -> Result<Self, ApplyError> {
        Self::from_bytes(seq, bytes::Bytes::copy_from_slice(body))
    }

    /// [`Incoming::parse`] on a message's bytes, sharing them.
    pub fn from_bytes(seq: u64, body: bytes::Bytes) -> Result<Self, ApplyError> {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApplyError::Unreadable("body is not UTF-8".into()))?;
        match replace_nul_escapes(text) {
            None => Self::read(seq, body.clone(), text),
            Some(replaced) => {
                let body = bytes::Bytes::from(replaced);
                let json = std::str::from_utf8(&body).unwrap_or_default();
                Self::read(seq, body.clone(), json)
            }
        }
    }

    /// Reads the event from `json`, the text of `body` (spans into `json` are kept as offsets into `body`).
    fn read(seq: u64, body: bytes::Bytes, json: &str) -> Result<Self, ApplyError> {
        let head: EventHead<'_, &RawValue> = event_head::parse_object(json.as_bytes())
            .map_err(|e| ApplyError::Unreadable(e.to_string()))?;
        let created = head.created().ok_or_else(|| {
            ApplyError::Unreadable(
                "no `created` (unix seconds, or an RFC 3339 time in a thin event)".into(),
            )
        })?;
        // Stored as a timestamp by history reads: a second no `timestamptz` can hold would break every read of the
        // row's history (ingest refuses anything outside 2009..now+1 day; this holds for what is already stored).
        if !(0..=MAX_CREATED).contains(&created) {
            return Err(ApplyError::Unreadable(format!(
                "`created` {created} is not a time (0..={MAX_CREATED})"
            )));
        }
        let thin = head.is_thin();
        let account = head.account().map(str::to_owned);
        let id = head
            .id
            .ok_or_else(|| ApplyError::Unreadable("no string `id`".into()))?
            .into_owned();
        let event_type = head
            .event_type
            .ok_or_else(|| ApplyError::Unreadable("no string `type`".into()))?
            .into_owned();
        let (facts, object_span) = match head.data.object {
            // An object whose facts can't be read is refused with the reason, never taken for "no object".
            Some(raw) if raw.get().starts_with('{') => {
                let start = raw.get().as_ptr() as usize - json.as_ptr() as usize;
                let facts = serde_json::from_str::<ObjectFacts<'_>>(raw.get()).map_err(|e| {
                    ApplyError::Unreadable(format!("`data.object` can't be read: {e}"))
                })?;
                (facts, Some(start..start + raw.get().len()))
            }
            Some(_) => (ObjectFacts::default(), None),
            None => (ObjectFacts::default(), None),
        };
        let (mut object_type, mut object_id) = (
            facts.object.map(Cow::into_owned),
            facts.id.map(Cow::into_owned),
        );
        let mut snapshot_event = None;
        if thin {
            let related = head.related_object.unwrap_or_default();
            (object_type, object_id) = (related.kind, related.id);
            snapshot_event = serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v["snapshot_event"].as_str().map(str::to_owned));
        }
        Ok(Self {
            seq,
            id,
            event_type,
            created,
            account,
            livemode: head.livemode,
            object_livemode: facts.livemode,
            set_fields: facts.set_fields,
            api_version: head.api_version.map(|s| s.into_owned()),
            object_type,
            object_id,
            object_span: object_span.filter(|_| !thin),
            body,
            thin,
            snapshot_event,
        })
    }

    /// The event as JSON text.
    pub fn json(&self) -> &str {
        // Checked when parsed; the bytes are immutable.
        std::str::from_utf8(&self.body).unwrap_or_default()
    }

    /// `data.object` as JSON text, when it is an object.
    pub fn object_json(&self) -> Option<&str> {
        self.object_span
            .clone()
            .and_then(|span| self.json().get(span))
    }

    /// True for `*.deleted` events.
    pub fn is_delete(&self) -> bool {
        self.event_type.ends_with(".deleted")
    }

    /// Live or test mode of the object: the event's, else the object's, else test. Part of every row's key, so a
    /// connected account's test data never overwrites its live data.
    pub fn livemode(&self) -> bool {
        self.livemode.or(self.object_livemode).unwrap_or(false)
    }

    /// How many forward-only fields of its type (`spec`, the registry's `forward_only`) the object has set: the
    /// state with more of them set is the later one within a second.
    #[must_use]
    pub fn progress(&self, spec: &crate::registry::ObjectSpec) -> u32 {
        self.set_fields.progress(&spec.forward_only)
    }

    /// What kind of write the event is, for ordering within a second.
    pub fn kind(&self) -> Kind {
        if self.event_type.starts_with(crate::snapshot::SNAPSHOT_TYPE) {
            Kind::Snapshot
        } else if self.event_type.ends_with(".created") {
            Kind::Created
        } else {
            Kind::Change
        }
    }
}

/// What the applier reads of `data.object` in the same pass: id, type, livemode and the lifecycle fields set.
/// Fields of unexpected JSON types read as absent.
#[derive(Debug, Default)]
struct ObjectFacts<'a> {
    id: Option<Cow<'a, str>>,
    object: Option<Cow<'a, str>>,
    livemode: Option<bool>,
    set_fields: SetFields,
}

/// A value counted as "set" for [`SetFields`]: a number, a string or `true`; an object counts its set members.
struct SetCount(u32);

impl<'de> Deserialize<'de> for SetCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SetCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<SetCount, E> {
                Ok(SetCount(u32::from(v)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<SetCount, E> {
                Ok(SetCount(1))
            }
            fn visit_u64<E>(self, _: u64) -> Result<SetCount, E> {
                Ok(SetCount(1))
            }
            fn visit_f64<E>(self, _: f64) -> Result<SetCount, E> {
                Ok(SetCount(1))
            }
            fn visit_str<E>(self, _: &str) -> Result<SetCount, E> {
                Ok(SetCount(1))
            }
            fn visit_unit<E>(self) -> Result<SetCount, E> {
                Ok(SetCount(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<SetCount, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| SetCount(0))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SetCount, A::Error> {
                let mut count = 0u32;
                while map.next_key::<IgnoredAny>()?.is_some() {
                    count = count.saturating_add(u32::from(map.next_value::<SetCount>()?.0 > 0));
                }
                Ok(SetCount(count))
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean, or absent for a value of any other JSON type (read without building it).
struct LenientBool(Option<bool>);

impl<'de> Deserialize<'de> for LenientBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LenientBool;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<LenientBool, E> {
                Ok(LenientBool(Some(v)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<LenientBool, E> {
                Ok(LenientBool(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<LenientBool, E> {
                Ok(LenientBool(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<LenientBool, E> {
                Ok(LenientBool(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<LenientBool, E> {
                Ok(LenientBool(None))
            }
            fn visit_unit<E>(self) -> Result<LenientBool, E> {
                Ok(LenientBool(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<LenientBool, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| LenientBool(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LenientBool, A::Error> {
                IgnoredAny.visit_map(map).map(|_| LenientBool(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ObjectFacts<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = ObjectFacts<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut facts = ObjectFacts::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" if facts.id.is_none() => facts.id = event_head::lenient(&mut map)?,
                        "object" if facts.object.is_none() => {
                            facts.object = event_head::lenient(&mut map)?
                        }
                        "livemode" => facts.livemode = map.next_value::<LenientBool>()?.0,
                        field if SetFields::counts(field) => {
                            let SetCount(n) = map.next_value()?;
                            facts
                                .set_fields
                                .add(field, u16::try_from(n).unwrap_or(u16::MAX));
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(facts)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Replaces JSON `\u0000` escapes (not preceded by an escaping backslash) with `\ufffd`; `None` when there is none.
fn replace_nul_escapes(text: &str) -> Option<String> {
    if !text.contains("\\u0000") {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if text[i..].starts_with("\\u0000") {
                out.push_str("\\ufffd");
                i += 6;
            } else {
                // An escape sequence: copy the backslash and the escaped character together.
                out.push('\\');
                if let Some(c) = text[i + 1..].chars().next() {
                    out.push(c);
                    i += 1 + c.len_utf8();
                } else {
                    i += 1;
                }
            }
        } else {
            let c = text[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(c);
            i += c.len_utf8();
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_head_and_keeps_the_object_text() {
        let body = br#"{"id":"evt_1","type":"customer.deleted","created":17,"account":"acct_1","livemode":true,
            "data":{"object":{"id":"cus_1","object":"customer","email":"a@b.c"}}}"#;
        let e = Incoming::parse(9, body).unwrap();
        assert_eq!(
            (e.id.as_str(), e.event_type.as_str(), e.created, e.seq),
            ("evt_1", "customer.deleted", 17, 9)
        );
        assert_eq!(e.account.as_deref(), Some("acct_1"));
        assert_eq!(e.object_id.as_deref(), Some("cus_1"));
        assert_eq!(
            e.object_json(),
            Some(r#"{"id":"cus_1","object":"customer","email":"a@b.c"}"#)
        );
        assert!(e.is_delete());
    }

    #[test]
    fn progress_counts_forward_only_fields_that_are_set() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":17,
            "data":{"object":{"id":"in_1","object":"invoice","livemode":true,"paid":true,"canceled_at":null,
            "status_transitions":{"finalized_at":16,"paid_at":17,"voided_at":null},"metadata":{"paid_at":"x"}}}}"#;
        let e = Incoming::parse(1, body).unwrap();
        let registry = crate::registry::Registry::shipped();
        let spec = |t: &str| registry.get(t).unwrap();
        assert_eq!(
            e.progress(spec("invoice")),
            3,
            "paid, finalized_at, paid_at"
        );
        assert_eq!(e.object_id.as_deref(), Some("in_1"));
        assert!(
            e.livemode(),
            "the object's livemode when the event has none"
        );
        assert_eq!(e.kind(), Kind::Change);
        let created = Incoming::parse(1, br#"{"id":"e","type":"invoice.created","created":1,"livemode":false,"data":{"object":{"id":"in_1","livemode":true}}}"#).unwrap();
        assert_eq!(
            (
                created.kind(),
                created.livemode(),
                created.progress(spec("invoice"))
            ),
            (Kind::Created, false, 0)
        );
        // A subscription's `canceled_at` is cleared when a cancellation at period end is undone: it orders nothing.
        let canceled = Incoming::parse(1, br#"{"id":"e","type":"customer.subscription.updated","created":1,
            "data":{"object":{"id":"sub_1","object":"subscription","canceled_at":5,"ended_at":null}}}"#).unwrap();
        assert_eq!(canceled.progress(spec("subscription")), 0);
    }

    #[test]
    fn a_created_no_timestamp_can_hold_is_refused() {
        for created in ["9223372036854775807", "-1"] {
            let body = format!(
                r#"{{"id":"e","type":"customer.updated","created":{created},"data":{{"object":{{"id":"cus_1","object":"customer"}}}}}}"#
            );
            assert!(
                matches!(Incoming::parse(1, body.as_bytes()), Err(ApplyError::Unreadable(r)) if r.contains("created")),
                "{created}"
            );
        }
    }

    #[test]
    fn an_object_whose_facts_cannot_be_read_is_refused_with_the_reason_not_taken_for_no_object() {
        // Deeper than the JSON reader's limit (128) where the reader descends: ingest refuses this (depth > 64);
        // one already in the stream is dead-lettered with the reason.
        let deep = format!("{}1{}", r#"{"a":"#.repeat(130), "}".repeat(130));
        let body = format!(
            r#"{{"id":"evt_1","type":"invoice.updated","created":17,"data":{{"object":{{"id":"in_1","object":"invoice","status_transitions":{deep}}}}}}}"#
        );
        match Incoming::parse(1, body.as_bytes()) {
            Err(ApplyError::Unreadable(reason)) => {
                assert!(reason.contains("data.object"), "{reason}")
            }
            other => panic!("expected Unreadable, got {other:?}"),
        }
        // A livemode of another JSON type (however deep) reads as absent, the object is still read.
        let odd = format!(
            r#"{{"id":"e","type":"customer.updated","created":1,"data":{{"object":{{"id":"cus_1","object":"customer","livemode":{}1{}}}}}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        let odd = Incoming::parse(1, odd.as_bytes()).unwrap();
        assert_eq!(
            (odd.object_id.as_deref(), odd.livemode()),
            (Some("cus_1"), false)
        );
    }

    #[test]
    fn unreadable_events_are_errors_not_panics() {
        for body in [
            &b"\xff\xfe"[..],
            b"nope",
            br#"{"id":"e","type":"t"}"#,
            br#"{"type":"t","created":1}"#,
        ] {
            assert!(
                matches!(Incoming::parse(1, body), Err(ApplyError::Unreadable(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn nul_escapes_are_replaced_but_escaped_backslashes_are_not() {
        let body = r#"{"id":"e","type":"t","created":1,"data":{"object":{"id":"o","note":"a\u0000b","path":"c:\\u0000"}}}"#;
        let e = Incoming::parse(1, body.as_bytes()).unwrap();
        assert!(e.json().contains(r#""a\ufffdb""#), "{}", e.json());
        assert!(e.json().contains(r#""c:\\u0000""#), "{}", e.json());
        let parsed: serde_json::Value = serde_json::from_str(e.object_json().unwrap()).unwrap();
        assert_eq!(parsed["note"], "a\u{fffd}b");
    }

    proptest::proptest! {
        #[test]
        fn parsing_any_bytes_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Incoming::parse(1, &body);
        }

        #[test]
        fn parsing_event_shaped_text_never_panics(text in r#"\{("(id|type|created|data|object|account)":("[a-z_\\u0-9]*"|[0-9.e-]{1,8}|\{[^{}]{0,40}\}|null|\[\]),?){0,6}\}"#) {
            if let Ok(event) = Incoming::parse(1, text.as_bytes()) {
                let _ = event.object_json();
            }
        }
    }
}
