//! Postgres locked down: TLS as `sslmode` in DATABASE_URL asks (verified against a private CA), and the
//! least-privilege roles of deploy/postgres/roles.sql running the applier.

use std::path::Path;

use sqlx::Connection as _;
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::postgres::TestPostgres;
use stripe_sync_testkit::stripe::now;
use stripe_sync_testkit::tls::TestCa;
use stripe_sync_testkit::unique_name;

use crate::helpers::{TestEnv, customer_event};

/// `url` with its user and password replaced.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

async fn connects(url: &str) -> Result<(), String> {
    // As the applier does before it connects (two TLS backends are linked in).
    stripe_sync_shared::nats::install_tls_provider();
    sqlx::PgConnection::connect(url)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// An event published to the stream ends as its customer's row, read through `env.pool`.
async fn an_event_lands(env: &TestEnv, id: &str) {
    let customer = format!("cus_{id}");
    env.publish(&customer_event(
        &format!("evt_{id}"),
        "customer.created",
        now(),
        &customer,
        "ada@example.com",
    ))
    .await;
    env.wait_count(
        &format!("select count(*) from stripe.customers where id = '{customer}'"),
        1,
    )
    .await;
}

#[tokio::test]
async fn the_applier_reaches_a_tls_only_postgres_when_sslmode_asks_and_verifies_its_ca() {
    let ca = TestCa::new();
    let (cert, key) = ca.pair("server");
    let pg = TestPostgres::start_tls_only(&cert, &key);
    let url = pg.url();

    let plain = connects(&format!("{url}?sslmode=disable")).await;
    assert!(
        plain.as_ref().is_err_and(|e| e.contains("no encryption")),
        "{plain:?}"
    );
    // verify-full trusts public CAs only, unless sslrootcert names the private one.
    assert!(
        connects(&format!("{url}?sslmode=verify-full"))
            .await
            .is_err()
    );
    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        ca.ca().display()
    );
    connects(&verified).await.expect("verified TLS connection");
    let verify_ca = verified.replace("verify-full", "verify-ca");
    connects(&verify_ca)
        .await
        .expect("verify-ca TLS connection");

    let env = TestEnv::with_database_url(&verified, &[]).await;
    let applier = env.start_applier().await;
    an_event_lands(&env, "tls").await;
    let encrypted: bool = env
        .scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .await;
    assert!(encrypted);
    applier.stop().await;
}

#[tokio::test]
async fn the_least_privilege_roles_run_the_applier_and_let_analysts_only_read() {
    let db = TestDb::create().await;
    let (owner, reader, password) = (
        unique_name("stripe_sync").to_lowercase(),
        unique_name("stripe_reader").to_lowercase(),
        "pw-least-privilege",
    );
    let sql = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres/roles.sql"),
    )
    .unwrap()
    // Roles are the server's, not the database's: names of this test's own.
    .replace("stripe_sync", &owner)
    .replace("stripe_reader", &reader)
    .replace("change-me", password);
    let admin = db.pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .expect("roles.sql runs");

    let as_owner = as_user(db.url(), &owner, password);
    let env = TestEnv::with_database_url(&as_owner, &[]).await;
    let applier = env.start_applier().await;
    an_event_lands(&env, "least").await;
    applier.stop().await;
    let superuser: bool = env
        .scalar("select rolsuper from pg_roles where rolname = current_user")
        .await;
    assert!(!superuser);

    // The analysts' role reads every table, the ones made after the grant included, and writes none.
    let mut analyst = admin.acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("set role {reader}")))
        .execute(&mut *analyst)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from stripe.customers")
        .fetch_one(&mut *analyst)
        .await
        .expect("analysts read");
    assert_eq!(rows, 1);
    let write = sqlx::query("delete from stripe.customers")
        .execute(&mut *analyst)
        .await
        .unwrap_err()
        .to_string();
    assert!(write.contains("permission denied"), "{write}");
    drop(analyst);
    drop(admin);
    drop(env);
    drop(db);
    let server = sqlx::PgPool::connect(&stripe_sync_testkit::db::admin_url())
        .await
        .unwrap();
    for role in [&owner, &reader] {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop role if exists {role}")))
            .execute(&server)
            .await;
    }
}
