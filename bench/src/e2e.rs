//! End to end: from the webhook's 200 to the event's transaction committed, at a steady rate, with ingest and one
//! applier running as processes. Commits are observed with LISTEN/NOTIFY: a row trigger on `stripe.events`, added by
//! the benchmark, notifies each event id, and Postgres delivers notifications when the transaction commits. (Polling
//! for the pending ids instead cost Postgres more CPU the further the applier lagged, and so measured itself.)

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

/// Ids answered 200 and not yet seen committed, with when; and ids seen committed before their 200 was read.
#[derive(Default)]
struct Clock {
    accepted: HashMap<String, Instant>,
    early: std::collections::HashSet<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Report {
    pub rate: u32,
    pub seconds: u64,
    /// Accepted -> committed.
    #[serde(flatten)]
    pub latency: crate::soak::output::Latency,
    /// Ingest's own answer time at this rate.
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
    pub ingest_peak_rss_mib: f64,
    pub applier_peak_rss_mib: f64,
}

pub(crate) async fn run(
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

    sqlx::raw_sql(
        "create function public.bench_committed() returns trigger language plpgsql as $$ \
         begin perform pg_notify('bench_committed', new.id); return null; end $$; \
         create trigger bench_committed after insert on stripe.events \
         for each row execute function public.bench_committed();",
    )
    .execute(&pool)
    .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen("bench_committed").await?;

    let clock: Arc<Mutex<Clock>> = Arc::default();
    let latency: Arc<Mutex<Histogram<u64>>> = Arc::new(Mutex::new(Histogram::new(3)?));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (clock, latency, done) = (clock.clone(), latency.clone(), done.clone());
        tokio::spawn(async move {
            let mut idle_since: Option<Instant> = None;
            loop {
                let pending = clock.lock().map(|c| c.accepted.len()).unwrap_or(0);
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    if pending == 0 {
                        break;
                    }
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                }
                let Ok(Ok(note)) =
                    tokio::time::timeout(Duration::from_millis(100), listener.recv()).await
                else {
                    continue;
                };
                let now = Instant::now();
                if let (Ok(mut clock), Ok(mut latency)) = (clock.lock(), latency.lock()) {
                    if let Some(at) = clock.accepted.remove(note.payload()) {
                        let _ = latency.record(now.duration_since(at).as_micros() as u64);
                    } else {
                        // Committed before the client saw its 200: latency 0.
                        clock.early.insert(note.payload().to_owned());
                    }
                }
            }
        })
    };
    let on_accepted = {
        let (clock, latency) = (clock.clone(), latency.clone());
        move |id: String, at: Instant| {
            if let (Ok(mut clock), Ok(mut latency)) = (clock.lock(), latency.lock()) {
                if clock.early.remove(&id) {
                    let _ = latency.record(0);
                } else {
                    clock.accepted.insert(id, at);
                }
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
    observer.await?;
    let lost = clock.lock().map(|c| c.accepted.len()).unwrap_or(0);
    anyhow::ensure!(
        lost == 0,
        "{lost} accepted events never reached the database"
    );
    let latency = latency
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let report = Report {
        rate,
        seconds,
        latency: crate::soak::output::Latency::of(&latency),
        http_p50_ms: http.percentile_ms(0.5),
        http_p99_ms: http.percentile_ms(0.99),
        ingest_peak_rss_mib: ingest.peak_rss_mib(),
        applier_peak_rss_mib: applier.peak_rss_mib(),
    };
    ingest.stop().await;
    applier.stop().await;
    Ok(report)
}
