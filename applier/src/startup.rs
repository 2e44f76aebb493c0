//! Building and running the applier: connect to Postgres (and migrate), to NATS (and check the streams), then run a
//! pump and a worker per partition until the shutdown future resolves.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::membership::{self, Membership};
use crate::registry::Registry;
use crate::settings::Settings;
use crate::store;
use crate::worker::Worker;

/// A pool that connects on first use, so the applier starts (and waits) while Postgres is away.
pub fn database_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.database.url.expose_secret())
        .context("DATABASE_URL is not a valid Postgres URL")?
        .application_name("stripe-sync-applier")
        // The applier runs a few statement shapes with many typed-column expressions: plan them once per
        // connection, not at every execution (custom plans cost more than the batch itself at low rates).
        .options([("plan_cache_mode", "force_generic_plan")]);
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

/// What a running applier shares between its partitions.
struct Context {
    settings: Settings,
    stream: Stream,
    topology: Topology,
    applier: Arc<Applier>,
    dead_letter: DeadLetter,
    slots: Arc<tokio::sync::Semaphore>,
}

/// A partition this applier works: its pump, its worker, and the pin the server gave it.
struct Partition {
    stop: watch::Sender<bool>,
    pump: tokio::task::JoinHandle<()>,
    worker: tokio::task::JoinHandle<()>,
    pin: watch::Receiver<Option<String>>,
}

impl Context {
    fn start(&self, partition: u32) -> Partition {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = mpsc::channel(consumer::PULL_BATCH);
        let (pin_tx, pin) = watch::channel(None);
        let pump = tokio::spawn(consumer::pump(
            self.stream.clone(),
            self.settings.applier.clone(),
            self.topology.clone(),
            partition,
            tx,
            stop_rx.clone(),
            pin_tx,
        ));
        let worker = Worker {
            partition,
            slots: self.slots.clone(),
            applier: self.applier.clone(),
            dead_letter: self.dead_letter.clone(),
            settings: self.settings.applier.clone(),
        };
        let worker = tokio::spawn(worker.run(rx, stop_rx));
        tracing::info!(partition, "working partition");
        Partition {
            stop,
            pump,
            worker,
            pin,
        }
    }

    /// Stops a partition: the worker finishes and acks its batch and hands back the rest; then the pin is released
    /// so the partition's next applier starts at once.
    async fn stop(&self, partition: u32, running: Partition) {
        let _ = running.stop.send(true);
        let _ = running.worker.await;
        let _ = running.pump.await;
        let our_pin = running.pin.borrow().clone();
        consumer::release_pin(&self.stream, &self.settings.applier, partition, our_pin).await;
        tracing::info!(partition, "released partition");
    }
}

/// Runs the applier until `shutdown` resolves: joins the appliers' membership, works the partitions dealt to it
/// (taking over or handing back partitions as appliers come and go), and on shutdown finishes and acks every batch
/// in hand, hands back what it had not started, releases its pins and leaves.
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
    let membership =
        Membership::join(&js, &settings.stream.name, settings.applier.member_ttl).await?;
    let context = Context {
        applier: Arc::new(Applier::new(
            pool.clone(),
            Registry::shipped(),
            settings.applier.account_id.clone(),
        )),
        dead_letter: DeadLetter::new(js.clone(), topology.clone()),
        slots: Arc::new(tokio::sync::Semaphore::new(
            settings.database.max_connections.max(1) as usize,
        )),
        settings,
        stream,
        topology,
    };
    tracing::info!(
        stream = %context.settings.stream.name,
        partitions = context.topology.partitions,
        member = membership.id(),
        "applier running"
    );

    let mut running: BTreeMap<u32, Partition> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let heartbeat_every = context.settings.applier.member_ttl / 3;
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        if last_heartbeat.elapsed() >= heartbeat_every {
            match membership.heartbeat().await {
                Ok(()) => last_heartbeat = tokio::time::Instant::now(),
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "membership heartbeat failed")
                }
            }
        }
        let members = match membership.members().await {
            Ok(members) => members,
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "cannot read the members; keeping the current partitions");
                continue;
            }
        };
        let desired: BTreeSet<u32> =
            membership::owned(context.topology.partitions, &members, membership.id())
                .into_iter()
                .collect();
        let to_stop: Vec<u32> = running
            .keys()
            .copied()
            .filter(|p| !desired.contains(p))
            .collect();
        if !to_stop.is_empty() {
            tracing::info!(?to_stop, members = members.len(), "handing partitions over");
        }
        futures::future::join_all(
            to_stop
                .into_iter()
                .filter_map(|p| running.remove(&p).map(|t| context.stop(p, t))),
        )
        .await;
        for p in desired {
            let finished = running
                .get(&p)
                .is_some_and(|t| t.worker.is_finished() || t.pump.is_finished());
            if finished && let Some(task) = running.remove(&p) {
                tracing::warn!(partition = p, "partition task ended; restarting it");
                context.stop(p, task).await;
            }
            running.entry(p).or_insert_with(|| context.start(p));
        }
    }

    tracing::info!("stopping: finishing the batches in hand");
    membership.leave().await;
    futures::future::join_all(
        std::mem::take(&mut running)
            .into_iter()
            .map(|(p, t)| context.stop(p, t)),
    )
    .await;
    stopper.abort();
    if let Err(err) = js.client().flush().await {
        tracing::warn!(error = %err, "flushing acks at shutdown failed");
    }
    pool.close().await;
    tracing::info!("applier stopped");
    Ok(())
}
