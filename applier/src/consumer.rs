//! The NATS side of consuming: one durable pull consumer per partition in a pinned-client priority group (so one
//! applier at a time works a partition), and a pump that keeps pulling and hands messages to the partition's worker.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use stripe_sync_shared::subjects::Topology;
use tokio::sync::{mpsc, watch};

use crate::settings::ApplierSettings;

/// Messages one pull requests (and the worker's queue holds): enough to fill batches, little enough that 16
/// partitions waiting for a database slot hold a few MB, not the backlog.
pub const PULL_BATCH: usize = 128;

/// The priority group every applier pulls in.
pub const GROUP: &str = "appliers";

/// Durable consumer name of a partition.
pub fn consumer_name(settings: &ApplierSettings, partition: u32) -> String {
    format!("{}-p{partition}", settings.consumer_prefix)
}

/// Consumer config of a partition.
pub fn consumer_config(
    settings: &ApplierSettings,
    topology: &Topology,
    partition: u32,
) -> pull::Config {
    let name = consumer_name(settings, partition);
    pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!("stripe-sync applier, partition {partition}")),
        filter_subject: topology.partition_filter(partition),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        // Unlimited: the applier decides when an event is dead-lettered, never the server.
        max_deliver: -1,
        // Room for the batch being applied and the next one being gathered, twice over.
        max_ack_pending: (settings.batch_size * 4).max(64) as i64,
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_owned()],
        priority_timeout: settings.pin_timeout,
        ..Default::default()
    }
}

/// Creates (or updates to the settings) the partition's durable consumer and checks that the server kept the
/// pinned-client policy: servers older than 2.11 accept the request and silently drop it.
pub async fn ensure_consumer(
    stream: &Stream,
    settings: &ApplierSettings,
    topology: &Topology,
    partition: u32,
) -> anyhow::Result<PullConsumer> {
    let config = consumer_config(settings, topology, partition);
    let mut consumer = stream.create_consumer(config).await.map_err(|e| {
        anyhow::anyhow!(
            "creating consumer {} on stream {}: {e}",
            consumer_name(settings, partition),
            stream.cached_info().config.name
        )
    })?;
    let info = consumer.info().await?;
    if info.config.priority_policy != PriorityPolicy::PinnedClient
        || info.config.priority_groups != [GROUP]
    {
        anyhow::bail!(
            "the NATS server did not keep the pinned-client priority group on consumer {} (it needs NATS >= 2.11): \
             several appliers could work one partition at once, so the applier refuses to start",
            info.name
        );
    }
    Ok(consumer)
}

/// How the pump pulls: short pull requests keep the pin alive (they must arrive well within the pin timeout).
fn pull_timing(settings: &ApplierSettings) -> (Duration, Duration) {
    let expires =
        (settings.pin_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(10));
    (expires, expires * 4 / 10)
}

/// Pulls the partition's messages into `tx` until `stop` is set or the worker hangs up. Pull errors (NATS away,
/// missed heartbeats) restart the pull after a short wait; the consumer is recreated if it was deleted.
/// `pin_id` receives the `Nats-Pin-Id` the server gave this applier, so shutdown can release the pin.
pub async fn pump(
    stream: Stream,
    settings: ApplierSettings,
    topology: Topology,
    partition: u32,
    tx: mpsc::Sender<jetstream::Message>,
    mut stop: watch::Receiver<bool>,
    pin_id: watch::Sender<Option<String>>,
) {
    let (expires, heartbeat) = pull_timing(&settings);
    let mut retry_wait = Duration::from_millis(100);
    while !*stop.borrow() {
        let consumer = match ensure_consumer(&stream, &settings, &topology, partition).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(partition, error = %format!("{err:#}"), "cannot set up the partition's consumer, retrying");
                if wait_or_stop(&mut stop, retry_wait).await {
                    return;
                }
                retry_wait = (retry_wait * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH.min(settings.batch_size.max(1)))
            .expires(expires)
            .heartbeat(heartbeat)
            .group(GROUP)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(partition, error = %err, "cannot start pulling, retrying");
                if wait_or_stop(&mut stop, retry_wait).await {
                    return;
                }
                continue;
            }
        };
        retry_wait = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = stop.wait_for(|s| *s) => return,
            };
            match next {
                Some(Ok(message)) => {
                    if let Some(id) = message.headers.as_ref().and_then(|h| h.get("Nats-Pin-Id")) {
                        pin_id.send_if_modified(|current| {
                            let changed = current.as_deref() != Some(id.as_str());
                            if changed {
                                *current = Some(id.as_str().to_owned());
                            }
                            changed
                        });
                    }
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
                Some(Err(err)) => {
                    let fatal = matches!(
                        err.kind(),
                        MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::PushBasedConsumer
                    );
                    tracing::debug!(partition, error = %err, "pull interrupted");
                    if fatal {
                        tracing::warn!(partition, error = %err, "consumer lost, recreating it");
                        break;
                    }
                }
                None => break,
            }
        }
        if wait_or_stop(&mut stop, Duration::from_millis(200)).await {
            return;
        }
    }
}

/// Releases this applier's pin on a partition (at shutdown), so a standby applier takes over at once instead of
/// after the pin timeout. Does nothing if the pin is not ours any more.
pub async fn release_pin(
    stream: &Stream,
    settings: &ApplierSettings,
    partition: u32,
    our_pin: Option<String>,
) {
    let Some(our_pin) = our_pin else { return };
    let name = consumer_name(settings, partition);
    let Ok(info) = stream.consumer_info(&name).await else {
        return;
    };
    let pinned = info
        .priority_groups
        .iter()
        .find(|g| g.group == GROUP)
        .and_then(|g| g.pinned_client_id.clone());
    if pinned.as_deref() == Some(our_pin.as_str()) {
        match stream.unpin_consumer(&name, GROUP).await {
            Ok(()) => tracing::info!(partition, "released the partition's pin"),
            Err(err) => {
                tracing::warn!(partition, error = %err, "could not release the partition's pin")
            }
        }
    }
}

/// Waits `delay`, or less if `stop` is set; true when stopping.
pub async fn wait_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}
