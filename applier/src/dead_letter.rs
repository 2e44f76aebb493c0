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

/// A dead letter as stored.
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
    /// The event as received.
    pub payload: Bytes,
}

/// Reads every dead letter, oldest first.
pub async fn read_all(dlq: &jetstream::stream::Stream) -> anyhow::Result<Vec<StoredLetter>> {
    let mut dlq = dlq.clone();
    let state = dlq.info().await?.state.clone();
    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for seq in state.first_sequence..=state.last_sequence {
        // Redriven letters are deleted: their sequences are gaps.
        let Ok(message) = dlq.get_raw_message(seq).await else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let mut headers: Vec<(String, String)> = message
            .headers
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| (AsRef::<str>::as_ref(k).to_owned(), v.as_str().to_owned()))
            })
            .collect();
        headers.sort();
        letters.push(StoredLetter {
            dlq_seq: seq,
            event_id: header("Stripe-Event-Id"),
            event_type: header(subjects::HEADER_EVENT_TYPE),
            error: header(subjects::HEADER_DLQ_ERROR),
            attempts: header(subjects::HEADER_DLQ_ATTEMPTS),
            failed_at: header(subjects::HEADER_DLQ_FAILED_AT),
            stream_seq: header(subjects::HEADER_DLQ_STREAM_SEQ).parse().unwrap_or(0),
            headers,
            payload: message.payload.clone(),
        });
    }
    Ok(letters)
}

/// What a redrive did to one letter.
#[derive(Debug)]
pub enum Redriven {
    /// Applied, and removed from the dead letter.
    Applied,
    /// Still failing; left in the dead letter.
    Failed(String),
}

/// Applies a dead letter again through the normal path; on success removes it from the dead letter.
pub async fn redrive(
    dlq: &jetstream::stream::Stream,
    applier: &crate::apply::Applier,
    letter: &StoredLetter,
) -> anyhow::Result<Redriven> {
    let event = match crate::event::Incoming::from_bytes(letter.stream_seq, letter.payload.clone())
    {
        Ok(event) => event,
        Err(err) => return Ok(Redriven::Failed(err.to_string())),
    };
    match applier
        .apply_retrying(std::slice::from_ref(&event), crate::apply::Mode::Normal)
        .await
    {
        Ok(_) => {
            dlq.delete_message(letter.dlq_seq)
                .await
                .map_err(|e| anyhow::anyhow!("removing the redriven letter: {e}"))?;
            Ok(Redriven::Applied)
        }
        Err(err) => Ok(Redriven::Failed(err.detail())),
    }
}
