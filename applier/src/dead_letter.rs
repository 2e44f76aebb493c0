//! The dead letter: events the applier could not apply after the configured attempts, published with the error,
//! the attempt count and their place in the events stream, so an operator can inspect and redrive them. Reading
//! it streams headers only, one letter at a time, so a dead letter of any size lists in bounded memory.

use anyhow::Context as _;
use std::future::Future;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use bytes::Bytes;
use futures::StreamExt as _;
use stripe_sync_shared::subjects::{self, Topology};
use tokio::sync::watch;

use crate::apply::Applier;
use crate::batch::{self, Settled};
use crate::decision::Policy;
use crate::event::Incoming;
use crate::worker::DeadLetters;

/// Publishes to the dead-letter stream.

#[derive(Debug, Clone)]
pub struct DeadLetter {
    js: jetstream::Context,
    topology: Topology,
}

/// What is known of an event being dead-lettered.
#[derive(Debug)]
pub struct Letter<'a> {
    /// The original headers (event type, ids, trace context).
    pub headers: Option<&'a HeaderMap>,
    /// The original body, unchanged.
    pub payload: Bytes,
    /// Its event type, if readable.
    pub event_type: Option<&'a str>,
    /// Its event id, if readable.
    pub event_id: Option<&'a str>,
    /// Sequence in the events stream.
    pub stream_seq: u64,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: &'a str,
}

impl DeadLetter {
    /// A dead letter on the deployment's topology.
    #[must_use]
    pub fn new(js: jetstream::Context, topology: Topology) -> Self {
        Self { js, topology }
    }

    /// Publishes the letter and waits for the dead-letter stream to store it.
    pub async fn publish(&self, letter: Letter<'_>) -> anyhow::Result<()> {
        let header = |name: &str| {
            letter
                .headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        // Whatever the event carries, a header value never holds a line break (the client refuses it).
        let event_type = letter
            .event_type
            .map(str::to_owned)
            .or_else(|| header(subjects::HEADER_EVENT_TYPE))
            .map_or_else(|| "unknown".into(), |t| subjects::header_safe(&t, 256));
        let event_id = letter
            .event_id
            .map(str::to_owned)
            .or_else(|| header(subjects::HEADER_MSG_ID))
            .map_or_else(|| "unknown".into(), |id| subjects::header_safe(&id, 256));
        let mut headers = HeaderMap::new();
        if let Some(original) = letter.headers {
            for (name, values) in original.iter() {
                if AsRef::<str>::as_ref(name) == subjects::HEADER_MSG_ID {
                    continue;
                }
                for value in values {
                    headers.append(
                        AsRef::<str>::as_ref(name),
                        subjects::header_safe(value.as_str(), 4096).as_str(),
                    );
                }
            }
        }
        // One dead letter per (event, place in the stream), even if publishing is retried.
        headers.insert(
            subjects::HEADER_MSG_ID,
            format!("{event_id}:{}", letter.stream_seq).as_str(),
        );
        headers.insert(subjects::HEADER_EVENT_TYPE, event_type.as_str());
        headers.insert("Stripe-Event-Id", event_id.as_str());
        headers.insert(
            subjects::HEADER_DLQ_ERROR,
            subjects::header_safe(letter.error, 1024).as_str(),
        );
        headers.insert(
            subjects::HEADER_DLQ_ATTEMPTS,
            letter.attempts.to_string().as_str(),
        );
        headers.insert(
            subjects::HEADER_DLQ_STREAM_SEQ,
            letter.stream_seq.to_string().as_str(),
        );
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?;
        headers.insert(subjects::HEADER_DLQ_FAILED_AT, now.as_str());
        self.js
            .publish_with_headers(
                self.topology.dlq_subject(&event_type),
                headers,
                letter.payload,
            )
            .await?
            .await?;
        Ok(())
    }
}

impl DeadLetters for DeadLetter {
    fn publish(&self, letter: Letter<'_>) -> impl Future<Output = anyhow::Result<()>> + Send {
        DeadLetter::publish(self, letter)
    }
}

/// A dead letter as stored: its headers (the payload is fetched only when needed, see [`payload`]).
#[derive(Debug)]
pub struct StoredLetter {
    /// Its sequence in the dead-letter stream.
    pub dlq_seq: u64,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: String,
    /// When it was dead-lettered.
    pub failed_at: String,
    /// Its sequence in the events stream.
    pub stream_seq: u64,
    /// Every header.
    pub headers: Vec<(String, String)>,
}

/// Calls `each` with every dead letter, oldest first, reading headers only (one letter in memory at a time).
pub async fn scan(
    dlq: &jetstream::stream::Stream,
    mut each: impl FnMut(StoredLetter) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut dlq = dlq.clone();
    if dlq.info().await?.state.messages == 0 {
        return Ok(0);
    }
    let consumer = dlq
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            headers_only: true,
            description: Some("stripe-sync dlq scan".into()),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading a message's stream info: {e}"))?;
        let (dlq_seq, pending) = (info.stream_sequence, info.pending);
        let headers = message.headers.clone().unwrap_or_default();
        each(stored(dlq_seq, &headers))?;
        seen += 1;
        if pending == 0 {
            break;
        }
    }
    Ok(seen)
}

fn stored(dlq_seq: u64, headers: &HeaderMap) -> StoredLetter {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let mut all: Vec<(String, String)> = headers
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (AsRef::<str>::as_ref(k).to_owned(), v.as_str().to_owned()))
        })
        .filter(|(k, _)| k != "Nats-Msg-Size")
        .collect();
    all.sort();
    StoredLetter {
        dlq_seq,
        event_id: header("Stripe-Event-Id"),
        event_type: header(subjects::HEADER_EVENT_TYPE),
        error: header(subjects::HEADER_DLQ_ERROR),
        attempts: header(subjects::HEADER_DLQ_ATTEMPTS),
        failed_at: header(subjects::HEADER_DLQ_FAILED_AT),
        stream_seq: header(subjects::HEADER_DLQ_STREAM_SEQ).parse().unwrap_or(0),
        headers: all,
    }
}

/// The event a dead letter holds, as received.
pub async fn payload(
    dlq: &jetstream::stream::Stream,
    letter: &StoredLetter,
) -> anyhow::Result<Bytes> {
    Ok(dlq
        .get_raw_message(letter.dlq_seq)
        .await
        .with_context(|| format!("reading dead letter {}", letter.dlq_seq))?
        .payload)
}

/// What a redrive did to one letter.
#[derive(Debug)]
pub enum Redriven {
    /// Applied, and removed from the dead letter.
    Applied,
    /// Still failing; left in the dead letter.
    Failed(String),
}

/// Applies a dead letter again through the normal path and the retry policy; on success removes it from the dead
/// letter.
pub async fn redrive(
    dlq: &jetstream::stream::Stream,
    applier: &Applier,
    policy: &Policy,
    letter: &StoredLetter,
    epoch: i32,
) -> anyhow::Result<Redriven> {
    let body = payload(dlq, letter).await?;
    let order = crate::store::order_of(epoch, letter.stream_seq);
    let event = match Incoming::from_bytes(order, body) {
        Ok(event) => event,
        Err(err) => return Ok(Redriven::Failed(err.to_string())),
    };
    let (_never, mut stop) = watch::channel(false);
    let (settled, _) = batch::apply(applier, policy, std::slice::from_ref(&event), &mut stop).await;
    match settled.into_iter().next() {
        Some(Settled::Applied) => {
            dlq.delete_message(letter.dlq_seq)
                .await
                .context("removing the redriven letter")?;
            Ok(Redriven::Applied)
        }
        Some(Settled::Failed { error, .. }) => Ok(Redriven::Failed(error)),
        Some(Settled::Stopped) | None => Ok(Redriven::Failed("not tried".into())),
    }
}
