//! Servers restarting under load, and a NATS server too old to trust.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use stripe_sync_testkit::nats::{TestNats, find_old_server};
use stripe_sync_testkit::postgres::TestPostgres;
use stripe_sync_testkit::stripe::now;
use stripe_sync_testkit::{eventually, unique_name};

use crate::helpers::{PATIENCE, TestEnv, customer_event, post_signed};

#[tokio::test]
async fn postgres_restarted_mid_stream_loses_nothing_and_dead_letters_nothing() {
    let pg = TestPostgres::start();
    let env = TestEnv::with_database_url(
        &pg.url(),
        &[("STRIPE_SYNC__DATABASE__ACQUIRE_TIMEOUT", "1s")],
    )
    .await;
    let applier = env.start_applier().await;
    let total = 2_000;
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let published = published.clone();
        let env = &env;
        async move {
            for i in 0..total {
                env.publish(&customer_event(
                    &format!("evt_pg_{i}"),
                    "customer.updated",
                    100 + i as i64,
                    &format!("cus_pg_{}", i % 300),
                    "p@example.com",
                ))
                .await;
                published.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let restart = async {
        eventually(PATIENCE, "events flowing before the restart", || async {
            let applied: i64 = sqlx::query_scalar("select count(*) from stripe.events")
                .fetch_one(&env.pool)
                .await
                .ok()?;
            (applied >= 300).then_some(())
        })
        .await;
        pg.stop();
        // Down until the applier holds events it could not apply.
        eventually(
            PATIENCE,
            "the applier holds events while Postgres is down",
            || async {
                (env.ack_pending().await? > 0 || published.load(Ordering::Relaxed) == total)
                    .then_some(())
            },
        )
        .await;
        pg.resume();
    };
    tokio::join!(publisher, restart);
    env.wait_count("select count(*) from stripe.events", total as i64)
        .await;
    env.wait_count("select count(*) from stripe.customers", 300)
        .await;
    env.wait_drained().await;
    assert_eq!(
        env.dead_letters().await,
        0,
        "a database restart must never fill the dead letter"
    );
    applier.stop().await;
}

#[tokio::test]
async fn nats_restarted_mid_ingest_every_acknowledged_event_reaches_the_database() {
    let mut env = TestEnv::new().await;
    let (ingest, _ingest_task) = env.start_ingest().await;
    let applier = env.start_applier().await;
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    let mut refused = 0;
    let send = |i: usize| {
        let http = http.clone();
        let ingest = ingest.clone();
        async move {
            let event = customer_event(
                &format!("evt_nr_{i}"),
                "customer.created",
                now(),
                &format!("cus_nr_{i}"),
                "n@example.com",
            );
            let body = serde_json::to_vec(&event).unwrap();
            match post_signed(&http, &ingest, &body).await {
                200 => true,
                503 => false,
                other => panic!("unexpected status {other}"),
            }
        }
    };
    for i in 0..400 {
        if i == 150 {
            env.nats.stop();
        }
        if i == 200 {
            env.nats.resume();
        }
        if i < 200 {
            if send(i).await {
                accepted.push(format!("evt_nr_{i}"));
            } else {
                refused += 1;
            }
        } else {
            // After the outage, retry each refused webhook as Stripe would: the same ingest process must start
            // accepting again by itself.
            eventually(PATIENCE, "ingest accepts webhooks again", || async {
                send(i).await.then_some(())
            })
            .await;
            accepted.push(format!("evt_nr_{i}"));
        }
    }
    assert!(
        refused > 0,
        "the outage was real: some webhooks were refused with 503"
    );
    let ids = accepted
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    env.wait_count(
        &format!("select count(*) from stripe.events where id in ({ids})"),
        accepted.len() as i64,
    )
    .await;
    applier.stop().await;
}

#[tokio::test]
async fn both_binaries_refuse_a_nats_server_older_than_2_11() {
    let old = TestNats::start_binary(find_old_server());
    let mut env = TestEnv::new().await;
    env.env.insert("NATS_URL".into(), old.url());
    env.env
        .insert("STRIPE_SYNC__STREAM__NAME".into(), unique_name("OLD"));
    let error = match stripe_sync_applier::startup::Application::build(env.settings()).await {
        Ok(_) => panic!("the applier must refuse NATS 2.10"),
        Err(error) => error,
    };
    assert!(format!("{error:#}").contains("2.11"), "{error:#}");

    let settings = stripe_sync_ingest::settings::Settings::load_from(&env.env).unwrap();
    let app = stripe_sync_ingest::startup::Application::build(settings)
        .await
        .unwrap();
    let error = app.run_until(std::future::pending()).await.unwrap_err();
    assert!(format!("{error:#}").contains("2.11"), "{error:#}");
}
