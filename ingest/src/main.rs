//! `stripe-sync-ingest`: the webhook receiver.

use anyhow::Context as _;
use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_shared::{shutdown, telemetry};

// mimalloc: about 15 % more webhooks per second than the system allocator on the many short-lived body and header
// buffers (docs/benchmarks.md). Without transparent huge pages, so its memory stays small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading settings")?;
    let _telemetry = telemetry::init(&settings.telemetry, "stripe-sync-ingest")?;
    tracing::debug!(?settings, "settings loaded");
    let app = Application::build(settings).await?;
    app.run_until(shutdown::signal()).await
}
