//! `stripe-sync-applier backfill`: loads every listable object of the account (and, with `--connected-accounts`,
//! of each connected account) from Stripe's API into the tables, through the stream (see [`crate::snapshot`]).
//!
//! - Several object types at once (`stripe.types_in_parallel`), and within one type several `created` ranges at
//!   once (`stripe.ranges_per_type`): a range being paged splits its unread part in two while the type has
//!   capacity, so a large type uses its whole per-endpoint budget.
//! - Resumable: each range's cursor (the last object published) is checkpointed in `stripe.backfill_ranges` after
//!   its page is stored in the stream; a backfill killed at any moment continues where it stopped, fetching again
//!   at most the pages in flight.
//! - Lists Stripe cuts short in an object (`has_more`: invoice lines, subscription items, refunds) are fetched to
//!   the end and embedded whole before publishing.
//! - A type the account can't list (a product not enabled: 400/403/404) is reported and skipped; the rest goes on.

mod progress;
mod range;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::api::{ApiError, StripeClient};
use crate::registry::{ListEndpoint, ObjectSpec, Registry};
use crate::snapshot::Publisher;
pub use progress::Progress;
pub(crate) use range::{PAGE, list_page};
use range::{Range, TypeJob};

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Object types or table names; empty: every listable type.
    pub objects: Vec<String>,
    /// Only objects created at or after this unix second.
    pub since: i64,
    /// Also every connected account's objects.
    pub connected_accounts: bool,
    /// Start a new run even if an unfinished one asked for the same.
    pub restart: bool,
}

/// How a type ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeOutcome {
    /// Every object was published.
    Loaded(u64),
    /// The account can't list it: Stripe's answer.
    Skipped(String),
    /// It failed (retries ran out): the error. A later run resumes it.
    Failed(String),
}

/// What a backfill did, per (account, object type).
#[derive(Debug, Default)]
pub struct Summary {
    /// The run (resumable by running the same backfill again).
    pub run: i64,
    /// Per account (`""` for the platform) and object type.
    pub types: BTreeMap<(String, String), TypeOutcome>,
    /// Objects published by this process.
    pub published: u64,
    /// How long it took.
    pub elapsed: std::time::Duration,
}

impl Summary {
    /// True when nothing failed (skipped types are fine).
    #[must_use]
    pub fn ok(&self) -> bool {
        !self
            .types
            .values()
            .any(|t| matches!(t, TypeOutcome::Failed(_)))
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "backfill run {}: {} objects published in {:.1}s ({:.0}/s)",
            self.run,
            self.published,
            self.elapsed.as_secs_f64(),
            self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )?;
        for ((account, kind), outcome) in &self.types {
            let account = if account.is_empty() {
                "platform"
            } else {
                account
            };
            match outcome {
                TypeOutcome::Loaded(n) => writeln!(f, "  {account}\t{kind}\t{n} objects")?,
                TypeOutcome::Skipped(why) => writeln!(f, "  {account}\t{kind}\tskipped: {why}")?,
                TypeOutcome::Failed(why) => writeln!(f, "  {account}\t{kind}\tFAILED: {why}")?,
            }
        }
        Ok(())
    }
}

/// Everything a backfill needs.
#[derive(Debug, Clone)]
pub struct Backfill {
    /// Stripe's API.
    pub api: Arc<StripeClient>,
    /// Where objects go.
    pub publisher: Publisher,
    /// Checkpoints.
    pub pool: PgPool,
    /// Which types are listable, and how.
    pub registry: &'static Registry,
    /// Types paged at once.
    pub types_in_parallel: usize,
    /// Ranges of one type paged at once.
    pub ranges_per_type: usize,
    /// Counts for the progress report.
    pub progress: Progress,
}

impl Backfill {
    /// A backfill reading through `api` and publishing to the stream of `topology`, with the settings' parallelism.
    pub fn new(
        settings: &crate::settings::Settings,
        api: Arc<StripeClient>,
        js: async_nats::jetstream::Context,
        topology: stripe_sync_shared::subjects::Topology,
        pool: PgPool,
    ) -> Self {
        Self {
            publisher: Publisher::new(js, topology, api.api_version(), api.is_live()),
            api,
            pool,
            registry: Registry::shipped(),
            types_in_parallel: settings.stripe.types_in_parallel.get(),
            ranges_per_type: settings.stripe.ranges_per_type.get(),
            progress: Progress::default(),
        }
    }

    /// The types `options` asks for (object types or table names), or every listable one.
    pub fn types(&self, options: &Options) -> anyhow::Result<Vec<&'static ObjectSpec>> {
        let listable: Vec<&'static ObjectSpec> = self
            .registry
            .objects()
            .iter()
            .filter(|s| s.list.is_some())
            .collect();
        if options.objects.is_empty() {
            return Ok(listable);
        }
        options
            .objects
            .iter()
            .map(|wanted| {
                listable
                    .iter()
                    .find(|s| &s.object_type == wanted || &s.table == wanted)
                    .copied()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{wanted:?} is not a listable object type or table (listable: {})",
                            listable
                                .iter()
                                .map(|s| s.table.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            })
            .collect()
    }

    /// Runs (or resumes) a backfill to the end.
    pub async fn run(&self, options: &Options) -> anyhow::Result<Summary> {
        let started = std::time::Instant::now();
        let types = self.types(options)?;
        let names: Vec<String> = types.iter().map(|s| s.object_type.clone()).collect();
        let run = range::find_or_create_run(&self.pool, &names, options).await?;
        // One process per run: a second one would fetch every page twice. The lock lives as long as this
        // connection (a killed backfill releases it with its connection).
        let mut lock = self.pool.acquire().await?.detach();
        let locked: bool = sqlx::query_scalar(
            "select pg_try_advisory_lock('stripe.backfill_runs'::regclass::oid::int, $1::int)",
        )
        .bind(run)
        .fetch_one(&mut lock)
        .await?;
        anyhow::ensure!(
            locked,
            "another backfill is loading the same objects right now (run {run}); watch it, or wait for it to end"
        );
        let mut accounts: Vec<Option<String>> = vec![None];
        if options.connected_accounts {
            accounts.extend(self.api.connected_accounts().await?.into_iter().map(Some));
        }
        let slots = Arc::new(Semaphore::new(self.types_in_parallel.max(1)));
        let mut jobs = tokio::task::JoinSet::new();
        for account in &accounts {
            for spec in &types {
                let Some(list) = &spec.list else { continue };
                // `/v1/accounts/{account}/...` lists a connected account's objects: not the platform's.
                if list.path.contains("{account}") && account.is_none() {
                    continue;
                }
                let job = TypeJob {
                    backfill: self.clone(),
                    run,
                    account: account.clone(),
                    spec,
                    since: options.since,
                };
                let slots = slots.clone();
                jobs.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let key = (
                        job.account.clone().unwrap_or_default(),
                        job.spec.object_type.clone(),
                    );
                    (key, job.run().await)
                });
            }
        }
        let mut summary = Summary {
            run,
            ..Summary::default()
        };
        while let Some(done) = jobs.join_next().await {
            let (key, outcome) = done?;
            if let Err(ApiError::Unauthorized { .. }) = &outcome {
                jobs.abort_all();
                return Err(outcome
                    .err()
                    .map(anyhow::Error::new)
                    .unwrap_or_else(|| anyhow::anyhow!("unauthorized")));
            }
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(err) => TypeOutcome::Failed(err.to_string()),
            };
            summary.types.insert(key, outcome);
        }
        if summary.ok() {
            range::finish_run(&self.pool, run).await?;
        }
        // Closing ends the session and its lock; a failure here changes nothing the run did.
        let _ = sqlx::Connection::close(lock).await;
        summary.published = self.progress.published();
        summary.elapsed = started.elapsed();
        Ok(summary)
    }
}

impl Backfill {
    /// Fetches to the end every list the object embeds cut short (`has_more`), and embeds it whole.
    pub(crate) async fn complete_lists(
        &self,
        spec: &ObjectSpec,
        object: &mut Value,
        account: Option<&str>,
    ) -> Result<(), ApiError> {
        let id = object["id"].as_str().unwrap_or_default().to_owned();
        for child in self.registry.children_of(&spec.object_type) {
            let list = &mut object[&child.field];
            if list["has_more"] != json!(true) {
                continue;
            }
            let Some(url) = list["url"].as_str().map(str::to_owned) else {
                continue;
            };
            if !url.starts_with("/v1/") {
                return Err(ApiError::Unreadable(format!(
                    "the list {} of {id} has the url {url:?}",
                    child.field
                )));
            }
            let endpoint = url.replace(&id, "{id}");
            let mut data: Vec<Value> = list["data"].as_array().cloned().unwrap_or_default();
            loop {
                let mut query = vec![("limit".to_owned(), PAGE.to_string())];
                if let Some(after) = data.last().and_then(|i| i["id"].as_str()) {
                    query.push(("starting_after".into(), after.to_owned()));
                }
                let page = self.api.get(&endpoint, &url, &query, account).await?;
                let (more, has_more) = list_page(page, false)?;
                data.extend(more);
                if !has_more {
                    break;
                }
            }
            list["data"] = Value::Array(data);
            list["has_more"] = json!(false);
        }
        Ok(())
    }
}

/// The query a type's list takes besides paging: its registry parameters.
pub(crate) fn base_query(list: &ListEndpoint) -> Vec<(String, String)> {
    list.query
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Range {
    /// `created` bounds as query parameters (none for lists that don't filter by `created`).
    fn created_query(&self, list: &ListEndpoint) -> Vec<(String, String)> {
        if !list.created {
            return Vec::new();
        }
        vec![
            ("created[gte]".to_owned(), self.start.to_string()),
            ("created[lt]".to_owned(), self.end.to_string()),
        ]
    }
}

/// What `sync <type> <ids>` did with one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// Read and published.
    Published,
    /// Stripe has no such object (404).
    NotFound,
}

impl Backfill {
    /// `sync <table> [ids...]`: re-reads a whole table now (a new run), or the given objects; a report to print.
    pub async fn sync(
        &self,
        table: &str,
        account: Option<&str>,
        ids: &[String],
    ) -> anyhow::Result<String> {
        let options = Options {
            objects: vec![table.to_owned()],
            restart: true,
            ..Options::default()
        };
        let spec = self
            .types(&options)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("nothing to sync"))?;
        if ids.is_empty() {
            let summary = self.run(&options).await?;
            anyhow::ensure!(summary.ok(), "{summary}");
            return Ok(summary.to_string());
        }
        Ok(self
            .sync_ids(spec, account, ids)
            .await?
            .iter()
            .map(|(id, outcome)| format!("{id}\t{outcome:?}\n"))
            .collect())
    }

    /// Reads the given objects of one type now and publishes them (`sync <type> <ids...>`).
    pub async fn sync_ids(
        &self,
        spec: &ObjectSpec,
        account: Option<&str>,
        ids: &[String],
    ) -> anyhow::Result<Vec<(String, Synced)>> {
        let list = spec.list.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no list endpoint to read objects from",
                spec.object_type
            )
        })?;
        anyhow::ensure!(
            !list.path.contains("{account}"),
            "{} is read per connected account: use `sync {}` without ids",
            spec.object_type,
            spec.table
        );
        if let Some(bad) = ids.iter().find(|id| {
            id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }) {
            anyhow::bail!("{bad:?} is not a Stripe object id (letters, digits, _ and - only)");
        }
        let endpoint = format!("{}/{{id}}", list.path);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let read_at = time::OffsetDateTime::now_utc().unix_timestamp();
            let path = format!("{}/{id}", list.path);
            match self.api.get(&endpoint, &path, &[], account).await {
                Ok(object) if object["id"].as_str() != Some(id.as_str()) => {
                    anyhow::bail!(
                        "Stripe answered {path} with another object: {}",
                        object["id"]
                    );
                }
                Ok(mut object) => {
                    self.complete_lists(spec, &mut object, account).await?;
                    self.publisher
                        .publish_all(&[crate::snapshot::Snapshot {
                            account,
                            read_at,
                            object: &object,
                        }])
                        .await?;
                    self.progress.add(&spec.object_type, 1);
                    out.push((id.clone(), Synced::Published));
                }
                Err(err) if err.is_not_found() => out.push((id.clone(), Synced::NotFound)),
                Err(err) => return Err(err.into()),
            }
        }
        Ok(out)
    }
}
