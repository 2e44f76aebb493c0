//! What a valid webhook becomes in the stream.

use stripe_sync_shared::subjects;
use stripe_sync_testkit::stripe::{self, SECRET, now, sign, signature_hex};

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn a_signed_event_is_stored_unchanged_with_routing_headers() {
    let app = spawn_app().await;
    let mut event = stripe::event(
        "evt_pub_1",
        "customer.updated",
        now(),
        stripe::object("customer", "cus_pub"),
    );
    event["account"] = serde_json::json!("acct_123");
    // Keep odd spacing: the stream must hold the exact bytes Stripe signed.
    let body = format!("{}  ", serde_json::to_string_pretty(&event).unwrap()).into_bytes();
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 200);
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(reply["received"], true);
    assert_eq!(reply["duplicate"], false);

    let message = app.stream().await.get_raw_message(1).await.unwrap();
    assert_eq!(message.payload.as_ref(), body.as_slice());
    // Partition = xxh3_64("acct_123/cus_pub") mod 16 (the object within its connected account; 16 is the default
    // partition count), computed with Python's xxhash.
    assert_eq!(
        message.subject.as_str(),
        "stripe.events.12.customer.updated"
    );
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        header(subjects::HEADER_MSG_ID).as_deref(),
        Some("evt_pub_1")
    );
    assert_eq!(
        header(subjects::HEADER_EVENT_TYPE).as_deref(),
        Some("customer.updated")
    );
    assert_eq!(
        header(subjects::HEADER_OBJECT_ID).as_deref(),
        Some("cus_pub")
    );
    assert_eq!(
        header(subjects::HEADER_OBJECT_TYPE).as_deref(),
        Some("customer")
    );
    assert_eq!(
        header(subjects::HEADER_ACCOUNT).as_deref(),
        Some("acct_123")
    );
    let traceparent = header("traceparent").expect("W3C trace context travels with the event");
    assert_eq!(traceparent.split('-').count(), 4, "{traceparent}");
}

#[tokio::test]
async fn any_of_several_v1_signatures_is_enough() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&stripe::event(
        "evt_v1s",
        "price.created",
        now(),
        stripe::object("price", "price_1"),
    ))
    .unwrap();
    let t = now();
    let header = format!(
        "t={t},v1={},v1={}",
        signature_hex("whsec_other", t, &body),
        signature_hex(SECRET, t, &body)
    );
    assert_eq!(
        app.post_raw("/webhooks", &body, Some(&header))
            .await
            .status(),
        200
    );
    assert_eq!(app.stored().await, 1);
}

#[tokio::test]
async fn both_secrets_work_while_one_is_rolled() {
    let app = spawn_app_with(&[("STRIPE_WEBHOOK_SECRET", "whsec_new, whsec_old")]).await;
    for (i, secret) in ["whsec_old", "whsec_new"].iter().enumerate() {
        let body = serde_json::to_vec(&stripe::event(
            &format!("evt_roll_{i}"),
            "product.created",
            now(),
            stripe::object("product", "prod_1"),
        ))
        .unwrap();
        assert_eq!(
            app.post_raw("/webhooks", &body, Some(&sign(secret, now(), &body)))
                .await
                .status(),
            200,
            "{secret}"
        );
    }
    assert_eq!(app.stored().await, 2);
}

#[tokio::test]
async fn an_event_type_we_do_not_know_is_still_accepted_and_published() {
    let app = spawn_app().await;
    let body = format!(
        r#"{{"id":"evt_future","object":"event","type":"quantum_ledger.entangled","created":{},
        "data":{{"object":{{"id":"ql_1","object":"quantum_ledger","spin":0.5,"amount":99999999999999999999999}}}}}}"#,
        now()
    )
    .into_bytes();
    assert_eq!(app.post_signed(&body).await.status(), 200);
    assert_eq!(app.stored().await, 1);
}

#[tokio::test]
async fn the_same_event_twice_is_stored_once() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&stripe::event(
        "evt_twice",
        "invoice.paid",
        now(),
        stripe::object("invoice", "in_1"),
    ))
    .unwrap();
    let first: serde_json::Value = app.post_signed(&body).await.json().await.unwrap();
    // Stripe's retry signs again with a new timestamp.
    let second = app.post_signed(&body).await;
    assert_eq!(second.status(), 200);
    let second: serde_json::Value = second.json().await.unwrap();
    assert_eq!(
        (first["duplicate"].as_bool(), second["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!(app.stored().await, 1);
}

#[tokio::test]
async fn a_full_stream_refuses_new_events_instead_of_dropping_unapplied_ones() {
    let app = spawn_app_with(&[("STRIPE_SYNC__STREAM__MAX_BYTES", "20000")]).await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        let body = serde_json::to_vec(&stripe::event(
            &format!("evt_full_{i}"),
            "customer.created",
            now(),
            stripe::object("customer", &format!("cus_full_{i}")),
        ))
        .unwrap();
        statuses.push(app.post_signed(&body).await.status().as_u16());
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses.contains(&503), "{statuses:?}");
    let first = app.stream().await.get_raw_message(1).await.unwrap();
    let first: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(
        first["id"], "evt_full_0",
        "the oldest event is kept for the applier"
    );
}
