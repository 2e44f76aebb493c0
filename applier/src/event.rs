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
use crate::version::{FORWARD_ONLY, Kind};

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
    /// Forward-only fields set in the object ([`FORWARD_ONLY`]): orders states within a second.
    pub progress: u32,
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
            Some(raw) => {
                let start = raw.get().as_ptr() as usize - json.as_ptr() as usize;
                (
                    serde_json::from_str::<ObjectFacts<'_>>(raw.get()).unwrap_or_default(),
                    raw.get()
                        .starts_with('{')
                        .then(|| start..start + raw.get().len()),
                )
            }
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
            progress: facts.progress,
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

/// What the applier reads of `data.object` in the same pass: id, type, livemode and the forward-only fields set.
/// Fields of unexpected JSON types read as absent.
#[derive(Debug, Default)]
struct ObjectFacts<'a> {
    id: Option<Cow<'a, str>>,
    object: Option<Cow<'a, str>>,
    livemode: Option<bool>,
    progress: u32,
}

/// A value counted as "set" for [`FORWARD_ONLY`]: a number, a string or `true`; an object counts its set members.
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
                        "livemode" => {
                            facts.livemode = match map.next_value::<serde_json::Value>()? {
                                serde_json::Value::Bool(b) => Some(b),
                                _ => None,
                            }
                        }
                        field if FORWARD_ONLY.contains(&field) => {
                            facts.progress = facts
                                .progress
                                .saturating_add(map.next_value::<SetCount>()?.0);
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
        assert_eq!(e.progress, 3, "paid, finalized_at, paid_at");
        assert_eq!(e.object_id.as_deref(), Some("in_1"));
        assert!(
            e.livemode(),
            "the object's livemode when the event has none"
        );
        assert_eq!(e.kind(), Kind::Change);
        let created = Incoming::parse(1, br#"{"id":"e","type":"invoice.created","created":1,"livemode":false,"data":{"object":{"id":"in_1","livemode":true}}}"#).unwrap();
        assert_eq!(
            (created.kind(), created.livemode(), created.progress),
            (Kind::Created, false, 0)
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
