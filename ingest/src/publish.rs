//! Publishing a verified event to JetStream and waiting, bounded, for the stream's acknowledgement.
//! The stream is set up in the background, so ingest starts (and stays up) while NATS is away.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use stripe_sync_shared::event_head::RoutingHead;
use stripe_sync_shared::settings::StreamSettings;
use stripe_sync_shared::subjects::{self, Topology};
use stripe_sync_shared::wait::{self, Attempt};
use stripe_sync_shared::{nats, telemetry};

/// Why an event was not stored. Every variant means "Stripe should retry".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not connected to NATS (yet, or any more).
    #[error("not connected to NATS")]
    Disconnected,
    /// The events stream is not set up yet.
    #[error("the events stream is not ready yet")]
    NotReady,
    /// No acknowledgement within the configured wait.
    #[error("JetStream did not acknowledge within {0:?}")]
    Timeout(Duration),
    /// JetStream refused or failed the write.
    #[error("JetStream did not store the event: {0}")]
    Failed(String),
}

/// Publishes events; cheap to clone.

#[derive(Debug, Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    topology: Arc<OnceLock<Topology>>,
    stream_name: Arc<str>,
    timeout: Duration,
}

impl Publisher {
    /// A publisher whose stream is not set up yet: see [`Publisher::set_up_stream`].
    #[must_use]
    pub fn new(client: Client, stream_name: &str, timeout: Duration) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            topology: Arc::new(OnceLock::new()),
            stream_name: stream_name.into(),
            timeout,
        }
    }

    /// Waits for NATS, then creates or checks the events stream, retrying until it succeeds. Fails only when the
    /// server can never work (too old, stream of another shape): the caller stops the process then.
    pub async fn set_up_stream(&self, settings: &StreamSettings) -> anyhow::Result<Topology> {
        let topology = wait::until_ready("NATS and the events stream", || async {
            if self.client.connection_state() != State::Connected {
                return Err(Attempt::NotYet(anyhow::anyhow!("not connected to NATS")));
            }
            nats::ensure_events_stream(&self.js, settings, true)
                .await
                .map_err(|err| match err {
                    nats::SetupError::Incompatible(reason) => {
                        Attempt::Fatal(anyhow::anyhow!(reason))
                    }
                    nats::SetupError::Nats(err) => Attempt::NotYet(err),
                })
        })
        .await?;
        let _ = self.topology.set(topology.clone());
        tracing::info!(stream = %settings.name, partitions = topology.partitions, "events stream ready");
        Ok(topology)
    }

    /// True once connected and the stream exists (checked live, for readiness probes).
    pub async fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
            && self.topology.get().is_some()
            && tokio::time::timeout(
                Duration::from_secs(2),
                self.js.get_stream_no_info(&*self.stream_name),
            )
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Largest payload the server accepts, once connected.
    #[must_use]
    pub fn server_max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Publishes the raw body and returns JetStream's acknowledgement (a duplicate event id is acknowledged too).
    pub async fn publish(
        &self,
        head: &RoutingHead<'_>,
        body: Bytes,
        endpoint: &str,
    ) -> Result<PublishAck, PublishError> {
        if self.client.connection_state() != State::Connected {
            return Err(PublishError::Disconnected);
        }
        let topology = self.topology.get().ok_or(PublishError::NotReady)?;
        let routing_key =
            subjects::routing_key(head.account.as_deref(), head.object_id.as_deref(), &head.id);
        let subject = topology.event_subject(topology.partition_of(&routing_key), &head.event_type);

        let mut headers = HeaderMap::new();
        // The id has no control characters (RoutingHead refuses them): it travels as is, for JetStream's dedupe.
        headers.insert(subjects::HEADER_MSG_ID, head.id.as_ref());
        headers.insert(
            subjects::HEADER_EVENT_TYPE,
            subjects::header_safe(&head.event_type, 256).as_str(),
        );
        if let Some(id) = &head.object_id {
            headers.insert(
                subjects::HEADER_OBJECT_ID,
                subjects::header_safe(id, 512).as_str(),
            );
        }
        if let Some(object) = &head.object_type {
            headers.insert(
                subjects::HEADER_OBJECT_TYPE,
                subjects::header_safe(object, 256).as_str(),
            );
        }
        if let Some(account) = &head.account {
            headers.insert(
                subjects::HEADER_ACCOUNT,
                subjects::header_safe(account, 256).as_str(),
            );
        }
        headers.insert(subjects::HEADER_ENDPOINT, endpoint);
        telemetry::inject_trace_context(&tracing::Span::current(), &mut headers);

        let publish = async {
            let ack = self
                .js
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| PublishError::Failed(e.to_string()))?;
            ack.await.map_err(|e| PublishError::Failed(e.to_string()))
        };
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, publish).await {
            Ok(result) => result,
            Err(_) => Err(PublishError::Timeout(self.timeout)),
        };
        metrics::histogram!(stripe_sync_shared::metrics::names::PUBLISH_DURATION)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Sends everything still buffered to the server (at shutdown), waiting at most `timeout`; at once when not
    /// connected (nothing can be sent, and nothing waits for it: in-flight requests already got their 503).
    pub async fn flush(&self, timeout: Duration) {
        if self.client.connection_state() != State::Connected {
            return;
        }
        match tokio::time::timeout(timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "flushing the NATS connection at shutdown failed")
            }
            Err(_) => tracing::warn!("flushing the NATS connection at shutdown timed out"),
        }
    }
}
