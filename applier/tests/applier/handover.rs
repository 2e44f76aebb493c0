//! Handing a partition over from one applier to another: the old one finishes its batch before the new one gets
//! anything, hands back what it had not started, and never releases a pin that is not its own.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, PriorityPolicy, pull};
use futures::StreamExt as _;
use stripe_sync_applier::consumer::{GROUP, release_pin};
use stripe_sync_shared::subjects;
use stripe_sync_testkit::eventually;

use crate::helpers::{PATIENCE, TestEnv, customer_event};

/// Every batch's transaction, from its first statement to the end of the (slow) events insert, by backend.
const RECORD_BATCHES: &str = "
    create table public.batches (event_id text, pid int, started timestamptz, ended timestamptz);
    create function public.record_batch() returns trigger language plpgsql as $$ begin
      perform pg_sleep(3);
      insert into public.batches select id, pg_backend_pid(), now(), clock_timestamp() from new_events;
      return null; end $$;
    create trigger record_batch after insert on stripe.events referencing new table as new_events
      for each statement execute function public.record_batch();";

#[tokio::test]
async fn a_rebalance_under_load_with_slow_batches_never_lets_two_appliers_work_one_partition() {
    let env = TestEnv::with_env(&[
        ("STRIPE_SYNC__STREAM__PARTITIONS", "2"),
        ("STRIPE_SYNC__APPLIER__PIN_TIMEOUT", "1s"),
        ("STRIPE_SYNC__APPLIER__MEMBER_TTL", "2s"),
        ("STRIPE_SYNC__APPLIER__BATCH_SIZE", "50"),
        // A message the old owner received but neither applied nor handed back would reach the new owner only
        // after this: far beyond the test's patience.
        ("STRIPE_SYNC__APPLIER__ACK_WAIT", "10m"),
    ])
    .await;
    let first = env.start_applier().await;
    sqlx::raw_sql(RECORD_BATCHES)
        .execute(&env.pool)
        .await
        .unwrap();
    let event = |i: usize| {
        customer_event(
            &format!("evt_h{i}"),
            "customer.updated",
            100 + i as i64,
            &format!("cus_h{}", i % 12),
            &format!("h{i}@example.com"),
        )
    };
    for i in 0..300 {
        env.publish(&event(i)).await;
    }
    // A second applier joins while the first is in the middle of slow batches (each takes 3 s, longer than
    // the pin timeout): half the partitions move.
    env.wait_count_at_least("select count(*) from public.batches", 1)
        .await;
    let second = env.start_applier().await;
    for i in 300..350 {
        env.publish(&event(i)).await;
    }
    env.wait_count("select count(distinct event_id) from public.batches", 350)
        .await;
    env.wait_drained().await;

    let rows: Vec<(String, i32, f64, f64)> = sqlx::query_as(
        "select event_id, pid, extract(epoch from started)::float8, extract(epoch from ended)::float8 \
         from public.batches",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut applied: HashMap<&str, usize> = HashMap::new();
    // Per partition: each backend's batches as (start, end).
    let mut by_partition: HashMap<u32, Vec<(i32, f64, f64)>> = HashMap::new();
    for (event_id, pid, started, ended) in &rows {
        *applied.entry(event_id).or_default() += 1;
        let i: usize = event_id.trim_start_matches("evt_h").parse().unwrap();
        let partition = env.topology.partition_of(&subjects::routing_key(
            None,
            Some(&format!("cus_h{}", i % 12)),
            event_id,
        ));
        by_partition
            .entry(partition)
            .or_default()
            .push((*pid, *started, *ended));
    }
    assert!(
        applied.values().all(|n| *n == 1),
        "an event committed twice: {applied:?}"
    );
    let distinct_pids: std::collections::HashSet<i32> = rows.iter().map(|r| r.1).collect();
    assert!(distinct_pids.len() >= 2, "both appliers applied something");
    for (partition, batches) in &by_partition {
        for a in batches {
            for b in batches {
                let overlap = a.0 != b.0 && a.1 < b.2 && b.1 < a.2;
                assert!(
                    !overlap,
                    "partition {partition}: backends {} and {} applied batches at once: {a:?} {b:?}",
                    a.0, b.0
                );
            }
        }
    }
    assert_eq!(env.dead_letters().await, 0);
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn releasing_a_pin_never_unpins_another_applier() {
    let env = TestEnv::new().await;
    let stream = env.ensure_stream().await;
    env.publish(&customer_event(
        "evt_pin",
        "customer.created",
        100,
        "cus_pin",
        "p@example.com",
    ))
    .await;
    let name = "pin-test";
    let consumer: consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![GROUP.into()],
            priority_timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .unwrap();
    // Another applier pulls and is pinned.
    let mut messages = consumer
        .stream()
        .group(GROUP)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let message = messages.next().await.unwrap().unwrap();
    let theirs = message
        .headers
        .as_ref()
        .unwrap()
        .get_last("Nats-Pin-Id")
        .unwrap()
        .to_string();
    let pinned = || async {
        stream
            .consumer_info(name)
            .await
            .unwrap()
            .priority_groups
            .iter()
            .find(|g| g.group == GROUP)
            .and_then(|g| g.pinned_client_id.clone())
    };
    assert_eq!(pinned().await.as_deref(), Some(theirs.as_str()));
    release_pin(&stream, name, "a-pin-we-held-earlier").await;
    assert_eq!(
        pinned().await.as_deref(),
        Some(theirs.as_str()),
        "someone else's pin stays"
    );
    release_pin(&stream, name, &theirs).await;
    eventually(PATIENCE, "the owner's release unpins", || async {
        (pinned().await.as_deref() != Some(theirs.as_str())).then_some(())
    })
    .await;
}
