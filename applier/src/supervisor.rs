//! The partition supervisor: keeps this applier working exactly the partitions the membership deals it, starting a
//! pump and a worker per partition and handing partitions over safely as appliers come and go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use stripe_sync_shared::subjects::Topology;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::apply::Applier;
use crate::consumer::{PULL_BATCH, Pump};
use crate::dead_letter::DeadLetter;
use crate::decision::Policy;
use crate::membership::{self, Membership};
use crate::settings::Settings;
use crate::worker::Worker;

/// What every partition of a running applier shares.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub settings: Settings,
    /// NATS.
    pub client: async_nats::Client,
    /// The events stream.
    pub stream: Stream,
    /// Its subjects and partitions.
    pub topology: Topology,
    /// Its epoch ([`crate::store::order_of`]).
    pub epoch: i32,
    /// Applies batches.
    pub applier: Arc<Applier>,
    /// The dead letter.
    pub dead_letter: Arc<DeadLetter>,
    /// One database slot per connection.
    pub slots: Arc<Semaphore>,
}

/// A partition this applier works.
struct Partition {
    stop: watch::Sender<bool>,
    release: oneshot::Sender<()>,
    pump: tokio::task::JoinHandle<()>,
    worker: tokio::task::JoinHandle<()>,
}

impl Shared {
    fn start(&self, partition: u32) -> Partition {
        let (stop, stop_rx) = watch::channel(false);
        let (release, release_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel::<jetstream::Message>(PULL_BATCH);
        let pump = Pump {
            client: self.client.clone(),
            stream: self.stream.clone(),
            settings: self.settings.applier.clone(),
            topology: self.topology.clone(),
            partition,
        };
        let worker = Worker {
            partition,
            writer: self.applier.clone(),
            dead_letter: self.dead_letter.clone(),
            slots: self.slots.clone(),
            policy: Policy::new(&self.settings.applier),
            batch_size: self.settings.applier.batch_size,
            batch_wait: self.settings.applier.batch_wait,
            epoch: self.epoch,
        };
        tracing::info!(partition, "working partition");
        Partition {
            stop,
            release,
            pump: tokio::spawn(pump.run(tx, stop_rx, release_rx)),
            worker: tokio::spawn(worker.run(rx)),
        }
    }

    /// Hands a partition over: the pump stops pulling and hands back what had arrived; the worker finishes its
    /// attempt in progress and hands back the rest; meanwhile the pump keeps the pin, so no other applier gets
    /// the partition before this one is done; then the pin is released, if still ours.
    async fn stop(&self, partition: u32, running: Partition) {
        let _ = running.stop.send(true);
        let _ = running.worker.await;
        let _ = running.release.send(());
        let _ = running.pump.await;
        // Its lag is the next owner's to report now.
        metrics::gauge!(stripe_sync_shared::metrics::names::PARTITION_LAG, "partition" => partition.to_string())
            .set(0.0);
        tracing::info!(partition, "handed the partition over");
    }
}

/// How often the membership is read and the partitions reconciled.
const TICK: Duration = Duration::from_millis(500);

/// How often the lag and dead-letter gauges are read from JetStream.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

/// What the gauge task read: each owned partition's pending count and the dead letter's size from JetStream, and
/// each table's last reconcile drift from Postgres.
type Read = (Vec<(u32, u64)>, Option<u64>, Vec<(String, f64)>);

/// Reads the gauges' values from JetStream in a task of its own: a slow NATS must never hold up the membership
/// heartbeat. The supervisor sets them (see [`set_gauges`]) once the task ends.
fn read_gauges(shared: &Shared, owned: Vec<u32>) -> tokio::task::JoinHandle<Read> {
    let (stream, client) = (shared.stream.clone(), shared.client.clone());
    let pool = shared.applier.pool().clone();
    let (applier, dlq_name) = (
        shared.settings.applier.clone(),
        shared.settings.stream.dlq_name.clone(),
    );
    tokio::spawn(async move {
        let mut lags = Vec::with_capacity(owned.len());
        for partition in owned {
            let name = crate::consumer::consumer_name(&applier, partition);
            if let Ok(info) = stream.consumer_info(&name).await {
                lags.push((partition, info.num_pending));
            }
        }
        let js = async_nats::jetstream::new(client);
        let dead = js
            .get_stream(&dlq_name)
            .await
            .ok()
            .map(|dlq| dlq.cached_info().state.messages);
        // Each table's drift in its last reconcile, whichever process ran it (`reconcile` is often a CronJob).
        let drift = sqlx::query_as::<_, (String, f64)>(
            "select distinct on (table_name) table_name, (changed + added + deleted)::float8 \
             from stripe.reconcile_tables where finished_at is not null and error is null and skipped is null order by table_name, run_id desc",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        (lags, dead, drift)
    })
}

/// Sets the gauges, each partition's only if this applier still works it (one handed over meanwhile is the next
/// owner's to report).
fn set_gauges((lags, dead, drift): Read, running: &BTreeMap<u32, Partition>) {
    use stripe_sync_shared::metrics::names;
    for (partition, pending) in lags {
        if running.contains_key(&partition) {
            metrics::gauge!(names::PARTITION_LAG, "partition" => partition.to_string())
                .set(pending as f64);
        }
    }
    if let Some(dead) = dead {
        metrics::gauge!(names::DEAD_LETTERS).set(dead as f64);
    }
    for (table, total) in drift {
        metrics::gauge!(names::RECONCILE_DRIFT, "table" => table).set(total);
    }
}

/// Works the partitions the membership deals this applier until `stop` turns true, then hands all of them over
/// and leaves the membership.
pub async fn run(shared: Shared, membership: Membership, mut stop: watch::Receiver<bool>) {
    let mut running: BTreeMap<u32, Partition> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    let heartbeat_every = shared.settings.applier.member_ttl / 3;
    let mut last_heartbeat = tokio::time::Instant::now();
    let mut last_gauges: Option<tokio::time::Instant> = None;
    let mut gauges: Option<tokio::task::JoinHandle<Read>> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
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
            membership::owned(shared.topology.partitions, &members, membership.id())
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
                .filter_map(|p| running.remove(&p).map(|t| shared.stop(p, t))),
        )
        .await;
        for p in desired {
            let ended = running
                .get(&p)
                .is_some_and(|t| t.worker.is_finished() || t.pump.is_finished());
            if ended && let Some(task) = running.remove(&p) {
                tracing::warn!(partition = p, "partition task ended; restarting it");
                shared.stop(p, task).await;
            }
            running.entry(p).or_insert_with(|| shared.start(p));
        }
        metrics::gauge!(stripe_sync_shared::metrics::names::PARTITIONS_OWNED)
            .set(running.len() as f64);
        if let Some(read) = gauges.take_if(|g| g.is_finished())
            && let Ok(read) = read.await
        {
            set_gauges(read, &running);
        }
        if gauges.is_none() && last_gauges.is_none_or(|t| t.elapsed() >= GAUGES_EVERY) {
            gauges = Some(read_gauges(&shared, running.keys().copied().collect()));
            last_gauges = Some(tokio::time::Instant::now());
        }
    }
    tracing::info!("stopping: finishing the batches in hand");
    membership.leave().await;
    futures::future::join_all(
        std::mem::take(&mut running)
            .into_iter()
            .map(|(p, t)| shared.stop(p, t)),
    )
    .await;
}
