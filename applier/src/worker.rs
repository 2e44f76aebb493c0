//! A partition's worker: gathers batches from the pump, applies each in one transaction, acks after commit.
//!
//! Failures, classified by [`ApplyError::is_transient`]: a transient one (database away) retries the whole batch in
//! place with backoff, without limit, extending the ack deadline meanwhile, so nothing is lost and the partition
//! waits. A permanent one splits the batch: every other event is applied on its own, and the failing event is
//! parked and retried on a schedule while the partition keeps flowing; after `dead_letter_after` attempts it goes to
//! the dead letter. Applying out of order is safe because every row is guarded by event order.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use stripe_sync_shared::telemetry;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::apply::{Applier, Mode};
use crate::consumer::wait_or_stop;
use crate::dead_letter::{DeadLetter, Letter};
use crate::event::Incoming;
use crate::settings::ApplierSettings;

/// Works one partition.
pub struct Worker {
    /// The partition.
    pub partition: u32,
    /// Batches applied at once by all the partitions of this process (one per database connection): bounds memory
    /// whatever the backlog, and keeps Postgres from juggling more transactions than it has connections for.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Applies batches.
    pub applier: Arc<Applier>,
    /// Where events go after the last attempt.
    pub dead_letter: DeadLetter,
    /// Batching, retry and dead-letter settings.
    pub settings: ApplierSettings,
}

/// A received message, its span (receive → ack) and, if readable, its event.
struct Received {
    message: jetstream::Message,
    seq: u64,
    span: tracing::Span,
}

/// A permanently failing event waiting for its next attempt.
struct Parked {
    received: Received,
    event: Result<Incoming, String>,
    attempts: u32,
    next_attempt: Instant,
    backoff: ExponentialBackoff,
    last_error: String,
}

/// Outcome of applying one event with transient retries.
enum Single {
    Applied,
    Failed(String),
    Stopping,
}

impl Received {
    fn new(message: jetstream::Message, partition: u32) -> Self {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let span = tracing::info_span!(
            "event",
            partition,
            seq,
            event_id = tracing::field::Empty,
            event_type = tracing::field::Empty
        );
        telemetry::continue_trace(&span, message.headers.as_ref());
        Self { message, seq, span }
    }

    fn parse(&self) -> Result<Incoming, String> {
        let event = Incoming::from_bytes(self.seq, self.message.payload.clone())
            .map_err(|e| e.to_string())?;
        self.span.record("event_id", event.id.as_str());
        self.span.record("event_type", event.event_type.as_str());
        Ok(event)
    }

    async fn ack(&self, kind: AckKind) {
        if let Err(err) = self.message.ack_with(kind).await {
            // The message will be redelivered and deduplicated.
            tracing::warn!(parent: &self.span, error = %err, "ack failed");
        }
    }
}

impl Worker {
    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.settings.retry_initial)
            .with_max_delay(self.settings.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn progress_interval(&self) -> Duration {
        self.settings.ack_wait / 3
    }

    /// Runs until `stop` is set (after finishing and acking the batch in hand) or the pump hangs up.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<jetstream::Message>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut parked: Vec<Parked> = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            let due = parked.iter().map(|p| p.next_attempt).min();
            let first = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                message = rx.recv() => match message {
                    Some(m) => Some(m),
                    None => break,
                },
                () = sleep_until(due) => None,
            };
            // A batch waits for one of the process's database slots; meanwhile the next messages wait in the small
            // queue and in NATS, so memory does not grow with the backlog.
            let batch = match first {
                Some(first) => Some(self.gather(first, &mut rx).await),
                None => None,
            };
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                break;
            };
            if let Some(batch) = batch
                && !self.process(batch, &mut parked, &mut stop).await
            {
                break;
            }
            if !self.retry_parked(&mut parked, &mut stop).await {
                break;
            }
            drop(slot);
            if !parked.is_empty() && last_progress.elapsed() >= self.progress_interval() {
                for p in &parked {
                    p.received.ack(AckKind::Progress).await;
                }
                last_progress = Instant::now();
            }
        }
        // Hand back what was received but not applied, so the partition's next applier gets it at once instead of
        // after the ack wait. The channel ends when the pump, which stops too, drops its side.
        for p in &parked {
            p.received.ack(AckKind::Nak(None)).await;
        }
        while let Some(message) = rx.recv().await {
            if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(error = %err, "nak at shutdown failed; the message is redelivered after the ack wait");
            }
        }
    }

    async fn gather(
        &self,
        first: jetstream::Message,
        rx: &mut mpsc::Receiver<jetstream::Message>,
    ) -> Vec<jetstream::Message> {
        let mut batch = vec![first];
        let deadline = Instant::now() + self.settings.batch_wait;
        while batch.len() < self.settings.batch_size {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(m)) => batch.push(m),
                        _ => break,
                    }
                }
            }
        }
        batch
    }

    /// Applies a batch; false when stopping interrupted it (its messages are left for redelivery).
    async fn process(
        &self,
        batch: Vec<jetstream::Message>,
        parked: &mut Vec<Parked>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut received = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            let r = Received::new(message, self.partition);
            match r.parse() {
                Ok(event) => {
                    received.push(r);
                    events.push(event);
                }
                Err(error) => {
                    tracing::warn!(parent: &r.span, %error, "unreadable event");
                    self.park(parked, r, Err(error.clone()), error);
                }
            }
        }
        if events.is_empty() {
            return true;
        }
        let span = tracing::info_span!(
            "apply_batch",
            partition = self.partition,
            events = events.len()
        );
        let mut backoff = self.backoff();
        let mut last_progress = Instant::now();
        let started = Instant::now();
        loop {
            let apply = self
                .applier
                .apply(&events, Mode::Normal)
                .instrument(span.clone());
            match self.with_progress(&received, apply).await {
                Ok(report) => {
                    tracing::debug!(parent: &span, new = report.new, rows = report.rows_written, stale = report.rows_stale, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "batch committed");
                    for r in &received {
                        r.ack(AckKind::Ack).await;
                    }
                    return true;
                }
                Err(err) if err.is_transient() => {
                    let delay = backoff.next().unwrap_or(self.settings.retry_max);
                    tracing::warn!(parent: &span, error = %err, retry_in = ?delay, "database unavailable; retrying the batch");
                    if last_progress.elapsed() >= self.progress_interval() {
                        for r in &received {
                            r.ack(AckKind::Progress).await;
                        }
                        last_progress = Instant::now();
                    }
                    if wait_or_stop(stop, delay).await {
                        for r in &received {
                            r.ack(AckKind::Nak(None)).await;
                        }
                        return false;
                    }
                }
                Err(err) => {
                    tracing::warn!(parent: &span, error = %err, "batch rejected; applying its events one by one");
                    let mut pairs = received.into_iter().zip(events);
                    while let Some((r, event)) = pairs.next() {
                        match self.apply_single(&event, &r.span, stop).await {
                            Single::Applied => r.ack(AckKind::Ack).await,
                            Single::Failed(error) => self.park(parked, r, Ok(event), error),
                            Single::Stopping => {
                                r.ack(AckKind::Nak(None)).await;
                                for (rest, _) in pairs {
                                    rest.ack(AckKind::Nak(None)).await;
                                }
                                return false;
                            }
                        }
                    }
                    return true;
                }
            }
        }
    }

    /// Runs `work` while extending the ack deadline of `received` (a slow transaction must not cause redelivery).
    async fn with_progress<T>(
        &self,
        received: &[Received],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(
            Instant::now() + self.progress_interval(),
            self.progress_interval(),
        );
        loop {
            tokio::select! {
                output = &mut work => return output,
                _ = tick.tick() => {
                    for r in received {
                        r.ack(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    /// Applies one event, retrying transient failures without limit.
    async fn apply_single(
        &self,
        event: &Incoming,
        span: &tracing::Span,
        stop: &mut watch::Receiver<bool>,
    ) -> Single {
        let mut backoff = self.backoff();
        loop {
            match self
                .applier
                .apply(std::slice::from_ref(event), Mode::Normal)
                .instrument(span.clone())
                .await
            {
                Ok(_) => return Single::Applied,
                Err(err) if err.is_transient() => {
                    let delay = backoff.next().unwrap_or(self.settings.retry_max);
                    tracing::warn!(parent: span, error = %err, retry_in = ?delay, "database unavailable; retrying");
                    if wait_or_stop(stop, delay).await {
                        return Single::Stopping;
                    }
                }
                Err(err) => return Single::Failed(err.detail()),
            }
        }
    }

    fn park(
        &self,
        parked: &mut Vec<Parked>,
        received: Received,
        event: Result<Incoming, String>,
        error: String,
    ) {
        let mut backoff = self.backoff();
        let delay = backoff.next().unwrap_or(self.settings.retry_initial);
        tracing::warn!(parent: &received.span, %error, attempts = 1, retry_in = ?delay, "event failed; will retry");
        parked.push(Parked {
            received,
            event,
            attempts: 1,
            next_attempt: Instant::now() + delay,
            backoff,
            last_error: error,
        });
    }

    /// Retries parked events that are due; dead-letters those out of attempts. False when stopping.
    async fn retry_parked(
        &self,
        parked: &mut Vec<Parked>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let now = Instant::now();
        let mut i = 0;
        while i < parked.len() {
            if parked[i].next_attempt > now {
                i += 1;
                continue;
            }
            let outcome = match &parked[i].event {
                Ok(event) => {
                    self.apply_single(event, &parked[i].received.span, stop)
                        .await
                }
                Err(error) => Single::Failed(error.clone()),
            };
            let p = &mut parked[i];
            match outcome {
                Single::Stopping => return false,
                Single::Applied => {
                    tracing::info!(parent: &p.received.span, attempts = p.attempts + 1, "parked event applied");
                    p.received.ack(AckKind::Ack).await;
                    parked.swap_remove(i);
                    continue;
                }
                Single::Failed(error) => {
                    p.attempts += 1;
                    p.last_error = error;
                }
            }
            if p.attempts >= self.settings.dead_letter_after {
                if self.dead_letter_parked(p).await {
                    parked.swap_remove(i);
                    continue;
                }
                p.next_attempt =
                    Instant::now() + self.settings.retry_initial.max(Duration::from_secs(1));
            } else {
                let delay = p.backoff.next().unwrap_or(self.settings.retry_max);
                tracing::warn!(parent: &p.received.span, error = %p.last_error, attempts = p.attempts, retry_in = ?delay, "event failed again");
                p.next_attempt = Instant::now() + delay;
            }
            i += 1;
        }
        true
    }

    /// Publishes a parked event to the dead letter, then acks it. False if the dead letter could not take it.
    async fn dead_letter_parked(&self, p: &Parked) -> bool {
        let event = p.event.as_ref().ok();
        let letter = Letter {
            headers: p.received.message.headers.as_ref(),
            payload: p.received.message.payload.clone(),
            event_type: event.map(|e| e.event_type.as_str()),
            event_id: event.map(|e| e.id.as_str()),
            stream_seq: p.received.seq,
            attempts: p.attempts,
            error: &p.last_error,
        };
        match self.dead_letter.publish(letter).await {
            Ok(()) => {
                tracing::error!(parent: &p.received.span, error = %p.last_error, attempts = p.attempts, "event dead-lettered: an operator must look at it (stripe-sync-applier dlq list)");
                p.received.ack(AckKind::Ack).await;
                true
            }
            Err(err) => {
                tracing::warn!(parent: &p.received.span, error = %format!("{err:#}"), "could not publish to the dead letter; will retry");
                false
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
