//! `stripe-sync-applier`: applies Stripe events from JetStream to Postgres, and the operator's commands.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use stripe_sync_applier::commands;
use stripe_sync_applier::dead_letter::Redriven;
use stripe_sync_applier::replay::{Options, Start};
use stripe_sync_applier::settings::Settings;
use stripe_sync_applier::startup::Application;
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
    /// Load the account's existing objects from Stripe's API (needs STRIPE_API_KEY). Resumable: run it again after
    /// an interruption and it continues where it stopped.
    Backfill(BackfillArgs),
    /// Read one table (or given objects) from Stripe's API again, now.
    Sync(SyncArgs),
    /// Close a gap of missed webhooks from Stripe's events of the last 30 days (`GET /v1/events`).
    Recover(RecoverArgs),
    /// Compare the tables with Stripe's API and fix what differs: changed objects, missing ones, and objects
    /// deleted with no event (marked deleted). Prints the drift per table; exits 1 if a table could not be read.
    Reconcile(ReconcileArgs),
}

#[derive(Args)]
struct ReconcileArgs {
    /// Object types or tables, comma-separated (default: every listable type).
    #[arg(long, value_delimiter = ',')]
    objects: Vec<String>,
}

#[derive(Args)]
struct BackfillArgs {
    /// Object types or tables, comma-separated (default: every listable type).
    #[arg(long, value_delimiter = ',')]
    objects: Vec<String>,
    /// Only objects created at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<OffsetDateTime>,
    /// Also load every connected account's objects.
    #[arg(long)]
    connected_accounts: bool,
    /// Start over instead of resuming an unfinished backfill that asked for the same.
    #[arg(long)]
    restart: bool,
}

#[derive(Args)]
struct SyncArgs {
    /// A table (`customers`) or object type (`customer`).
    table: String,
    /// Object ids; none: the whole table.
    ids: Vec<String>,
    /// The connected account the ids belong to.
    #[arg(long)]
    account: Option<String>,
}

#[derive(Args)]
struct RecoverArgs {
    /// Start of the gap (RFC 3339); at most 30 days ago.
    #[arg(long, value_parser = parse_time)]
    since: OffsetDateTime,
    /// Only events whose webhook delivery failed (`delivery_success=false`).
    #[arg(long)]
    undelivered_only: bool,
    /// Also every connected account's events (read with `Stripe-Account`).
    #[arg(long)]
    connected_accounts: bool,
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
    #[arg(long, default_value = "500")]
    batch_size: std::num::NonZeroUsize,
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
        Command::Run => run(settings).await,
        Command::Migrate => {
            commands::migrate(&settings).await?;
            println!("migrations up to date");
            Ok(())
        }
        Command::Replay(args) => replay(&settings, args).await,
        Command::Backfill(args) => {
            let options = stripe_sync_applier::backfill::Options {
                objects: args.objects,
                since: args.since.map_or(0, OffsetDateTime::unix_timestamp),
                connected_accounts: args.connected_accounts,
                restart: args.restart,
            };
            let summary = commands::backfill(&settings, &options).await?;
            print!("{summary}");
            anyhow::ensure!(
                summary.ok(),
                "some object types failed; run the same backfill again to resume"
            );
            Ok(())
        }
        Command::Sync(args) => {
            let out =
                commands::sync(&settings, &args.table, args.account.as_deref(), &args.ids).await?;
            print!("{out}");
            Ok(())
        }
        Command::Recover(args) => {
            let recovered = commands::recover(
                &settings,
                args.since.unix_timestamp(),
                args.undelivered_only,
                args.connected_accounts,
            )
            .await?;
            println!(
                "{} events read from Stripe, {} not in the stream yet and published (the database skips those it has)",
                recovered.read, recovered.published
            );
            for (account, why) in &recovered.skipped {
                println!("skipped {account}: {why}");
            }
            Ok(())
        }
        Command::Reconcile(args) => {
            let report = commands::reconcile(&settings, &args.objects).await?;
            print!("{report}");
            anyhow::ensure!(report.ok(), "some tables could not be reconciled");
            Ok(())
        }
        Command::Dlq(DlqCommand::List) => {
            println!("EVENT ID\tTYPE\tFAILED AT\tATTEMPTS\tSTREAM SEQ\tERROR");
            let count = commands::dlq_list(&settings, |l| {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    l.event_id, l.event_type, l.failed_at, l.attempts, l.stream_seq, l.error
                );
                Ok(())
            })
            .await?;
            eprintln!("{count} dead letter(s)");
            Ok(())
        }
        Command::Dlq(DlqCommand::Show { event_id }) => {
            let found = commands::dlq_show(&settings, &event_id).await?;
            anyhow::ensure!(!found.is_empty(), "no dead letter for event {event_id}");
            for (letter, payload) in found {
                for (name, value) in &letter.headers {
                    println!("{name}: {value}");
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&payload).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&payload).into_owned())
                    });
                println!("\n{}", serde_json::to_string_pretty(&body)?);
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Redrive { event_id, all }) => {
            let wanted = if all { None } else { event_id.as_deref() };
            let (applied, failing) =
                commands::dlq_redrive(&settings, wanted, |letter, outcome| match outcome {
                    Redriven::Applied => {
                        println!("{}\tapplied, removed from the dead letter", letter.event_id)
                    }
                    Redriven::Failed(error) => {
                        println!("{}\tstill failing: {error}", letter.event_id)
                    }
                })
                .await?;
            anyhow::ensure!(applied + failing > 0, "no dead letter to redrive");
            println!("{applied} redriven, {failing} still failing");
            anyhow::ensure!(failing == 0, "{failing} dead letter(s) still failing");
            Ok(())
        }
    }
}

/// Builds the applier (waiting for Postgres and NATS) and runs it, both until SIGTERM: a signal while waiting for
/// a dependency ends the process at once, with status 0.
async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut shutdown = Box::pin(shutdown::signal());
    let app = tokio::select! {
        app = Application::build(settings) => app?,
        () = &mut shutdown => {
            tracing::info!("stopped before Postgres and NATS were ready");
            return Ok(());
        }
    };
    app.run_until_stopped(shutdown).await
}

async fn replay(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let start = match (args.from_seq, args.since) {
        (Some(seq), _) => Start::Sequence(seq),
        (None, Some(time)) => Start::Time(time),
        (None, None) => anyhow::bail!("give --from-seq or --since"),
    };
    let options = Options {
        start,
        until: args.until,
        force: args.force,
        batch_size: args.batch_size,
    };
    let summary = commands::replay(settings, &options).await?;
    print!("{summary}");
    anyhow::ensure!(
        summary.failed.is_empty(),
        "{} events could not be applied",
        summary.failed.len()
    );
    Ok(())
}
