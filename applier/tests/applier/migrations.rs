//! Migrations: a database migrated before 0001-0005 were squashed is upgraded in place to exactly the schema a fresh
//! one gets, keeping its data; and the operator commands leave migrations alone when told to.

use sqlx::PgPool;
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::stripe;

use crate::helpers::{TestEnv, customer_event};

/// Every column (in order), key, index and function of schema `stripe`.
async fn schema(pool: &PgPool) -> Vec<String> {
    let mut out: Vec<String> = sqlx::query_scalar(
        "select format('%s.%s %s %s %s %s', c.table_name, c.column_name, c.data_type, c.is_nullable, \
           coalesce(c.column_default, ''), coalesce(a.attcompression::text, '')) \
         from information_schema.columns c \
         join pg_attribute a on a.attrelid = format('stripe.%I', c.table_name)::regclass \
           and a.attname = c.column_name \
         where c.table_schema = 'stripe' order by c.table_name, c.ordinal_position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    out.extend(
        sqlx::query_scalar::<_, String>(
            "select indexdef from pg_indexes where schemaname = 'stripe' order by indexname",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    );
    out.extend(
        sqlx::query_scalar::<_, String>(
            "select p.proname || ' ' || md5(pg_get_functiondef(p.oid)) from pg_proc p \
             join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'stripe' order by 1",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    );
    out
}

async fn migrated_before_the_squash() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let dir = stripe_sync_testkit::testdata_dir().join("pre-squash-migrations");
    sqlx::migrate::Migrator::new(dir)
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    (db, pool)
}

#[tokio::test]
async fn a_database_migrated_before_the_squash_is_upgraded_in_place_keeping_its_data() {
    let (_old, pool) = migrated_before_the_squash().await;
    // Rows as the previous release wrote them.
    for sql in [
        "insert into stripe.events (_account_id, id, type, created, livemode, _stream_seq, _raw_data) \
           values ('platform', 'evt_old', 'customer.created', 100, null, 7, '{}')",
        "insert into stripe.customers (_account_id, id, email, livemode, _raw_data, _last_event_id, \
           _last_event_created, _last_event_seq) values ('platform', 'cus_old', 'old@example.com', null, \
           '{\"id\": \"cus_old\", \"livemode\": true}', 'evt_old', 100, 7)",
        "insert into stripe.products (_account_id, id, livemode, deleted, _raw_data, _last_event_created, \
           _last_event_seq) values ('platform', 'prod_gone', false, true, '{}', 100, 8)",
        "insert into stripe.subscriptions (_account_id, id, livemode, _raw_data, _last_event_created, \
           _last_event_seq) values ('acct_1', 'sub_old', true, '{}', 100, 9)",
        "insert into stripe.subscription_items (_account_id, id, _parent_id, livemode, _raw_data, \
           _last_event_created, _last_event_seq) values ('acct_1', 'si_old', 'sub_old', true, '{}', 100, 9)",
        "insert into stripe.incomplete_lists (_account_id, parent_table, parent_id, field, child_table) \
           values ('acct_1', 'subscriptions', 'sub_old', 'items', 'subscription_items')",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    stripe_sync_applier::migrate::run(&pool).await.unwrap();

    let fresh_db = TestDb::create().await;
    let fresh = fresh_db.pool().await;
    stripe_sync_applier::migrate::run(&fresh).await.unwrap();
    let (upgraded, expected) = (schema(&pool).await, schema(&fresh).await);
    let differ: Vec<_> = upgraded
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(
        upgraded.len() == expected.len() && differ.is_empty(),
        "{} vs {} lines; first differences: {differ:#?}",
        upgraded.len(),
        expected.len()
    );

    let customer: (bool, i32, String) = sqlx::query_as(
        "select livemode, _last_event_rank, email from stripe.customers where id = 'cus_old'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        customer,
        (true, 2, "old@example.com".into()),
        "livemode from the object"
    );
    let tombstone: i32 =
        sqlx::query_scalar("select _last_event_rank from stripe.products where id = 'prod_gone'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tombstone, 100_002, "a tombstone still wins its second");
    let marker: bool = sqlx::query_scalar("select livemode from stripe.incomplete_lists")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(marker, "the marker takes its parent's mode");
    let item: String =
        sqlx::query_scalar("select _parent_id from stripe.subscription_items where id = 'si_old'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(item, "sub_old");

    // Its history is now the squashed one: migrating again is a no-op, and new events apply.
    let history: Vec<i64> = sqlx::query_scalar("select version from _sqlx_migrations order by 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    let shipped: Vec<i64> = stripe_sync_applier::store::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(history, shipped);
    stripe_sync_applier::migrate::run(&pool).await.unwrap();
    let applier = stripe_sync_applier::apply::Applier::new(
        pool.clone(),
        stripe_sync_applier::registry::Registry::shipped(),
        "platform",
    );
    let event = customer_event(
        "evt_new",
        "customer.updated",
        200,
        "cus_old",
        "new@example.com",
    );
    let event =
        stripe_sync_applier::event::Incoming::parse(8, &serde_json::to_vec(&event).unwrap())
            .unwrap();
    applier
        .apply(&[event], stripe_sync_applier::apply::Mode::Normal)
        .await
        .unwrap();
    let emails: Vec<(bool, String)> = sqlx::query_as(
        "select livemode, email from stripe.customers where id = 'cus_old' order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        emails,
        vec![
            (false, "new@example.com".into()),
            (true, "old@example.com".into())
        ],
        "the new test-mode event has its own row; the live one is kept"
    );
}

#[tokio::test]
async fn with_run_migrations_off_the_commands_refuse_an_unmigrated_database_and_leave_it_alone() {
    let env = TestEnv::with_env(&[("STRIPE_SYNC__DATABASE__RUN_MIGRATIONS", "false")]).await;
    env.publish(&stripe::event(
        "evt_cli",
        "customer.created",
        100,
        stripe::object("customer", "cus_cli"),
    ))
    .await;
    for args in [
        &["replay", "--from-seq", "1"][..],
        &["dlq", "redrive", "--all"][..],
    ] {
        let (ok, output) = env.applier_cli(args).await;
        assert!(!ok, "{args:?}: {output}");
        assert!(
            output.contains("stripe-sync-applier migrate"),
            "{args:?}: {output}"
        );
    }
    let schema: i64 = env
        .scalar("select count(*) from information_schema.schemata where schema_name = 'stripe'")
        .await;
    assert_eq!(schema, 0, "no migration ran");
}
