//! A partition's worker: a thin loop around [`crate::decision`] and [`crate::batch`]. It holds every message it
//! received until it is acked, dead-lettered or handed back, and extends the ack deadline of every message held
//! longer than a third of `ack_wait`, whatever it is waiting for (a database slot, a retry, a parked event's turn), so a message
//! is never redelivered while this worker has it.
//!
//! Batches are formed once a database slot is free, from what has arrived by then (up to `batch_size`). An event
//! that fails on its own account is parked in a delay queue and retried on schedule while the partition keeps
//! flowing; at the policy's word it goes to the dead letter. When its channel closes (the partition is handed
//! over, or the applier stops), the worker finishes the attempt in progress and hands back (naks) everything else.

mod jobs;

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

use crate::apply::Writer;
use crate::batch::Settled;
use crate::dead_letter::Letter;
use crate::decision::{Policy, Verdict};
use jobs::{Job, Running, State};

type SlotWait = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

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

impl<W: Writer + 'static, L: DeadLetters> Worker<W, L> {
    /// Runs until `rx` closes, then finishes the attempt in progress and naks everything still held.
    pub async fn run<M: Delivery>(self, mut rx: mpsc::Receiver<M>) {
        let mut state = State::default();
        let mut job: Option<(Running, Option<OwnedSemaphorePermit>)> = None;
        let mut slot_wait: Option<SlotWait> = None;
        let (stop_tx, stop_rx) = watch::channel(false);
        // Extended only when their deadline comes near: checked twice per `progress_every`, a message is extended
        // within 1.5 × `progress_every` (half of `ack_wait`) of its last extension, and one applied quickly never is.
        let every = self.policy.progress_every();
        let mut progress = tokio::time::interval_at(Instant::now() + every / 2, every / 2);
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
                    let now = Instant::now();
                    for h in state.held.values_mut().filter(|h| now - h.extended_at >= every) {
                        h.message.ack(AckKind::Progress).await;
                        h.extended_at = now;
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
                        let object_type = h
                            .message
                            .headers()
                            .and_then(|m| m.get(stripe_sync_shared::subjects::HEADER_OBJECT_TYPE))
                            .map_or_else(|| "none".to_owned(), ToString::to_string);
                        metrics::counter!(
                            stripe_sync_shared::metrics::names::EVENTS_APPLIED,
                            "object_type" => object_type,
                            "outcome" => "dead_lettered"
                        )
                        .increment(1);
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
}

#[cfg(test)]
mod tests;
