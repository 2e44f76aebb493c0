//! The soak's sender: Stripe in front of a load balancer. Events go out at a fixed rate, round-robin over the ingest
//! processes; a delivery that fails (connection refused or reset because that ingest is down, a timeout, any answer
//! but 200) is signed again and retried on the next ingest after a backoff (100 ms doubling to 2 s), until a 200.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};

use super::clock::Clock;
use crate::loadgen::{Bodies, Sender, connect};

/// Longest wait for one attempt's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight at most (a sender's connection limit); more wait their turn.
const IN_FLIGHT: usize = 512;

/// Why an attempt failed.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// No connection (the ingest is down).
    Refused,
    /// The connection broke before the answer (killed mid-request, or a connection it closed).
    Broken,
    /// No answer within [`ATTEMPT_TIMEOUT`].
    Timeout,
    /// An answer other than 200.
    Status(u16),
}

/// Counters the sampler reads (cumulative).
#[derive(Default)]
pub(crate) struct Counts {
    /// Events sent a first time.
    pub sent: AtomicU64,
    /// Events answered 200.
    pub accepted: AtomicU64,
    /// Events sent and not yet answered 200.
    pub outstanding: AtomicU64,
    /// Failed attempts by cause.
    pub refused: AtomicU64,
    pub broken: AtomicU64,
    pub timeout: AtomicU64,
    pub status_5xx: AtomicU64,
    pub status_other: AtomicU64,
    /// Events that needed more than one attempt.
    pub retried_events: AtomicU64,
    /// Events the schedule had due while the sender was at its cap of unanswered events, never sent.
    pub not_offered: AtomicU64,
}

impl Counts {
    /// Failed attempts so far.
    pub(crate) fn failed(&self) -> u64 {
        [
            &self.refused,
            &self.broken,
            &self.timeout,
            &self.status_5xx,
            &self.status_other,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// The sender.
pub(crate) struct Load {
    bodies: Bodies,
    ports: Vec<u16>,
    pools: Vec<Mutex<Vec<Sender>>>,
    in_flight: tokio::sync::Semaphore,
    next: AtomicUsize,
    clock: Arc<Clock>,
    pub counts: Counts,
    /// Answer time of the attempts answered 200, microseconds: this window's and the whole run's.
    webhook: Mutex<(Histogram<u64>, Histogram<u64>)>,
}

impl Load {
    pub(crate) fn new(bodies: Bodies, ports: Vec<u16>, clock: Arc<Clock>) -> anyhow::Result<Self> {
        Ok(Self {
            bodies,
            pools: ports.iter().map(|_| Mutex::default()).collect(),
            ports,
            in_flight: tokio::sync::Semaphore::new(IN_FLIGHT),
            next: AtomicUsize::new(0),
            clock,
            counts: Counts::default(),
            webhook: Mutex::new((Histogram::new(3)?, Histogram::new(3)?)),
        })
    }

    /// The generator (for the templates behind each event number).
    pub(crate) fn bodies(&self) -> &Bodies {
        &self.bodies
    }

    /// Sends `rate` new events a second for `duration`, each stamped with the second it is first sent in; returns
    /// when the last one is sent (retries go on: see [`Counts::outstanding`]). When `cap` events are unanswered the
    /// sender waits, and the events it could not send in time are not sent at all (counted in
    /// [`Counts::not_offered`]): the achieved rate is then the system's, and the sender's memory stays bounded.
    pub(crate) async fn run(self: Arc<Self>, rate: u32, duration: Duration, cap: u64) {
        let started = Instant::now();
        let mut owed_before = 0u64;
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
            let done = self.counts.sent.load(Ordering::Relaxed) + owed_before;
            for _ in done..due {
                if self.counts.outstanding.load(Ordering::Relaxed) >= cap {
                    owed_before += 1;
                    self.counts.not_offered.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let created = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let (n, body) = self.bodies.next_created(created);
                self.counts.sent.fetch_add(1, Ordering::Relaxed);
                self.counts.outstanding.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(self.clone().deliver(n, body));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Delivers one event until it is answered 200.
    async fn deliver(self: Arc<Self>, n: u64, body: Bytes) {
        let mut target = self.next.fetch_add(1, Ordering::Relaxed) % self.ports.len();
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let Ok(permit) = self.in_flight.acquire().await else {
                return;
            };
            // Ingest's answer time: from a free connection slot on, not the wait for one.
            let started = Instant::now();
            let result = self.attempt(target, &body).await;
            drop(permit);
            match result {
                Ok(()) => {
                    let at = Instant::now();
                    if let Ok(mut h) = self.webhook.lock() {
                        let micros = u64::try_from(at.duration_since(started).as_micros())
                            .unwrap_or(u64::MAX);
                        let _ = h.0.record(micros);
                        let _ = h.1.record(micros);
                    }
                    self.clock.accepted(n, at);
                    self.counts.accepted.fetch_add(1, Ordering::Relaxed);
                    self.counts.outstanding.fetch_sub(1, Ordering::Relaxed);
                    if attempts > 1 {
                        self.counts.retried_events.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Err(failure) => {
                    let counter = match failure {
                        Failure::Refused => &self.counts.refused,
                        Failure::Broken => &self.counts.broken,
                        Failure::Timeout => &self.counts.timeout,
                        Failure::Status(500..=599) => &self.counts.status_5xx,
                        Failure::Status(_) => &self.counts.status_other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    target = (target + 1) % self.ports.len();
                }
            }
        }
    }

    /// One attempt on ingest `target`, on a pooled keep-alive connection or a new one.
    async fn attempt(&self, target: usize, body: &Bytes) -> Result<(), Failure> {
        let pooled = loop {
            let Some(sender) = self.pools[target].lock().ok().and_then(|mut p| p.pop()) else {
                break None;
            };
            if !sender.is_closed() {
                break Some(sender);
            }
        };
        let mut sender = match pooled {
            Some(sender) => sender,
            None => connect(self.ports[target])
                .await
                .map_err(|_| Failure::Refused)?,
        };
        let request = hyper::Request::post("/webhooks")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("stripe-signature", self.bodies.sign(body))
            .body(Full::new(body.clone()))
            .map_err(|_| Failure::Status(0))?;
        let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        })
        .await;
        match answer {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(_)) => Err(Failure::Broken),
            Ok(Ok(status)) => {
                if let Ok(mut pool) = self.pools[target].lock() {
                    pool.push(sender);
                }
                if status == 200 {
                    Ok(())
                } else {
                    Err(Failure::Status(status))
                }
            }
        }
    }

    /// Webhook answer times (200s) since the last call.
    pub(crate) fn take_webhook_window(&self) -> Option<Histogram<u64>> {
        let mut h = self.webhook.lock().ok()?;
        let window = h.0.clone();
        h.0.reset();
        Some(window)
    }

    /// Webhook answer times (200s) of the whole run.
    pub(crate) fn webhook_total(&self) -> Option<Histogram<u64>> {
        self.webhook.lock().ok().map(|h| h.1.clone())
    }
}
