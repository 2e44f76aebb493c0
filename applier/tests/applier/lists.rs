//! Embedded lists: a subscription's items follow the subscription.

use serde_json::{Value, json};
use stripe_sync_testkit::stripe;

use crate::helpers::TestEnv;

fn item(id: &str, quantity: i64) -> Value {
    let mut item = stripe::object("subscription_item", id);
    item["quantity"] = json!(quantity);
    item
}

fn subscription(items: Vec<Value>, has_more: bool) -> Value {
    let mut sub = stripe::object("subscription", "sub_items");
    sub["items"] = json!({ "object": "list", "data": items, "has_more": has_more, "total_count": 5, "url": "/v1/subscription_items?subscription=sub_items" });
    sub
}

async fn items(env: &TestEnv) -> Vec<(String, i64, bool)> {
    sqlx::query_as("select id, quantity, deleted from stripe.subscription_items where _parent_id = 'sub_items' order by id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn subscription_items_are_replaced_with_their_subscription() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let created = subscription(vec![item("si_a", 1), item("si_b", 2)], false);
    env.publish(&stripe::event(
        "evt_sub_1",
        "customer.subscription.created",
        100,
        created,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, false), ("si_b".into(), 2, false)]
    );

    // si_a is removed from the subscription, si_b changes, si_c is added.
    let updated = subscription(vec![item("si_b", 5), item("si_c", 1)], false);
    env.publish(&stripe::event(
        "evt_sub_2",
        "customer.subscription.updated",
        200,
        updated,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![
            ("si_a".into(), 1, true),
            ("si_b".into(), 5, false),
            ("si_c".into(), 1, false)
        ]
    );

    // A late, older update changes neither the subscription nor its items.
    let stale = subscription(vec![item("si_a", 9)], false);
    env.publish(&stripe::event(
        "evt_sub_0",
        "customer.subscription.updated",
        150,
        stale,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![
            ("si_a".into(), 1, true),
            ("si_b".into(), 5, false),
            ("si_c".into(), 1, false)
        ]
    );
    applier.stop().await;
}

#[tokio::test]
async fn a_truncated_list_is_recorded_and_removes_nothing() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&stripe::event(
        "evt_t1",
        "customer.subscription.created",
        100,
        subscription(vec![item("si_a", 1), item("si_b", 1)], false),
    ))
    .await;
    env.wait_drained().await;
    // Stripe embedded only part of the list: si_a is not known to be gone.
    env.publish(&stripe::event(
        "evt_t2",
        "customer.subscription.updated",
        200,
        subscription(vec![item("si_b", 3)], true),
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, false), ("si_b".into(), 3, false)]
    );
    let (total, url): (i64, String) = sqlx::query_as(
        "select total_count, url from stripe.incomplete_lists where parent_table = 'subscriptions' and parent_id = 'sub_items' and field = 'items'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (total, url.as_str()),
        (5, "/v1/subscription_items?subscription=sub_items")
    );

    // Complete again: the record goes away.
    env.publish(&stripe::event(
        "evt_t3",
        "customer.subscription.updated",
        300,
        subscription(vec![item("si_b", 3)], false),
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.incomplete_lists")
            .await,
        0
    );
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, true), ("si_b".into(), 3, false)]
    );
    applier.stop().await;
}
