//! Prometheus metrics: both binaries serve them on their metrics port, and they move as events flow.

use stripe_sync_testkit::{eventually, stripe};

use crate::helpers::{PATIENCE, TestEnv, customer_event, post_signed};

/// The sum of the samples of `name` whose labels include `labels`, in a Prometheus text scrape.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let has = |(k, v): &(&str, &str)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        };
        if labels.iter().all(has) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus's text format"
    );
    response.text().await.unwrap()
}

#[tokio::test]
async fn both_binaries_export_metrics_that_move_as_events_flow() {
    let env = TestEnv::new().await;
    let (ingest, ingest_metrics, _ingest) = env.start_ingest_with_metrics().await;
    let applier = env.start_applier().await;
    let applier_metrics = format!("http://127.0.0.1:{}", applier.metrics_port);
    let http = reqwest::Client::new();
    for probe in ["healthz", "readyz"] {
        let status = http
            .get(format!("{applier_metrics}/{probe}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "the applier's {probe}");
    }
    // No scrape before the events: what happens before the first scrape counts too.

    let now = stripe::now();
    let events: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            serde_json::to_vec(&customer_event(
                &format!("evt_m{i}"),
                "customer.created",
                now - 60,
                &format!("cus_m{i}"),
                "m@example.com",
            ))
            .unwrap()
        })
        .collect();
    for body in &events {
        assert_eq!(post_signed(&http, &ingest, body).await, 200);
    }
    assert_eq!(
        post_signed(&http, &ingest, &events[0]).await,
        200,
        "a re-sent event"
    );
    let forged = http
        .post(format!("{ingest}/webhooks"))
        .header(
            "stripe-signature",
            stripe::sign("whsec_wrong", now, &events[1]),
        )
        .body(events[1].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    env.wait_count("select count(*) from stripe.customers", 20)
        .await;

    let webhooks = scrape(&http, &ingest_metrics).await;
    let count = |outcome| {
        sample(
            &webhooks,
            "stripe_sync_webhooks_total",
            &[("endpoint", "default"), ("outcome", outcome)],
        )
    };
    assert_eq!(count("stored"), Some(20.0), "{webhooks}");
    assert_eq!(count("duplicate"), Some(1.0), "{webhooks}");
    assert_eq!(count("signature_mismatch"), Some(1.0), "{webhooks}");
    assert!(
        sample(&webhooks, "stripe_sync_publish_duration_seconds_count", &[]) >= Some(21.0),
        "{webhooks}"
    );
    for histogram in [
        "stripe_sync_webhook_duration_seconds",
        "stripe_sync_publish_duration_seconds",
    ] {
        assert!(
            webhooks.contains(&format!("# TYPE {histogram} histogram"))
                && webhooks.contains(&format!("{histogram}_bucket{{le=")),
            "{histogram} is a histogram with buckets (summaries can't be aggregated): {webhooks}"
        );
    }

    // An event older than the row it names: counted once, as stale.
    let older = customer_event(
        "evt_m_old",
        "customer.updated",
        now - 120,
        "cus_m0",
        "old@example.com",
    );
    assert_eq!(
        post_signed(&http, &ingest, &serde_json::to_vec(&older).unwrap()).await,
        200
    );

    // The applier's: one outcome per event, the batches, the events' age, the partitions it works and their lag.
    eventually(
        PATIENCE,
        "the applier's metrics show the events",
        || async {
            let applied = scrape(&http, &applier_metrics).await;
            let rows = sample(
                &applied,
                "stripe_sync_events_applied_total",
                &[("object_type", "customer"), ("outcome", "applied")],
            )?;
            let stale = sample(
                &applied,
                "stripe_sync_events_applied_total",
                &[("object_type", "customer"), ("outcome", "stale")],
            )?;
            let aged = sample(&applied, "stripe_sync_event_age_seconds_count", &[])?;
            let batches = sample(&applied, "stripe_sync_batch_size_sum", &[])?;
            let owned = sample(&applied, "stripe_sync_partitions_owned", &[])?;
            let lag = sample(&applied, "stripe_sync_partition_lag", &[])?;
            let bucketed = applied.contains("# TYPE stripe_sync_event_age_seconds histogram")
                && applied.contains("# TYPE stripe_sync_batch_size histogram");
            (rows == 20.0
                && stale == 1.0
                && aged == 21.0
                && batches == 21.0
                && owned == 16.0
                && lag == 0.0
                && bucketed)
                .then_some(())
        },
    )
    .await;
    applier.stop().await;
}

#[tokio::test]
async fn the_applier_is_alive_but_not_ready_while_it_waits_for_nats() {
    let port = stripe_sync_testkit::nats::free_port().to_string();
    let mut env = TestEnv::with_env(&[("METRICS_PORT", &port)]).await;
    env.nats.stop();
    let settings = env.settings();
    let building = tokio::spawn(stripe_sync_applier::startup::Application::build(settings));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let response = http.get(format!("{base}/{path}")).send().await.ok()?;
            Some((response.status().as_u16(), response.text().await.ok()?))
        }
    };
    // Kubernetes must not restart a process that waits for its dependencies: alive, not ready, saying why.
    let (live, _) = eventually(PATIENCE, "the probes listen while NATS is down", || {
        status("healthz")
    })
    .await;
    assert_eq!(live, 200);
    let (ready, why) = status("readyz").await.unwrap();
    assert_eq!((ready, why.contains("starting")), (503, true), "{why}");
    assert!(!building.is_finished());

    env.nats.resume();
    let app = building
        .await
        .unwrap()
        .expect("the applier builds once NATS is back");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    eventually(PATIENCE, "ready once it runs", || async {
        (status("readyz").await?.0 == 200).then_some(())
    })
    .await;
    let _ = tx.send(());
    running.await.unwrap().unwrap();
}
