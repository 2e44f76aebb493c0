//! End to end: from the webhook's 200 to the event's transaction committed, at a steady rate, with ingest and one
//! applier running as processes. Commits are seen by polling `stripe.events` every 5 ms for the ids answered 200.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::nats::{TestNats, free_port};
use stripe_sync_testkit::unique_name;

use crate::applier::applier_env;
use crate::harness::{Binaries, Proc, wait_http_ok};
use crate::ingest::{SECRET, ingest_env};
use crate::loadgen::{Bodies, paced};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub rate: u32,
    pub seconds: u64,
    pub events: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Ingest's own answer time at this rate.
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
    pub ingest_peak_rss_mib: f64,
    pub applier_peak_rss_mib: f64,
}

pub async fn run(
    bins: &Binaries,
    nats: &TestNats,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<Report> {
    let stream = unique_name("BENCH_E2E");
    let db = TestDb::create().await;
    let port = free_port();
    let mut env = ingest_env(nats, &stream, port);
    env.extend(applier_env(nats, &db, &stream, "e2e"));
    let ingest = Proc::spawn(&bins.ingest, &[], &env, "e2e-ingest")?;
    wait_http_ok(port, "/readyz").await;
    let applier = Proc::spawn(&bins.applier, &["run"], &env, "e2e-applier")?;
    let pool = db.pool().await;
    // Ready when the applier has migrated and consumes: one event makes the round trip.
    let bodies = Arc::new(Bodies::new(SECRET, 500_000_000));
    paced(port, 50, Duration::from_secs(2), bodies.clone(), |_, _| {}).await?;
    stripe_sync_testkit::eventually(
        Duration::from_secs(60),
        "the applier is applying",
        || async {
            let n: i64 = sqlx::query_scalar("select count(*) from stripe.events")
                .fetch_one(&pool)
                .await
                .ok()?;
            (n > 0).then_some(())
        },
    )
    .await;

    let accepted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latency: Arc<Mutex<Histogram<u64>>> = Arc::new(Mutex::new(Histogram::new(3)?));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (accepted, latency, done, pool) = (
            accepted.clone(),
            latency.clone(),
            done.clone(),
            pool.clone(),
        );
        tokio::spawn(async move {
            let mut idle_since: Option<Instant> = None;
            loop {
                let pending: Vec<String> = accepted
                    .lock()
                    .map(|a| a.keys().cloned().collect())
                    .unwrap_or_default();
                if pending.is_empty() && done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if !pending.is_empty() {
                    let seen: Vec<String> =
                        sqlx::query_scalar("select id from stripe.events where _account_id = 'platform' and id = any($1)")
                            .bind(&pending)
                            .fetch_all(&pool)
                            .await
                            .unwrap_or_default();
                    let now = Instant::now();
                    if let (Ok(mut accepted), Ok(mut latency)) = (accepted.lock(), latency.lock()) {
                        for id in seen {
                            if let Some(at) = accepted.remove(&id) {
                                let _ = latency.record(now.duration_since(at).as_micros() as u64);
                            }
                        }
                    }
                }
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let on_accepted = {
        let accepted = accepted.clone();
        move |id: String, at: Instant| {
            if let Ok(mut a) = accepted.lock() {
                a.insert(id, at);
            }
        }
    };
    let http = paced(
        port,
        rate,
        Duration::from_secs(seconds),
        bodies,
        on_accepted,
    )
    .await?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await?;
    let lost = accepted.lock().map(|a| a.len()).unwrap_or(0);
    anyhow::ensure!(
        lost == 0,
        "{lost} accepted events never reached the database"
    );
    let latency = latency
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let report = Report {
        rate,
        seconds,
        events: latency.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: latency.max() as f64 / 1000.0,
        http_p50_ms: http.percentile_ms(0.5),
        http_p99_ms: http.percentile_ms(0.99),
        ingest_peak_rss_mib: ingest.peak_rss_mib(),
        applier_peak_rss_mib: applier.peak_rss_mib(),
    };
    ingest.stop().await;
    applier.stop().await;
    Ok(report)
}
