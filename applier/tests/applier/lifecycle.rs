//! Migrations, the binary's subcommands and its shutdown.

use std::process::{Command, Stdio};

use stripe_sync_testkit::eventually;

use crate::helpers::{PATIENCE, TestEnv, customer_event};

fn applier_command(env: &TestEnv) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stripe-sync-applier"));
    command
        .envs(&env.env)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

#[tokio::test]
async fn the_migrate_subcommand_creates_the_schema_and_exits() {
    let env = TestEnv::new().await;
    let status = applier_command(&env).arg("migrate").status().unwrap();
    assert!(status.success());
    let tables: i64 = env
        .scalar("select count(*) from information_schema.tables where table_schema = 'stripe'")
        .await;
    assert!(tables >= 8, "{tables} tables");
    // Running it again is a no-op.
    assert!(
        applier_command(&env)
            .arg("migrate")
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn migrations_can_be_left_to_the_operator() {
    let mut env = TestEnv::new().await;
    env.env.insert(
        "STRIPE_SYNC__DATABASE__RUN_MIGRATIONS".into(),
        "false".into(),
    );
    // The applier waits for the operator's migration instead of migrating, or failing on a missing table.
    let mut build = tokio::spawn(stripe_sync_applier::startup::Application::build(
        env.settings(),
    ));
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(2), &mut build)
            .await
            .is_err(),
        "not ready without the schema"
    );
    let schema: i64 = env
        .scalar("select count(*) from information_schema.schemata where schema_name = 'stripe'")
        .await;
    assert_eq!(schema, 0, "no migration ran");
    let (ok, output) = env.applier_cli(&["migrate"]).await;
    assert!(ok, "{output}");
    let app = tokio::time::timeout(PATIENCE, build)
        .await
        .expect("ready once migrated")
        .unwrap()
        .expect("builds");
    app.run_until_stopped(async {}).await.unwrap();
}

#[tokio::test]
async fn the_binary_applies_events_and_exits_0_on_sigterm() {
    let env = TestEnv::new().await;
    env.publish(&customer_event(
        "evt_bin",
        "customer.created",
        100,
        "cus_bin",
        "bin@example.com",
    ))
    .await;
    let mut child = applier_command(&env).spawn().unwrap();
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_bin'",
        1,
    )
    .await;
    env.wait_drained().await;
    assert!(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    // It released its hold: nothing is left unacknowledged.
    eventually(PATIENCE, "nothing pending after a clean stop", || async {
        (env.ack_pending().await? == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_while_waiting_for_postgres_ends_the_applier_at_once_with_status_0() {
    let env = TestEnv::new().await;
    let port = stripe_sync_testkit::nats::free_port();
    let mut child = applier_command(&env)
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/none"),
        )
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut exited = tokio::task::spawn_blocking(move || child.wait().unwrap());
    // It is waiting: nothing answers on that port, and it retries instead of exiting.
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(2), &mut exited)
            .await
            .is_err(),
        "the applier waits for Postgres"
    );
    let signalled = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
    let exit = exited.await.unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(signalled.elapsed() < std::time::Duration::from_secs(5));
}
