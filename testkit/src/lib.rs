//! Test helpers shared by the crates' integration tests and the benchmark: real services, nothing mocked but Stripe.
//!
//! - [`nats::TestNats`]: a private, current `nats-server` with JetStream on a free port, stoppable and restartable;
//! - [`db::TestDb`]: a fresh Postgres database per test;
//! - [`stripe`]: signed webhook requests and events built from Stripe's own examples in `testdata/stripe`;
//! - [`proxy::TcpProxy`]: a TCP proxy that can cut a service off, to simulate an outage;
//! - [`eventually`]: poll a condition with a deadline instead of sleeping.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod db;
pub mod fake_stripe;
pub mod history;
pub mod nats;
pub mod postgres;
pub mod proxy;
pub mod stripe;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// A name unique to this process and call, for databases, streams and directories.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of the repository's `testdata/` folder.
#[must_use]
pub fn testdata_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}
