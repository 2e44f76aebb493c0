//! `stripe-sync-applier`: applies Stripe events from JetStream to Postgres.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use stripe_sync_applier::settings::Settings;
use stripe_sync_applier::{startup, store};
use stripe_sync_shared::{shutdown, telemetry};

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
            let pool = startup::database_pool(&settings)?;
            store::migrate(&pool).await.context("running migrations")?;
            println!("migrations up to date");
            Ok(())
        }
    }
}
