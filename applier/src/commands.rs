//! The operator commands besides `run`: `migrate`, `replay`, `dlq list|show|redrive`. Each connects, does its job
//! and returns what `main` prints.

use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream;
use stripe_sync_shared::nats;

use crate::apply::Applier;
use crate::dead_letter::{self, Redriven, StoredLetter};
use crate::registry::Registry;
use crate::replay::{self, Summary};
use crate::settings::Settings;
use crate::startup;

async fn applier(settings: &Settings) -> anyhow::Result<Arc<Applier>> {
    let pool = startup::database_pool(settings)?;
    crate::store::migrate(&pool)
        .await
        .context("running migrations")?;
    Ok(Arc::new(Applier::new(
        pool,
        Registry::shipped(),
        settings.applier.account_id.clone(),
    )))
}

async fn jetstream(settings: &Settings) -> anyhow::Result<jetstream::Context> {
    let client = nats::connect(&settings.nats, "stripe-sync-applier-cli", true).await?;
    nats::check_server_version(&client).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(jetstream::new(client))
}

/// Runs the migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = startup::database_pool(settings)?;
    crate::store::migrate(&pool)
        .await
        .context("running migrations")
}

/// Replays the events stream into the database (migrating it first, so an empty database works).
pub async fn replay(settings: &Settings, options: &replay::Options) -> anyhow::Result<Summary> {
    let applier = applier(settings).await?;
    let js = jetstream(settings).await?;
    let stream = js
        .get_stream(&settings.stream.name)
        .await
        .with_context(|| format!("opening stream {}", settings.stream.name))?;
    replay::replay(&stream, &applier, options).await
}

async fn dlq_stream(settings: &Settings) -> anyhow::Result<jetstream::stream::Stream> {
    let js = jetstream(settings).await?;
    nats::ensure_dlq_stream(&js, &settings.stream).await
}

/// Every dead letter, oldest first.
pub async fn dlq_list(settings: &Settings) -> anyhow::Result<Vec<StoredLetter>> {
    dead_letter::read_all(&dlq_stream(settings).await?).await
}

/// Redrives the dead letters of `event_id`, or all of them; returns each letter with what happened to it.
pub async fn dlq_redrive(
    settings: &Settings,
    event_id: Option<&str>,
) -> anyhow::Result<Vec<(StoredLetter, Redriven)>> {
    let dlq = dlq_stream(settings).await?;
    let applier = applier(settings).await?;
    let mut out = Vec::new();
    for letter in dead_letter::read_all(&dlq).await? {
        if event_id.is_some_and(|id| id != letter.event_id) {
            continue;
        }
        let outcome = dead_letter::redrive(&dlq, &applier, &letter).await?;
        out.push((letter, outcome));
    }
    Ok(out)
}
