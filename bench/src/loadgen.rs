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
    secret: String,
    counter: AtomicU64,
}

/// The digits of `evt_bench<9 digits>` in a template, overwritten per request.
const ID_MARKER: &[u8] = b"evt_bench";

impl Bodies {
    pub(crate) fn new(secret: &str, offset: u64) -> Self {
        Self {
            templates: crate::events::generate(2_000, 0.3, 11),
            secret: secret.to_owned(),
            counter: AtomicU64::new(offset),
        }
    }

    /// The next body (with a fresh event id) and its `Stripe-Signature`, and its event id.
    pub(crate) fn next(&self) -> (Bytes, String, String) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut body = self.templates[(n % self.templates.len() as u64) as usize].clone();
        let at = body
            .windows(ID_MARKER.len())
            .position(|w| w == ID_MARKER)
            .map_or(0, |i| i + ID_MARKER.len());
        let digits = format!("{:09}", n % 1_000_000_000);
        body[at..at + 9].copy_from_slice(digits.as_bytes());
        let event_id = format!("evt_bench{digits}");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(&body);
        let signature = format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()));
        (Bytes::from(body), signature, event_id)
    }
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> anyhow::Result<Sender> {
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
