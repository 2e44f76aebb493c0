//! The operator commands besides `run`: `migrate`, `replay`, `dlq list|show|redrive`. Each connects, does its job
//! and returns what `main` prints. They honour `run_migrations`: with it off, they refuse a database whose schema
//! is not current instead of migrating it.

use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream;
use stripe_sync_shared::nats;

use crate::apply::Applier;
use crate::dead_letter::{self, Redriven, StoredLetter};
use crate::decision::Policy;
use crate::registry::Registry;
use crate::replay::{self, Summary};
use crate::settings::Settings;
use crate::startup;

/// A database ready for the commands: migrated, or checked when migrations are left to the operator.
async fn applier(settings: &Settings) -> anyhow::Result<Arc<Applier>> {
    let pool = startup::database_pool(settings)?;
    if settings.database.run_migrations {
        crate::migrate::run(&pool)
            .await
            .context("running migrations")?;
    } else {
        crate::migrate::check(&pool).await?;
    }
    crate::migrate::pin_account(&pool, &settings.applier.account_id).await?;
    Ok(Arc::new(Applier::new(
        pool,
        Registry::shipped(),
        settings.applier.account_id.clone(),
    )))
}

async fn jetstream(settings: &Settings) -> anyhow::Result<jetstream::Context> {
    let client = nats::connect(&settings.nats, "stripe-sync-applier-cli", true).await?;
    nats::check_server_version(&client)?;
    Ok(jetstream::new(client))
}

/// Runs the migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = startup::database_pool(settings)?;
    crate::migrate::run(&pool)
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
    let epoch = startup::epoch_of(applier.pool(), &stream).await?;
    let policy = Policy::new(&settings.applier);
    replay::replay(&stream, &applier, &policy, epoch, options).await
}

async fn dlq_stream(settings: &Settings) -> anyhow::Result<jetstream::stream::Stream> {
    let js = jetstream(settings).await?;
    nats::ensure_dlq_stream(&js, &settings.stream).await
}

/// Calls `each` with every dead letter, oldest first (headers only); returns how many there are.
pub async fn dlq_list(
    settings: &Settings,
    each: impl FnMut(StoredLetter) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    dead_letter::scan(&dlq_stream(settings).await?, each).await
}

/// The dead letters of `event_id`, each with the event as received.
pub async fn dlq_show(
    settings: &Settings,
    event_id: &str,
) -> anyhow::Result<Vec<(StoredLetter, bytes::Bytes)>> {
    let dlq = dlq_stream(settings).await?;
    let mut found = Vec::new();
    dead_letter::scan(&dlq, |letter| {
        if letter.event_id == event_id {
            found.push(letter);
        }
        Ok(())
    })
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for letter in found {
        let payload = dead_letter::payload(&dlq, &letter).await?;
        out.push((letter, payload));
    }
    Ok(out)
}

/// Redrives the dead letters of `event_id`, or all of them, one at a time; calls `each` with each letter and what
/// happened to it; returns (redriven, still failing).
pub async fn dlq_redrive(
    settings: &Settings,
    event_id: Option<&str>,
    mut each: impl FnMut(&StoredLetter, &Redriven),
) -> anyhow::Result<(u64, u64)> {
    let dlq = dlq_stream(settings).await?;
    let applier = applier(settings).await?;
    let policy = Policy::new(&settings.applier);
    let js = jetstream(settings).await?;
    let stream = js
        .get_stream(&settings.stream.name)
        .await
        .with_context(|| format!("opening stream {}", settings.stream.name))?;
    let epoch = startup::epoch_of(applier.pool(), &stream).await?;
    // The sequences first (headers only), then each letter's payload as it is redriven.
    let mut wanted = Vec::new();
    dead_letter::scan(&dlq, |letter| {
        if event_id.is_none_or(|id| id == letter.event_id) {
            wanted.push(letter);
        }
        Ok(())
    })
    .await?;
    let (mut applied, mut failing) = (0, 0);
    for letter in wanted {
        let outcome = dead_letter::redrive(&dlq, &applier, &policy, &letter, epoch).await?;
        match outcome {
            Redriven::Applied => applied += 1,
            Redriven::Failed(_) => failing += 1,
        }
        each(&letter, &outcome);
    }
    Ok((applied, failing))
}

/// The API side's tools: Stripe's API, the stream to publish to, the checkpoints' database.
pub async fn backfill_context(settings: &Settings) -> anyhow::Result<crate::backfill::Backfill> {
    let api = Arc::new(crate::api::StripeClient::new(&settings.stripe)?);
    let applier = applier(settings).await?;
    let (client, _stream, topology) =
        startup::connect_streams(settings, "stripe-sync-applier-api").await?;
    Ok(crate::backfill::Backfill::new(
        settings,
        api,
        async_nats::jetstream::new(client),
        topology,
        applier.pool().clone(),
    ))
}

/// Runs a backfill, reporting progress meanwhile.
pub async fn backfill(
    settings: &Settings,
    options: &crate::backfill::Options,
) -> anyhow::Result<crate::backfill::Summary> {
    let backfill = backfill_context(settings).await?;
    let reporter = tokio::spawn(
        backfill
            .progress
            .clone()
            .report(std::time::Duration::from_secs(2)),
    );
    let summary = backfill.run(options).await;
    reporter.abort();
    summary
}

/// Re-reads a table now (`ids` empty), or the given objects.
pub async fn sync(
    settings: &Settings,
    table: &str,
    account: Option<&str>,
    ids: &[String],
) -> anyhow::Result<String> {
    backfill_context(settings)
        .await?
        .sync(table, account, ids)
        .await
}

/// Compares the tables `objects` names (empty: every listable one) with Stripe's API and fixes what differs.
pub async fn reconcile(
    settings: &Settings,
    objects: &[String],
) -> anyhow::Result<crate::reconcile::Report> {
    let applier = applier(settings).await?;
    let (client, _stream, topology) =
        startup::connect_streams(settings, "stripe-sync-applier-api").await?;
    crate::reconcile::Reconcile::new(
        settings,
        async_nats::jetstream::new(client),
        topology,
        applier.pool().clone(),
    )?
    .run(objects)
    .await
}

/// Publishes the events of Stripe's `GET /v1/events` since `since`.
pub async fn recover(
    settings: &Settings,
    since: i64,
    undelivered_only: bool,
    connected_accounts: bool,
) -> anyhow::Result<crate::recover::Recovered> {
    let api = crate::api::StripeClient::new(&settings.stripe)?;
    let (client, _stream, topology) =
        startup::connect_streams(settings, "stripe-sync-applier-api").await?;
    crate::recover::recover(
        &api,
        &async_nats::jetstream::new(client),
        &topology,
        since,
        undelivered_only,
        connected_accounts,
    )
    .await
}
