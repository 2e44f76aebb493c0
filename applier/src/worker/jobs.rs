//! What the worker holds and the jobs it runs: each held message with its tries, where it waits, and the futures
//! that apply a batch or publish a dead letter (all I/O the loop in `mod.rs` waits for).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;
use tokio_util::time::DelayQueue;
use tracing::Instrument as _;

use super::{DeadLetters, Delivery, Worker};
use crate::apply::Writer;
use crate::batch::{self, Settled};
use crate::dead_letter::Letter;
use crate::decision::{Failure, Tries};
use crate::event::Incoming;

/// A message held by the worker.
pub(super) struct Held<M> {
    pub(super) message: M,
    pub(super) span: tracing::Span,
    pub(super) event: Result<Incoming, String>,
    pub(super) tries: Tries,
    /// The last failure, for the dead letter.
    pub(super) last_error: String,
    /// Waiting to be published to the dead letter (after a failed publish), rather than parked for a retry.
    pub(super) to_dead_letter: bool,
    /// When it was received or its ack deadline last extended.
    pub(super) extended_at: tokio::time::Instant,
}

/// What the worker is doing besides waiting: applying a batch or retrying one parked event (the stream sequences
/// and what became of each), or publishing one event to the dead letter.
pub(super) enum Job {
    Apply(Vec<u64>, Vec<Settled>),
    DeadLetter(u64, Result<(), String>),
}

pub(super) type Running = Pin<Box<dyn Future<Output = Job> + Send>>;

/// The worker's state: every held message and where it waits.
pub(super) struct State<M> {
    pub(super) held: BTreeMap<u64, Held<M>>,
    /// Received, not tried yet, in stream order.
    pub(super) queue: VecDeque<u64>,
    /// Parked events whose retry is due.
    pub(super) due: VecDeque<u64>,
    /// Events to publish to the dead letter.
    pub(super) dead: VecDeque<u64>,
    /// Parked events, and dead letters to publish again, by when.
    pub(super) parked: DelayQueue<u64>,
}

impl<M> Default for State<M> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            queue: VecDeque::new(),
            due: VecDeque::new(),
            dead: VecDeque::new(),
            parked: DelayQueue::new(),
        }
    }
}

impl<M: Delivery> State<M> {
    pub(super) fn receive(&mut self, held: Held<M>) {
        let seq = held.message.stream_seq();
        self.held.insert(seq, held);
        self.queue.push_back(seq);
    }
}

impl<W: Writer + 'static, L: DeadLetters> Worker<W, L> {
    pub(super) fn hold<M: Delivery>(&self, message: M) -> Held<M> {
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
            extended_at: tokio::time::Instant::now(),
        }
    }

    pub(super) fn apply_job<M: Delivery>(
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

    pub(super) fn dead_letter_job<M: Delivery>(&self, seq: u64, h: &Held<M>) -> Running {
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
