//! Everything that must get a clear 4xx and never reach the stream. These go through the router with `oneshot`,
//! with a NATS connection that never answers: a request the handler did not refuse would get 503, not 400.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use stripe_sync_testkit::nats::free_port;
use stripe_sync_testkit::stripe::{self, SECRET, now, sign, signature_hex};
use tower::ServiceExt as _;

use crate::helpers::{error_code, spawn_app_with};

fn body() -> Vec<u8> {
    serde_json::to_vec(&stripe::event(
        "evt_reject",
        "customer.created",
        now(),
        stripe::object("customer", "cus_r"),
    ))
    .unwrap()
}

/// The router of ingest configured with `extra` settings, whose NATS is a port nobody listens on.
async fn router(extra: &[(&str, &str)]) -> axum::Router {
    let mut env: HashMap<String, String> = HashMap::from([
        (
            "NATS_URL".into(),
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
    ]);
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    let settings = stripe_sync_ingest::settings::Settings::load_from(&env).unwrap();
    stripe_sync_ingest::routes::router(
        stripe_sync_ingest::startup::app_state(&settings)
            .await
            .unwrap(),
    )
}

/// POSTs `body` to `path` with `signature`; returns the status and the error code of the JSON body.
async fn post(
    router: &axum::Router,
    path: &str,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, String, String) {
    let mut request = Request::post(path).header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    (
        status,
        json["error"].as_str().unwrap_or_default().to_owned(),
        json["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn signed(body: &[u8]) -> Option<String> {
    Some(sign(SECRET, now(), body))
}

#[tokio::test]
async fn every_bad_signature_gets_400() {
    let router = router(&[]).await;
    let body = body();
    let t = now();
    let tampered = {
        let mut b = body.clone();
        let at = b.iter().position(|c| *c == b'r').unwrap();
        b[at] = b's';
        b
    };
    let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
        (
            "wrong secret",
            body.clone(),
            Some(sign("whsec_wrong", t, &body)),
            "signature_mismatch",
        ),
        (
            "stale",
            body.clone(),
            Some(sign(SECRET, t - 301, &body)),
            "signature_stale",
        ),
        (
            "future",
            body.clone(),
            Some(sign(SECRET, t + 301, &body)),
            "signature_future",
        ),
        ("missing header", body.clone(), None, "signature_missing"),
        (
            "malformed header",
            body.clone(),
            Some("v1=abc,garbage".into()),
            "signature_malformed",
        ),
        (
            "no v1",
            body.clone(),
            Some(format!("t={t},v0={}", signature_hex(SECRET, t, &body))),
            "signature_malformed",
        ),
        (
            "tampered body",
            tampered,
            Some(sign(SECRET, t, &body)),
            "signature_mismatch",
        ),
    ];
    for (case, payload, signature, code) in cases {
        let (status, error, _) = post(&router, "/webhooks", payload, signature).await;
        assert_eq!(
            (status, error.as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{case}"
        );
    }
}

#[tokio::test]
async fn signed_bodies_that_are_not_stripe_events_get_400_naming_the_reason() {
    let router = router(&[]).await;
    let thin_without_time = r#"{"id":"evt_65R","object":"v2.core.event","type":"v1.customer.created","created":"yesterday","related_object":{"id":"cus_1","type":"customer"}}"#;
    let cases: [(&str, &str, &str); 9] = [
        ("this is not json", "body_not_json", "not JSON"),
        ("", "body_not_json", "not JSON"),
        (
            r#"["evt_1","customer.created"]"#,
            "body_not_an_event",
            "not a JSON object",
        ),
        (
            r#"{"type":"customer.created","created":1}"#,
            "body_not_an_event",
            "`id`",
        ),
        (
            r#"{"id":"evt_1","type":42,"created":1}"#,
            "body_not_an_event",
            "`type`",
        ),
        // A line break in the id would break the NATS header it travels in.
        (
            "{\"id\":\"evt_1\\r\\nX: y\",\"type\":\"customer.created\",\"created\":1}",
            "body_not_an_event",
            "control characters",
        ),
        (
            "{\"id\":\"evt_1\",\"type\":\"customer.created\\n\",\"created\":1}",
            "body_not_an_event",
            "control characters",
        ),
        (
            r#"{"id":"evt_1","type":"customer.created","created":"2026-10-01T12:00:00Z"}"#,
            "body_not_an_event",
            "`created`",
        ),
        (thin_without_time, "body_not_an_event", "`created`"),
    ];
    for (payload, code, reason) in cases {
        let body = payload.as_bytes().to_vec();
        let (status, error, message) =
            post(&router, "/webhooks", body.clone(), signed(&body)).await;
        assert_eq!(
            (status, error.as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{payload:?}"
        );
        assert!(message.contains(reason), "{payload:?}: {message}");
    }
}

/// Signed events ingest could accept but the database could not store, or would store otherwise than they were
/// routed: refused with a 400 naming what is wrong, never accepted and then dead-lettered.
#[tokio::test]
async fn signed_events_that_cannot_be_stored_as_they_are_get_400_naming_what() {
    let router = router(&[]).await;
    let t = now();
    let head = |rest: &str| {
        format!(
            r#"{{"id":"evt_x","object":"event","type":"customer.updated","created":{t},"livemode":false,{rest}}}"#
        )
    };
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let cases: Vec<(String, &str, String)> = vec![
        (
            head(
                r#""data":{"object":{"id":"cus_A","object":"customer"},"object":{"id":"cus_B","object":"customer"}}"#,
            ),
            "body_unstorable",
            r#"the key "object" appears twice in data"#.into(),
        ),
        (
            head(r#""data":{"object":{"id":"cus_first","object":"customer","id":"cus_last"}}"#),
            "body_unstorable",
            r#"the key "id" appears twice in data.object"#.into(),
        ),
        (
            head(r#""data":{"object":{"id":"cus_1","object":"customer","email":"x\ud800y"}}"#),
            "body_unstorable",
            "surrogate".into(),
        ),
        (
            head(r#""data":{"object":{"id":"cus_1","object":"customer","balance":1e999999}}"#),
            "body_unstorable",
            "64-bit float".into(),
        ),
        (
            head(&format!(
                r#""extra":{},"data":{{"object":{{"id":"cus_1","object":"customer"}}}}"#,
                deep(100_000)
            )),
            "body_unstorable",
            "nested deeper than 64 levels".into(),
        ),
        (
            head(&format!(
                r#""data":{{"object":{{"id":"cus_1","object":"customer","livemode":{}}}}}"#,
                deep(130)
            )),
            "body_unstorable",
            "nested deeper than 64 levels at data.object.livemode".into(),
        ),
        (
            head(&format!(
                r#""data":{{"object":{{"id":"{}","object":"customer"}}}}"#,
                "c".repeat(8_000)
            )),
            "body_unstorable",
            "`data.object.id` is longer than 1024 bytes".into(),
        ),
    ];
    let mut cases = cases;
    for created in [i64::MAX, 0, 1_000_000_000, t + 2 * 86_400] {
        cases.push((
            format!(r#"{{"id":"evt_t","object":"event","type":"customer.updated","created":{created},"data":{{"object":{{"id":"cus_1","object":"customer"}}}}}}"#),
            "created_out_of_range",
            format!("`created` {created} is not a time Stripe could have stamped"),
        ));
    }
    for (payload, code, reason) in cases {
        let body = payload.into_bytes();
        let (status, error, message) =
            post(&router, "/webhooks", body.clone(), signed(&body)).await;
        let shown: String = String::from_utf8_lossy(&body).chars().take(120).collect();
        assert_eq!(
            (status, error.as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{shown}: {message}"
        );
        assert!(message.contains(&reason), "{shown}: {message}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let router = router(&[("STRIPE_SYNC__HTTP__BODY_LIMIT", "65536")]).await;
    let mut event = stripe::event(
        "evt_big",
        "customer.updated",
        now(),
        stripe::object("customer", "cus_big"),
    );
    event["data"]["object"]["metadata"] = serde_json::json!({ "blob": "x".repeat(70 * 1024) });
    let big = serde_json::to_vec(&event).unwrap();
    let (status, error, _) = post(&router, "/webhooks", big.clone(), signed(&big)).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test]
async fn unknown_endpoints_get_404_and_each_endpoint_has_its_own_secret() {
    let router = router(&[("STRIPE_CONNECT_WEBHOOK_SECRET", "whsec_connect")]).await;
    let body = body();
    let t = now();
    let (status, error, _) = post(
        &router,
        "/webhooks/nope",
        body.clone(),
        Some(sign(SECRET, t, &body)),
    )
    .await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::NOT_FOUND, "unknown_endpoint")
    );
    // The platform endpoint's secret does not open the Connect endpoint, and the reverse.
    let (status, _, _) = post(
        &router,
        "/webhooks/connect",
        body.clone(),
        Some(sign(SECRET, t, &body)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = post(
        &router,
        "/webhooks",
        body.clone(),
        Some(sign("whsec_connect", t, &body)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_unreachable_broker_gets_503_without_the_brokers_own_words() {
    let router = router(&[]).await;
    let body = body();
    let (status, error, message) = post(&router, "/webhooks", body.clone(), signed(&body)).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable")
    );
    assert_eq!(
        message,
        "the event could not be stored right now; retry later"
    );
}

/// With a real NATS: what passes the checks is stored, on the endpoint whose secret signed it; a body just under
/// the limit fits.
#[tokio::test]
async fn what_passes_every_check_is_stored_once_on_its_endpoint() {
    let app = spawn_app_with(&[
        ("STRIPE_CONNECT_WEBHOOK_SECRET", "whsec_connect"),
        ("STRIPE_SYNC__HTTP__BODY_LIMIT", "65536"),
    ])
    .await;
    let body = body();
    let response = app
        .post_raw(
            "/webhooks/connect",
            &body,
            Some(&sign("whsec_connect", now(), &body)),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut event = stripe::event(
        "evt_fits",
        "customer.updated",
        now(),
        stripe::object("customer", "cus_f"),
    );
    event["data"]["object"]["metadata"] = serde_json::json!({ "blob": "x".repeat(60 * 1024) });
    let fits = serde_json::to_vec(&event).unwrap();
    let response = app.post_signed(&fits).await;
    assert_eq!(response.status(), 200, "{}", error_code(response).await);
    assert_eq!(app.stored().await, 2);
}

#[tokio::test]
async fn webhook_routes_take_only_post() {
    let router = router(&[]).await;
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        for path in ["/webhooks", "/webhooks/connect"] {
            let response = router
                .clone()
                .oneshot(
                    Request::builder()
                        .method(method)
                        .uri(path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(
                response.headers()["allow"].to_str().unwrap(),
                "POST",
                "{method} {path}: the answer names the one method"
            );
        }
    }
}
