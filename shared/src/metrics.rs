//! Prometheus metrics: one recorder per process, rendered at `/metrics` (each binary serves it on its metrics
//! port). Names follow Prometheus's conventions: the `stripe_sync_` prefix, base units (`_seconds`), `_total` for
//! counters. Every metric either binary records is named in [`names`] and described once here, so `/metrics` says
//! what each means.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The metric names.
pub mod names {
    /// Counter: webhook requests by `endpoint` and `outcome` (`stored`, `duplicate`, `broker_unavailable`, `busy`
    /// (past `http.max_in_flight`; endpoint `any`), or the 4xx code).
    pub const WEBHOOKS: &str = "stripe_sync_webhooks_total";
    /// Histogram: a webhook request, from its body read to the answer.
    pub const WEBHOOK_DURATION: &str = "stripe_sync_webhook_duration_seconds";
    /// Histogram: publishing an event until JetStream's ack.
    pub const PUBLISH_DURATION: &str = "stripe_sync_publish_duration_seconds";
    /// Counter: events by `object_type` and `outcome` (`applied`, `duplicate`, `stale`, `dead_lettered`).
    pub const EVENTS_APPLIED: &str = "stripe_sync_events_applied_total";
    /// Histogram: events per applied batch.
    pub const BATCH_SIZE: &str = "stripe_sync_batch_size";
    /// Histogram: one batch's transaction.
    pub const APPLY_DURATION: &str = "stripe_sync_apply_duration_seconds";
    /// Histogram: now minus the event's `created`, at commit: how fresh the tables are.
    pub const EVENT_AGE: &str = "stripe_sync_event_age_seconds";
    /// Gauge: messages of a `partition` not yet delivered to an applier (its consumer's pending count).
    pub const PARTITION_LAG: &str = "stripe_sync_partition_lag";
    /// Gauge: events in the dead letter.
    pub const DEAD_LETTERS: &str = "stripe_sync_dead_letters";
    /// Gauge: partitions this applier works.
    pub const PARTITIONS_OWNED: &str = "stripe_sync_partitions_owned";
    /// Counter: requests to Stripe's API by `endpoint` (the path template) and `status` (`error` when none came).
    pub const STRIPE_REQUESTS: &str = "stripe_sync_stripe_requests_total";
    /// Counter: Stripe's 429s by `reason` (`global-rate`, `endpoint-rate`, `lock_timeout`...).
    pub const RATE_LIMITED: &str = "stripe_sync_rate_limited_total";
    /// Counter: objects a backfill (or sync) published.
    pub const BACKFILL_OBJECTS: &str = "stripe_sync_backfill_objects_total";
    /// Gauge: rows of a `table` the last reconcile found different from the API.
    pub const RECONCILE_DRIFT: &str = "stripe_sync_reconcile_drift";

    /// Every name above (for checking dashboards and alert rules against the code).
    pub const ALL: &[&str] = &[
        WEBHOOKS,
        WEBHOOK_DURATION,
        PUBLISH_DURATION,
        EVENTS_APPLIED,
        BATCH_SIZE,
        APPLY_DURATION,
        EVENT_AGE,
        PARTITION_LAG,
        DEAD_LETTERS,
        PARTITIONS_OWNED,
        STRIPE_REQUESTS,
        RATE_LIMITED,
        BACKFILL_OBJECTS,
        RECONCILE_DRIFT,
    ];
}

/// Seconds, from a millisecond to ten minutes.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Events per batch.
const SIZES: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed globally on first use (a process that installed another keeps it, and this
/// one renders nothing).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.into()), SIZES))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics stays empty");
        }
        describe();
        handle
    })
}

/// Installs the recorder (at start, so nothing recorded before the first scrape is lost) and keeps it tidy: drains
/// histogram samples into their buckets every 5 s, so a Prometheus that stops scraping costs no memory. Run it as a
/// task for the process's life.
pub async fn maintain() {
    let handle = handle();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        handle.run_upkeep();
    }
}

/// The metrics in Prometheus's text format.
#[must_use]
pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(WEBHOOKS, "Webhook requests by endpoint and outcome");
    describe_histogram!(
        WEBHOOK_DURATION,
        Unit::Seconds,
        "Webhook requests, body read to answer"
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Publishing an event until JetStream's ack"
    );
    describe_counter!(EVENTS_APPLIED, "Events by object type and outcome");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per applied batch");
    describe_histogram!(APPLY_DURATION, Unit::Seconds, "One batch's transaction");
    describe_histogram!(
        EVENT_AGE,
        Unit::Seconds,
        "Now minus the event's created, at commit"
    );
    describe_gauge!(
        PARTITION_LAG,
        Unit::Count,
        "Messages of a partition not yet delivered"
    );
    describe_gauge!(DEAD_LETTERS, Unit::Count, "Events in the dead letter");
    describe_gauge!(
        PARTITIONS_OWNED,
        Unit::Count,
        "Partitions this applier works"
    );
    describe_counter!(
        STRIPE_REQUESTS,
        "Requests to Stripe's API by endpoint and status"
    );
    describe_counter!(RATE_LIMITED, "Stripe's 429 answers by reason");
    describe_counter!(BACKFILL_OBJECTS, "Objects a backfill or sync published");
    describe_gauge!(
        RECONCILE_DRIFT,
        Unit::Count,
        "Rows the last reconcile found different, by table"
    );
}
