//! Ingest throughput: signed webhooks per second with durable acks, against the same load on a no-op axum handler
//! (the ceiling of HTTP on this machine with this load generator).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use stripe_sync_testkit::nats::{TestNats, free_port};
use stripe_sync_testkit::unique_name;

use crate::harness::{Binaries, Proc, wait_http_ok};
use crate::loadgen::{Bodies, LoadResult, closed_loop};

pub(crate) const SECRET: &str = "whsec_bench";

/// One load run's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Run {
    pub rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub failed: u64,
    pub peak_rss_mib: f64,
}

impl Run {
    fn from(result: &LoadResult, peak_rss_mib: f64) -> Self {
        Self {
            rate: result.rate(),
            p50_ms: result.percentile_ms(0.50),
            p90_ms: result.percentile_ms(0.90),
            p99_ms: result.percentile_ms(0.99),
            p999_ms: result.percentile_ms(0.999),
            failed: result.failed,
            peak_rss_mib,
        }
    }
}

/// Ingest and its ceilings.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Report {
    pub connections: usize,
    pub ingest: Run,
    pub noop: Run,
    /// JetStream alone: the same bodies published by 64 concurrent publishers, each waiting for its ack (no HTTP).
    pub jetstream_only: f64,
}

/// Durable publishes per second with no HTTP in front: the machine's bound for JetStream's part of ingest.
async fn jetstream_only(
    nats: &TestNats,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let stream = unique_name("BENCH_JS");
    let topology = stripe_sync_shared::nats::ensure_events_stream(
        &js,
        &crate::applier::stream_settings(&stream),
        true,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let bodies = Arc::new(Bodies::new(SECRET, 0));
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (js, bodies, done, stop, topology) = (
            js.clone(),
            bodies.clone(),
            done.clone(),
            stop.clone(),
            topology.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (body, _, event_id) = bodies.next();
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    stripe_sync_shared::subjects::HEADER_MSG_ID,
                    event_id.as_str(),
                );
                let subject =
                    topology.event_subject(topology.partition_of(&event_id), "customer.updated");
                if let Ok(ack) = js.publish_with_headers(subject, headers, body).await
                    && ack.await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = (done.load(Ordering::Relaxed), std::time::Instant::now());
    tokio::time::sleep(duration).await;
    let rate = (done.load(Ordering::Relaxed) - start.0) as f64 / start.1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    Ok(rate)
}

/// Environment of an ingest process against `nats` and `stream`.
pub(crate) fn ingest_env(nats: &TestNats, stream: &str, port: u16) -> HashMap<String, String> {
    HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("METRICS_PORT".into(), "0".into()),
        ("PORT".into(), port.to_string()),
        ("STRIPE_SYNC__HTTP__HOST".into(), "127.0.0.1".into()),
        ("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()),
        ("STRIPE_SYNC__STREAM__NAME".into(), stream.into()),
        (
            "STRIPE_SYNC__STREAM__SUBJECT_PREFIX".into(),
            stream.to_lowercase(),
        ),
        ("RUST_LOG".into(), "warn".into()),
    ])
}

/// Runs both under `connections` connections for `duration` each (after a warm-up).
pub(crate) async fn run(
    bins: &Binaries,
    nats: &TestNats,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Report> {
    let warmup = Duration::from_secs(2);
    let port = free_port();
    let noop = Proc::spawn(
        &bins.bench,
        &["noop-server", "--port", &port.to_string()],
        &HashMap::new(),
        "noop",
    )?;
    wait_http_ok(port, "/healthz").await;
    let load = |port| {
        closed_loop(
            port,
            "/webhooks",
            connections,
            warmup,
            duration,
            Arc::new(Bodies::new(SECRET, 0)),
        )
    };
    let noop_run = Run::from(&load(port).await?, noop.peak_rss_mib());
    noop.stop().await;

    let port = free_port();
    let ingest = Proc::spawn(
        &bins.ingest,
        &[],
        &ingest_env(nats, &unique_name("BENCH_INGEST"), port),
        "ingest",
    )?;
    wait_http_ok(port, "/readyz").await;
    let ingest_run = Run::from(&load(port).await?, ingest.peak_rss_mib());
    ingest.stop().await;
    let jetstream_only = jetstream_only(nats, connections, duration).await?;
    Ok(Report {
        connections,
        ingest: ingest_run,
        noop: noop_run,
        jetstream_only,
    })
}

/// The no-op ceiling: axum reading the body and answering 200, nothing else.
pub(crate) async fn noop_server(port: u16) -> anyhow::Result<()> {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/webhooks",
            post(|_body: bytes::Bytes| async { r#"{"received":true}"# }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
