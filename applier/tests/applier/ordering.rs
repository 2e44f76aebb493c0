//! Dedupe and ordering: what a user sees in the tables whatever order and how often events arrive.

use crate::helpers::{TestEnv, customer_event};

async fn email(env: &TestEnv, id: &str) -> String {
    env.scalar(&format!(
        "select email from stripe.customers where id = '{id}'"
    ))
    .await
}

#[tokio::test]
async fn the_same_event_delivered_twice_applies_once() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let first = customer_event(
        "evt_dup",
        "customer.created",
        100,
        "cus_dup",
        "first@example.com",
    );
    env.publish(&first).await;
    env.wait_drained().await;
    let updated_at: String = env
        .scalar("select _updated_at::text from stripe.customers where id = 'cus_dup'")
        .await;

    // Stripe retries days later: JetStream's dedupe window is long gone, the database still knows the event.
    env.publish(&first).await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events where id = 'evt_dup'")
            .await,
        1
    );
    let again: String = env
        .scalar("select _updated_at::text from stripe.customers where id = 'cus_dup'")
        .await;
    assert_eq!(
        again, updated_at,
        "a redelivered event must not touch the row"
    );
    applier.stop().await;
}

#[tokio::test]
async fn a_late_older_event_never_overwrites_newer_state() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_new",
        "customer.updated",
        200,
        "cus_late",
        "new@example.com",
    ))
    .await;
    env.wait_drained().await;
    env.publish(&customer_event(
        "evt_old",
        "customer.updated",
        100,
        "cus_late",
        "old@example.com",
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(email(&env, "cus_late").await, "new@example.com");
    // The older event is still recorded as received.
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events where object_id = 'cus_late'")
            .await,
        2
    );
    applier.stop().await;
}

#[tokio::test]
async fn same_second_events_follow_stream_order_within_and_across_batches() {
    let env = TestEnv::new().await;
    // Both in one batch (published before the applier starts)...
    env.publish(&customer_event(
        "evt_s1",
        "customer.updated",
        300,
        "cus_same",
        "first@example.com",
    ))
    .await;
    env.publish(&customer_event(
        "evt_s2",
        "customer.updated",
        300,
        "cus_same",
        "second@example.com",
    ))
    .await;
    let applier = env.start_applier().await;
    env.wait_drained().await;
    assert_eq!(email(&env, "cus_same").await, "second@example.com");
    // ...and in separate batches.
    env.publish(&customer_event(
        "evt_s3",
        "customer.updated",
        300,
        "cus_same",
        "third@example.com",
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(email(&env, "cus_same").await, "third@example.com");
    applier.stop().await;
}

#[tokio::test]
async fn a_deleted_object_stays_deleted_when_a_late_create_arrives() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_del",
        "customer.deleted",
        500,
        "cus_gone",
        "gone@example.com",
    ))
    .await;
    env.wait_drained().await;
    env.publish(&customer_event(
        "evt_late_create",
        "customer.created",
        400,
        "cus_gone",
        "zombie@example.com",
    ))
    .await;
    // Same second as the delete, later in the stream: the tombstone still wins.
    env.publish(&customer_event(
        "evt_same_second",
        "customer.updated",
        500,
        "cus_gone",
        "zombie@example.com",
    ))
    .await;
    env.wait_drained().await;
    let (deleted, email): (bool, String) =
        sqlx::query_as("select deleted, email from stripe.customers where id = 'cus_gone'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(deleted);
    assert_eq!(
        email, "gone@example.com",
        "the row keeps the object as it was when deleted"
    );
    applier.stop().await;
}
