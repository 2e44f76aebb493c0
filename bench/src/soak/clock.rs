//! The commit clock: from each webhook's 200 to its event's transaction committed, observed with LISTEN/NOTIFY as in
//! `e2e.rs`, kept per 10-second window, per minute and overall; and every id answered 200, for the final count.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::loadgen::event_number;

/// Latencies in microseconds.
type Micros = Histogram<u64>;

/// What the clock holds.
struct Inner {
    /// Accepted, not yet seen committed: when the 200 came.
    pending: HashMap<u64, Instant>,
    /// Seen committed before their 200 was read (e.g. published by an ingest killed before it answered).
    early: HashSet<u64>,
    /// Every event number answered 200.
    accepted: Vec<u64>,
    committed: u64,
    window: Micros,
    minutes: Vec<Micros>,
    total: Micros,
}

/// Shared by the load generator (accepts) and the observer (commits).
pub(crate) struct Clock {
    started: Instant,
    inner: Mutex<Inner>,
}

/// One window's commits.
pub(crate) struct Window {
    pub committed: u64,
    pub pending: u64,
    pub latency: Micros,
}

impl Clock {
    pub(crate) fn new(started: Instant) -> anyhow::Result<Self> {
        Ok(Self {
            started,
            inner: Mutex::new(Inner {
                pending: HashMap::new(),
                early: HashSet::new(),
                accepted: Vec::new(),
                committed: 0,
                window: Histogram::new(3)?,
                minutes: Vec::new(),
                total: Histogram::new(3)?,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Event `n` was answered 200 at `at`.
    pub(crate) fn accepted(&self, n: u64, at: Instant) {
        let mut inner = self.lock();
        inner.accepted.push(n);
        if inner.early.remove(&n) {
            // Committed before the client saw its 200: latency 0.
            self.record(&mut inner, 0, at);
        } else {
            inner.pending.insert(n, at);
        }
    }

    /// Event `n`'s transaction committed (its notification arrived at `at`).
    fn committed(&self, n: u64, at: Instant) {
        let mut inner = self.lock();
        inner.committed += 1;
        if let Some(accepted_at) = inner.pending.remove(&n) {
            let micros =
                u64::try_from(at.duration_since(accepted_at).as_micros()).unwrap_or(u64::MAX);
            self.record(&mut inner, micros, at);
        } else {
            inner.early.insert(n);
        }
    }

    fn record(&self, inner: &mut Inner, micros: u64, at: Instant) {
        let minute = usize::try_from(at.duration_since(self.started).as_secs() / 60).unwrap_or(0);
        while inner.minutes.len() <= minute {
            if let Ok(h) = Histogram::new(3) {
                inner.minutes.push(h);
            }
        }
        let _ = inner.window.record(micros);
        let _ = inner.minutes[minute].record(micros);
        let _ = inner.total.record(micros);
    }

    /// The commits since the last call, and how many accepted events are not yet seen committed.
    pub(crate) fn take_window(&self) -> Window {
        let mut inner = self.lock();
        let latency = inner.window.clone();
        inner.window.reset();
        let committed = std::mem::take(&mut inner.committed);
        Window {
            committed,
            pending: inner.pending.len() as u64,
            latency,
        }
    }

    /// Accepted events not yet seen committed.
    pub(crate) fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Every event number answered 200, per-minute latencies (by commit minute) and the overall latency.
    pub(crate) fn finish(&self) -> (Vec<u64>, Vec<Micros>, Micros, usize) {
        let inner = self.lock();
        (
            inner.accepted.clone(),
            inner.minutes.clone(),
            inner.total.clone(),
            inner.pending.len(),
        )
    }
}

/// Installs the trigger that notifies each event id on insert into `stripe.events` (delivered at commit).
pub(crate) async fn install_trigger(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "create function public.bench_committed() returns trigger language plpgsql as $$ \
         begin perform pg_notify('bench_committed', new.id); return null; end $$; \
         create trigger bench_committed after insert on stripe.events \
         for each row execute function public.bench_committed();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Feeds commits to `clock` until `stop`; returns how many times the listener's connection failed (notifications
/// sent meanwhile are lost: their events then show as "latency not observed", never as lost).
pub(crate) async fn observe(
    mut listener: sqlx::postgres::PgListener,
    clock: std::sync::Arc<Clock>,
    stop: std::sync::Arc<AtomicBool>,
) -> u64 {
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), listener.try_recv()).await {
            Ok(Ok(Some(note))) => {
                if let Some(n) = event_number(note.payload()) {
                    clock.committed(n, Instant::now());
                }
            }
            Ok(Ok(None) | Err(_)) => failures += 1,
            Err(_) => {}
        }
    }
    failures
}
