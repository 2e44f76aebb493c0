//! `cargo run --release -p stripe-sync-bench -- <what>`: benchmarks that start their own NATS and database.

mod columns;
mod events;

use clap::{Parser, Subcommand};

/// stripe-sync benchmarks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Typed columns: generated from `_raw_data` by Postgres vs written by the applier, on the batch path.
    Columns {
        /// Events to apply.
        #[arg(long, default_value_t = 50_000)]
        events: usize,
        /// Events per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Runs of each way (the best is kept).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Columns {
            events,
            batch,
            rounds,
        } => {
            let report = columns::run(events, batch, rounds).await?;
            println!(
                "typed columns, {} events, batches of {batch}: generated columns {:.0} events/s; applier-written {:.0} events/s",
                report.events, report.generated_per_sec, report.applier_written_per_sec
            );
        }
    }
    Ok(())
}
