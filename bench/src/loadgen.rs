//! The load generator: signed Stripe webhooks over HTTP/1.1 keep-alive connections, every request a distinct event
//! (so JetStream's dedupe never short-cuts the work). Closed loop (each connection sends as fast as answers come) for
//! throughput; paced (a fixed rate) for end-to-end latency. The same generator drives ingest and the no-op ceiling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use sha2::Sha256;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Builds distinct signed webhook bodies from a set of realistic templates.
pub(crate) struct Bodies {
    templates: Vec<Vec<u8>>,
    /// Where each template's event `created` (10 digits) starts.
    created_at: Vec<usize>,
    secret: String,
    counter: AtomicU64,
}

/// The digits of `evt_bench<9 digits>` in a template, overwritten per request.
const ID_MARKER: &[u8] = b"evt_bench";
/// What precedes the event's `created` in a template.
const CREATED_MARKER: &[u8] = b"\"created\":";

impl Bodies {
    pub(crate) fn new(secret: &str, offset: u64) -> Self {
        let templates = crate::events::generate(2_000, 0.3, 11);
        // The event's own `created` is its first one: the event's keys are written sorted, `created` before `data`.
        let created_at = templates
            .iter()
            .map(|t| {
                t.windows(CREATED_MARKER.len())
                    .position(|w| w == CREATED_MARKER)
                    .map_or(0, |i| i + CREATED_MARKER.len())
            })
            .collect();
        Self {
            templates,
            created_at,
            secret: secret.to_owned(),
            counter: AtomicU64::new(offset),
        }
    }

    /// The next body (with a fresh event id) and its `Stripe-Signature`, and its event id.
    pub(crate) fn next(&self) -> (Bytes, String, String) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let body = self.body(n, None);
        let signature = self.sign(&body);
        (body, signature, event_id(n))
    }

    /// The next event's number (its id is [`event_id`] of it) and body, stamped `created` (unix seconds, 10 digits)
    /// instead of the template's.
    pub(crate) fn next_created(&self, created: u64) -> (u64, Bytes) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        (n, self.body(n, Some(created)))
    }

    /// How many templates events cycle through.
    pub(crate) fn templates(&self) -> u64 {
        self.templates.len() as u64
    }

    /// The template event number `n` is made from (its object's id, type and lists are the template's).
    pub(crate) fn template_of(&self, n: u64) -> &[u8] {
        &self.templates[(n % self.templates.len() as u64) as usize]
    }

    fn body(&self, n: u64, created: Option<u64>) -> Bytes {
        let i = (n % self.templates.len() as u64) as usize;
        let mut body = self.templates[i].clone();
        let at = body
            .windows(ID_MARKER.len())
            .position(|w| w == ID_MARKER)
            .map_or(0, |i| i + ID_MARKER.len());
        let digits = format!("{:09}", n % 1_000_000_000);
        body[at..at + 9].copy_from_slice(digits.as_bytes());
        if let Some(created) = created {
            let at = self.created_at[i];
            let digits = format!("{created:010}");
            if digits.len() == 10
                && body
                    .get(at..at + 10)
                    .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            {
                body[at..at + 10].copy_from_slice(digits.as_bytes());
            }
        }
        Bytes::from(body)
    }

    /// `Stripe-Signature` of `body`, signed now (Stripe signs every delivery attempt anew).
    pub(crate) fn sign(&self, body: &[u8]) -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The id of event number `n`.
pub(crate) fn event_id(n: u64) -> String {
    format!("evt_bench{:09}", n % 1_000_000_000)
}

/// The number of an event id [`event_id`] made.
pub(crate) fn event_number(id: &str) -> Option<u64> {
    id.strip_prefix("evt_bench")?.parse().ok()
}

/// What a load run measured.
pub(crate) struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Latency of successful requests, microseconds.
    pub latency: Histogram<u64>,
}

impl LoadResult {
    pub(crate) fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        self.latency.value_at_quantile(p) as f64 / 1000.0
    }
}

/// One HTTP/1.1 connection's request half.
pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A keep-alive connection to `127.0.0.1:<port>`.
pub(crate) async fn connect(port: u16) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one webhook; returns the status and the event id.
async fn send(sender: &mut Sender, bodies: &Bodies, path: &str) -> anyhow::Result<(u16, String)> {
    let (body, signature, event_id) = bodies.next();
    let request = hyper::Request::post(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(Full::new(body))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok((status, event_id))
}

/// Closed loop: `connections` connections each send back to back for `warmup + duration`; only `duration` counts.
pub(crate) async fn closed_loop(
    port: u16,
    path: &str,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    bodies: Arc<Bodies>,
) -> anyhow::Result<LoadResult> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sender = connect(port).await?;
        let (bodies, measuring, stop, path) = (
            bodies.clone(),
            measuring.clone(),
            stop.clone(),
            path.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = send(&mut sender, &bodies, &path).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match result {
                    Ok((200, _)) => {
                        ok += 1;
                        let _ = latency.record(started.elapsed().as_micros() as u64);
                    }
                    Ok(_) | Err(_) => failed += 1,
                }
            }
            (ok, failed, latency)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    LoadResult::sum(elapsed, tasks).await
}

impl LoadResult {
    /// Adds up what each connection's task counted.
    async fn sum(elapsed: Duration, tasks: Vec<JoinHandle<Counts>>) -> anyhow::Result<Self> {
        let mut total = Self {
            ok: 0,
            failed: 0,
            elapsed,
            latency: Histogram::new(3)?,
        };
        for task in tasks {
            let (ok, failed, latency) = task.await?;
            total.ok += ok;
            total.failed += failed;
            total.latency.add(latency)?;
        }
        Ok(total)
    }
}

/// Requests answered 200, other answers, and the latency of the 200s, of one connection.
type Counts = (u64, u64, Histogram<u64>);

/// Paced: `rate` requests a second for `duration`, over a pool of connections; calls `on_accepted` with each event id
/// answered 200 and the instant the answer came.
pub(crate) async fn paced(
    port: u16,
    rate: u32,
    duration: Duration,
    bodies: Arc<Bodies>,
    on_accepted: impl Fn(String, Instant) + Send + Sync + 'static,
) -> anyhow::Result<LoadResult> {
    let pool_size = 32;
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(pool_size * 4);
    let rx = Arc::new(Mutex::new(rx));
    let on_accepted = Arc::new(on_accepted);
    let mut tasks = Vec::new();
    for _ in 0..pool_size {
        let mut sender = connect(port).await?;
        let (rx, bodies, on_accepted) = (rx.clone(), bodies.clone(), on_accepted.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                let tick = rx.lock().await.recv().await;
                if tick.is_none() {
                    break;
                }
                let started = Instant::now();
                match send(&mut sender, &bodies, "/webhooks").await {
                    Ok((200, event_id)) => {
                        ok += 1;
                        let _ = latency.record(started.elapsed().as_micros() as u64);
                        on_accepted(event_id, Instant::now());
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, latency)
        }));
    }
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs(1) / rate);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < duration {
        interval.tick().await;
        let _ = tx.send(()).await;
    }
    drop(tx);
    let elapsed = started.elapsed();
    LoadResult::sum(elapsed, tasks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_event_carries_its_id_and_created_and_the_template_otherwise() {
        let bodies = Bodies::new("whsec_x", 41);
        let template: serde_json::Value = serde_json::from_slice(bodies.template_of(41)).unwrap();
        let (n, body) = bodies.next_created(1_790_000_123);
        assert_eq!(n, 41);
        let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(event["id"], event_id(41).as_str());
        assert_eq!(event_number(event["id"].as_str().unwrap()), Some(41));
        assert_eq!(event["created"], 1_790_000_123);
        assert_eq!(
            event["data"], template["data"],
            "the object, its own created included, is the template's"
        );
        assert_eq!(event["type"], template["type"]);
    }
}
