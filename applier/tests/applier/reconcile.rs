//! Reconcile against the fake Stripe API: changes and deletions Stripe sent no event for are found and fixed.

use serde_json::{Value, json};
use stripe_sync_testkit::fake_stripe::PLATFORM;
use stripe_sync_testkit::stripe;

use crate::api_side::{fake, test_env, with};
use crate::helpers::customer_event;

fn customer(id: &str, created: i64, email: &str) -> Value {
    with("customer", id, created, json!({ "email": email }))
}

#[tokio::test]
async fn reconcile_finds_a_change_an_addition_and_a_deletion_stripe_sent_no_event_for() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    // More than a page (100): the walk pages with `starting_after`.
    for i in 0..105 {
        fake.put(
            PLATFORM,
            &customer(&format!("cus_r{i}"), now - 1000 + i, "old@example.com"),
        );
    }
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    let options = stripe_sync_applier::backfill::Options {
        objects: vec!["customers".into()],
        ..Default::default()
    };
    stripe_sync_applier::commands::backfill(&env.settings(), &options)
        .await
        .unwrap();
    env.wait_count("select count(*) from stripe.customers", 105)
        .await;

    // At Stripe, with no event: one customer changed, one deleted, one created.
    fake.put(PLATFORM, &customer("cus_r1", now - 999, "new@example.com"));
    fake.remove(PLATFORM, "customer", "cus_r3");
    fake.put(
        PLATFORM,
        &customer("cus_new", now - 10, "added@example.com"),
    );

    let report = stripe_sync_applier::commands::reconcile(&env.settings(), &["customers".into()])
        .await
        .unwrap();
    assert!(report.ok(), "{report}");
    let drift = &report.tables[0];
    assert_eq!(
        (
            drift.table.as_str(),
            drift.listed,
            drift.changed,
            drift.added,
            drift.deleted,
            drift.unlisted
        ),
        ("customers", 105, 1, 1, 1, 0),
        "{report}"
    );
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_r1' and email = 'new@example.com'",
        1,
    )
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_r3' and deleted",
        1,
    )
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_new' and not deleted",
        1,
    )
    .await;
    env.wait_drained().await;
    let recorded: (i64, i64, i64, i64) = sqlx::query_as(
        "select listed, changed, added, deleted from stripe.reconcile_tables \
         where run_id = $1 and table_name = 'customers'",
    )
    .bind(report.run)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        (105, 1, 1, 1),
        "the drift is recorded per run and table"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.reconcile_seen")
            .await,
        0,
        "the seen ids are cleared when the walk ends"
    );

    // Equal now: a second reconcile finds nothing, and reads nothing by id.
    let again = stripe_sync_applier::commands::reconcile(&env.settings(), &["customer".into()])
        .await
        .unwrap();
    assert_eq!(again.tables[0].total(), 0, "{again}");
    assert_eq!(again.tables[0].listed, 105, "{again}");
    assert_eq!(
        again.tables[0].unlisted, 0,
        "every row was seen in the list: none read by id ({again})"
    );
    applier.stop().await;
}

#[tokio::test]
async fn the_scheduled_reconcile_marks_an_object_deleted_without_an_event_as_deleted() {
    let fake = fake(&[]).await;
    let env = test_env(
        &fake,
        &[
            ("STRIPE_SYNC__RECONCILE__INTERVAL", "1s"),
            ("STRIPE_SYNC__RECONCILE__SHARE", "1"),
        ],
    )
    .await;
    let applier = env.start_applier().await;
    // A webhook created it; Stripe deleted it since and sent nothing (the fake never had it: 404).
    env.publish(&customer_event(
        "evt_gone",
        "customer.created",
        stripe::now() - 100,
        "cus_gone",
        "gone@example.com",
    ))
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_gone' and deleted",
        1,
    )
    .await;
    env.wait_count_at_least(
        "select count(*) from stripe.reconcile_tables where table_name = 'customers' and deleted = 1",
        1,
    )
    .await;
    applier.stop().await;
}

#[tokio::test]
async fn objects_without_a_mode_of_their_own_are_reconciled_in_the_keys_mode() {
    let fake = fake(&[]).await;
    // Stripe's files carry no `livemode`.
    let mut file = with("file", "file_r1", stripe::now() - 100, json!({}));
    file.as_object_mut().unwrap().remove("livemode");
    fake.put(PLATFORM, &file);
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    let objects = vec!["files".to_owned()];
    let options = stripe_sync_applier::backfill::Options {
        objects: objects.clone(),
        ..Default::default()
    };
    stripe_sync_applier::commands::backfill(&env.settings(), &options)
        .await
        .unwrap();
    env.wait_count(
        "select count(*) from stripe.files where id = 'file_r1' and not livemode",
        1,
    )
    .await;
    let report = stripe_sync_applier::commands::reconcile(&env.settings(), &objects)
        .await
        .unwrap();
    let drift = &report.tables[0];
    assert_eq!(
        (drift.listed, drift.total(), drift.unlisted),
        (1, 0, 0),
        "listed, equal, and not read again by id: {report}"
    );
    applier.stop().await;
}

/// A subscription (whose `*.deleted` event is an ordinary update) that Stripe answers 404 for: the row is recorded
/// deleted with the data it had, its items with it, counted once; a later reconcile finds nothing more. (A 404 used to
/// replace the row with `{id, object, deleted}`, null every column, leave it `deleted = false` and count it again on
/// every run.)
#[tokio::test]
async fn a_404_records_the_row_deleted_with_its_data_and_its_items_once() {
    let fake = fake(&[]).await;
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    let mut sub = with(
        "subscription",
        "sub_gone",
        stripe::now() - 100,
        json!({ "status": "active", "customer": "cus_kept" }),
    );
    let mut item = stripe::object("subscription_item", "si_gone");
    item["subscription"] = json!("sub_gone");
    sub["items"] = json!({ "object": "list", "data": [item], "has_more": false, "url": "/v1/subscription_items?subscription=sub_gone" });
    env.publish(&stripe::event(
        "evt_sub_gone",
        "customer.subscription.created",
        stripe::now() - 100,
        sub,
    ))
    .await;
    env.wait_drained().await;
    let report =
        stripe_sync_applier::commands::reconcile(&env.settings(), &["subscriptions".into()])
            .await
            .unwrap();
    assert_eq!(report.tables[0].deleted, 1, "{report}");
    env.wait_count(
        "select count(*) from stripe.subscriptions where id = 'sub_gone' and deleted \
         and status = 'active' and customer = 'cus_kept'",
        1,
    )
    .await;
    env.wait_count(
        "select count(*) from stripe.subscription_items where id = 'si_gone' and deleted",
        1,
    )
    .await;
    let again =
        stripe_sync_applier::commands::reconcile(&env.settings(), &["subscriptions".into()])
            .await
            .unwrap();
    assert_eq!(again.tables[0].total(), 0, "counted once: {again}");
    applier.stop().await;
}

/// A row marked deleted whose object Stripe still lists is drift: reconcile counts it and the row comes back.
#[tokio::test]
async fn a_listed_object_whose_row_says_deleted_is_drift_and_comes_back() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    fake.put(
        PLATFORM,
        &customer("cus_alive", now - 500, "alive@example.com"),
    );
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    // The same object, as a `customer.deleted` event carried it: the row's data equals what Stripe lists.
    let deleted = customer("cus_alive", now - 500, "alive@example.com");
    env.publish(&stripe::event(
        "evt_wrongly_deleted",
        "customer.deleted",
        now - 100,
        deleted,
    ))
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_alive' and deleted",
        1,
    )
    .await;
    let report = stripe_sync_applier::commands::reconcile(&env.settings(), &["customers".into()])
        .await
        .unwrap();
    assert_eq!(report.tables[0].changed, 1, "{report}");
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_alive' and not deleted",
        1,
    )
    .await;
    applier.stop().await;
}
