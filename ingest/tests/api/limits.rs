//! What protects ingest from too much at once: past `http.max_in_flight` requests a webhook gets 503 at once
//! (Stripe retries it), while the requests in flight finish normally.

use serde_json::{Value, json};
use stripe_sync_testkit::{eventually, stripe};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::spawn_app_with;

fn event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&stripe::event(
        id,
        "customer.created",
        stripe::now(),
        stripe::fixture("customer"),
    ))
    .unwrap()
}

#[tokio::test]
async fn past_the_in_flight_cap_a_webhook_gets_503_busy_while_the_one_in_flight_finishes() {
    let app = spawn_app_with(&[("STRIPE_SYNC__HTTP__MAX_IN_FLIGHT", "1")]).await;
    // The first request sends half its body and waits: it holds the only slot.
    let body = event("evt_slow");
    let (head, tail) = body.split_at(body.len() / 2);
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "POST /webhooks HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nStripe-Signature: {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        stripe::sign(stripe::SECRET, stripe::now(), &body),
        body.len()
    );
    slow.write_all(request.as_bytes()).await.unwrap();
    slow.write_all(head).await.unwrap();

    let mut attempt = 0;
    eventually(
        std::time::Duration::from_secs(20),
        "a second request is turned away",
        || {
            attempt += 1;
            let body = event(&format!("evt_fast_{attempt}"));
            let app = &app;
            async move {
                let response = app.post_signed(&body).await;
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(json!({}));
                (status == 503 && answer["error"] == "busy").then_some(())
            }
        },
    )
    .await;

    slow.write_all(tail).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the request in flight finishes: {answer}"
    );
}
