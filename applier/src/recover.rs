//! `stripe-sync-applier recover --since <time>`: closes a gap of missed webhooks (an outage longer than Stripe's 3
//! days of retries, a disabled endpoint) from `GET /v1/events`, publishing each event with its own id: events the
//! database has already applied change nothing (dedupe), so recovering twice, or over a period webhooks covered,
//! is harmless. Stripe keeps events 30 days; older gaps need `backfill`. With `--connected-accounts`, each connected
//! account's events too (read with `Stripe-Account`, as a Connect endpoint would have received them).

use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::Value;
use stripe_sync_shared::event_head::RoutingHead;
use stripe_sync_shared::subjects::{self, Topology};

use crate::api::{ApiError, StripeClient};

/// How far back Stripe keeps events.
pub const EVENTS_KEPT_SECONDS: i64 = 30 * 24 * 3600;

/// The Events API is eventually consistent: events younger than this may still be missing from it.
pub const SETTLE_SECONDS: i64 = 5;

/// What a recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Events read from the API.
    pub read: u64,
    /// Of those, stored in the stream for the first time (the stream's duplicate window knew the others).
    pub published: u64,
    /// Connected accounts whose events could not be read, with Stripe's answer.
    pub skipped: Vec<(String, String)>,
}

/// Reads every event created in `[since, now - 5 s)` (only those whose webhook failed, with `undelivered_only`) of
/// the platform and, with `connected_accounts`, of every connected account, and publishes it. Refuses a start older
/// than Stripe's 30 days, pointing to `backfill`.
pub async fn recover(
    api: &StripeClient,
    js: &jetstream::Context,
    topology: &Topology,
    since: i64,
    undelivered_only: bool,
    connected_accounts: bool,
) -> anyhow::Result<Recovered> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    anyhow::ensure!(
        since >= now - EVENTS_KEPT_SECONDS,
        "Stripe keeps events for 30 days: a gap older than that can't be recovered from events. Load the current \
         state instead: `stripe-sync-applier backfill` (add --since to limit it)"
    );
    let mut accounts = vec![None];
    if connected_accounts {
        accounts.extend(api.connected_accounts().await?.into_iter().map(Some));
    }
    let mut out = Recovered::default();
    for account in &accounts {
        match read_account(
            api,
            js,
            topology,
            since,
            now,
            undelivered_only,
            account.as_deref(),
        )
        .await
        {
            Ok((read, published)) => {
                out.read += read;
                out.published += published;
            }
            // A connected account that revoked access, or whose events this key can't read, doesn't stop the rest.
            Err(err)
                if account.is_some()
                    && matches!(
                        err.downcast_ref::<ApiError>(),
                        Some(ApiError::Refused { .. })
                    ) =>
            {
                tracing::warn!(account = account.as_deref().unwrap_or_default(), error = %err, "skipping a connected account's events");
                out.skipped
                    .push((account.clone().unwrap_or_default(), err.to_string()));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(out)
}

/// Reads and publishes one account's events (`None`: the platform's); `(read, newly published)`.
async fn read_account(
    api: &StripeClient,
    js: &jetstream::Context,
    topology: &Topology,
    since: i64,
    now: i64,
    undelivered_only: bool,
    account: Option<&str>,
) -> anyhow::Result<(u64, u64)> {
    let (mut read, mut published) = (0, 0);
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![
            ("limit".to_owned(), "100".to_owned()),
            ("created[gte]".to_owned(), since.to_string()),
            ("created[lt]".to_owned(), (now - SETTLE_SECONDS).to_string()),
        ];
        if undelivered_only {
            query.push(("delivery_success".into(), "false".into()));
        }
        if let Some(after) = &cursor {
            query.push(("starting_after".into(), after.clone()));
        }
        let page = api.get("/v1/events", "/v1/events", &query, account).await?;
        let Some(events) = page["data"].as_array() else {
            anyhow::bail!("GET /v1/events answered a page without a data array");
        };
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            acks.push(publish(js, topology, event, account).await?);
        }
        for ack in acks {
            read += 1;
            if !ack.await?.duplicate {
                published += 1;
            }
        }
        cursor = events
            .last()
            .and_then(|e| e["id"].as_str().map(str::to_owned));
        if page["has_more"] != Value::Bool(true) || cursor.is_none() {
            return Ok((read, published));
        }
    }
}

/// Publishes one event as ingest would have: its id as the message id, on its partition's subject. A connected
/// account's event read with `Stripe-Account` names its account, as the Connect webhook would.
async fn publish(
    js: &jetstream::Context,
    topology: &Topology,
    event: &Value,
    account: Option<&str>,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let mut event = event.clone();
    if let Some(account) = account
        && event["account"].as_str().is_none()
    {
        event["account"] = Value::String(account.to_owned());
    }
    let body = serde_json::to_vec(&event)?;
    let head = RoutingHead::parse(&body)
        .map_err(|e| anyhow::anyhow!("an event from the API is not an event: {e}"))?;
    let routing =
        subjects::routing_key(head.account.as_deref(), head.object_id.as_deref(), &head.id);
    let subject = topology.event_subject(topology.partition_of(&routing), &head.event_type);
    let mut headers = HeaderMap::new();
    headers.insert(subjects::HEADER_MSG_ID, head.id.as_ref());
    headers.insert(
        subjects::HEADER_EVENT_TYPE,
        subjects::header_safe(&head.event_type, 256).as_str(),
    );
    if let Some(account) = &head.account {
        headers.insert(
            subjects::HEADER_ACCOUNT,
            subjects::header_safe(account, 256).as_str(),
        );
    }
    headers.insert(subjects::HEADER_ENDPOINT, "recover");
    Ok(js
        .publish_with_headers(subject, headers, body.into())
        .await?)
}
