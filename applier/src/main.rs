//! `stripe-sync-applier`: applies Stripe events from JetStream to Postgres, and the operator's commands.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use stripe_sync_applier::dead_letter::Redriven;
use stripe_sync_applier::replay::{Options, Start};
use stripe_sync_applier::settings::Settings;
use stripe_sync_applier::{commands, startup};
use stripe_sync_shared::{shutdown, telemetry};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Applies Stripe events from the JetStream stream to tables in schema `stripe`.
/// Settings come from the environment (see the README); a settings file may be named by STRIPE_SYNC_CONFIG.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and apply events until SIGTERM (the default).
    Run,
    /// Run the database migrations and exit.
    Migrate,
    /// Re-read the events stream and apply what the database does not have, then print a summary.
    Replay(ReplayArgs),
    /// Inspect and redrive the dead letter.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["from_seq", "since"])))]
struct ReplayArgs {
    /// Start at this stream sequence (1 = the oldest event kept).
    #[arg(long)]
    from_seq: Option<u64>,
    /// Start at the first event stored at or after this time (RFC 3339, e.g. 2026-11-27T08:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<OffsetDateTime>,
    /// Stop after the events stored up to this time (RFC 3339). Default: up to the newest at start.
    #[arg(long, value_parser = parse_time)]
    until: Option<OffsetDateTime>,
    /// Re-apply events already recorded as applied (still guarded by event order): for a database restored from an
    /// older backup.
    #[arg(long)]
    force: bool,
    /// Events per transaction.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter: event id, type, time, attempts, error.
    List,
    /// Everything about one event's dead letter: headers and the event.
    Show {
        /// Event id (evt_...).
        event_id: String,
    },
    /// Apply dead letters again through the normal path; each one applied is removed from the dead letter.
    Redrive {
        /// Event id (evt_...).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        event_id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("not an RFC 3339 time ({e}): {s}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("loading settings")?;
    let _telemetry = telemetry::init(&settings.telemetry, "stripe-sync-applier")?;
    tracing::debug!(?settings, "settings loaded");
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => startup::run_until(settings, shutdown::signal()).await,
        Command::Migrate => {
            commands::migrate(&settings).await?;
            println!("migrations up to date");
            Ok(())
        }
        Command::Replay(args) => {
            let start = match (args.from_seq, args.since) {
                (Some(seq), _) => Start::Sequence(seq),
                (None, Some(time)) => Start::Time(time),
                (None, None) => anyhow::bail!("give --from-seq or --since"),
            };
            let options = Options {
                start,
                until: args.until,
                force: args.force,
                batch_size: args.batch_size.max(1),
            };
            let summary = commands::replay(&settings, &options).await?;
            print!("{summary}");
            anyhow::ensure!(
                summary.failed.is_empty(),
                "{} events could not be applied",
                summary.failed.len()
            );
            Ok(())
        }
        Command::Dlq(DlqCommand::List) => {
            let letters = commands::dlq_list(&settings).await?;
            println!("EVENT ID\tTYPE\tFAILED AT\tATTEMPTS\tSTREAM SEQ\tERROR");
            for l in &letters {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    l.event_id, l.event_type, l.failed_at, l.attempts, l.stream_seq, l.error
                );
            }
            eprintln!("{} dead letter(s)", letters.len());
            Ok(())
        }
        Command::Dlq(DlqCommand::Show { event_id }) => {
            let letters = commands::dlq_list(&settings).await?;
            let found: Vec<_> = letters.iter().filter(|l| l.event_id == event_id).collect();
            anyhow::ensure!(!found.is_empty(), "no dead letter for event {event_id}");
            for letter in found {
                for (name, value) in &letter.headers {
                    println!("{name}: {value}");
                }
                let body: serde_json::Value = serde_json::from_slice(&letter.payload)
                    .unwrap_or_else(|_| {
                        serde_json::Value::String(
                            String::from_utf8_lossy(&letter.payload).into_owned(),
                        )
                    });
                println!("\n{}", serde_json::to_string_pretty(&body)?);
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Redrive { event_id, all }) => {
            let wanted = if all { None } else { event_id.as_deref() };
            let results = commands::dlq_redrive(&settings, wanted).await?;
            anyhow::ensure!(!results.is_empty(), "no dead letter to redrive");
            let mut failed = 0;
            for (letter, outcome) in &results {
                match outcome {
                    Redriven::Applied => {
                        println!("{}\tapplied, removed from the dead letter", letter.event_id)
                    }
                    Redriven::Failed(error) => {
                        failed += 1;
                        println!("{}\tstill failing: {error}", letter.event_id);
                    }
                }
            }
            println!(
                "{} redriven, {failed} still failing",
                results.len() - failed
            );
            anyhow::ensure!(failed == 0, "{failed} dead letter(s) still failing");
            Ok(())
        }
    }
}
