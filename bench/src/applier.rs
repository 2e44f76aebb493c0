//! Applier throughput: draining a pre-filled stream with 1, 2 and 4 applier processes, and the memory they need,
//! with a backlog of 200,000 events and of 1,000,000.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::stream::{FuturesUnordered, StreamExt};
use stripe_sync_shared::event_head::RoutingHead;
use stripe_sync_shared::settings::StreamSettings;
use stripe_sync_shared::subjects;
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::unique_name;

use crate::events::Generator;
use crate::harness::{Binaries, Proc};

/// One drain.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Drain {
    pub appliers: usize,
    pub events: u64,
    pub rate: f64,
    pub seconds: f64,
    /// Highest peak RSS of the appliers.
    pub peak_rss_mib: f64,
    /// RSS of the first applier, sampled each second while draining.
    pub rss_samples_mib: Vec<f64>,
}

/// Stream settings of a benchmark stream.
pub(crate) fn stream_settings(name: &str) -> StreamSettings {
    // Each benchmark stream has its own subjects: streams on one server can't share them.
    StreamSettings {
        name: name.to_owned(),
        subject_prefix: name.to_lowercase(),
        dlq_name: format!("{name}_DLQ"),
        ..StreamSettings::default()
    }
}

/// Publishes `n` generated events to a new stream, as ingest would (subject, headers), pipelined.
pub(crate) async fn prefill(
    nats: &TestNats,
    stream: &str,
    n: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let topology =
        stripe_sync_shared::nats::ensure_events_stream(&js, &stream_settings(stream), true)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut generator = Generator::new(0.3, seed);
    let mut inflight = FuturesUnordered::new();
    for _ in 0..n {
        let body = generator.next_body();
        let head = RoutingHead::parse(&body)?;
        let subject = topology.event_subject(
            topology.partition_of(head.object_id.as_deref().unwrap_or(&head.id)),
            &head.event_type,
        );
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_MSG_ID, head.id.as_ref());
        headers.insert(subjects::HEADER_EVENT_TYPE, head.event_type.as_ref());
        drop(head);
        let ack = js
            .publish_with_headers(subject, headers, body.into())
            .await?;
        inflight.push(ack.into_future());
        if inflight.len() >= 2_048 {
            inflight.next().await.transpose()?;
        }
    }
    while inflight.next().await.transpose()?.is_some() {}
    Ok(())
}

/// Environment of an applier process.
pub(crate) fn applier_env(
    nats: &TestNats,
    db: &TestDb,
    stream: &str,
    consumer_prefix: &str,
) -> HashMap<String, String> {
    HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("METRICS_PORT".into(), "0".into()),
        ("DATABASE_URL".into(), db.url().to_owned()),
        ("STRIPE_SYNC__STREAM__NAME".into(), stream.into()),
        (
            "STRIPE_SYNC__STREAM__SUBJECT_PREFIX".into(),
            stream.to_lowercase(),
        ),
        (
            "STRIPE_SYNC__STREAM__DLQ_NAME".into(),
            format!("{stream}_DLQ"),
        ),
        (
            "STRIPE_SYNC__APPLIER__CONSUMER_PREFIX".into(),
            consumer_prefix.into(),
        ),
        ("RUST_LOG".into(), "warn".into()),
    ])
}

/// Events not yet acked by the consumers `<prefix>-p*`.
pub(crate) async fn remaining(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
    partitions: u32,
) -> Option<u64> {
    let stream = js.get_stream(stream).await.ok()?;
    let mut total = 0;
    for p in 0..partitions {
        let info = stream.consumer_info(format!("{prefix}-p{p}")).await.ok()?;
        total += info.num_pending + info.num_ack_pending as u64;
    }
    Some(total)
}

/// Drains `stream` (holding `events`) into a fresh database with `appliers` applier processes.
pub(crate) async fn drain(
    bins: &Binaries,
    nats: &TestNats,
    stream: &str,
    events: u64,
    appliers: usize,
) -> anyhow::Result<Drain> {
    let db = TestDb::create().await;
    let prefix = unique_name("bench");
    let env = applier_env(nats, &db, stream, &prefix);
    let migrate = Proc::spawn(&bins.applier, &["migrate"], &env, "applier-migrate")?;
    anyhow::ensure!(
        migrate.wait().await == Some(0),
        "migrate failed (see bench/out/logs/applier-migrate.log)"
    );
    // Experiments: BENCH_AFTER_MIGRATE_SQL runs after the migrations (e.g. to try another storage setting).
    if let Ok(sql) = std::env::var("BENCH_AFTER_MIGRATE_SQL") {
        sqlx::Executor::execute(&db.pool().await, sqlx::AssertSqlSafe(sql)).await?;
    }

    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let partitions = stripe_sync_shared::settings::StreamSettings::default()
        .partitions
        .get();
    let procs: Vec<Proc> = (0..appliers)
        .map(|i| {
            Proc::spawn(
                &bins.applier,
                &["run"],
                &env,
                &format!("applier-{appliers}x-{i}"),
            )
        })
        .collect::<Result<_, _>>()?;

    // Time from the first acknowledged event to the last: process start-up is not throughput.
    let mut first: Option<(Instant, u64)> = None;
    let mut samples = Vec::new();
    let mut last_sample = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (end, left_at_start) = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "drain did not finish in 30 minutes"
        );
        if let Some(left) = remaining(&js, stream, &prefix, partitions).await {
            if first.is_none() && left < events {
                first = Some((Instant::now(), left));
            }
            if left == 0 {
                let (start, left_then) = first.unwrap_or((Instant::now(), 0));
                break (Instant::now() - start, left_then);
            }
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            samples.push(procs[0].rss_mib());
            last_sample = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let peak = procs.iter().map(Proc::peak_rss_mib).fold(0.0, f64::max);
    for proc in procs {
        proc.stop().await;
    }
    let pool = db.pool().await;
    if std::env::var("BENCH_DEBUG").is_ok() {
        let scans: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "select relname::text, seq_scan, seq_tup_read, coalesce(idx_scan, 0) from pg_stat_user_tables \
             where seq_scan > 0 order by seq_tup_read desc limit 10",
        )
        .fetch_all(&pool)
        .await?;
        eprintln!("sequential scans (table, scans, rows read, index scans): {scans:?}");
    }
    let applied: i64 = sqlx::query_scalar("select count(*) from stripe.events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        applied as u64 == events,
        "only {applied} of {events} events were applied"
    );
    Ok(Drain {
        appliers,
        events,
        rate: left_at_start as f64 / end.as_secs_f64(),
        seconds: end.as_secs_f64(),
        peak_rss_mib: peak,
        rss_samples_mib: samples,
    })
}
