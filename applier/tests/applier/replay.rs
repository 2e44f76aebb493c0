//! Rebuilding the tables from the stream: into a dropped and recreated database, and with `--force` after a
//! restore that lost rows but kept the events' records.

use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use stripe_sync_testkit::db::admin_url;
use stripe_sync_testkit::stripe;

use crate::helpers::{TestEnv, customer_event};

/// A checksum of `id` and `_raw_data` (and the tombstone flag) of every table with raw data.
async fn checksums(pool: &PgPool) -> Vec<(String, String)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.columns \
         where table_schema = 'stripe' and column_name = '_raw_data' order by 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for table in tables {
        let deleted = if table == "events" {
            "''"
        } else {
            "deleted::text"
        };
        // Ordered by the whole text: a history view has several versions per id.
        let sql = format!(
            "select md5(coalesce(string_agg(v, ',' order by v), '')) from (select _account_id || '|' || id || '|' \
             || _raw_data::text || '|' || {deleted} as v from stripe.{table}) t"
        );
        let sum: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await
            .unwrap();
        out.push((table, sum));
    }
    out
}

/// Creates, updates, deletes and subscriptions with items, some late and some in the same second.
async fn publish_history(env: &TestEnv) {
    let mut rng = fastrand::Rng::with_seed(9);
    for i in 0..600 {
        let customer = format!("cus_r_{}", rng.usize(..80));
        let kind = [
            "customer.created",
            "customer.updated",
            "customer.updated",
            "customer.deleted",
        ][rng.usize(..4)];
        env.publish(&customer_event(
            &format!("evt_r_{i}"),
            kind,
            100 + rng.i64(0..40),
            &customer,
            &format!("r{i}@example.com"),
        ))
        .await;
    }
    for i in 0..100 {
        let mut sub = stripe::object("subscription", &format!("sub_r_{}", i % 20));
        let items: Vec<Value> = (0..rng.usize(1..4))
            .map(|j| {
                stripe::object(
                    "subscription_item",
                    &format!("si_r_{}_{}", i % 20, j + i % 3),
                )
            })
            .collect();
        sub["items"] = json!({ "object": "list", "data": items, "has_more": false, "url": "/v1/subscription_items" });
        env.publish(&stripe::event(
            &format!("evt_rs_{i}"),
            "customer.subscription.updated",
            200 + i as i64,
            sub,
        ))
        .await;
    }
}

async fn recreate(env: &TestEnv) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url())
        .await
        .unwrap();
    let name = env.db.name();
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "drop database {name} with (force)"
        )))
        .await
        .unwrap();
    admin
        .execute(sqlx::AssertSqlSafe(format!("create database {name}")))
        .await
        .unwrap();
}

/// Publishes the history, lets an applier apply it all, stops it; returns the tables' checksums.
async fn history_applied(env: &TestEnv) -> Vec<(String, String)> {
    let applier = env.start_applier().await;
    publish_history(env).await;
    env.wait_drained().await;
    applier.stop().await;
    checksums(&env.pool).await
}

#[tokio::test]
async fn replay_into_a_dropped_and_recreated_database_gives_identical_tables() {
    let env = TestEnv::new().await;
    let before = history_applied(&env).await;
    assert!(before.len() > 80);

    env.pool.close().await;
    recreate(&env).await;
    let (ok, output) = env.applier_cli(&["replay", "--from-seq", "1"]).await;
    assert!(ok, "{output}");
    assert!(output.contains("700 events read, 700 applied"), "{output}");
    let pool = env.db.pool().await;
    assert_eq!(checksums(&pool).await, before);

    // Replaying again changes nothing: every event is already there.
    let (ok, output) = env.applier_cli(&["replay", "--from-seq", "1"]).await;
    assert!(
        ok && output.contains("0 applied, 700 already present"),
        "{output}"
    );
    assert_eq!(checksums(&pool).await, before);
}

#[tokio::test]
async fn replay_force_repairs_rows_whose_events_are_already_recorded() {
    let env = TestEnv::new().await;
    let before = history_applied(&env).await;

    // A restore that brought back stripe.events but lost the customers.
    sqlx::query("truncate stripe.customers")
        .execute(&env.pool)
        .await
        .unwrap();
    let (ok, _) = env.applier_cli(&["replay", "--from-seq", "1"]).await;
    assert!(ok);
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers")
            .await,
        0,
        "without --force, recorded events are skipped"
    );
    let (ok, output) = env
        .applier_cli(&["replay", "--from-seq", "1", "--force"])
        .await;
    assert!(ok, "{output}");
    assert_eq!(
        checksums(&env.pool).await,
        before,
        "--force rebuilds the same state, still in event order"
    );
}

#[tokio::test]
async fn replay_since_a_time_reads_only_what_was_stored_after_it() {
    let env = TestEnv::new().await;
    env.publish(&customer_event(
        "evt_t_old",
        "customer.created",
        100,
        "cus_t_old",
        "old@example.com",
    ))
    .await;
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    // Stored times have sub-second precision: the next event is stored after `since`.
    env.publish(&customer_event(
        "evt_t_new",
        "customer.created",
        100,
        "cus_t_new",
        "new@example.com",
    ))
    .await;
    let (ok, output) = env.applier_cli(&["replay", "--since", &since]).await;
    assert!(ok, "{output}");
    assert!(output.contains("1 events read, 1 applied"), "{output}");
    assert_eq!(
        env.scalar::<String>("select string_agg(id, ',') from stripe.customers")
            .await,
        "cus_t_new"
    );
    let (ok, output) = env.applier_cli(&["replay"]).await;
    assert!(
        !ok && output.contains("--from-seq"),
        "a start is required: {output}"
    );
}

#[tokio::test]
async fn replay_until_applies_the_events_before_the_bound_even_fewer_than_a_batch() {
    let env = TestEnv::new().await;
    for i in 0..5 {
        env.publish(&customer_event(
            &format!("evt_u{i}"),
            "customer.created",
            100,
            &format!("cus_u{i}"),
            "u@example.com",
        ))
        .await;
    }
    // Stored times have sub-second precision: the events after `until` are stored after it.
    let until = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for i in 5..7 {
        env.publish(&customer_event(
            &format!("evt_u{i}"),
            "customer.created",
            100,
            &format!("cus_u{i}"),
            "u@example.com",
        ))
        .await;
    }
    let (ok, output) = env
        .applier_cli(&["replay", "--from-seq", "1", "--until", &until])
        .await;
    assert!(ok, "{output}");
    assert!(output.contains("5 events read, 5 applied"), "{output}");
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers")
            .await,
        5
    );
}

#[tokio::test]
async fn replay_force_orders_a_copy_stripe_sent_again_by_the_first_copys_place() {
    let env = TestEnv::new().await;
    let first = customer_event(
        "evt_f1",
        "customer.updated",
        100,
        "cus_f",
        "first@example.com",
    );
    let second = customer_event(
        "evt_f2",
        "customer.updated",
        100,
        "cus_f",
        "second@example.com",
    );
    env.publish(&first).await;
    env.publish(&second).await;
    // Stripe sends the first event again after the stream's duplicate window: a second copy, later in the stream.
    env.publish(&first).await;
    let applier = env.start_applier().await;
    env.wait_drained().await;
    applier.stop().await;
    let email = "select email from stripe.customers where id = 'cus_f'";
    assert_eq!(env.scalar::<String>(email).await, "second@example.com");
    let (ok, output) = env
        .applier_cli(&["replay", "--from-seq", "1", "--force", "--batch-size", "2"])
        .await;
    assert!(ok, "{output}");
    assert_eq!(
        env.scalar::<String>(email).await,
        "second@example.com",
        "the copy is re-applied at the place its event was first applied in, before evt_f2"
    );
}

#[tokio::test]
async fn a_stream_created_again_numbers_from_1_yet_its_events_still_come_after_the_old_ones() {
    let env = TestEnv::new().await;
    env.publish(&customer_event(
        "evt_e1",
        "customer.updated",
        100,
        "cus_e",
        "old-stream@example.com",
    ))
    .await;
    for i in 0..20 {
        env.publish(&customer_event(
            &format!("evt_pad{i}"),
            "customer.created",
            100,
            &format!("cus_pad{i}"),
            "p@example.com",
        ))
        .await;
    }
    let applier = env.start_applier().await;
    env.wait_drained().await;
    applier.stop().await;
    // The stream is deleted and created again (an operator's mistake, or a new NATS cluster): sequences restart.
    let js = env.jetstream().await;
    js.delete_stream(&env.stream_name).await.unwrap();
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_e2",
        "customer.updated",
        100,
        "cus_e",
        "new-stream@example.com",
    ))
    .await;
    env.wait_drained().await;
    applier.stop().await;
    assert_eq!(
        env.scalar::<String>("select email from stripe.customers where id = 'cus_e'")
            .await,
        "new-stream@example.com",
        "same second: the event of the newer stream wins, though its sequence (1) is lower"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.stream_epochs")
            .await,
        2
    );
}

/// A database synced under one account id refuses a process with another (a `replay` run without the appliers'
/// `STRIPE_ACCOUNT_ID` applied every event a second time under `platform`, doubling every row), before it writes
/// anything, and says how to change it; with the same id it replays.
#[tokio::test]
async fn a_process_with_another_account_id_refuses_the_database_and_writes_nothing() {
    let mut env = TestEnv::with_env(&[("STRIPE_ACCOUNT_ID", "acct_main")]).await;
    let before = history_applied(&env).await;
    let rows = "select count(*) from stripe.customers";
    let customers: i64 = env.scalar(rows).await;
    env.env.remove("STRIPE_ACCOUNT_ID");
    let (ok, output) = env
        .applier_cli(&["replay", "--from-seq", "1", "--force"])
        .await;
    assert!(!ok, "{output}");
    assert!(
        output.contains("\"acct_main\"") && output.contains("STRIPE_ACCOUNT_ID=acct_main"),
        "the message names the database's id and the setting: {output}"
    );
    assert_eq!(env.scalar::<i64>(rows).await, customers, "nothing doubled");
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers where _account_id = 'platform'")
            .await,
        0
    );
    env.env
        .insert("STRIPE_ACCOUNT_ID".into(), "acct_main".into());
    let (ok, output) = env
        .applier_cli(&["replay", "--from-seq", "1", "--force"])
        .await;
    assert!(ok, "{output}");
    assert_eq!(checksums(&env.pool).await, before);
}
