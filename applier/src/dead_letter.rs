//! The dead letter: events the applier could not apply after the configured attempts, published with the error,
//! the attempt count and their place in the events stream, so an operator can inspect and redrive them.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use stripe_sync_shared::subjects::{self, Topology};

/// Publishes to the dead-letter stream.
#[derive(Clone)]
pub struct DeadLetter {
    js: jetstream::Context,
    topology: Topology,
}

/// What is known of an event being dead-lettered.
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
        let event_type = letter
            .event_type
            .map(str::to_owned)
            .or_else(|| header(subjects::HEADER_EVENT_TYPE))
            .unwrap_or_else(|| "unknown".into());
        let event_id = letter
            .event_id
            .map(str::to_owned)
            .or_else(|| header(subjects::HEADER_MSG_ID))
            .unwrap_or_else(|| "unknown".into());
        let mut headers = HeaderMap::new();
        if let Some(original) = letter.headers {
            for (name, values) in original.iter() {
                if AsRef::<str>::as_ref(name) == subjects::HEADER_MSG_ID {
                    continue;
                }
                for value in values {
                    headers.append(AsRef::<str>::as_ref(name), value.as_str());
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
