//! A poison event: dead-lettered after the configured attempts while everything else keeps flowing.

use stripe_sync_shared::subjects;

use crate::helpers::{TestEnv, customer_event};

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_the_partition_keeps_flowing() {
    let env = TestEnv::with_env(&[("STRIPE_SYNC__APPLIER__DEAD_LETTER_AFTER", "3")]).await;
    let applier = env.start_applier().await;
    env.wait_drained().await;
    // An operator's rule the event breaks: a constraint on the table.
    sqlx::query("alter table stripe.customers add constraint no_poison check (email is distinct from 'poison@example.com')")
        .execute(&env.pool)
        .await
        .unwrap();
    env.publish(&customer_event(
        "evt_ok_1",
        "customer.created",
        100,
        "cus_ok_1",
        "ok@example.com",
    ))
    .await;
    let poison_seq = env
        .publish(&customer_event(
            "evt_poison",
            "customer.created",
            100,
            "cus_poison",
            "poison@example.com",
        ))
        .await;
    env.publish(&customer_event(
        "evt_ok_2",
        "customer.created",
        100,
        "cus_ok_2",
        "ok@example.com",
    ))
    .await;

    // Its neighbours in the same partition (and batch) are applied without waiting for it.
    env.wait_count(
        "select count(*) from stripe.customers where id in ('cus_ok_1', 'cus_ok_2')",
        2,
    )
    .await;
    env.wait_drained().await;
    assert_eq!(env.dead_letters().await, 1);
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers where id = 'cus_poison'")
            .await,
        0
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events where id = 'evt_poison'")
            .await,
        0
    );

    let js = env.jetstream().await;
    let dlq = js
        .get_stream(format!("{}_DLQ", env.stream_name))
        .await
        .unwrap();
    let letter = dlq.get_raw_message(1).await.unwrap();
    assert_eq!(letter.subject.as_str(), "stripe.dlq.customer.created");
    let header = |name: &str| {
        letter
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header(subjects::HEADER_DLQ_ATTEMPTS), "3");
    assert_eq!(
        header(subjects::HEADER_DLQ_STREAM_SEQ),
        poison_seq.to_string()
    );
    assert!(
        header(subjects::HEADER_DLQ_ERROR).contains("no_poison"),
        "{}",
        header(subjects::HEADER_DLQ_ERROR)
    );
    let body: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(body["id"], "evt_poison");

    // The operator finds it, removes the cause, and redrives it through the normal path.
    let (ok, list) = env.applier_cli(&["dlq", "list"]).await;
    assert!(ok, "{list}");
    let line = list
        .lines()
        .find(|l| l.starts_with("evt_poison"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        line.contains("customer.created") && line.contains("no_poison"),
        "{line}"
    );
    let (ok, shown) = env.applier_cli(&["dlq", "show", "evt_poison"]).await;
    assert!(
        ok && shown.contains("Stripe-Sync-Attempts: 3") && shown.contains("poison@example.com"),
        "{shown}"
    );
    let (ok, output) = env.applier_cli(&["dlq", "redrive", "evt_poison"]).await;
    assert!(
        !ok && output.contains("still failing"),
        "the cause is still there: {output}"
    );
    assert_eq!(env.dead_letters().await, 1);

    sqlx::query("alter table stripe.customers drop constraint no_poison")
        .execute(&env.pool)
        .await
        .unwrap();
    let (ok, output) = env.applier_cli(&["dlq", "redrive", "evt_poison"]).await;
    assert!(ok && output.contains("applied"), "{output}");
    assert_eq!(
        env.scalar::<String>("select email from stripe.customers where id = 'cus_poison'")
            .await,
        "poison@example.com"
    );
    assert_eq!(
        env.dead_letters().await,
        0,
        "a redriven letter leaves the dead letter"
    );
    let (ok, output) = env.applier_cli(&["dlq", "redrive", "--all"]).await;
    assert!(!ok && output.contains("no dead letter"), "{output}");
    applier.stop().await;
}
