//! Building and running the applier: connect to Postgres (and migrate), to NATS (and check the streams), then run a
//! pump and a worker per partition until the shutdown future resolves.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Stream};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use stripe_sync_shared::nats::{self, SetupError};
use stripe_sync_shared::subjects::Topology;
use tokio::sync::{mpsc, watch};

use crate::apply::Applier;
use crate::consumer;
use crate::dead_letter::DeadLetter;
use crate::registry::Registry;
use crate::settings::Settings;
use crate::store;
use crate::worker::Worker;

/// A pool that connects on first use, so the applier starts (and waits) while Postgres is away.
pub fn database_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.database.url.expose_secret())
        .context("DATABASE_URL is not a valid Postgres URL")?
        .application_name("stripe-sync-applier");
    Ok(PgPoolOptions::new()
        .max_connections(settings.database.max_connections.max(1))
        .acquire_timeout(settings.database.acquire_timeout)
        .connect_lazy_with(options))
}

/// Runs the migrations, waiting for Postgres if it is not reachable yet.
pub async fn migrate_when_reachable(
    pool: &PgPool,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match store::migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(err))
                if crate::error::is_transient_sqlx(&err) => {}
            Err(err) => return Err(err).context("running migrations"),
        }
        tracing::warn!(retry_in = ?delay, "Postgres not reachable yet; waiting to run migrations");
        if consumer::wait_or_stop(stop, delay).await {
            anyhow::bail!("stopped while waiting for Postgres");
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Connects to NATS and waits until the events stream exists (the applier creates it if ingest has not yet).
pub async fn connect_streams(
    settings: &Settings,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<(jetstream::Context, Stream, Topology)> {
    let client = nats::connect(&settings.nats, "stripe-sync-applier", false).await?;
    let js = jetstream::new(client.clone());
    let mut delay = Duration::from_millis(200);
    loop {
        if client.connection_state() == async_nats::connection::State::Connected {
            match nats::ensure_events_stream(&js, &settings.stream, false).await {
                Ok(topology) => {
                    nats::ensure_dlq_stream(&js, &settings.stream).await?;
                    let stream = js
                        .get_stream(&settings.stream.name)
                        .await
                        .context("opening the events stream")?;
                    return Ok((js, stream, topology));
                }
                Err(SetupError::Incompatible(reason)) => anyhow::bail!(reason),
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "events stream not ready, retrying")
                }
            }
        } else {
            tracing::warn!("NATS not reachable yet; waiting");
        }
        if consumer::wait_or_stop(stop, delay).await {
            anyhow::bail!("stopped while waiting for NATS");
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Runs the applier until `shutdown` resolves; then every worker finishes and acks its batch, hands back what it
/// had not started (so another applier gets it at once), releases its pins, and the call returns.
pub async fn run_until(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let pool = database_pool(&settings)?;
    if settings.database.run_migrations {
        migrate_when_reachable(&pool, &mut stop_rx).await?;
        tracing::info!("migrations up to date");
    }
    let (js, stream, topology) = connect_streams(&settings, &mut stop_rx).await?;
    let applier = Arc::new(Applier::new(
        pool.clone(),
        Registry::shipped(),
        settings.applier.account_id.clone(),
    ));
    let dead_letter = DeadLetter::new(js.clone(), topology.clone());
    tracing::info!(stream = %settings.stream.name, partitions = topology.partitions, "applier running");

    let mut tasks = Vec::new();
    for partition in 0..topology.partitions {
        let (tx, rx) = mpsc::channel(settings.applier.batch_size.max(1));
        let (pin_tx, pin_rx) = watch::channel(None);
        let pump = tokio::spawn(consumer::pump(
            stream.clone(),
            settings.applier.clone(),
            topology.clone(),
            partition,
            tx,
            stop_rx.clone(),
            pin_tx,
        ));
        let worker = Worker {
            partition,
            applier: applier.clone(),
            dead_letter: dead_letter.clone(),
            settings: settings.applier.clone(),
        };
        let worker = tokio::spawn(worker.run(rx, stop_rx.clone()));
        tasks.push((partition, pump, worker, pin_rx));
    }

    let _ = stop_rx.wait_for(|s| *s).await;
    tracing::info!("stopping: finishing the batches in hand");
    for (partition, pump, worker, pin_rx) in tasks {
        let _ = worker.await;
        let _ = pump.await;
        let our_pin = pin_rx.borrow().clone();
        consumer::release_pin(&stream, &settings.applier, partition, our_pin).await;
    }
    stopper.abort();
    if let Err(err) = js.client().flush().await {
        tracing::warn!(error = %err, "flushing acks at shutdown failed");
    }
    pool.close().await;
    tracing::info!("applier stopped");
    Ok(())
}
