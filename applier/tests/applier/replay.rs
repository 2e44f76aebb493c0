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
        let sql = format!(
            "select md5(coalesce(string_agg(_account_id || '|' || id || '|' || _raw_data::text || '|' || {deleted}, \
             ',' order by _account_id, id), '')) from stripe.{table}"
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
            100 + rng.i64(..40),
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
