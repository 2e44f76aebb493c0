//! Probes and shutdown.

use std::process::{Command, Stdio};
use std::time::Duration;

use stripe_sync_testkit::nats::{TestNats, free_port};
use stripe_sync_testkit::stripe::{self, now};
use stripe_sync_testkit::{eventually, unique_name};
use tokio::io::AsyncWriteExt as _;

use crate::helpers::{event, read_until_closed, signed_request_head, spawn_app, spawn_app_with};

#[tokio::test]
async fn probes_report_health_and_readiness() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = app
        .http
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn on_shutdown_the_request_in_flight_is_answered_while_new_connections_are_refused() {
    let mut app = spawn_app_with(&[("STRIPE_SYNC__HTTP__MAX_IN_FLIGHT", "1")]).await;
    let body = event("evt_in_flight_at_shutdown");
    let (head, tail) = body.split_at(body.len() / 2);
    let mut slow = tokio::net::TcpStream::connect(app.socket_address())
        .await
        .unwrap();
    slow.write_all(signed_request_head(&body, false).as_bytes())
        .await
        .unwrap();
    slow.write_all(head).await.unwrap();
    // It is in flight once it holds the only slot: another webhook is turned away.
    let mut attempt = 0;
    eventually(
        Duration::from_secs(20),
        "the slow request in flight",
        || {
            attempt += 1;
            let body = event(&format!("evt_turned_away_{attempt}"));
            let app = &app;
            async move { (app.post_signed(&body).await.status() == 503).then_some(()) }
        },
    )
    .await;

    let _ = app.shutdown.take().expect("not stopped yet").send(());
    eventually(
        Duration::from_secs(10),
        "new connections refused",
        || async {
            tokio::net::TcpStream::connect(app.socket_address())
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert!(
        !app.server.is_finished(),
        "ingest stopped with a request in flight"
    );
    slow.write_all(tail).await.unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("evt_in_flight_at_shutdown"), "{answer}");
    (&mut app.server)
        .await
        .unwrap()
        .expect("a clean stop once it is answered");
}

#[tokio::test]
async fn the_binary_exits_0_on_sigterm_after_serving() {
    let nats = TestNats::start();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stripe-sync-ingest"))
        .env("NATS_URL", nats.url())
        .env("PORT", port.to_string())
        .env("METRICS_PORT", "0")
        .env("STRIPE_WEBHOOK_SECRET", stripe::SECRET)
        .env("STRIPE_SYNC__STREAM__NAME", unique_name("EVENTS"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(20), "ingest binary ready", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    })
    .await;
    let body = serde_json::to_vec(&stripe::event(
        "evt_bin",
        "customer.created",
        now(),
        stripe::object("customer", "cus_b"),
    ))
    .unwrap();
    let response = http
        .post(format!("{base}/webhooks"))
        .header(
            "stripe-signature",
            stripe::sign(stripe::SECRET, now(), &body),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "SIGTERM is a clean stop");
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn ingest_starts_while_nats_is_down_and_becomes_ready_when_it_appears() {
    let mut nats = TestNats::start();
    nats.stop();
    let env = std::collections::HashMap::from([
        ("NATS_URL".to_owned(), nats.url()),
        ("PORT".to_owned(), "0".to_owned()),
        ("METRICS_PORT".to_owned(), "0".to_owned()),
        (
            "STRIPE_WEBHOOK_SECRET".to_owned(),
            stripe::SECRET.to_owned(),
        ),
        (
            "STRIPE_SYNC__STREAM__NAME".to_owned(),
            unique_name("EVENTS"),
        ),
    ]);
    let settings = stripe_sync_ingest::settings::Settings::load_from(&env).unwrap();
    let app = stripe_sync_ingest::startup::Application::build(settings)
        .await
        .expect("starts without NATS");
    let base = format!("http://127.0.0.1:{}", app.port());
    let server = tokio::spawn(app.run_until(std::future::pending()));
    let http = reqwest::Client::new();
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    nats.resume();
    eventually(Duration::from_secs(30), "ready once NATS is up", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    })
    .await;
    server.abort();
}

#[tokio::test]
async fn sigterm_while_nats_is_unreachable_ends_the_process_at_once_with_status_0() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stripe-sync-ingest"))
        .env("NATS_URL", format!("nats://127.0.0.1:{}", free_port()))
        .env("PORT", port.to_string())
        .env("METRICS_PORT", "0")
        .env("STRIPE_WEBHOOK_SECRET", stripe::SECRET)
        .env("STRIPE_SYNC__STREAM__NAME", unique_name("EVENTS"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(20),
        "ingest binary listening",
        || async {
            http.get(format!("{base}/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        },
    )
    .await;
    let signalled = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "nothing was in flight, yet it took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn help_prints_usage_and_the_main_settings() {
    let output = Command::new(env!("CARGO_BIN_EXE_stripe-sync-ingest"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Usage: stripe-sync-ingest"), "{text}");
    assert!(text.contains("STRIPE_WEBHOOK_SECRET"), "{text}");
}
