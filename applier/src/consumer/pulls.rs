//! A partition's pull requests, made by hand so a hand-over knows when nothing more can arrive. async-nats'
//! `messages()` stream drops its subscription while its requests are still open: a message the server sent into
//! that gap is lost to everyone until `ack_wait` ends (minutes with a long `ack_wait`). Here the pump stops asking,
//! reads until every open request has ended (filled, or closed by the server), and hands back what came.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::BatchConfig};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::time::Instant;

use super::GROUP;

/// Why pulling stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum Interrupted {
    /// The consumer was deleted (or replaced by a push consumer), or the connection closed for good: open anew.
    #[error("the consumer is gone: {0}")]
    Reopen(String),
    /// Anything else (no responders during an election, a request the server refuses): ask again later, keeping
    /// the open requests and the pin.
    #[error("{0}")]
    Failed(String),
}

/// A pull request: the batch settings and, once the server pinned us, our pin id.
#[derive(Serialize)]
struct Request<'a> {
    #[serde(flatten)]
    batch: &'a BatchConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// The open pull requests of one partition's consumer.
pub(super) struct Pulls {
    client: async_nats::Client,
    context: jetstream::Context,
    subject: String,
    inbox: String,
    replies: Subscriber,
    request: BatchConfig,
    /// Messages the open requests may still deliver.
    owed: usize,
    last_request: Instant,
    last_heard: Instant,
    /// The pin the server gave us (`Nats-Pin-Id`), sent with every request.
    pub(super) pin: Option<String>,
    /// A request `owed` no longer counts may be open (a heartbeat was missed: a busy server, a reconnect): the
    /// drain then ends on silence only.
    doubtful: bool,
}

impl Pulls {
    /// Subscribes the replies of the consumer's pull requests; asks nothing yet.
    pub(super) async fn open(
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
        batch: usize,
        expires: Duration,
        heartbeat: Duration,
    ) -> Result<Self, Interrupted> {
        let inbox = client.new_inbox();
        let replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Interrupted::Failed(e.to_string()))?;
        Ok(Self {
            client: client.clone(),
            context: jetstream::new(client.clone()),
            subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            inbox,
            replies,
            request: BatchConfig {
                batch,
                expires: Some(expires),
                idle_heartbeat: heartbeat,
                group: Some(GROUP.to_owned()),
                ..Default::default()
            },
            owed: 0,
            last_request: Instant::now(),
            last_heard: Instant::now(),
            pin: None,
            doubtful: false,
        })
    }

    /// The next message, asking for more whenever less than half a batch is owed (one request at a time until the
    /// server pinned us: a second request without our pin would wait unserved). Cancel-safe.
    pub(super) async fn next(&mut self) -> Result<jetstream::Message, Interrupted> {
        loop {
            let batch = self.request.batch;
            if self.owed <= batch / 2 && (self.pin.is_some() || self.owed == 0) {
                self.ask().await?;
            }
            // The server beats every `heartbeat` while a request waits; twice that in silence means it is lost.
            let silent_until =
                self.last_heard.max(self.last_request) + self.request.idle_heartbeat * 2;
            match tokio::time::timeout_at(silent_until, self.replies.next()).await {
                Ok(Some(reply)) => {
                    if let Some(message) = self.settle(reply)? {
                        return Ok(message);
                    }
                }
                Ok(None) => return Err(Interrupted::Reopen("the connection closed".into())),
                Err(_) => {
                    tracing::debug!(subject = %self.subject, "no heartbeat from the pull request; asking again");
                    self.owed = 0;
                    self.doubtful = true;
                }
            }
        }
    }

    /// Stops asking and reads until every open request has ended: `owed` is down to zero, or the inbox has been
    /// silent for twice the heartbeat (every open request beats), at most three times `expires`. Returns what
    /// arrived meanwhile, for the caller to hand back, and the pin.
    pub(super) async fn drain(mut self) -> (Vec<jetstream::Message>, Option<String>) {
        let quiet = self.request.idle_heartbeat * 2;
        let cap = Instant::now() + self.request.expires.unwrap_or_default() * 3;
        let mut drained = Vec::new();
        while self.owed > 0 || self.doubtful {
            let until = (Instant::now() + quiet).min(cap);
            match tokio::time::timeout_at(until, self.replies.next()).await {
                Ok(Some(reply)) => match self.settle(reply) {
                    Ok(Some(message)) => drained.push(message),
                    Ok(None) => {}
                    Err(_) => break,
                },
                Ok(None) => break,
                // Silence while disconnected proves nothing: replies may come once the connection is back.
                Err(_)
                    if Instant::now() < cap
                        && self.client.connection_state()
                            != async_nats::connection::State::Connected => {}
                Err(_) => break,
            }
        }
        (drained, self.pin)
    }

    async fn ask(&mut self) -> Result<(), Interrupted> {
        let body = serde_json::to_vec(&Request {
            batch: &self.request,
            id: self.pin.as_deref(),
        })
        .map_err(|e| Interrupted::Failed(e.to_string()))?;
        // Counted before sending, so a cancelled send errs on the side of waiting longer in `drain`.
        self.owed += self.request.batch;
        self.last_request = Instant::now();
        if let Err(err) = self
            .client
            .publish_with_reply(self.subject.clone(), self.inbox.clone(), body.into())
            .await
        {
            self.owed -= self.request.batch;
            return Err(Interrupted::Failed(err.to_string()));
        }
        Ok(())
    }

    /// Accounts for one reply: a message, a heartbeat, or the end of a request (with what it left undelivered).
    fn settle(
        &mut self,
        reply: async_nats::Message,
    ) -> Result<Option<jetstream::Message>, Interrupted> {
        self.last_heard = Instant::now();
        let status = reply.status.unwrap_or(StatusCode::OK);
        let why = reply.description.clone().unwrap_or_default();
        match status {
            StatusCode::OK => {
                self.owed = self.owed.saturating_sub(1);
                // The server's `Nats-Pin-Id` is the last one: a publisher may have set another.
                if let Some(id) = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get_last("Nats-Pin-Id"))
                {
                    self.pin = Some(id.as_str().to_owned());
                }
                return Ok(Some(jetstream::Message {
                    message: reply,
                    context: self.context.clone(),
                }));
            }
            StatusCode::IDLE_HEARTBEAT => return Ok(None),
            StatusCode::REQUEST_TERMINATED
                if why.contains("Consumer Deleted") || why.contains("push based") =>
            {
                return Err(Interrupted::Reopen(why));
            }
            // A request the server will refuse every time: asking again at once would only spin.
            StatusCode::REQUEST_TERMINATED if why.starts_with("Exceeded MaxRequest") => {
                return Err(Interrupted::Failed(why));
            }
            StatusCode::PIN_ID_MISMATCH => self.pin = None,
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND | StatusCode::REQUEST_TERMINATED => {}
            _ => return Err(Interrupted::Failed(format!("{status}: {why}"))),
        }
        let left = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Pending-Messages"))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(self.request.batch);
        self.owed = self.owed.saturating_sub(left);
        Ok(None)
    }
}
