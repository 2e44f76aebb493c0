//! What the soak writes: a sample every 10 s (rates, latencies, RSS of every process, the machine's load), the
//! summary with its verdict, as bench/out/soak.json, bench/out/soak.csv, markdown on stdout and the chart.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::chaos::Kill;
use super::clock::Clock;
use super::fleet::Fleet;
use super::handovers::Handover;
use super::load::{Counts, Load};
use super::verify::Verdict;
use super::{Config, chart};
use crate::harness::out_dir;

/// Time between samples.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// One 10-second window.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Sample {
    /// End of the window, seconds from the start of the load.
    pub t_s: f64,
    pub phase: &'static str,
    pub sent_per_s: f64,
    pub accepted_per_s: f64,
    /// Events whose commit was seen in the window, per second.
    pub committed_per_s: f64,
    pub failed_attempts: u64,
    /// Accepted events not yet seen committed, at the end of the window.
    pub pending: u64,
    /// From the 200 to the commit, of the events committed in the window.
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub e2e_max_ms: Option<f64>,
    /// Ingest's answer time of the 200s in the window.
    pub webhook_p50_ms: Option<f64>,
    pub webhook_p99_ms: Option<f64>,
    /// RSS of each slot's process (MiB; `None`: down), in the order of the report's `slots`.
    pub rss_mib: Vec<Option<f64>>,
    /// The machine's 1-minute load average.
    pub load1: f64,
    /// CPU use in the window, percent of one core.
    pub cpu: super::cpu::Usage,
}

impl Sample {
    /// One line for the console.
    pub(crate) fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let rss: Vec<String> = self
            .rss_mib
            .iter()
            .map(|r| r.map_or("down".into(), |r| format!("{r:.0}")))
            .collect();
        format!(
            "  {:>6.0} s {:<8} accepted {:>5.0}/s committed {:>5.0}/s failed {:>4} pending {:>6} e2e p50/p99/max {}/{}/{} ms webhook p99 {} ms RSS {} MiB load {:.1} CPU % machine/pg/nats {:.0}/{:.0}/{:.0}",
            self.t_s,
            self.phase,
            self.accepted_per_s,
            self.committed_per_s,
            self.failed_attempts,
            self.pending,
            ms(self.e2e_p50_ms),
            ms(self.e2e_p99_ms),
            ms(self.e2e_max_ms),
            ms(self.webhook_p99_ms),
            rss.join(" "),
            self.load1,
            self.cpu.machine,
            self.cpu.postgres,
            self.cpu.nats
        )
    }
}

/// Takes a sample every [`SAMPLE_EVERY`].
pub(crate) struct Sampler {
    started: Instant,
    last: Instant,
    /// Sent, accepted, failed at the last sample.
    last_counts: (u64, u64, u64),
    cpu: super::cpu::Meter,
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

impl Sampler {
    pub(crate) fn new(started: Instant) -> Self {
        Self {
            started,
            last: started,
            last_counts: (0, 0, 0),
            cpu: super::cpu::Meter::default(),
        }
    }

    pub(crate) fn due(&self) -> bool {
        self.last.elapsed() >= SAMPLE_EVERY
    }

    /// The window since the last sample.
    pub(crate) fn take(
        &mut self,
        load: &Load,
        clock: &Clock,
        fleet: &Fleet,
        phase: &'static str,
    ) -> Sample {
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64().max(0.001);
        self.last = now;
        let counts = (
            load.counts.sent.load(Ordering::Relaxed),
            load.counts.accepted.load(Ordering::Relaxed),
            load.counts.failed(),
        );
        let (sent, accepted, failed) = (
            counts.0 - self.last_counts.0,
            counts.1 - self.last_counts.1,
            counts.2 - self.last_counts.2,
        );
        self.last_counts = counts;
        let window = clock.take_window();
        let webhook = load.take_webhook_window();
        Sample {
            t_s: now.duration_since(self.started).as_secs_f64(),
            phase,
            sent_per_s: sent as f64 / seconds,
            accepted_per_s: accepted as f64 / seconds,
            committed_per_s: window.committed as f64 / seconds,
            failed_attempts: failed,
            pending: window.pending,
            e2e_p50_ms: quantile_ms(&window.latency, 0.5),
            e2e_p99_ms: quantile_ms(&window.latency, 0.99),
            e2e_max_ms: (!window.latency.is_empty()).then(|| window.latency.max() as f64 / 1000.0),
            webhook_p50_ms: webhook.as_ref().and_then(|h| quantile_ms(h, 0.5)),
            webhook_p99_ms: webhook.as_ref().and_then(|h| quantile_ms(h, 0.99)),
            rss_mib: fleet.rss(),
            load1: load_average(),
            cpu: self.cpu.take(&fleet.pids()),
        }
    }
}

/// The machine's 1-minute load average.
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Unix time now, seconds.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Percentiles of a latency, milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Latency {
    pub events: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |q| quantile_ms(h, q).unwrap_or(0.0);
        Self {
            events: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// Event age at commit from the database: `_applied_at` (the applying transaction's start) minus the event's
/// `created` (the second it was first sent in, so this reads up to 1 s high), in seconds: p50, p99, max.
pub(crate) async fn event_age(pool: &sqlx::PgPool) -> anyhow::Result<(f64, f64, f64)> {
    let (q, max): (Vec<f64>, f64) = sqlx::query_as(
        "select percentile_cont(array[0.5, 0.99]) within group (order by age), coalesce(max(age), 0) \
         from (select (extract(epoch from _applied_at) - created)::float8 as age from stripe.events) a",
    )
    .fetch_one(pool)
    .await?;
    Ok((
        q.first().copied().unwrap_or(0.0),
        q.get(1).copied().unwrap_or(0.0),
        max,
    ))
}

/// RSS of one slot or role over the run, MiB.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Rss {
    pub name: String,
    pub first_mean: f64,
    pub last_mean: f64,
    pub max: f64,
}

/// Mean RSS over the first and the last `window` of the load and the max over the run, of the slots `which` picks.
fn rss(samples: &[Sample], which: &[usize], name: String, window: f64, load_end: f64) -> Rss {
    let mean = |from: f64, to: f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.t_s > from && s.t_s <= to + 1.0)
            .flat_map(|s| {
                which
                    .iter()
                    .filter_map(|&i| s.rss_mib.get(i).copied().flatten())
            })
            .collect();
        v.iter().sum::<f64>() / (v.len().max(1) as f64)
    };
    Rss {
        name,
        first_mean: mean(0.0, window),
        last_mean: mean(load_end - window, load_end),
        max: samples
            .iter()
            .flat_map(|s| {
                which
                    .iter()
                    .filter_map(|&i| s.rss_mib.get(i).copied().flatten())
            })
            .fold(0.0, f64::max),
    }
}

/// Per-minute latency (by commit minute).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Minute {
    pub minute: usize,
    pub latency: Latency,
}

/// Everything the run gives the report.
pub(crate) struct Parts<'a> {
    pub config: Config,
    pub machine: String,
    pub load_average_before: f64,
    pub started_unix: f64,
    pub load_ended: Option<Duration>,
    pub all_answered: Option<Duration>,
    pub drained: Option<Duration>,
    pub counts: &'a Counts,
    pub webhook: Option<Histogram<u64>>,
    pub e2e: &'a Histogram<u64>,
    pub minutes: &'a [Histogram<u64>],
    pub unobserved: usize,
    pub listener_failures: u64,
    pub samples: Vec<Sample>,
    pub kills: Vec<Kill>,
    pub peak_rss: Vec<Option<f64>>,
    pub counters: (BTreeMap<String, f64>, BTreeMap<String, f64>),
    pub event_age: (f64, f64, f64),
    pub verdict: Verdict,
    /// Names of the slots, in the order of each sample's RSS.
    pub slots: Vec<String>,
    pub handovers: Vec<Handover>,
}

/// The soak's results.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Report {
    pub config: Config,
    pub machine: String,
    pub load_average_before: f64,
    pub load_average_max: f64,
    pub started_unix: f64,
    pub load_seconds: f64,
    /// From the last new event to the last 200 (retries of the events failed at the end).
    pub retry_tail_seconds: Option<f64>,
    /// From the last 200 to every event committed and acked.
    pub drain_seconds: Option<f64>,
    pub sent: u64,
    /// Events due by the schedule but not sent because the sender was at its cap of unanswered events.
    pub not_offered: u64,
    pub max_unanswered: u64,
    pub accepted: u64,
    /// Events answered 200 per second of load.
    pub achieved_rate: f64,
    pub failed_attempts: BTreeMap<&'static str, u64>,
    pub retried_events: u64,
    pub webhook: Latency,
    pub e2e: Latency,
    pub minutes: Vec<Minute>,
    /// Accepted events whose commit notification never came (the listener's connection broke meanwhile).
    pub latency_not_observed: usize,
    pub listener_failures: u64,
    /// Event age at commit from `stripe.events`, seconds: p50, p99, max.
    pub event_age_s: (f64, f64, f64),
    /// Window (seconds) the first/last RSS means are taken over.
    pub rss_window_s: f64,
    pub rss_by_role: Vec<Rss>,
    pub rss_by_slot: Vec<Rss>,
    /// VmHWM of each slot's last process at the end.
    pub peak_rss_at_end: Vec<Option<f64>>,
    pub kills: Vec<Kill>,
    /// Ingest's `stripe_sync_webhooks_total` by outcome, summed over every process.
    pub ingest_outcomes: BTreeMap<String, f64>,
    /// Appliers' `stripe_sync_events_applied_total` by outcome, summed over every process.
    pub applier_outcomes: BTreeMap<String, f64>,
    pub verdict: Verdict,
    /// Partition hand-overs the appliers logged (see `handovers.rs`).
    pub handovers: Vec<Handover>,
    pub slots: Vec<String>,
    pub samples: Vec<Sample>,
}

impl Report {
    pub(crate) fn new(p: Parts<'_>) -> Self {
        let load_seconds = p.load_ended.map_or(0.0, |d| d.as_secs_f64());
        let c = p.counts;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let slots = p.slots;
        let window = (load_seconds / 3.0).min(300.0);
        let by_role = ["ingest", "applier"]
            .iter()
            .map(|role| {
                let which: Vec<usize> = (0..slots.len())
                    .filter(|&i| slots[i].starts_with(role))
                    .collect();
                rss(&p.samples, &which, (*role).to_owned(), window, load_seconds)
            })
            .collect();
        let by_slot = (0..slots.len())
            .map(|i| rss(&p.samples, &[i], slots[i].clone(), window, load_seconds))
            .collect();
        Self {
            machine: p.machine,
            load_average_before: p.load_average_before,
            load_average_max: p.samples.iter().map(|s| s.load1).fold(0.0, f64::max),
            started_unix: p.started_unix,
            load_seconds,
            retry_tail_seconds: p
                .all_answered
                .zip(p.load_ended)
                .map(|(a, l)| (a - l).as_secs_f64()),
            drain_seconds: p
                .drained
                .zip(p.all_answered)
                .map(|(d, a)| (d - a).as_secs_f64()),
            sent: get(&c.sent),
            not_offered: get(&c.not_offered),
            max_unanswered: p.config.max_unanswered(),
            accepted: get(&c.accepted),
            achieved_rate: get(&c.accepted) as f64 / load_seconds.max(1.0),
            failed_attempts: BTreeMap::from([
                ("connection refused", get(&c.refused)),
                ("connection broken", get(&c.broken)),
                ("timeout", get(&c.timeout)),
                ("5xx", get(&c.status_5xx)),
                ("other status", get(&c.status_other)),
            ]),
            retried_events: get(&c.retried_events),
            webhook: p.webhook.as_ref().map(Latency::of).unwrap_or_default(),
            e2e: Latency::of(p.e2e),
            minutes: p
                .minutes
                .iter()
                .enumerate()
                .map(|(minute, h)| Minute {
                    minute,
                    latency: Latency::of(h),
                })
                .collect(),
            latency_not_observed: p.unobserved,
            listener_failures: p.listener_failures,
            event_age_s: p.event_age,
            rss_window_s: window,
            rss_by_role: by_role,
            rss_by_slot: by_slot,
            peak_rss_at_end: p.peak_rss,
            kills: p.kills,
            ingest_outcomes: p.counters.0,
            applier_outcomes: p.counters.1,
            verdict: p.verdict,
            handovers: p.handovers,
            slots,
            samples: p.samples,
            config: p.config,
        }
    }

    /// bench/out/soak.json, bench/out/soak.csv and the chart.
    pub(crate) fn write(&self) -> anyhow::Result<()> {
        let out = out_dir();
        std::fs::write(out.join("soak.json"), serde_json::to_string_pretty(self)?)?;
        let mut csv = String::from(
            "t_s,phase,sent_per_s,accepted_per_s,committed_per_s,failed_attempts,pending,e2e_p50_ms,e2e_p99_ms,\
             e2e_max_ms,webhook_p50_ms,webhook_p99_ms,load1,cpu_machine,cpu_postgres,cpu_nats,cpu_bench",
        );
        for name in &self.slots {
            csv += &format!(",rss_mib_{name}");
        }
        for name in &self.slots {
            csv += &format!(",cpu_{name}");
        }
        csv.push('\n');
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
        for s in &self.samples {
            csv += &format!(
                "{:.1},{},{:.1},{:.1},{:.1},{},{},{},{},{},{},{},{:.2}",
                s.t_s,
                s.phase,
                s.sent_per_s,
                s.accepted_per_s,
                s.committed_per_s,
                s.failed_attempts,
                s.pending,
                opt(s.e2e_p50_ms),
                opt(s.e2e_p99_ms),
                opt(s.e2e_max_ms),
                opt(s.webhook_p50_ms),
                opt(s.webhook_p99_ms),
                s.load1
            );
            csv += &format!(
                ",{:.1},{:.1},{:.1},{:.1}",
                s.cpu.machine, s.cpu.postgres, s.cpu.nats, s.cpu.bench
            );
            for r in &s.rss_mib {
                csv += &format!(",{}", opt(*r));
            }
            for c in &s.cpu.slots {
                csv += &format!(",{}", opt(*c));
            }
            csv.push('\n');
        }
        std::fs::write(out.join("soak.csv"), csv)?;
        // The numbers are written already: a chart that fails to draw should not lose them.
        if let Err(err) = chart::draw(self, &self.config.chart) {
            eprintln!("could not draw the chart: {err:#}");
        }
        eprintln!(
            "wrote bench/out/soak.json, bench/out/soak.csv and {}",
            self.config.chart.display()
        );
        Ok(())
    }
}
