//! A 3-node JetStream cluster: the events stream with 3 replicas loses its leader while webhooks arrive and again
//! while the applier works through a backlog. Every webhook that got a 200 ends in Postgres once, ingest and the
//! applier carry on without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use stripe_sync_testkit::eventually;
use stripe_sync_testkit::nats::TestNatsCluster;
use stripe_sync_testkit::stripe::now;

use crate::helpers::{PATIENCE, TestEnv, customer_event, post_signed};

const CUSTOMERS: usize = 100;
/// Events per customer and phase, each a second after the last.
const VERSIONS: usize = 3;

/// The events of one phase: every customer's next versions, in order per customer.
fn phase(phase: usize, base: i64) -> Vec<Vec<Vec<u8>>> {
    (0..CUSTOMERS)
        .map(|c| {
            (0..VERSIONS)
                .map(|v| {
                    let version = phase * VERSIONS + v;
                    let event = customer_event(
                        &format!("evt_cl_{c}_{version}"),
                        if version == 0 {
                            "customer.created"
                        } else {
                            "customer.updated"
                        },
                        base + i64::try_from(version).unwrap(),
                        &format!("cus_cl_{c}"),
                        &format!("v{version}@example.com"),
                    );
                    serde_json::to_vec(&event).unwrap()
                })
                .collect()
        })
        .collect()
}

/// Posts every customer's events in order (customers in parallel), each until it gets a 200 as Stripe would
/// retry it; counts the 200s in `accepted`.
async fn deliver(ingest: String, events: Vec<Vec<Vec<u8>>>, accepted: Arc<AtomicUsize>) {
    let http = reqwest::Client::new();
    let senders = events.into_iter().map(|versions| {
        let (http, ingest, accepted) = (http.clone(), ingest.clone(), accepted.clone());
        async move {
            for body in versions {
                eventually(PATIENCE, "a webhook accepted", || async {
                    (post_signed(&http, &ingest, &body).await == 200).then_some(())
                })
                .await;
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    futures::future::join_all(senders).await;
}

/// The name of the server leading the events stream, once there is one.
async fn stream_leader(env: &TestEnv) -> String {
    let js = env.jetstream().await;
    eventually(PATIENCE, "the events stream has a leader", || async {
        let mut stream = js.get_stream(&env.stream_name).await.ok()?;
        stream.info().await.ok()?.cluster.clone()?.leader
    })
    .await
}

/// Waits until the stream has its 3 replicas again, all current.
async fn replicas_current(env: &TestEnv) {
    let js = env.jetstream().await;
    eventually(PATIENCE, "all three replicas current", || async {
        let mut stream = js.get_stream(&env.stream_name).await.ok()?;
        let cluster = stream.info().await.ok()?.cluster.clone()?;
        (cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster.replicas.iter().all(|r| r.current))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_dies_mid_ingest_and_mid_apply_and_every_accepted_event_lands_once() {
    let mut cluster = TestNatsCluster::start(3);
    let env = TestEnv::with_env(&[
        ("NATS_URL", &cluster.urls()),
        ("STRIPE_SYNC__STREAM__REPLICAS", "3"),
        ("STRIPE_SYNC__STREAM__PARTITIONS", "4"),
    ])
    .await;
    let (ingest, _ingest_task) = env.start_ingest().await;
    let mut applier = env.start_applier().await;
    let info = env
        .jetstream()
        .await
        .get_stream(&env.stream_name)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the stream has 3 replicas");
    let base = now() - 3600;

    // Mid-ingest: the leader dies after a third of the first phase's webhooks were accepted.
    let accepted = Arc::new(AtomicUsize::new(0));
    let first = tokio::spawn(deliver(ingest.clone(), phase(0, base), accepted.clone()));
    eventually(PATIENCE, "a third of the webhooks accepted", || async {
        (accepted.load(Ordering::SeqCst) >= CUSTOMERS * VERSIONS / 3).then_some(())
    })
    .await;
    let leader = stream_leader(&env).await;
    cluster.node(&leader).stop();
    first.await.unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), CUSTOMERS * VERSIONS);
    env.wait_count(
        "select count(*) from stripe.events",
        i64::try_from(CUSTOMERS * VERSIONS).unwrap(),
    )
    .await;
    cluster.node(&leader).resume();
    replicas_current(&env).await;

    // Mid-apply: a backlog accepted while the applier was stopped; the leader dies while it is worked through.
    applier.stop().await;
    deliver(ingest.clone(), phase(1, base), accepted.clone()).await;
    applier = env.start_applier().await;
    env.wait_count_at_least(
        "select count(*) from stripe.events",
        i64::try_from(CUSTOMERS * VERSIONS + CUSTOMERS / 2).unwrap(),
    )
    .await;
    let leader = stream_leader(&env).await;
    cluster.node(&leader).stop();
    let total = i64::try_from(2 * CUSTOMERS * VERSIONS).unwrap();
    env.wait_count("select count(*) from stripe.events", total)
        .await;

    // Once each: as many events recorded as accepted, and every customer at its newest version.
    assert_eq!(accepted.load(Ordering::SeqCst), 2 * CUSTOMERS * VERSIONS);
    let newest = format!("v{}@example.com", 2 * VERSIONS - 1);
    let current: i64 = env
        .scalar(&format!(
            "select count(*) from stripe.customers where id like 'cus_cl_%' and email = '{newest}'"
        ))
        .await;
    assert_eq!(current, i64::try_from(CUSTOMERS).unwrap());
    // And the applier still works after both deaths: one more webhook lands.
    deliver(
        ingest,
        vec![vec![
            serde_json::to_vec(&customer_event(
                "evt_cl_after",
                "customer.created",
                base,
                "cus_cl_after",
                "after@example.com",
            ))
            .unwrap(),
        ]],
        accepted,
    )
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_cl_after'",
        1,
    )
    .await;
    applier.stop().await;
}
