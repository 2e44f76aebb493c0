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

#[tokio::test]
async fn an_event_whose_type_has_line_breaks_is_dead_lettered_with_safe_headers() {
    let env = TestEnv::with_env(&[("STRIPE_SYNC__APPLIER__DEAD_LETTER_AFTER", "2")]).await;
    let applier = env.start_applier().await;
    sqlx::query("alter table stripe.customers add constraint no_poison check (email is distinct from 'poison@example.com')")
        .execute(&env.pool)
        .await
        .unwrap();
    // Not from Stripe (ingest refuses such a type), but a stream can hold anything: a replay of an old stream.
    env.publish(&customer_event(
        "evt_crlf",
        "customer.created\r\nX-Injected: yes",
        100,
        "cus_crlf",
        "poison@example.com",
    ))
    .await;
    env.publish(&customer_event(
        "evt_next",
        "customer.created",
        100,
        "cus_next",
        "ok@example.com",
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(env.dead_letters().await, 1);
    let js = env.jetstream().await;
    let dlq = js
        .get_stream(format!("{}_DLQ", env.stream_name))
        .await
        .unwrap();
    let letter = dlq.get_raw_message(1).await.unwrap();
    assert_eq!(
        letter
            .headers
            .get(subjects::HEADER_EVENT_TYPE)
            .unwrap()
            .as_str(),
        "customer.created  X-Injected: yes"
    );
    assert!(letter.headers.get("X-Injected").is_none());
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers where id = 'cus_next'")
            .await,
        1,
        "the worker lives on"
    );
    applier.stop().await;
}

#[tokio::test]
async fn an_error_that_recurs_on_every_attempt_is_dead_lettered_after_give_up_after_not_retried_forever()
 {
    let env = TestEnv::with_env(&[
        ("STRIPE_SYNC__APPLIER__DEAD_LETTER_AFTER", "2"),
        ("STRIPE_SYNC__APPLIER__GIVE_UP_AFTER", "2s"),
    ])
    .await;
    let applier = env.start_applier().await;
    // A statement timeout on every attempt for one customer: usually transient, here forever.
    sqlx::raw_sql(
        "create function public.always_times_out() returns trigger language plpgsql as $$ begin \
           if new.email = 'slow@example.com' then \
             raise exception 'canceling statement due to statement timeout' using errcode = 'query_canceled'; \
           end if; return new; end $$; \
         create trigger always_times_out before insert or update on stripe.customers \
           for each row execute function public.always_times_out();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    env.publish(&customer_event(
        "evt_slow",
        "customer.created",
        100,
        "cus_slow",
        "slow@example.com",
    ))
    .await;
    env.publish(&customer_event(
        "evt_fast",
        "customer.created",
        100,
        "cus_fast",
        "fast@example.com",
    ))
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_fast'",
        1,
    )
    .await;
    env.wait_drained().await;
    assert_eq!(env.dead_letters().await, 1);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "retried for give_up_after first"
    );
    let (ok, list) = env.applier_cli(&["dlq", "list"]).await;
    assert!(ok && list.contains("57014"), "{list}");
    applier.stop().await;
}
