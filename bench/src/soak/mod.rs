//! `soak`: ingests and appliers as processes under a steady load for a long time, one of them killed and restarted
//! every few minutes; then every event answered 200 must be in the tables exactly once, the rows must hold each
//! object's newest state, and memory must stay flat. Raw samples go to bench/out/soak.{json,csv}, the chart to
//! docs/soak.png.

mod chaos;
mod chart;
mod clock;
mod cpu;
mod fleet;
mod handovers;
mod load;
pub(crate) mod output;
mod summary;
mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::unique_name;

use self::clock::Clock;
use self::fleet::{Fleet, Role, wait_ready};
use self::load::Load;
use self::output::{Sample, Sampler};
use crate::applier::{applier_env, remaining};
use crate::harness::{Binaries, Proc};
use crate::ingest::{SECRET, ingest_env};
use crate::loadgen::Bodies;

/// Which signals the kills send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Signals {
    /// SIGKILL only (crashes).
    Kill,
    /// Each role's kills alternate SIGKILL (first) and SIGTERM (a deploy's stop).
    Alternate,
}

/// The run's settings (the `soak` command's arguments).
#[derive(Debug, Clone, serde::Serialize, clap::Args)]
pub(crate) struct Config {
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// New events per second.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    #[arg(long, default_value_t = 2)]
    pub ingests: usize,
    #[arg(long, default_value_t = 3)]
    pub appliers: usize,
    /// Time between kills, alternately an ingest and an applier (`180s`, `3m`).
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub kill_every: Duration,
    /// Time from a kill's signal to the new process's start.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub restart_after: Duration,
    /// `alternate`: each role's kills alternate SIGKILL (first) and SIGTERM; `kill`: SIGKILL only.
    #[arg(long, value_enum, default_value_t = Signals::Alternate)]
    pub signals: Signals,
    /// Longest wait, after the load, for the appliers to commit every event.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// Where the chart goes.
    #[arg(long, default_value = "docs/soak.png")]
    pub chart: std::path::PathBuf,
}

impl Config {
    fn duration(&self) -> Duration {
        Duration::from_secs(self.minutes * 60)
    }

    /// Unanswered events at which the sender holds back: five seconds of load (an ingest down for its restart
    /// leaves a few seconds of retries outstanding, well under it).
    pub(crate) fn max_unanswered(&self) -> u64 {
        (u64::from(self.rate) * 5).max(1_000)
    }
}

mod secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// `45s`, `3m`, `500ms` or plain seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit in {text} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// New events going out.
    Load,
    /// No new events; failed deliveries still retried until answered 200.
    Retrying,
    /// Every event answered; waiting for the appliers to commit them all.
    Drain,
}

/// Runs the soak and writes its results.
pub(crate) async fn run(bins: &Binaries, nats: &TestNats, config: Config) -> anyhow::Result<()> {
    let stream = unique_name("BENCH_SOAK");
    let prefix = unique_name("soak");
    let db = TestDb::create().await;
    let mut ingest = ingest_env(nats, &stream, 0);
    let mut applier = applier_env(nats, &db, &stream, &prefix);
    // Info: hand-overs, stops and starts are in the logs (bench/out/logs/soak-*), per-event lines are not.
    for env in [&mut ingest, &mut applier] {
        env.insert("RUST_LOG".into(), "info".into());
    }
    let migrate = Proc::spawn(&bins.applier, &["migrate"], &applier, "soak-migrate")?;
    anyhow::ensure!(
        migrate.wait().await == Some(0),
        "migrate failed (see bench/out/logs/soak-migrate.log)"
    );
    let pool = db.pool().await;
    clock::install_trigger(&pool).await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen("bench_committed").await?;

    let mut fleet = Fleet::new(bins, ingest, applier, config.ingests, config.appliers);
    for i in 0..config.ingests {
        wait_ready(fleet.spawn(Role::Ingest, i)?).await;
    }
    for i in 0..config.appliers {
        wait_ready(fleet.spawn(Role::Applier, i)?).await;
    }
    let ports = fleet.ingest_ports();
    let names = fleet.names();
    let fleet = Arc::new(tokio::sync::Mutex::new(fleet));
    let load_average_before = output::load_average();

    let started = Instant::now();
    let clock = Arc::new(Clock::new(started)?);
    let stop = Arc::new(AtomicBool::new(false));
    let observer = tokio::spawn(clock::observe(listener, clock.clone(), stop.clone()));
    let load = Arc::new(Load::new(Bodies::new(SECRET, 0), ports, clock.clone())?);
    let sender = tokio::spawn(load.clone().run(
        config.rate,
        config.duration(),
        config.max_unanswered(),
    ));
    let chaos = tokio::spawn(chaos::run(fleet.clone(), config.clone(), started));
    eprintln!(
        "soak: {} min at {}/s, {} ingests, {} appliers, a kill every {:?} (stream {stream}, database {})",
        config.minutes,
        config.rate,
        config.ingests,
        config.appliers,
        config.kill_every,
        db.name()
    );

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let partitions = stripe_sync_shared::settings::StreamSettings::default()
        .partitions
        .get();
    let mut sampler = Sampler::new(started);
    let mut samples: Vec<Sample> = Vec::new();
    let mut phase = Phase::Load;
    let (mut load_ended, mut all_answered) = (None, None);
    let mut phase_started = Instant::now();
    let drained = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if sampler.due() {
            let mut fleet = fleet.lock().await;
            fleet.scrape(None).await;
            let sample = sampler.take(&load, &clock, &fleet, phase_name(phase));
            drop(fleet);
            eprintln!("{}", sample.line());
            samples.push(sample);
        }
        match phase {
            Phase::Load if sender.is_finished() => {
                load_ended = Some(started.elapsed());
                (phase, phase_started) = (Phase::Retrying, Instant::now());
            }
            Phase::Retrying => {
                let left = load.counts.outstanding.load(Ordering::Relaxed);
                if left == 0 || phase_started.elapsed() > Duration::from_secs(300) {
                    if left > 0 {
                        eprintln!(
                            "{left} events still not answered 200 after 5 minutes of retries: giving up on them"
                        );
                    }
                    all_answered = Some(started.elapsed());
                    (phase, phase_started) = (Phase::Drain, Instant::now());
                }
            }
            Phase::Drain => {
                let done = clock.pending() == 0
                    && remaining(&js, &stream, &prefix, partitions).await == Some(0);
                if done || phase_started.elapsed() > config.drain_timeout {
                    if !done {
                        eprintln!("not drained within {:?}", config.drain_timeout);
                    }
                    break done.then(|| started.elapsed());
                }
            }
            Phase::Load => {}
        }
    };
    let kills = chaos.await??;
    let mut fleet = fleet.lock().await;
    fleet.scrape(None).await;
    let peak_rss = fleet.peak_rss();
    let counters = (fleet.counters(Role::Ingest), fleet.counters(Role::Applier));
    fleet.stop_all().await;
    drop(fleet);
    stop.store(true, Ordering::Relaxed);
    let listener_failures = observer.await?;

    eprintln!("checking the tables");
    let dead_letters = js
        .get_stream(format!("{stream}_DLQ"))
        .await
        .ok()
        .map_or(0, |s| s.cached_info().state.messages);
    let (accepted, minutes, total, unobserved) = clock.finish();
    let verdict = verify::run(&pool, load.bodies(), &accepted, dead_letters).await?;
    let event_age = output::event_age(&pool).await?;
    let started_unix = output::unix_now() - started.elapsed().as_secs_f64();
    let handovers = handovers::read(
        &crate::harness::out_dir().join("logs"),
        started_unix,
        &kills,
    );
    let report = output::Report::new(output::Parts {
        config,
        machine: crate::report::machine(),
        load_average_before,
        started_unix,
        load_ended,
        all_answered,
        drained,
        counts: &load.counts,
        webhook: load.webhook_total(),
        e2e: &total,
        minutes: &minutes,
        unobserved,
        listener_failures,
        samples,
        kills,
        peak_rss,
        counters,
        event_age,
        verdict,
        slots: names,
        handovers,
    });
    println!("{}", summary::markdown(&report));
    report.write()?;
    Ok(())
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Load => "load",
        Phase::Retrying => "retrying",
        Phase::Drain => "drain",
    }
}
