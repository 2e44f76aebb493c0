//! The NATS side of consuming: one durable pull consumer per partition in a pinned-client priority group (so one
//! applier at a time works a partition), a pump that keeps pulling and hands messages to the partition's worker,
//! and the hand-over: stop asking, let the worker finish, read until the open pull requests have ended and hand
//! back what they brought, keeping the pin all along, then release the pin only if it is still ours.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind, stream::Stream};
use async_nats::{HeaderMap, Subscriber};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use pulls::{Interrupted, Pulls};
use stripe_sync_shared::subjects::Topology;
use stripe_sync_shared::wait::{self, Attempt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::settings::ApplierSettings;
use crate::worker::Delivery;

mod pulls;

/// Messages one pull requests.
pub const PULL_BATCH: usize = 128;

/// The priority group every applier pulls in.
pub const GROUP: &str = "appliers";

impl Delivery for jetstream::Message {
    fn stream_seq(&self) -> u64 {
        self.info().map(|i| i.stream_sequence).unwrap_or(0)
    }

    fn payload(&self) -> Bytes {
        self.payload.clone()
    }

    fn headers(&self) -> Option<&HeaderMap> {
        self.headers.as_ref()
    }

    async fn ack(&self, kind: AckKind) {
        if let Err(err) = self.ack_with(kind).await {
            // The message is redelivered after the ack deadline, and deduplicated.
            tracing::debug!(error = %err, "ack failed");
        }
    }
}

/// Durable consumer name of a partition.
#[must_use]
pub fn consumer_name(settings: &ApplierSettings, partition: u32) -> String {
    format!("{}-p{partition}", settings.consumer_prefix)
}

/// Most messages delivered and not yet acked per partition: a batch being applied and the next one arriving. The
/// worker holds at most this many messages, so an applier holds at most `partitions` times this, whatever the
/// backlog (about 25 MB with the defaults and 2.5 KB events).
#[must_use]
pub fn max_ack_pending(settings: &ApplierSettings) -> usize {
    settings.batch_size.get() + PULL_BATCH
}

/// Consumer config of a partition.
#[must_use]
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
        max_ack_pending: max_ack_pending(settings) as i64,
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
) -> Result<PullConsumer, Attempt> {
    let config = consumer_config(settings, topology, partition);
    let name = consumer_name(settings, partition);
    let mut consumer = stream.create_consumer(config).await.map_err(|e| {
        Attempt::not_yet(anyhow::Error::new(e).context(format!("creating consumer {name}")))
    })?;
    let info = consumer.info().await.map_err(Attempt::not_yet)?;
    if info.config.priority_policy != PriorityPolicy::PinnedClient
        || info.config.priority_groups != [GROUP]
    {
        return Err(Attempt::Fatal(anyhow::anyhow!(
            "the NATS server did not keep the pinned-client priority group on consumer {} (it needs NATS >= 2.11): \
             several appliers could work one partition at once, so the applier refuses to start",
            info.name
        )));
    }
    Ok(consumer)
}

/// How the pump pulls: pull requests must arrive well within the pin timeout, as they keep the pin.
fn pull_timing(settings: &ApplierSettings) -> (Duration, Duration) {
    let expires =
        (settings.pin_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(10));
    (expires, expires * 4 / 10)
}

/// A partition's pump and its hand-over, driven by the partition supervisor.
#[derive(Debug)]
pub struct Pump {
    /// The NATS connection (for keep-alive pull requests).
    pub client: async_nats::Client,
    /// The events stream.
    pub stream: Stream,
    /// The applier's settings.
    pub settings: ApplierSettings,
    /// Subjects and partitions.
    pub topology: Topology,
    /// The partition.
    pub partition: u32,
}

impl Pump {
    /// Pulls the partition's messages into `tx` until `stop` turns true; then closes `tx` (the worker finishes and
    /// hands back what it holds), reads until its open pull requests have ended and hands back what they brought,
    /// keeps the pin until that is done and `release` fires, and releases it if it is still ours. Pull errors
    /// restart the pull; the consumer is recreated if deleted.
    pub async fn run(
        self,
        tx: mpsc::Sender<jetstream::Message>,
        mut stop: watch::Receiver<bool>,
        release: oneshot::Receiver<()>,
    ) {
        let pulls = self.pull(&tx, &mut stop).await;
        drop(tx);
        let pin = pulls.as_ref().and_then(|p| p.pin.clone());
        let done = async {
            let mut pin = None;
            if let Some(pulls) = pulls {
                let drained;
                (drained, pin) = pulls.drain().await;
                // Handed back at once, for the partition's next applier.
                for message in drained {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            }
            let _ = release.await;
            pin
        };
        self.hold_then_release(pin, done).await;
    }

    /// Pulls until `stop`; the open pulls then, for [`Pulls::drain`]. A failed pull is asked again with the same
    /// requests and pin (dropping them would strand what they deliver, and a request without our pin waits
    /// unserved until the pin times out); only a lost consumer or a closed connection opens anew.
    async fn pull(
        &self,
        tx: &mpsc::Sender<jetstream::Message>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Pulls> {
        let (expires, heartbeat) = pull_timing(&self.settings);
        let batch = PULL_BATCH.min(self.settings.batch_size.get());
        let name = consumer_name(&self.settings, self.partition);
        let mut kept: Option<Pulls> = None;
        loop {
            if *stop.borrow() {
                return kept;
            }
            let mut pulls = match kept.take() {
                Some(pulls) => pulls,
                None => {
                    let setup = async {
                        let what = format!("partition {}'s consumer", self.partition);
                        wait::until_ready(&what, || {
                            ensure_consumer(
                                &self.stream,
                                &self.settings,
                                &self.topology,
                                self.partition,
                            )
                        })
                        .await?;
                        let stream = &self.stream.cached_info().config.name;
                        anyhow::Ok(
                            Pulls::open(&self.client, stream, &name, batch, expires, heartbeat)
                                .await?,
                        )
                    };
                    let setup = tokio::select! {
                        pulls = setup => pulls,
                        _ = stop.wait_for(|s| *s) => return None,
                    };
                    match setup {
                        Ok(pulls) => pulls,
                        Err(err) => {
                            tracing::error!(partition = self.partition, error = %format!("{err:#}"), "cannot pull the partition");
                            if stop_after(stop, Duration::from_secs(1)).await {
                                return None;
                            }
                            continue;
                        }
                    }
                }
            };
            let interrupted = loop {
                let next = tokio::select! {
                    next = pulls.next() => next,
                    _ = stop.wait_for(|s| *s) => return Some(pulls),
                };
                match next {
                    Ok(message) => {
                        if let Err(unsent) = tx.send(message).await {
                            let _ = unsent.0.ack_with(AckKind::Nak(None)).await;
                            return Some(pulls);
                        }
                    }
                    Err(err) => break err,
                }
            };
            match interrupted {
                Interrupted::Reopen(why) => {
                    tracing::warn!(partition = self.partition, error = %why, "pulling anew (consumer recreated if needed)");
                }
                Interrupted::Failed(why) => {
                    tracing::debug!(partition = self.partition, error = %why, "pull interrupted; asking again");
                    kept = Some(pulls);
                }
            }
            if stop_after(stop, Duration::from_millis(200)).await {
                return kept;
            }
        }
    }

    /// Keeps `pin` (if any) with pull requests that can't deliver anything (`max_bytes` 1) until `done` ends, then
    /// unpins the pin `done` returns if it is still ours. Our last keep-alive is then younger than the pin timeout,
    /// so the server cannot have moved the pin between our check and the unpin.
    async fn hold_then_release(
        &self,
        pin: Option<String>,
        done: impl Future<Output = Option<String>>,
    ) {
        let (expires, _) = pull_timing(&self.settings);
        let name = consumer_name(&self.settings, self.partition);
        let mut held = true;
        let mut replies: Option<(String, Subscriber)> = None;
        tokio::pin!(done);
        let last = loop {
            if held && let Some(pin) = &pin {
                held = keep_pin(
                    &self.client,
                    &self.stream,
                    &name,
                    pin,
                    expires,
                    &mut replies,
                )
                .await
                .unwrap_or(false);
            }
            let next = Instant::now() + expires;
            tokio::select! {
                last = &mut done => break last,
                () = tokio::time::sleep_until(next) => {}
            }
        };
        if held && let Some(pin) = last {
            release_pin(&self.stream, &name, &pin).await;
        }
    }
}

/// Sends one pull request that keeps `pin` without delivering anything; false once the server says the pin is
/// someone else's (status 423).
async fn keep_pin(
    client: &async_nats::Client,
    stream: &Stream,
    consumer: &str,
    pin: &str,
    expires: Duration,
    replies: &mut Option<(String, Subscriber)>,
) -> anyhow::Result<bool> {
    if replies.is_none() {
        let inbox = client.new_inbox();
        *replies = Some((inbox.clone(), client.subscribe(inbox).await?));
    }
    let Some((inbox, subscriber)) = replies.as_mut() else {
        return Ok(false);
    };
    while let Some(Some(reply)) = subscriber.next().now_or_never() {
        if reply.status.map(|s| s.as_u16()) == Some(423) {
            return Ok(false);
        }
    }
    let request = serde_json::json!({
        "batch": 1,
        "max_bytes": 1,
        "expires": expires.as_nanos() as u64,
        "group": GROUP,
        "id": pin,
    });
    let subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}",
        stream.cached_info().config.name
    );
    client
        .publish_with_reply(subject, inbox.clone(), request.to_string().into())
        .await?;
    Ok(true)
}

/// Releases a partition's pin if it is still `ours`, so the partition's next applier starts at once instead of
/// after the pin timeout. Never unpins another applier's pin.
pub async fn release_pin(stream: &Stream, consumer: &str, ours: &str) {
    let Ok(info) = stream.consumer_info(consumer).await else {
        return;
    };
    let pinned = info
        .priority_groups
        .iter()
        .find(|g| g.group == GROUP)
        .and_then(|g| g.pinned_client_id.clone());
    if pinned.as_deref() != Some(ours) {
        return;
    }
    match stream.unpin_consumer(consumer, GROUP).await {
        Ok(()) => tracing::info!(consumer, "released the partition's pin"),
        Err(err) => tracing::warn!(consumer, error = %err, "could not release the partition's pin"),
    }
}

/// Waits `delay`, or less if `stop` turns true; true when stopping.
pub async fn stop_after(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_holds_at_most_a_batch_and_a_pull_of_unacked_messages() {
        let settings = ApplierSettings::default();
        let topology = Topology {
            prefix: "stripe".into(),
            partitions: 16,
        };
        let config = consumer_config(&settings, &topology, 3);
        assert_eq!(
            config.max_ack_pending,
            (settings.batch_size.get() + PULL_BATCH) as i64
        );
        assert_eq!(config.filter_subject, "stripe.events.3.>");
        assert_eq!(
            config.max_deliver, -1,
            "the applier decides about dead letters"
        );
        let (expires, heartbeat) = pull_timing(&settings);
        assert!(expires * 2 < settings.pin_timeout && heartbeat < expires);
    }
}
