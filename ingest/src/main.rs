//! `stripe-sync-ingest`: the webhook receiver.

use anyhow::Context as _;
use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_shared::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading settings")?;
    let _telemetry = telemetry::init(&settings.telemetry, "stripe-sync-ingest")?;
    tracing::debug!(?settings, "settings loaded");
    let app = Application::build(settings).await?;
    app.run_until(shutdown::signal()).await
}
