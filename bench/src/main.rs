//! `cargo run --release -p stripe-sync-bench -- all`: benchmarks that start their own NATS and database, run the
//! release binaries as processes, and measure each result against the machine's ceiling in the same run.

mod applier;
mod backfill;
mod ceiling;
mod direct;
mod e2e;
mod events;
mod harness;
mod history;
mod hydration;
mod ingest;
mod loadgen;
mod report;
mod soak;

use std::time::Duration;

use clap::{Parser, Subcommand};
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::unique_name;

use crate::report::Results;

/// stripe-sync benchmarks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything below, then the summary (stdout), bench/out/results.json and docs/benchmarks.png.
    All {
        /// Events in the pre-filled stream the appliers drain.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Events in the backlog of the memory check.
        #[arg(long, default_value_t = 1_000_000)]
        backlog: usize,
    },
    /// Ingest at 64 connections with durable acks, and a no-op axum handler under the same load.
    Ingest {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Appliers draining a pre-filled stream (1, 2, 4 processes), and Postgres's own batched upsert of the same rows.
    Applier {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Numbers of appliers to run, comma-separated.
        #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
        appliers: Vec<usize>,
        /// Skip the Postgres ceiling.
        #[arg(long)]
        no_ceiling: bool,
    },
    /// From the webhook's 200 to the row committed, at a steady rate.
    E2e {
        #[arg(long, default_value_t = 1_000)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Memory with a large backlog: one applier drains it; ingest takes load while it sits in the stream.
    Backlog {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// The backfill from the fake Stripe API (50 ms per page): with Stripe's rate limits, then without any while an
    /// applier applies.
    Backfill {
        #[arg(long, default_value_t = 1_000_000)]
        objects: usize,
        /// Only the run without limits (applier running).
        #[arg(long, conflicts_with = "limited_only")]
        unlimited_only: bool,
        /// Only the run within Stripe's limits.
        #[arg(long)]
        limited_only: bool,
    },
    /// The batch writer alone: batches of 500 generated events on one connection, no NATS.
    Direct {
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
    /// API reads hydration asks for in `ambiguous` mode, per 1,000 events of the corpus (no API called).
    Hydration {
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
    /// The end-to-end latency hydration adds to an object a bare same-second tie decided (default settle delay).
    HydrationLatency {
        #[arg(long, default_value_t = 200)]
        objects: usize,
        /// Added to every fake API read (Stripe's own reads take about this long).
        #[arg(long, default_value_t = 0)]
        api_latency_ms: u64,
    },
    /// A long steady load while ingests and appliers are killed and restarted: nothing lost, nothing applied twice,
    /// memory flat (bench/out/soak.json and soak.csv, chart docs/soak.png).
    Soak(soak::Config),
    /// Reading history: `stripe.as_of` on a table of `versions` versions of `objects` customers (no NATS).
    History {
        #[arg(long, default_value_t = 1_000_000)]
        versions: usize,
        #[arg(long, default_value_t = 100_000)]
        objects: usize,
    },
    /// (internal) The no-op HTTP server of the ingest ceiling.
    #[command(hide = true)]
    NoopServer {
        #[arg(long)]
        port: u16,
    },
}

async fn drains(
    bins: &harness::Binaries,
    nats: &TestNats,
    events: usize,
    appliers: &[usize],
) -> anyhow::Result<Vec<applier::Drain>> {
    let stream = unique_name("BENCH_DRAIN");
    eprintln!("pre-filling {stream} with {events} events");
    applier::prefill(nats, &stream, events, 1).await?;
    let mut out = Vec::new();
    for &n in appliers {
        eprintln!("draining with {n} applier(s)");
        let drain = applier::drain(bins, nats, &stream, events as u64, n).await?;
        eprintln!(
            "  {:.0} events/s, peak RSS {:.1} MiB",
            drain.rate, drain.peak_rss_mib
        );
        out.push(drain);
    }
    Ok(out)
}

async fn backlog(
    bins: &harness::Binaries,
    nats: &TestNats,
    events: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let stream = unique_name("BENCH_BACKLOG");
    eprintln!("pre-filling {stream} with {events} events");
    applier::prefill(nats, &stream, events, 2).await?;
    eprintln!("ingest under load with the backlog in place");
    let ingest = ingest::run(bins, nats, 64, Duration::from_secs(5)).await?;
    results.backlog_ingest_peak_rss_mib = Some(ingest.ingest.peak_rss_mib);
    eprintln!("draining the backlog with one applier");
    results.backlog = Some(applier::drain(bins, nats, &stream, events as u64, 1).await?);
    Ok(())
}

fn finish(results: &Results, chart: bool) -> anyhow::Result<()> {
    println!("{}", results.markdown());
    std::fs::write(
        harness::out_dir().join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    if chart {
        let path = harness::repo().join("docs/benchmarks.png");
        results.chart(&path)?;
        eprintln!("chart: {}", path.display());
    }
    Ok(())
}

/// A private Postgres cluster when none answers at `DATABASE_URL` (or the local default), so the one command works
/// on a fresh machine.
fn ensure_postgres() -> Option<stripe_sync_testkit::postgres::TestPostgres> {
    use std::net::ToSocketAddrs as _;
    use std::str::FromStr as _;
    let url = stripe_sync_testkit::db::admin_url();
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).ok()?;
    let reachable = (options.get_host(), options.get_port())
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        });
    if reachable {
        return None;
    }
    eprintln!("no Postgres at {url}: starting a private cluster");
    let pg = stripe_sync_testkit::postgres::TestPostgres::start();
    stripe_sync_testkit::db::use_server(pg.url());
    Some(pg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _postgres = match cli.command {
        Command::NoopServer { .. } => None,
        _ => ensure_postgres(),
    };
    if let Command::NoopServer { port } = cli.command {
        return ingest::noop_server(port).await;
    }
    if let Command::History { versions, objects } = cli.command {
        let r = history::run(versions, objects).await?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        println!(
            "| versions | objects | current table, whole | as_of, whole (end) | as_of, whole (half-way) | customers_as_of, whole (end) | as_of, whole, one core | as_of, one id p50 / p99 | one id's timeline (view) p50 |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} / {:.2} ms | {:.2} ms |",
            r.versions,
            r.objects,
            r.current_table_ms,
            r.as_of_whole_end_ms,
            r.as_of_whole_middle_ms,
            r.table_as_of_whole_end_ms,
            r.as_of_whole_one_core_ms,
            r.as_of_one_p50_ms,
            r.as_of_one_p99_ms,
            r.timeline_one_p50_ms
        );
        return Ok(());
    }
    if let Command::Hydration { events } = cli.command {
        println!(
            "| delivery | events | objects read | list pages | reads per 1,000 events | by reason |"
        );
        println!("|---|---|---|---|---|---|");
        for reads in hydration::run(events).await? {
            println!(
                "| {} | {} | {} | {} | {:.1} | {:?} |",
                reads.order,
                reads.events,
                reads.objects,
                reads.list_pages,
                reads.per_thousand(),
                reads.by_reason
            );
        }
        return Ok(());
    }
    if let Command::HydrationLatency {
        objects,
        api_latency_ms,
    } = cli.command
    {
        let l =
            hydration::latency(objects, std::time::Duration::from_millis(api_latency_ms)).await?;
        println!("| objects | API read latency | p50 | p90 | p99 | max |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            l.objects, l.api_latency_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        return Ok(());
    }
    let bins = harness::build_binaries()?;
    let nats = TestNats::start();
    let mut results = Results {
        machine: report::machine(),
        ..Results::default()
    };
    match cli.command {
        Command::All {
            events,
            backlog: backlog_events,
        } => {
            eprintln!("ingest vs no-op ceiling");
            results.ingest = Some(ingest::run(&bins, &nats, 64, Duration::from_secs(10)).await?);
            results.drains = drains(&bins, &nats, events, &[1, 2, 4]).await?;
            eprintln!("Postgres ceiling");
            results.ceiling = Some(ceiling::run(events, 500).await?);
            eprintln!("end to end at 1,000/s");
            results.e2e = Some(e2e::run(&bins, &nats, 1_000, 20).await?);
            backlog(&bins, &nats, backlog_events, &mut results).await?;
            finish(&results, true)?;
        }
        Command::Ingest {
            connections,
            seconds,
        } => {
            results.ingest =
                Some(ingest::run(&bins, &nats, connections, Duration::from_secs(seconds)).await?);
            finish(&results, false)?;
        }
        Command::Applier {
            events,
            appliers,
            no_ceiling,
        } => {
            results.drains = drains(&bins, &nats, events, &appliers).await?;
            if !no_ceiling {
                results.ceiling = Some(ceiling::run(events, 500).await?);
            }
            finish(&results, false)?;
        }
        Command::E2e { rate, seconds } => {
            results.e2e = Some(e2e::run(&bins, &nats, rate, seconds).await?);
            finish(&results, false)?;
        }
        Command::Backlog { events } => {
            backlog(&bins, &nats, events, &mut results).await?;
            finish(&results, false)?;
        }
        Command::Backfill {
            objects,
            unlimited_only,
            limited_only,
        } => {
            let mut runs = Vec::new();
            if !unlimited_only {
                eprintln!(
                    "backfill of {objects} objects, Stripe's rate limits enforced by the fake"
                );
                runs.push(backfill::run(&bins, &nats, objects, true, false).await?);
                eprintln!("{:?}", runs.last());
            }
            if !limited_only {
                eprintln!(
                    "backfill of {objects} objects, no limits, one applier applying meanwhile"
                );
                runs.push(backfill::run(&bins, &nats, objects, false, true).await?);
                eprintln!("{:?}", runs.last());
            }
            println!(
                "| backfill | objects | published/s | ratio | applied/s | requests | 429s | peak RSS MiB |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for run in &runs {
                println!(
                    "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} |",
                    if run.limited {
                        "Stripe's limits (100/s, 25/s per endpoint)"
                    } else {
                        "no limit, applier running"
                    },
                    run.objects,
                    run.published_per_second,
                    if run.limited {
                        format!("{:.2} of 10,000/s", run.published_per_second / 10_000.0)
                    } else {
                        "-".into()
                    },
                    run.applied_per_second
                        .map_or("-".into(), |r| format!("{r:.0}")),
                    run.requests,
                    run.rate_limited,
                    run.peak_rss_mib
                );
            }
        }
        Command::Direct { events } => direct::run(events).await?,
        Command::Soak(mut config) => {
            if config.chart.is_relative() {
                config.chart = harness::repo().join(&config.chart);
            }
            soak::run(&bins, &nats, config).await?;
        }
        Command::NoopServer { .. }
        | Command::History { .. }
        | Command::Hydration { .. }
        | Command::HydrationLatency { .. } => {}
    }
    Ok(())
}
