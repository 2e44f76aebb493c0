//! `stripe-sync-applier replay`: re-reads the events stream from a sequence or a time and applies what the database
//! does not have. Dedupe makes it safe at any time, next to running appliers; `--force` re-applies events already
//! recorded (still under the ordering guard), for a database restored from an older backup.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::apply::{Applier, Forced, Report, Writer};
use crate::batch::{self, Settled};
use crate::decision::Policy;
use crate::event::Incoming;

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At this stream sequence.
    Sequence(u64),
    /// At the first event stored at or after this time.
    Time(OffsetDateTime),
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to start.
    pub start: Start,
    /// Stop after events stored at this time.
    pub until: Option<OffsetDateTime>,
    /// Re-apply events already recorded.
    pub force: bool,
    /// Events per transaction.
    pub batch_size: std::num::NonZeroUsize,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events read from the stream.
    pub read: u64,
    /// Of those, applied (new, or again with `--force`).
    pub applied: u64,
    /// Of those, already in the database and skipped.
    pub already_present: u64,
    /// Rows written.
    pub rows_written: u64,
    /// Rows left alone because the table held newer state.
    pub rows_stale: u64,
    /// Events that could not be applied: (stream sequence, event id, error).
    pub failed: Vec<(u64, String, String)>,
    /// First and last stream sequence read.
    pub sequences: Option<(u64, u64)>,
    /// How long it took.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = self.sequences.map_or_else(
            || "nothing".to_owned(),
            |(a, b)| format!("sequences {a}..={b}"),
        );
        writeln!(
            f,
            "replayed {range}: {} events read, {} applied, {} already present, {} rows written, {} rows older than the \
             table's, {} failed, in {:.1}s",
            self.read,
            self.applied,
            self.already_present,
            self.rows_written,
            self.rows_stale,
            self.failed.len(),
            self.elapsed.as_secs_f64()
        )?;
        for (seq, id, error) in &self.failed {
            writeln!(f, "  failed: seq {seq} {id}: {error}")?;
        }
        Ok(())
    }
}

/// Replays `stream` (of epoch `epoch`) into the database through `applier`, under the retry policy.
pub async fn replay(
    stream: &Stream,
    applier: &Applier,
    policy: &Policy,
    epoch: i32,
    options: &Options,
) -> anyhow::Result<Summary> {
    if options.force {
        run(stream, &Forced(applier), policy, epoch, options).await
    } else {
        run(stream, applier, policy, epoch, options).await
    }
}

async fn run<W: Writer>(
    stream: &Stream,
    writer: &W,
    policy: &Policy,
    epoch: i32,
    options: &Options,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut stream = stream.clone();
    let last = stream.info().await?.state.last_sequence;
    let deliver_policy = match options.start {
        Start::Sequence(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        Start::Time(time) => DeliverPolicy::ByStartTime { start_time: time },
    };
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy,
            description: Some("stripe-sync replay".into()),
            ..Default::default()
        })
        .await?;
    if consumer.info().await?.num_pending > 0 {
        let mut messages = consumer.messages().await?;
        let mut batch: Vec<Incoming> = Vec::with_capacity(options.batch_size.get());
        while let Some(message) = messages.next().await {
            let message = message?;
            let info = message
                .info()
                .map_err(|e| anyhow::anyhow!("reading a message's stream info: {e}"))?;
            let (seq, pending, published) = (info.stream_sequence, info.pending, info.published);
            if options.until.is_some_and(|until| published > until) {
                break;
            }
            summary.read += 1;
            summary.sequences = Some((summary.sequences.map_or(seq, |(first, _)| first), seq));
            match Incoming::from_bytes(crate::store::order_of(epoch, seq), message.payload.clone())
            {
                Ok(event) => batch.push(event),
                Err(err) => summary.failed.push((seq, "?".into(), err.to_string())),
            }
            if batch.len() >= options.batch_size.get() {
                apply_batch(writer, policy, std::mem::take(&mut batch), &mut summary).await;
            }
            if pending == 0 || seq >= last {
                break;
            }
        }
        // The tail: fewer events than a batch, or the events before `--until`.
        apply_batch(writer, policy, batch, &mut summary).await;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

async fn apply_batch<W: Writer>(
    writer: &W,
    policy: &Policy,
    batch: Vec<Incoming>,
    summary: &mut Summary,
) {
    if batch.is_empty() {
        return;
    }
    let (_never, mut stop) = watch::channel(false);
    let (settled, report) = batch::apply(writer, policy, &batch, &mut stop).await;
    add(summary, &report);
    for (event, outcome) in batch.iter().zip(settled) {
        if let Settled::Failed { error, .. } = outcome {
            summary.failed.push((event.seq, event.id.clone(), error));
        }
    }
}

fn add(summary: &mut Summary, report: &Report) {
    summary.applied += report.new as u64;
    summary.already_present += (report.events - report.new) as u64;
    summary.rows_written += report.rows_written as u64;
    summary.rows_stale += report.rows_stale as u64;
}
