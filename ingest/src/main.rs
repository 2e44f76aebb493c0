//! `stripe-sync-ingest`: the webhook receiver.

use anyhow::Context as _;
use clap::Parser;
use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_shared::{shutdown, telemetry};

// mimalloc: about 15 % more webhooks per second than the system allocator on the many short-lived body and header
// buffers (docs/benchmarks.md). Without transparent huge pages, so its memory stays small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Receives Stripe webhooks on `POST /webhooks` (and `/webhooks/<endpoint>`), verifies their signature and stores
/// each event in the JetStream stream, answering 200 only once it is stored. `GET /healthz`, `GET /readyz`.
///
/// Settings come from the environment (see the README): `STRIPE_WEBHOOK_SECRET` (required), `NATS_URL`, `PORT`,
/// `STRIPE_CONNECT_WEBHOOK_SECRET`, and `STRIPE_SYNC__<SECTION>__<FIELD>` for every other setting; a settings file
/// may be named by `STRIPE_SYNC_CONFIG`.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Cli::parse();
    let settings = Settings::load().context("loading settings")?;
    let _telemetry = telemetry::init(&settings.telemetry, "stripe-sync-ingest")?;
    tracing::debug!(?settings, "settings loaded");
    let app = Application::build(settings).await?;
    app.run_until(shutdown::signal()).await
}
