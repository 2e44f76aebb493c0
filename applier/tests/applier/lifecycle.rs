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
    let applier = env.start_applier().await;
    let schema: i64 = env
        .scalar("select count(*) from information_schema.schemata where schema_name = 'stripe'")
        .await;
    assert_eq!(schema, 0, "no migration ran");
    applier.stop().await;
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
