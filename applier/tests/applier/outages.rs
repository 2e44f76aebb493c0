//! The applier stopped, Postgres unreachable or restarting: nothing is lost, nothing goes to the dead letter.

use stripe_sync_testkit::eventually;
use stripe_sync_testkit::proxy::TcpProxy;

use crate::helpers::{PATIENCE, TestEnv, customer_event};

#[tokio::test]
async fn events_sent_while_the_applier_is_stopped_are_applied_when_it_starts() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_before",
        "customer.created",
        100,
        "cus_before",
        "a@example.com",
    ))
    .await;
    env.wait_drained().await;
    applier.stop().await;

    for i in 0..20 {
        env.publish(&customer_event(
            &format!("evt_while_{i}"),
            "customer.created",
            200,
            &format!("cus_while_{i}"),
            "b@example.com",
        ))
        .await;
    }
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers")
            .await,
        1,
        "nothing applies while stopped"
    );
    let applier = env.start_applier().await;
    env.wait_count("select count(*) from stripe.customers", 21)
        .await;
    applier.stop().await;
}

#[tokio::test]
async fn postgres_unreachable_for_a_while_then_the_applier_catches_up() {
    let mut env = TestEnv::new().await;
    let target = "127.0.0.1:5432".parse().unwrap();
    let proxy = TcpProxy::start(target).await;
    let via_proxy = env
        .db
        .url()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port()));
    assert_ne!(
        via_proxy,
        env.db.url(),
        "the test database URL goes through 127.0.0.1:5432"
    );
    env.env.insert("DATABASE_URL".into(), via_proxy);
    env.env
        .insert("STRIPE_SYNC__DATABASE__ACQUIRE_TIMEOUT".into(), "1s".into());
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_up",
        "customer.created",
        100,
        "cus_up",
        "a@example.com",
    ))
    .await;
    env.wait_drained().await;

    proxy.cut();
    for i in 0..50 {
        env.publish(&customer_event(
            &format!("evt_down_{i}"),
            "customer.created",
            200,
            &format!("cus_down_{i}"),
            "b@example.com",
        ))
        .await;
    }
    // The applier keeps the events in hand (unacked) and retries while Postgres is away.
    eventually(
        PATIENCE,
        "the applier holds the events while the database is away",
        || async { (env.ack_pending().await? > 0).then_some(()) },
    )
    .await;
    eventually(
        PATIENCE,
        "the applier tried to reconnect several times",
        || async { (proxy.refused() >= 3).then_some(()) },
    )
    .await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers")
            .await,
        1
    );

    proxy.restore();
    env.wait_count("select count(*) from stripe.customers", 51)
        .await;
    env.wait_drained().await;
    assert_eq!(
        env.dead_letters().await,
        0,
        "an outage must never fill the dead letter"
    );
    applier.stop().await;
}

#[tokio::test]
async fn postgres_killing_the_applier_connections_mid_stream_loses_nothing() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let total = 300;
    let kill = async {
        for round in 0..5 {
            // Wait for the applier to be connected, then cut every one of its connections, as a restart does.
            let killed: i64 = eventually(PATIENCE, "the applier is connected", || async {
                let killed: i64 = sqlx::query_scalar(
                    "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
                     where application_name = 'stripe-sync-applier' and datname = current_database()) k",
                )
                .fetch_one(&env.pool)
                .await
                .ok()?;
                (killed > 0).then_some(killed)
            })
            .await;
            assert!(killed > 0, "round {round}");
        }
    };
    let publish = async {
        for i in 0..total {
            env.publish(&customer_event(
                &format!("evt_k_{i}"),
                "customer.created",
                100,
                &format!("cus_k_{i}"),
                "k@example.com",
            ))
            .await;
        }
    };
    tokio::join!(kill, publish);
    env.wait_count("select count(*) from stripe.customers", total)
        .await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events")
            .await,
        total
    );
    assert_eq!(env.dead_letters().await, 0);
    applier.stop().await;
}
