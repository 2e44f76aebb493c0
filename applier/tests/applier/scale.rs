//! Several appliers share the partitions; one dies (SIGKILL) mid-stream; the tables still end as applying every
//! event in stream order gives.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use stripe_sync_applier::version::{Kind, Rank, Version};
use stripe_sync_testkit::eventually;

use crate::helpers::{TestEnv, customer_event};

/// 5,000 events on 400 customers: creates, updates and deletes, many in the same second, in random order of
/// `created` (late events), like Stripe's unordered at-least-once delivery.
fn events() -> Vec<Value> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..5_000)
        .map(|i| {
            let customer = format!("cus_scale_{}", rng.usize(..400));
            let event_type = match rng.u8(..100) {
                0..=4 => "customer.deleted",
                5..=30 => "customer.created",
                _ => "customer.updated",
            };
            let created = 1_000 + rng.i64(0..60);
            customer_event(
                &format!("evt_scale_{i}"),
                event_type,
                created,
                &customer,
                &format!("e{i}@example.com"),
            )
        })
        .collect()
}

/// The state the ordering rule gives: per customer, (winning event id, deleted). These events carry no
/// `previous_attributes` and customers no forward-only fields, so the newest (second, rank), then the later place
/// in the stream, wins.
fn expected(events: &[(u64, &Value)]) -> HashMap<String, (String, bool)> {
    let mut state: HashMap<String, ((Version, u64), String, bool)> = HashMap::new();
    for (seq, event) in events {
        let id = event["data"]["object"]["id"].as_str().unwrap().to_owned();
        let deleted = event["type"] == "customer.deleted";
        let kind = if event["type"] == "customer.created" {
            Kind::Created
        } else {
            Kind::Change
        };
        let version = Version {
            created: event["created"].as_i64().unwrap(),
            rank: Rank::new(deleted, 0, kind),
        };
        let order = (version, *seq);
        if state.get(&id).is_none_or(|old| order > old.0) {
            state.insert(
                id,
                (order, event["id"].as_str().unwrap().to_owned(), deleted),
            );
        }
    }
    state.into_iter().map(|(k, v)| (k, (v.1, v.2))).collect()
}

#[tokio::test]
async fn three_appliers_one_killed_mid_stream_end_in_stream_order_state() {
    let env = TestEnv::new().await;
    env.ensure_stream().await;
    let mut appliers: Vec<_> = (0..3)
        .map(|i| env.spawn_applier_process(&format!("a{i}")))
        .collect();
    // All three have joined and every partition has a consumer.
    let js = env.jetstream().await;
    eventually(
        Duration::from_secs(60),
        "three appliers share the partitions",
        || async {
            let kv = js
                .get_key_value(stripe_sync_applier::membership::bucket_name(
                    &env.stream_name,
                ))
                .await
                .ok()?;
            let keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await.ok()?)
                .await
                .ok()?;
            let stream = js.get_stream(&env.stream_name).await.ok()?;
            let consumers = stream
                .consumer_info(format!(
                    "stripe-sync-applier-p{}",
                    env.topology.partitions - 1
                ))
                .await
                .is_ok();
            (keys.len() == 3 && consumers).then_some(())
        },
    )
    .await;

    let events = events();
    let mut published = Vec::new();
    for event in &events[..2_500] {
        published.push((env.publish(event).await, event));
    }
    env.wait_count_at_least("select count(*) from stripe.events", 1_000)
        .await;

    // SIGKILL one applier mid-stream, then measure how long until every partition applies again: one marker per
    // partition, published right after the kill.
    appliers[1].kill();
    let killed_at = Instant::now();
    let markers: Vec<Value> = (0..env.topology.partitions)
        .map(|p| {
            let id = (0..)
                .map(|i| format!("cus_marker_{p}_{i}"))
                .find(|id| env.topology.partition_of(id) == p)
                .unwrap();
            customer_event(
                &format!("evt_marker_{p}"),
                "customer.created",
                2_000,
                &id,
                "marker@example.com",
            )
        })
        .collect();
    for marker in &markers {
        env.publish(marker).await;
    }
    env.wait_count(
        "select count(*) from stripe.customers where email = 'marker@example.com'",
        markers.len() as i64,
    )
    .await;
    let failover = killed_at.elapsed();
    eprintln!(
        "failover after SIGKILL: every partition applying again after {:.1}s",
        failover.as_secs_f64()
    );

    for event in &events[2_500..] {
        published.push((env.publish(event).await, event));
    }
    env.wait_count(
        "select count(*) from stripe.events where id like 'evt_scale_%'",
        5_000,
    )
    .await;
    env.wait_drained().await;

    let want = expected(&published);
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "select id, _last_event_id, deleted from stripe.customers where id like 'cus_scale_%'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let got: HashMap<String, (String, bool)> = rows
        .into_iter()
        .map(|(id, event, deleted)| (id, (event, deleted)))
        .collect();
    assert_eq!(got.len(), want.len());
    let wrong: Vec<_> = want
        .iter()
        .filter(|(id, w)| got.get(*id) != Some(w))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} customers differ from stream order, e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
    assert_eq!(env.dead_letters().await, 0);

    for applier in appliers.iter_mut() {
        if applier.child.is_some() {
            assert_eq!(
                applier.terminate().await,
                Some(0),
                "clean stop (log: {})",
                applier.log.display()
            );
        }
    }
}
