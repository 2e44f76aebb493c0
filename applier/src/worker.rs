//! A partition's worker: a thin loop around [`crate::decision`] and [`crate::batch`]. It holds every message it
//! received until it is acked, dead-lettered or handed back, and extends every held message's ack deadline three
//! times per `ack_wait`, whatever it is waiting for (a database slot, a retry, a parked event's turn), so a message
//! is never redelivered while this worker has it.
//!
//! Batches are formed once a database slot is free, from what has arrived by then (up to `batch_size`). An event
//! that fails on its own account is parked in a delay queue and retried on schedule while the partition keeps
//! flowing; at the policy's word it goes to the dead letter. When its channel closes (the partition is handed
//! over, or the applier stops), the worker finishes the attempt in progress and hands back (naks) everything else.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::time::DelayQueue;
use tracing::Instrument as _;

use crate::apply::Writer;
use crate::batch::{self, Settled};
use crate::dead_letter::Letter;
use crate::decision::{Failure, Policy, Tries, Verdict};
use crate::event::Incoming;

/// A message as the worker needs it: JetStream's, or a stand-in in tests.
pub trait Delivery: Send + Sync + 'static {
    /// Its sequence in the events stream.
    fn stream_seq(&self) -> u64;
    /// Its body.
    fn payload(&self) -> Bytes;
    /// Its headers.
    fn headers(&self) -> Option<&HeaderMap>;
    /// Acks, naks or extends it; a failure only means JetStream redelivers it later.
    fn ack(&self, kind: AckKind) -> impl Future<Output = ()> + Send;
}

/// Where events go after their last attempt.
pub trait DeadLetters: Send + Sync + 'static {
    /// Stores the letter; Ok once stored.
    fn publish(&self, letter: Letter<'_>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Works one partition.
#[derive(Debug)]
pub struct Worker<W, L> {
    /// The partition.
    pub partition: u32,
    /// Applies batches.
    pub writer: Arc<W>,
    /// Takes events out of attempts.
    pub dead_letter: Arc<L>,
    /// Batches applied at once by all the partitions of this process (one per database connection).
    pub slots: Arc<Semaphore>,
    /// Retries, parking and dead letters.
    pub policy: Policy,
    /// Most events per transaction.
    pub batch_size: NonZeroUsize,
    /// Longest wait for a batch to fill once its first event is in.
    pub batch_wait: Duration,
    /// The stream's epoch ([`crate::store::order_of`]).
    pub epoch: i32,
}

/// A message held by the worker.
struct Held<M> {
    message: M,
    span: tracing::Span,
    event: Result<Incoming, String>,
    tries: Tries,
    /// The last failure, for the dead letter.
    last_error: String,
    /// Waiting to be published to the dead letter (after a failed publish), rather than parked for a retry.
    to_dead_letter: bool,
}

/// What the worker is doing besides waiting: applying a batch or retrying one parked event (the stream sequences
/// and what became of each), or publishing one event to the dead letter.
enum Job {
    Apply(Vec<u64>, Vec<Settled>),
    DeadLetter(u64, Result<(), String>),
}

type Running = Pin<Box<dyn Future<Output = Job> + Send>>;
type SlotWait = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

/// The worker's state: every held message and where it waits.
struct State<M> {
    held: BTreeMap<u64, Held<M>>,
    /// Received, not tried yet, in stream order.
    queue: VecDeque<u64>,
    /// Parked events whose retry is due.
    due: VecDeque<u64>,
    /// Events to publish to the dead letter.
    dead: VecDeque<u64>,
    /// Parked events, and dead letters to publish again, by when.
    parked: DelayQueue<u64>,
}

impl<M: Delivery> State<M> {
    fn receive(&mut self, held: Held<M>) {
        let seq = held.message.stream_seq();
        self.held.insert(seq, held);
        self.queue.push_back(seq);
    }
}

impl<W: Writer + 'static, L: DeadLetters> Worker<W, L> {
    /// Runs until `rx` closes, then finishes the attempt in progress and naks everything still held.
    pub async fn run<M: Delivery>(self, mut rx: mpsc::Receiver<M>) {
        let mut state = State {
            held: BTreeMap::new(),
            queue: VecDeque::new(),
            due: VecDeque::new(),
            dead: VecDeque::new(),
            parked: DelayQueue::new(),
        };
        let mut job: Option<(Running, Option<OwnedSemaphorePermit>)> = None;
        let mut slot_wait: Option<SlotWait> = None;
        let (stop_tx, stop_rx) = watch::channel(false);
        let every = self.policy.progress_every();
        let mut progress = tokio::time::interval_at(Instant::now() + every, every);
        let mut first_queued = Instant::now();
        let mut open = true;
        while open || job.is_some() {
            let idle = open && job.is_none() && slot_wait.is_none();
            let batch_due = first_queued + self.batch_wait;
            if idle && let Some(seq) = state.dead.pop_front() {
                job = Some((self.dead_letter_job(seq, &state.held[&seq]), None));
            } else if idle
                && (!state.due.is_empty()
                    || state.queue.len() >= self.batch_size.get()
                    || (!state.queue.is_empty() && batch_due <= Instant::now()))
            {
                let slots = self.slots.clone();
                slot_wait = Some(Box::pin(async move { slots.acquire_owned().await.ok() }));
            }
            let idle = idle && slot_wait.is_none() && job.is_none();
            tokio::select! {
                biased;
                done = async { (&mut job.as_mut()?.0).await.into() }, if job.is_some() => {
                    job = None;
                    if let Some(done) = done {
                        self.settle(done, &mut state).await;
                    }
                }
                permit = async { slot_wait.as_mut()?.await }, if slot_wait.is_some() => {
                    slot_wait = None;
                    let Some(permit) = permit else { break };
                    // A parked event's turn first; otherwise the batch is what has arrived by now.
                    while let Ok(message) = rx.try_recv() {
                        state.receive(self.hold(message));
                    }
                    let seqs: Vec<u64> = match state.due.pop_front() {
                        Some(seq) => vec![seq],
                        None => {
                            let n = state.queue.len().min(self.batch_size.get());
                            state.queue.drain(..n).collect()
                        }
                    };
                    job = Some((self.apply_job(seqs, &state.held, stop_rx.clone()), Some(permit)));
                }
                message = rx.recv(), if open => match message {
                    Some(message) => {
                        if state.queue.is_empty() {
                            first_queued = Instant::now();
                        }
                        state.receive(self.hold(message));
                    }
                    None => {
                        open = false;
                        slot_wait = None;
                        let _ = stop_tx.send(true);
                    }
                },
                Some(expired) = state.parked.next() => {
                    let seq = expired.into_inner();
                    match state.held.get(&seq) {
                        Some(h) if h.to_dead_letter => state.dead.push_back(seq),
                        Some(_) => state.due.push_back(seq),
                        None => {}
                    }
                }
                _ = progress.tick() => {
                    for h in state.held.values() {
                        h.message.ack(AckKind::Progress).await;
                    }
                }
                () = tokio::time::sleep_until(batch_due), if idle && !state.queue.is_empty() => {}
            }
        }
        // Handed back at once, so the partition's next applier gets them without waiting for the ack deadline.
        for h in state.held.values() {
            h.message.ack(AckKind::Nak(None)).await;
        }
    }

    /// Acts on a finished job: acks what applied, parks or dead-letters what failed (as the policy says).
    async fn settle<M: Delivery>(&self, done: Job, state: &mut State<M>) {
        let now = Instant::now();
        match done {
            Job::Apply(seqs, outcomes) => {
                for (seq, outcome) in seqs.into_iter().zip(outcomes) {
                    let Some(h) = state.held.get_mut(&seq) else {
                        continue;
                    };
                    match outcome {
                        Settled::Applied => {
                            if h.tries.attempts > 0 {
                                tracing::info!(parent: &h.span, attempts = h.tries.attempts + 1, "parked event applied");
                            }
                            h.message.ack(AckKind::Ack).await;
                            state.held.remove(&seq);
                        }
                        Settled::Failed { failure, error } => {
                            match self.policy.after_failure(
                                failure,
                                &mut h.tries,
                                now,
                                fastrand::f64(),
                            ) {
                                Verdict::Park(at) => {
                                    tracing::warn!(parent: &h.span, %error, ?failure, attempts = h.tries.attempts, retry_in = ?at - now, "event failed; parked for a retry");
                                    state.parked.insert_at(seq, at);
                                }
                                Verdict::DeadLetter => state.dead.push_back(seq),
                            }
                            h.last_error = error;
                        }
                        // Not tried to the end (stopping): handed back with the rest.
                        Settled::Stopped => {}
                    }
                }
            }
            Job::DeadLetter(seq, published) => {
                let Some(h) = state.held.get_mut(&seq) else {
                    return;
                };
                match published {
                    Ok(()) => {
                        tracing::error!(parent: &h.span, error = %h.last_error, attempts = h.tries.attempts, "event dead-lettered: an operator must look at it (stripe-sync-applier dlq list)");
                        h.message.ack(AckKind::Ack).await;
                        state.held.remove(&seq);
                    }
                    Err(err) => {
                        let at = now + self.policy.backoff(h.tries.attempts, fastrand::f64());
                        tracing::warn!(parent: &h.span, error = %err, retry_in = ?at - now, "could not publish to the dead letter; will retry");
                        h.to_dead_letter = true;
                        state.parked.insert_at(seq, at);
                    }
                }
            }
        }
    }

    fn hold<M: Delivery>(&self, message: M) -> Held<M> {
        let seq = message.stream_seq();
        let span = tracing::info_span!(
            "event",
            partition = self.partition,
            seq,
            event_id = tracing::field::Empty,
            event_type = tracing::field::Empty
        );
        stripe_sync_shared::telemetry::continue_trace(&span, message.headers());
        let order = crate::store::order_of(self.epoch, seq);
        let event = Incoming::from_bytes(order, message.payload()).map_err(|e| e.to_string());
        match &event {
            Ok(e) => {
                span.record("event_id", e.id.as_str());
                span.record("event_type", e.event_type.as_str());
            }
            Err(error) => tracing::warn!(parent: &span, %error, "unreadable event"),
        }
        Held {
            message,
            span,
            event,
            tries: Tries::default(),
            last_error: String::new(),
            to_dead_letter: false,
        }
    }

    fn apply_job<M: Delivery>(
        &self,
        seqs: Vec<u64>,
        held: &BTreeMap<u64, Held<M>>,
        mut stop: watch::Receiver<bool>,
    ) -> Running {
        let (writer, policy) = (self.writer.clone(), self.policy.clone());
        let mut settled = vec![Settled::Stopped; seqs.len()];
        let (mut events, mut readable) = (Vec::new(), Vec::new());
        for (i, seq) in seqs.iter().enumerate() {
            match &held[seq].event {
                Ok(event) => {
                    events.push(event.clone());
                    readable.push(i);
                }
                Err(error) => {
                    settled[i] = Settled::Failed {
                        failure: Failure::Rejected,
                        error: error.clone(),
                    };
                }
            }
        }
        let span = tracing::info_span!(
            "apply_batch",
            partition = self.partition,
            events = events.len()
        );
        Box::pin(
            async move {
                if !events.is_empty() {
                    let (outcomes, report) =
                        batch::apply(&*writer, &policy, &events, &mut stop).await;
                    tracing::debug!(
                        new = report.new,
                        rows = report.rows_written,
                        stale = report.rows_stale,
                        "batch done"
                    );
                    for (i, outcome) in readable.into_iter().zip(outcomes) {
                        settled[i] = outcome;
                    }
                }
                Job::Apply(seqs, settled)
            }
            .instrument(span),
        )
    }

    fn dead_letter_job<M: Delivery>(&self, seq: u64, h: &Held<M>) -> Running {
        let sink = self.dead_letter.clone();
        let event = h.event.as_ref().ok();
        let event_type = event.map(|e| e.event_type.clone());
        let event_id = event.map(|e| e.id.clone());
        let headers = h.message.headers().cloned();
        let payload = h.message.payload();
        let (attempts, error) = (h.tries.attempts, h.last_error.clone());
        Box::pin(async move {
            let letter = Letter {
                headers: headers.as_ref(),
                payload,
                event_type: event_type.as_deref(),
                event_id: event_id.as_deref(),
                stream_seq: seq,
                attempts,
                error: &error,
            };
            Job::DeadLetter(
                seq,
                sink.publish(letter).await.map_err(|e| format!("{e:#}")),
            )
        })
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
