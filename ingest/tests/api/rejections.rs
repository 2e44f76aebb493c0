//! Everything that must get a clear 4xx and never reach the stream.

use stripe_sync_testkit::stripe::{self, SECRET, now, sign, signature_hex};

use crate::helpers::{error_code, spawn_app};

fn body() -> Vec<u8> {
    serde_json::to_vec(&stripe::event(
        "evt_reject",
        "customer.created",
        now(),
        stripe::object("customer", "cus_r"),
    ))
    .unwrap()
}

#[tokio::test]
async fn every_bad_signature_gets_400_and_nothing_is_published() {
    let app = spawn_app().await;
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
        let response = app
            .post_raw("/webhooks", &payload, signature.as_deref())
            .await;
        assert_eq!(response.status(), 400, "{case}");
        assert_eq!(error_code(response).await, code, "{case}");
    }
    assert_eq!(
        app.stored().await,
        0,
        "a refused webhook must never be published"
    );
}

#[tokio::test]
async fn signed_bodies_that_are_not_stripe_events_get_400() {
    let app = spawn_app().await;
    let cases: [(&[u8], &str); 5] = [
        (b"this is not json", "body_not_json"),
        (b"", "body_not_json"),
        (br#"["evt_1","customer.created"]"#, "body_not_an_event"),
        (br#"{"type":"customer.created"}"#, "body_not_an_event"),
        (br#"{"id":"evt_1","type":42}"#, "body_not_an_event"),
    ];
    for (payload, code) in cases {
        let response = app.post_signed(payload).await;
        assert_eq!(
            response.status(),
            400,
            "{:?}",
            String::from_utf8_lossy(payload)
        );
        assert_eq!(error_code(response).await, code);
    }
    assert_eq!(app.stored().await, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_one_under_it_is_accepted() {
    let app = spawn_app_limited().await;
    let mut event = stripe::event(
        "evt_big",
        "customer.updated",
        now(),
        stripe::object("customer", "cus_big"),
    );
    event["data"]["object"]["metadata"] = serde_json::json!({ "blob": "x".repeat(70 * 1024) });
    let big = serde_json::to_vec(&event).unwrap();
    let response = app.post_signed(&big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(response).await, "payload_too_large");

    event["data"]["object"]["metadata"] = serde_json::json!({ "blob": "x".repeat(60 * 1024) });
    let fits = serde_json::to_vec(&event).unwrap();
    assert_eq!(app.post_signed(&fits).await.status(), 200);
    assert_eq!(app.stored().await, 1);
}

async fn spawn_app_limited() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(&[("STRIPE_SYNC__HTTP__BODY_LIMIT", "65536")]).await
}

#[tokio::test]
async fn unknown_endpoints_get_404_and_each_endpoint_has_its_own_secret() {
    let app =
        crate::helpers::spawn_app_with(&[("STRIPE_CONNECT_WEBHOOK_SECRET", "whsec_connect")]).await;
    let body = body();
    let t = now();
    let response = app
        .post_raw("/webhooks/nope", &body, Some(&sign(SECRET, t, &body)))
        .await;
    assert_eq!(response.status(), 404);
    // The platform endpoint's secret does not open the Connect endpoint, and the reverse.
    assert_eq!(
        app.post_raw("/webhooks/connect", &body, Some(&sign(SECRET, t, &body)))
            .await
            .status(),
        400
    );
    assert_eq!(
        app.post_raw("/webhooks", &body, Some(&sign("whsec_connect", t, &body)))
            .await
            .status(),
        400
    );
    assert_eq!(app.stored().await, 0);
    assert_eq!(
        app.post_raw(
            "/webhooks/connect",
            &body,
            Some(&sign("whsec_connect", t, &body))
        )
        .await
        .status(),
        200
    );
    assert_eq!(app.stored().await, 1);
}
