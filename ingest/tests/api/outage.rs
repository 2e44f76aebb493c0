//! NATS going away and coming back while ingest keeps running.

use std::time::Duration;

use stripe_sync_testkit::eventually;
use stripe_sync_testkit::stripe::{self, now};

use crate::helpers::spawn_app;

#[tokio::test]
async fn nats_down_gives_503_then_ingest_recovers_without_a_restart() {
    let mut app = spawn_app().await;
    let body = serde_json::to_vec(&stripe::event(
        "evt_outage",
        "customer.created",
        now(),
        stripe::object("customer", "cus_o"),
    ))
    .unwrap();

    app.nats.stop();
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("5")
    );
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(reply["error"], "broker_unavailable");
    assert_eq!(
        reply["message"], "the event could not be stored right now; retry later",
        "the broker's own error stays in the logs"
    );
    let ready = app
        .http
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let health = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "the process itself is fine");

    app.nats.resume();
    eventually(
        Duration::from_secs(30),
        "ingest accepts again after NATS is back",
        || async { (app.post_signed(&body).await.status() == 200).then_some(()) },
    )
    .await;
    assert_eq!(app.stored().await, 1);
}
