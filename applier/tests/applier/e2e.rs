//! A signed webhook over HTTP becomes a row.

use stripe_sync_testkit::stripe::{self, now};

use crate::helpers::{TestEnv, customer_event, post_signed};

#[tokio::test]
async fn a_signed_webhook_becomes_a_row_with_typed_columns_and_the_raw_object() {
    let env = TestEnv::new().await;
    let (ingest, _ingest_task) = env.start_ingest().await;
    let applier = env.start_applier().await;

    let event = customer_event(
        "evt_e2e_1",
        "customer.created",
        now(),
        "cus_e2e",
        "ada@example.com",
    );
    let body = serde_json::to_vec(&event).unwrap();
    assert_eq!(
        post_signed(&reqwest::Client::new(), &ingest, &body).await,
        200
    );

    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_e2e'",
        1,
    )
    .await;
    let (email, balance, account, raw): (String, i64, String, serde_json::Value) = sqlx::query_as(
        "select email, balance, _account_id, _raw_data from stripe.customers where id = 'cus_e2e'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(email, "ada@example.com");
    assert_eq!(
        balance,
        event["data"]["object"]["balance"].as_i64().unwrap()
    );
    assert_eq!(account, "platform");
    assert_eq!(raw, event["data"]["object"]);

    let (event_type, object_id): (String, String) =
        sqlx::query_as("select type, object_id from stripe.events where id = 'evt_e2e_1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (event_type.as_str(), object_id.as_str()),
        ("customer.created", "cus_e2e")
    );
    applier.stop().await;
}

#[tokio::test]
async fn every_issue_event_type_lands_in_its_table() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let cases = [
        ("customer.created", "customer", "customers"),
        ("customer.updated", "customer", "customers"),
        (
            "customer.subscription.created",
            "subscription",
            "subscriptions",
        ),
        (
            "customer.subscription.updated",
            "subscription",
            "subscriptions",
        ),
        (
            "customer.subscription.deleted",
            "subscription",
            "subscriptions",
        ),
        ("invoice.created", "invoice", "invoices"),
        ("invoice.finalized", "invoice", "invoices"),
        ("invoice.paid", "invoice", "invoices"),
        ("invoice.payment_failed", "invoice", "invoices"),
        ("invoice.payment_succeeded", "invoice", "invoices"),
        ("invoice.updated", "invoice", "invoices"),
        ("price.created", "price", "prices"),
        ("price.updated", "price", "prices"),
        ("price.deleted", "price", "prices"),
        ("product.created", "product", "products"),
        ("product.updated", "product", "products"),
        ("product.deleted", "product", "products"),
    ];
    for (i, (event_type, resource, _)) in cases.iter().enumerate() {
        let object = stripe::object(resource, &format!("{resource}_{i}"));
        env.publish(&stripe::event(
            &format!("evt_cov_{i}"),
            event_type,
            now(),
            object,
        ))
        .await;
    }
    env.wait_drained().await;
    for (i, (event_type, resource, table)) in cases.iter().enumerate() {
        let sql = format!(
            "select count(*) from stripe.{table} where id = '{resource}_{i}' and _last_event_id = 'evt_cov_{i}'"
        );
        assert_eq!(
            env.scalar::<i64>(&sql).await,
            1,
            "{event_type} should land in {table}"
        );
    }
    let deleted: Vec<String> = sqlx::query_scalar("select id from stripe.products where deleted union all select id from stripe.prices where deleted order by 1")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        deleted,
        vec!["price_13".to_owned(), "product_16".to_owned()]
    );
    let ended: bool = env
        .scalar("select deleted from stripe.subscriptions where id = 'subscription_4'")
        .await;
    assert!(
        !ended,
        "a subscription.deleted event records the ended subscription, it is not a tombstone"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events")
            .await,
        cases.len() as i64
    );
    applier.stop().await;
}
