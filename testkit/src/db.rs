//! A fresh Postgres database per test, dropped afterwards.

use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

static ADMIN_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Server to create test databases on: the one given to [`use_server`], else `$DATABASE_URL`, else the local
/// trust-auth server.
pub fn admin_url() -> String {
    if let Some(url) = ADMIN_URL.get() {
        return url.clone();
    }
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates databases on this server from now on (e.g. a private cluster started by the benchmarks).
pub fn use_server(url: String) {
    let _ = ADMIN_URL.set(url);
}

/// A database of its own; dropped (with any connections still open) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn create() -> Self {
        let name = crate::unique_name("stripe_sync_test");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("connecting to Postgres (is it running? see scripts/test.sh)");
        admin
            .execute(sqlx::AssertSqlSafe(format!("create database {name}")))
            .await
            .unwrap();
        admin.close().await;
        let url = with_database(&admin_url(), &name);
        Self { name, url }
    }

    /// Connection URL of the database.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Database name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A small pool to inspect the database from a test.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: use a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_url())
                    .await
                {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            "drop database if exists {name} with (force)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Replaces the database name in a Postgres URL.
#[must_use]
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let root = match base.rfind('/') {
        Some(i) if i > base.find("//").map_or(0, |j| j + 1) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{root}/{database}?{q}"),
        None => format!("{root}/{database}"),
    }
}
