//! Stripe as the tests see it: signatures computed the way Stripe computes them, and events built from Stripe's own
//! example objects (`testdata/stripe/fixtures3.json`) and real-looking events (`testdata/stripe/peer-events`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// The secret tests configure ingest with.
pub const SECRET: &str = "whsec_test_secret";

/// `Stripe-Signature` value for `body`, as Stripe computes it.
#[must_use]
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        signature_hex(secret, timestamp, body)
    )
}

/// `hex(HMAC-SHA256(secret, "<t>." + body))`.
#[must_use]
pub fn signature_hex(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Unix seconds now.
#[must_use]
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fixtures() -> &'static BTreeMap<String, Value> {
    static FIXTURES: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let text =
            std::fs::read_to_string(crate::testdata_dir().join("stripe/fixtures3.json")).unwrap();
        let all: Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(all["resources"].clone()).unwrap()
    })
}

/// Stripe's example object of a resource (`customer`, `checkout.session`...).
#[must_use]
pub fn fixture(resource: &str) -> Value {
    fixtures()
        .get(resource)
        .unwrap_or_else(|| panic!("no fixture for {resource}"))
        .clone()
}

/// Every example object, by resource name.
#[must_use]
pub fn all_fixtures() -> &'static BTreeMap<String, Value> {
    fixtures()
}

/// Stripe's example object with its id replaced.
#[must_use]
pub fn object(resource: &str, id: &str) -> Value {
    let mut o = fixture(resource);
    o["id"] = json!(id);
    o
}

/// A webhook event carrying `object`.
#[must_use]
pub fn event(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2026-07-29.dahlia",
        "created": created,
        "data": { "object": object },
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": event_type,
    })
}

/// Event type → object type of every snapshot event Stripe sends (`a|b` for polymorphic ones).
#[must_use]
pub fn event_types() -> BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(crate::testdata_dir().join("stripe/event-types.json")).unwrap();
    let all: BTreeMap<String, Value> = serde_json::from_str(&text).unwrap();
    all.into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
        .collect()
}

/// The 71 real-looking events from the TypeScript engine's test suite: (file name, raw bytes).
#[must_use]
pub fn peer_events() -> Vec<(String, Vec<u8>)> {
    let dir = crate::testdata_dir().join("stripe/peer-events");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}
